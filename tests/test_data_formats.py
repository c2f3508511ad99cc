"""Formats: rows → Records, format detection, and the bad-row policy (nothing dropped unannounced)."""

from __future__ import annotations

import json

import pytest

from posttrain.data.formats import (
    BadRowError,
    DataReport,
    detect_format,
    iter_records,
    load_records,
    to_record,
)
from posttrain.data.records import Record
from posttrain.errors import DataError

ALPACA = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5"},
    {"instruction": "Translate", "input": "bonjour", "output": " hello ", "system": "Be brief."},
    {"instruction": "Say hi", "input": "", "output": "Hi, \"you\".\n"},
]
CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
    {"messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": " and 3+3? "},
        {"role": "assistant", "content": " 6\n"},
    ]},
]
TEXT = [{"text": "Once upon a time."}, {"text": "  indented\nsecond line  "}]


def _write(path, rows, kind):
    """Write `rows` as `kind`; returns the path as a string."""
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows, indent=1))
    elif kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            for row in rows:  # lists (messages) go in JSON-encoded, as CSV exports do
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(_same_keys(rows)), path)
    elif kind == "datasets":
        import datasets

        datasets.Dataset.from_list(_same_keys(rows)).save_to_disk(str(path))
    return str(path)


def _same_keys(rows):
    """Columnar writers take their columns from the first row; give every row every key."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    return [{k: row.get(k) for k in keys} for row in rows]


def _content(records):
    return [(r.messages, r.text) for r in records]


def _quiet(*_):
    pass


# --------------------------------------------------------------------------- to_record


def test_alpaca_record():
    assert to_record(ALPACA[0], "alpaca", "f:1") == Record(
        messages=[{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}], source="f:1"
    )
    assert to_record(ALPACA[1], "alpaca", "f:2").messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nbonjour"},
        {"role": "assistant", "content": " hello "},  # kept exactly, no stripping
    ]
    no_input = {"instruction": "Q", "output": "A", "input": None, "system": ""}  # null / blank = absent
    assert to_record(no_input, "alpaca").messages == [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]


def test_messages_record_multi_turn_with_system_is_kept_exactly():
    record = to_record(CHAT[1], "messages", "f:9")
    assert record.messages == CHAT[1]["messages"] and record.text is None and record.source == "f:9"


def test_sharegpt_conversations_are_mapped():
    row = {"conversations": [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "user", "value": "q2"},
        {"from": "assistant", "value": "a2"},
    ]}
    assert to_record(row, "messages").messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2"},
    ]


def test_extra_turn_keys_are_dropped_and_json_encoded_lists_are_decoded():
    turns = [{"role": "user", "content": "q", "name": None}, {"role": "assistant", "content": "a", "weight": 1}]
    expected = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    assert to_record({"messages": turns}, "messages").messages == expected
    assert to_record({"messages": json.dumps(turns)}, "messages").messages == expected


def test_text_record():
    assert to_record(TEXT[1], "text", "f:3") == Record(text="  indented\nsecond line  ", source="f:3")


def _turns(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


@pytest.mark.parametrize(
    "fmt, row, reason",
    [
        ("alpaca", {"instruction": "q"}, "missing key 'output' (alpaca rows need 'instruction' and 'output'"),
        ("alpaca", {"output": "a"}, "missing key 'instruction'"),
        ("alpaca", {"instruction": "q", "output": 5}, "'output' is a number, expected a string"),
        ("alpaca", {"instruction": None, "output": "a"}, "'instruction' is null, expected a string"),
        ("alpaca", {"instruction": "q", "output": "  \n"}, "'output' is empty"),
        ("alpaca", {"instruction": "q", "output": "a", "input": ["x"]}, "'input' is a list, expected a string"),
        ("text", {"body": "x"}, "missing key 'text' (text rows need 'text'; this row has 'body')"),
        ("text", {"text": ""}, "'text' is empty"),
        ("text", {"text": {"a": 1}}, "'text' is an object, expected a string"),
        ("messages", {"prompt": "x"}, "missing key 'messages'"),
        ("messages", {"messages": "not json"}, "'messages' is a string that is not a JSON list"),
        ("messages", {"messages": {"role": "user"}}, "'messages' is an object, expected a list of turns"),
        ("messages", {"conversations": []}, "'conversations' is an empty list"),
        ("messages", _turns(("user", "hi")), "no assistant turn"),
        ("messages", _turns(("system", "s"), ("user", "q")), "no assistant turn"),
        ("messages", _turns(("user", "q"), ("bot", "a")), "turn 2 has unknown role 'bot'"),
        ("messages", _turns(("user", "q"), ("assistant", "")), "turn 2 (assistant) content is empty"),
        ("messages", _turns(("user", 3), ("assistant", "a")), "turn 1 (user) content is a number, expected a string"),
        ("messages", _turns(("user", None), ("assistant", "a")), "turn 1 (user) content is null"),
        ("messages", _turns(("user", "q"), ("system", "s"), ("assistant", "a")),
         "turn 2 is a system turn; a system message may only come first"),
        ("messages", {"messages": ["hi", {"role": "assistant", "content": "a"}]}, "turn 1 is a string, expected an object"),
        ("messages", {"messages": [{"speaker": "x"}]}, "turn 1 has no 'role' (or ShareGPT 'from')"),
        ("messages", {"messages": [{"role": "user"}]}, "turn 1 (user) has no 'content'"),
        ("messages", {"conversations": [{"from": "bot", "value": "x"}]}, "turn 1 has unknown 'from' 'bot'"),
        ("messages", {"conversations": [{"from": "human", "content": "x"}]}, "turn 1 (user) has no 'value'"),
    ],
)
def test_bad_row_reasons(fmt, row, reason):
    with pytest.raises(BadRowError) as info:
        to_record(row, fmt, "f:1")
    assert reason in info.value.reason
    assert not isinstance(info.value, DataError)  # a row problem, handled by the policy, not a user error itself


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "rows, fmt",
    [
        (ALPACA, "alpaca"),
        (CHAT, "messages"),
        ([{"conversations": [{"from": "human", "value": "q"}]}], "messages"),
        (TEXT, "text"),
        ([{"text": "rendered", "messages": CHAT[0]["messages"]}], "messages"),  # structure wins over text
        ([{"text": "a"}, {"text": "b"}, {"instruction": "q", "output": "a"}], "text"),  # the majority
    ],
)
def test_detect_format(rows, fmt):
    assert detect_format(rows) == fmt


def test_detect_format_failure_names_keys_seen_and_needed():
    with pytest.raises(DataError) as info:
        detect_format([{"prompt": "q", "response": "a"}], where="d.jsonl")
    message = str(info.value)
    assert message.startswith("d.jsonl: ") and "'prompt', 'response'" in message and "\n" not in message
    for needed in ("'instruction' and 'output'", "'messages' or 'conversations'", "text needs 'text'",
                   "prompt_completion needs 'prompt' and 'completion'"):
        assert needed in message
    with pytest.raises(DataError, match="no readable rows"):
        detect_format([])


def test_explicit_format_overrides_detection(tmp_path):
    rows = [{"text": "rendered chat", "messages": CHAT[0]["messages"]}]
    path = _write(tmp_path / "d.jsonl", rows, "jsonl")
    assert load_records([path], log=_quiet)[0][0].messages == CHAT[0]["messages"]
    records, report = load_records([path], fmt="text", log=_quiet)
    assert records[0].text == "rendered chat" and report.files[0].format == "text"


# --------------------------------------------------------------------------- load_records


@pytest.mark.parametrize("rows, fmt", [(ALPACA, "alpaca"), (CHAT, "messages"), (TEXT, "text")])
def test_every_file_type_gives_the_same_records(tmp_path, rows, fmt):
    pytest.importorskip("pyarrow")
    pytest.importorskip("datasets")
    expected = [to_record(r, fmt) for r in rows]
    for kind, name in [("jsonl", "d.jsonl"), ("json", "d.json"), ("csv", "d.csv"), ("parquet", "d.parquet"),
                       ("datasets", "d_ds")]:
        path = _write(tmp_path / name, rows, kind)
        records, report = load_records([path], log=_quiet)
        assert _content(records) == _content(expected), kind
        assert report.files[0].format == fmt and report.good == report.total == len(rows)
        assert all(r.source.startswith(path + ":") for r in records)


def test_sources_are_exact_locations(tmp_path):
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text(json.dumps(TEXT[0]) + "\n\n" + json.dumps(TEXT[1]) + "\n")
    parquet = _write(tmp_path / "d.parquet", TEXT, "parquet")
    records, _ = load_records([str(jsonl), parquet], log=_quiet)
    assert [r.source for r in records] == [f"{jsonl}:1", f"{jsonl}:3", f"{parquet}:row 1", f"{parquet}:row 2"]


def _mixed_file(tmp_path):
    """10 rows, 3 bad (lines 3, 6 and 9), with a blank line 5."""
    lines = [json.dumps(ALPACA[0]), json.dumps(ALPACA[1]), '{"instruction": oops', json.dumps(ALPACA[2]), "",
             json.dumps({"instruction": "q", "output": ""}), json.dumps(ALPACA[0]), json.dumps(ALPACA[1]),
             json.dumps({"instruction": "q"}), json.dumps(ALPACA[2]), json.dumps(ALPACA[0])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_error_policy_reads_everything_then_lists_the_bad_rows(tmp_path):
    path = _mixed_file(tmp_path)
    with pytest.raises(DataError) as info:
        load_records([path], log=_quiet)
    message = str(info.value)
    assert message.startswith("3 of 10 rows are malformed") and "bad_rows=skip" in message
    assert f"{path}:3: invalid JSON" in message
    assert f"{path}:6: 'output' is empty" in message
    assert f"{path}:9: missing key 'output'" in message


def test_error_policy_lists_only_the_first_few(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + "not json\n" * 12)
    with pytest.raises(DataError) as info:
        load_records([str(path)], log=_quiet)
    message = str(info.value)
    assert f"{path}:6:" in message and f"{path}:7:" not in message and "... and 7 more" in message


def test_skip_policy_writes_every_bad_row_and_counts_add_up(tmp_path):
    path = _mixed_file(tmp_path)
    good_file = _write(tmp_path / "good.jsonl", ALPACA, "jsonl")
    rejects = tmp_path / "run" / "rejects.jsonl"
    logged = []
    records, report = load_records([path, good_file], bad_rows="skip", max_bad_fraction=0.5,
                                   rejects_path=str(rejects), log=logged.append)
    assert len(records) == report.good == 10 and report.bad == 3 and report.total == 13
    assert [(f.total, f.good, f.bad) for f in report.files] == [(10, 7, 3), (3, 3, 0)]
    assert all(f.good + f.bad == f.total for f in report.files)
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["location"] for r in lines] == [f"{path}:3", f"{path}:6", f"{path}:9"]
    assert lines[0]["row"] == '{"instruction": oops' and "invalid JSON" in lines[0]["reason"]
    assert lines[1]["row"] == {"instruction": "q", "output": ""} and lines[1]["reason"] == "'output' is empty"
    assert len(logged) == 2 and "skipped 3 of 13 rows" in logged[0] and f"{path}:9:" in logged[0]
    assert str(rejects) in logged[0]
    assert logged[1].startswith("3 rows appear in more than one file")  # good.jsonl repeats 3 of the rows
    assert json.loads(json.dumps(report.to_dict(), default=str))["bad_rows"] == 3


def test_skip_policy_fails_above_max_bad_fraction(tmp_path):
    path = _mixed_file(tmp_path)
    rejects = tmp_path / "rejects.jsonl"
    with pytest.raises(DataError) as info:
        load_records([path], bad_rows="skip", max_bad_fraction=0.2, rejects_path=str(rejects), log=_quiet)
    message = str(info.value)
    assert "3 of 10 rows (30.00%)" in message and "max_bad_fraction=0.2" in message and "\n" not in message
    assert len(rejects.read_text().splitlines()) == 3  # still written, to look at


def test_file_with_no_good_rows_fails(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    good = _write(tmp_path / "good.jsonl", TEXT, "jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: no usable rows \(the file has no rows\)"):
        load_records([good, str(empty)], log=_quiet)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("nope\nnope\n")
    with pytest.raises(DataError, match=r"broken\.jsonl: no usable rows \(all 2 rows are malformed\)"):
        load_records([good, str(broken)], bad_rows="skip", max_bad_fraction=1.0, log=_quiet)


def test_each_file_is_detected_on_its_own(tmp_path):
    a = _write(tmp_path / "a.jsonl", ALPACA, "jsonl")
    b = _write(tmp_path / "b.json", CHAT, "json")
    records, report = load_records([a, b], log=_quiet)
    assert [f.format for f in report.files] == ["alpaca", "messages"] and len(records) == 5


def test_bad_arguments():
    with pytest.raises(DataError, match="no data files"):
        load_records([])
    with pytest.raises(ValueError, match="bad_rows"):
        load_records(["x.jsonl"], bad_rows="ignore")
    with pytest.raises(ValueError, match="unknown format"):
        load_records(["x.jsonl"], fmt="sharegpt")


# --------------------------------------------------------------------------- iter_records


def test_streaming_gives_the_same_records_and_report(tmp_path):
    path = _mixed_file(tmp_path)
    loaded, loaded_report = load_records([path], bad_rows="skip", max_bad_fraction=0.5,
                                         rejects_path=str(tmp_path / "r1.jsonl"), log=_quiet)
    report = DataReport()
    streamed = list(iter_records([path], bad_rows="skip", max_bad_fraction=0.5, rejects_path=str(tmp_path / "r2.jsonl"),
                                 log=_quiet, report=report))
    assert streamed == loaded
    in_memory_only = ("rows_in_several_files", "first_in_several_files")  # not counted when streaming
    loaded_dict = {k: v for k, v in loaded_report.to_dict().items() if k not in in_memory_only}
    assert report.to_dict() | {"rejects_path": None} == loaded_dict | {"rejects_path": None}
    assert (tmp_path / "r1.jsonl").read_text() == (tmp_path / "r2.jsonl").read_text()


def test_streaming_is_lazy_a_broken_tail_is_not_read_first(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(ALPACA[0]) + "\n" + "{broken\n" * 50)
    records = iter_records([str(path)])
    assert next(records).messages[-1]["content"] == "5"
    with pytest.raises(DataError) as info:  # error policy: stops at the first bad row, naming it
        next(records)
    assert str(info.value).startswith(f"{path}:2: invalid JSON") and "\n" not in str(info.value)


def test_streaming_with_an_explicit_format_reads_one_row_at_a_time(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(TEXT[0]) + "\n" + json.dumps(TEXT[1]) + "\n")
    records = iter_records([str(path)], fmt="text")
    assert next(records).text == TEXT[0]["text"]
    with open(path, "a") as f:  # rows appended after the first was read are still seen
        f.write(json.dumps({"text": "late"}) + "\n")
    assert [r.text for r in records] == [TEXT[1]["text"], "late"]


def test_streaming_skip_enforces_the_threshold_at_the_end(tmp_path):
    path = _mixed_file(tmp_path)
    logged = []
    records = iter_records([path], bad_rows="skip", max_bad_fraction=0.1,
                           rejects_path=str(tmp_path / "rejects.jsonl"), log=logged.append)
    got = [next(records) for _ in range(7)]  # every good row comes out first
    assert len(got) == 7 and not logged
    with pytest.raises(DataError, match="max_bad_fraction=0.1"):
        next(records)
    assert "skipped 3 of 10 rows" in logged[0]
    assert len((tmp_path / "rejects.jsonl").read_text().splitlines()) == 3


def test_streaming_checks_paths_up_front(tmp_path):
    good = _write(tmp_path / "good.jsonl", TEXT, "jsonl")
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file"):
        iter_records([good, str(tmp_path / "missing.jsonl")])
