"""Preference data rules pinned at stop 34 (backlog items):

- a preference response (a pair's side, a ranking's answer, a KTO completion) that already ends
  with the chat template's end-of-turn marker is rendered with the marker once, as SFT renders such
  an answer (`templates.strip_end_of_turn`), and the rows are counted in the log and
  data_report.json (`end_of_turn_stripped`);
- responses of a ranking that the length cut (or the template) makes the same tokens under two
  ranks are removed, every copy, and the rest of the ranking trains when two ranks are left — the
  rule reading applies to an answer given under two ranks; counted and named in the report;
- a `.json` file holding JSON Lines ended by lone CRs is read as the .jsonl reader reads it, and
  the rows of a CR-ended JSON array are numbered by their lines.
"""

from __future__ import annotations

import json

import pytest

from posttrain.data.preferences import (
    encode_preference,
    fit_preference_length,
    prepare_preference_data,
    to_preference_record,
)
from posttrain.data.readers import Malformed, iter_rows
from posttrain.data.templates import end_of_turn, resolve_template
from posttrain.errors import DataError
from tests.test_preference_data_edges import _cfg  # the same data-config namespace


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.presets import build_tokenizer

    return build_tokenizer()


def _tokens(example):
    return [(s.input_ids, s.labels) for s in example.sequences]


# --------------------------------------------------------------------------- item 1: the end-of-turn marker


ROWS = {
    "pairs": lambda m: {"prompt": "Copy: a b", "chosen": "a b" + m, "rejected": "b a" + (m and m + "\n")},
    "ranking": lambda m: {"prompt": "Copy: a b", "responses": ["a b" + m, "b a", "a" + m], "ranks": [0, 1, 2]},
    "unpaired": lambda m: {"prompt": "Copy: a b", "completion": "a b" + m, "label": True},
    "message": lambda m: {"prompt": "Copy: a b", "chosen": [{"role": "assistant", "content": "a b" + m}],
                          "rejected": "b a"},
}


@pytest.mark.parametrize("name", ["chatml", "alpaca"])
@pytest.mark.parametrize("kind", list(ROWS))
def test_a_response_ending_in_the_marker_renders_it_once(tokenizer, name, kind):
    template = resolve_template(tokenizer, name)
    marker = end_of_turn(tokenizer, template)
    fmt = "pairs" if kind == "message" else kind
    doubled = encode_preference(to_preference_record(ROWS[kind](marker), fmt, "f:1"), tokenizer, template)
    plain = encode_preference(to_preference_record(ROWS[kind](""), fmt, "f:1"), tokenizer, template)
    assert _tokens(doubled) == _tokens(plain)
    assert all(marker + marker not in tokenizer.decode(s.input_ids) for s in doubled.sequences)


def test_stripped_markers_are_counted_in_the_log_and_data_report(tmp_path, tokenizer):
    marker = end_of_turn(tokenizer, resolve_template(tokenizer, "auto"))
    path, rank_path = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    path.write_text(json.dumps(ROWS["pairs"](marker)) + "\n" + json.dumps(ROWS["pairs"]("") | {"prompt": "q"}) + "\n")
    rank_path.write_text(json.dumps(ROWS["ranking"](marker)) + "\n")
    logged = []
    data = prepare_preference_data(_cfg([str(path), str(rank_path)]), tokenizer, tmp_path / "run", 0,
                                   log=logged.append)
    assert len(data.train) == 3
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train_length"]
    assert report["end_of_turn_stripped"] == 2
    said = [line for line in logged if "end-of-turn marker" in line]
    assert len(said) == 1 and said[0].startswith("train: 2 rows") and f"{path}:1" in said[0]


def test_a_side_that_differs_only_by_the_marker_is_the_other_side(tokenizer):
    template = resolve_template(tokenizer, "chatml")
    record = to_preference_record({"prompt": "q", "chosen": "a<|im_end|>", "rejected": "a"}, "pairs", "f:7")
    kept, report = fit_preference_length([encode_preference(record, tokenizer, template)], 256)
    assert not kept and report["dropped_identical"] == 1 and report["identical_sources"] == ["f:7"]


# --------------------------------------------------------------------------- item 2: collisions after the cut


def _cut_ranking(tokenizer, responses, ranks, source="f:1"):
    from posttrain.train.grouped import first_label

    record = to_preference_record({"prompt": "Copy: a b c d e f", "responses": responses, "ranks": ranks},
                                  "ranking", source)
    example = encode_preference(record, tokenizer, resolve_template(tokenizer, "chatml"))
    return example, first_label(example.sequences[0]) + 3  # keeps "a b" of each long response


