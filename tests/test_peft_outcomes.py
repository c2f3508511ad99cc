"""Outcomes: every PEFT family measurably teaches a frozen base a new task.

The base is the tiny preset fully fine-tuned on two synthetic tasks (copy, smallest); it
has never seen "Largest letter: …" and scores ~0% on it. Each method then trains on the
largest-letter task alone, with the base frozen (freeze tuning: all but its top layer),
and must raise held-out exact match by the fixed margin below. Margins sit well under
the figures measured (comment per row), so they catch a method that stopped learning, not noise.
"""

from __future__ import annotations

import json

import pytest

from posttrain import SFTConfig, run_sft

pytestmark = pytest.mark.slow

STEPS = 200
# method, adapter section, lr, minimum gain in exact match (fraction of 100 prompts); measured gains on two
# machines in the comments (deterministic on one machine; another CPU's kernels shift the base a little).
CASES = [
    ("lora", {"method": "lora"}, 3e-3, 0.08),  # measured +17, +16
    ("ia3", {"method": "ia3"}, 3e-2, 0.08),  # measured +19, +14
    # Prompt tuning learns this task on some bases only: +11 on this one, +11 on train.seed 2's, but +0 on
    # train.seed 1's and +1 on a base trained with fused AdamW (16 or 32 virtual tokens alike; lr 3e-2 gave +7
    # on one machine, +0 on another). The margin guards this base; the README says how narrow it is.
    ("prompt", {"method": "prompt"}, 1e-1, 0.04),
    # Prefix tuning at lr 3e-2: +13 here; +4, +13 and +10 on the train.seed 1, seed 2 and fused-AdamW bases
    # (lr 1e-2 gave +9 / +10 here but 0 on the fused-AdamW base).
    ("prefix", {"method": "prefix"}, 3e-2, 0.04),
    ("bottleneck", {"method": "bottleneck"}, 3e-3, 0.08),  # measured +19, +17
    ("mixed", {"method": ["lora", "bottleneck", "prompt"], "schedule": ["0:prompt", "50:prompt+lora", "100:all"],
               "lora": {"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, "bottleneck": {"where": ["ffn"]}},
     3e-3, 0.08),  # measured +19, +17
    ("freeze", {"method": "freeze", "freeze": {"top_layers": 1}}, 3e-3, 0.08),  # measured +23, +17
]


def _data(tasks, size, eval_fraction):
    return {"train_files": ["synthetic"], "synthetic_tasks": tasks, "synthetic_size": size, "max_length": 64,
            "eval_fraction": eval_fraction}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("peft-base")
    cfg = SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"}, "data": _data(["copy", "smallest"], 8000, 0.02),
        "train": {"max_steps": 500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
                  "progress_bar": False, "log_every": 50}})
    return str(run_sft(cfg) / "final")


@pytest.mark.parametrize("name, adapter, lr, margin", CASES, ids=[c[0] for c in CASES])
def test_adapter_teaches_the_frozen_base_a_new_task(name, adapter, lr, margin, base, tmp_path):
    cfg = SFTConfig.from_dict({
        "output_dir": str(tmp_path), "model": {"path": base}, "adapter": adapter,
        "data": _data(["largest"], 4000, 0.05),
        "train": {"max_steps": STEPS, "batch_size": 32, "lr": lr, "warmup_steps": 10, "progress_bar": False,
                  "log_every": 50},
        "eval": {"exact_match_prompts": 100}})
    run_dir = run_sft(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    params = json.loads((run_dir / "params.json").read_text())
    if name != "freeze":  # freeze tuning trains the top layer of the base itself
        assert params["by_method"].get("base", {"trainable": 0})["trainable"] == 0  # the base stayed frozen
    before, after = summary["exact_match_before"], summary["exact_match_after"]
    print(f"{name}: exact match {before:.0%} -> {after:.0%} ({params['trainable']:,} trainable)")
    assert after - before >= margin
