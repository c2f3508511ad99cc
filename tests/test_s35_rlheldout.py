"""RL prompt data's held-out side (`data.prompts.prepare_prompts`), stop 35 backlog items from the
RL-epochs walk.

Pinned: a held-out file's prompt that is also a training prompt (the same turns, by
`preferences.prompt_key`, whatever key the row gives it under) is dropped from the held-out side,
logged and counted in the report (`eval_also_trained`); held-out files of training prompts only
are refused. A prompt file whose rows all share one prompt holds nothing out and says so, with
SFT's and the preference stages' line. Prompts `data.eval_fraction` holds out while
`eval.prompts=0` scores none are said once, and the split is the same as with scoring on (a
resume may change `eval.*`, so the training prompts must not depend on it).
"""

from __future__ import annotations

import json

import pytest

from posttrain.config import GRPOConfig
from posttrain.data.prompts import prepare_prompts
from posttrain.errors import DataError


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _data(*overrides):
    return GRPOConfig.load(None, list(overrides)).data


def _texts(records):
    return [r.prompt[-1]["content"] for r in records]


def test_a_held_out_file_prompt_also_trained_is_dropped_and_counted(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)])
    held = _write(tmp_path / "eval.jsonl", [{"question": f"q{i}", "answer": "x"} for i in range(7, 13)])
    logs = []
    cfg = _data(f"data.train_files=[{train}]", f"data.eval_files=[{held}]")
    kept, held_out, report = prepare_prompts(cfg, None, 0, logs.append)
    assert _texts(held_out) == ["q10", "q11", "q12"]  # before: q7 … q12, three of them trained on
    assert len(kept) == 10
    assert report["eval_also_trained"]["dropped"] == 3
    assert report["eval_also_trained"]["sources"][0].endswith("eval.jsonl:1")
    assert any("3 of the 6 held-out prompts are also training prompts" in line for line in logs)


def test_a_held_out_file_with_a_synthetic_training_prompt_drops_it(tmp_path):
    cfg = _data("data.synthetic_size=20", "data.eval_fraction=0")
    trained, _, _ = prepare_prompts(cfg, None, 0, lambda _: None)
    held = _write(tmp_path / "eval.jsonl", [{"prompt": _texts(trained)[0], "answer": "a"},
                                            {"prompt": "not a training prompt", "answer": "a"}])
    _, held_out, report = prepare_prompts(_data("data.synthetic_size=20", f"data.eval_files=[{held}]"), None, 0,
                                          lambda _: None)
    assert _texts(held_out) == ["not a training prompt"]
    assert report["eval_also_trained"]["dropped"] == 1


def test_held_out_files_of_training_prompts_only_are_refused(tmp_path):
    train = _write(tmp_path / "train.jsonl", [{"prompt": f"q{i}"} for i in range(4)])
    held = _write(tmp_path / "eval.jsonl", [{"prompt": "q1"}, {"prompt": "q2"}])
    with pytest.raises(DataError, match="every one of the 2 held-out prompts is also a training prompt"):
        prepare_prompts(_data(f"data.train_files=[{train}]", f"data.eval_files=[{held}]"), None, 0, lambda _: None)


def test_rows_sharing_one_prompt_say_none_is_held_out(tmp_path):
    same = _write(tmp_path / "same.jsonl", [{"prompt": "q", "answer": str(i)} for i in range(6)])
    logs = []
    kept, held_out, _ = prepare_prompts(_data(f"data.train_files=[{same}]"), None, 0, logs.append)
    assert (len(kept), len(held_out)) == (6, 0)
    assert any("all 6 training rows share one prompt, so none is held out" in line for line in logs)


def test_held_out_prompts_unscored_under_eval_prompts_zero_are_said_and_the_split_kept(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(20)])
    cfg = _data(f"data.train_files=[{path}]", "data.eval_fraction=0.2")
    logs = []
    off = prepare_prompts(cfg, None, 0, logs.append, eval_prompts=0)
    on = prepare_prompts(cfg, None, 0, lambda _: None, eval_prompts=100)
    assert _texts(off[0]) == _texts(on[0]) and len(off[1]) == 4  # the split does not depend on eval.prompts
    said = [line for line in logs if "eval.prompts=0" in line]
    assert len(said) == 1 and "4 held-out prompts" in said[0] and "neither trained on nor scored" in said[0]
    quiet = []
    prepare_prompts(cfg, None, 0, quiet.append, eval_prompts=100)
    assert not [line for line in quiet if "eval.prompts" in line]
