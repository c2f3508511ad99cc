"""Fixtures more than one test module shares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

_DURATIONS = Path(__file__).with_name("durations.json")  # seconds per file: scripts/test_durations.py


def pytest_collection_modifyitems(session, config, items):
    """The longest test files first. pytest-xdist's `--dist loadfile` (scripts/test.sh) hands whole
    files to the workers in collection order; a long file collected last would leave the other
    workers idle while it runs. Files not measured yet go last; the order within a file is kept."""
    if not _DURATIONS.is_file():
        return
    seconds = json.loads(_DURATIONS.read_text())
    items.sort(key=lambda item: -seconds.get(item.nodeid.split("::")[0], 0.0))  # stable


@pytest.fixture(scope="session")
def weak_sft_model(tmp_path_factory):
    """The RL outcome tests' start: the tiny preset after 33 SFT steps on "smallest letter"
    (66% greedy exact match on 200 held-out prompts; 50 steps gave ~63% until the synthetic
    data's held-out partition changed which examples train, then 81.5%). Trained once per session."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    out = tmp_path_factory.mktemp("weak-sft")
    return run_sft(SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"},
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["smallest"], "synthetic_size": 6000,
                 "eval_fraction": 0.05, "max_length": 64},
        "train": {"max_steps": 33, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
                  "progress_bar": False, "log_every": 50}})) / "final"
