"""A paths walk: a user on a shared cluster, where models, data and runs sit in awkward places.

Walked, against the README (Data, Pipelines' **Paths**, the fresh-start and resume rules) and the
readers' docstring: paths with spaces, unicode and `~` in every path setting (data, retain and eval
files, model.path, reward models, attack, constitution, rubric and seed files, compare_to, a pipeline's
output_dir); relative paths in a config file that lives in another directory (read against the working
directory, as the README says, in single commands and pipelines alike; a pipeline's `config:` against
the pipeline file); a symlinked model directory and data file; a model directory nobody may write
into; an output_dir that is a symlink (also a dangling one), one inside the model directory, one equal
to the model's own directory or its run directory, and one holding the data; a directory given as a
data file; a `datasets` save_to_disk directory on a read-only share; a path holding `=` (sweep
directories such as `runs/lr=1e-5`); a FIFO and /dev/null as data files; gzip, bz2, a UTF-8 BOM,
CRLF and empty files (pinned already by test_walkthrough_files, test_s32r2_files, test_data_readers).

What was right: `~` is expanded in every path setting; a symlinked model directory is recorded by its
real path; sft, dpo and rm write nothing into the model directory they start from (a LoRA run
included), nor into a `datasets` directory they read; a run's output_dir may be a symlink to scratch
space, and the run resumes through it; an output_dir inside the model directory resumes (the model's
identity is its own top-level files); a reward model path holding `=` is a path, not NAME=DIR;
/dev/null is refused before the model loads, naming the path.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from posttrain.errors import UserError

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()
ROWS = [{"instruction": f"Say {w}", "output": w} for w in WORDS]


def _jsonl(path: Path, rows=ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(out, model, data: Path, steps: int = 1, **adapter):
    from posttrain import SFTConfig, run_sft

    return run_sft(SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": str(model)}, "adapter": adapter or {"method": "full"},
        "data": {"train_files": [str(data)], "max_length": 32},
        "train": {"max_steps": steps, "progress_bar": False}}))


def _dpo(out, model, **train):
    from posttrain import DPOConfig, run_dpo

    return run_dpo(DPOConfig.from_dict({
        "output_dir": str(out), "model": {"path": str(model)}, "data": {"synthetic_size": 40, "max_length": 32},
        "train": {"max_steps": 1, "progress_bar": False, **train}}))


def _snapshot(directory: Path, top_level_only: bool = False) -> dict[str, tuple[int, int]]:
    files = directory.iterdir() if top_level_only else directory.rglob("*")
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files)
            if p.is_file()}


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished 1-step SFT run of the tiny preset (checkpoints, final/, summary.json), copied by each test."""
    root = tmp_path_factory.mktemp("paths-sft")
    return _sft(root / "sft", "tiny", _jsonl(root / "train.jsonl"))


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("name", ["kept.jsonl", "dropped.jsonl"])
def test_failure_quality_on_a_file_in_its_own_output_dir_keeps_that_file(tmp_path, name):
    """A second quality pass over the first one's kept rows, with stricter filters: `posttrain quality
    data.files=[runs/quality/kept.jsonl]` (output_dir's default is runs/quality). Or the rows a first
    pass dropped, reviewed and fed back in. run_quality unlinks kept*.jsonl and dropped.jsonl in
    output_dir before it reads data.files: the user's input is deleted, then the run stops with
    "kept.jsonl: no such file". Right: read the rows first (or refuse up front); the file is never lost
    unread."""
    from posttrain import QualityConfig, run_quality

    out = tmp_path / "quality"
    given = _jsonl(out / name)
    data = given.read_bytes()
    error = None
    try:
        run_quality(QualityConfig.from_dict({"output_dir": str(out), "data": {"files": [str(given)]}}),
                    log=lambda *_: None)
    except UserError as exc:
        error = exc
    if error is None:  # read, then replaced by this pass's output: the rows were read
        read = json.loads((out / "report.json").read_text())["read"]
        assert read["rows"] == len(ROWS), read
    else:
        assert given.is_file() and given.read_bytes() == data, \
            f"{name} was deleted before it was read; the run said: {error}"


@pytest.mark.parametrize("how", ["checkpoints deleted", "train.resume=never, as the refusal advises"])
def test_failure_a_run_into_its_starting_models_run_directory_keeps_that_model(sft_run, tmp_path, how):
    """`posttrain dpo model.path=$RUN output_dir=$RUN` (one variable for both in a job script). With the
    SFT run's checkpoints deleted to save quota, or with train.resume=never (what the refusal of the
    SFT checkpoint tells the user to set), the fresh start removes $RUN/final — the model the run
    loaded — and writes the DPO model there; config.yaml then names $RUN/final as its own start. The
    SFT model is gone. merge refuses the same thing for an adapter's base. Right: refused up front
    (output_dir holds the model at model.path), the model untouched."""
    run = tmp_path / "run"
    shutil.copytree(sft_run, run)
    weights = run / "final" / "model.safetensors"
    before = _md5(weights)
    train = {}
    if how == "checkpoints deleted":
        shutil.rmtree(run / "checkpoints")
        model = run
    else:
        train = {"resume": "never"}
        model = run / "final"
    error = None
    try:
        _dpo(run, model, **train)
    except UserError as exc:
        error = exc
    after = _md5(weights) if weights.is_file() else "(deleted)"
    assert error is not None and after == before, \
        f"no refusal ({error}); the starting model's weights went {before} -> {after}"


