"""Readers and row formats, beyond the fuzz walk's pins: lone surrogates inside CSV cells, the
rejects file round-trip, text roles, reference answers, JSON Python refuses inside a cell, table
prompt files for generate, and the prompt tokenization generate and serve share."""

from __future__ import annotations

import csv
import io
import json

import pytest

from posttrain.errors import DataError


def _quiet(*_):
    pass


def _csv(path, header, rows):
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buf.getvalue())
    return path


def test_a_lone_surrogate_escaped_inside_a_csv_cell_is_a_bad_row_naming_the_column(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records

    turns = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a\ud800b"}])
    good = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert "\\ud800" in turns  # the cell is ASCII text; the surrogate appears once it is decoded
    sft = _csv(tmp_path / "sft.csv", ["messages"], [[good], [turns], [good]])
    with pytest.raises(DataError, match=r"sft.csv:3: 'messages': not valid Unicode: a lone surrogate at \[1\]"):
        load_records([str(sft)], log=_quiet)
    pref = _csv(tmp_path / "pref.csv", ["prompt", "chosen", "rejected"],
                [["Q", "a", "b"], ["Q", json.dumps([{"role": "assistant", "content": "\udc00"}]), "b"], ["Q", "c", "d"]])
    with pytest.raises(DataError, match=r"pref.csv:3: 'chosen': not valid Unicode"):
        load_preference_records([str(pref)], log=_quiet)


def test_the_rejects_file_keeps_a_surrogate_row_as_read(tmp_path):
    from posttrain.data.formats import load_records

    bad = {"messages": [{"role": "user", "content": "x\ud83dy"}, {"role": "assistant", "content": "é"}]}
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "one"}, bad, {"text": "three"}]) + "\n")
    rejects = tmp_path / "rejects.jsonl"
    _, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=1.0, rejects_path=str(rejects),
                             log=_quiet)
    assert report.first_bad[0].reason == "not valid Unicode: a lone surrogate at 'messages'[0]['content']"
    (entry,) = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert entry["row"] == bad  # the escape round-trips; other text stays readable UTF-8
    assert "é" in rejects.read_text(encoding="utf-8")


def test_a_csv_row_with_a_wrong_field_count_and_a_bad_byte_is_one_bad_row(tmp_path):
    from posttrain.data.readers import Malformed, iter_rows

    path = tmp_path / "rows.csv"
    path.write_bytes(b"text,other\nok,1\n\xffonly one\nfine,2\n")
    rows = list(iter_rows(str(path)))
    location, row = rows[1]
    assert location == f"{path}:3" and isinstance(row, Malformed)
    assert row.reason == "has 1 field(s) but the header has 2; not valid UTF-8" and row.raw == ["\ufffdonly one"]


@pytest.mark.parametrize("value", [["user"], {"a": 1}, 3])
def test_a_role_that_is_not_text_is_a_bad_row_naming_the_key(value):
    from posttrain.data.formats import BadRowError, to_record

    row = {"messages": [{"role": value, "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    with pytest.raises(BadRowError, match="turn 1 'role' is (a list|an object|a number), expected a string"):
        to_record(row, "messages")


def test_json_python_refuses_inside_a_csv_cell_is_a_bad_row(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records

    sft = _csv(tmp_path / "sft.csv", ["messages"], [["[" * 100_000 + "]" * 100_000]])
    with pytest.raises(DataError, match="sft.csv:2: 'messages' is a string that is not a JSON list"):
        load_records([str(sft)], fmt="messages", log=_quiet)
    ranks = _csv(tmp_path / "ranks.csv", ["prompt", "responses", "ranks"],
                 [["Q", '["a", "b"]', "[" + "9" * 5000 + ", 0]"]])
    with pytest.raises(DataError, match="ranks.csv:2: 'ranks'"):
        load_preference_records([str(ranks)], log=_quiet)


@pytest.mark.parametrize("answer, text", [(42, "42"), (1.5, "1.5"), ("4", "4"), (None, None), ("\t", None)])
def test_a_reference_answer_is_text_as_the_file_writes_it(tmp_path, answer, text):
    from posttrain.data.prompts import load_prompt_records

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "answer": answer}) + "\n")
    records, _ = load_prompt_records([str(path)], log=_quiet)
    assert records[0].answer == text


def test_a_list_answer_is_a_bad_row(tmp_path):
    from posttrain.data.prompts import load_prompt_records

    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "Q", "answer": ["4"]}) + "\n")
    with pytest.raises(DataError, match="p.jsonl:1: 'answer' is a list, expected a string"):
        load_prompt_records([str(path)], log=_quiet)


def test_generate_reads_a_csv_messages_column_as_turns(tmp_path):
    from posttrain.inference import read_prompts

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = _csv(tmp_path / "p.csv", ["prompt", "messages"], [["", json.dumps(turns)], ["Hello there", ""]])
    rows = read_prompts(str(path))
    assert rows == [{"prompt": "", "messages": turns}, {"prompt": "Hello there"}]
    bad = _csv(tmp_path / "bad.csv", ["prompt"], [["  "]])
    with pytest.raises(DataError, match="bad.csv:2: 'prompt' is empty"):
        read_prompts(str(bad))


def test_generate_reads_a_parquet_table_with_a_null_messages_cell(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.inference import read_prompts

    turns = [{"role": "user", "content": "Hi"}]
    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "Plain", "messages": None}, {"prompt": None, "messages": turns}]),
                   path)
    assert read_prompts(str(path)) == [{"prompt": "Plain"}, {"prompt": None, "messages": turns}]


def test_a_raw_prompt_gets_the_tokenizers_special_tokens_and_a_templated_one_does_not():
    from posttrain.rollout.generate import prompt_token_ids

    calls = []

    class Tokenizer:
        def __call__(self, text, add_special_tokens, verbose):
            calls.append(add_special_tokens)
            return {"input_ids": [1] * add_special_tokens + [5, 6]}

    assert prompt_token_ids(Tokenizer(), "the baker", raw=True) == [1, 5, 6]
    assert prompt_token_ids(Tokenizer(), "<s>[INST] hi [/INST]", raw=False) == [5, 6]  # the template wrote BOS
    assert calls == [True, False]
