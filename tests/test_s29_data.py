"""Data readers beyond the migrant walkthrough's pins: Python-repr CSV cells, prompts already
rendered with the chat template, sft's prompt-completion rows, content parts, one-row .json
files, KTO's integer labels, and what is refused before a model loads."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from posttrain import cli
from posttrain.data.formats import decode_cell, load_records
from posttrain.data.preferences import encode_preference, load_preference_records
from posttrain.data.prompts import encode_prompts, load_prompt_records
from posttrain.data.readers import check_path, iter_rows
from posttrain.data.templates import encode_record
from posttrain.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def _quiet(_):
    return None


@pytest.fixture(scope="module")
def tok():
    from posttrain.data.templates import adopt_template
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    return tokenizer, adopt_template(tokenizer, "auto")


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _csv(path: Path, header: list[str], rows: list[list]) -> str:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows([[v if isinstance(v, str) else str(v) for v in row] for row in rows])
    return str(path)


def _labelled(example, tokenizer) -> str:
    return tokenizer.decode([t for t in example.labels if t != -100])


# --------------------------------------------------------------------------- CSV cells


def test_decode_cell_reads_json_and_python_literals_and_runs_no_code():
    assert decode_cell('[{"role": "user", "content": "q"}]') == [U("q")]
    assert decode_cell("[{'role': 'user', 'content': 'q', 'name': None}]") == [{**U("q"), "name": None}]
    with pytest.raises(ValueError):
        decode_cell("[__import__('os').getcwd()]")


def test_sft_messages_cell_as_python_repr(tmp_path):
    path = _csv(tmp_path / "chat.csv", ["messages"], [[[U("q"), A("a")]]] * 2)
    records, _ = load_records([path], log=_quiet)
    assert records[0].messages == [U("q"), A("a")]


def test_a_cell_that_starts_like_turns_but_does_not_parse_is_a_bad_row(tmp_path):
    # a comma missing inside a dict: neither JSON nor a literal, nor numpy's repr of a list (which
    # leaves the commas out between elements only, and is read: tests/test_walkthrough_interop.py)
    broken = "[{'role': 'user', 'content': 'q'}\n {'role': 'user' 'content': 'r'}]"
    path = _csv(tmp_path / "p.csv", ["prompt", "chosen", "rejected"], [[broken, "a", "b"]])
    with pytest.raises(DataError, match=r"p\.csv:2: 'prompt' starts like a list of turns but is neither JSON"):
        load_preference_records([path], log=_quiet)


def test_rl_conversation_cell_ending_with_the_user_is_all_prompt(tmp_path):
    path = _csv(tmp_path / "p.csv", ["messages"], [[[U("q"), A("a"), U("r")]]] * 2)
    records, _ = load_prompt_records([path], log=_quiet)
    assert records[0].prompt == [U("q"), A("a"), U("r")] and records[0].answer is None


# --------------------------------------------------------------------------- rendered prompts


def test_rendered_prompt_markers_come_from_the_template(tok):
    from posttrain.data.templates import ALPACA, CHATML, check_not_rendered, role_markers

    tokenizer, template = tok
    assert "<|im_start|>" in role_markers(tokenizer, template)
    assert "### Instruction:\n" in role_markers(tokenizer, ALPACA)
    check_not_rendered([U("What does the im_start token do?")], tokenizer, CHATML, "x:1")  # plain text passes
    with pytest.raises(DataError, match=r"x:1: this prompt is already rendered with a chat template"):
        check_not_rendered([U("### Instruction:\nq\n\n### Response:\n")], tokenizer, ALPACA, "x:1")


def test_rendered_prompts_follow_the_bad_row_policy(tmp_path, tok):
    tokenizer, template = tok
    rendered = tokenizer.apply_chat_template([U("q")], tokenize=False, add_generation_prompt=True)
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "plain"}, {"prompt": rendered}])
    records, _ = load_prompt_records([path], log=_quiet)
    logged = []
    skip = SimpleNamespace(bad_rows="skip", max_bad_fraction=0.5)
    ids, kept = encode_prompts(records, tokenizer, template, 256, logged.append, cfg=skip)
    assert [r.source for r in kept] == [f"{path}:1"] and len(ids) == 1
    assert any("skipped 1 of 2" in line and f"{path}:2" in line for line in logged), logged
    with pytest.raises(DataError, match="more than max_bad_fraction"):
        encode_prompts(records, tokenizer, template, 256, _quiet, cfg=SimpleNamespace(bad_rows="skip",
                                                                                     max_bad_fraction=0.1))


def test_rendered_pair_prompt_is_refused_with_its_line(tmp_path, tok):
    tokenizer, template = tok
    rendered = tokenizer.apply_chat_template([U("q")], tokenize=False, add_generation_prompt=True)
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"},
                                         {"prompt": rendered, "chosen": "a", "rejected": "b"}])
    records, _ = load_preference_records([path], log=_quiet)
    encode_preference(records[0], tokenizer, template)
    with pytest.raises(DataError, match=rf"{path}:2: this prompt is already rendered"):
        encode_preference(records[1], tokenizer, template)


# --------------------------------------------------------------------------- prompt-completion


def test_prompt_completion_trains_only_the_completion_not_the_prompts_assistant_turns(tmp_path, tok):
    tokenizer, template = tok
    row = {"prompt": [U("Hi"), A("Hello there."), U("Sky colour?")], "completion": [A("Blue.")]}
    records, report = load_records([_jsonl(tmp_path / "pc.jsonl", [row])], log=_quiet)
    assert report.files[0].format == "prompt_completion" and records[0].prompt_turns == 3
    assert _labelled(encode_record(records[0], tokenizer, template), tokenizer) == "Blue.<|im_end|>"


def test_prompt_completion_with_a_system_key_and_csv_cells(tmp_path, tok):
    tokenizer, template = tok
    path = _csv(tmp_path / "pc.csv", ["system", "prompt", "completion"], [["Be brief.", "Sky?", "Blue."]])
    records, _ = load_records([path], log=_quiet)
    assert records[0].messages == [{"role": "system", "content": "Be brief."}, U("Sky?"), A("Blue.")]


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "completion": "a", "label": False}, "'label' marks an unpaired preference row"),
    ({"prompt": "q", "completion": [U("a")]}, "'completion' starts with a user turn"),
    ({"prompt": [A("a")], "completion": "b"}, "must end with a user turn"),
])
def test_prompt_completion_bad_rows(tmp_path, row, reason):
    good = {"prompt": "q", "completion": "a"}
    path = _jsonl(tmp_path / "pc.jsonl", [good, row])
    with pytest.raises(DataError, match=rf"pc\.jsonl:2: .*{reason}"):
        load_records([path], log=_quiet)


# --------------------------------------------------------------------------- content parts


def test_content_parts_as_parquet_gives_them_and_a_non_text_part_is_a_bad_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    text = {"type": "text", "text": "Sky?"}
    image = {"type": "image", "text": None}
    rows = [{"messages": [{"role": "user", "content": [text]}, {"role": "assistant", "content": [{**text,
                                                                                                   "text": "Blue."}]}]},
            {"messages": [{"role": "user", "content": [text, image]}, {"role": "assistant", "content": [text]}]}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")  # every part gets both keys
    records, report = load_records([str(tmp_path / "c.parquet")], bad_rows="skip", max_bad_fraction=0.5, log=_quiet)
    assert records[0].messages == [U("Sky?"), A("Blue.")]
    assert "turn 1 (user) content is a list with 'image' parts" in report.first_bad[0].reason


# --------------------------------------------------------------------------- .json files


@pytest.mark.parametrize("row", [
    {"prompt": "q", "chosen": "a", "rejected": "b"},
    {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1]},
    {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")]},
])
def test_a_one_row_json_file_is_one_preference_row(tmp_path, row):
    (tmp_path / "one.json").write_text(json.dumps(row) + "\n")
    records, report = load_preference_records([str(tmp_path / "one.json")], log=_quiet)
    assert report.total == 1 and records[0].responses == ["a", "b"]


def test_json_wrappers_and_objects_of_columns_are_still_told_apart(tmp_path):
    wrapper = tmp_path / "w.json"
    wrapper.write_text(json.dumps({"version": 1, "data": [{"text": "a"}, {"text": "b"}]}))
    assert [row for _, row in iter_rows(str(wrapper))] == [{"text": "a"}, {"text": "b"}]
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({"text": ["a", "b"]}))
    with pytest.raises(DataError, match="exactly one list-valued key"):
        list(iter_rows(str(columns)))


# --------------------------------------------------------------------------- KTO labels


def test_kto_labels_accept_integer_0_and_1_and_refuse_other_numbers(tmp_path):
    rows = [{"prompt": "q", "completion": "a", "label": 1}, {"prompt": "r", "completion": "b", "label": 0}]
    records, _ = load_preference_records([_jsonl(tmp_path / "k.jsonl", rows)], log=_quiet)
    assert [r.desirable for r in records] == [True, False]
    for label in (2, 0.5, 1.0):
        path = _jsonl(tmp_path / "k.jsonl", [*rows, {"prompt": "s", "completion": "c", "label": label}])
        with pytest.raises(DataError, match=rf"k\.jsonl:3: 'label' is {label}, expected true or false"):
            load_preference_records([path], log=_quiet)


# --------------------------------------------------------------------------- paths, before the model loads


def test_missing_path_hints(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "data").mkdir()
    with pytest.raises(DataError, match="wildcards are not expanded: list the files .it matches 1: a.jsonl"):
        check_path("*.jsonl")
    with pytest.raises(DataError) as exc:
        check_path("org/some_dataset")
    assert "reads local files only" in str(exc.value) and "save_to_disk" in str(exc.value)
    with pytest.raises(DataError) as exc:
        check_path("data/missing")  # a local directory that exists: a typo, not a Hub name
    assert "Hub" not in str(exc.value)


@pytest.fixture
def no_model_load(monkeypatch):
    from posttrain.models import loading

    def refuse(*args, **kwargs):
        raise DataError("MODEL LOADED before the data was checked")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(loading, "load_model", refuse)


def _run(capsys, *argv) -> tuple[int, str]:
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.mark.parametrize("command, config, key", [
    ("dpo", "examples/dpo.yaml", "data.train_files"),  # sft rows where preference rows are needed
    ("sft", "examples/sft_full.yaml", "forgetting.retain_files"),  # rows of no sft format
])
def test_rows_no_reader_of_the_stage_takes_are_refused_before_the_model_loads(capsys, tmp_path, no_model_load,
                                                                             command, config, key):
    rows = [{"messages": [U("q"), A("a")]}] if command == "dpo" else [{"question": "q", "reply": "a"}]
    path = _jsonl(tmp_path / "d.jsonl", rows)
    rc, out = _run(capsys, command, config, "train.max_steps=1", f"output_dir={tmp_path / 'run'}", f"{key}=[{path}]")
    assert rc == 2 and "MODEL LOADED" not in out and f"{key}: {path}: cannot tell the" in out, out
