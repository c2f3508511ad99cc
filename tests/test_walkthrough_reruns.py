"""A reruns walk: a user, or a job scheduler, runs things twice. Walked on the tiny preset with 1-2 step runs:
the same `posttrain sft` command run again after it finished; a second run started on an output_dir while the
first is still writing it (the first held mid-step in a thread, the second run from the main thread); a finished
SFT run's directory given to `posttrain dpo` as its output_dir, with the default `train.resume=auto` and with the
`train.resume=never` that the refusal suggests, from another model and from that SFT run itself; a pipeline
rerun after a failed stage; `posttrain score --output` onto its own input and rerun; `posttrain quality` run
again into its report directory, on other rows and on the kept rows of its first pass; rlaif / constitutional
resumed with a changed setting (read in feedback/jobs.py and feedback/rlaif.py beside their tests).

What was right: a DPO run aimed at an SFT run's directory is refused before it removes anything (the checkpoint's
settings differ) and the SFT run is left whole; score onto its own input adds the column through OUTPUT.partial,
and the same command again refuses to overwrite the column and leaves the file as it was (pinned in
test_config_and_scoring_edges.py); a finished run rerun trains nothing and keeps its figures (test_loop.py,
test_resume_and_outputs.py); a failed pipeline stage's rerun skips the finished stages
(test_pipeline_inference_edges.py); the data commands lock their logs against a second writer and refuse a
resume under other result settings (test_feedback_jobs.py, test_constitutional.py).

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34: each
asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
import torch

import posttrain as P
from posttrain.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress_bar": False}


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _sft(out: Path, **train) -> P.SFTConfig:
    return P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_size": 42, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, **QUIET, **train}})


def _dpo(out: Path, model, **train) -> P.DPOConfig:
    return P.DPOConfig.from_dict({
        "output_dir": str(out), "model": {"path": str(model)},
        "data": {"train_files": ["synthetic"], "synthetic_size": 42, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, **QUIET, **train}})


def _weights(final: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(final / "model.safetensors"))


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip() and "loss" in json.loads(line)]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished 1-step SFT run (each test works on a copy)."""
    return P.run_sft(_sft(tmp_path_factory.mktemp("reruns") / "sft"))


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# --------------------------------------------------------------------------- training runs


def test_a_dpo_run_aimed_at_an_sft_runs_directory_is_refused_and_the_sft_run_is_left_whole(sft_run, tmp_path):
    """`posttrain dpo ... output_dir=runs/sft` (a finished SFT run's directory, the policy from elsewhere) with
    the default train.resume=auto: refused before anything is removed, naming the way out."""
    run = _copy(sft_run, tmp_path / "sft")
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(UserError, match="train.resume=never"):
        P.run_dpo(_dpo(run, "tiny"))
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_a_dpo_run_into_the_sft_run_it_starts_from_is_refused_before_its_model_is_removed(sft_run, tmp_path):
    """`posttrain dpo model.path=runs/sft output_dir=runs/sft` is refused under resume=auto ("the model at
    model.path changed since the checkpoint ... Set train.resume=never to start afresh"). Following that advice
    trains DPO over the SFT run: its fresh start removes final/, the starting model and DPO's reference, and
    config.yaml then names `runs/sft/final` as the starting model, which now holds the DPO policy. `posttrain
    merge` refuses the analogous OUT_DIR (the adapter's own base); a training stage should refuse an output_dir
    that is, or holds, its model.path before it removes anything."""
    run = _copy(sft_run, tmp_path / "sft")
    sft_weights = _weights(run / "final")
    try:
        P.run_dpo(_dpo(run, run, resume="never"))
        refused = None
    except UserError as exc:
        refused = exc
    kept = _same_weights(_weights(run / "final"), sft_weights)
    config = (run / "config.yaml").read_text()
    assert refused is not None and kept, (
        f"not refused: {run}/final replaced by the DPO policy (SFT weights kept: {kept}); config.yaml now says "
        f"{[line.strip() for line in config.splitlines() if line.strip().startswith('path:')][:1]}")


