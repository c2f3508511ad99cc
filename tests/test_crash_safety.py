"""Review: what a crash or an interruption leaves behind, and what the next run does with it.

Failures are simulated by raising (an exception, or KeyboardInterrupt) inside a save at a chosen
point: while writing the model tensors, between the tensors and the manifest, while writing the
optimizer state, at the commit rename, while pruning, while writing final/ or summary.json, and
while metrics.jsonl is rewritten. Every expectation comes from an uninterrupted run of the same
configuration (weights bitwise, metrics.jsonl records apart from timings) or from the README's
contract ("train.resume: auto picks the newest *complete* one", "runs that resume bit for bit").
Tests marked xfail(strict) expose defects.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posttrain.config import TrainConfig
from posttrain.train import checkpoint
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator

TIMINGS = {"tokens_per_s", "step_time_s", "peak_mem_mb"}


class Crash(Exception):
    pass


# --------------------------------------------------------------------------- a toy stage for the loop


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = torch.nn.Linear(4, 8)
        self.b = torch.nn.Linear(8, 1)
        self.drop = torch.nn.Dropout(0.3)  # consumes the global RNG: resume must restore it

    def forward(self, x, y):
        out = self.b(self.drop(torch.tanh(self.a(x)))).squeeze(-1)
        return ((out - y) ** 2).sum()


class ToyStage:
    """24 fixed rows, batch 4 (6 micro-batches an epoch); the order depends only on the epoch."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(24, 4, generator=g)
        self.y = self.x.sum(-1).sin()
        self.module = _Toy()

    def micro_batches(self, epoch):
        order = torch.randperm(24, generator=torch.Generator().manual_seed(100 + epoch))
        for i in range(0, 24, 4):
            yield {"x": self.x[order[i:i + 4]], "y": self.y[order[i:i + 4]]}

    def micro_batches_per_epoch(self):
        return 6

    def weight(self, batch):
        return float(len(batch["y"]))

    def tokens(self, batch):
        return len(batch["y"])

    def eval_micro_batches(self):
        return [{"x": self.x[:8], "y": self.y[:8]}]


def _cfg(**overrides) -> TrainConfig:
    base = {"max_steps": 8, "batch_size": 4, "lr": 0.05, "schedule": "cosine", "warmup_steps": 2,
            "progress_bar": False, "resume": "never", "max_grad_norm": 1.0, "save_every": 2, "keep_last": 1,
            "eval_every": 2}
    base.update(overrides)
    return TrainConfig(**base)


def _toy_run(run_dir: Path, **overrides):
    cfg = _cfg(**overrides)
    return train(ToyStage(), cfg, run_dir, make_accelerator(cfg, run_dir))


