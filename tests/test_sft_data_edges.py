"""Review tests: SFT data (formats, readers, templates, length, batching, packing) and the SFT loss.

Every expectation is computed independently of the product's helpers: token ids and the
assistant mask come from the tokenizer's own chat template (the tiny preset's template has
`{% generation %}` tags, so `apply_chat_template(return_assistant_tokens_mask=True)` is a
reference that does not use posttrain's character-span method), losses are written out in
float64 from a plain transformers forward.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.errors import DataError

# --------------------------------------------------------------------------- fixtures / helpers


def _quiet(*_args, **_kwargs):
    pass


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    return AutoTokenizer.from_pretrained(preset_path("tiny"))


@pytest.fixture(scope="module")
def tiny():
    """The tiny preset as a plain transformers model (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    from posttrain.models.presets import preset_path

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(preset_path("tiny"), dtype=torch.float32).eval()


def _reference_labels(tok, messages):
    """(input_ids, labels) from transformers' own {% generation %} assistant mask."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]
    return ids, labels


def _runs(labels):
    runs, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(label)
    if cur:
        runs.append(cur)
    return runs


def _ce64_per_token(logits, labels):
    """Per-position cross-entropy in float64, HF shift: logits[t] predicts labels[t+1].
    Returns (ce (T-1,), mask (T-1,)) for a single row (logits (T, V), labels (T,))."""
    z = logits[:-1].double()
    y = labels[1:]
    mask = y != IGNORE_INDEX
    logz = torch.logsumexp(z, dim=-1)
    safe = torch.where(mask, y, torch.zeros_like(y))
    ce = logz - z.gather(1, safe[:, None]).squeeze(1)
    return torch.where(mask, ce, torch.zeros_like(ce)), mask


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


CONVS = [
    # system + three assistant turns, whitespace at the edges of contents
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Copy: a b"},
     {"role": "assistant", "content": "a b"},
     {"role": "user", "content": "Reverse: c d"},
     {"role": "assistant", "content": " d c \n"},
     {"role": "user", "content": "again"},
     {"role": "assistant", "content": "\nd c"}],
    # two assistant turns in a row
    [{"role": "user", "content": "hi"},
     {"role": "assistant", "content": "one"},
     {"role": "assistant", "content": "two"}],
    # ends with a user turn (its text must not be labelled)
    [{"role": "user", "content": "x y z"},
     {"role": "assistant", "content": "z y x"},
     {"role": "user", "content": "thanks"}],
    # an assistant content that repeats the user text exactly
    [{"role": "user", "content": "same"},
     {"role": "assistant", "content": "same"},
     {"role": "user", "content": "same"},
     {"role": "assistant", "content": "same"}],
]


# --------------------------------------------------------------------------- templates / label masks


@pytest.mark.parametrize("k", range(len(CONVS)))
def test_every_assistant_turn_labelled_and_nothing_else_vs_generation_tags(tok, k):
    from posttrain.data.templates import encode_record, resolve_template

    messages = CONVS[k]
    ids, labels = _reference_labels(tok, messages)
    ex = encode_record(Record(messages=messages, source="m:1"), tok, resolve_template(tok, "auto"))
    assert ex.input_ids == ids
    assert ex.labels == labels
    assert len(_runs(ex.labels)) == sum(m["role"] == "assistant" for m in messages)


ASSISTANT_FIRST = [{"role": "assistant", "content": "Hello there, how can I help?"},
                   {"role": "user", "content": "hi"},
                   {"role": "assistant", "content": "one"}]


def test_assistant_first_conversation_is_a_bad_row(tmp_path):
    """An opening assistant turn answers no prompt (and a template cannot render the empty
    conversation before it): a bad row with its reason, not a crash at encoding."""
    from posttrain.data.formats import load_records

    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": ASSISTANT_FIRST}])
    with pytest.raises(DataError, match="first turn is the assistant"):
        load_records([path], log=_quiet)


def test_assistant_first_row_does_not_abort_a_skip_policy_run(tok, tmp_path):
    from posttrain.data.pipeline import prepare_sft_data

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(3)] + [{"messages": ASSISTANT_FIRST}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _data_cfg(train_files=[path], bad_rows="skip", max_bad_fraction=0.5)
    data = prepare_sft_data(cfg, tok, tmp_path / "r", seed=0, log=_quiet)
    assert len(data.train) >= 3


@pytest.mark.parametrize("k", range(len(CONVS)))
def test_builtin_chatml_matches_the_tiny_templates_generation_mask(tok, k):
    """The built-in CHATML renders the same text as the preset's template, so its mask must
    equal the {% generation %} mask of the preset template."""
    from posttrain.data.templates import CHATML, encode_record

    ids, labels = _reference_labels(tok, CONVS[k])
    ex = encode_record(Record(messages=CONVS[k]), tok, CHATML)
    assert (ex.input_ids, ex.labels) == (ids, labels)


def test_alpaca_template_labels_are_response_plus_eos_for_every_turn(tok):
    from posttrain.data.templates import ALPACA, encode_record

    messages = CONVS[0]
    ex = encode_record(Record(messages=messages), tok, ALPACA)
    # independent rendering of the documented Alpaca layout
    text = ""
    for m in messages:
        if m["role"] == "system":
            text += m["content"] + "\n\n"
        elif m["role"] == "user":
            text += "### Instruction:\n" + m["content"] + "\n\n"
        else:
            text += "### Response:\n" + m["content"] + tok.eos_token + "\n\n"
    assert ex.input_ids == tok(text, add_special_tokens=False)["input_ids"]
    decoded = [tok.decode(r) for r in _runs(ex.labels)]
    assert decoded == [m["content"] + tok.eos_token for m in messages if m["role"] == "assistant"]
    unlabelled = tok.decode([t for t, l in zip(ex.input_ids, ex.labels) if l == IGNORE_INDEX])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in unlabelled


def test_text_record_trains_on_every_token_and_ends_with_eos(tok):
    from posttrain.data.templates import encode_record

    text = "line one\nline two 42"
    ex = encode_record(Record(text=text), tok, "")
    ids = tok(text)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == ids and ex.labels == ids


# --------------------------------------------------------------------------- formats / bad rows


def test_alpaca_system_and_input_become_turns_and_labels_cover_output_only(tok, tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record, resolve_template

    row = {"instruction": "Sort", "input": "c a b", "output": "a b c", "system": "Be exact."}
    path = _write_jsonl(tmp_path / "a.jsonl", [row])
    (record,), _ = load_records([path], log=_quiet)
    expected = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "Sort\n\nc a b"},
                {"role": "assistant", "content": "a b c"}]
    assert record.messages == expected
    ex = encode_record(record, tok, resolve_template(tok, "auto"))
    assert (ex.input_ids, ex.labels) == _reference_labels(tok, expected)


@pytest.mark.parametrize("row, needle", [
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "a"}]}, "tool turn that answers no call"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  \n"}]}, "empty"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}, "null"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": 3}]}, "number"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "no 'content'"),
    ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"},
                   {"role": "assistant", "content": "a"}]}, "system"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "bot", "value": "a"}]}, "unknown 'from'"),
    ({"messages": "not json"}, "not a JSON list"),
    ({"messages": {"role": "user"}}, "expected a list"),
    ({"messages": []}, "empty list"),
    ({"instruction": "q", "output": ["a"]}, "a list"),
    ({"instruction": "q"}, "missing key 'output'"),
    ({"instruction": "q", "output": "a", "input": 5}, "'input' is a number"),
])
def test_bad_rows_are_skipped_with_file_line_reason_and_written_to_rejects(tmp_path, row, needle):
    from posttrain.data.formats import load_records

    good = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]} \
        if ("messages" in row or "conversations" in row) else {"instruction": "q", "output": "a"}
    path = _write_jsonl(tmp_path / "d.jsonl", [good, good, row, good])
    rejects = tmp_path / "rej.jsonl"
    records, report = load_records([path], bad_rows="skip", max_bad_fraction=0.5, rejects_path=str(rejects),
                                   log=_quiet)
    assert len(records) == 3 and (report.total, report.good, report.bad) == (4, 3, 1)
    (entry,) = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert entry["location"] == f"{path}:3"
    assert needle in entry["reason"]
    assert entry["row"] == row


def test_non_utf8_line_and_huge_line_and_wrong_json_types(tmp_path):
    from posttrain.data.formats import load_records

    good = json.dumps({"text": "fine"}).encode()
    huge = json.dumps({"text": "x" * 3_000_000}).encode()
    lines = [good, b'{"text": "caf\xe9"}', huge, b"[1, 2]", b'"just a string"', b"{bad json", good]
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rejects = tmp_path / "rej.jsonl"
    records, report = load_records([str(path)], bad_rows="skip", max_bad_fraction=0.9,
                                   rejects_path=str(rejects), log=_quiet)
    assert [len(r.text) for r in records] == [4, 3_000_000, 4]
    assert [r.source for r in records] == [f"{path}:1", f"{path}:3", f"{path}:7"]
    entries = [json.loads(line) for line in rejects.read_text(encoding="utf-8").splitlines()]
    assert [e["location"] for e in entries] == [f"{path}:{n}" for n in (2, 4, 5, 6)]
    assert "UTF-8" in entries[0]["reason"]


def test_error_policy_lists_every_bad_location_before_training(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.errors import DataError

    rows = [{"instruction": "q", "output": "a"}, {"instruction": "q"}, {"instruction": "q", "output": "a"},
            {"instruction": 1, "output": "a"}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with pytest.raises(DataError) as info:
        load_records([path], log=_quiet)
    assert f"{path}:2" in str(info.value) and f"{path}:4" in str(info.value)
    assert "2 of 4" in str(info.value)


def test_max_bad_fraction_boundary_is_inclusive(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.errors import DataError

    rows = [{"text": "a"}] * 3 + [{"text": ""}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    records, report = load_records([path], bad_rows="skip", max_bad_fraction=0.25, log=_quiet)
    assert len(records) == 3 and report.bad_fraction == 0.25
    with pytest.raises(DataError, match="max_bad_fraction"):
        load_records([path], bad_rows="skip", max_bad_fraction=0.2, log=_quiet)


ALPACA_ROWS = [
    {"instruction": "Add 2 and 3.", "input": "", "output": "5", "system": ""},
    {"instruction": "Translate", "input": "bonjour", "output": " hello ", "system": "Be brief."},
    {"instruction": "Quote", "input": "", "output": 'He said "hi",\nthen left.', "system": ""},
]


def _expected_alpaca(row):
    msgs = [{"role": "system", "content": row["system"]}] if row["system"] else []
    user = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    return msgs + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]


def test_csv_parquet_json_array_and_wrapper_give_the_documented_records_and_locations(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.formats import load_records

    expected = [_expected_alpaca(r) for r in ALPACA_ROWS]
    # CSV (the third record spans two physical lines)
    csv_path = tmp_path / "d.csv"
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output", "system"])
        w.writeheader()
        w.writerows(ALPACA_ROWS)
    # Parquet with nulls where CSV has empty cells
    pq_rows = [{k: (v if v != "" else None) for k, v in r.items()} for r in ALPACA_ROWS]
    pq_path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(pq_rows), pq_path)
    # pretty JSON array and {"data": [...]} wrapper
    arr_path = tmp_path / "d.json"
    arr_path.write_text(json.dumps(ALPACA_ROWS, indent=2))
    wrap_path = tmp_path / "w.json"
    wrap_path.write_text(json.dumps({"version": 1, "data": ALPACA_ROWS}))
    for path, locations in [
        (csv_path, [2, 3, 4]),
        (pq_path, ["row 1", "row 2", "row 3"]),
        (arr_path, [2, 8, 14]),
        (wrap_path, [1, 1, 1]),
    ]:
        records, report = load_records([str(path)], log=_quiet)
        assert [r.messages for r in records] == expected, path
        assert [r.source for r in records] == [f"{path}:{n}" for n in locations], path
        assert report.files[0].format == "alpaca"


def test_messages_and_sharegpt_rows_mixed_in_a_jsonl_file(tmp_path):
    from posttrain.data.formats import load_records

    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
            {"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "a"},
                               {"from": "gpt", "value": "b"}]}]
    records, _ = load_records([_write_jsonl(tmp_path / "d.jsonl", rows)], log=_quiet)
    assert [r.messages for r in records] == [
        rows[0]["messages"],
        [{"role": "system", "content": "s"}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
    ]


MIXED_CHAT = [
    {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], "conversations": None},
    {"messages": None, "conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
]
MIXED_EXPECTED = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
]


def test_parquet_mixing_messages_and_sharegpt_columns(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.formats import load_records

    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(MIXED_CHAT), path)
    records, _ = load_records([str(path)], log=_quiet)
    assert [r.messages for r in records] == MIXED_EXPECTED


def test_csv_mixing_messages_and_sharegpt_columns(tmp_path):
    from posttrain.data.formats import load_records

    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["messages", "conversations"])
        for row in MIXED_CHAT:
            w.writerow([json.dumps(row[k]) if row[k] is not None else "" for k in ("messages", "conversations")])
    records, _ = load_records([str(path)], log=_quiet)
    assert [r.messages for r in records] == MIXED_EXPECTED


def test_streaming_records_equal_loaded_records_including_skips(tmp_path):
    from posttrain.data.formats import DataReport, iter_records, load_records

    rows = []
    for i in range(30):
        rows.append({"instruction": f"q{i}", "output": f"a{i}"} if i % 7 else {"instruction": f"q{i}"})
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    loaded, rep = load_records([path], bad_rows="skip", max_bad_fraction=0.5, log=_quiet)
    report = DataReport()
    streamed = list(iter_records([path], bad_rows="skip", max_bad_fraction=0.5, log=_quiet, report=report))
    assert [(r.messages, r.source) for r in streamed] == [(r.messages, r.source) for r in loaded]
    assert (report.total, report.good, report.bad) == (30, 25, 5)
    assert [r.messages[0]["content"] for r in loaded] == [f"q{i}" for i in range(30) if i % 7]


# --------------------------------------------------------------------------- pipeline: split, length, streaming


def _data_cfg(**kw):
    from posttrain.config.sections import DataConfig

    base = dict(train_files=[], eval_fraction=0.0, max_length=64)
    base.update(kw)
    return DataConfig(**base)


def test_eval_split_is_reproducible_disjoint_and_sized(tok, tmp_path):
    from posttrain.data.pipeline import prepare_sft_data

    rows = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(40)]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _data_cfg(train_files=[path], eval_fraction=0.2)
    a = prepare_sft_data(cfg, tok, tmp_path / "r1", seed=3, log=_quiet)
    b = prepare_sft_data(cfg, tok, tmp_path / "r2", seed=3, log=_quiet)
    ev = [r.source for r in a.eval_records]
    assert ev == [r.source for r in b.eval_records]
    assert len(ev) == 8 and len(a.train) == 32 and len(a.eval) == 8
    train_ids = {tuple(e.input_ids) for e in a.train}
    eval_ids = {tuple(e.input_ids) for e in a.eval}
    assert not train_ids & eval_ids
    # every row is in exactly one side, and each example is the row's own encoding
    all_ids = set()
    for row in rows:
        msgs = [{"role": "user", "content": row["instruction"]}, {"role": "assistant", "content": row["output"]}]
        all_ids.add(tuple(_reference_labels(tok, msgs)[0]))
    assert train_ids | eval_ids == all_ids
    # the train side keeps file order
    lines = [int(e.source.rsplit(":", 1)[1]) for e in a.train]
    assert lines == sorted(lines)
    report = json.loads((tmp_path / "r1" / "data_report.json").read_text())
    assert report["train_examples"] == 32 and report["eval_examples"] == 8


def test_truncation_keeps_the_first_tokens_and_counts_what_was_cut(tok, tmp_path):
    from posttrain.data.pipeline import prepare_sft_data

    long_out = " ".join(["a b c d"] * 20)
    rows = [{"instruction": "short", "output": "ok"},
            {"instruction": "long", "output": long_out},
            {"instruction": " ".join(["p q"] * 40), "output": "lost"}]  # answer entirely past the cut
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _data_cfg(train_files=[path], max_length=24)
    data = prepare_sft_data(cfg, tok, tmp_path / "r", seed=0, log=_quiet)
    refs = [_reference_labels(tok, [{"role": "user", "content": r["instruction"]},
                                   {"role": "assistant", "content": r["output"]}]) for r in rows]
    assert len(refs[1][0]) > 24 and len(refs[2][0]) > 24 and len(refs[0][0]) <= 24
    assert [(e.input_ids, e.labels) for e in data.train] == [refs[0], (refs[1][0][:24], refs[1][1][:24])]
    length = json.loads((tmp_path / "r" / "data_report.json").read_text())["train_length"]
    assert length["num_too_long"] == 2 and length["num_lost_labels"] == 1


def test_drop_policy_drops_every_overlong_example(tok, tmp_path):
    from posttrain.data.pipeline import prepare_sft_data

    rows = [{"instruction": "short", "output": "ok"}, {"instruction": "long", "output": " ".join(["a b"] * 40)}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_sft_data(_data_cfg(train_files=[path], max_length=24, overlength="drop"), tok, tmp_path / "r",
                            seed=0, log=_quiet)
    ref = _reference_labels(tok, [{"role": "user", "content": "short"}, {"role": "assistant", "content": "ok"}])
    assert [(e.input_ids, e.labels) for e in data.train] == [ref]


def test_streamed_examples_equal_in_memory_examples(tok, tmp_path):
    from posttrain.data.pipeline import prepare_sft_data, stream_sft_examples

    rows = []
    for i in range(12):
        if i % 3 == 0:
            rows.append({"messages": [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": "x " * i},
                                      {"role": "user", "content": "more"},
                                      {"role": "assistant", "content": "y " * (i + 1)}]})
        else:
            rows.append({"instruction": f"i{i}"} if i == 5 else
                        {"messages": [{"role": "user", "content": "w " * (3 * i)},
                                      {"role": "assistant", "content": f"r{i}"}]})
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = _data_cfg(train_files=[path], max_length=20, bad_rows="skip", max_bad_fraction=0.2)
    mem = prepare_sft_data(cfg, tok, tmp_path / "r1", seed=0, log=_quiet).train
    streamed = list(stream_sft_examples(cfg, tok, tmp_path / "r2", log=_quiet))
    assert [(e.input_ids, e.labels, e.source) for e in streamed] == [(e.input_ids, e.labels, e.source) for e in mem]
    # independently: every good row, cut to 20 tokens, kept when a label survives the cut
    expected = []
    for line, row in enumerate(rows, 1):
        if "messages" not in row or any(not m["content"].strip() for m in row["messages"]):
            continue  # bad rows (missing keys, an empty assistant turn) are skipped
        ids, labels = _reference_labels(tok, row["messages"])
        if any(l != IGNORE_INDEX for l in labels[:20]):
            expected.append((ids[:20], labels[:20], f"{path}:{line}"))
    assert [(e.input_ids, e.labels, e.source) for e in mem] == expected
    assert 3 < len(expected) < 11  # some rows were cut, some lost every label


def _run_cfg(tmp_path, **sections):
    from posttrain.config import SFTConfig

    data = {
        "output_dir": str(tmp_path / "run"),
        "model": {"path": "tiny"},
        "data": {"max_length": 32, "eval_fraction": 0.0},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, "progress_bar": False, "resume": "never"},
    }
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    return SFTConfig.from_dict(data)


@pytest.fixture(scope="module")
def streamed_run(tmp_path_factory):
    """One streamed SFT run (1 step) with an eval file and over-long rows."""
    from posttrain.train.sft import run_sft

    tmp = tmp_path_factory.mktemp("stream")
    train = _write_jsonl(tmp / "t.jsonl", [{"instruction": f"say {i}", "output": "ok " * 40} for i in range(8)])
    ev = _write_jsonl(tmp / "e.jsonl", [{"instruction": f"say {i}", "output": "ok"} for i in range(4)])
    cfg = _run_cfg(tmp, data={"train_files": [train], "eval_files": [ev], "streaming": True})
    run_dir = run_sft(cfg)
    return run_dir


def test_streaming_run_evaluates_its_eval_files(streamed_run):
    summary = json.loads((streamed_run / "summary.json").read_text())
    assert summary["eval_loss"] is not None


def test_streaming_run_saves_a_data_report(streamed_run):
    assert (streamed_run / "data_report.json").is_file()


# --------------------------------------------------------------------------- collation, packing, plans


def _examples_from_convs(tok, convs):
    from posttrain.data.templates import encode_record, resolve_template

    template = resolve_template(tok, "auto")
    return [encode_record(Record(messages=m, source=f"c:{i}"), tok, template) for i, m in enumerate(convs)]


def test_collate_right_pads_with_pad_id_and_masks_labels(tok):
    from posttrain.data.batching import collate

    exs = _examples_from_convs(tok, CONVS)
    batch = collate(exs, tok.pad_token_id, pad_to_multiple_of=8)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= max(len(e) for e in exs) and width - max(len(e) for e in exs) < 8
    for row, e in enumerate(exs):
        n = len(e)
        assert batch["input_ids"][row].tolist() == e.input_ids + [tok.pad_token_id] * (width - n)
        assert batch["labels"][row].tolist() == e.labels + [IGNORE_INDEX] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)


def test_packed_rows_keep_labels_inside_their_example_and_restart_positions(tok):
    from posttrain.data.batching import pack

    exs = _examples_from_convs(tok, CONVS) + [Example([5, 6, 7, 8], [5, 6, 7, 8], "t:1")]
    max_len = 96
    rows = pack(exs, max_len)
    seen = []
    for row in rows:
        assert len(row.input_ids) == len(row.labels) == len(row.position_ids) <= max_len
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        bounds = starts + [len(row.input_ids)]
        for s, e in zip(bounds, bounds[1:]):
            assert row.position_ids[s:e] == list(range(e - s))
            # find the example this segment is
            match = [x for x in exs if x.input_ids == row.input_ids[s:e]]
            assert match, "segment is not one whole example"
            ex = match[0]
            seen.append(id(ex))
            # first token of every segment carries no label; the rest are the example's labels
            assert row.labels[s] == IGNORE_INDEX
            assert row.labels[s + 1:e] == ex.labels[1:]
    assert sorted(seen) == sorted(id(x) for x in exs)
    assert sum(len(r) for r in rows) == sum(len(x) for x in exs)


def test_packed_batch_per_token_losses_equal_each_example_alone(tok, tiny):
    """Through the product's SFT path (collate_packed + CausalLMLoss) the packed loss must equal the
    sum of float64 per-token losses of each example run ALONE through plain transformers."""
    from posttrain.data.batching import collate_packed, pack
    from posttrain.models.loading import final_hidden_and_head
    from posttrain.train.sft import CausalLMLoss

    exs = _examples_from_convs(tok, CONVS) + [Example(list(range(10, 30)), list(range(10, 30)), "t:1")]
    rows = pack(exs, 128)
    assert len(rows) < len(exs)  # something really got packed
    batch = collate_packed(rows, tok.pad_token_id)
    with torch.no_grad():
        alone = {}
        for e in exs:
            ids = torch.tensor([e.input_ids])
            logits = tiny(input_ids=ids, use_cache=False).logits[0]
            ce, mask = _ce64_per_token(logits, torch.tensor(e.labels))
            alone[tuple(e.input_ids)] = ce[mask]
        total_ref = sum(float(v.sum()) for v in alone.values())
        # per token, through the product's hidden path on the packed batch
        hidden, weight, bias = final_hidden_and_head(tiny, input_ids=batch["input_ids"],
                                                     position_ids=batch["position_ids"], attention_mask=None)
        logits = hidden.double() @ weight.double().T
        for r, row in enumerate(rows):
            starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row)]
            for s, e in zip(starts, starts[1:]):
                seg_logits = logits[r, s:e]
                ce, mask = _ce64_per_token(seg_logits, batch["labels"][r, s:e])
                ref = alone[tuple(row.input_ids[s:e])]
                torch.testing.assert_close(ce[mask], ref, rtol=1e-5, atol=1e-5)
        loss = CausalLMLoss(tiny, loss="chunked", chunk_size=7)(**batch)
        plain = CausalLMLoss(tiny, loss="plain")(**batch)
    assert float(loss) == pytest.approx(total_ref, rel=1e-5)
    assert float(plain) == pytest.approx(total_ref, rel=1e-5)


def test_padded_batch_with_left_padding_equals_alone(tok, tiny):
    """A left-padded batch (mask kept, no position ids) through CausalLMLoss: same summed loss as
    each example alone (RoPE is relative, and the mask hides the pads)."""
    from posttrain.train.sft import CausalLMLoss

    exs = _examples_from_convs(tok, CONVS)
    width = max(len(e) for e in exs)
    ids = torch.full((len(exs), width), tok.pad_token_id)
    labels = torch.full((len(exs), width), IGNORE_INDEX)
    mask = torch.zeros((len(exs), width), dtype=torch.long)
    ref = 0.0
    with torch.no_grad():
        for r, e in enumerate(exs):
            n = len(e)
            ids[r, width - n:] = torch.tensor(e.input_ids)
            labels[r, width - n:] = torch.tensor(e.labels)
            mask[r, width - n:] = 1
            logits = tiny(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            ce, m = _ce64_per_token(logits, torch.tensor(e.labels))
            ref += float(ce[m].sum())
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        got = CausalLMLoss(tiny, loss="chunked")(input_ids=ids, labels=labels, attention_mask=mask,
                                                 position_ids=positions)
    assert float(got) == pytest.approx(ref, rel=1e-5)


@pytest.mark.parametrize("group", [False, True])
def test_plan_batches_covers_every_index_once_and_is_reproducible(group):
    from posttrain.data.batching import plan_batches

    rng = random.Random(1)
    lengths = [rng.randrange(1, 300) for _ in range(437)]
    plan = plan_batches(lengths, 8, seed=5, epoch=2, group_by_length=group)
    assert plan == plan_batches(lengths, 8, seed=5, epoch=2, group_by_length=group)
    assert plan != plan_batches(lengths, 8, seed=5, epoch=3, group_by_length=group)
    flat = [i for b in plan for i in b]
    assert sorted(flat) == list(range(437))
    assert sum(len(b) < 8 for b in plan) == 1 and len(plan) == -(-437 // 8)
    if group:
        assert max(lengths[i] for i in plan[0]) == max(lengths)


# --------------------------------------------------------------------------- losses


@pytest.mark.parametrize("chunk", [1, 2, 5, 17, 37, 38, 1000])
@pytest.mark.parametrize("ignore", [IGNORE_INDEX, -1])
def test_chunked_loss_and_grads_equal_float64_cross_entropy(chunk, ignore):
    from posttrain.losses.language_modeling import chunked_linear_cross_entropy

    g = torch.Generator().manual_seed(chunk)
    n, h, v = 37, 12, 29
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    bias = torch.randn(v, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.3] = ignore
    targets[0] = ignore
    loss = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=chunk, ignore_index=ignore)
    (loss * 0.37).backward()
    loss = loss.detach()
    # reference in float64, written out
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    z = h64 @ w64.T + b64
    keep = targets != ignore
    ref = (torch.logsumexp(z[keep], -1) - z[keep].gather(1, targets[keep][:, None]).squeeze(1)).sum()
    (ref * 0.37).backward()
    assert float(loss) == pytest.approx(float(ref.detach()), rel=1e-5)
    for got, want in [(hidden.grad, h64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)]:
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5)
    assert torch.all(hidden.grad[~keep] == 0)


def test_plain_cross_entropy_sum_respects_ignore_index():
    from posttrain.losses.language_modeling import cross_entropy_sum

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 11, generator=g)
    targets = torch.randint(0, 11, (2, 6), generator=g)
    targets[0, :3] = -1
    got = cross_entropy_sum(logits, targets, ignore_index=-1)
    z = logits.double().reshape(-1, 11)
    y = targets.reshape(-1)
    keep = y != -1
    ref = (torch.logsumexp(z[keep], -1) - z[keep].gather(1, y[keep][:, None]).squeeze(1)).sum()
    assert float(got) == pytest.approx(float(ref), rel=1e-6)


def test_causal_lm_loss_equals_transformers_forward_loss_sum(tok, tiny):
    """CausalLMLoss (chunked, several chunk sizes, and plain) on a right-padded batch equals the float64
    sum of per-token cross-entropies from the model's own logits."""
    from posttrain.data.batching import collate
    from posttrain.train.sft import CausalLMLoss

    exs = _examples_from_convs(tok, CONVS)
    batch = collate(exs, tok.pad_token_id)
    with torch.no_grad():
        logits = tiny(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        ref = 0.0
        for r in range(len(exs)):
            ce, m = _ce64_per_token(logits[r], batch["labels"][r])
            ref += float(ce[m].sum())
        n_tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        for chunk in (1, 3, n_tokens, n_tokens + 1, 10_000):
            got = CausalLMLoss(tiny, loss="chunked", chunk_size=chunk)(**batch)
            assert float(got) == pytest.approx(ref, rel=1e-5), chunk
        assert float(CausalLMLoss(tiny, loss="plain")(**batch)) == pytest.approx(ref, rel=1e-5)


def test_sft_stage_weight_counts_the_tokens_the_loss_sums_over(tok):
    from posttrain.data.batching import collate, collate_packed, pack
    from posttrain.train.sft import SFTStage

    exs = _examples_from_convs(tok, CONVS) + [Example([9, 8, 7], [9, 8, 7], "t")]
    # tokens that are predicted: every labelled token except an example's first position
    expected = sum(sum(1 for l in e.labels[1:] if l != IGNORE_INDEX) for e in exs)
    stage = SFTStage.__new__(SFTStage)
    assert stage.weight(collate(exs, tok.pad_token_id)) == expected
    assert stage.weight(collate_packed(pack(exs, 200), tok.pad_token_id)) == expected


def test_gradient_accumulation_normalises_per_token_across_unequal_micro_batches(tok):
    """Two micro-batches with very different label-token counts: the accumulated gradient must be the
    gradient of (sum of all token losses) / (all tokens), i.e. one big batch, not a mean of means."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from posttrain.data.batching import collate
    from posttrain.models.presets import preset_path
    from posttrain.train.loop import _train_step
    from posttrain.train.sft import CausalLMLoss, SFTStage

    exs = _examples_from_convs(tok, CONVS)
    small = [Example(exs[2].input_ids, exs[2].labels, "s")]
    big = [exs[0], exs[1], exs[3]]
    counts = [sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in small], [
        sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in big]
    assert sum(counts[1]) > 3 * sum(counts[0])

    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny-2l"), dtype=torch.float32)
    module = CausalLMLoss(model, loss="chunked", chunk_size=5)

    class _Cfg:
        max_grad_norm = 0.0

    stage = SFTStage.__new__(SFTStage)
    micro = [collate(small, tok.pad_token_id), collate(big, tok.pad_token_id)]
    accelerator = Accelerator(cpu=True)
    model.zero_grad()
    loss, _, _ = _train_step(module, stage, micro, accelerator, _Cfg())
    got = {n: p.grad.detach().clone() for n, p in model.named_parameters()}

    # reference: one forward per example, float64 token sum / total tokens
    model.zero_grad()
    total = 0
    ref_loss = 0.0
    for e in small + big:
        logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
        ce, m = _ce64_per_token(logits, torch.tensor(e.labels))
        total += int(m.sum())
        (ce[m].sum()).backward()
        ref_loss += float(ce[m].sum().detach())
    for p in model.parameters():
        p.grad /= total
    assert loss == pytest.approx(ref_loss / total, rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad.float(), rtol=1e-4, atol=1e-6, msg=n)


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_grad_accum_two_by_two_equals_one_batch_of_four_end_to_end(tmp_path):
    """run_sft with batch 2 × accumulation 2 against batch 4 × 1 on the same first four examples
    (the plan's shuffle does not depend on the batch size), rows of very unequal label counts."""
    from posttrain.train.sft import run_sft

    rows = []
    for i in range(8):
        out = "a b " * (1 + 12 * (i % 2))  # 2 or 26 answer tokens
        rows.append({"instruction": f"q {i}", "output": out})
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    runs = {}
    for name, bs, acc in [("acc", 2, 2), ("one", 4, 1)]:
        cfg = _run_cfg(tmp_path / name, data={"train_files": [path], "max_length": 64},
                       train={"batch_size": bs, "grad_accum": acc, "max_steps": 2, "schedule": "constant",
                              "max_grad_norm": 0.0})
        runs[name] = [m["loss"] for m in _metrics(run_sft(cfg)) if "loss" in m]
    assert len(runs["acc"]) == 2
    assert runs["acc"] == pytest.approx(runs["one"], rel=1e-4)


def test_eval_loss_is_the_per_token_mean_over_unequal_eval_batches(tok):
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from posttrain.config import SFTConfig
    from posttrain.models.presets import preset_path
    from posttrain.train.loop import evaluate
    from posttrain.train.sft import CausalLMLoss, SFTStage

    exs = _examples_from_convs(tok, CONVS) + [Example(list(range(40, 90)), list(range(40, 90)), "t")]
    model = AutoModelForCausalLM.from_pretrained(preset_path("tiny-2l"), dtype=torch.float32)
    for packing in (False, True):
        cfg = SFTConfig.from_dict({"data": {"packing": packing}, "train": {"batch_size": 2}})
        stage = SFTStage(CausalLMLoss(model, loss="chunked"), [], exs, cfg, tok.pad_token_id)
        got, _ = evaluate(stage.module, stage, Accelerator(cpu=True))
        total, tokens = 0.0, 0
        with torch.no_grad():
            for e in exs:
                logits = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
                ce, m = _ce64_per_token(logits, torch.tensor(e.labels))
                total += float(ce[m].sum())
                tokens += int(m.sum())
        assert got == pytest.approx(total / tokens, rel=1e-5), packing


def _csv_with_bad_byte(tmp_path, bad_line=301, n=500):
    lines = [b"instruction,output"]
    for line in range(2, n + 1):
        lines.append(b"q\xe9,a" if line == bad_line else b"q%d,a%d" % (line, line))
    path = tmp_path / "b.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def test_csv_non_utf8_row_is_reported_at_its_own_line(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.errors import DataError

    path = _csv_with_bad_byte(tmp_path)
    with pytest.raises(DataError) as info:
        load_records([path], log=_quiet)
    assert f"{path}:301" in str(info.value)


def test_csv_non_utf8_row_is_one_bad_row_under_skip(tmp_path):
    from posttrain.data.formats import load_records

    path = _csv_with_bad_byte(tmp_path)
    records, report = load_records([path], bad_rows="skip", max_bad_fraction=0.5, log=_quiet)
    assert (report.total, report.bad, len(records)) == (499, 1, 498)
    assert report.first_bad[0].location == f"{path}:301"


def test_csv_long_fields_and_multiline_cells_keep_their_line_numbers(tmp_path):
    from posttrain.data.formats import load_records

    long_output = "z" * 300_000  # above csv's default 128 KiB field limit
    rows = [{"instruction": "first\nspans\nthree lines", "output": "a"},
            {"instruction": "long", "output": long_output},
            {"instruction": "last", "output": "b"}]
    path = tmp_path / "d.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "output"])
        w.writeheader()
        w.writerows(rows)
    records, _ = load_records([str(path)], log=_quiet)
    assert [r.source for r in records] == [f"{path}:2", f"{path}:5", f"{path}:6"]
    assert records[1].messages[-1]["content"] == long_output
    assert records[0].messages[0]["content"] == "first\nspans\nthree lines"


def test_streamed_micro_batches_hold_every_streamed_example_once_packed_or_not(tok):
    from posttrain.config import SFTConfig
    from posttrain.train.sft import SFTStage

    exs = _examples_from_convs(tok, CONVS * 2) + [Example(list(range(20, 27)), list(range(20, 27)), "t")]
    for packing in (False, True):
        cfg = SFTConfig.from_dict({"data": {"packing": packing, "max_length": 128}, "train": {"batch_size": 3}})
        stage = SFTStage(None, None, [], cfg, tok.pad_token_id, stream=lambda: iter(exs))
        segments = []
        for batch in stage.micro_batches(0):
            ids, labels = batch["input_ids"], batch["labels"]
            if packing:
                assert "attention_mask" not in batch
                pos = batch["position_ids"]
            for r in range(ids.shape[0]):
                if packing:
                    starts = [i for i in range(ids.shape[1]) if pos[r, i] == 0] + [ids.shape[1]]
                    bounds = list(zip(starts, starts[1:]))
                else:
                    n = int(batch["attention_mask"][r].sum())
                    bounds = [(0, n)]
                for s, e in bounds:
                    seg = ids[r, s:e].tolist()
                    if all(t == tok.pad_token_id for t in seg):
                        continue  # the pad tail of a packed row
                    segments.append((seg, labels[r, s + 1:e].tolist()))
        expected = [(e.input_ids, e.labels[1:]) for e in exs]
        assert sorted(segments) == sorted(expected), packing


@pytest.mark.parametrize("ignore", [IGNORE_INDEX, -1])
@pytest.mark.parametrize("chunk", [1, 4, 1000])
def test_sequence_logps_and_shift_respect_a_custom_ignore_index(ignore, chunk):
    from posttrain.losses.language_modeling import sequence_logps, shift_for_causal_lm

    g = torch.Generator().manual_seed(7)
    b, t, h, v = 3, 9, 8, 13
    hidden = torch.randn(b, t, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :4] = ignore
    labels[1, 6:] = ignore
    labels[2, :] = ignore
    logps, counts = sequence_logps(hidden, weight, labels, chunk_size=chunk, ignore_index=ignore)
    z = hidden.double() @ weight.double().T
    for r in range(b):
        ref, n = 0.0, 0
        for s in range(1, t):
            y = int(labels[r, s])
            if y == ignore:
                continue
            ref += float(torch.log_softmax(z[r, s - 1], -1)[y])
            n += 1
        assert float(logps[r]) == pytest.approx(ref, rel=1e-5, abs=1e-6)
        assert int(counts[r]) == n
    selected, targets = shift_for_causal_lm(hidden, labels, ignore_index=ignore)
    assert targets.tolist() == [int(y) for y in labels[:, 1:].flatten() if int(y) != ignore]
    assert selected.shape == (len(targets), h)
