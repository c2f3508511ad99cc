"""Checkpoints and resume when things go wrong: an operator whose jobs are preempted, walking README's
"The training loop" (checkpoints, `train.resume`, `train.keep_last`, what a resume refuses) and
`train/checkpoint.py` / `train/loop.py` with the tiny preset, 2-4 steps and a checkpoint every step. Walked:
a committed checkpoint with one file cut short or missing (weights, optimizer state, loop_state.json, an
RNG file), as the newest one, the only one, and one named by `train.resume=PATH`; a step that dies mid-run
and the rerun of the same command (metrics.jsonl, summary.json, data_report.json and rejects-train.jsonl
against an uninterrupted run); resuming with changed settings (data files renamed, a data file's rows
edited under the same name, `max_steps` lowered below the checkpoint); a checkpoint whose loop_state.json is
of the first format the loop wrote (no fingerprint, `step_in_epoch`, none of the later counters); keep-last
rotation around a damaged newest checkpoint.

What was right: `resume: auto` never resumes from a checkpoint with a file cut short (sizes against the
manifest) and falls back to the newest complete one; a save that dies keeps the previous checkpoint (pinned
in test_crash_safety.py); a run crashed mid-way and rerun writes metrics.jsonl, summary.json and
data_report.json as the uninterrupted run does (timings and the run directory's own paths apart); a
checkpoint of the first loop-state format still resumes; an older or damaged checkpoint is never pruned
before a newer complete one exists.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 33:
each asserts the right behaviour); the others pin behaviour that was right but had no test."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import posttrain as P
from posttrain.errors import UserError
from posttrain.train import checkpoint

ROOT = Path(__file__).resolve().parents[1]
TIMINGS = {"tokens_per_s", "step_time_s", "peak_mem_mb", "wall_seconds"}
PAIRS = [(f"Copy: {a} {b}", f"{a} {b}") for a, b in zip("abcdefghijkl", "qrstuvwxyzmn")]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _chat_file(path: Path, pairs=PAIRS, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": u},
                                                     {"role": "assistant", "content": a}]}) + "\n"
                            for u, a in pairs) + extra)
    return path


def _cfg(out: Path, files=("synthetic",), data=None, **train) -> P.SFTConfig:
    return P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"},
        "data": {"train_files": [str(f) for f in files], "synthetic_size": 24, "max_length": 64, **(data or {})},
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-3, "progress_bar": False, "save_every": 1,
                  "keep_last": 2, **train}})


def _ckpts(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def _cut(path: Path) -> None:
    """A file cut short: what a copy interrupted, or a disk that lost its tail, leaves."""
    path.write_bytes(path.read_bytes()[:100])


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 2-step SFT run (synthetic data): checkpoints step-1 and step-2, final/, summary.json."""
    run = tmp_path_factory.mktemp("finished") / "run"
    P.run_sft(_cfg(run))
    assert _ckpts(run) == ["step-0000001", "step-0000002"]
    return run


