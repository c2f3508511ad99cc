"""Edges of catastrophic-forgetting control (train/forgetting.py, losses/regularization.py, the
loop's begin / regularize / monitor hooks): adapters, staged unfreezing, packing and
group_by_length with replay, bf16 autocast and bf16 weights, a GradScaler's loss scale, frozen
parameters, resume (LoRA, a finished run), the stop with eval_every=0, odd retain files, the
Fisher's normalisation and its zero case, replay near ratio 1, the step-0 line of metrics.jsonl
and its readers, the pipeline command, and two processes.

Every run is the tiny preset for a few steps. Expected figures come from a second run, from
values snapshotted at the start, or from a formula written out here, never from the helpers
under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import SFTConfig
from posttrain.errors import ConfigError
from posttrain.train import forgetting as fg
from posttrain.train.sft import run_sft
from tests.test_forgetting import _Acc

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def _rows(n, task="copy", seed=5):
    from posttrain.data.synthetic import make_rows

    return make_rows([task], n, seed=seed, side="train", unique=True)


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _cfg(tmp_path, name="run", *, retain=None, train=None, data=None, adapter=None, model=None,
         **forgetting) -> SFTConfig:
    retain = retain or _write(tmp_path / "retain.jsonl", _rows(24))
    return SFTConfig.from_dict({
        "output_dir": str(tmp_path / name),
        "model": {"path": "tiny"} | (model or {}),
        "adapter": adapter or {},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["reverse"], "synthetic_size": 16,
                 "max_length": 64, "eval_fraction": 0.0} | (data or {}),
        "train": {"max_steps": 2, "batch_size": 4, "lr": 3e-3, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0} | (train or {}),
        "forgetting": {"retain_files": [str(retain)]} | forgetting,
    })


def _lines(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def _summary(run_dir):
    return json.loads((Path(run_dir) / "summary.json").read_text())


def _final(run_dir, file="model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(run_dir) / "final" / file))


def _stage_state(run_dir):
    """(plain, tensors) of the run's last checkpoint's forgetting state."""
    from posttrain.train.checkpoint import load_stage_state

    last = max((Path(run_dir) / "checkpoints").glob("*/stage_state.json")).parent
    return load_stage_state(last)


@pytest.fixture
def controls(monkeypatch):
    """Every ForgettingControl whose begin() runs, with the trained parameters' names and values
    as the run started (snapshotted before begin)."""
    seen = []
    original = fg.ForgettingControl.begin

    def spy(self, module, accelerator):
        named = list(accelerator.unwrap_model(module).named_parameters())
        seen.append({"control": self, "names": {id(p): n for n, p in named},
                     "start": {n: p.detach().clone() for n, p in named},
                     "trained": {n for n, p in named if p.requires_grad}})
        return original(self, module, accelerator)

    monkeypatch.setattr(fg.ForgettingControl, "begin", spy)
    return seen


def _anchored_names(seen: dict) -> list[str]:
    return [seen["names"][id(p)] for p in seen["control"].params]


# --------------------------------------------------------------------------- metrics.jsonl's step-0 line


def test_a_fresh_rerun_in_the_same_directory_logs_one_step_zero_line(tmp_path):
    first = _cfg(tmp_path, l2sp=0.1)
    run_sft(first)
    again = _cfg(tmp_path, l2sp=0.1, train={"lr": 1e-2})  # a fresh start (resume=never) of another run
    run_dir = run_sft(again)
    zero = [line for line in _lines(run_dir) if line["step"] == 0]
    assert len(zero) == 1, zero


def test_the_step_zero_line_survives_a_resume_once_and_readers_skip_it(tmp_path):
    """A resume truncates metrics.jsonl to the checkpoint's step: the step-0 line stays, once;
    the progress bar (on here) and the benchmarks' record reader are not confused by a line
    with a step and no loss."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import posttrain_step_records

    cut = _cfg(tmp_path, "cut", l2sp=0.1, train={"progress_bar": True, "save_every": 2, "eval_every": 1})
    run_sft(cut)
    resumed = _cfg(tmp_path, "cut", l2sp=0.1, train={"progress_bar": True, "save_every": 2, "eval_every": 1,
                                                     "max_steps": 4, "resume": "auto"})
    run_dir = run_sft(resumed)
    lines = _lines(run_dir)
    assert [line["step"] for line in lines if "retain_loss" in line] == [0, 1, 2, 3, 4]
    assert [r["step"] for r in posttrain_step_records(run_dir)] == [1, 2, 3, 4]
    assert lines[0] == {"step": 0, "retain_loss": _summary(run_dir)["retain_loss_before"]}


