"""Stop 30, the operator's walk (batch jobs): the parts of its fixes that test_walkthrough_operator.py
reaches only through whole commands — the full-disk error's wording and what a failed checkpoint
leaves, progress lines in a log file, the pipeline's up-front file check under --dry-run, the
exit codes in --help. Fast: no model is trained."""

from __future__ import annotations

import errno
import io
import re

import pytest
import torch
import yaml

from posttrain import cli
from posttrain.console import Progress
from posttrain.errors import NoRoom, UserError
from posttrain.train import checkpoint
from posttrain.train.metrics import RunLogger


def test_no_room_names_the_path_for_each_errno_and_reads_safetensors_text():
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        found = NoRoom.of(OSError(code, "reason", "/out/file"))
        assert isinstance(found, UserError) and found.exit_code == 2 and str(found).startswith("cannot write /out/file")
    assert NoRoom.of(OSError(errno.EACCES, "Permission denied", "/x")) is None  # not a full disk: a traceback
    assert NoRoom.of(ValueError("(os error 28)")) is None  # only safetensors' error is read by its text

    class SafetensorError(Exception):
        pass

    found = NoRoom.of(SafetensorError("Error while serializing: I/O error: File too large (os error 27)"), "/ck")
    assert str(found).startswith("cannot write /ck: File too large;")


def test_a_checkpoint_that_does_not_fit_leaves_no_partial_directory_and_names_itself(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_file", full)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(NoRoom, match=r"step-0000003: No space left on device"):
        checkpoint.save(tmp_path, 3, model=model, optimizer=optimizer, loop_state={"step": 3}, rank=0,
                        world_size=1, barrier=lambda: None, keep_last=2)
    assert list(tmp_path.iterdir()) == []  # no .tmp-step-0000003 holding the space


def test_training_progress_off_a_terminal_is_a_plain_line_at_most_every_10_s(tmp_path, monkeypatch):
    stderr = io.StringIO()  # not a terminal
    monkeypatch.setattr("sys.stderr", stderr)
    log = RunLogger(tmp_path, enabled=True, total_steps=3, progress_bar=True)
    assert log.bar is None
    for step in (1, 2, 3):  # within 10 s: only the last step's line
        log.advance({"step": step, "loss": 1.5, "lr": 1e-3})
    log.close()
    lines = stderr.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: step 3/3 (") and "loss 1.5000" in lines[0]
    assert "\r" not in stderr.getvalue() and "\x1b" not in stderr.getvalue()


def test_progress_redraws_in_place_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = Progress(2, "redteam", stream)
    progress.update(2, failed=1)
    progress.close()
    assert stream.getvalue().startswith("\rredteam 2/2 (") and stream.getvalue().endswith(", 1 failed)\x1b[K\n")


def test_a_dry_run_refuses_a_later_stages_missing_file_but_not_an_earlier_stages_output(tmp_path, capsys):
    missing = tmp_path / "typo.jsonl"
    stages = [{"name": "clean", "kind": "quality", "overrides": {"data.files": ["examples/data/quality_dirty.jsonl"]}},
              {"name": "sft", "kind": "sft", "inputs": {"data.train_files": "clean"}},  # not there yet: fine
              {"name": "rl", "kind": "grpo", "overrides": {"data.train_files": [str(missing)]}}]
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": stages}))
    assert cli.main(["pipeline", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: stage rl: data.train_files: {missing}: no such file or directory"), err
    stages[2]["overrides"] = {}
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": stages}))
    assert cli.main(["pipeline", str(path), "--dry-run"]) == 0


def test_help_lists_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    shown = capsys.readouterr().out.split("exit codes")[1]
    assert re.findall(r"^  (\d+) ", shown, re.M) == ["0", "2", "3", "130", "141", "1"] and "; 143 terminated" in shown
