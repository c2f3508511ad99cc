"""A files walk: training data as it arrives from real pipelines, before any row is a record.

Walked, against the README's Data section and the readers' docstring (data/readers.py): compressed
files (.jsonl.gz, .json.gz, concatenated gzip members as `cat a.gz b.gz` writes them; .zst, .bz2, .xz
and .arrow, which are not promised, are refused by name); wildcards and directories of shards in
data.train_files (refused with the files to list instead); a .json file that is one array, an object
holding `{"data": [...]}`, or JSON Lines, with CRLF and leading blank lines; UTF-16 (pandas'
`to_csv(encoding="utf-16")`, Excel's "Unicode Text"), UTF-8 with a BOM and Latin-1 files; comment lines,
NUL bytes and old-Mac CR line ends in JSON Lines (each a bad row at its line); a 50 MB row; Parquet with
nested struct columns, list<struct> messages, large_string / large_list and dictionary-encoded columns,
timestamps and decimals beside the text, and a messages column holding JSON text; CSV with a header only,
quoted multi-line cells, TSV, and a tab- or semicolon-separated file named .csv; paths with spaces,
unicode and `~`; the same file listed twice in data.train_files, and one file given as both training and
held-out data.

What was right: every row of a Latin-1, NUL-padded, CR-only or commented file is a bad row at its own
line, never lost; a 50 MB row streams with its neighbours' line numbers intact; Parquet's large and
dictionary types read as the plain ones do; a header-only CSV or empty Parquet is "no usable rows";
wildcards and shard directories are refused with the files to list.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 32:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError

WORDS = "alpha beta gamma delta epsilon zeta eta theta".split()


def _quiet(*_):
    pass


def _alpaca_jsonl(path: Path, words=WORDS) -> Path:
    path.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in words))
    return path


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("streamed", [False, True])
def test_a_home_relative_data_path_that_the_up_front_check_accepts_is_read(tmp_path, monkeypatch, streamed):
    """`data.train_files: [~/data/train.jsonl]` (a YAML config, or an override the shell does not
    expand): runs._check_input_files expands `~` and passes it, the model loads, then the reader
    says "~/data/train.jsonl: no such file" (measured with `posttrain sft`: the error comes after
    "trainable 922,752 params"). Model paths expand `~` too (models/loading.py)."""
    from posttrain.data import formats

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "data").mkdir()
    _alpaca_jsonl(tmp_path / "data" / "train.jsonl")
    try:
        if streamed:
            records = list(formats.iter_records(["~/data/train.jsonl"], log=_quiet))
        else:
            records, _ = formats.load_records(["~/data/train.jsonl"], log=_quiet)
    except DataError as e:
        pytest.fail(f"a path the up-front check accepted is not read: {e}")
    assert [r.messages[-1]["content"] for r in records] == WORDS


def test_a_file_given_as_both_training_and_held_out_data_is_named(tmp_path):
    """README: `data.eval_files` are "held-out files". Measured: train_files=[a.jsonl],
    eval_files=[a.jsonl] gives 8 held-out examples, all 8 also trained on, and the log says only the
    length counts. (The split stages hold prompts out by key so a held-out prompt never trains; here
    the same path, the cheapest leak to see, passes without a word.)"""
    from posttrain.config import SFTConfig, validate_sft
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.models.loading import load_tokenizer

    path = _alpaca_jsonl(tmp_path / "a.jsonl")
    logs: list[str] = []
    try:  # refused in the config's validation, or when the data is read, or warned: each is right
        cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                                   "data": {"train_files": [str(path)], "eval_files": [str(path)], "max_length": 64}})
        validate_sft(cfg)  # as every run does before reading
        prepared = prepare_sft_data(cfg.data, load_tokenizer("tiny"), None, 0, log=logs.append)
    except (ConfigError, DataError) as e:
        assert str(path) in str(e), e
        return
    trained = {tuple(e.input_ids) for e in prepared.train}
    leaked = sum(tuple(e.input_ids) in trained for e in prepared.eval)
    assert any(str(path) in line for line in logs), (
        f"{leaked} of {len(prepared.eval)} held-out examples are training examples, and the log names no "
        f"file: {logs}")


def test_a_json_file_of_json_lines_with_a_bad_first_line_skips_that_row(tmp_path):
    """README: "a `.json` file is an array, `{"data": [...]}`, JSON Lines or a single row", and bad
    rows are skipped under bad_rows=skip. `_is_json_lines` looks at the first line only: when it does
    not parse (here a raw tab inside a string, as hand-rolled writers leave), the file is parsed as
    one JSON document and refused at line 1, every good row with it."""
    from posttrain.data.formats import load_records

    good = [json.dumps({"text": f"row {w}"}) for w in WORDS[:3]]
    body = '{"text": "a\tb"}\n' + "\n".join(good) + "\n"
    as_jsonl, as_json = tmp_path / "rows.jsonl", tmp_path / "rows.json"
    as_jsonl.write_text(body)
    as_json.write_text(body)
    records, report = load_records([str(as_jsonl)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
    assert (report.total, report.bad, len(records)) == (4, 1, 3)  # the .jsonl twin: one bad row, three kept
    try:
        records, report = load_records([str(as_json)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)
    except DataError as e:
        pytest.fail(f"the whole .json file is refused under bad_rows=skip: {e}")
    assert (report.total, report.bad, len(records)) == (4, 1, 3)
    assert [r.location for r in report.first_bad] == [f"{as_json}:1"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_utf16_file_is_read_or_named_as_utf16(tmp_path, suffix):
    """pandas' `to_csv(encoding="utf-16")`, Excel's Unicode Text and PowerShell's `>` write UTF-16
    with a byte-order mark. Measured: the .jsonl of 2 rows is "3 of 3 rows are malformed" (line 1
    "not valid UTF-8 (byte 0 of the line)", lines 2-3 "invalid JSON: Expecting value": the NUL half
    of each newline starts the next line); the .csv's rows are each "not valid Unicode: a lone
    surrogate at '\\udcff\\udcfet\\x00e\\x00x\\x00t\\x00'", the README's reason for a JSON "\\ud800"
    escape. The BOM says what the file is: read it, or refuse the file naming UTF-16."""
    from posttrain.data.formats import load_records

    if suffix == ".jsonl":
        text = "".join(json.dumps({"text": f"row {w}"}) + "\n" for w in WORDS[:2])
    else:
        text = "text\n" + "".join(f"row {w}\n" for w in WORDS[:2])
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(text.encode("utf-16"))  # little-endian with its BOM, as Windows tools write it
    try:
        records, _ = load_records([str(path)], log=_quiet)
    except DataError as e:
        assert "utf-16" in str(e).lower(), f"a UTF-16 file, refused without saying so: {e}"
        return
    assert [r.text for r in records] == ["row alpha", "row beta"]


# --------------------------------------------------------------------------- right, and untested


def test_parquet_large_dictionary_and_nested_columns_read_as_the_plain_ones(tmp_path):
    """Parquet as Arrow-based pipelines (polars, datasets, Spark) write it: large_string text,
    large_list<struct<large_string>> messages, dictionary-encoded columns, and side columns
    (a struct, a timestamp, a decimal) beside the turns; locations are "row N"."""
    import datetime
    import decimal

    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.formats import load_records

    turn = pa.struct([("role", pa.large_string()), ("content", pa.large_string())])
    chats = [[{"role": "user", "content": f"Say {w}"}, {"role": "assistant", "content": w}] for w in WORDS[:3]]
    table = pa.table({
        "messages": pa.array(chats, type=pa.large_list(turn)),
        "source": pa.array(["web", "web", "books"]).dictionary_encode(),
        "meta": [{"id": i, "lang": "en"} for i in range(3)],
        "ts": [datetime.datetime(2024, 1, i + 1) for i in range(3)],
        "score": pa.array([decimal.Decimal("0.5")] * 3),
    })
    pq.write_table(table, tmp_path / "chats.parquet")
    alpaca = pa.table({"instruction": pa.array([f"Say {w}" for w in WORDS[:3]]).dictionary_encode(),
                       "output": pa.array(WORDS[:3], type=pa.large_string())})
    pq.write_table(alpaca, tmp_path / "alpaca.parquet")
    paths = [str(tmp_path / "chats.parquet"), str(tmp_path / "alpaca.parquet")]
    records, report = load_records(paths, log=_quiet)
    assert [f.format for f in report.files] == ["messages", "alpaca"]
    assert [r.messages[-1]["content"] for r in records] == WORDS[:3] * 2
    assert records[2].source == f"{paths[0]}:row 3" and records[5].source == f"{paths[1]}:row 3"


def test_concatenated_gzip_members_are_one_file_with_running_line_numbers(tmp_path):
    """`cat part-0.jsonl.gz part-1.jsonl.gz > all.jsonl.gz` (how shards are joined without
    recompressing): every member is read and line numbers run on across them."""
    from posttrain.data.readers import iter_rows

    path = tmp_path / "all.jsonl.gz"
    first = "".join(json.dumps({"text": w}) + "\n" for w in WORDS[:3])
    second = "\n" + "".join(json.dumps({"text": w}) + "\n" for w in WORDS[3:5])  # a blank line across the seam
    path.write_bytes(gzip.compress(first.encode()) + gzip.compress(second.encode()))
    rows = list(iter_rows(str(path)))
    assert [r["text"] for _, r in rows] == WORDS[:5]
    assert [loc for loc, _ in rows] == [f"{path}:{n}" for n in (1, 2, 3, 5, 6)]


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_50_mb_row_is_read_whole_and_its_neighbours_keep_their_lines(tmp_path, suffix):
    from posttrain.data.readers import iter_rows

    big = "ab " * (50_000_000 // 3)
    rows = [json.dumps({"text": "before"}), json.dumps({"text": big}), json.dumps({"text": "after"})]
    path = tmp_path / f"big{suffix}"
    path.write_text("\n".join(rows) + "\n" if suffix == ".jsonl" else "[\n" + ",\n".join(rows) + "\n]\n")
    del big
    got = list(iter_rows(str(path)))
    first = 1 if suffix == ".jsonl" else 2
    assert [loc for loc, _ in got] == [f"{path}:{first + i}" for i in range(3)]
    assert [len(r["text"]) for _, r in got] == [6, 3 * (50_000_000 // 3), 5]


def test_rows_lost_to_a_wrong_encoding_or_line_end_are_each_a_bad_row_at_its_line(tmp_path):
    """Latin-1 text, a `#` comment line, a NUL-padded tail (a file preallocated or cut by a crash)
    none is read as rows silently lost; each is a bad row at its line. Old-Mac CR line ends are
    line ends: each line a row, at its line (stop 33)."""
    from posttrain.data.formats import load_records

    good = json.dumps({"text": "hello there"})
    cases = {
        "latin1.jsonl": (json.dumps({"text": "café"}, ensure_ascii=False).encode("latin-1") + b"\n"
                         + good.encode() + b"\n", [1]),
        "comment.jsonl": (b"# exported 2024-01-01\n" + good.encode() + b"\n", [1]),
        "nul.jsonl": (good.encode() + b"\n" + b"\x00" * 64, [2]),
    }
    for name, (data, bad_lines) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DataError) as caught:
            load_records([str(path)], log=_quiet)
        for line in bad_lines:
            assert f"{path}:{line}:" in str(caught.value), (name, str(caught.value))
    path = tmp_path / "cr.jsonl"
    path.write_bytes(good.encode() + b"\r" + good.encode() + b"\r" + good.encode() + b"\n")
    records, _ = load_records([str(path)], log=_quiet)
    assert [r.source for r in records] == [f"{path}:{n}" for n in (1, 2, 3)]


def test_paths_with_spaces_and_unicode_pass_from_the_override_to_the_reported_location(tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.data.formats import load_records

    folder = tmp_path / "my data" / "données 数据"
    folder.mkdir(parents=True)
    path = _alpaca_jsonl(folder / "train set.jsonl", WORDS[:2])
    cfg = SFTConfig.load(None, [f"data.train_files=[{path}]"])
    assert cfg.data.train_files == [str(path)]
    records, _ = load_records(cfg.data.train_files, log=_quiet)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:2"]
