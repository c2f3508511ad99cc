"""Data rules pinned at stop 35 (backlog items):

- a prompt row's question is the first of 'prompt', 'question', 'problem' it has, and its reference
  answer the first of 'answer', 'solution' it gives (not blank): one rule (`data.prompts`), so a
  benchmark keyed as GSM8K or MATH is read for decontamination (TSV, CSV and JSON Lines alike), and as
  a prompt set by RL and `posttrain evaluate`; the key left unused stays among the row's fields; an
  alpaca question without an output takes its answer by the same rule (its 'answer' column was lost);
- a `.json` file mixing row formats is read as a JSON Lines file is: the format is decided per file
  from its first rows, and each row of another format is a bad row named by file:line (none lost
  unannounced), for SFT and preference rows alike;
- two responses of a ranking that the length cut makes the same tokens under the same rank are one
  answer, kept once (the first) and counted under `removed_identical`, as reading keeps a repeat once.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from posttrain.data.formats import load_records
from posttrain.data.preferences import (
    encode_preference,
    fit_preference_length,
    load_preference_records,
    to_preference_record,
)
from posttrain.data.prompts import detect_prompt_format, reference_answer, to_prompt_record
from posttrain.data.quality.rows import eval_text, load_eval_items
from posttrain.data.quality.run import run_quality
from posttrain.errors import DataError

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")
GSM_ANSWER = "Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether. #### 72"
MATH = "If x plus seven equals twelve, what is the value of x when it is multiplied by three and then halved?"
MATH_SOLUTION = "x = 12 - 7 = 5, so 3x/2 = \\boxed{7.5}."
U = {"role": "user", "content": "hi"}


def _table(path: Path, header: list[str], rows: list[list[str]], delimiter: str) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerows([header, *rows])
    return str(path)


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- item 1: benchmark keys


@pytest.mark.parametrize("kind", ["gsm8k.tsv", "math.csv", "gsm8k.jsonl"])
def test_a_benchmark_keyed_question_or_problem_is_read_for_decontamination(tmp_path, kind):
    question, answer = (MATH, MATH_SOLUTION) if kind.startswith("math") else (GSM, GSM_ANSWER)
    keys = ["problem", "solution"] if kind.startswith("math") else ["question", "answer"]
    rows = [[question, answer], ["An unrelated question about bees and their hives?", "x"]]
    path = tmp_path / kind
    if kind.endswith(".jsonl"):
        ev = _jsonl(path, [dict(zip(keys, row)) for row in rows])
    else:
        ev = _table(path, keys, rows, "\t" if kind.endswith(".tsv") else ",")
    items, read = load_eval_items(ev, log=lambda _: None)
    assert (read.good, read.bad) == (2, 0)
    assert eval_text(items[0], "prompt") == question
    assert eval_text(items[0], "full") == f"{question}\n{answer}"  # the answer side is read with on: full
    first = 1 if kind.endswith(".jsonl") else 2  # a table's header is line 1
    assert [item.source for item in items] == [f"{ev}:{first}", f"{ev}:{first + 1}"]


def test_the_quality_job_drops_a_training_row_holding_a_gsm8k_question(tmp_path):
    ev = _table(tmp_path / "gsm8k.tsv", ["question", "answer"], [[GSM, GSM_ANSWER]], "\t")
    data = _jsonl(tmp_path / "train.jsonl", [{"instruction": f"Question: {GSM.upper()}", "output": "72"},
                                             {"instruction": "Name a colour of the sky at noon.", "output": "Blue"}])
    from posttrain.config.quality import QualityConfig

    cfg = QualityConfig.load(None, [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps([data])}",
                                    f"decontaminate.files={json.dumps([ev])}", "dedup.exact=false",
                                    "dedup.near=false", "filters.min_response_words=0"])
    out = run_quality(cfg, log=lambda _: None)
    report = json.loads((out / "report.json").read_text())["decontaminate"]
    assert (report["eval_rows"], report["contaminated_rows"]) == (1, 1)
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [d["location"] for d in dropped] == [f"{data}:1"]


def test_prompt_rows_read_question_problem_answer_solution_by_one_rule():
    record = to_prompt_record({"question": "2+3?", "answer": "5", "level": 1}, "prompt", "f:1")
    assert (record.prompt, record.answer, record.fields) == ([{"role": "user", "content": "2+3?"}], "5", {"level": 1})
    record = to_prompt_record({"problem": "x+1=2", "solution": "1", "system": "Be brief."}, "prompt")
    assert (record.prompt[0]["role"], record.prompt[1]["content"], record.answer) == ("system", "x+1=2", "1")
    # 'prompt' wins over 'question', and 'answer' over 'solution' (MATH-500 has a short answer and a worked
    # solution); the key not read stays among the fields reward functions see
    record = to_prompt_record({"prompt": "P", "question": "Q", "answer": "7.5", "solution": "long"}, "prompt")
    assert (record.prompt[0]["content"], record.answer) == ("P", "7.5")
    assert record.fields == {"question": "Q", "solution": "long"}
    # a blank answer (a CSV's empty cell) is none: the solution is the answer
    assert to_prompt_record({"question": "Q", "answer": "", "solution": "S"}, "prompt").answer == "S"
    assert reference_answer({"solution": 42}) == "42" and reference_answer({"answer": " "}) is None
    assert detect_prompt_format([{"problem": "a"}, {"question": "b"}, {"prompt": "c"}]) == "prompt"


def test_an_alpaca_prompt_without_an_output_keeps_its_answer_column():
    record = to_prompt_record({"instruction": "What is 2+3?", "answer": "5"}, "alpaca", "f:1")
    assert (record.prompt[-1]["content"], record.answer) == ("What is 2+3?", "5")  # was None: the column lost
    assert to_prompt_record({"instruction": "Q", "solution": "S"}, "alpaca").answer == "S"


def test_a_row_with_no_question_key_names_every_key_read():
    from posttrain.data.formats import BadRowError

    with pytest.raises(BadRowError, match="'prompt', 'question' or 'problem'"):
        to_prompt_record({"query": "q", "answer": "a"}, "prompt")
    with pytest.raises(DataError, match="'prompt', 'question' or 'problem'"):
        detect_prompt_format([{"query": "q", "target": "a"}])
    with pytest.raises(Exception, match="'question' is empty"):
        to_prompt_record({"question": " ", "answer": "a"}, "prompt")


# --------------------------------------------------------------------------- item 2: mixed .json rows


def _json_array(path: Path, rows: list[dict]) -> str:
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    return str(path)


def test_a_json_file_mixing_sft_formats_names_each_other_row_as_jsonl_does(tmp_path):
    messages = {"messages": [U, {"role": "assistant", "content": "yo"}]}
    alpaca = {"instruction": "say hi", "output": "hi"}
    rows = [messages, messages, alpaca, messages, alpaca]
    found = {}
    for kind, path in (("json", _json_array(tmp_path / "m.json", rows)), ("jsonl", _jsonl(tmp_path / "m.jsonl", rows))):
        records, report = load_records([path], bad_rows="skip", max_bad_fraction=1.0, log=lambda _: None)
        assert (len(records), report.total, report.bad, report.files[0].format) == (3, 5, 2, "messages")
        assert all("missing key 'messages'" in r.reason for r in report.first_bad)
        found[kind] = [r.location.rsplit(":", 1)[1] for r in report.first_bad]
        with pytest.raises(DataError, match=f"{path}:"):  # the default policy stops, naming them
            load_records([path], log=lambda _: None)
    assert found == {"json": ["4", "6"], "jsonl": ["3", "5"]}  # the array's "[" is line 1


def test_a_json_file_mixing_preference_shapes_names_each_other_row(tmp_path):
    pair = {"prompt": "q", "chosen": "a", "rejected": "b"}
    whole = {"chosen": [U, {"role": "assistant", "content": "a"}], "rejected": [U, {"role": "assistant", "content": "b"}]}
    ranking = {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1, 2]}
    path = _json_array(tmp_path / "p.json", [pair, ranking, whole, pair, ranking])
    records, report = load_preference_records([path], bad_rows="skip", max_bad_fraction=1.0, log=lambda _: None)
    assert (len(records), report.bad, report.files[0].format) == (3, 2, "pairs")  # both pair shapes read
    assert [r.location for r in report.first_bad] == [f"{path}:3", f"{path}:6"]


# --------------------------------------------------------------------------- item 3: ties after the cut


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.presets import build_tokenizer

    return build_tokenizer()


def _cut_ranking(tokenizer, responses, ranks, source="f:1"):
    from posttrain.data.templates import resolve_template
    from posttrain.train.grouped import first_label

    record = to_preference_record({"prompt": "Copy: a b c d e f", "responses": responses, "ranks": ranks},
                                  "ranking", source)
    example = encode_preference(record, tokenizer, resolve_template(tokenizer, "chatml"))
    return example, first_label(example.sequences[0]) + 3  # keeps "a b" of each long response


def _tokens(example):
    return [(s.input_ids, s.labels) for s in example.sequences]


def test_responses_made_identical_under_one_rank_are_kept_once_and_counted(tokenizer):
    example, max_length = _cut_ranking(tokenizer, ["a b c d e f g", "a b c d e f h", "x"], [0, 0, 1])
    kept, report = fit_preference_length([example], max_length)
    (trimmed,) = kept
    assert trimmed.ranks == [0, 1] and trimmed.source == "f:1"
    assert trimmed.sequences[0].input_ids == example.sequences[0].input_ids[:max_length]  # the first copy, cut
    assert trimmed.sequences[1].input_ids == example.sequences[2].input_ids
    assert (report["dropped_identical"], report["removed_identical"], report["trimmed_identical"]) == (0, 1, 1)
    assert report["identical_sources"] == ["f:1"] and "1 responses removed from 1 rankings" in report["summary"]
    assert report["truncated_sequences"] == 1  # of the sequences kept: the one copy left


def test_ties_and_contradictions_in_one_ranking_are_both_settled(tokenizer):
    # 0 and 1 tie and become one answer, kept once; 3 and 4 are one answer under two ranks: removed, every copy
    responses = ["a b c d e f g", "a b c d e f h", "x", "p q r s t u v", "p q r s t u w", "y"]
    example, max_length = _cut_ranking(tokenizer, responses, [0, 0, 1, 2, 3, 4])
    kept, report = fit_preference_length([example], max_length)
    (trimmed,) = kept
    assert trimmed.ranks == [0, 1, 2]
    assert [s.input_ids for s in trimmed.sequences][1:] == [example.sequences[2].input_ids,
                                                            example.sequences[5].input_ids]
    assert (report["removed_identical"], report["trimmed_identical"], report["dropped_identical"]) == (3, 1, 0)
