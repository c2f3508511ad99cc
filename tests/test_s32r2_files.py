"""Stop 32 (files walk): behaviour added beside the pinned walkthrough tests — `~` in every reader
path, one file as both training and held-out data refused in every stage's validation, JSON Lines
in a .json file told from a pretty-printed document, and wide-Unicode files named by their mark."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from posttrain.config import (
    DPOConfig,
    GRPOConfig,
    PPOConfig,
    RMConfig,
    SFTConfig,
    validate_dpo,
    validate_grpo,
    validate_ppo,
    validate_rm,
    validate_sft,
)
from posttrain.data.readers import Malformed, check_path, iter_rows
from posttrain.errors import ConfigError, DataError

STAGES = [(SFTConfig, validate_sft), (DPOConfig, validate_dpo), (RMConfig, validate_rm),
          (GRPOConfig, validate_grpo), (PPOConfig, validate_ppo)]


def _rows(path, n=3):
    path.write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(n)))
    return path


def test_a_home_relative_path_is_read_and_checked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    _rows(tmp_path / "a.jsonl")
    assert check_path("~/a.jsonl") == "jsonl"
    assert [loc for loc, _ in iter_rows("~/a.jsonl")] == [f"{tmp_path}/a.jsonl:{n}" for n in (1, 2, 3)]
    with pytest.raises(DataError, match="no such file"):
        check_path("~/missing.jsonl")


@pytest.mark.parametrize("stage, validate", STAGES, ids=[c.__name__ for c, _ in STAGES])
def test_one_file_as_training_and_held_out_data_is_refused_in_every_stage(tmp_path, monkeypatch, stage, validate):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    path = _rows(tmp_path / "a.jsonl")
    os.symlink(path, tmp_path / "link.jsonl")
    other = _rows(tmp_path / "b.jsonl")
    for spelling in (str(path), "~/a.jsonl", "a.jsonl", "./link.jsonl"):
        cfg = stage.from_dict({"output_dir": str(tmp_path / "run"),
                               "data": {"train_files": [str(path)], "eval_files": [str(other), spelling]}})
        with pytest.raises(ConfigError, match="both list") as caught:
            validate(cfg)
        assert spelling in str(caught.value) and str(other) not in str(caught.value)


def test_synthetic_in_both_lists_is_not_a_shared_file(tmp_path):
    other = _rows(tmp_path / "b.jsonl")
    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"),
                               "data": {"train_files": ["synthetic"], "eval_files": [str(other)]}})
    validate_sft(cfg)


def test_a_pretty_printed_json_document_is_not_read_as_json_lines(tmp_path):
    """Its inner lines parse alone as objects, and its first line does not: still one document."""
    path = tmp_path / "rows.json"
    path.write_text('{"data": [\n{"text": "a"}\n, {"text": "b"}\n]}\n')
    assert [(loc, row) for loc, row in iter_rows(str(path))] == [(f"{path}:2", {"text": "a"}),
                                                                 (f"{path}:3", {"text": "b"})]
    broken = tmp_path / "broken.json"  # a broken document is refused whole at its line, not read as rows
    broken.write_text('{"data": [\n{"text": "a"}\n{"text": "b"}\n]}\n')
    with pytest.raises(DataError, match=f"{broken}:3: invalid JSON"):
        list(iter_rows(str(broken)))


def test_json_lines_in_a_json_file_with_a_bad_first_line_and_blank_lines(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text('\n{"text": "a" "b"}\r\n\r\n' + json.dumps({"text": "c"}) + "\r\n")
    rows = list(iter_rows(str(path)))
    assert [loc for loc, _ in rows] == [f"{path}:2", f"{path}:4"]
    assert isinstance(rows[0][1], Malformed) and rows[1][1] == {"text": "c"}


@pytest.mark.parametrize("encoding, mark", [("utf-16-be", "FE FF"), ("utf-32", "FF FE 00 00"),
                                            ("utf-32-be", "00 00 FE FF")])
@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".jsonl.gz"])
def test_a_wide_unicode_file_is_named_by_its_byte_order_mark(tmp_path, encoding, mark, suffix):
    data = ("\ufeff" + json.dumps({"text": "hi"}) + "\n").encode(encoding)
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(gzip.compress(data) if suffix.endswith(".gz") else data)
    name = "UTF-32" if "32" in encoding else "UTF-16"
    with pytest.raises(DataError) as caught:
        list(iter_rows(str(path)))
    assert str(caught.value) == f"{path}: {name} text (byte-order mark {mark}); save it as UTF-8"


def test_a_utf8_byte_order_mark_is_still_read(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufefftext\nhello\n".encode())
    assert [row for _, row in iter_rows(str(path))] == [{"text": "hello"}]


def test_files_in_both_names_entries_as_given(tmp_path, monkeypatch):
    from posttrain.data.readers import files_in_both

    monkeypatch.chdir(tmp_path)
    assert files_in_both(["a.jsonl", "synthetic", "b.jsonl"], [str(tmp_path / "a.jsonl"), "synthetic"]) == ["a.jsonl"]
    assert files_in_both([], ["a.jsonl"]) == [] and files_in_both(["a.jsonl"], []) == []
