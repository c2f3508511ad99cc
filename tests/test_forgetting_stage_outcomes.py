"""Outcome: a later alignment stage wipes out an earlier skill, and forgetting.lm_coef keeps it
while the stage still learns (train/forgetting.py, train/retain_terms.py in DPO).

The earlier skill is conftest's weak_sft_model: the tiny preset after 33 SFT steps on "Smallest
letter: q m t" → "m". DPO then trains it on "Largest letter: …" pairs (chosen = the largest
letter, rejected = a wrong one; 300 train pairs, 100 held out) for 30 steps of 16 at lr 1e-3.
The two prompts differ in one word, so pushing the largest letter up pushes the smallest one
down. The retain data are 300 smallest rows (60 held out and only measured, the pool of 240
feeds lm_coef's LM loss, 8 rows a step). Thresholds come with margin from measured runs
(benchmarks/forgetting/stages.py, part 3; benchmarks/results/forgetting_stages.md).
"""

from __future__ import annotations

import json

import pytest

from posttrain.config import DPOConfig
from posttrain.data.synthetic import make_rows
from posttrain.train.preference import run_dpo


@pytest.mark.slow
def test_lm_coef_keeps_the_earlier_skill_through_dpo_which_still_learns(weak_sft_model, tmp_path):
    retain = tmp_path / "smallest.jsonl"
    retain.write_text("".join(json.dumps(row) + "\n"
                              for row in make_rows(["smallest"], 300, seed=77, side="train", unique=True)))

    def dpo(name: str, *forgetting: str) -> dict:
        cfg = DPOConfig.load(None, [
            f"output_dir={tmp_path / name}", f"model.path={weak_sft_model}", "data.synthetic_tasks=[largest]",
            "data.synthetic_size=400", "data.eval_fraction=0.25", "data.max_length=32", "train.max_steps=30",
            "train.batch_size=16", "train.lr=1e-3", "dpo.beta=0.1", "train.seed=0", "train.resume=never",
            "train.progress_bar=false", "train.log_every=1000", f"forgetting.retain_files=[{retain}]",
            "forgetting.retain_batch_size=8", *forgetting])
        return json.loads((run_dpo(cfg) / "summary.json").read_text())

    plain, kept = dpo("none"), dpo("lm_coef", "forgetting.lm_coef=0.3")
    assert plain["retain_loss_before"] < 1.5  # the skill is there to lose: measured 0.96 (0.87-1.06 for seeds 0-2)
    # Without control DPO wipes it out: measured +17.4 nats per token (+17.4 to +17.8 for seeds 0-2).
    assert plain["retain_loss_increase"] > 5.0
    # lm_coef keeps it: measured -0.11 (-0.07 to -0.12 for seeds 0-2), i.e. the retain loss even falls.
    assert kept["retain_loss_increase"] < 0.3
    assert kept["retain_loss_increase"] < 0.05 * plain["retain_loss_increase"]
    for summary in (plain, kept):  # and DPO still learns its own task
        assert summary["eval_items"] == 100
        assert summary["eval_before"]["rewards/accuracy"] == pytest.approx(0.5)  # π = π_ref: every margin is 0
    assert plain["eval_after"]["rewards/accuracy"] >= 0.8  # measured 0.93 (0.93-0.97 for seeds 0-2)
    assert kept["eval_after"]["rewards/accuracy"] >= 0.8  # measured 0.88 (0.88-0.96 for seeds 0-2)