def test_failure_a_run_whose_output_dir_is_the_model_directory_resumes_or_is_refused(sft_run, tmp_path):
    """`model.path=/models/m output_dir=/models/m` with LoRA: the run writes config.yaml, metrics.jsonl,
    params.json, data_report.json and summary.json beside the weights. The resume fingerprint keys on
    the model directory's top-level files, so the same command with more steps is refused: "the model
    at model.path ... changed since the checkpoint (its files)" — no run in that directory can ever
    resume. Right: either refused up front, or the run's own files are not the model's."""
    model = tmp_path / "m"
    shutil.copytree(sft_run / "final", model)
    data = _jsonl(tmp_path / "train.jsonl")
    try:
        _sft(model, model, data, steps=1, method="lora")
    except UserError:
        return  # refused up front: right
    try:
        _sft(model, model, data, steps=2, method="lora")
    except UserError as exc:
        pytest.fail(f"the first run went, its resume was refused: {exc}")
    assert json.loads((model / "summary.json").read_text())["steps"] == 2


def test_failure_a_pipeline_under_a_directory_named_with_an_equals_sign_sees_its_own_stages_outputs(tmp_path):
    """Sweep directories are named `lr=1e-5`, `seed=3`. A pipeline with `output_dir: .../lr=0.1` whose
    sft stage lists the quality stage's `.../lr=0.1/clean/kept.jsonl` is refused before any stage
    runs: "data.train_files: .../lr=0.1/clean/kept.jsonl: no such file or directory". The same pipeline
    under `.../plain` plans both stages. pipeline._reads (and _check_read_files) split every path at
    its last '=', as if it were reward.models' NAME=DIR, so the sft stage is not seen to read the
    clean stage (no dependency: its file is checked as a given one, and a changed clean stage would
    not rerun it)."""
    from posttrain import run_pipeline

    data = _jsonl(tmp_path / "train.jsonl")
    planned = {}
    for label, out in (("plain", tmp_path / "plain"), ("equals", tmp_path / "lr=0.1")):
        pipeline = tmp_path / f"{label}.yaml"
        pipeline.write_text(json.dumps({"output_dir": str(out), "stages": [
            {"name": "clean", "kind": "quality", "overrides": {"data.files": [str(data)]}},
            {"name": "sft", "kind": "sft", "overrides": {"data.train_files": [str(out / "clean" / "kept.jsonl")],
                                                         "train.max_steps": 1}}]}))
        try:
            run_pipeline(pipeline, dry_run=True)
            planned[label] = "planned"
        except UserError as exc:
            planned[label] = str(exc)
    assert planned == {"plain": "planned", "equals": "planned"}, planned


# --------------------------------------------------------------------------- right, and now pinned


def test_training_writes_nothing_into_the_model_directory_it_starts_from(sft_run, tmp_path):
    """A model on a shared, read-only share (root ignores the mode bits, so the files are compared):
    a LoRA SFT run and a DPO run from it leave every file of the model directory as it was, and
    write only into their output_dirs."""
    model = tmp_path / "share" / "m"
    shutil.copytree(sft_run / "final", model)
    before = _snapshot(tmp_path / "share")
    _sft(tmp_path / "runs" / "lora", model, _jsonl(tmp_path / "data" / "train.jsonl"), method="lora")
    _dpo(tmp_path / "runs" / "dpo", model)
    assert _snapshot(tmp_path / "share") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "runs", "share"]


def test_an_output_dir_inside_the_model_directory_resumes(sft_run, tmp_path):
    """output_dir under the model directory (`/models/m/runs/lora`): the model's identity is its own
    top-level files, which the run leaves alone, so the same command with more steps resumes."""
    model = tmp_path / "m"
    shutil.copytree(sft_run / "final", model)
    before = _snapshot(model, top_level_only=True)
    data = _jsonl(tmp_path / "train.jsonl")
    _sft(model / "runs" / "lora", model, data, steps=1, method="lora")
    run = _sft(model / "runs" / "lora", model, data, steps=2, method="lora")
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
    assert _snapshot(model, top_level_only=True) == before


def test_an_output_dir_that_is_a_symlink_writes_through_it_and_resumes(tmp_path):
    """`runs -> /scratch/$USER/runs`: the run's files land in the link's target, the link stays a
    link, and the same command with more steps resumes from the checkpoint found through it."""
    scratch = tmp_path / "scratch" / "sft"
    scratch.mkdir(parents=True)
    link = tmp_path / "run"
    link.symlink_to(scratch, target_is_directory=True)
    data = _jsonl(tmp_path / "train.jsonl")
    _sft(link, "tiny", data, steps=1)
    assert link.is_symlink() and (scratch / "final" / "config.json").is_file()
    _sft(link, "tiny", data, steps=2)
    assert link.is_symlink()
    assert json.loads((scratch / "summary.json").read_text())["steps"] == 2
    assert [p.name for p in (scratch / "checkpoints").iterdir()] != []
