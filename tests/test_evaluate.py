"""posttrain evaluate: the alignment report's figures by hand and by invariant (a model against
itself: KL 0, every comparison a tie), the judge's win rate, and a trained policy against its
untrained start."""

from __future__ import annotations

import json
import math

import pytest
import torch

from posttrain.config.evaluate import EvaluateConfig
from posttrain.errors import ConfigError
from posttrain.eval.alignment import mean_and_se, run_evaluate, win_rate
from posttrain.feedback.client import Reply

EXACT = "reward.functions=[exact_match=posttrain.rewards:exact_match]"


def _cfg(tmp_path, *overrides) -> EvaluateConfig:
    return EvaluateConfig.load(None, [f"output_dir={tmp_path / 'ev'}", "prompts.limit=6",
                                      "generation.max_new_tokens=6", "generation.samples=2", *overrides])


def _report(out) -> dict:
    return json.loads((out / "report.json").read_text())


def test_mean_se_and_win_rate_by_hand():
    # values 1, 2, 3: mean 2, s = 1, se = 1 / sqrt(3)
    assert mean_and_se([1.0, 2.0, 3.0]) == pytest.approx({"mean": 2.0, "se": 1 / math.sqrt(3), "n": 3})
    assert mean_and_se([5.0])["se"] is None and mean_and_se([])["mean"] is None
    w = win_rate(["win", "win", "loss", "tie", "other"])
    assert (w["win_rate"], w["wins"], w["losses"], w["ties"], w["other"]) == (2.5 / 4, 2, 1, 1, 1)
    assert w["ci95_decisive"] == pytest.approx([0.2077, 0.9385], abs=1e-4)  # Wilson, 2 of 3


def test_a_model_against_itself(tmp_path):
    out = run_evaluate(_cfg(tmp_path, "policy=tiny", "reference=tiny", EXACT), log=lambda _: None)
    report = _report(out)
    policy, reference = report["models"]["policy"], report["models"]["reference"]
    assert report["kl_to_reference"] == 0.0  # the same weights: log π − log π_ref is 0 token by token
    assert policy == reference
    assert report["reward_win_rate"]["ties"] == 6 and report["reward_win_rate"]["win_rate"] == 0.5
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and all(r["policy"] == r["reference"] for r in rows)
    # a rate over the 6 prompts with an answer, with its Wilson interval and count
    assert "| exact match (greedy) | 0.0% [0.0%, 39.0%] (0/6) | 0.0% [0.0%, 39.0%] (0/6) |" in (
        out / "report.md").read_text()


def test_answer_nll_matches_a_plain_forward(tmp_path):
    """The reference-answer NLL against log_softmax over the full logits of prompt + answer."""
    from posttrain.data.templates import resolve_template
    from posttrain.inference import load_for_inference

    out = run_evaluate(_cfg(tmp_path, "policy=tiny", "prompts.limit=3", "generation.samples=0"), log=lambda _: None)
    figures = _report(out)["models"]["policy"]
    model, tokenizer = load_for_inference("tiny")
    template = resolve_template(tokenizer, "auto")
    rows = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    total, count = 0.0, 0
    for row in rows:
        text = tokenizer.apply_chat_template(row["prompt"], chat_template=template, tokenize=False,
                                             add_generation_prompt=True)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
        answer = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0].double()
        logps = torch.log_softmax(logits, -1)
        for j, token in enumerate(answer):
            total -= float(logps[len(prompt) + j - 1, token])
            count += 1
    assert figures["answer_nll"] == pytest.approx(total / count, rel=1e-4)
    assert figures["answer_perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)


class VerdictJudge:
    """A pairwise judge that prefers the longer response (ties on equal length)."""

    model_name = "scripted-judge"

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None):
        text = messages[-1]["content"]
        a = text.split("[Response A]")[1].split("[End of response A]")[0]
        b = text.split("[Response B]")[1].split("[End of response B]")[0]
        verdict = "A" if len(a.strip()) > len(b.strip()) else "B" if len(b.strip()) > len(a.strip()) else "tie"
        return Reply(f"Reasoning.\nVerdict: {verdict}", "stop", 1, 1)


