"""A fresh start (train.resume=never, or auto with no checkpoint) over an earlier run's directory:
the earlier run stays whole until the new run's first step (its config.yaml held back), then every
result of the earlier run goes, whatever stage wrote it (`runs.EARLIER_RESULTS`: PPO's value model,
the rollouts' samples, the pipeline's merged/), and so do its reports the new run did not write
again (a rejects file of a split the new run does not read). The rejects writer removes a stale
rejects file under bad_rows=error."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import posttrain as P
from posttrain.data.formats import load_records
from tests.test_walkthrough_docstruth import _alpaca

def _cfg(out: Path, data_file: Path, **data) -> P.SFTConfig:
    return P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny-2l"},
        "data": {"train_files": [str(data_file)], "format": "alpaca", "eval_fraction": 0.0, "max_length": 64, **data},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "progress_bar": False, "resume": "never"}})


def test_a_fresh_run_removes_every_stages_results_and_the_reports_it_did_not_write(tmp_path, capsys):
    """An earlier run's PPO value model, GRPO/PPO samples, the pipeline's merged/ and a
    rejects-eval.jsonl (a split the new run does not read) go at the new run's first step, said in
    one line; the new run's own rejects-train.jsonl (bad_rows=skip, one bad row) stays."""
    run, data = tmp_path / "run", _alpaca(tmp_path / "rows.jsonl")
    P.run_sft(_cfg(run, data))
    earlier = {"value_model.safetensors": "v", "samples.jsonl": '{"epoch": 0, "rollout": 0}\n',
               "rejects-eval.jsonl": '{"location": "old.jsonl:3"}\n', "merged/config.json": "{}"}
    for name, text in earlier.items():
        (run / name).parent.mkdir(exist_ok=True)
        (run / name).write_text(text, encoding="utf-8")
    capsys.readouterr()
    dirty = _alpaca(tmp_path / "dirty.jsonl", extra='{"instruction": "cut short"\n')
    P.run_sft(_cfg(run, dirty, bad_rows="skip", max_bad_fraction=0.5))
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("fresh start: removed")]
    assert len(said) == 1, said
    for name in ("value_model.safetensors", "samples.jsonl", "rejects-eval.jsonl", "merged/"):
        assert name in said[0], (name, said[0])
        assert not (run / name.rstrip("/")).exists(), name
    assert "rejects-train.jsonl" not in said[0]
    assert (run / "rejects-train.jsonl").read_text(encoding="utf-8").count("\n") == 1  # this run's own
    assert (run / "final").is_dir() and (run / "summary.json").is_file()


def test_a_fresh_run_stopped_before_its_first_step_leaves_the_earlier_run_whole(tmp_path):
    """Refused once the model loads (data.max_length past the model's positions): config.yaml is
    still the earlier run's, beside its final/, summary.json and checkpoint; a fresh run that then
    trains writes its own config.yaml and leaves no earlier result."""
    from posttrain.errors import UserError
    from posttrain.train import runs

    run, data = tmp_path / "run", _alpaca(tmp_path / "rows.jsonl")
    P.run_sft(_cfg(run, data))
    summary = (run / "summary.json").read_text(encoding="utf-8")
    with pytest.raises(UserError, match="max_length"):
        P.run_sft(_cfg(run, data, max_length=5000))
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data"]["max_length"] == 64
    assert (run / "summary.json").read_text(encoding="utf-8") == summary
    assert (run / "final").is_dir() and any((run / "checkpoints").iterdir())
    assert [p.name for p in run.glob("config.yaml*")] == ["config.yaml"], "no held config file is left on disk"
    assert run.resolve() not in runs._FRESH, "the failed run's held config is dropped with its lock"
    P.run_sft(_cfg(run, data, max_length=48))
    assert yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))["data"]["max_length"] == 48


def test_a_new_run_directory_gets_its_config_at_once(tmp_path):
    """Nothing earlier to keep whole: config.yaml is written by start_run, as before."""
    from posttrain.train.runs import release_run_dir, start_run

    run_dir = start_run(_cfg(tmp_path / "run", _alpaca(tmp_path / "rows.jsonl")))[0]
    try:
        assert (run_dir / "config.yaml").is_file()
    finally:
        release_run_dir(run_dir)


def test_the_rejects_writer_leaves_no_stale_file(tmp_path):
    """bad_rows=error removes an earlier reading's rejects file; skip with no bad row leaves it empty."""
    data, rejects = _alpaca(tmp_path / "rows.jsonl"), tmp_path / "rejects-train.jsonl"
    rejects.write_text('{"location": "other.jsonl:1"}\n', encoding="utf-8")
    _, report = load_records([str(data)], fmt="alpaca", bad_rows="error", rejects_path=str(rejects), log=lambda _: None)
    assert not rejects.exists() and report.rejects_path is None
    rejects.write_text('{"location": "other.jsonl:1"}\n', encoding="utf-8")
    _, report = load_records([str(data)], fmt="alpaca", bad_rows="skip", rejects_path=str(rejects), log=lambda _: None)
    assert rejects.read_text(encoding="utf-8") == "" and report.rejects_path == str(rejects)
