"""fp16's GradScaler in the loop: its overflow search is not a failing run, and its scale survives a resume.

CPU has no fp16 training (the config refuses it), so these tests attach torch's CPU GradScaler to a
float32 accelerator, as accelerate attaches the CUDA one for fp16, and emulate fp16's range on the
toy model's gradients: a gradient entry over `LIMIT` becomes inf, as it would overflow fp16.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import Crash, ToyStage, _cfg, _crash_on_call, _params  # noqa: E402

from posttrain.errors import TrainingAborted  # noqa: E402
from posttrain.train.loop import train  # noqa: E402
from posttrain.train.runs import make_accelerator  # noqa: E402

LIMIT = 300.0  # the toy's scaled gradients fit under this from a scale of ~2^11: five overflows from 2^16


class Fp16RangeStage(ToyStage):
    """ToyStage whose first layer's output gradient overflows (inf) past LIMIT, like fp16's range."""

    def __init__(self, batch_size: int, always: bool = False):
        super().__init__(batch_size)
        layer = self.module.layers[0]
        forward = layer.forward

        def clipped_range(x):
            out = forward(x)
            if out.requires_grad:
                out.register_hook(lambda g: torch.where((g.abs() > LIMIT) | torch.tensor(always), torch.inf, g))
            return out

        layer.forward = clipped_range


def _fp16_run(stage, cfg, run_dir):
    accelerator = make_accelerator(_cfg(max_steps=cfg.max_steps, warmup_steps=0, optimizer="adamw_fused"), run_dir)
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
    return train(stage, cfg, run_dir, accelerator), accelerator.scaler


def _fp16_cfg(**overrides):
    return _cfg(**{"warmup_steps": 0, "mixed_precision": "fp16", "optimizer": "adamw_fused",
                   "max_consecutive_nonfinite": 3, **overrides})


def test_the_scalers_overflow_search_does_not_abort_the_run(tmp_path):
    """Before: every overflow counted toward max_consecutive_nonfinite (3 here), so a model whose
    gradients need a scale of ~2^11 aborted at its third step. Now the overflows are skipped,
    logged and counted, and the run trains once the scale fits."""
    result, scaler = _fp16_run(Fp16RangeStage(8), _fp16_cfg(max_steps=12), tmp_path)
    state = json.loads(next((tmp_path / "checkpoints").iterdir()).joinpath("loop_state.json").read_text())
    overflows = state["scaler_overflows"]
    assert 4 <= overflows < 12 and result.skipped_steps == overflows
    assert scaler.get_scale() == 2.0 ** (16 - overflows)  # halved once per overflow, no growth in 12 steps
    assert state["grad_scaler"]["scale"] == scaler.get_scale()
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert log[-1]["skipped_steps"] == overflows


def test_gradients_non_finite_at_every_scale_still_abort(tmp_path):
    """Once 16 halvings bring the scale to 1, an overflow is no longer the scaler's search: the
    consecutive count starts and the run stops after max_consecutive_nonfinite more."""
    with pytest.raises(TrainingAborted, match="3 non-finite steps in a row"):
        _fp16_run(Fp16RangeStage(8, always=True), _fp16_cfg(max_steps=40), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["step"] == 16 + 3


def test_resume_keeps_the_loss_scale(tmp_path):
    """Before: the scale was not in the checkpoint, so a resumed run restarted at 2^16 and overflowed
    its way down again, skipping updates the uninterrupted run made (different weights)."""
    cfg = _fp16_cfg(batch_size=4, max_steps=14, save_every=10, keep_last=3)
    full, full_scaler = _fp16_run(Fp16RangeStage(4), cfg, tmp_path / "full")
    crashing = Fp16RangeStage(4)
    crashing.module.forward = _crash_on_call(crashing.module.forward, 12)
    with pytest.raises(Crash):
        _fp16_run(crashing, cfg, tmp_path / "cut")
    cfg.resume = "auto"
    resumed, resumed_scaler = _fp16_run(Fp16RangeStage(4), cfg, tmp_path / "cut")
    assert resumed.skipped_steps == full.skipped_steps
    assert resumed_scaler.get_scale() == full_scaler.get_scale()
    for (name, a), b in zip(_params(full.module).items(), _params(resumed.module).values()):
        assert torch.equal(a, b), name
