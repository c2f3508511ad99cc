"""A decontamination walk: `posttrain quality`'s `decontaminate.*` as a user preparing SFT data who must
remove test-set leakage, checked against common practice (GPT-3's 13-gram overlap, Llama-2 / OLMo / Tulu
n-gram rules, case / punctuation / whitespace normalisation).

Walked: a GSM8K question pasted into training rows with other whitespace, case and punctuation, behind a
"Question:" prefix, split across two user turns of a multi-turn chat, in the answer rather than the prompt,
in a preference row's rejected response only, in an undesirable KTO completion, in a tool call's
arguments; benchmark files as JSONL, CSV and Parquet, with the question under 'prompt', 'question',
'problem', 'input', 'query', in messages / ShareGPT conversations ending with the user's turn, alpaca rows
without an output, with a system prompt; benchmarks whose items share a prompt template; short and
numbers-only benchmark prompts; the report (which benchmark row matched, counts, file:line); and the
speed of the index (5,000 benchmark items, 2,000 training rows of 50-300 words: 0.2 s to build, 0.2 s to
search with 13-gram prompts only and 1.5 s with short prompts of 3-12 words, about 5 s and 37 s for
50,000 rows).

What was right: normalisation (case, punctuation, spacing) does not hide a copy; a question split across
turns, or in a response, a rejected response, an undesirable completion or a tool call, is found;
CSV and Parquet benchmark files are read, each drop naming the benchmark row (file:line, Parquet's
"row N"); the report's counts add up; the speed is fine. A benchmark keyed 'question', 'problem',
'input' or 'query' (GSM8K, MATH, BBH) is refused with a message naming the keys it reads (not pinned).

What was wrong: an evaluation prompt set shaped as `posttrain evaluate` reads one (conversations ending
with the user's turn; alpaca rows without an output beside rows with one) is refused, or its unanswered
questions are skipped as malformed and their leaks kept; a prompt template shared by every benchmark
item is taken for a leak, dropping training rows with other questions, and the drops are all laid to
the benchmark's first row; the benchmark's system prompt is searched as if it were the question, so a
training row that shares only that system prompt is dropped and a short question without it is missed.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from posttrain.config.quality import QualityConfig
from posttrain.data.quality.contamination import ContaminationIndex
from posttrain.data.quality.rows import convert
from posttrain.data.quality.run import run_quality
from posttrain.errors import DataError

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")
GSM2 = ("Weng earns 12 dollars an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
        "How much did she earn?")


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run(tmp_path: Path, train: list[dict], eval_file: str) -> tuple[dict, list[dict]]:
    """(report["decontaminate"], dropped rows) of one quality pass with only decontamination to drop."""
    data = _write(tmp_path / "train.jsonl", train)
    items = [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps([data])}",
             f"decontaminate.files={json.dumps([eval_file])}", "dedup.exact=false", "dedup.near=false",
             "filters.min_response_words=0"]
    out = run_quality(QualityConfig.load(None, items), log=lambda _: None)
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    return json.loads((out / "report.json").read_text())["decontaminate"], dropped


# --------------------------------------------------------------------------- right, untested


@pytest.mark.parametrize("row, fmt", [
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                   {"role": "user", "content": GSM[:GSM.index(" and then")]},
                   {"role": "assistant", "content": "go on"},
                   {"role": "user", "content": GSM[GSM.index(" and then") + 1:]},
                   {"role": "assistant", "content": "72"}]}, "messages"),
    ({"prompt": "Solve it.", "chosen": "I would rather not.", "rejected": GSM}, "pairs"),
    ({"prompt": "Say something.", "completion": "QUESTION:\n" + GSM.upper(), "label": False}, "unpaired"),
    ({"prompt": "Rank these.", "responses": ["a", "  ".join(GSM.split())], "ranks": [1, 2]}, "ranking"),
    ({"messages": [{"role": "user", "content": "Use the tool."},
                   {"role": "assistant", "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "solve", "arguments": {"q": GSM}}}]},
                   {"role": "tool", "content": "72"}, {"role": "assistant", "content": "72"}]}, "messages"),
], ids=["split-across-turns", "rejected-only", "undesirable-kto", "ranking-loser", "tool-call"])
def test_a_benchmark_question_anywhere_in_a_row_is_found(row, fmt):
    index = ContaminationIndex([GSM], ["gsm8k.jsonl:1"], 13)
    found = index.find(convert(row, fmt).full)
    assert found is not None and found[0] == "gsm8k.jsonl:1", found


def test_csv_and_parquet_benchmarks_name_the_matched_row(tmp_path):
    pd = pytest.importorskip("pandas")
    train = [{"instruction": "Question: " + GSM.lower(), "output": "72"},
             {"instruction": "Tell me about gardens.", "output": "Sure: " + GSM2},
             {"instruction": "Tell me about bees.", "output": "They make honey."}]
    ev_csv = tmp_path / "ev.csv"
    with open(ev_csv, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerows([["prompt", "answer"], [GSM, "72"], ["An unrelated question about bees?", "x"], [GSM2, "10"]])
    report, dropped = _run(tmp_path, train, str(ev_csv))
    assert (report["eval_rows"], report["contaminated_rows"], report["eval_rows_leaked"]) == (3, 2, 2)
    assert [(d["location"].rsplit(":", 1)[1], d["detail"].rsplit(" with ", 1)[1]) for d in dropped] == \
        [("1", f"{ev_csv}:2"), ("2", f"{ev_csv}:4")]  # the header is line 1
    ev_parquet = tmp_path / "ev.parquet"
    pd.DataFrame({"prompt": ["An unrelated question about bees?", GSM2], "answer": ["x", "10"]}).to_parquet(ev_parquet)
    report, dropped = _run(tmp_path, train, str(ev_parquet))
    assert [d["detail"].rsplit(" with ", 1)[1] for d in dropped] == [f"{ev_parquet}:row 2"]


# --------------------------------------------------------------------------- defects


EVAL_PROMPT_SETS = {
    "messages-ending-with-user": [{"messages": [{"role": "user", "content": q}]} for q in (GSM, GSM2)],
    "sharegpt-ending-with-human": [{"conversations": [{"from": "human", "value": q}]} for q in (GSM, GSM2)],
    "alpaca-some-without-output": [{"instruction": GSM, "output": "72"}, {"instruction": GSM2}],
}


@pytest.mark.parametrize("name", list(EVAL_PROMPT_SETS))
def test_failure_an_eval_prompt_set_without_answers_is_searched(tmp_path, name):
    ev = _write(tmp_path / "ev.jsonl", EVAL_PROMPT_SETS[name])
    train = [{"instruction": GSM, "output": "72"}, {"instruction": GSM2, "output": "10"},
             {"instruction": "Tell me about bees.", "output": "They make honey."}]
    try:
        report, _ = _run(tmp_path, train, ev)
        got = (report["eval_rows"], report["eval_rows_malformed"], report["contaminated_rows"])
    except DataError as exc:  # observed for conversations: "no usable rows (all 2 rows are malformed)"
        got = f"refused: {exc}"
    # observed: refused ("no assistant turn, so nothing to train on"), or (1, 1, 1): GSM2's leak kept
    assert got == (2, 0, 2), got


TEMPLATE = ("The following is a multiple choice question about high school mathematics. Think step by step, "
            "then give the letter of the correct answer.")
QUESTIONS = [f"What is {a} plus {b} times {a + b}? (A) {a * b} (B) {a + b * (a + b)} (C) {a - b} (D) none of these"
             for a, b in zip(range(1, 41), range(41, 81))]


def test_failure_a_template_shared_by_every_benchmark_item_is_not_a_leak(tmp_path):
    ev = _write(tmp_path / "mmlu.jsonl", [{"prompt": TEMPLATE + "\n" + q, "answer": "B"} for q in QUESTIONS])
    train = [{"instruction": TEMPLATE + "\nWhich planet of the solar system is the largest one by mass? "
                                        "(A) Mars (B) Jupiter (C) Venus (D) Earth", "output": "B"},
             {"instruction": TEMPLATE + "\n" + QUESTIONS[6], "output": "B"}]
    _, dropped = _run(tmp_path, train, ev)
    got = [(d["location"].rsplit(":", 1)[1], d["detail"].rsplit(" with ", 1)[1]) for d in dropped]
    # observed: [('1', 'mmlu.jsonl:1'), ('2', 'mmlu.jsonl:1')]: a fresh question dropped, the copy of item 7
    # laid to item 1, both for "the following is a multiple choice question about high school mathematics ..."
    assert got == [("2", f"{ev}:7")], got


# Llama 2's default system prompt, common in training rows too.
SYSTEM = ("You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, "
          "while being safe.")


def test_failure_the_benchmark_system_prompt_is_not_searched(tmp_path):
    short = "What is the capital city of Australia?"  # under 13 words: must appear whole
    ev = _write(tmp_path / "ev.jsonl", [{"system": SYSTEM, "prompt": short, "answer": "Canberra"},
                                        {"system": SYSTEM, "prompt": GSM, "answer": "72"}])
    train = [{"messages": [{"role": "system", "content": SYSTEM},
                           {"role": "user", "content": "Write a haiku about autumn leaves."},
                           {"role": "assistant", "content": "Red leaves drift and fall."}]},
             {"messages": [{"role": "user", "content": "Quiz: what is the capital city of Australia?"},
                           {"role": "assistant", "content": "Canberra."}]}]
    _, dropped = _run(tmp_path, train, ev)
    got = [(d["location"].rsplit(":", 1)[1], d["detail"]) for d in dropped]
    # observed: row 1 dropped for "you are a helpful respectful and honest assistant always answer ...",
    # row 2 (the benchmark's question) kept
    assert [line for line, _ in got] == ["2"], got
