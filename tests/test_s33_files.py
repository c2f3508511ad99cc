"""Stop 33 (files backlog): a file listed twice in one list of data files is found by any spelling
(and refused in every stage's validation); a JSON Lines file with old-Mac CR-only line endings is
read as one row a line; a NUL character is a bad row with its file:line in every file type; and a
TSV cell whose quotes do not parse as CSV quoting costs that line at most, never the whole file."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from posttrain.data.readers import Malformed, files_listed_twice, iter_rows
from posttrain.errors import ConfigError
from tests.test_s32r2_files import STAGES, _rows



def _read(path):
    return [(loc.rsplit(":", 1)[1], row) for loc, row in iter_rows(str(path))]


# --------------------------------------------------------------------------- one file listed twice


def test_a_file_listed_twice_is_found_by_any_spelling(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    _rows(tmp_path / "a.jsonl")
    _rows(tmp_path / "b.jsonl")
    os.symlink(tmp_path / "a.jsonl", tmp_path / "link.jsonl")
    listed = ["a.jsonl", "b.jsonl", "./a.jsonl", "~/a.jsonl", "link.jsonl", str(tmp_path / "b.jsonl")]
    assert files_listed_twice(listed) == ["./a.jsonl", "~/a.jsonl", "link.jsonl", str(tmp_path / "b.jsonl")]
    assert files_listed_twice(["a.jsonl", "b.jsonl"]) == [] and files_listed_twice([]) == []
    assert files_listed_twice(["synthetic"]) == []


@pytest.mark.parametrize("stage, validate", STAGES, ids=[c.__name__ for c, _ in STAGES])
def test_a_training_file_listed_twice_is_refused_in_every_stage(tmp_path, monkeypatch, stage, validate):
    """Listed twice, its rows would count twice, and a held-out split would put copies on both sides."""
    monkeypatch.chdir(tmp_path)
    _rows(tmp_path / "a.jsonl")
    for key in ("train_files", "eval_files"):
        data = {"train_files": [str(_rows(tmp_path / "t.jsonl"))], key: ["a.jsonl", "./a.jsonl"]}
        cfg = stage.from_dict({"output_dir": str(tmp_path / "run"), "data": data})
        with pytest.raises(ConfigError, match=f"data.{key} lists .*twice") as caught:
            validate(cfg)
        assert "./a.jsonl" in str(caught.value)


# --------------------------------------------------------------------------- CR-only line endings


def test_cr_only_line_endings_are_one_row_a_line(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b'{"text": "a"}\r{"text": "b"\r\r{"text": "c"}\r')
    rows = _read(path)
    assert [n for n, _ in rows] == ["1", "2", "4"], rows  # was one bad row, at line 1
    assert rows[0][1] == {"text": "a"} and isinstance(rows[1][1], Malformed) and rows[2][1] == {"text": "c"}


def test_cr_only_endings_across_read_chunks(tmp_path):
    from posttrain.data import readers

    path = tmp_path / "mac.jsonl.gz"
    import gzip

    lines = [json.dumps({"text": "x" * (i * 37 % 300)}) for i in range(2000)]
    path.write_bytes(gzip.compress("\r".join(lines).encode()))  # no final CR
    rows = list(readers.iter_rows(str(path)))
    assert [row for _, row in rows] == [json.loads(line) for line in lines]
    assert rows[-1][0] == f"{path}:2000"


def test_a_stray_cr_inside_a_newline_ended_line_does_not_split_it(tmp_path):
    path = tmp_path / "unix.jsonl"
    path.write_bytes(b'{"text": "a"}\r\n{"text": "b\rc"}\n{"text": "d"}\n')
    rows = _read(path)
    assert [n for n, _ in rows] == ["1", "2", "3"]
    assert rows[0][1] == {"text": "a"} and isinstance(rows[1][1], Malformed) and rows[2][1] == {"text": "d"}


# --------------------------------------------------------------------------- NUL characters


def _nul_files(tmp_path):
    files = {
        "jsonl raw": (b'{"text": "ok"}\n{"text": "a\x00b"}\n', ".jsonl"),
        "jsonl escaped": (b'{"text": "ok"}\n{"text": "a\\u0000b"}\n', ".jsonl"),
        "json": (b'[{"text": "ok"},\n{"text": "a\\u0000b"}]\n', ".json"),
        "csv": (b'text\nok\na\x00b\n', ".csv"),
        "tsv": (b'text\nok\na\x00b\n', ".tsv"),
    }
    paths = {}
    for name, (data, suffix) in files.items():
        paths[name] = tmp_path / (name.replace(" ", "_") + suffix)
        paths[name].write_bytes(data)
    paths["parquet"] = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"text": ["ok", "a\x00b"]}), paths["parquet"])
    return paths


def test_a_nul_character_is_a_bad_row_in_every_file_type(tmp_path):
    for name, path in _nul_files(tmp_path).items():
        rows = list(iter_rows(str(path)))
        assert rows[0][1] == {"text": "ok"}, name
        location, row = rows[1]
        assert isinstance(row, Malformed) and "NUL" in row.reason, (name, row)
        line = {"parquet": "row 2", "csv": 3, "tsv": 3}.get(name, 2)  # a CSV's line 1 is its header
        assert location == f"{path}:{line}", (name, location)


def test_a_nul_in_a_key_or_nested_turn_is_named_where(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi\x00"}]}) + "\n")
    [(_, row)] = list(iter_rows(str(path)))
    assert isinstance(row, Malformed) and "'messages'[0]['content']" in row.reason, row


def test_a_nul_inside_a_csv_cells_list_of_turns_is_a_bad_row(tmp_path):
    """A NUL that appears only once a cell's list is decoded (the JSON escape \\u0000) is refused
    as a raw one is: SFT and preference rows alike (formats.decode_cell)."""
    import csv

    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records

    turns = [{"role": "user", "content": "hi\x00"}, {"role": "assistant", "content": "yo"}]
    ok = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    sft = tmp_path / "sft.csv"
    with sft.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["messages"], [json.dumps(ok)], [json.dumps(turns)]])
    bad = tmp_path / "bad.jsonl"
    records, _ = load_records([str(sft)], bad_rows="skip", rejects_path=str(bad), max_bad_fraction=1.0)
    assert len(records) == 1 and "sft.csv:3" in bad.read_text() and "NUL" in bad.read_text()
    pairs = tmp_path / "pairs.csv"
    with pairs.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["prompt", "chosen", "rejected"], ["q", "a", "b"],
                     ["q", json.dumps([{"role": "assistant", "content": "a\x00"}]), "b"]])
    bad2 = tmp_path / "bad2.jsonl"
    records, _ = load_preference_records([str(pairs)], bad_rows="skip", rejects_path=str(bad2), max_bad_fraction=1.0)
    assert len(records) == 1 and "pairs.csv:3" in bad2.read_text() and "NUL" in bad2.read_text()


# --------------------------------------------------------------------------- TSV quotes


def test_a_tsv_cell_with_unbalanced_quote_costs_one_line_at_most(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text('prompt\tcompletion\nx\ty\n"he said\tok\nz\tw\n')
    rows = _read(path)  # was: the whole file refused, "cannot parse CSV here (unexpected end of data)"
    assert rows == [("2", {"prompt": "x", "completion": "y"}), ("3", {"prompt": '"he said', "completion": "ok"}),
                     ("4", {"prompt": "z", "completion": "w"})]


def test_a_tsv_cell_starting_with_a_quoted_word_is_read_as_written(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text('prompt\tcompletion\n"Hello," she said.\tok\nz\tw\n')
    assert _read(path) == [("2", {"prompt": '"Hello," she said.', "completion": "ok"}),
                           ("3", {"prompt": "z", "completion": "w"})]


def test_tsv_as_pandas_quotes_it_still_reads(tmp_path):
    """pandas' to_csv(sep="\\t") quotes a cell holding a tab, a quote or a newline: one cell each."""
    path = tmp_path / "rows.tsv"
    path.write_text('prompt\tcompletion\n"a\tb"\t"say ""hi"""\n"two\nlines"\tw\nz\tw\n')
    assert _read(path) == [("2", {"prompt": "a\tb", "completion": 'say "hi"'}),
                           ("3", {"prompt": "two\nlines", "completion": "w"}),
                           ("5", {"prompt": "z", "completion": "w"})]


def test_a_tsv_line_read_as_written_with_the_wrong_field_count_is_one_bad_row(tmp_path):
    path = tmp_path / "rows.tsv"
    path.write_text('prompt\tcompletion\n"he said\n"x\ty\n')
    rows = _read(path)
    assert [n for n, _ in rows] == ["2", "3"]
    assert isinstance(rows[0][1], Malformed) and "1 field" in rows[0][1].reason, rows
    assert rows[1][1] == {"prompt": '"x', "completion": "y"}


def test_a_csv_quote_that_does_not_parse_is_one_bad_row(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('prompt,completion\nx,y\n"he" said,ok\nz,w\n')
    rows = _read(path)  # was: the whole file refused
    assert [n for n, _ in rows] == ["2", "3", "4"]
    assert isinstance(rows[1][1], Malformed) and "cannot parse it as CSV" in rows[1][1].reason, rows
    assert rows[2][1] == {"prompt": "z", "completion": "w"}
