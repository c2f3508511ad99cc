"""Stop 32, the training loop's backlog: what a run's summary says (posttrain version, wall time
summed over resumed segments, why it stopped), held-out files with nothing left refused up front
(dpo, rm), a full disk while writing final/ named by its path, a ratio warmup kept when a resumed
run is extended, and the held-out set collated once per run.
"""

from __future__ import annotations

import errno
import json
import types

import pytest

from posttrain import __version__
from posttrain.errors import NoRoom
from posttrain.train.runs import finish_run
from posttrain.train.optim import lr_factor
from tests.cli_runner import run_cli
from tests.test_loop import ToyStage, _cfg, _run


# --------------------------------------------------------------------------- why a run stopped, and how long it took


def test_a_finished_run_says_its_stop_reason_and_wall_time(tmp_path):
    by_steps = _run(ToyStage(8), _cfg(max_steps=4), tmp_path / "steps")
    by_epochs = _run(ToyStage(8), _cfg(max_steps=0, epochs=1.0), tmp_path / "epochs")
    assert (by_steps.stop_reason, by_epochs.stop_reason) == ("max_steps", "epochs")
    assert not by_steps.stopped_early and by_steps.wall_seconds > 0
    facts = by_steps.summary()
    assert facts["stop_reason"] == "max_steps" and facts["stopped_early"] is False and facts["steps"] == 4
    assert facts["wall_seconds"] == pytest.approx(by_steps.wall_seconds, abs=1e-3) and facts["stop_detail"] is None


def test_an_early_stop_and_a_monitor_stop_are_told_apart(tmp_path):
    patience = _run(ToyStage(8, n_eval=4, eval_shift=5.0),
                    _cfg(max_steps=200, eval_every=1, early_stopping_patience=2, warmup_steps=0, lr=0.5),
                    tmp_path / "patience")
    assert patience.stopped_early and patience.stop_reason == "patience"
    assert "no eval improvement" in patience.summary()["stop_detail"]

    from posttrain.train.forgetting import attach

    stage = ToyStage(8)
    control = types.SimpleNamespace(unfreezing=None, measures=True, anchored=False, regularizes=False,
                                    begin=lambda module, accelerator: {},
                                    monitor=lambda module, accelerator: ({"retain_loss": 1.0}, "the retain loss rose"),
                                    state_dict=lambda: ({}, {}), load_state_dict=lambda plain, tensors: None)
    attach(stage, control)
    forgot = _run(stage, _cfg(max_steps=8, eval_every=2), tmp_path / "forgetting")
    assert forgot.stopped_early and forgot.step == 2
    assert forgot.stop_reason == "forgetting" and forgot.summary()["stop_detail"] == "the retain loss rose"


def test_wall_seconds_sum_the_segments_of_a_resumed_run(tmp_path):
    import time

    first = _run(ToyStage(8), _cfg(max_steps=4, save_every=4), tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "checkpoints" / "step-0000004" / "loop_state.json").read_text())
    assert 0 < saved["wall_seconds"] <= first.wall_seconds
    started = time.perf_counter()
    second = _run(ToyStage(8), _cfg(max_steps=8, resume="auto"), tmp_path / "run")
    segment = time.perf_counter() - started
    assert saved["wall_seconds"] < second.wall_seconds <= saved["wall_seconds"] + segment


def test_summary_json_of_sft_dpo_and_rm_carries_version_wall_time_and_stop_reason(tmp_path, capsys):
    common = ["train.max_steps=1", "train.batch_size=4", "train.progress_bar=false", "data.max_length=48",
              "data.synthetic_size=24"]
    for command in ("sft", "dpo", "rm"):
        generation = ["eval.exact_match_prompts=0"] if command != "rm" else []
        rc, out = run_cli(capsys, command, f"output_dir={tmp_path / command}", *common, *generation)
        assert rc == 0, out
        summary = json.loads((tmp_path / command / "summary.json").read_text())
        assert summary["posttrain_version"] == __version__, command
        assert summary["stop_reason"] == "max_steps" and summary["stopped_early"] is False, command
        assert summary["wall_seconds"] > 0 and summary["steps"] == 1, command
        if command != "sft":  # the held-out loss beside the held-out metrics, before and after
            assert all(isinstance(summary[k], float) for k in ("eval_loss_before", "eval_loss")), command


