"""Decontamination (stop 34): benchmark files read as `posttrain evaluate` reads prompt sets, n-grams a
benchmark's items share left out of the index (`decontaminate.max_shared`, counted in the report), a drop laid
to the item sharing the most n-grams, and the system prompt not searched with `on: prompt`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config.quality import QualityConfig, validate_quality
from posttrain.data.quality.contamination import ContaminationIndex
from posttrain.data.quality.rows import eval_text, load_eval_items
from posttrain.data.quality.run import run_quality
from posttrain.errors import ConfigError, DataError

GSM = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
       "How many clips did Natalia sell altogether in April and May?")
SYSTEM = "You are a careful assistant who always shows the working before giving a final answer to the user."


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _run(tmp_path: Path, train: list[dict], eval_file: str, *items: str) -> tuple[dict, list[dict]]:
    data = _write(tmp_path / "train.jsonl", train)
    cfg = QualityConfig.load(None, [f"output_dir={tmp_path / 'out'}", f"data.files={json.dumps([data])}",
                                    f"decontaminate.files={json.dumps([eval_file])}", "dedup.exact=false",
                                    "dedup.near=false", "filters.min_response_words=0", *items])
    out = run_quality(cfg, log=lambda _: None)
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text(encoding="utf-8").splitlines()]
    return json.loads((out / "report.json").read_text())["decontaminate"], dropped


def test_ngrams_shared_by_more_than_max_shared_texts_are_left_out_and_counted():
    texts = [f"alpha beta gamma delta item{i}" for i in range(4)]
    index = ContaminationIndex(texts, [f"ev:{i + 1}" for i in range(4)], 4, max_shared=3)
    assert index.shared == 1  # "alpha beta gamma delta": in 4 texts
    assert index.find("say alpha beta gamma delta now") is None
    assert index.find("x beta gamma delta item2") == ("ev:3", "beta gamma delta item2")
    unlimited = ContaminationIndex(texts, [f"ev:{i + 1}" for i in range(4)], 4)  # 0: no limit
    assert unlimited.shared == 0 and unlimited.find("say alpha beta gamma delta now") == ("ev:1", "alpha beta gamma delta")


def test_a_row_is_laid_to_the_item_it_shares_the_most_ngrams_with():
    index = ContaminationIndex(["one two three four five", "zero one two three four five six seven"],
                               ["ev:1", "ev:2"], 4)
    assert index.find("one two three four five six seven") == ("ev:2", "one two three four")
    assert index.find("one two three four") == ("ev:1", "one two three four")  # a tie goes to the earlier


def test_max_shared_is_checked():
    with pytest.raises(ConfigError, match="max_shared"):
        validate_quality(QualityConfig.load(None, ["decontaminate.max_shared=-1"]))
    with pytest.raises(ValueError, match="max_shared"):
        ContaminationIndex(["a"], ["x"], 1, max_shared=-1)


def test_the_report_counts_the_ngrams_left_out(tmp_path):
    preamble = "Answer the following grade school mathematics question and give only the final number at the end."
    ev = _write(tmp_path / "ev.jsonl", [{"prompt": f"{preamble} Question {i}: {GSM}" if i == 0 else
                                         f"{preamble} Question {i}: what is {i} plus {i + 1}?"} for i in range(12)])
    report, dropped = _run(tmp_path, [{"instruction": preamble + " How tall is a giraffe?", "output": "5 m"},
                                      {"instruction": GSM, "output": "72"}], ev)
    assert report["max_shared"] == 10 and report["shared_ngrams_left_out"] > 0
    assert [d["location"].rsplit(":", 1)[1] for d in dropped] == ["2"]


def test_on_full_searches_an_answer_a_completion_and_a_tool_call(tmp_path):
    answer = "She sold 48 / 2 = 24 clips in May, so 48 + 24 = 72 clips in April and May together."
    rows = [{"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": answer}]},
            {"messages": [{"role": "user", "content": "q2"}]},  # no answer: a prompt record
            {"messages": [{"role": "user", "content": "q4"},
                          {"role": "assistant", "content": None,
                           "tool_calls": [{"type": "function", "function": {"name": "solve", "arguments": {"a": answer}}}]},
                          {"role": "tool", "content": "72"}, {"role": "assistant", "content": "72"}]}]
    completions = [{"prompt": "q3", "completion": answer}, {"prompt": "q5", "answer": "72"}]  # one without
    items, read = load_eval_items(_write(tmp_path / "ev.jsonl", rows), log=lambda _: None)
    more, more_read = load_eval_items(_write(tmp_path / "ev2.jsonl", completions), log=lambda _: None)
    items += more
    assert (len(items), read.bad + more_read.bad) == (5, 0)
    assert [answer in eval_text(item, "full") for item in items] == [True, False, True, True, False]
    assert eval_text(items[-1], "full") == "q5\n72"
    assert [eval_text(item, "prompt") for item in items] == ["q1", "q2", "q4\n72", "q3", "q5"]


def test_a_preference_benchmark_prompt_leaves_out_its_system_prompt(tmp_path):
    ev = _write(tmp_path / "ev.jsonl", [{"system": SYSTEM, "prompt": "What is the capital city of Australia?",
                                         "chosen": "Canberra", "rejected": "Sydney"}])
    items, _ = load_eval_items(ev, log=lambda _: None)
    assert eval_text(items[0], "prompt") == "What is the capital city of Australia?"
    assert SYSTEM in eval_text(items[0], "full")


def test_a_benchmark_keyed_otherwise_is_still_refused_naming_the_keys_read(tmp_path):
    ev = _write(tmp_path / "ev.jsonl", [{"query": GSM, "target": "72"}])  # 'question' is read (stop 35)
    with pytest.raises(DataError, match="'prompt', 'question' or 'problem'"):
        _run(tmp_path, [{"instruction": GSM, "output": "72"}], ev)
