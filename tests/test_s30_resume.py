"""Resume checks beside the pinned walkthrough ones: an older checkpoint's digest still resumes,
a stage monitor's stop stands whatever the patience, and final/ is swapped whole."""

from __future__ import annotations

import json

import pytest

import posttrain as P
from posttrain.errors import ConfigError
from posttrain.train import checkpoint
from posttrain.train.loop import _stopped_before
from posttrain.train.runs import _check_same_run, _legacy_digest, run_fingerprint


def _checkpoint(tmp_path, fingerprint, name="step-0000001"):
    directory = tmp_path / name
    directory.mkdir()
    (directory / "loop_state.json").write_text(json.dumps({"step": 1, "fingerprint": fingerprint}))
    return directory


def test_an_older_checkpoints_digest_resumes_when_the_sections_match(tmp_path):
    cfg = P.SFTConfig.from_dict({"output_dir": "x", "model": {"path": "tiny"}})
    now = run_fingerprint(cfg)
    _check_same_run(_checkpoint(tmp_path, _legacy_digest(now)), now)  # no error
    with pytest.raises(ConfigError, match="other settings"):
        _check_same_run(_checkpoint(tmp_path, "0123456789abcdef", "step-0000002"), now)


def test_a_refusal_names_each_changed_setting_in_one_line(tmp_path):
    saved = {"data.max_length": 64, "train.seed": 0, "model.path": "tiny"}
    with pytest.raises(ConfigError) as info:
        _check_same_run(_checkpoint(tmp_path, saved), saved | {"data.max_length": 32, "train.seed": 3})
    message = str(info.value)
    assert "data.max_length: 64 → 32" in message and "train.seed: 0 → 3" in message and "\n" not in message
    assert "train.resume=never" in message


@pytest.mark.parametrize("state, patience, stopped", [
    ({"stopped_early": True, "evals_without_improvement": 1}, 4, False),  # patience raised: trains on
    ({"stopped_early": True, "evals_without_improvement": 2}, 2, True),   # the same patience: still stopped
    ({"stopped_early": True, "evals_without_improvement": 1}, 0, False),  # early stopping turned off
    ({"stopped_early": True, "evals_without_improvement": 0, "stop_reason": "forgetting"}, 9, True),  # a monitor's
    ({"stopped_early": False, "evals_without_improvement": 5}, 1, False),
])
def test_a_resumed_early_stop_is_judged_with_the_new_patience(state, patience, stopped):
    assert _stopped_before(state, patience) is stopped


def test_a_writer_killed_inside_final_leaves_the_old_final_whole(tmp_path):
    final = tmp_path / "final"
    checkpoint.write_whole(final, lambda d: (d / "a.txt").write_text("old"))

    def killed(directory):
        (directory / "b.txt").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_whole(final, killed)
    assert sorted(p.name for p in final.iterdir()) == ["a.txt"]
    checkpoint.write_whole(final, lambda d: (d / "c.txt").write_text("new"))
    assert sorted(p.name for p in final.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # nothing left beside it
