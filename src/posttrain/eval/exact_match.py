"""Exact match of greedy completions against reference answers (synthetic verifiable tasks)."""

from __future__ import annotations

from posttrain.data.records import Record


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
                batch_size: int = 64) -> float:
    """Fraction of records whose greedy completion equals the reference (whitespace-trimmed)."""
    from posttrain.data.synthetic import answer_matches
    from posttrain.rollout.generate import generate
    from posttrain.rollout.sampling import SamplingSettings

    prompts, answers = prompts_and_answers(records, template, tokenizer)
    if not prompts:
        return 0.0
    was_training = model.training
    completions = generate(model, tokenizer, prompts, SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0),
                           batch_size=batch_size)
    model.train(was_training)
    return sum(answer_matches(c, a) for c, a in zip(completions, answers)) / len(prompts)
