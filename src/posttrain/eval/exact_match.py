"""Exact match of greedy completions against reference answers (synthetic verifiable tasks)."""

from __future__ import annotations

from posttrain.data.records import Record


def answered(records: list[Record]) -> list[Record]:
    """The records with an assistant turn: only these have an answer to score (a text row has none)."""
    return [r for r in records if any(m["role"] == "assistant" for m in r.messages or [])]


def prompts_and_answers(records: list[Record], template: str, tokenizer) -> tuple[list[str], list[str]]:
    """Render each record's conversation up to its last assistant turn; that turn is the answer."""
    prompts, answers = [], []
    for record in records:
        messages = record.messages or []
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        prompts.append(tokenizer.apply_chat_template(messages[:last], chat_template=template, tokenize=False,
                                                     add_generation_prompt=True))
        answers.append(messages[last]["content"])
    return prompts, answers


def exact_match(model, tokenizer, template: str, records: list[Record], *, max_new_tokens: int = 32,
                batch_size: int = 64) -> dict[str, float]:
    """Fraction of records whose greedy completion equals the reference (whitespace-trimmed).

    Returns {"all": score} plus one score per synthetic task ("synthetic:<task>:<i>" sources);
    {} when no record has an answer (a score over no prompt is no figure, not 0%).
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
