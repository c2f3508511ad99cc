"""Resume around damaged checkpoints and changed data, beside the pinned walkthrough ones
(tests/test_walkthrough_resume.py): what `checkpoint.problems` says of each fault, a resume=auto
that finds damaged checkpoints only refuses (and keeps them), one that passes over an older
damaged one names and removes it, a fresh start counts the incomplete ones it removes, a
checkpoint from before the data files were fingerprinted resumes (and its run's new checkpoints
keep them), how a refusal shows a changed list or long value, and a checkpoint past a lowered
`train.max_steps` is said."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

import posttrain as P
from posttrain.errors import ConfigError
from posttrain.train import checkpoint
from posttrain.files import content_digest
from posttrain.train.runs import DATA_FILES, _change, _check_same_run, run_fingerprint
from tests.test_walkthrough_resume import _cfg, _chat_file, _ckpts, _copy, _cut

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("finished") / "run"
    P.run_sft(_cfg(run))
    return run


def _manifest_files(directory: Path) -> dict:
    return json.loads((directory / checkpoint.MANIFEST).read_text())["files"]


def test_problems_names_each_fault_of_a_checkpoint(finished, tmp_path):
    run = _copy(finished, tmp_path)
    step = run / "checkpoints" / "step-0000002"
    assert checkpoint.problems(step) == [] and checkpoint.is_complete(step)
    size = _manifest_files(step)["optimizer.safetensors"]
    _cut(step / "optimizer.safetensors")
    (step / "rng-rank0.json").unlink()
    assert sorted(checkpoint.problems(step)) == [f"optimizer.safetensors: 100 bytes, manifest says {size}",
                                                 "rng-rank0.json missing"]
    (step / checkpoint.MANIFEST).write_text("{not json")
    assert checkpoint.problems(step) == ["manifest.json unreadable or without its list of files"]
    (step / checkpoint.MANIFEST).write_text(json.dumps({"files": ["a list"]}))
    assert checkpoint.problems(step) == ["manifest.json unreadable or without its list of files"]
    (step / checkpoint.MANIFEST).unlink()
    assert checkpoint.problems(step) == ["no manifest.json"]
    assert checkpoint.problems(tmp_path / "nothing") == ["no such directory"]
    assert list(checkpoint.incomplete(run / "checkpoints")) == [step]
    assert checkpoint.latest_complete(run / "checkpoints").name == "step-0000001"


def test_resume_auto_over_damaged_checkpoints_only_is_refused_and_keeps_them(finished, tmp_path):
    run = _copy(finished, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step-0000001")
    (run / "checkpoints" / "step-0000002" / "rng-rank0.json").unlink()
    with pytest.raises(ConfigError) as info:
        P.run_sft(_cfg(run, max_steps=3))
    assert "step-0000002: rng-rank0.json missing" in str(info.value) and "train.resume=never" in str(info.value)
    assert _ckpts(run) == ["step-0000002"]  # nothing removed: the files may yet be restored
    assert (run / "summary.json").exists()  # nor anything else of the run


def test_a_fresh_start_names_and_counts_the_incomplete_checkpoints_it_removes(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    _cut(run / "checkpoints" / "step-0000002" / checkpoint.TRAINABLE)
    capsys.readouterr()
    P.run_sft(_cfg(run, max_steps=1, resume="never"))
    out = capsys.readouterr().out
    assert "step-0000002 is an incomplete checkpoint (trainable.safetensors: 100 bytes" in out
    assert "fresh start: removed 2 checkpoint(s) (1 incomplete)" in out
    assert _ckpts(run) == ["step-0000001"]  # the new run's own


def test_an_older_damaged_checkpoint_is_named_and_removed_on_resume(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    (run / "checkpoints" / "step-0000001" / "optimizer.json").unlink()
    capsys.readouterr()
    P.run_sft(_cfg(run, max_steps=3, keep_last=3))
    out = capsys.readouterr().out
    assert "step-0000001 is an incomplete checkpoint (optimizer.json missing): passed over and removed" in out
    assert "resumed from" in out and "step-0000002 at step 2" in out
    assert _ckpts(run) == ["step-0000002", "step-0000003"]


def test_a_checkpoint_from_before_data_files_were_fingerprinted_resumes(tmp_path):
    data = _chat_file(tmp_path / "chat.jsonl")
    run = tmp_path / "run"
    P.run_sft(_cfg(run, files=[data]))
    target = run / "checkpoints" / "step-0000002"
    state = json.loads((target / checkpoint.LOOP_STATE).read_text())
    size = data.stat().st_size
    assert state["fingerprint"][DATA_FILES] == {str(data): [size, content_digest(data, size)]}
    del state["fingerprint"][DATA_FILES]
    (target / checkpoint.LOOP_STATE).write_text(json.dumps(state))
    manifest = json.loads((target / checkpoint.MANIFEST).read_text())
    manifest["files"][checkpoint.LOOP_STATE] = (target / checkpoint.LOOP_STATE).stat().st_size
    (target / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    text = data.read_text()
    data.write_text("".join(reversed(text.splitlines(True))))  # another order, the same size: not kept, not compared
    P.run_sft(_cfg(run, files=[data], max_steps=3))
    after = json.loads((run / "checkpoints" / "step-0000003" / checkpoint.LOOP_STATE).read_text())
    assert after["fingerprint"][DATA_FILES] == {str(data): [size, content_digest(data, size)]}


def test_a_data_file_rewritten_at_the_same_size_is_named_and_a_fresh_copy_of_the_same_rows_is_not(tmp_path):
    """Contents, not modification times: the same rows written again (a copy to scratch after a
    preemption) resume; other rows of the same size are refused, named."""
    data = _chat_file(tmp_path / "chat.jsonl")
    cfg = _cfg(tmp_path / "run", files=[data])
    saved = run_fingerprint(cfg)
    directory = tmp_path / "step-0000001"
    directory.mkdir()
    (directory / checkpoint.LOOP_STATE).write_text(json.dumps({"step": 1, "fingerprint": saved}))
    text = data.read_text()
    data.write_text(text)
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    _check_same_run(directory, run_fingerprint(cfg))  # the same rows, a new time
    data.write_text("".join(reversed(text.splitlines(True))))  # the same rows in another order
    with pytest.raises(ConfigError, match=f"the file {data} changed since the checkpoint "
                                          r"\(the same size, other contents\)"):
        _check_same_run(directory, run_fingerprint(cfg))


def test_a_refusal_shows_a_lists_removed_and_added_items_and_where_long_values_differ():
    long = "/data/" + "a-long-directory-name/" * 4
    assert _change("data.train_files", {"data.train_files": [long + "x.jsonl", long + "y.jsonl"]},
                   {"data.train_files": [long + "x.jsonl", long + "z.jsonl"]}) == \
        f'data.train_files: -"{long}y.jsonl" +"{long}z.jsonl"'
    said = _change("model.path", {"model.path": long + "first-model"}, {"model.path": long + "other-model"})
    assert "first-model" in said and "other-model" in said and said.count("…") == 2
    assert _change("data.max_length", {"data.max_length": 64}, {"data.max_length": 128}) == "data.max_length: 64 → 128"


def test_a_checkpoint_past_a_lowered_max_steps_is_said(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path)
    capsys.readouterr()
    P.run_sft(_cfg(run, max_steps=1))
    out = capsys.readouterr().out
    assert "the checkpoint is at step 2, past the 1 step(s) this run plans (train.max_steps=1): nothing is trained" in out
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
