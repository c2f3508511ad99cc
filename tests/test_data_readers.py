"""Readers: every file type yields the same rows, with exact locations; bad rows don't stop iteration."""

from __future__ import annotations

import gzip
import json
import os

import pytest

from posttrain.data.readers import Malformed, check_path, iter_rows, strict_rows
from posttrain.errors import DataError, UserError

ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Say hi", "input": "politely", "output": " Hello there. "},
    {"instruction": "Name a colour, with a comma", "input": "", "output": "red, \"crimson\""},
]


def _rows(path) -> list[tuple[str, object]]:
    return list(iter_rows(str(path)))


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_and_line_numbers_skip_blank_lines_and_keep_bad_ones(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(
        json.dumps(ROWS[0]) + "\n"
        "\n"  # line 2: blank, not a row
        "   \n"  # line 3: blank too
        '{"instruction": "broken", \n'  # line 4: invalid JSON
        "[1, 2]\n"  # line 5: valid JSON, not an object
        + json.dumps(ROWS[1]) + "\n"  # line 6
        + json.dumps(ROWS[2])  # line 7, no final newline
    )
    got = _rows(path)
    assert [loc for loc, _ in got] == [f"{path}:{n}" for n in (1, 4, 5, 6, 7)]
    assert got[0][1] == ROWS[0] and got[3][1] == ROWS[1] and got[4][1] == ROWS[2]
    assert isinstance(got[1][1], Malformed) and got[1][1].reason.startswith("invalid JSON")
    assert got[1][1].raw == '{"instruction": "broken", '
    assert got[2][1] == Malformed("expected a JSON object, got an array", "[1, 2]")


def test_jsonl_crlf_bom_and_bad_utf8(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n\xff\xfe\r\n{"text": "b\\r\\n"}\r\n')
    got = _rows(path)
    assert got[0] == (f"{path}:1", {"text": "a"})
    assert isinstance(got[1][1], Malformed) and "UTF-8" in got[1][1].reason
    assert got[2] == (f"{path}:3", {"text": "b\r\n"})


def test_jsonl_gz(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    assert _rows(path) == [(f"{path}:{i}", r) for i, r in enumerate(ROWS, 1)]


def test_jsonl_is_streamed_rows_come_before_a_later_read_error(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    data = gzip.compress("".join(json.dumps({"text": "x" * 50, "i": i}) + "\n" for i in range(5000)).encode())
    path.write_bytes(data[: len(data) // 2])  # truncated archive: the end cannot be read
    rows = iter_rows(str(path))
    assert next(rows) == (f"{path}:1", {"text": "x" * 50, "i": 0})
    with pytest.raises(DataError, match=r"d\.jsonl\.gz:\d+: cannot read past this line"):
        list(rows)


def test_json_array_locations_are_line_numbers(tmp_path):
    path = tmp_path / "d.json"
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in ROWS) + ',\n  "not an object"\n]\n')
    got = _rows(path)
    assert got[:3] == [(f"{path}:{i}", r) for i, r in zip((2, 3, 4), ROWS)]
    assert got[3] == (f"{path}:5", Malformed("expected a JSON object, got a string", "not an object"))


def test_json_pretty_printed_and_wrapped_in_a_single_list_key(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"version": 2, "data": ROWS, "name": "x"}, indent=2))
    got = _rows(path)
    assert [r for _, r in got] == ROWS
    lines = path.read_text().splitlines()
    for location, row in got:  # each location points at the row's opening brace
        line = int(location.rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{"
    assert len({loc for loc, _ in got}) == 3


def test_json_file_holding_json_lines_is_read_as_json_lines(tmp_path):
    path = _write_jsonl(tmp_path / "d.json", ROWS)
    assert _rows(path) == [(f"{path}:{i}", r) for i, r in enumerate(ROWS, 1)]
    one_line = tmp_path / "one.json"  # a wrapper on one line is not JSON Lines
    one_line.write_text(json.dumps({"rows": ROWS}) + "\n\n")
    assert _rows(one_line) == [(f"{one_line}:1", r) for r in ROWS]


@pytest.mark.parametrize(
    "text, match",
    [
        ('[{"a": 1},\n {"a": 2]\n', r"d\.json:2: invalid JSON at column"),
        ('{"a": [], "b": []}', r"exactly one list-valued key.*'a', 'b'"),
        ('"just a string"', r"expected a JSON array of objects"),
        ("[{}] []", r"d\.json:1: invalid JSON at column 6: Extra data"),
        ('{"data": [{}],\n}', r"d\.json:2: invalid JSON at column 1: Expecting property name"),
        ('{"data" [{}]}', r"d\.json:1: invalid JSON at column 9: Expecting ':' delimiter"),
        ('{"data": [{}] "x": 1}', r"d\.json:1: invalid JSON at column 15: Expecting ',' delimiter"),
        ("{}", r"exactly one list-valued key .*found keys: none"),
        ('{"data": [{}], "data": [1]}', r"exactly one list-valued key"),  # the last value of a repeated key wins
    ],
)
def test_json_file_level_errors(tmp_path, text, match):
    path = tmp_path / "d.json"
    path.write_text(text)
    with pytest.raises(DataError, match=match):
        _rows(path)


def test_empty_files_have_no_rows(tmp_path):
    for name in ("a.jsonl", "a.json", "a.csv"):
        (tmp_path / name).write_text("")
        assert _rows(tmp_path / name) == []


def test_csv_locations_are_where_each_record_starts(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text(
        "instruction,input,output\n"  # line 1: header
        '"two\nlines",,out\n'  # lines 2-3: one record
        "\n"  # line 4: blank
        'plain,in,"with ""quotes"", and comma"\n'  # line 5
        "too,few\n"  # line 6
        "a,b,c\n"  # line 7
    )
    got = _rows(path)
    assert [loc for loc, _ in got] == [f"{path}:{n}" for n in (2, 5, 6, 7)]
    assert got[0][1] == {"instruction": "two\nlines", "input": "", "output": "out"}
    assert got[1][1]["output"] == 'with "quotes", and comma'
    assert got[2][1] == Malformed("has 2 field(s) but the header has 3", ["too", "few"])
    assert got[3][1] == {"instruction": "a", "input": "b", "output": "c"}


def test_tsv_and_duplicate_header(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("text\tid\nhello, world\t1\n")
    assert _rows(path) == [(f"{path}:2", {"text": "hello, world", "id": "1"})]
    bad = tmp_path / "dup.csv"
    bad.write_text("text,text\na,b\n")
    with pytest.raises(DataError, match=r"dup\.csv:1: .*'text' twice"):
        _rows(bad)


def test_parquet_rows_in_several_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [{"text": f"row {i}", "turns": [{"role": "user", "content": str(i)}]} for i in range(2500)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=700)
    got = _rows(path)
    assert [loc for loc, _ in got] == [f"{path}:row {i}" for i in range(1, 2501)]
    assert [r for _, r in got] == rows


def test_parquet_garbage_is_a_data_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        _rows(path)


def test_datasets_directory_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "ds"))
    got = _rows(tmp_path / "ds")
    assert got == [(f"{tmp_path / 'ds'}:row {i}", r) for i, r in enumerate(ROWS, 1)]

    datasets.DatasetDict({"test": dataset.select([0]), "train": dataset}).save_to_disk(str(tmp_path / "dd"))
    assert [r for _, r in _rows(tmp_path / "dd")] == ROWS  # the train split

    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "no_train"))
    with pytest.raises(DataError, match=r"without a 'train' split \(has: test\)"):
        _rows(tmp_path / "no_train")


def test_path_errors_name_the_path_and_what_is_accepted(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "plain_dir").mkdir()
    cases = {
        tmp_path / "missing.jsonl": "no such file",
        tmp_path / "notes.txt": "unknown file type",
        tmp_path / "plain_dir": "not one written by datasets' save_to_disk",
    }
    for path, what in cases.items():
        with pytest.raises(DataError) as info:
            iter_rows(str(path))  # raised up front, before iteration
        message = str(info.value)
        assert isinstance(info.value, UserError) and "\n" not in message
        assert message.startswith(str(path)) and what in message and ".jsonl" in message and "parquet" in message


def test_check_path_kinds(tmp_path):
    for name, kind in [("a.jsonl", "jsonl"), ("a.NDJSON", "jsonl"), ("a.json.gz", "json"), ("a.csv", "csv"),
                       ("a.tsv", "tsv"), ("a.parquet", "parquet")]:
        (tmp_path / name).write_text("")
        assert check_path(str(tmp_path / name)) == kind
    (tmp_path / "a.parquet.gz").write_text("")
    with pytest.raises(DataError, match="unknown file type"):
        check_path(str(tmp_path / "a.parquet.gz"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="needs file permissions to apply")
def test_unreadable_file_is_a_data_error(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", ROWS)
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"d\.jsonl: cannot read the file"):
            _rows(path)
    finally:
        path.chmod(0o644)


def test_strict_rows_stop_at_the_first_malformed_row_with_its_line(tmp_path):
    path = tmp_path / "seeds.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{not json\n{"a": 3}\n')
    rows = strict_rows(str(path))
    assert next(rows) == (f"{path}:1", {"a": 1})
    assert next(rows) == (f"{path}:3", {"a": 2})
    with pytest.raises(DataError, match=f"{path}:4: "):
        next(rows)