def test_a_second_training_run_on_an_output_dir_that_a_live_run_is_writing_is_refused(tmp_path, monkeypatch):
    """A scheduler relaunches a job whose first copy still runs (a missed heartbeat, a duplicated submit). The
    data commands refuse this ("raw.jsonl is being written by another run", feedback/jobs.py's flock); the
    training loop has no such guard. Measured: run B (max_steps=3) resumes from run A's step-1 checkpoint while
    A is inside step 2, finishes; A then finishes too: metrics.jsonl holds steps 1, 2, 3, 2 (two step-2 lines
    with different lr), summary.json and final/ are A's 2-step model, and checkpoints/ holds B's step 3, which a
    later resume would start from. B's result is gone without a word."""
    import posttrain.train.loop as loop

    real = loop._train_step
    reached, release = threading.Event(), threading.Event()

    def held(module, stage, micro, accelerator, cfg, inactive=(), step=0):
        if threading.current_thread().name == "first-run" and step == 1:  # inside step 2, checkpoint 1 written
            reached.set()
            release.wait(60)
        return real(module, stage, micro, accelerator, cfg, inactive, step)

    monkeypatch.setattr(loop, "_train_step", held)
    run, errors = tmp_path / "run", []

    def first() -> None:
        try:
            P.run_sft(_sft(run, max_steps=2, save_every=1))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=first, name="first-run")
    thread.start()
    refused = None
    try:
        assert reached.wait(60), "the first run never reached its second step"
        try:
            P.run_sft(_sft(run, max_steps=3, save_every=1))
        except UserError as exc:
            refused = exc
    finally:
        release.set()
        thread.join(60)
    assert not errors, errors
    summary = json.loads((run / "summary.json").read_text())
    assert refused is not None, (
        f"the second run was not refused: metrics.jsonl steps {_steps(run)}, summary.json steps {summary['steps']}, "
        f"checkpoints {sorted(p.name for p in (run / 'checkpoints').iterdir())}")
    assert _steps(run) == [1, 2] and summary["steps"] == 2


# --------------------------------------------------------------------------- posttrain quality run again


ROWS = [{"instruction": f"Copy: {a} {b} {c}", "output": f"{a} {b} {c}"}
        for a, b, c in zip("abcdefgh", "qrstuvwx", "ijklmnop")]


def _quality(out: Path, files: list[Path]) -> Path:
    return P.run_quality(P.QualityConfig.from_dict({"output_dir": str(out), "data": {"files": [str(f) for f in files]}}),
                         log=lambda line: None)


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return path


def test_a_second_quality_pass_on_its_own_kept_rows_in_the_same_directory_keeps_them(tmp_path):
    """A second, stricter pass over what the first kept: `posttrain quality data.files=[runs/quality/kept.jsonl]`
    with the same output_dir. run_quality removes `kept*.jsonl` and its other outputs before it reads its data
    files, so the input goes first: measured, DataError "kept.jsonl: no such file", and the directory is left
    with config.yaml and an empty rejects.jsonl: the first pass's 8 kept rows, dropped.jsonl and report are gone.
    Right: read the rows first (then replace), or refuse up front, naming the data file that is an output."""
    out = tmp_path / "quality"
    _quality(out, [_data(tmp_path)])
    kept = out / "kept.jsonl"
    first = kept.read_text()
    assert len(first.splitlines()) == len(ROWS)
    try:
        _quality(out, [kept])
        error = None
    except UserError as exc:
        error = exc
    left = sorted(p.name for p in out.iterdir())
    assert kept.is_file() and kept.read_text() == first, (
        f"the first pass's kept rows are gone (error: {error}); {out} holds {left}")


def test_quality_run_again_removes_only_its_own_earlier_outputs(tmp_path):
    """README, Training-data quality: "Outputs in output_dir (an earlier run's are removed first)": kept.jsonl
    or kept-FORMAT.jsonl (one per format). The sweep is the glob `kept*.jsonl`, so a copy the user kept there
    of a first pass's rows under another name (kept-v1.jsonl, kept_backup.jsonl) is deleted, with no line
    saying so. Right: remove kept.jsonl and kept-<format>.jsonl for the formats quality writes, nothing else."""
    out = tmp_path / "quality"
    data = _data(tmp_path)
    _quality(out, [data])
    saved = [out / "kept-v1.jsonl", out / "kept_backup.jsonl"]
    for path in saved:
        shutil.copyfile(out / "kept.jsonl", path)
    _quality(out, [data])
    gone = [p.name for p in saved if not p.is_file()]
    assert not gone, f"removed by the second run though quality never wrote them: {gone}"
