"""Forgetting fixes of stop 33 beyond the walk's pinned tests (tests/test_walkthrough_forgetting.py):
the Fisher's seeded sample of the pool, a non-finite retain loss under max_retain_increase, and the
sft settings retain rows are read with (format auto)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import SFTConfig
from posttrain.config.sections import ForgettingConfig
from posttrain.train import forgetting as fg
from posttrain.train.sft import run_sft

# --------------------------------------------------------------------------- the Fisher's rows


def test_fisher_rows_are_a_seeded_sorted_sample_of_the_whole_pool():
    pool = list(range(60))  # stands for the pool's examples: the sample picks, it does not look inside
    rows = fg.fisher_rows(pool, 16, seed=0)
    assert len(rows) == len(set(rows)) == 16 and rows == sorted(rows)
    assert rows == fg.fisher_rows(pool, 16, seed=0)  # a pure function of the seed: a resume draws the same
    assert rows != fg.fisher_rows(pool, 16, seed=1)
    assert rows != pool[:16] and max(rows) >= 30  # not the head of the file
    assert fg.fisher_rows(pool, 100, seed=0) == pool  # more asked than the pool holds: all of it, in order


def test_the_fisher_rows_are_said_in_the_log(tmp_path, capsys):
    from posttrain.data.synthetic import make_rows

    retain = tmp_path / "retain.jsonl"
    retain.write_text("".join(json.dumps(r) + "\n" for r in make_rows(["copy"], 20, seed=5, side="train", unique=True)))
    run_sft(SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["smallest"], "synthetic_size": 8, "max_length": 64,
                 "eval_fraction": 0.0},
        "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "resume": "never"},
        "forgetting": {"retain_files": [str(retain)], "ewc": 1.0, "fisher_examples": 5}}))
    assert "Fisher on 5 of the 16 pool rows" in capsys.readouterr().out


# --------------------------------------------------------------------------- a non-finite retain loss


def _control(limit: float, start: float, now: float, monkeypatch) -> fg.ForgettingControl:
    control = fg.ForgettingControl(ForgettingConfig(max_retain_increase=limit), None, torch.nn.Linear(2, 2), 0, 1, 0)
    control.start_loss = start
    monkeypatch.setattr(control, "_retain_loss", lambda accelerator: now)
    return control


@pytest.mark.parametrize("now", [math.nan, math.inf])
def test_a_retain_loss_that_is_not_finite_stops_the_run_under_max_retain_increase(monkeypatch, now):
    figures, reason = _control(0.5, 1.0, now, monkeypatch).monitor(None, None)
    assert reason is not None and "not finite" in reason and "max_retain_increase=0.5" in reason
    assert not math.isfinite(figures["retain_loss"])  # logged as it is


def test_a_retain_loss_that_is_not_finite_at_the_start_stops_the_run_too(monkeypatch):
    _, reason = _control(0.5, math.nan, 1.0, monkeypatch).monitor(None, None)
    assert reason is not None and "not finite" in reason


def test_without_max_retain_increase_a_non_finite_retain_loss_is_logged_not_a_stop(monkeypatch):
    figures, reason = _control(0.0, 1.0, math.nan, monkeypatch).monitor(None, None)
    assert reason is None and math.isnan(figures["retain_loss"])


def test_a_finite_rise_keeps_its_rule(monkeypatch):
    assert _control(0.5, 1.0, 1.4, monkeypatch).monitor(None, None)[1] is None
    _, reason = _control(0.5, 1.0, 1.6, monkeypatch).monitor(None, None)
    assert reason.startswith("the retain loss rose 0.6000 above its start (1.0000 -> 1.6000)")


# --------------------------------------------------------------------------- how sft reads retain rows


def test_sft_reads_retain_rows_in_any_format_with_its_template_length_and_bad_row_rules(tmp_path):
    cfg = SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "data": {"train_files": ["train.jsonl"], "format": "alpaca", "template": "chatml", "max_length": 96,
                 "overlength": "drop", "bad_rows": "skip", "max_bad_fraction": 0.2},
        "forgetting": {"retain_files": ["retain.jsonl"]}})
    d = fg.retain_data_config(cfg)
    assert d.format == "auto" and d.train_files == ["retain.jsonl"]
    assert (d.template, d.max_length, d.overlength, d.bad_rows, d.max_bad_fraction) == ("chatml", 96, "drop", "skip", 0.2)
    assert cfg.data.format == "alpaca" and cfg.data.train_files == ["train.jsonl"]  # the stage's own data untouched


def test_sft_reads_retain_files_of_two_formats_each_detected(tmp_path):
    """An alpaca file and a messages file side by side, beside text training rows."""
    from posttrain.data.synthetic import make_rows

    rows = make_rows(["copy"], 12, seed=5, side="train", unique=True)
    alpaca, messages, train = tmp_path / "a.jsonl", tmp_path / "m.jsonl", tmp_path / "train.jsonl"
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows[:6]))
    messages.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                         {"role": "assistant", "content": r["output"]}]}) + "\n"
                                for r in rows[6:]))
    train.write_text("".join(json.dumps({"text": r["instruction"] + " " + r["output"]}) + "\n" for r in rows))
    run_dir = run_sft(SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
        "data": {"train_files": [str(train)], "format": "text", "max_length": 64, "eval_fraction": 0.0},
        "train": {"max_steps": 1, "batch_size": 4, "progress_bar": False, "resume": "never"},
        "forgetting": {"retain_files": [str(alpaca), str(messages)], "retain_exact_match": 2}}))
    summary = json.loads((Path(run_dir) / "summary.json").read_text())
    assert summary["retain_loss_before"] > 0 and "retain_exact_match_before" in summary
