"""Stop 35, preemption: a signal in a run's last step (or in the evaluation that ends it, or stops
it early) stops the run as at any other step, and the same command finishes it; `posttrain
quality` removes the `.partial` outputs a stopped run left, which a later run might never write."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from posttrain.errors import Stopped
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator
from tests.test_crash_safety import ToyStage, _cfg, _params, _records
from tests.test_walkthrough_preemption import ROOT, TINY_SFT, _signal_after_step


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _toy(run_dir: Path, stage=None, **overrides):
    cfg = _cfg(save_every=0, **overrides)
    return train(stage or ToyStage(), cfg, run_dir, make_accelerator(cfg, run_dir))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_in_the_last_step_stops_with_its_checkpoint_and_the_resume_only_evaluates(
        tmp_path, monkeypatch, capsys, signum):
    whole = _toy(tmp_path / "whole")
    run_dir = tmp_path / "run"
    with monkeypatch.context() as patch:
        _signal_after_step(patch, 8, signum)
        with pytest.raises(Stopped) as stopped:
            _toy(run_dir)
    assert stopped.value.signum == signum
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-0000008"]
    out = capsys.readouterr().out
    assert ("interrupted: checkpoint saved at step 8 of 8, the run's last step; the same command with "
            "train.resume=auto finishes the run from it (the after-training evaluation and final/) "
            "(with train.resume=never it starts afresh)") in out
    assert signal.getsignal(signal.SIGTERM) is not None  # handlers put back
    resumed = _toy(run_dir, resume="auto")  # nothing left to train: the restored weights evaluated
    assert resumed.step == 8 and not resumed.stopped_early
    assert resumed.eval_loss == whole.eval_loss
    assert _same(_params(resumed.module), _params(whole.module))
    assert _records(run_dir) == _records(tmp_path / "whole")


def test_with_resume_auto_the_message_says_the_same_command(tmp_path, monkeypatch, capsys):
    with monkeypatch.context() as patch:
        _signal_after_step(patch, 8, signal.SIGTERM)
        with pytest.raises(Stopped):
            _toy(tmp_path / "run", resume="auto")
    out = capsys.readouterr().out
    assert ("checkpoint saved at step 8 of 8, the run's last step; the same command finishes the run from it "
            "(the after-training evaluation and final/)") in out


class _StoppingStage(ToyStage):
    """The toy stage with a monitor that stops the run at its second evaluation (step 4),
    optionally sending a signal while it evaluates."""

    def __init__(self, signum: int = 0):
        super().__init__()
        self.calls, self.signum = 0, signum

    def monitor(self, module, accelerator):
        self.calls += 1
        if self.calls == 2 and self.signum:
            os.kill(os.getpid(), self.signum)
        return {"probe": float(self.calls)}, ("probe said stop" if self.calls == 2 else None)


def test_a_signal_in_the_evaluation_that_stops_the_run_early_stops_it_and_the_resume_ends_it_as_stopped(
        tmp_path, capsys):
    whole = _toy(tmp_path / "whole", _StoppingStage())
    assert whole.stopped_early and whole.step == 4
    run_dir = tmp_path / "run"
    with pytest.raises(Stopped) as stopped:
        _toy(run_dir, _StoppingStage(signal.SIGTERM))
    assert stopped.value.signum == signal.SIGTERM
    assert "checkpoint saved at step 4 of 8, the run's last step" in capsys.readouterr().out
    resumed = _toy(run_dir, _StoppingStage(), resume="auto")
    assert (resumed.step, resumed.stopped_early, resumed.stop_reason, resumed.stop_detail) == (
        4, True, "monitor", "probe said stop")
    assert resumed.eval_loss == whole.eval_loss
    assert _same(_params(resumed.module), _params(whole.module))
    assert _records(run_dir) == _records(tmp_path / "whole")


def test_a_pipeline_stopped_in_a_stages_last_step_finishes_that_stage_and_goes_on_when_rerun(
        tmp_path, monkeypatch, capsys):
    import yaml

    from posttrain import cli

    monkeypatch.chdir(ROOT)
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "first", "kind": "sft", "overrides": TINY_SFT},
        {"name": "second", "kind": "sft", "overrides": TINY_SFT}]}))
    with monkeypatch.context() as patch:
        _signal_after_step(patch, TINY_SFT["train.max_steps"], signal.SIGTERM)
        assert cli.main(["pipeline", str(path)]) == 143
    first = tmp_path / "out" / "first"
    assert not (first / "final").exists() and not (tmp_path / "out" / "second").exists()
    logged = _records(first)
    capsys.readouterr()
    assert cli.main(["pipeline", str(path)]) == 0
    assert "at step 2" in capsys.readouterr().out
    assert (first / "final").is_dir() and (tmp_path / "out" / "second" / "final").is_dir()
    assert _records(first) == logged  # nothing trained again
    assert json.loads((first / "summary.json").read_text())["steps"] == 2


# --------------------------------------------------------------------------- quality


def _quality(tmp_path: Path, files: list[str], **overrides):
    from posttrain.config.quality import QualityConfig
    from posttrain.data.quality.run import run_quality

    items = [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps(files)}"]
    items += [f"{k}={v}" for k, v in overrides.items()]
    return run_quality(QualityConfig.load(None, items), log=lambda _: None)


def test_a_quality_run_removes_the_partial_outputs_an_earlier_stopped_run_left(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Question {i}?", "output": f"Answer {i}."}) + "\n"
                            for i in range(6)))
    out = tmp_path / "out"
    out.mkdir()
    # a run stopped while writing: outputs this run does not write (perplexity is off; one format)
    stale = ["perplexity.jsonl.partial", "kept-pairs.jsonl.partial", "report.md.partial", "kept.jsonl.partial"]
    mine = ["notes.partial", "kept-v1.jsonl.partial", "kept.jsonl.partial.bak"]  # the user's: left alone
    for name in stale + mine:
        (out / name).write_text("half")
    _quality(tmp_path, [str(data)])
    left = sorted(p.name for p in out.iterdir())
    assert not [name for name in left if name in stale]
    assert [name for name in mine if name not in left] == []
    assert len((out / "kept.jsonl").read_text().splitlines()) == 6


def test_a_quality_input_named_as_an_outputs_partial_is_refused(tmp_path):
    from posttrain.errors import ConfigError

    out = tmp_path / "out"
    out.mkdir()
    partial = out / "kept.jsonl.partial"
    partial.write_text(json.dumps({"instruction": "Q?", "output": "A."}) + "\n")
    with pytest.raises(ConfigError, match="kept.jsonl.partial is one of the outputs"):
        _quality(tmp_path, [str(partial)])
    assert partial.exists()
