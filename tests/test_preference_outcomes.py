"""Outcomes: a reward model and DPO measurably do their jobs on the tiny preset after SFT.

The SFT model answers "Smallest letter: …" right ~80% of the time. Preferences are
verifiable: chosen is the correct answer.
- Reward model: trained from the SFT model on synthetic pairs (rejected = a wrong letter),
  it must order held-out pairs it never saw.
- DPO (+ the RPO NLL term) on synthetic pairs: held-out implicit-reward accuracy must rise
  from 0.5 (π = π_ref) to ≥ 0.9, and greedy exact match must not fall: that model already
  answers ~80% right and its mistakes are not what the synthetic rejections contain.
- DPO raising exact match: a second SFT model learns from demonstrations that take a
  shortcut 60% of the time (the FIRST letter of the list instead of the smallest, where the
  two differ), so its greedy answers are right about half the time. Pairs built from its own
  samples (chosen = the correct letter, rejected = a sampled wrong answer) and DPO + NLL must
  lift held-out exact match by ≥ 12 points.
Thresholds sit under the measured figures (comments); the runs are deterministic on CPU.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from posttrain.config import DPOConfig, RMConfig, SFTConfig

pytestmark = pytest.mark.slow

HELD_OUT = 200


@pytest.fixture(scope="module")
def sft_model(tmp_path_factory):
    from posttrain.train.sft import run_sft

    out = tmp_path_factory.mktemp("pref-sft")
    cfg = SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["smallest"], "synthetic_size": 6000,
                 "eval_fraction": 0.05, "max_length": 64},
        "train": {"max_steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
                  "progress_bar": False, "log_every": 50, "resume": "never"}})
    return str(run_sft(cfg) / "final")


def test_reward_model_orders_held_out_pairs(sft_model, tmp_path):
    from posttrain.train.reward import run_rm

    cfg = RMConfig.load(None, [f"output_dir={tmp_path}", f"model.path={sft_model}", "data.synthetic_tasks=[smallest]",
                               "data.synthetic_size=2200", f"data.eval_fraction={HELD_OUT / 2200}", "data.max_length=64",
                               "train.max_steps=150", "train.batch_size=16", "train.lr=1e-3", "train.progress_bar=false",
                               "reward.centering=0.01"])
    summary = json.loads((run_rm(cfg) / "summary.json").read_text())
    assert summary["eval_items"] == HELD_OUT
    # A fresh random head on the SFT model's features orders about half the pairs (measured 0.525).
    # measured 0.945 at d34a043; 0.955 before the sparse embedding gradient and the packing of short items
    # changed the rounding (0.94 then with reward.share_prompt=false)
    assert summary["eval_after"]["accuracy"] >= 0.9
    assert summary["eval_after"]["accuracy"] >= summary["eval_before"]["accuracy"] + 0.15


def test_dpo_raises_held_out_implicit_reward_accuracy_without_losing_exact_match(sft_model, tmp_path):
    from posttrain.train.preference import run_dpo

    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}", f"model.path={sft_model}", "data.synthetic_tasks=[smallest]",
                                "data.synthetic_size=3200", f"data.eval_fraction={HELD_OUT / 3200}", "data.max_length=64",
                                "train.max_steps=150", "train.batch_size=16", "train.lr=3e-4",
                                "train.progress_bar=false", "dpo.beta=0.1", "dpo.nll_weight=1.0",
                                f"eval.exact_match_prompts={HELD_OUT}", "eval.max_new_tokens=4"])
    summary = json.loads((run_dpo(cfg) / "summary.json").read_text())
    assert summary["eval_items"] == HELD_OUT
    assert summary["eval_before"]["rewards/accuracy"] == pytest.approx(0.5)  # π = π_ref: every margin is 0
    assert summary["eval_after"]["rewards/accuracy"] >= 0.9  # measured 0.935 at d34a043, 0.95 before packing
    # Exact match barely moves on this tiny model: measured 79.0% → 80.5% on one machine and 80.0% → 79.5% on
    # another. Plain DPO without the NLL term gives 79% → 74%. This test holds the line against regression, and the
    # README says so.
    assert summary["exact_match_after"] >= summary["exact_match_before"] - 0.04


SHORTCUT = 0.7  # share of demonstrations (among those whose first letter is not the smallest) that answer the first


@pytest.fixture(scope="module")
def shortcut_task(tmp_path_factory):
    """An SFT model that learned a shortcut, on-policy verified pairs from its samples, held-out pairs."""
    from posttrain.data.synthetic import make_examples, make_preference_split
    from posttrain.train.sft import run_sft

    out = tmp_path_factory.mktemp("pref-shortcut")
    _, held_out = make_preference_split(["smallest"], 10, 2 * HELD_OUT, seed=0)
    (out / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    examples = make_examples(["smallest"], 8000, seed=5, exclude={r["prompt"] for r in held_out})
    rng = random.Random(0)

    def demonstrated(example) -> str:
        first = example.instruction.split(": ", 1)[1].split()[0]
        return first if first != example.output and rng.random() < SHORTCUT else example.output

    demos = [{"instruction": e.instruction, "output": demonstrated(e)} for e in examples[:6000]]
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in demos))
    cfg = SFTConfig.from_dict({
        "output_dir": str(out / "sft"), "model": {"path": "tiny"},
        "data": {"train_files": [str(out / "sft.jsonl")], "eval_fraction": 0.02, "max_length": 64},
        "train": {"max_steps": 300, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
                  "progress_bar": False, "log_every": 100, "resume": "never"}})
    model = run_sft(cfg) / "final"
    # On-policy pairs: 4 samples (T = 1) per training prompt, each distinct wrong answer against the right one.
    prompts, samples = examples[6000:], 4
    (out / "prompts.jsonl").write_text("".join(json.dumps({"prompt": e.instruction}) + "\n"
                                               for e in prompts for _ in range(samples)))
    subprocess.run([sys.executable, "-m", "posttrain", "generate", "--model", str(model), "--prompts",
                    str(out / "prompts.jsonl"), "--output", str(out / "samples.jsonl"), "--temperature", "1.0",
                    "--max-new-tokens", "4", "--batch-size", "256", "--seed", "0"], check=True, capture_output=True)
    completions = [json.loads(line)["completion"].strip() for line in open(out / "samples.jsonl")]
    pairs = []
    for i, e in enumerate(prompts):
        wrong = dict.fromkeys(c for c in completions[i * samples:(i + 1) * samples] if c != e.output)
        pairs += [{"prompt": e.instruction, "chosen": e.output, "rejected": c or "?"} for c in wrong]
    (out / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return model, out / "pairs.jsonl", out / "eval.jsonl"


def test_dpo_with_nll_lifts_the_exact_match_of_a_model_that_learned_a_shortcut(shortcut_task, tmp_path):
    from posttrain.train.preference import run_dpo

    model, pairs, held_out = shortcut_task
    cfg = DPOConfig.load(None, [f"output_dir={tmp_path}", f"model.path={model}", f"data.train_files=[{pairs}]",
                                f"data.eval_files=[{held_out}]", "data.max_length=64", "train.max_steps=150",
                                "train.batch_size=16", "train.lr=1e-3", "train.progress_bar=false", "dpo.beta=0.1",
                                "dpo.nll_weight=1.0", f"eval.exact_match_prompts={2 * HELD_OUT}",
                                "eval.max_new_tokens=4"])
    summary = json.loads((run_dpo(cfg) / "summary.json").read_text())
    assert summary["eval_after"]["rewards/accuracy"] >= 0.9  # measured 0.95-0.955
    # Measured 55.75% -> 70.75% / 71.75% / 64.75% (train.seed 0 / 1 / 2, 2026-11-29, shortcut share 0.7 after the
    # synthetic held-out partition); DPO alone 58.5% / 60.75% (lr 3e-4 / 1e-3), the NLL on the chosen answers alone
    # 63.5% / 73.5%: the README reports all three (and the earlier data's figures).
    assert summary["exact_match_after"] >= summary["exact_match_before"] + 0.08