def _params(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def _ckpts(run_dir: Path) -> list[str]:
    root = run_dir / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


@pytest.fixture(scope="module")
def toy_straight(tmp_path_factory):
    """An uninterrupted toy run of 8 steps (checkpoints every 2, eval every 2): weights and log."""
    run_dir = tmp_path_factory.mktemp("toy-straight")
    result = _toy_run(run_dir)
    return _params(result.module), _records(run_dir)


def _fail_at(monkeypatch, where: str, step: int, exc: type[BaseException]):
    """Make checkpoint.save of `step` fail at `where`."""
    real_save_file, real_manifest, real_replace, real_rmtree = (checkpoint.save_file, checkpoint.write_manifest,
                                                                os.replace, shutil.rmtree)
    tag = f"step-{step:07d}"

    def save_file(tensors, path, *args, **kwargs):
        if tag in path and Path(path).name == where:
            # half the bytes reach the disk, then the process dies
            real_save_file(tensors, path, *args, **kwargs)
            Path(path).write_bytes(Path(path).read_bytes()[: Path(path).stat().st_size // 2])
            raise exc()
        return real_save_file(tensors, path, *args, **kwargs)

    def write_manifest(directory, meta):
        if where == "manifest" and tag in str(directory):
            raise exc()  # every data file written, the manifest not yet
        return real_manifest(directory, meta)

    def replace(src, dst, *args, **kwargs):
        if where == "rename" and tag in str(src):
            raise exc()  # complete in .tmp-…, never renamed
        return real_replace(src, dst, *args, **kwargs)

    def rmtree(path, *args, **kwargs):
        if where == "prune" and Path(path).name.startswith("step-") and (Path(path).parent / tag).is_dir():
            (Path(path) / "trainable.safetensors").unlink()  # a partly deleted old checkpoint
            raise exc()
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", save_file)
    monkeypatch.setattr(checkpoint, "write_manifest", write_manifest)
    monkeypatch.setattr(checkpoint.os, "replace", replace)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)


# --------------------------------------------------------------------------- crashes inside a checkpoint save


@pytest.mark.parametrize("where, exc, resumes_at", [
    ("trainable.safetensors", Crash, 4),      # while writing the model tensors of step 6
    ("manifest", KeyboardInterrupt, 4),        # between the tensors and the manifest
    ("optimizer.safetensors", KeyboardInterrupt, 4),  # while writing the optimizer state
    ("rename", Crash, 4),                      # complete in the temporary directory, not committed
    ("prune", KeyboardInterrupt, 6),           # committed; killed while deleting step 4
])
def test_a_save_that_dies_resumes_from_the_last_complete_checkpoint_bitwise(
        tmp_path, monkeypatch, capsys, toy_straight, where, exc, resumes_at):
    """keep_last=1: the only complete checkpoint (step 4) must survive a failed save of step 6."""
    weights, records = toy_straight
    with monkeypatch.context() as patch:
        _fail_at(patch, where, 6, exc)
        with pytest.raises(exc):
            _toy_run(tmp_path)
    assert checkpoint.latest_complete(tmp_path / "checkpoints").name == f"step-{resumes_at:07d}"
    capsys.readouterr()
    resumed = _toy_run(tmp_path, resume="auto")
    assert f"at step {resumes_at}" in capsys.readouterr().out
    assert all(torch.equal(resumed.module.state_dict()[k], v) for k, v in weights.items())
    assert _records(tmp_path) == records  # every step once, in order, same figures
    # the temporary directory is gone; (a partly deleted old checkpoint stays behind, never resumed from)
    assert [n for n in _ckpts(tmp_path) if checkpoint.is_complete(tmp_path / "checkpoints" / n)] == ["step-0000008"]
    assert not [n for n in _ckpts(tmp_path) if n.startswith(".tmp")]


def test_keep_last_never_prunes_before_the_new_checkpoint_is_committed(tmp_path, monkeypatch):
    """Watch the directory at the moment the new checkpoint is renamed into place."""
    seen = []
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if ".tmp-step-" in str(src):
            seen.append([n for n in _ckpts(tmp_path) if n.startswith("step-") and checkpoint.is_complete(tmp_path / "checkpoints" / n)])
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(checkpoint.os, "replace", replace)
    _toy_run(tmp_path, max_steps=6)
    assert seen == [[], ["step-0000002"], ["step-0000004"]]
    assert _ckpts(tmp_path) == ["step-0000006"]


def test_resuming_from_an_earlier_checkpoint_of_the_same_run_completes(tmp_path, toy_straight):
    weights, _ = toy_straight
    _toy_run(tmp_path, keep_last=5)  # steps 2, 4, 6, 8 kept
    rolled_back = _toy_run(tmp_path, keep_last=5, resume=str(tmp_path / "checkpoints" / "step-0000004"))
    assert all(torch.equal(rolled_back.module.state_dict()[k], v) for k, v in weights.items())


def test_a_damaged_newest_checkpoint_is_skipped_and_the_run_completes(tmp_path, toy_straight):
    weights, records = toy_straight
    # a run killed in its step-8 save (kept: 4, 6); then step 6's optimizer file is damaged (a copy cut short)
    with pytest.MonkeyPatch.context() as patch:
        _fail_at(patch, "trainable.safetensors", 8, Crash)
        with pytest.raises(Crash):
            _toy_run(tmp_path, keep_last=2)
    victim = tmp_path / "checkpoints" / "step-0000006" / "optimizer.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    assert checkpoint.latest_complete(tmp_path / "checkpoints").name == "step-0000004"
    resumed = _toy_run(tmp_path, keep_last=2, resume="auto")
    assert all(torch.equal(resumed.module.state_dict()[k], v) for k, v in weights.items())
    assert _records(tmp_path) == records


def test_pruning_keeps_the_resumed_runs_own_checkpoint(tmp_path):
    _toy_run(tmp_path, max_steps=8, save_every=3, keep_last=2)  # kept: steps 6 and 8
    outside = tmp_path.parent / f"{tmp_path.name}-step3"
    # step 3 of the same run, kept elsewhere: a rerun with another config replays the first 3 steps exactly
    _toy_run(outside, max_steps=8, save_every=3, keep_last=5)
    start = outside / "checkpoints" / "step-0000003"
    with pytest.MonkeyPatch.context() as patch:
        _fail_at(patch, "trainable.safetensors", 5, Crash)  # the resumed run dies at its step-5 save
        with pytest.raises(Crash):
            _toy_run(tmp_path, max_steps=8, save_every=1, keep_last=1, resume=str(start))
    # the resumed run committed its step-4 checkpoint; resume=auto must continue it, not the abandoned run's step 8
    assert checkpoint.latest_complete(tmp_path / "checkpoints").name == "step-0000004"


# --------------------------------------------------------------------------- metrics.jsonl


def _crash_in_step(monkeypatch, step: int, exc: type[BaseException] = Crash):
    """The loop's `step`-th step raises `exc` before doing anything."""
    from posttrain.train import loop

    real, calls = loop._train_step, [0]

    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == step:
            raise exc()
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "_train_step", wrapped)


def test_a_torn_metrics_line_does_not_block_resume(tmp_path, monkeypatch, toy_straight):
    weights, records = toy_straight
    with monkeypatch.context() as patch:
        _crash_in_step(patch, 6)
        with pytest.raises(Crash):
            _toy_run(tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 6, "epoch": 0, "lo')  # what a write cut short leaves
    resumed = _toy_run(tmp_path, resume="auto")
    assert all(torch.equal(resumed.module.state_dict()[k], v) for k, v in weights.items())
    assert _records(tmp_path) == records


def test_an_interrupt_while_metrics_are_rewritten_on_resume_loses_no_step(tmp_path, monkeypatch, toy_straight):
    weights, records = toy_straight
    with monkeypatch.context() as patch:
        _crash_in_step(patch, 6)
        with pytest.raises(Crash):
            _toy_run(tmp_path)
    real_write_text = Path.write_text

    def write_text(self, data, *args, **kwargs):
        if self.name.startswith("metrics.jsonl"):  # the log itself, or the copy that replaces it
            open(self, "w").close()  # opened for writing (truncated), then Ctrl-C before the data is written
            raise KeyboardInterrupt
        return real_write_text(self, data, *args, **kwargs)

    def open_for_writing(file, mode="r", *args, **kwargs):  # posttrain.files writes through open()
        if "w" in mode and Path(file).name.startswith("metrics.jsonl"):
            open(file, "w").close()
            raise KeyboardInterrupt
        return open(file, mode, *args, **kwargs)

    import posttrain.files

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", write_text)
        patch.setattr(posttrain.files, "open", open_for_writing, raising=False)
        with pytest.raises(KeyboardInterrupt):
            _toy_run(tmp_path, resume="auto")
    resumed = _toy_run(tmp_path, resume="auto")
    assert all(torch.equal(resumed.module.state_dict()[k], v) for k, v in weights.items())
    assert _records(tmp_path) == records


# --------------------------------------------------------------------------- real stages: final/, summary.json, Ctrl-C

SFT_SETTINGS = {"data.synthetic_size": 24, "data.max_length": 48, "train.batch_size": 4, "train.max_steps": 4,
                "train.save_every": 2, "train.lr": 3e-3, "train.progress_bar": False}


def _sft_overrides(out: Path, **extra) -> list[str]:
    return [f"output_dir={out}"] + [f"{k}={json.dumps(v)}" for k, v in {**SFT_SETTINGS, **extra}.items()]


def _sft(out: Path, **extra) -> Path:
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    return run_sft(SFTConfig.load(None, _sft_overrides(out, **extra)))


def _final_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted((run_dir / "final").rglob("*.safetensors")):
        tensors.update({f"{f.name}:{k}": v for k, v in load_file(str(f)).items()})
    assert tensors
    return tensors


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _summary(run_dir: Path) -> dict:
    """summary.json without its timing (wall_seconds: a resumed run's differs from a straight one's)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary.pop("wall_seconds") > 0
    return summary


@pytest.fixture(scope="module")
def sft_straight(tmp_path_factory):
    """An uninterrupted SFT run: (run dir, final tensors, metrics records without timings, summary)."""
    run_dir = _sft(tmp_path_factory.mktemp("sft-straight") / "run")
    return run_dir, _final_tensors(run_dir), _records(run_dir), _summary(run_dir)


def test_a_pipeline_stage_killed_while_writing_final_or_summary_is_resumed_not_skipped(
        tmp_path, monkeypatch, capsys, sft_straight):
    """Killed inside save_pretrained (a cut model file in final/'s temporary sibling: final/ itself is
    renamed into place whole, so there is none; no summary.json), then killed while summary.json is
    written (final/ complete, summary.json cut): each rerun resumes the stage, and the end is the
    uninterrupted run's, bit for bit."""
    import transformers
    import yaml

    from posttrain.pipeline import STATE_FILE, run_pipeline

    _, weights, records, summary = sft_straight
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                    "stages": [{"name": "sft", "kind": "sft", "overrides": SFT_SETTINGS}]}))
    run_dir = tmp_path / "out" / "sft"
    real_save = transformers.PreTrainedModel.save_pretrained

    def cut_save(self, out, *args, **kwargs):
        real_save(self, out, *args, **kwargs)
        model_file = Path(out) / "model.safetensors"
        model_file.write_bytes(model_file.read_bytes()[:1000])
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(transformers.PreTrainedModel, "save_pretrained", cut_save)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(path)
    assert (run_dir / ".tmp-final" / "config.json").is_file() and not (run_dir / "final").exists()
    assert not (run_dir / "summary.json").exists()
    capsys.readouterr()

    real_write_text = Path.write_text

    def cut_summary(self, data, *args, **kwargs):
        if self.name == "summary.json":
            real_write_text(self, data[: len(data) // 2])
            raise KeyboardInterrupt
        return real_write_text(self, data, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(Path, "write_text", cut_summary)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(path)
    assert "sft (sft): resuming" in capsys.readouterr().out
    assert (run_dir / "summary.json").is_file()  # the cut summary.json is there, final/ is complete

    run_pipeline(path)
    printed = capsys.readouterr().out
    assert "sft (sft): resuming" in printed and "at step 4" in printed
    assert json.loads((tmp_path / "out" / STATE_FILE).read_text())["stages"]["sft"]["status"] == "done"
    assert _same_tensors(_final_tensors(run_dir), weights)
    assert _records(run_dir) == records
    assert _summary(run_dir) == summary
    run_pipeline(path)
    assert "sft (sft): skipped" in capsys.readouterr().out


def test_ctrl_c_during_training_exits_130_and_the_rerun_ends_as_an_uninterrupted_run(
        tmp_path, monkeypatch, capsys, sft_straight):
    from posttrain import cli

    _, weights, records, summary = sft_straight
    argv = ["sft", *_sft_overrides(tmp_path / "run")]
    with monkeypatch.context() as patch:
        _crash_in_step(patch, 4, KeyboardInterrupt)  # after the step-2 checkpoint and step 3
        assert cli.main(argv) == 130
    assert "interrupted" in capsys.readouterr().err
    assert [r["step"] for r in _records(tmp_path / "run")] == [1, 2, 3]
    assert cli.main(argv) == 0  # train.resume defaults to auto
    assert "at step 2" in capsys.readouterr().out
    assert _same_tensors(_final_tensors(tmp_path / "run"), weights)
    assert _records(tmp_path / "run") == records
    assert _summary(tmp_path / "run") == summary


def test_reward_model_killed_while_writing_optimizer_state_resumes_bitwise(tmp_path, monkeypatch):
    from posttrain.config import RMConfig
    from posttrain.train.reward import run_rm

    def cfg(out, *extra):
        return RMConfig.load(None, [f"output_dir={out}", "data.synthetic_size=16", "data.max_length=40",
                                    "train.batch_size=4", "train.max_steps=2", "train.save_every=1",
                                    "train.keep_last=1", "train.lr=3e-3", "train.progress_bar=false", *extra])

    straight = run_rm(cfg(tmp_path / "straight"))
    with monkeypatch.context() as patch:
        _fail_at(patch, "optimizer.safetensors", 2, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            run_rm(cfg(tmp_path / "cut"))
    assert checkpoint.latest_complete(tmp_path / "cut" / "checkpoints").name == "step-0000001"
    resumed = run_rm(cfg(tmp_path / "cut", "train.resume=auto"))
    assert _same_tensors(_final_tensors(resumed), _final_tensors(straight))
    assert _records(resumed) == _records(straight)
    assert _summary(resumed) == _summary(straight)


# --------------------------------------------------------------------------- a run directory of another config


def test_an_interrupted_fresh_rerun_of_a_changed_stage_never_resumes_the_old_configs_checkpoints(
        tmp_path, monkeypatch, capsys):
    import yaml

    import posttrain.data.pipeline as data_pipeline
    from posttrain.pipeline import run_pipeline

    path = tmp_path / "pipe.yaml"
    settings = {**SFT_SETTINGS, "train.max_steps": 2}
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"),
                                    "stages": [{"name": "sft", "kind": "sft", "overrides": settings}]}))
    run_dir = tmp_path / "out" / "sft"
    run_pipeline(path)  # lr 3e-3
    old = _final_tensors(run_dir)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # Ctrl-C while the changed stage prepares its data

    with monkeypatch.context() as patch:
        patch.setattr(data_pipeline, "prepare_sft_data", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run_pipeline(path, ["sft.train.lr=1e-2"])
    capsys.readouterr()
    run_pipeline(path, ["sft.train.lr=1e-2"])
    printed = capsys.readouterr().out
    assert "resumed from" not in printed
    first = _records(run_dir)[0]
    assert first["step"] == 1 and first["lr"] == pytest.approx(1e-2)  # no warm-up: step 1 runs at train.lr
    assert not _same_tensors(_final_tensors(run_dir), old)


@pytest.mark.parametrize("change", [{"data.synthetic_tasks": ["reverse"]}, {"model.path": "tiny-2l"}])
def test_resume_auto_over_a_run_directory_of_another_config_refuses_or_starts_afresh(tmp_path, sft_straight, change):
    from posttrain.errors import UserError

    source, weights, _, _ = sft_straight
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    try:
        _sft(run_dir, **change)
    except UserError as exc:
        assert "resume" in str(exc)  # refusing to mix two runs, saying how to start afresh, is a fine answer
        return
    assert not _same_tensors(_final_tensors(run_dir), weights)
