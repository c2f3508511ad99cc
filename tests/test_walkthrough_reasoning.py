"""A reasoning walk: GRPO / RLOO for math reasoning, as a user reproducing a DeepSeek-R1-Zero or
Dr. GRPO style run meets it.

Walked: prompt files in GSM8K's form (`question`, `answer` holding the worked solution and ending
"#### 72") and MATH's (`problem`, `solution` with the result in \\boxed{...}, and MATH-500's short
`answer` column), read by the prompt reader (`data.prompts.load_prompt_records`) as `posttrain grpo`
reads them; the bundled verifier `posttrain.rewards:exact_match` on completions written the ways the
datasets and reasoning models write them ("72", "#### 72", "\\boxed{72}", "The answer is 72.",
negative numbers, LaTeX \\frac); a system prompt asking for <think>…</think><answer>…</answer> and
`reward.format_regex` on well-formed and malformed tags; completions cut off at
`rollout.max_new_tokens` (scored, and penalised by `reward.no_eos_penalty`); groups all right or all
wrong (zero advantage, counted in `rollout/flat_groups`); the held-out figures' definition
(`train.rollouts.held_out_reward`), and one 1-step `posttrain grpo` run on GSM8K-form rows with a
system prompt per row and the think/answer format regex (not kept as a test: it ran, every group
was flat, every reward 0).

What was right: the reader takes GSM8K's and MATH's keys and a row's `system` turn; MATH-500's short
`answer` wins over the worked `solution`, which stays among the row's fields for a verifier of the
user's own; exact_match compares a short answer as written (negative numbers, LaTeX) after trimming
whitespace; the format regex is a full match over several lines (DOTALL) of the trimmed response;
a completion cut off at the token limit is still scored and then penalised, one ended by EOS is not;
a group all right and a group all wrong both get advantage exactly 0 and both count as flat.

Wrong: the reference a GSM8K or MATH row gives is its whole worked solution, and exact_match
compares a completion with all of it. A completion giving the right final answer ("72", or the
dataset's own "… #### 72" after other working) scores 0; only a verbatim copy of the reference
rationale scores 1. A GSM8K or MATH prompt file with the default reward trains on nothing (every
group flat) and reports 0% held-out reward whatever the policy answers.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 35: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config import GRPOConfig
from posttrain.data.prompts import PromptRecord, load_prompt_records
from posttrain.rewards import exact_match

GSM_QUESTION = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                "How many clips did Natalia sell altogether in April and May?")
GSM_ANSWER = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
              "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")
MATH_PROBLEM = r"What is $\frac{1}{2}+\frac{1}{4}$?"
MATH_SOLUTION = r"We have $\frac{1}{2}+\frac{1}{4}=\frac{2}{4}+\frac{1}{4}=\boxed{\frac{3}{4}}$."
R1_SYSTEM = ("A conversation between User and Assistant. The Assistant first thinks about the reasoning process "
             "in <think> </think> tags and then gives the answer in <answer> </answer> tags.")
R1_FORMAT = r"<think>.*</think>\s*<answer>.*</answer>"


def _read(tmp_path: Path, rows: list[dict]) -> list[PromptRecord]:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    records, report = load_prompt_records([str(path)], log=lambda _: None)
    assert (report.total, report.bad) == (len(rows), 0)
    return records


def _scores(record: PromptRecord, responses: list[str]) -> list[float]:
    return [exact_match(record.prompt, response, record.reward_row()) for response in responses]


# --------------------------------------------------------------------------- defects


def test_exact_match_on_a_gsm8k_row_compares_the_final_answer_after_the_hashes(tmp_path):
    """README (Prompts): the answer may be under GSM8K's keys; (Rewards) exact_match checks the
    response against `answer`. GSM8K's `answer` is the worked solution ending '#### 72': its
    final answer is 72. A completion answering 72, bare or in the dataset's own form after other
    working, is right; one ending '#### 73' is wrong. Measured: [0, 0, 0]; only a verbatim copy of
    the reference rationale scores 1, so every group of a GSM8K run is flat at 0."""
    (record,) = _read(tmp_path, [{"question": GSM_QUESTION, "answer": GSM_ANSWER, "system": R1_SYSTEM}])
    assert record.prompt[0] == {"role": "system", "content": R1_SYSTEM}  # read: the defect is the comparison
    responses = ["72", "In May she sold 24, so 48 + 24 = 72 in all.\n#### 72", "48 + 24 = 73\n#### 73"]
    got = _scores(record, responses)
    assert got == [1.0, 1.0, 0.0], f"exact_match on GSM8K's '#### 72' reference gave {got}"


def test_exact_match_on_a_math_row_without_an_answer_column_compares_the_boxed_answer(tmp_path):
    """README (Prompts): MATH's `problem` / `solution` are read, the solution the reference when a
    row has no `answer`. MATH's solution is a derivation whose result is the last \\boxed{...}
    (braces nested: \\boxed{\\frac{3}{4}}). A completion answering \\frac{3}{4}, bare or boxed after
    other working, is right; \\boxed{\\frac{1}{4}} is wrong. Measured: [0, 0, 0]."""
    (record,) = _read(tmp_path, [{"problem": MATH_PROBLEM, "solution": MATH_SOLUTION, "level": "Level 1"}])
    assert record.answer == MATH_SOLUTION  # the whole derivation is the reference
    responses = [r"\frac{3}{4}", r"Adding gives $\frac{2}{4}+\frac{1}{4}=\boxed{\frac{3}{4}}$.",
                 r"$\boxed{\frac{1}{4}}$"]
    got = _scores(record, responses)
    assert got == [1.0, 1.0, 0.0], f"exact_match on MATH's \\boxed{{}} solution gave {got}"


# --------------------------------------------------------------------------- right, and now pinned


def test_a_math500_row_compares_its_short_answer_as_written_and_keeps_the_solution_for_a_verifier(tmp_path):
    """MATH-500 rows carry both a short `answer` and the worked `solution`: exact_match reads the
    short one (negative numbers and LaTeX as written, whitespace trimmed); the solution reaches
    reward functions among the row's fields."""
    frac, neg = _read(tmp_path, [
        {"problem": MATH_PROBLEM, "solution": MATH_SOLUTION, "answer": r"\frac{3}{4}"},
        {"problem": r"Compute $-3 \cdot 4$.", "solution": r"$-3\cdot 4 = \boxed{-12}$.", "answer": "-12"},
    ])
    assert _scores(frac, [r"\frac{3}{4}", r" \frac{3}{4}" + "\n", r"\frac{1}{4}", r"\dfrac{3}{4}"]) == [1, 1, 0, 0]
    assert _scores(neg, ["-12", "12", "- 12"]) == [1.0, 0.0, 0.0]
    assert frac.reward_row()["solution"] == MATH_SOLUTION and neg.reward_row()["answer"] == "-12"