def test_judge_win_rate_counts_both_orders(tmp_path):
    from posttrain.feedback import judge as judge_module

    assert "[Response A]" in judge_module.judge_messages([{"role": "user", "content": "q"}], "a", "b")[-1]["content"]
    out = run_evaluate(_cfg(tmp_path, "policy=tiny", "reference=tiny", "judge.enabled=true", "generation.samples=0"),
                       judge=VerdictJudge(), log=lambda _: None)
    w = _report(out)["judge_win_rate"]
    assert (w["ties"], w["wins"] + w["losses"] + w["other"]) == (6, 0)  # identical answers: a tie both ways
    assert "judge win rate" in (out / "report.md").read_text()


@pytest.mark.parametrize("override, message", [
    ("policy=", "policy is empty"),
    ("generation.temperature=0", "temperature"),
    ("judge.enabled=true", "needs a reference"),
    ("prompts.files=[synthetic,x.jsonl]", "cannot be mixed"),
])
def test_config_refusals(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_evaluate(_cfg(tmp_path, override), log=lambda _: None)


def test_a_trained_policy_against_its_untrained_start(tmp_path):
    """Outcome, small: 80 SFT steps on "smallest letter" lower the NLL of held-out answers, move
    the policy away from its start (KL > 0) and win on exact match more than they lose."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    sft = SFTConfig.load(None, [
        f"output_dir={tmp_path / 'sft'}", "model.path=tiny", "data.synthetic_tasks=[smallest]",
        "data.synthetic_size=3000", "data.max_length=32", "train.max_steps=80", "train.batch_size=32",
        "train.lr=3e-3", "train.seed=0", "train.progress_bar=false", "train.log_every=40",
        "eval.exact_match_prompts=0", "data.eval_fraction=0.01"])
    policy = run_sft(sft) / "final"
    out = run_evaluate(_cfg(tmp_path, f"policy={policy}", "reference=tiny", EXACT, "prompts.limit=40",
                            "prompts.synthetic_tasks=[smallest]"), log=lambda _: None)
    report = _report(out)
    p, r = report["models"]["policy"], report["models"]["reference"]
    print({k: (p.get(k), r.get(k)) for k in ("exact_match", "answer_nll")}, report["kl_to_reference"],
          report["reward_win_rate"])
    assert p["answer_nll"] < r["answer_nll"] - 1.0
    assert report["kl_to_reference"] > 0.1
    assert p["exact_match"]["rate"] >= r["exact_match"]["rate"] and p["exact_match"]["n"] == 40
    assert report["reward_win_rate"]["wins"] >= report["reward_win_rate"]["losses"]


def test_judge_outcomes_map_to_wins_and_losses(tmp_path):
    from posttrain.data.prompts import PromptRecord
    from posttrain.eval.alignment import Side, _judge

    records = [PromptRecord([{"role": "user", "content": f"q{i}"}]) for i in range(4)]
    policy = Side("policy", "p", None, None, "", responses=["long answer", "long answer", "x", "same"])
    reference = Side("reference", "r", None, None, "", responses=["short", "short", "longer one", "same"])
    cfg = _cfg(tmp_path, "reference=tiny", "judge.enabled=true")
    outcomes = _judge(policy, reference, records, cfg, VerdictJudge())
    assert outcomes == ["win", "win", "loss", "tie"]
    assert win_rate(outcomes)["win_rate"] == pytest.approx(2.5 / 4)


def test_the_example_runs(tmp_path):
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cfg = EvaluateConfig.load(root / "examples/evaluate.yaml", [f"output_dir={tmp_path / 'ex'}", "prompts.limit=4",
                                                                  "safety.limit=1", "safety.max_tokens=4"])
    report = _report(run_evaluate(cfg, log=lambda _: None))
    assert report["kl_to_reference"] == 0.0 and report["reward_win_rate"]["ties"] == 4
    assert report["models"]["policy"]["redteam"]["attack_success"]["n"] == 3  # 1 probe x 3 attacks