# --------------------------------------------------------------------------- adapters


def test_lora_anchors_only_the_adapter_at_its_initial_values_and_the_adapter_saves(tmp_path, controls):
    run_dir = run_sft(_cfg(tmp_path, adapter={"method": ["lora"]}, l2sp=1.0, ewc=1.0, fisher_examples=4,
                           train={"max_steps": 3, "lr": 3e-2}))
    (seen,) = controls
    names = _anchored_names(seen)
    assert names and all("lora_" in n for n in names)
    assert set(names) == seen["trained"]  # every trained tensor, and nothing of the frozen base
    for name, anchor in zip(names, seen["control"].anchors):
        assert torch.equal(anchor, seen["start"][name]), name  # θ₀ = the adapter as initialised
    assert all(not seen["start"][n].any() for n in names if "lora_B" in n)  # LoRA starts with B = 0
    plain, _ = _stage_state(run_dir)
    assert plain["anchors"] == plain["fisher"] == len(names)
    adapter = _final(run_dir, "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # trained, and saved
    penalties = [line["l2sp_penalty"] for line in _lines(run_dir) if "loss" in line]
    assert penalties[0] == 0.0 and penalties[-1] > 0


def test_a_resumed_lora_run_with_ewc_equals_an_uninterrupted_one(tmp_path):
    common = {"adapter": {"method": ["lora"]}, "l2sp": 0.5, "ewc": 2.0, "fisher_examples": 4}
    straight = run_sft(_cfg(tmp_path, "straight", train={"max_steps": 4, "save_every": 2, "lr": 3e-2}, **common))
    run_sft(_cfg(tmp_path, "cut", train={"max_steps": 2, "lr": 3e-2}, **common))
    resumed = run_sft(_cfg(tmp_path, "cut", train={"max_steps": 4, "lr": 3e-2, "resume": "auto"}, **common))
    a, b = _final(straight, "adapter_model.safetensors"), _final(resumed, "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    pen = lambda d: [(x["l2sp_penalty"], x["ewc_penalty"]) for x in _lines(d) if "loss" in x]
    assert pen(resumed) == pen(straight) and pen(straight)[-1][1] > 0
    assert _summary(resumed)["retain_loss_before"] == _summary(straight)["retain_loss_before"]


def test_staged_unfreezing_leaves_inactive_adapters_alone_under_the_penalties(tmp_path, controls):
    """Until step 100 only the prompt is trained: LoRA's gradients are dropped, so regularize must
    leave them without one (not even a zero one, which AdamW's weight decay would act on), and
    LoRA stays exactly at its initial values: B = 0 and A as drawn."""
    run_dir = run_sft(_cfg(tmp_path, adapter={"method": ["lora", "prompt"], "schedule": ["0:prompt", "100:all"]},
                           l2sp=5.0, ewc=5.0, fisher_examples=4,
                           train={"max_steps": 3, "lr": 3e-2, "weight_decay": 0.1}))
    (seen,) = controls
    now = dict(zip(_anchored_names(seen), seen["control"].params))  # the live parameters, after training
    lora = [n for n in now if "lora_" in n]
    assert lora and all(torch.equal(now[n], seen["start"][n]) for n in lora)
    assert any(not torch.equal(now[n], seen["start"][n]) for n in now if "lora_" not in n)  # the prompt trained
    b = [v for k, v in _final(run_dir, "lora/adapter_model.safetensors").items() if "lora_B" in k]
    assert b and all(not v.any() for v in b)
    assert [x for x in _lines(run_dir) if "loss" in x][-1]["l2sp_penalty"] > 0  # the prompt moved, and is pulled


# --------------------------------------------------------------------------- data layouts with replay


def test_packing_with_replay_packs_the_replayed_examples_and_measures_as_unpacked(tmp_path, capsys):
    packed = run_sft(_cfg(tmp_path, "packed", data={"packing": True}, replay_ratio=0.5, l2sp=0.1))
    out = capsys.readouterr().out
    assert "replay: 16 retain examples mixed into 16 training examples" in out
    assert "packing: 32 examples into" in out  # the 16 replayed are packed with the 16 new ones
    plain = run_sft(_cfg(tmp_path, "plain", replay_ratio=0.5, l2sp=0.1))
    # the held-out retain loss at step 0 is the same model on the same rows, packed collation or not
    assert _lines(packed)[0]["retain_loss"] == pytest.approx(_lines(plain)[0]["retain_loss"], rel=1e-5)
    grouped = run_sft(_cfg(tmp_path, "grouped", data={"group_by_length": True}, replay_ratio=0.5, ewc=1.0,
                           fisher_examples=2))
    assert _summary(grouped)["steps"] == 2


def test_streamed_training_data_with_penalties_resumes_bitwise(tmp_path):
    """data.streaming (no replay there) with L2-SP, EWC and the stop: a run cut at step 2 and
    resumed ends on the weights and penalties of an uninterrupted one."""
    train = _write(tmp_path / "train.jsonl", _rows(16, "reverse", seed=9))
    common = {"data": {"streaming": True, "train_files": [str(train)]}, "l2sp": 0.5, "ewc": 2.0, "fisher_examples": 4,
              "max_retain_increase": 5.0}
    straight = run_sft(_cfg(tmp_path, "straight", train={"max_steps": 4, "eval_every": 2}, **common))
    run_sft(_cfg(tmp_path, "cut", train={"max_steps": 2, "eval_every": 2}, **common))
    resumed = run_sft(_cfg(tmp_path, "cut", train={"max_steps": 4, "eval_every": 2, "resume": "auto"}, **common))
    a, b = _final(straight), _final(resumed)
    assert all(torch.equal(a[name], b[name]) for name in a)
    pen = lambda d: [x["ewc_penalty"] for x in _lines(d) if "loss" in x]
    assert pen(resumed) == pen(straight) and pen(straight)[-1] > 0
    retain = lambda d: [(x["step"], x["retain_loss"]) for x in _lines(d) if "retain_loss" in x]
    assert retain(resumed) == retain(straight) and [s for s, _ in retain(straight)] == [0, 2, 4]


# --------------------------------------------------------------------------- precision


def test_bf16_autocast_with_penalties_runs_and_measures_close_to_float32(tmp_path):
    fp32 = run_sft(_cfg(tmp_path, "fp32", l2sp=1.0, ewc=1.0, fisher_examples=4, train={"max_steps": 3}))
    bf16 = run_sft(_cfg(tmp_path, "bf16", l2sp=1.0, ewc=1.0, fisher_examples=4,
                        train={"max_steps": 3, "mixed_precision": "bf16"}))
    a, b = _lines(fp32)[0]["retain_loss"], _lines(bf16)[0]["retain_loss"]
    assert b == pytest.approx(a, abs=2e-3) and b != a  # bf16 really in play, and close
    last = [x for x in _lines(bf16) if "loss" in x][-1]
    assert 0 < last["l2sp_penalty"] < float("inf") and 0 < last["ewc_penalty"] < float("inf")


def test_the_fisher_is_computed_without_autocast_under_bf16(tmp_path, monkeypatch):
    from posttrain.train import sft

    seen = []
    forward = sft.CausalLMLoss.forward

    def spy(self, *args, **kwargs):
        if not self.training and torch.is_grad_enabled():  # eval mode with gradients: the Fisher's forwards
            seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(sft.CausalLMLoss, "forward", spy)
    run_sft(_cfg(tmp_path, ewc=1.0, fisher_examples=3, train={"max_steps": 1, "mixed_precision": "bf16"}))
    assert len(seen) == 3
    assert not any(seen)


def test_bf16_weights_keep_bf16_anchors_and_a_fisher_of_mean_one(tmp_path, controls):
    run_dir = run_sft(_cfg(tmp_path, model={"dtype": "bfloat16"}, l2sp=1.0, ewc=1.0, fisher_examples=4,
                           train={"max_steps": 3, "lr": 1e-2}))
    control = controls[0]["control"]
    assert {a.dtype for a in control.anchors} == {f.dtype for f in control.fisher} == {torch.bfloat16}
    total = sum(float(f.double().sum()) for f in control.fisher) / sum(f.numel() for f in control.fisher)
    assert total == pytest.approx(1.0, rel=1e-2)  # bf16 rounding of each element
    last = [x for x in _lines(run_dir) if "loss" in x][-1]
    assert 0 < last["l2sp_penalty"] < float("inf") and 0 < last["ewc_penalty"] < float("inf")
    assert _final(run_dir)["model.norm.weight"].dtype == torch.bfloat16


def test_the_penalty_carries_the_loss_scale_so_a_grad_scaler_changes_no_update(tmp_path, monkeypatch):
    """fp16's GradScaler (CPU has no fp16: torch's CPU scaler attached to a float32 accelerator,
    as tests/test_fp16_scaler.py does): the data gradient arrives ×scale, so the penalty's must
    too, and the unscaled update is the one without a scaler. Scaling by 2^12 is exact, so the
    weights are bitwise those of the run without a scaler."""
    from posttrain.train import runs

    settings = {"l2sp": 20.0, "ewc": 20.0, "fisher_examples": 4,
                "train": {"max_steps": 3, "lr": 1e-2, "max_grad_norm": 0.0}}
    reference = _final(run_sft(_cfg(tmp_path, "plain", **settings)))
    make = runs.make_accelerator
    scales = []

    def with_scaler(cfg, run_dir):
        accelerator = make(cfg, run_dir)
        # native_amp stays False: accelerate would otherwise autocast the CPU forwards to bf16
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        return accelerator

    regularize = fg.ForgettingControl.regularize
    monkeypatch.setattr(runs, "make_accelerator", with_scaler)
    monkeypatch.setattr(fg.ForgettingControl, "regularize",
                        lambda self, module, grad_scale, *rest: scales.append(grad_scale)
                        or regularize(self, module, grad_scale, *rest))
    scaled = _final(run_sft(_cfg(tmp_path, "scaled", **settings)))
    assert scales == [2.0**12] * 3
    for name in reference:
        assert torch.equal(scaled[name], reference[name]), name


# --------------------------------------------------------------------------- frozen parameters


def test_frozen_parameters_are_not_anchored_and_do_not_move(tmp_path, controls):
    freeze = ["model.embed_tokens.*", "model.layers.0.*"]
    run_dir = run_sft(_cfg(tmp_path, l2sp=1.0, ewc=1.0, fisher_examples=4, train={"freeze": freeze, "lr": 1e-2}))
    (seen,) = controls
    names = _anchored_names(seen)
    assert set(names) == seen["trained"]
    assert not any("embed_tokens" in n or ".layers.0." in n for n in names)
    assert any(".layers.1." in n for n in names)
    assert len(seen["control"].fisher) == len(names)
    final = _final(run_dir)
    start = {n.removeprefix("model."): v for n, v in seen["start"].items()}  # CausalLMLoss wraps the model
    assert torch.equal(final["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    assert torch.equal(final["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(final["model.layers.1.mlp.up_proj.weight"], start["model.layers.1.mlp.up_proj.weight"])


# --------------------------------------------------------------------------- the stop


def test_max_retain_increase_without_evaluations_during_training_is_refused(tmp_path):
    """eval_every=0 measures the retain loss only after the last step, where there is nothing left
    to stop: refused up front, as train.early_stopping_patience is."""
    from posttrain.config import validate_sft

    with pytest.raises(ConfigError, match="set train.eval_every too"):
        validate_sft(_cfg(tmp_path, max_retain_increase=0.01, train={"max_steps": 3, "eval_every": 0}))


def test_a_stopped_run_rerun_trains_no_further_and_keeps_its_figures(tmp_path, capsys):
    cfg = lambda: _cfg(tmp_path, max_retain_increase=0.05, l2sp=0.01,
                       train={"max_steps": 20, "lr": 0.3, "eval_every": 2, "resume": "auto"})
    first = _summary(run_sft(cfg()))
    assert first["stopped_early"] and first["steps"] == 2
    capsys.readouterr()
    again = _summary(run_sft(cfg()))
    assert again["steps"] == 2 and again["stopped_early"]
    assert again["retain_loss_before"] == first["retain_loss_before"]
    assert again["retain_loss_after"] == pytest.approx(first["retain_loss_after"], rel=1e-6)
    out = capsys.readouterr().out
    assert "forgetting.max_retain_increase" in out  # the rerun still says why it stopped


# --------------------------------------------------------------------------- the retain file


def _alpaca_to_messages(row, answer=None):
    return {"messages": [{"role": "user", "content": row["instruction"]},
                         {"role": "assistant", "content": row["output"] if answer is None else answer}]}


@pytest.mark.parametrize("case", ["all-overlength-dropped", "all-truncated-past-the-answer", "empty-answers",
                                  "one-row-after-skipping"])
def test_retain_files_with_nothing_usable_are_refused_before_training(tmp_path, case):
    rows = _rows(10)
    long = [{"instruction": r["instruction"] + " a" * 100, "output": r["output"]} for r in rows]
    data = {}
    if case == "all-overlength-dropped":
        lines, data, match = long, {"overlength": "drop"}, "no retain example .* left in the pool"
    elif case == "all-truncated-past-the-answer":
        lines, match = long, "no retain example .* left in the pool"
    elif case == "empty-answers":
        lines, match = [_alpaca_to_messages(r, "") for r in rows], "malformed"
    else:  # nine bad rows skipped: one row left
        lines, data, match = [rows[0]] + ['{"instruction": 1}'] * 9, {"bad_rows": "skip", "max_bad_fraction": 1.0}, \
            "1 row\\(s\\); at least 2"
    cfg = _cfg(tmp_path, retain=_write(tmp_path / "retain.jsonl", lines), data=data, replay_ratio=0.5)
    with pytest.raises(Exception, match=match):
        run_sft(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_messages_rows_two_rows_and_a_near_total_held_out_share(tmp_path, controls, capsys):
    """Retain rows in messages format beside alpaca training rows; a file of 2 rows (1 pool,
    1 held out); retain_eval_fraction 0.95 of 10 rows (9 held out, a pool of 1 replayed 99%)."""
    messages = _write(tmp_path / "messages.jsonl", [_alpaca_to_messages(r) for r in _rows(10)])
    run_sft(_cfg(tmp_path, "messages", retain=messages, replay_ratio=0.25, ewc=1.0, fisher_examples=2))
    two = _write(tmp_path / "two.jsonl", _rows(2))
    run_sft(_cfg(tmp_path, "two", retain=two, replay_ratio=0.5, ewc=1.0))
    near = _write(tmp_path / "ten.jsonl", _rows(10))
    run_sft(_cfg(tmp_path, "near", retain=near, retain_eval_fraction=0.95, replay_ratio=0.99, ewc=1.0))
    sizes = [(len(c["control"].retain.pool), len(c["control"].retain.held_out)) for c in controls]
    assert sizes == [(8, 2), (1, 1), (1, 9)]
    out = capsys.readouterr().out
    assert "replay: 1584 retain examples mixed into 16 training examples (99.0% of the mix); the pool holds 1" in out
    # a pool of one: its Fisher is that example's squared gradient, still mean 1
    fisher = controls[2]["control"].fisher
    assert sum(float(f.double().sum()) for f in fisher) / sum(f.numel() for f in fisher) == pytest.approx(1.0, rel=1e-5)


def test_retain_exact_match_on_text_rows_is_refused(tmp_path):
    as_text = lambda rows: [{"text": r["instruction"] + " " + r["output"]} for r in rows]
    train = _write(tmp_path / "train.jsonl", as_text(_rows(16, "reverse", seed=9)))
    retain = _write(tmp_path / "retain.jsonl", as_text(_rows(10)))
    cfg = _cfg(tmp_path, retain=retain, data={"train_files": [str(train)]}, retain_exact_match=3)
    with pytest.raises(ConfigError, match="retain_exact_match scores answers"):
        run_sft(cfg)


# --------------------------------------------------------------------------- the Fisher


def test_fisher_examples_beyond_the_pool_use_the_whole_pool_and_the_saved_fisher_has_mean_one(tmp_path, monkeypatch):
    used = []
    original = fg.fisher_diagonal

    def spy(model, examples, params, pad_id, accelerator):
        used.append(len(examples))
        return original(model, examples, params, pad_id, accelerator)

    monkeypatch.setattr(fg, "fisher_diagonal", spy)
    run_dir = run_sft(_cfg(tmp_path, ewc=1.0, fisher_examples=1000))
    assert used == [19]  # 24 rows, 5 held out
    plain, tensors = _stage_state(run_dir)
    fisher = [tensors[f"fisher.{i}"] for i in range(plain["fisher"])]
    assert plain["fisher"] == plain["anchors"] > 0
    assert all(bool((f >= 0).all()) for f in fisher)
    mean = sum(float(f.double().sum()) for f in fisher) / sum(f.numel() for f in fisher)
    assert mean == pytest.approx(1.0, rel=1e-6)


def test_a_fisher_of_zero_gradients_is_refused():
    from posttrain.data.records import IGNORE_INDEX, Example

    class Flat(torch.nn.Module):  # a summed loss that does not depend on its weight
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(3))

        def forward(self, input_ids, labels, attention_mask=None):
            return (self.w * 0.0).sum() + (labels != IGNORE_INDEX).sum().float()

    module = Flat()
    examples = [Example([1, 2, 3], [IGNORE_INDEX, 2, 3]), Example([4, 5], [IGNORE_INDEX, 5])]
    with pytest.raises(ConfigError, match="the Fisher is zero"):
        fg.fisher_diagonal(module, examples, [module.w], pad_id=0, accelerator=_Acc())


# --------------------------------------------------------------------------- replay's arithmetic


@pytest.mark.parametrize("n, ratio", [(16, 0.99), (7, 0.3), (1, 0.5), (100, 0.01), (3, 0.9)])
def test_replay_makes_the_ratio_the_share_of_the_mix(n, ratio):
    said = []
    mixed = fg.mix_replay(list(range(n)), ["only"], ratio, seed=0, log=said.append)
    m = len(mixed) - n
    assert mixed[:n] == list(range(n)) and mixed[n:] == ["only"] * m
    assert abs(m / (n + m) - ratio) <= 0.5 / (n + m) * (1 + ratio) + 1e-12  # as near as a whole count gets
    assert f"({m / (n + m):.1%} of the mix)" in said[0]


# --------------------------------------------------------------------------- the pipeline command


def test_a_pipeline_sft_stage_with_a_forgetting_section(tmp_path, capsys):
    from posttrain.pipeline import load_pipeline, plan, read_state, run_pipeline

    retain = _write(tmp_path / "retain.jsonl", _rows(12))
    config = tmp_path / "sft.yaml"
    config.write_text(json.dumps({
        "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["reverse"], "synthetic_size": 16, "max_length": 64,
                 "eval_fraction": 0.0},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 3e-3, "progress_bar": False},
        "forgetting": {"retain_files": [str(retain)], "replay_ratio": 0.2, "ewc": 1.0, "fisher_examples": 2}}))
    pipeline = tmp_path / "pipe.yaml"
    pipeline.write_text(json.dumps({"output_dir": str(tmp_path / "pipe"),
                                    "stages": [{"name": "keep", "kind": "sft", "config": "sft.yaml"}]}))
    out = run_pipeline(pipeline)
    summary = _summary(out / "keep")
    assert summary["steps"] == 2 and summary["retain_loss_before"] > 0
    assert _lines(out / "keep")[0]["step"] == 0
    state = read_state(out)
    _, stages = load_pipeline(pipeline)
    assert plan(stages, state) == [("skip", "complete, config and inputs unchanged")]
    _, changed = load_pipeline(pipeline, ["keep.forgetting.ewc=2.0"])
    action, reason = plan(changed, state)[0]
    assert action == "fresh" and "forgetting.ewc" in reason


# --------------------------------------------------------------------------- two processes


def test_two_processes_estimate_the_same_fisher_and_penalties_as_one(tmp_path):
    """torchrun with 2 CPU processes (gloo): the processes split the Fisher's examples and sum;
    the result, and the penalties logged, are one process's at the same global batch."""
    retain = _write(tmp_path / "retain.jsonl", _rows(16))
    args = ["sft", "model.path=tiny", "data.synthetic_size=16", "data.synthetic_tasks=[reverse]", "data.max_length=64",
            "data.eval_fraction=0", "train.max_steps=2", "train.batch_size=4", "train.lr=3e-3", "train.schedule=constant",
            "train.progress_bar=false", "train.resume=never", f"forgetting.retain_files=[{retain}]",
            "forgetting.ewc=1.0", "forgetting.l2sp=0.5", "forgetting.fisher_examples=5"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "posttrain", *args, f"output_dir={tmp_path / 'one'}",
                          "train.grad_accum=2"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "posttrain",
                          *args, f"output_dir={tmp_path / 'two'}", "train.grad_accum=1"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    (p1, t1), (p2, t2) = _stage_state(tmp_path / "one"), _stage_state(tmp_path / "two")
    assert p1 == p2
    for i in range(p1["fisher"]):
        torch.testing.assert_close(t2[f"fisher.{i}"], t1[f"fisher.{i}"], rtol=1e-4, atol=1e-6)
    pen = lambda d: [x[k] for x in _lines(d) if "loss" in x for k in ("l2sp_penalty", "ewc_penalty")]
    assert pen(tmp_path / "two") == pytest.approx(pen(tmp_path / "one"), rel=1e-3) and pen(tmp_path / "one")[-1] > 0
    assert _lines(tmp_path / "two")[0]["retain_loss"] == pytest.approx(_lines(tmp_path / "one")[0]["retain_loss"],
                                                                       rel=1e-5)


def test_two_processes_take_the_retain_terms_of_one(tmp_path):
    """lm_coef, distill and project with 2 CPU processes (gloo): each takes its share of a step's
    retain batch and the retain gradients are summed across them, so the figures logged and the
    final weights are one process's at the same global batch."""
    from safetensors.torch import load_file

    retain = _write(tmp_path / "retain.jsonl", _rows(16))
    args = ["sft", "model.path=tiny", "data.synthetic_size=16", "data.synthetic_tasks=[reverse]", "data.max_length=64",
            "data.eval_fraction=0", "train.max_steps=3", "train.batch_size=4", "train.lr=3e-3", "train.schedule=constant",
            "train.progress_bar=false", "train.resume=never", f"forgetting.retain_files=[{retain}]",
            "forgetting.lm_coef=0.5", "forgetting.distill=1.0", "forgetting.distill_top_k=8", "forgetting.project=true",
            "forgetting.retain_batch_size=5"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "posttrain", *args, f"output_dir={tmp_path / 'one'}",
                          "train.grad_accum=2"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                          "posttrain", *args, f"output_dir={tmp_path / 'two'}", "train.grad_accum=1"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert two.returncode == 0, two.stderr[-3000:]
    figures = lambda d: [x[k] for x in _lines(d) if "loss" in x for k in ("retain_lm_loss", "distill_kl")]  # noqa: E731
    assert figures(tmp_path / "two") == pytest.approx(figures(tmp_path / "one"), rel=1e-3, abs=1e-6)
    assert figures(tmp_path / "one")[-1] > 0  # distillation has something to hold by the last step
    w1, w2 = (load_file(str(tmp_path / d / "final" / "model.safetensors")) for d in ("one", "two"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-4, atol=1e-5)