def test_responses_made_identical_under_two_ranks_are_removed_and_the_rest_trains(tokenizer):
    example, max_length = _cut_ranking(tokenizer, ["a b c d e f g", "x", "a b c d e f h", "y"], [0, 1, 2, 3])
    kept, report = fit_preference_length([example], max_length)
    assert [e.source for e in kept] == ["f:1"]
    (trimmed,) = kept
    assert trimmed.ranks == [0, 1]
    assert _tokens(trimmed) == [_tokens(example)[1], _tokens(example)[3]]
    assert (report["dropped_identical"], report["removed_identical"], report["dropped_records"]) == (0, 2, 0)
    assert report["identical_sources"] == ["f:1"]
    assert "2 responses removed from 1 rankings" in report["summary"] and "(f:1)" in report["summary"]


def test_a_ranking_left_without_two_ranks_is_still_dropped(tokenizer):
    example, max_length = _cut_ranking(tokenizer, ["a b c d e f g", "a b c d e f h", "x"], [0, 1, 1])
    kept, report = fit_preference_length([example], max_length)
    assert not kept
    assert (report["dropped_identical"], report["removed_identical"], report["identical_sources"]) == (1, 0, ["f:1"])


def test_collisions_under_one_rank_are_kept_once(tokenizer):  # stop 35: one answer, as reading keeps a repeat
    example, max_length = _cut_ranking(tokenizer, ["a b c d e f g", "a b c d e f h", "x"], [0, 0, 1])
    kept, report = fit_preference_length([example], max_length)
    assert len(kept) == 1 and kept[0].ranks == [0, 1]
    assert (report["dropped_identical"], report["removed_identical"], report["identical_sources"]) == (0, 1, ["f:1"])


def test_removed_collisions_reach_the_data_report(tmp_path, tokenizer):
    path = tmp_path / "r.jsonl"
    row = {"prompt": "Copy: a b c d e f", "responses": ["a b c d e f g", "x", "a b c d e f h", "y"]}
    path.write_text(json.dumps(row) + "\n")
    example, max_length = _cut_ranking(tokenizer, row["responses"], [0, 1, 2, 3])
    logged = []
    data = prepare_preference_data(_cfg([str(path)], template="chatml", max_length=max_length), tokenizer,
                                   tmp_path / "run", 0, log=logged.append)
    assert len(data.train) == 1 and data.train[0].ranks == [0, 1]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_length"]["removed_identical"] == 2 and report["train_sequences"] == 2
    assert f"{path}:1" in logged[-1] and "removed" in logged[-1]


# --------------------------------------------------------------------------- item 3: CR-only .json


def _rows(path):
    return [(location.rsplit(":", 1)[1], row) for location, row in iter_rows(str(path))]


def test_a_json_file_of_cr_ended_json_lines_is_read_as_json_lines(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "r", "chosen": "c", "rejected": "d"}]
    body = "\r".join(json.dumps(row) for row in rows)
    lf, cr = tmp_path / "lf.json", tmp_path / "cr.json"
    lf.write_bytes((body.replace("\r", "\n") + "\n\n{bad\n").encode())
    cr.write_bytes((body + "\r\r{bad\r").encode())
    got = _rows(cr)
    assert got == _rows(lf)
    assert [line for line, _ in got] == ["1", "2", "4"] and [row for _, row in got[:2]] == rows
    assert isinstance(got[2][1], Malformed)


@pytest.mark.parametrize("end", ["\r", "\r\n", "\n"])
def test_the_rows_of_a_cr_ended_json_array_are_numbered_by_their_lines(tmp_path, end):
    path = tmp_path / "a.json"
    path.write_bytes(end.join(['[{"prompt": "q", "chosen": "a", "rejected": "b"},', "", " 3,",
                               ' {"prompt": "r",', '  "chosen": "c", "rejected": "d"}]', ""]).encode())
    got = _rows(path)
    assert [line for line, _ in got] == ["1", "3", "4"]
    assert isinstance(got[1][1], Malformed) and got[2][1]["prompt"] == "r"


def test_invalid_json_in_a_cr_ended_file_names_its_line(tmp_path):
    path = tmp_path / "bad.json"
    path.write_bytes(b'[{"prompt": "q"},\r{"prompt": }]\r')
    with pytest.raises(DataError, match=r"bad\.json:2: invalid JSON"):
        list(iter_rows(str(path)))
