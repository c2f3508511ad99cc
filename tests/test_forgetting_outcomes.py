"""Outcome: fine-tuning the tiny preset on a new task wipes out an old one, and forgetting control
keeps it (train/forgetting.py).

The old skill is "copy the letters", the new one "reverse them": the two prompts differ in one
word, so learning reverse overwrites copy. Phase A teaches copy (400 steps of 64); each phase-B run
then trains on reverse for 300 steps at lr 2e-3 from that model, with the copy rows as retain data
(200 of the 1,000 held out and scored by greedy exact match; none of them is replayed or in the
Fisher). Thresholds are set with margin from measured runs (README, *Catastrophic forgetting*).
"""

from __future__ import annotations

import json

import pytest

from posttrain.config import SFTConfig
from posttrain.train.sft import run_sft

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def copy_model(tmp_path_factory):
    """(the model that copies, the retain file of copy rows)."""
    from posttrain.data.synthetic import make_rows

    root = tmp_path_factory.mktemp("forgetting")
    retain = root / "copy.jsonl"
    rows = make_rows(["copy"], 1000, seed=77, side="train", unique=True)
    retain.write_text("".join(json.dumps(row) + "\n" for row in rows))
    cfg = SFTConfig.load(None, [
        f"output_dir={root / 'phase_a'}", "model.path=tiny", "data.train_files=[synthetic]", "data.synthetic_tasks=[copy]",
        "data.synthetic_size=25800", f"data.eval_fraction={200 / 25800}", "data.max_length=64", "train.max_steps=400",
        "train.batch_size=64", "train.lr=3e-3", "train.schedule=cosine", "train.warmup_steps=30",
        "train.weight_decay=0.01", "train.seed=0", "train.resume=never", "train.progress_bar=false", "train.log_every=50"])
    return run_sft(cfg) / "final", retain


def _phase_b(copy_model, tmp_path, *forgetting: str) -> dict:
    model, retain = copy_model
    cfg = SFTConfig.load(None, [
        f"output_dir={tmp_path / 'phase_b'}", f"model.path={model}", "data.train_files=[synthetic]",
        "data.synthetic_tasks=[reverse]", "data.synthetic_size=9800", "data.eval_fraction=0.02", "data.max_length=64",
        "train.max_steps=300", "train.batch_size=32", "train.lr=2e-3", "train.schedule=constant",
        "train.weight_decay=0.01", "train.seed=0", "train.resume=never", "train.progress_bar=false",
        "train.log_every=50", "eval.exact_match_prompts=100", "eval.max_new_tokens=16",
        f"forgetting.retain_files=[{retain}]", "forgetting.retain_exact_match=100", *forgetting])
    summary = json.loads((run_sft(cfg) / "summary.json").read_text())
    print({k: summary[k] for k in ("retain_exact_match_before", "retain_exact_match_after", "retain_loss_before",
                                   "retain_loss_after")}, "reverse", summary["exact_match_after_by_task"]["reverse"])
    return summary


@pytest.fixture(scope="module")
def baseline(copy_model, tmp_path_factory):
    return _phase_b(copy_model, tmp_path_factory.mktemp("none"))


def test_without_control_the_new_task_wipes_out_the_old_one(baseline):
    assert baseline["retain_exact_match_before"] >= 0.9  # phase A taught copy
    assert baseline["retain_exact_match_after"] <= 0.1  # measured 0.00 (0.01 on an earlier machine)
    assert baseline["exact_match_after_by_task"]["reverse"] >= 0.5  # measured 0.94
    assert baseline["retain_loss_increase"] > 3.0  # measured 7.2 nats per token


def test_replay_keeps_the_old_task_and_learns_the_new_one(copy_model, baseline, tmp_path):
    summary = _phase_b(copy_model, tmp_path, "forgetting.replay_ratio=0.2")
    assert summary["retain_exact_match_after"] >= 0.8  # measured 0.99 (0.92 on an earlier machine)
    # measured 0.99 (one torch thread, AVX-512), 0.38 / 0.17 with 2 / 1 threads on an earlier machine,
    # 0.93 with other replayed rows: reverse is learned in a sudden jump, so its figure swings with the
    # rounding of the kernels and the data order; the penalties below leave it at 0
    assert summary["exact_match_after_by_task"]["reverse"] >= 0.1
    assert summary["retain_loss_increase"] < 0.1 * baseline["retain_loss_increase"]


@pytest.mark.parametrize("penalty", ["forgetting.l2sp=100", "forgetting.ewc=3000"])
def test_a_strong_penalty_keeps_the_old_task(copy_model, baseline, tmp_path, penalty):
    """At these strengths L2-SP and EWC keep copy, and in 300 steps reverse is not learned: the two
    tasks need the same weights (README: stability bought with plasticity here). A weaker L2-SP (30)
    sits where the outcome turns on the kernels' rounding: 0.93 of copy kept on one machine, 0.38 on
    another; EWC 300, its Fisher drawn from the whole pool (stop 33), kept 0.91 (0.31 when the
    Fisher came from the head of the retain file), 0.88 with each row's summed loss (stop 34)."""
    summary = _phase_b(copy_model, tmp_path, penalty)
    assert summary["retain_exact_match_after"] >= 0.7  # measured 1.00 (l2sp) and 0.87 (ewc; 0.92 before stop 34)
    assert summary["retain_loss_increase"] < 0.1 * baseline["retain_loss_increase"]