# --------------------------------------------------------------------------- held-out files with nothing left


def _preference_files(tmp_path):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}) + "\n" for i in range(8)))
    long = "x " * 200  # past data.max_length=32: every held-out row is dropped
    held_out.write_text("".join(json.dumps({"prompt": long, "chosen": "a", "rejected": "b"}) + "\n" for _ in range(3)))
    return train, held_out


@pytest.mark.parametrize("command", ["dpo", "rm"])
def test_held_out_files_with_every_row_dropped_are_refused(tmp_path, capsys, command):
    train, held_out = _preference_files(tmp_path)
    rc, out = run_cli(capsys, command, f"output_dir={tmp_path / 'run'}", f"data.train_files=[{train}]",
                      f"data.eval_files=[{held_out}]", "data.max_length=32", "train.max_steps=1",
                      "train.batch_size=4", "train.progress_bar=false")
    assert rc == 2, out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert str(held_out) in error and "none of the 3 held-out" in error and "3 dropped" in error
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before any step


def test_sft_held_out_files_with_every_row_dropped_are_refused(tmp_path, capsys):
    train, held_out = tmp_path / "train.jsonl", tmp_path / "held_out.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(8)))
    held_out.write_text("".join(json.dumps({"prompt": "x " * 200, "completion": "a"}) + "\n" for _ in range(3)))
    rc, out = run_cli(capsys, "sft", f"output_dir={tmp_path / 'run'}", f"data.train_files=[{train}]",
                      f"data.eval_files=[{held_out}]", "data.max_length=32", "data.overlength=drop",
                      "train.max_steps=1", "train.batch_size=4", "train.progress_bar=false",
                      "eval.exact_match_prompts=0")
    assert rc == 2, out
    error = next(line for line in out.splitlines() if line.startswith("error:"))
    assert str(held_out) in error and "none of the 3 held-out" in error
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- a full disk while writing final/


def test_a_full_disk_while_writing_final_names_the_path(tmp_path, monkeypatch):
    import posttrain.models.loading as loading

    def full(model, tokenizer, directory):
        (directory / "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loading, "save_model", full)
    accelerator = types.SimpleNamespace(wait_for_everyone=lambda: None, end_training=lambda: None)
    with pytest.raises(NoRoom) as caught:
        finish_run(tmp_path, accelerator, True, None, None, {"steps": 1})
    assert str(tmp_path / "final") in str(caught.value) and "No space left" in str(caught.value)
    assert not (tmp_path / ".tmp-final").exists()  # the partial copy does not hold the space


# --------------------------------------------------------------------------- a ratio warmup on an extended run


def test_extending_a_run_keeps_the_warmup_it_started_with(tmp_path, capsys):
    cfg = _cfg(max_steps=8, warmup_steps=0, warmup_ratio=0.25, save_every=8, log_every=1)
    _run(ToyStage(8), cfg, tmp_path / "run")  # warmup: 0.25 × 8 = 2 steps
    _run(ToyStage(8), _cfg(max_steps=16, warmup_steps=0, warmup_ratio=0.25, resume="auto", log_every=1),
         tmp_path / "run")
    assert "would be 4 warmup steps; the run keeps the 2 it started with" in capsys.readouterr().out
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    for step in range(9, 17):  # logged after optimizer step `step - 1` (0-based)
        assert lrs[step] == pytest.approx(cfg.lr * lr_factor(step - 1, 16, "cosine", 2, 0.0)), step


# --------------------------------------------------------------------------- the held-out set collated once


def test_the_held_out_set_is_collated_once_per_run(tmp_path):
    stage = ToyStage(8, n_eval=4)
    calls = []
    collate = stage.eval_micro_batches
    stage.eval_micro_batches = lambda: calls.append(1) or collate()
    result = _run(stage, _cfg(max_steps=8, eval_every=2, early_stopping_patience=10), tmp_path / "run")
    assert result.eval_loss is not None
    assert len(calls) == 1  # four evaluations and the patience check, one collation
