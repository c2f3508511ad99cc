"""Paths, stop 34: a path holding '=' (sweep directories such as `runs/lr=0.1`) is a path wherever a
pipeline reads one (only reward.models takes NAME=DIR, read as rewards.model_component reads it), and
a named pipe or device given as a data file is refused up front, by name, without being opened."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from posttrain.errors import DataError, UserError

ROWS = [{"instruction": f"Say {w}", "output": w} for w in "alpha beta gamma delta".split()]


def _jsonl(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


# --------------------------------------------------------------------------- '=' in a pipeline's paths


def test_a_path_holding_equals_is_read_whole(tmp_path):
    from posttrain.pipeline import _reads

    clean, rm = tmp_path / "lr=0.1" / "clean", tmp_path / "lr=0.1" / "rm"
    assert _reads({"data.train_files": [str(clean / "kept.jsonl")]}, clean)
    assert _reads({"model.path": str(rm / "final")}, rm)
    assert not _reads({"data.train_files": [str(clean / "kept.jsonl")]}, rm)


def test_reward_models_items_are_name_dir_or_dir_as_the_reward_reads_them(tmp_path):
    from posttrain.pipeline import _reads

    rm = tmp_path / "lr=0.1" / "rm"
    assert _reads({"reward.models": [f"judge={rm / 'final'}"]}, rm)  # NAME=DIR, DIR holding '='
    assert _reads({"reward.models": [str(rm / "final")]}, rm)  # a plain DIR holding '='
    rm.mkdir(parents=True)
    assert _reads({"reward.models": [str(rm)]}, rm)  # an existing path is a path
    # only reward.models takes a NAME=: elsewhere `x=/abs/dir` is a (relative) path, not the label x
    assert not _reads({"data.train_files": [f"x={rm / 'f.jsonl'}"]}, rm)


def test_a_file_an_earlier_stage_did_not_write_under_an_equals_directory_is_named(tmp_path):
    """_check_read_files sees the sft stage's file as the clean stage's (it did not write it),
    rather than skipping it as a file of no stage."""
    from posttrain.pipeline import _check_read_files, load_pipeline

    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "lr=0.1"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"output_dir": str(out), "stages": [
        {"name": "clean", "kind": "quality", "overrides": {"data.files": [str(data)]}},
        {"name": "sft", "kind": "sft", "inputs": {"data.train_files": "clean/other.jsonl"},
         "overrides": {"train.max_steps": 1}}]}))
    _, stages = load_pipeline(pipeline)
    assert stages[1].deps == ["clean"]
    (out / "clean").mkdir(parents=True)
    with pytest.raises(UserError, match="which stage clean did not write"):
        _check_read_files(stages[1], {s.name: s for s in stages})


def test_a_given_path_into_an_earlier_stage_under_an_equals_directory_makes_a_dependency(tmp_path):
    from posttrain.pipeline import load_pipeline

    data, out = _jsonl(tmp_path / "train.jsonl"), tmp_path / "seed=3"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"output_dir": str(out), "stages": [
        {"name": "clean", "kind": "quality", "overrides": {"data.files": [str(data)]}},
        {"name": "sft", "kind": "sft", "overrides": {"data.train_files": [str(out / "clean" / "kept.jsonl")],
                                                     "train.max_steps": 1}}]}))
    _, stages = load_pipeline(pipeline)
    assert stages[1].deps == ["clean"]


# --------------------------------------------------------------------------- not a regular file


@pytest.fixture
def fifo(tmp_path):
    """A named pipe with no writer; opening it would block, so the test is stopped after 30 s."""
    def opened(signum, frame):
        raise AssertionError(f"{path} was opened (with no writer, the open blocks)")

    path = tmp_path / "stream.jsonl"
    os.mkfifo(path)
    previous = signal.signal(signal.SIGALRM, opened)
    signal.alarm(30)
    yield path
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def test_a_named_pipe_is_refused_by_name_without_being_opened(fifo):
    from posttrain.data.readers import check_path, iter_rows

    for read in (check_path, iter_rows):
        with pytest.raises(DataError, match="a named pipe; posttrain reads a file more than once: write it to a "
                                            "file first") as caught:
            read(str(fifo))
        assert str(caught.value).startswith(f"{fifo}:")


def test_a_device_under_a_data_file_name_is_not_a_regular_file(tmp_path):
    from posttrain.data.readers import check_path

    link = tmp_path / "rows.jsonl"
    link.symlink_to(os.devnull)
    with pytest.raises(DataError, match=r"rows\.jsonl: not a regular file; posttrain reads a file more than once"):
        check_path(str(link))


def test_dev_null_is_still_an_unknown_file_type():
    from posttrain.data.readers import check_path

    with pytest.raises(DataError, match="unknown file type"):
        check_path(os.devnull)


def test_a_symlink_to_a_regular_file_is_read(tmp_path):
    from posttrain.data.readers import check_path, iter_rows

    link = tmp_path / "link.jsonl"
    link.symlink_to(_jsonl(tmp_path / "real.jsonl"))
    assert check_path(str(link)) == "jsonl"
    assert len(list(iter_rows(str(link)))) == len(ROWS)


def test_a_pipeline_refuses_a_named_pipe_before_any_stage_runs(tmp_path, fifo):
    from posttrain import run_pipeline

    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(json.dumps({"output_dir": str(tmp_path / "runs"), "stages": [
        {"name": "sft", "kind": "sft", "overrides": {"data.train_files": [str(fifo)], "train.max_steps": 1}}]}))
    with pytest.raises(UserError, match="a named pipe"):
        run_pipeline(pipeline, dry_run=True)
