"""Exact match of greedy completions against reference answers (synthetic verifiable tasks).

The reference is the text of a record's last assistant turn, and the prompt everything before
it, rendered as training renders it (`templates.render`, with the row's `tools`). An answer that
carries more than text (`tool_calls`, `reasoning_content`) has no text answer to compare with: the
greedy completion would hold the calls and reasoning as the template writes them, not the turn's
content. Such records are not scored (`formats.text_answer`), like rows without an assistant turn.
"""

from __future__ import annotations


from posttrain.data.formats import text_answer
from posttrain.data.records import Record


def last_answer(record: Record) -> int | None:
    """The index of the record's last assistant turn (the answer exact match compares with); None
    when it has none (a text row, a conversation without an assistant turn)."""
    messages = record.messages or []
    return max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)


def answered(records: list[Record]) -> list[Record]:
    """The records whose last assistant turn is a text answer (`text_answer`): only these have an
    answer to score (a text row has none, nor a row answered with a tool call)."""
    return [r for r in records if (last := last_answer(r)) is not None and text_answer(r.messages[last])]


def prompts_and_answers(records: list[Record], template: str, tokenizer) -> tuple[list[str], list[str]]:
    """Render each answered record's conversation up to its last assistant turn, with the row's
    tools; that turn's text is the answer. Records without a text answer are left out."""
    from posttrain.data.templates import render

    prompts, answers = [], []
    for record in answered(records):
        last = last_answer(record)
        prompts.append(render(tokenizer, template, record.messages[:last], True, record.source, record.tools))
        answers.append(text_answer(record.messages[last]))
    return prompts, answers


def exact_match(model, tokenizer, template: str, records: list[Record], *, max_new_tokens: int = 32,
                batch_size: int = 64) -> dict[str, float]:
    """Fraction of records whose greedy completion equals the reference (`data.synthetic.answer_matches`):
    surrounding whitespace trimmed and otherwise as written (case-sensitive, "M" is not "m"; the
    synthetic tasks' answers are exact strings), except that a reference marking its final answer
    (GSM8K's "#### 72", MATH's \\boxed{...}) is compared by that answer.

    Returns {"all": score} plus one score per synthetic task ("synthetic:<task>:<i>" sources);
    {} when no record has a text answer (a score over no prompt is no figure, not 0%).
    """
    from posttrain.data.synthetic import answer_matches
    from posttrain.rollout.generate import generate
    from posttrain.rollout.sampling import SamplingSettings

    records = answered(records)
    prompts, answers = prompts_and_answers(records, template, tokenizer)
    if not prompts:
        return {}
    was_training = model.training
    completions = generate(model, tokenizer, prompts, SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0),
                           batch_size=batch_size)
    model.train(was_training)
    hits = [answer_matches(c, a) for c, a in zip(completions, answers)]
    groups: dict[str, list[bool]] = {"all": hits}
    for record, hit in zip(records, hits):
        if record.source.startswith("synthetic:"):
            groups.setdefault(record.source.split(":")[1], []).append(hit)
    return {name: sum(values) / len(values) for name, values in groups.items()}
