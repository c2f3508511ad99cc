"""Held-out figures of one policy: the learned reward (proxy), exact match (gold), KL to the
SFT model, response length, and a few completions. Used by run.py before and after GRPO.

Everything is generated with posttrain's own rollout engine (`generate_token_ids`) from the
same chat-templated prompt ids GRPO trains on, and scored with posttrain's own reward-model
scorer, so "RM reward" here is exactly the quantity GRPO maximised.
"""

from __future__ import annotations

import torch

from posttrain.rollout.generate import eos_token_ids, generate_token_ids, pad_token_id
from posttrain.rollout.sampling import SamplingSettings
from posttrain.train.rollouts import collate_completions, completion_logps


def _answer(model, tokenizer, prompt_ids, settings) -> tuple[list[list[int]], list[bool]]:
    eos = eos_token_ids(model, tokenizer)
    out = generate_token_ids(model, prompt_ids, settings, pad_token_id=pad_token_id(tokenizer, eos),
                             eos_token_ids=eos, batch_size=64)
    ended = [bool(c) and c[-1] in eos for c in out]
    return [c if c else [next(iter(eos))] for c in out], ended


@torch.no_grad()
def sequence_kl(policy, reference, tokenizer, prompt_ids, completions) -> float:
    """Mean over completions sampled from π of Σ_t (log π − log π_ref): an unbiased estimate of
    KL(π‖π_ref) per response (the same estimator as GRPO's held-out `kl_to_reference`)."""
    total = 0.0
    for start in range(0, len(completions), 64):
        batch = collate_completions(prompt_ids[start : start + 64], completions[start : start + 64],
                                    tokenizer.pad_token_id)
        logps = completion_logps(policy.eval(), batch)
        ref = completion_logps(reference.eval(), batch)
        total += float(((logps - ref) * batch["response_mask"]).sum())
    return total / len(completions)


def measure(policy, reference, tokenizer, reward_model, prompt_ids: list[list[int]], prompts: list[list[dict]],
            answers: list[str], *, samples: int, max_new_tokens: int, seed: int, show: int = 6) -> dict:
    """Greedy and sampled (temperature 1, `samples` per prompt, fixed seed) completions of the
    held-out prompts, scored by the reward model and by exact match against `answers`."""
    greedy_ids, greedy_ended = _answer(policy, tokenizer, prompt_ids,
                                       SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0))
    sampled_prompt_ids = [p for p in prompt_ids for _ in range(samples)]
    sampled_ids, sampled_ended = _answer(policy, tokenizer, sampled_prompt_ids,
                                         SamplingSettings(max_new_tokens=max_new_tokens, temperature=1.0, seed=seed))
    decode = lambda ids: [tokenizer.decode(c, skip_special_tokens=True) for c in ids]
    greedy, sampled = decode(greedy_ids), decode(sampled_ids)
    sampled_prompts = [p for p in prompts for _ in range(samples)]
    sampled_answers = [a for a in answers for _ in range(samples)]
    rm_greedy = reward_model(prompts, greedy)
    rm_sampled = reward_model(sampled_prompts, sampled)
    match = lambda texts, gold: [float(t.strip() == g.strip()) for t, g in zip(texts, gold)]
    em_greedy, em_sampled = match(greedy, answers), match(sampled, sampled_answers)
    mean = lambda xs: sum(xs) / len(xs)
    examples = []
    for i in range(min(show, len(prompts))):
        examples.append({"prompt": prompts[i][-1]["content"], "answer": answers[i], "greedy": greedy[i],
                         "greedy_rm": rm_greedy[i], "sampled": sampled[i * samples : (i + 1) * samples]})
    return {
        "rm_reward_sampled": mean(rm_sampled), "rm_reward_greedy": mean(rm_greedy),
        "exact_match_sampled": mean(em_sampled), "exact_match_greedy": mean(em_greedy),
        "kl_to_sft": sequence_kl(policy, reference, tokenizer, sampled_prompt_ids, sampled_ids),
        "response_tokens_sampled": mean([len(c) for c in sampled_ids]),
        "response_tokens_greedy": mean([len(c) for c in greedy_ids]),
        "ended_fraction_sampled": mean([float(e) for e in sampled_ended]),
        "ended_fraction_greedy": mean([float(e) for e in greedy_ended]),
        "prompts": len(prompts), "samples_per_prompt": samples, "examples": examples, "greedy_all": greedy,
        "greedy_rm_all": rm_greedy,
    }