def _copy(finished: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("kept", ["newest", "only"])
def test_a_damaged_checkpoint_that_resume_auto_passes_over_is_named(finished, tmp_path, capsys, kept):
    """README: "`train.resume: auto` picks the newest *complete* one". It does, but the operator whose
    step-2 checkpoint lost the tail of its optimizer file is not told: with step 1 beside it the run says
    only "resumed from .../step-0000001" and removes step-0000002 (drop_after); with no other checkpoint it
    starts afresh from step 0 and removes the checkpoint too (the fresh-start line names final/, summary.json
    and metrics.jsonl, not it: `clear` counts complete checkpoints only). A checkpoint passed over, and
    deleted, should be named with what is wrong with it."""
    run = _copy(finished, tmp_path)
    if kept == "only":
        shutil.rmtree(run / "checkpoints" / "step-0000001")
    _cut(run / "checkpoints" / "step-0000002" / "optimizer.safetensors")
    capsys.readouterr()
    try:
        P.run_sft(_cfg(run, max_steps=3))
    except UserError as exc:  # a refusal to start afresh over it would do as well, naming it
        assert "step-0000002" in str(exc), f"refused without naming the damaged checkpoint: {exc}"
        return
    out = capsys.readouterr().out
    said = [line for line in out.splitlines() if "step-0000002" in line]
    assert said and any(word in line for line in said for word in ("optimizer.safetensors", "incomplete", "damaged")), \
        f"nothing names the skipped, now deleted, step-0000002; the resume/fresh-start lines: " \
        f"{[line for line in out.splitlines() if 'resumed' in line or 'fresh start' in line]}"


@pytest.mark.parametrize("damage", ["optimizer.safetensors", "rng-rank0.json"])
def test_resuming_a_named_damaged_checkpoint_says_which_file_is_wrong(finished, tmp_path, damage):
    """The operator names the checkpoint (`train.resume=.../step-0000002`); one of its files is cut short
    or gone. The refusal blames the manifest ("no valid manifest.json"), which is whole and valid: the
    operator looks at the wrong file. It should name the file and its size against the manifest's."""
    run = _copy(finished, tmp_path)
    target = run / "checkpoints" / "step-0000002"
    manifest = json.loads((target / "manifest.json").read_text())
    assert damage in manifest["files"]  # the premise: a valid manifest that lists it
    if damage.endswith(".json"):
        (target / damage).unlink()
    else:
        _cut(target / damage)
    with pytest.raises(UserError) as info:
        P.run_sft(_cfg(run, max_steps=3, resume=str(target)))
    assert damage in str(info.value), f"the refusal does not name {damage}: {info.value}"


def test_resuming_after_the_training_file_was_edited_is_refused_or_said(tmp_path, capsys):
    """README: what the weights depend on is kept with every checkpoint and a resume under other values
    is refused — and the files at model.path count by names, sizes and times ("a starting model rewritten
    since ... is another model"). The training file is kept by its name only: 4 rows appended to it under
    the same name and the rerun resumes at step 2 without a word, on a reshuffled order of other rows (the
    data position counts micro-batches of the old file) and a redrawn held-out split, and data_report.json
    is rewritten for the new file. It should be refused naming the file (or at least said)."""
    data = _chat_file(tmp_path / "chat.jsonl")
    run = tmp_path / "run"
    P.run_sft(_cfg(run, files=[data]))
    before = json.loads((run / "data_report.json").read_text())["train_read"]["rows"]
    _chat_file(data, PAIRS + [(f"Copy: {a}", a) for a in "wxyz"])
    capsys.readouterr()
    try:
        P.run_sft(_cfg(run, files=[data], max_steps=3))
    except UserError as exc:
        assert "chat.jsonl" in str(exc), f"refused without naming the file: {exc}"
        return
    out = capsys.readouterr().out
    after = json.loads((run / "data_report.json").read_text())["train_read"]["rows"]
    assert any("chat.jsonl" in line and "changed" in line for line in out.splitlines()), \
        f"resumed silently over an edited file (rows {before} -> {after}): " \
        f"{[line for line in out.splitlines() if 'resumed' in line]}"


def test_a_refusal_over_changed_data_files_shows_the_file_that_changed(tmp_path):
    """README: a resume under other values is refused, "naming each one (`data.max_length: 64 → 128`)".
    For data.train_files the old and new lists are each shown cut to 57 characters, so a changed second
    file under a long directory reads `["/…/chat.jsonl", "/…/m... → ["/…/chat.jsonl", "/…/m...`:
    the operator sees no difference. The file that changed should be in the message."""
    where = tmp_path / "datasets-for-the-assistant-project" / "2026-11"
    chat, math = _chat_file(where / "chat.jsonl"), _chat_file(where / "math.jsonl")
    run = tmp_path / "run"
    P.run_sft(_cfg(run, files=[chat, math], max_steps=1))
    math2 = shutil.copy(math, where / "math-v2.jsonl")
    with pytest.raises(UserError) as info:
        P.run_sft(_cfg(run, files=[chat, math2], max_steps=2))
    message = str(info.value)
    assert "data.train_files" in message  # the premise: refused, naming the setting
    assert "math-v2.jsonl" in message, f"the new file is not shown: {message}"


# --------------------------------------------------------------------------- right, with no test before


def test_a_run_crashed_mid_way_and_rerun_writes_the_reports_of_an_uninterrupted_run(tmp_path, monkeypatch):
    """A step dies after the step-2 checkpoint (file data with a malformed row, bad_rows=skip, a held-out
    split); the same command rerun resumes there. metrics.jsonl, summary.json and data_report.json equal
    the uninterrupted run's (timings and the run directory's own paths apart), and rejects-train.jsonl
    holds the bad row once."""
    from posttrain.train import loop

    data = _chat_file(tmp_path / "chat.jsonl", extra="not json\n")
    opts = {"files": [data], "data": {"eval_fraction": 0.2, "bad_rows": "skip", "max_bad_fraction": 0.2},
            "max_steps": 3, "batch_size": 2, "keep_last": 1, "eval_every": 2}
    P.run_sft(_cfg(tmp_path / "straight", **opts))

    class Crash(Exception):
        pass

    real, calls = loop._train_step, [0]

    def dies_at_step_3(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise Crash()
        return real(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_train_step", dies_at_step_3)
        with pytest.raises(Crash):
            P.run_sft(_cfg(tmp_path / "cut", **opts))
    assert _ckpts(tmp_path / "cut") == ["step-0000002"] and not (tmp_path / "cut" / "summary.json").exists()
    P.run_sft(_cfg(tmp_path / "cut", **opts))

    def read(run: Path, name: str):
        text = (run / name).read_text().replace(str(run), "RUN")
        if name.endswith(".jsonl"):
            return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in text.splitlines()]
        return {k: v for k, v in json.loads(text).items() if k not in TIMINGS}

    for name in ("metrics.jsonl", "summary.json", "data_report.json", "rejects-train.jsonl"):
        assert read(tmp_path / "cut", name) == read(tmp_path / "straight", name), name
    assert len(read(tmp_path / "cut", "rejects-train.jsonl")) == 1


def test_a_checkpoint_of_the_first_loop_state_format_resumes(finished, tmp_path, capsys):
    """A checkpoint written before the loop state kept a fingerprint, the warmup, the log interval, the
    wall time or `stopped_early` (its data position as `step_in_epoch`, steps of this run's size) still
    resumes: the rerun trains step 3 and ends with a summary."""
    run = _copy(finished, tmp_path)
    target = run / "checkpoints" / "step-0000002"
    state = json.loads((target / checkpoint.LOOP_STATE).read_text())
    first = {"step": state["step"], "epoch": state["epoch"], "step_in_epoch": state["micro_in_epoch"],
             "skipped_steps": 0, "consecutive_nonfinite": 0, "best_eval": None, "evals_without_improvement": 0}
    (target / checkpoint.LOOP_STATE).write_text(json.dumps(first))
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["files"][checkpoint.LOOP_STATE] = (target / checkpoint.LOOP_STATE).stat().st_size
    (target / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    P.run_sft(_cfg(run, max_steps=3))
    assert "at step 2" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["stop_reason"] == "max_steps"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]
    assert steps == [1, 2, 3]


def test_keep_last_one_around_a_damaged_newest_checkpoint_keeps_a_complete_one(finished, tmp_path):
    """keep_last=1, the newest checkpoint damaged: the rerun resumes from step 1, and what it leaves is
    complete checkpoints only, the newest its own step 3 (never the damaged one, never none)."""
    run = _copy(finished, tmp_path)
    _cut(run / "checkpoints" / "step-0000002" / checkpoint.TRAINABLE)
    P.run_sft(_cfg(run, max_steps=3, keep_last=1))
    assert _ckpts(run) == ["step-0000003"]
    assert checkpoint.is_complete(run / "checkpoints" / "step-0000003")
