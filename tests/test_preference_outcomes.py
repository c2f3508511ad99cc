"""Outcomes: a reward model and DPO measurably do their jobs on the tiny preset after SFT.

The SFT model answers "Smallest letter: …" right ~80% of the time. Preferences are
verifiable: chosen is the correct answer.
- Reward model: trained from the SFT model on synthetic pairs (rejected = a wrong letter),
  it must order held-out pairs it never saw.
- DPO (+ the RPO NLL term) on synthetic pairs: held-out implicit-reward accuracy must rise
  from 0.5 (π = π_ref) to ≥ 0.9, and greedy exact match must not fall. (Raising exact match
  over SFT is not achieved on this model; see the README's preference section.)
Thresholds sit under the measured figures (comments); the runs are deterministic on CPU.
"""

from __future__ import annotations

import json

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
    # A fresh random head on the SFT model's features already orders some pairs (measured 0.725).
    assert summary["eval_after"]["accuracy"] >= 0.9  # measured 0.97
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
    assert summary["eval_after"]["rewards/accuracy"] >= 0.9  # measured 0.95
    # Exact match barely moves on this tiny model: measured 79.0% → 80.5% on one machine and 80.0% → 79.5% on
    # another. Plain DPO without the NLL term gives 79% → 74%. This test holds the line against regression, and the
    # README says so.
    assert summary["exact_match_after"] >= summary["exact_match_before"] - 0.04