def test_the_think_answer_format_regex_rewards_well_formed_tags_only():
    """`reward.format_regex` with R1-Zero's <think>…</think><answer>…</answer> (given as a CLI
    override, backslashes kept): a full match over several lines of the trimmed response; a
    missing closing tag, text after </answer>, or the answer before the thinking score 0."""
    from posttrain.train.rollouts import build_reward

    cfg = GRPOConfig.load(None, ["reward.functions=[]", f"reward.format_regex={R1_FORMAT}"])
    assert cfg.reward.format_regex == R1_FORMAT
    reward = build_reward(cfg)
    cases = {
        "<think>\n48/2 = 24\n48 + 24 = 72\n</think>\n<answer>72</answer>": 1.0,
        "\n  <think>x</think><answer>72</answer>\n\n": 1.0,  # surrounding whitespace trimmed
        "<think>\n48/2 = 24\n<answer>72</answer>": 0.0,  # no </think>
        "<think>x</think>\n<answer>72</answer> I hope that helps.": 0.0,  # text after the answer
        "<answer>72</answer><think>x</think>": 0.0,
        "<think>x</think>\n<answer>72": 0.0,  # cut off before </answer>
    }
    got = reward([[]] * len(cases), list(cases))
    assert got == list(cases.values())


def test_cut_off_reasoning_is_scored_then_penalised_and_all_right_or_all_wrong_groups_are_flat():
    """A rollout of three prompts × 2 under a user's <answer>-tag verifier plus the think/answer
    format: prompt 1 both right and well formed, prompt 2 both wrong, prompt 3 one ended well
    formed and one cut off inside <think> at max_new_tokens. The cut-off one is scored as written
    (format 0) and loses reward.no_eos_penalty; the first two groups are flat (all right, all
    wrong) and get advantage exactly 0."""
    from posttrain.losses import policy_gradient as pg
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.rollouts import build_reward, sample_and_score
    from tests.test_rl_edges import _FakeEngine

    tokenizer = load_tokenizer("tiny")
    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    right, wrong = enc("<think>\n24 + 48\n</think>\n<answer>72</answer>"), enc("<think>x</think><answer>70</answer>")
    cut = enc("<think>\nIn April 48. In May half of 48, so 48/2 = 24. Then in all, 48 + 24 is")
    limit = len(cut)
    assert len(right) < limit and len(wrong) < limit
    outs = [right + [eos], right + [eos], wrong + [eos], wrong + [eos], right + [eos], cut]
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", f"rollout.max_new_tokens={limit}",
                                 "reward.functions=[answer=tests.test_walkthrough_reasoning:tagged_answer]",
                                 f"reward.format_regex={R1_FORMAT}", "reward.no_eos_penalty=0.5"])
    records = [PromptRecord([{"role": "system", "content": R1_SYSTEM}, {"role": "user", "content": f"q{i}"}],
                            "72", source=f"reasoning:{i}") for i in range(3)]
    rollout = sample_and_score(_FakeEngine(outs), tokenizer, [[1, 5, 6]] * 3, records, [0, 1, 2], cfg,
                               build_reward(cfg), seed=0)
    assert rollout.texts[5] == tokenizer.decode(cut)  # scored as written, not dropped
    assert rollout.rewards.tolist() == [2.0, 2.0, 1.0, 1.0, 2.0, -0.5]
    assert rollout.stats.flat_groups == pytest.approx(2 / 3)
    assert rollout.stats.ended_fraction == pytest.approx(5 / 6)
    advantages = pg.group_advantages(rollout.rewards, 2)
    assert advantages[:4].tolist() == [0.0] * 4 and bool((advantages[4:] != 0).all())
    assert pg.rloo_advantages(rollout.rewards, 2)[:4].abs().max() == 0


def tagged_answer(prompt, response, row) -> float:
    """A user's verifier for the test above: the text inside <answer>…</answer> against the row's answer."""
    inside = response.split("<answer>", 1)[-1].split("</answer>", 1)[0] if "<answer>" in response else ""
    return float(inside.strip() == row["answer"])

