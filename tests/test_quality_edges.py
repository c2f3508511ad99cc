"""posttrain quality: edges of the whole pass (several files, CSV / Parquet / JSON arrays, every row
format, kept.jsonl read back by the training readers, PII redaction inside rows, dedup / decontamination
/ balance / token checks at their boundaries, stale outputs, the CLI).

The review's 14 defects (written first as strict xfails) are fixed; their tests are plain tests now."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from posttrain.config.quality import QualityConfig
from posttrain.data.formats import load_records
from posttrain.data.preferences import load_preference_records
from posttrain.data.quality.rows import convert
from posttrain.data.quality.run import run_quality
from posttrain.errors import DataError

QUIET = {"log": lambda _: None}


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return str(path)


def _csv(path: Path, rows: list[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


def _cfg(tmp_path: Path, files: list[str], **overrides) -> QualityConfig:
    items = [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps(files)}"]
    items += [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]
    return QualityConfig.load(None, items)


def _run(tmp_path: Path, files: list[str], **overrides) -> Path:
    return run_quality(_cfg(tmp_path, files, **overrides), **QUIET)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _report(out: Path) -> dict:
    return json.loads((out / "report.json").read_text(encoding="utf-8"))


def _accounted(out: Path) -> None:
    """rows in = kept + dropped + malformed, in the report and in the files."""
    report = _report(out)
    s = report["summary"]
    kept = [row for name in report["kept_files"] for row in _jsonl(out / name)]
    dropped, rejects = (_jsonl(out / name) for name in ("dropped.jsonl", "rejects.jsonl"))
    assert (len(kept), len(dropped), len(rejects)) == (s["kept"], s["dropped"], s["malformed"])
    assert s["kept"] + s["dropped"] + s["malformed"] == s["rows"]


def _qa(i: int, topic: str = "topic") -> dict:
    return {"instruction": f"Question {i} about the {topic} number {i * 7}?",
            "output": f"Answer {i}: the {topic} count is {i * 3} units."}


# --------------------------------------------------------------------------- several files and readers


def test_several_files_locations_per_file_and_cross_file_duplicates(tmp_path):
    a = _write(tmp_path / "a.jsonl", [_qa(0), _qa(1), "{broken"])
    b = _write(tmp_path / "b.jsonl", [_qa(2), _qa(1), {"instruction": "no output"}])
    out = _run(tmp_path, [a, b])
    _accounted(out)
    assert [d["location"] for d in _jsonl(out / "dropped.jsonl")] == [f"{b}:2"]
    assert _jsonl(out / "dropped.jsonl")[0]["detail"] == f"of {a}:2"
    assert [r["location"] for r in _jsonl(out / "rejects.jsonl")] == [f"{a}:3", f"{b}:3"]
    files = _report(out)["read"]["files"]
    assert [(f["path"], f["total"], f["good"], f["bad"]) for f in files] == [(a, 3, 2, 1), (b, 3, 2, 1)]


def test_json_array_rows_have_line_locations_and_non_objects_are_malformed(tmp_path):
    path = tmp_path / "arr.json"
    path.write_text('[\n {"instruction": "First q here", "output": "first a"},\n'
                    ' {"instruction": "First q here", "output": "first a"},\n 5\n]')
    out = _run(tmp_path, [str(path)])
    _accounted(out)
    assert _jsonl(out / "dropped.jsonl")[0]["location"] == f"{path}:3"
    assert _jsonl(out / "rejects.jsonl") == [{"location": f"{path}:4", "reason": "expected a JSON object, got a number",
                                              "row": 5}]


def test_parquet_extra_columns_non_strings_and_unicode_round_trip(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Héllo wörld, 你好?"},
                          {"role": "assistant", "content": "Grüße zurück, 你好。"}], "score": 1.5, "flag": True, "note": None},
            {"messages": [{"role": "user", "content": "Second question here"},
                          {"role": "assistant", "content": "Second answer there"}], "score": 2.0, "flag": False, "note": "x"}]
    path = tmp_path / "d.parquet"
    pd.DataFrame(rows).to_parquet(path)
    out = _run(tmp_path, [str(path)])
    _accounted(out)
    assert _jsonl(out / "kept.jsonl") == rows  # extra columns and their types as read
    assert "你好" in (out / "kept.jsonl").read_text(encoding="utf-8")  # ensure_ascii=False
    records, _ = load_records([str(out / "kept.jsonl")])
    assert records[0].messages == rows[0]["messages"]
    assert _report(out)["read"]["files"][0]["format"] == "messages"


def test_csv_sft_and_preference_rows_round_trip(tmp_path):
    turns = [{"role": "user", "content": "Say hello please"}, {"role": "assistant", "content": "Hello, friend!"}]
    sft = _csv(tmp_path / "sft.csv", [{"messages": json.dumps(turns), "category": "greet", "input": ""},
                                      {"messages": json.dumps([turns[0], {"role": "assistant", "content": "Hi!"}]),
                                       "category": "", "input": ""}])
    out = _run(tmp_path, [sft])
    _accounted(out)
    records, _ = load_records([str(out / "kept.jsonl")])
    assert [r.messages[-1]["content"] for r in records] == ["Hello, friend!", "Hi!"]

    prompt = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Pick a colour"}])
    pairs = _csv(tmp_path / "pairs.csv", [{"prompt": prompt, "chosen": "Blue.", "rejected": "I refuse.", "margin": "1.5"},
                                          {"prompt": "Pick a number", "chosen": "Seven.", "rejected": "No.", "margin": ""}])
    out = _run(tmp_path, [pairs])
    records, _ = load_preference_records([str(out / "kept.jsonl")])
    assert [r.responses for r in records] == [["Blue.", "I refuse."], ["Seven.", "No."]]
    assert records[0].prompt[0] == {"role": "system", "content": "Be brief."} and records[0].margin == 1.5

    kto = _csv(tmp_path / "kto.csv", [{"prompt": "Say yes", "completion": "Yes indeed.", "label": "true"},
                                      {"prompt": "Say no", "completion": "Nope, sorry.", "label": "false"}])
    out = _run(tmp_path, [kto])
    records, _ = load_preference_records([str(out / "kept.jsonl")])
    assert [r.desirable for r in records] == [True, False]


def test_every_row_format_in_one_pass_is_accounted_for(tmp_path):
    files = [
        _write(tmp_path / "text.jsonl", [{"text": "A plain document about gardening and soil."}]),
        _write(tmp_path / "sharegpt.jsonl", [{"conversations": [{"from": "system", "value": "Be nice."},
                                                                {"from": "human", "value": "Hi, who are you?"},
                                                                {"from": "gpt", "value": "A helpful assistant."}]}]),
        _write(tmp_path / "pairs.jsonl", [{"prompt": "Pick one please", "chosen": "The good one", "rejected": "Bad"}]),
        _write(tmp_path / "rank.jsonl", [{"prompt": "Rank these", "responses": ["best", "also best", "worst"],
                                          "ranks": [0, 0, 1]},
                                         {"prompt": "Rank again", "responses": ["x", "y"], "ranks": [0, 0]}]),
        _write(tmp_path / "kto.jsonl", [{"prompt": "Say it", "completion": "Sure thing", "label": True},
                                        {"prompt": "Say it rudely", "completion": "Go away", "desirable": False}]),
    ]
    out = _run(tmp_path, files)
    _accounted(out)
    s = _report(out)["summary"]
    assert (s["rows"], s["kept"], s["malformed"]) == (7, 6, 1)  # the all-tied ranking is malformed
    assert "tied" in _jsonl(out / "rejects.jsonl")[0]["reason"]
    assert [f["format"] for f in _report(out)["read"]["files"]] == ["text", "messages", "pairs", "ranking", "unpaired"]


def test_kept_rows_of_mixed_format_inputs_go_to_one_file_per_format_and_read_back(tmp_path):
    alpaca = _write(tmp_path / "a.jsonl", [_qa(i, "alpaca") for i in range(3)])
    chat = _write(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": f"Chat question {i} on {i * 11}"},
                                                       {"role": "assistant", "content": f"Chat answer {i} was {i * 5}"}]}
                                         for i in range(5)])
    out = _run(tmp_path, [alpaca, chat])
    files = _report(out)["kept_files"]
    assert files == ["kept-alpaca.jsonl", "kept-messages.jsonl"] and not (out / "kept.jsonl").exists()
    records, _ = load_records([str(out / f) for f in files])  # the training stages' default: bad_rows=error
    assert len(records) == 8


# --------------------------------------------------------------------------- PII inside rows


def test_pii_report_leaves_rows_as_read_and_redact_keeps_rows_valid(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Where do I write?"}, {"role": "assistant", "content": "jo@example.com"}],
             "id": 7, "ok": True},
            {"conversations": [{"from": "human", "value": "My IP is 8.8.8.8, ok?"}, {"from": "gpt", "value": "Noted."}]},
            {"prompt": "Card?", "chosen": "Never share 4111 1111 1111 1111.", "rejected": "Sure, here it is."}]
    sft = _write(tmp_path / "sft.jsonl", rows[:2])
    pref = _write(tmp_path / "pref.jsonl", rows[2:])
    out = _run(tmp_path, [sft], **{"pii.action": "report"})
    assert _jsonl(out / "kept.jsonl") == rows[:2]
    assert _report(out)["pii"]["matches"] == {"email": 1, "ip_address": 1}
    out = _run(tmp_path, [sft], **{"pii.action": "redact"})
    kept = _jsonl(out / "kept.jsonl")
    assert kept[0]["messages"][1] == {"role": "assistant", "content": "<EMAIL>"}  # a response that was only PII
    assert kept[0]["id"] == 7 and kept[0]["ok"] is True
    assert kept[1]["conversations"][0] == {"from": "human", "value": "My IP is <IP_ADDRESS>, ok?"}
    assert len(load_records([str(out / "kept.jsonl")])[0]) == 2
    out = _run(tmp_path, [pref])
    assert _jsonl(out / "kept.jsonl")[0]["chosen"] == "Never share <CREDIT_CARD>."
    text = (out / "report.json").read_text() + (out / "report.md").read_text()
    assert "4111" not in text


def test_redaction_can_make_rows_exact_duplicates(tmp_path):
    rows = [{"instruction": "Who to contact?", "output": "Write to ann@example.com today."},
            {"instruction": "Who to contact?", "output": "Write to bob@example.org today."}]
    out = _run(tmp_path, [_write(tmp_path / "d.jsonl", rows)])
    assert [d["reason"] for d in _jsonl(out / "dropped.jsonl")] == ["exact_duplicate"]
    assert "bob@" not in (out / "dropped.jsonl").read_text()  # dropped after redaction: redacted


def test_redaction_that_makes_chosen_equal_rejected_drops_the_row(tmp_path):
    rows = [{"prompt": "Who should I mail?", "chosen": "Mail ann@example.com now", "rejected": "Mail bob@example.com now"},
            {"prompt": "Say hi", "chosen": "Hello there!", "rejected": "Go away."}]
    out = _run(tmp_path, [_write(tmp_path / "p.jsonl", rows)])
    _accounted(out)
    assert _jsonl(out / "kept.jsonl") == [rows[1]]
    assert [d["location"].rsplit(":", 1)[1] for d in _jsonl(out / "dropped.jsonl")] == ["1"]


def test_redaction_that_makes_ranked_responses_equal_drops_the_row(tmp_path):
    rows = [{"prompt": "Which address?", "responses": ["Use ann@example.com", "Use bob@example.com", "No idea"]},
            {"prompt": "Rank these", "responses": ["good", "bad"]}]
    out = _run(tmp_path, [_write(tmp_path / "r.jsonl", rows)])
    _accounted(out)
    assert _jsonl(out / "kept.jsonl") == [rows[1]]


def test_redaction_in_csv_json_turns_keeps_the_cell_valid(tmp_path):
    turns = [{"role": "user", "content": "Who do I write to?"}, {"role": "assistant", "content": "Write to:\njo@example.com"}]
    out = _run(tmp_path, [_csv(tmp_path / "c.csv", [{"messages": json.dumps(turns)}])])
    records, _ = load_records([str(out / "kept.jsonl")])
    assert records[0].messages[1]["content"] == "Write to:\n<EMAIL>"


def test_pii_after_a_newline_in_csv_json_turns_is_redacted(tmp_path):
    turns = [{"role": "user", "content": "Phone?"}, {"role": "assistant", "content": "Call:\n415-555-0132 today"}]
    out = _run(tmp_path, [_csv(tmp_path / "c.csv", [{"messages": json.dumps(turns)}])])
    assert "555-0132" not in (out / "kept.jsonl").read_text()
    assert _report(out)["pii"]["matches"] == {"phone": 1}


def test_report_json_never_holds_pii_values(tmp_path):
    rows = [{"instruction": "AKIAIOSFODNN7EXAMPLE is my key, is it safe to share?", "output": "No, rotate it now."}]
    out = _run(tmp_path, [_write(tmp_path / "d.jsonl", rows)])
    assert "<SECRET>" in (out / "kept.jsonl").read_text()
    assert "akiaiosfodnn7example" not in (out / "report.json").read_text().lower()


# --------------------------------------------------------------------------- dedup


def _long(seed: str, n: int = 40) -> str:
    return " ".join(f"{seed}{i}" for i in range(n))


def test_near_duplicate_detail_names_the_kept_row_after_earlier_drops(tmp_path):
    base = _long("w")
    rows = [{"instruction": "Junk", "output": "Wow" + "!" * 60},                  # 1: char_run
            {"instruction": "Describe it", "output": base},                       # 2: kept
            {"instruction": "Something else", "output": _long("z")},              # 3: kept
            {"instruction": "describe IT", "output": base + " extra"},            # 4: near dup of 2
            {"instruction": "Describe, it", "output": base}]                      # 5: exact dup of 2 (punctuation)
    out = _run(tmp_path, [_write(tmp_path / "d.jsonl", rows)])
    _accounted(out)
    by_line = {d["location"].rsplit(":", 1)[1]: d for d in _jsonl(out / "dropped.jsonl")}
    assert by_line["1"]["reason"] == "char_run"
    assert by_line["5"]["reason"] == "exact_duplicate" and by_line["5"]["detail"].endswith("d.jsonl:2")
    assert by_line["4"]["reason"] == "near_duplicate" and "d.jsonl:2 (Jaccard" in by_line["4"]["detail"]
    assert sorted(by_line) == ["1", "4", "5"]
    dedup = _report(out)["dedup"]
    assert dedup["exact"]["duplicates"] == 1 and dedup["near"]["duplicates"] == 1


def test_short_rows_and_punctuation_only_differences(tmp_path):
    rows = [{"text": "OK"}, {"text": "ok!"}, {"text": "Okay."}, {"text": "Hello, world"}, {"text": "hello -- WORLD?"}]
    out = _run(tmp_path, [_write(tmp_path / "t.jsonl", rows)])
    assert [(d["location"].rsplit(":", 1)[1], d["reason"]) for d in _jsonl(out / "dropped.jsonl")] == \
        [("2", "exact_duplicate"), ("5", "exact_duplicate")]


def test_prompt_dedup_does_not_collapse_distinct_text_rows(tmp_path):
    rows = [{"text": "First completely different text here."}, {"text": "Another unrelated passage about cats."},
            {"text": "Third one on rockets and fuel."}]
    out = _run(tmp_path, [_write(tmp_path / "t.jsonl", rows)], **{"dedup.on": "prompt"})
    assert _jsonl(out / "kept.jsonl") == rows


# --------------------------------------------------------------------------- decontamination


QUESTION = "What is the boiling point of water at sea level in degrees Celsius?"
EVAL_ROWS = {
    "prompt": {"prompt": QUESTION, "answer": "100"},
    "alpaca": {"instruction": QUESTION, "output": "100"},
    "messages": {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "100"}]},
    "sharegpt": {"conversations": [{"from": "human", "value": QUESTION}, {"from": "gpt", "value": "100"}]},
    "pairs": {"prompt": QUESTION, "chosen": "100", "rejected": "50"},
    "ranking": {"prompt": QUESTION, "responses": ["100", "50"]},
    "unpaired": {"prompt": QUESTION, "completion": "100", "label": True},
}


@pytest.fixture
def train_file(tmp_path) -> str:
    return _write(tmp_path / "train.jsonl", [
        {"instruction": "Quick one. " + QUESTION + " Thanks!", "output": "It boils at 100 degrees."},
        {"instruction": "Tell me a joke", "output": "Why did the chicken cross the road? To get to the other side."},
        {"instruction": "Help with a quiz", "output": "Sure. The quiz asks: " + QUESTION.lower()},  # via the response
        {"instruction": "Something else entirely", "output": "An unrelated answer about gardening and soil."}])


@pytest.mark.parametrize("fmt", list(EVAL_ROWS))
def test_decontaminate_reads_each_eval_format(tmp_path, train_file, fmt):
    ev = _write(tmp_path / f"eval_{fmt}.jsonl", [EVAL_ROWS[fmt]])
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [ev]})
    dropped = _jsonl(out / "dropped.jsonl")
    assert [(d["location"].rsplit(":", 1)[1], d["reason"]) for d in dropped] == [("1", "contaminated"),
                                                                                 ("3", "contaminated")]
    assert dropped[0]["detail"].endswith(f"with {ev}:1")
    assert _report(out)["decontaminate"]["eval_rows_leaked"] == 1


def test_decontaminate_on_full_short_prompts_and_bad_eval_rows(tmp_path, train_file):
    ev = _write(tmp_path / "ev.jsonl", ["{not json", {"instruction": "unrelated q",
                                                      "output": "Why did the chicken cross the road? To get to the other side."}])
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [ev]})
    assert _jsonl(out / "dropped.jsonl") == [] and _report(out)["decontaminate"]["eval_rows"] == 1
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [ev], "decontaminate.on": "full"})
    assert [d["location"].rsplit(":", 1)[1] for d in _jsonl(out / "dropped.jsonl")] == ["2"]
    short = _write(tmp_path / "short.jsonl", [{"prompt": "Tell me a joke!"}])  # under 13 words: must appear whole
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [short]})
    assert [d["detail"] for d in _jsonl(out / "dropped.jsonl")] == [f"shares 'tell me a joke' with {short}:1"]


def test_missing_eval_file_is_a_clear_error(tmp_path, train_file):
    with pytest.raises(DataError, match="nope.jsonl: no such file"):
        _run(tmp_path, [train_file], **{"decontaminate.files": [str(tmp_path / "nope.jsonl")]})


def test_decontaminate_reads_pairs_without_a_prompt_key(tmp_path, train_file):
    turns = [{"role": "user", "content": QUESTION}]
    ev = _write(tmp_path / "ev.jsonl", [{"chosen": turns + [{"role": "assistant", "content": "100"}],
                                         "rejected": turns + [{"role": "assistant", "content": "50"}]}])
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [ev]})
    assert _report(out)["decontaminate"]["contaminated_rows"] == 2


def test_decontaminate_full_searches_eval_preference_responses(tmp_path, train_file):
    ev = _write(tmp_path / "ev.jsonl", [{"prompt": "unrelated q", "rejected": "no",
                                         "chosen": "Why did the chicken cross the road? To get to the other side."}])
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [ev], "decontaminate.on": "full"})
    assert [d["location"].rsplit(":", 1)[1] for d in _jsonl(out / "dropped.jsonl")] == ["2"]


def test_eval_row_without_a_prompt_is_skipped_not_fatal(tmp_path, train_file):
    ev = _write(tmp_path / "ev.jsonl", [{"prompt": QUESTION}, {"prompt": "Tell me a joke"}, {"query": "stray row"}])
    out = _run(tmp_path, [train_file], **{"decontaminate.files": [ev]})
    assert _report(out)["decontaminate"]["eval_rows"] == 2


# --------------------------------------------------------------------------- balance


def test_balance_missing_and_non_string_values_and_seed(tmp_path):
    rows = [_qa(i) | ({"level": i % 2} if i < 8 else {}) for i in range(10)]  # ints; rows 8, 9 lack the field
    path = _write(tmp_path / "d.jsonl", rows)
    out = _run(tmp_path, [path], **{"balance.field": "level", "balance.max_per_value": 2})
    _accounted(out)
    b = _report(out)["balance"]
    assert (b["dropped"], b["missing"]) == (4, 2)
    kept = _jsonl(out / "kept.jsonl")
    assert sum("level" not in r for r in kept) == 2 and sorted(r.get("level", -1) for r in kept) == [-1, -1, 0, 0, 1, 1]
    assert {d["detail"] for d in _jsonl(out / "dropped.jsonl")} <= {"level='0' over max_per_value=2",
                                                                   "level='1' over max_per_value=2"}
    assert dict(map(tuple, _report(out)["kept_stats"]["category"]["top"])) == {"0": 2, "1": 2, "<missing>": 2}
    again = _run(tmp_path, [path], **{"balance.field": "level", "balance.max_per_value": 2})
    assert _jsonl(again / "kept.jsonl") == kept  # the same seed keeps the same rows
    seeds = {json.dumps(_jsonl(_run(tmp_path, [path], **{"balance.field": "level", "balance.max_per_value": 2,
                                                         "balance.seed": s}) / "kept.jsonl")) for s in range(6)}
    assert len(seeds) > 1  # the seed does choose


def test_balance_field_only_reports(tmp_path):
    rows = [_qa(i) | {"tags": ["a", "b"] if i % 2 else ["c"]} for i in range(4)]
    out = _run(tmp_path, [_write(tmp_path / "d.jsonl", rows)], **{"balance.field": "tags"})
    assert _report(out)["summary"]["dropped"] == 0
    assert _report(out)["input"]["category"]["distinct"] == 2
    assert "category: distinct, evenness | 2, 1.0" in (out / "report.md").read_text()


def test_blank_csv_balance_cell_counts_as_missing(tmp_path):
    rows = [_qa(i) | {"category": "a" if i < 3 else ""} for i in range(6)]
    out = _run(tmp_path, [_csv(tmp_path / "d.csv", rows)], **{"balance.field": "category", "balance.max_per_value": 1})
    b = _report(out)["balance"]
    assert (b["dropped"], b["missing"]) == (2, 3)


# --------------------------------------------------------------------------- filters on conversations and rankings


def test_filters_read_every_assistant_turn_and_every_tied_best(tmp_path):
    conv = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Cheer!"},
                         {"role": "assistant", "content": "Yay" + "!" * 50}]}
    ranks = [{"prompt": "Rank these", "responses": ["fine answer", "Wow" + "!" * 50, "bad"], "ranks": [0, 0, 1]},
             {"prompt": "Rank those", "responses": ["fine answer", "bad answer", "Wow" + "!" * 50], "ranks": [0, 1, 1]}]
    out = _run(tmp_path, [_write(tmp_path / "m.jsonl", [conv]), _write(tmp_path / "r.jsonl", ranks)])
    dropped = _jsonl(out / "dropped.jsonl")
    assert [(Path(d["location"]).name, d["reason"]) for d in dropped] == [("m.jsonl:1", "char_run"), ("r.jsonl:1", "char_run")]


def test_prompt_first_words_are_the_instructions_not_the_system_prompt(tmp_path):
    rows = [_qa(0) | {"instruction": "Explain gravity to me", "system": "You are helpful."},
            _qa(1) | {"instruction": "Write a short poem", "system": "You are helpful."}]
    out = _run(tmp_path, [_write(tmp_path / "d.jsonl", rows)])
    assert _report(out)["input"]["prompt_first_word"]["distinct"] == 2


# --------------------------------------------------------------------------- token checks


@pytest.fixture(scope="module")
def tiny():
    from posttrain.data.templates import resolve_template
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer("tiny")
    return tokenizer, resolve_template(tokenizer, "auto")


def test_token_checks_at_max_length_and_labels_past_it(tiny):
    from posttrain.data.quality.tokens import check_tokens, encode_row

    tokenizer, template = tiny
    short = convert({"instruction": "Hi", "output": "ok there"}, "alpaca", "f:1")
    n = len(encode_row(short, tokenizer, template)[0])
    assert check_tokens([short], tokenizer, template, n)["over_max_length"] == 0  # exactly max_length fits
    over = check_tokens([short], tokenizer, template, n - 1)
    assert (over["over_max_length"], over["labels_past_max_length"]) == (1, 0)
    long_prompt = [convert({"instruction": " ".join(["word"] * 100), "output": "ok"}, "alpaca", "f:2"),
                   convert({"prompt": " ".join(["word"] * 100), "chosen": "a", "rejected": "b"}, "pairs", "f:3")]
    report = check_tokens(long_prompt, tokenizer, template, 32)
    assert (report["over_max_length"], report["labels_past_max_length"]) == (2, 2)
    assert report["first"]["labels_past_max_length"] == ["f:2", "f:3"]
    text = convert({"text": "plain text row here"}, "text", "f:4")
    kto = convert({"prompt": "hi", "completion": "no", "label": False}, "unpaired", "f:5")
    report = check_tokens([text, kto], tokenizer, template, 512)
    assert report["no_label_tokens"] == 0 and report["over_max_length"] == 0


def _boom_template():
    from posttrain.data.templates import CHATML

    return ("{%- for m in messages %}{%- if 'BOOM' in m['content'] %}{{ raise_exception('cannot render') }}"
            "{%- endif %}{%- endfor %}" + CHATML)


def test_unrenderable_rows_are_counted_not_fatal(tiny):
    from posttrain.data.quality.tokens import check_tokens

    rows = [convert({"instruction": "Hi BOOM", "output": "ok"}, "alpaca", "f:1"),
            convert({"instruction": "Hi", "output": "fine"}, "alpaca", "f:2")]
    report = check_tokens(rows, tiny[0], _boom_template(), 512)
    assert report["unrenderable"] == 1 and report["first"]["unrenderable"][0].startswith("f:1: ")
    assert report["sequence_tokens"]["max"] > 0


def test_unrenderable_detail_names_the_row_once(tiny):
    from posttrain.data.quality.tokens import check_tokens

    rows = [convert({"instruction": "Hi BOOM", "output": "ok"}, "alpaca", "f:1")]
    assert check_tokens(rows, tiny[0], _boom_template(), 512)["first"]["unrenderable"][0].count("f:1") == 1


def test_token_step_in_the_pass_drops_nothing(tmp_path):
    files = [_write(tmp_path / "a.jsonl", [_qa(0)]),
             _write(tmp_path / "t.jsonl", [{"text": "A plain document, long enough: " + _long("t", 30)}])]
    out = _run(tmp_path, files, **{"tokens.tokenizer": "tiny", "tokens.max_length": 16})
    t = _report(out)["tokens"]
    assert t["over_max_length"] == 2 and t["template"] == "auto (the tokenizer's own)"
    assert _report(out)["summary"]["kept"] == 2


# --------------------------------------------------------------------------- gates and stale outputs


def test_max_bad_fraction_and_second_run_overwrites_outputs(tmp_path):
    dirty = _write(tmp_path / "dirty.jsonl", [_qa(0), _qa(0), "{bad", "{bad"])
    with pytest.raises(DataError, match="max_bad_fraction"):
        _run(tmp_path, [dirty], **{"data.max_bad_fraction": 0.25})
    out = _run(tmp_path, [dirty])
    assert len(_jsonl(out / "dropped.jsonl")) == 1 and len(_jsonl(out / "rejects.jsonl")) == 2
    clean = _write(tmp_path / "clean.jsonl", [_qa(1), _qa(2)])
    out = _run(tmp_path, [clean])
    assert _jsonl(out / "dropped.jsonl") == [] and _jsonl(out / "rejects.jsonl") == []
    assert _jsonl(out / "kept.jsonl") == [_qa(1), _qa(2)]
    _accounted(out)


def test_bad_rows_error_leaves_no_stale_rejects(tmp_path):
    _run(tmp_path, [_write(tmp_path / "dirty.jsonl", [_qa(0), "{bad"])])
    out = _run(tmp_path, [_write(tmp_path / "clean.jsonl", [_qa(1)])], **{"data.bad_rows": "error"})
    rejects = out / "rejects.jsonl"
    assert not rejects.exists() or rejects.read_text() == ""


def test_cli_gate_writes_everything_then_exits_2(tmp_path, capsys):
    from posttrain.cli import main

    path = _write(tmp_path / "d.jsonl", [_qa(0), _qa(0), _qa(1)])
    code = main(["quality", f"output_dir={tmp_path / 'q'}", f"data.files=[{path}]", "max_drop_fraction=0.2"])
    assert code == 2 and "max_drop_fraction" in capsys.readouterr().err
    assert len(_jsonl(tmp_path / "q" / "kept.jsonl")) == 2 and (tmp_path / "q" / "report.md").is_file()


def test_cli_unknown_key_and_help(tmp_path, capsys):
    from posttrain.cli import main

    assert main(["quality", f"output_dir={tmp_path / 'q'}", "dedup.treshold=0.5"]) == 2
    assert "did you mean dedup.threshold" in capsys.readouterr().err
    assert main(["quality", f"output_dir={tmp_path / 'q'}", "filter.echo=false"]) == 2
    assert "did you mean filters.echo" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["quality", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("data.bad_rows", "filters.max_char_run", "pii.action", "dedup.on", "decontaminate.ngram",
                 "balance.max_per_value", "tokens.max_length", "max_drop_fraction"):
        assert name in help_text
