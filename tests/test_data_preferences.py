"""Preference data: rows → records (pairs, rankings, unpaired), bad rows with file:line,
response-only label masks, the length policy, prepare_preference_data, synthetic preferences."""

from __future__ import annotations

import csv
import json
import types

import pytest

from posttrain.data import synthetic
from posttrain.data.formats import BadRowError
from posttrain.data.preferences import (
    PreferenceExample,
    PreferenceRecord,
    detect_preference_format,
    encode_preference,
    encode_response,
    fit_preference_length,
    load_preference_records,
    prepare_preference_data,
    to_preference_record,
)
from posttrain.data.records import IGNORE_INDEX, Example
from posttrain.data.templates import ALPACA, CHATML
from posttrain.errors import ConfigError, DataError


def _user(text):
    return {"role": "user", "content": text}


def _assistant(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
PAIR = {"prompt": "Reverse: a b c", "chosen": "c b a", "rejected": "a b c", "margin": 0.5}
RANKING = {"prompt": "Count letters: a b", "responses": ["2", "3", "5"], "scores": [1.0, 0.5, 0.5]}
UNPAIRED = {"prompt": "Copy: x y", "completion": "x y", "label": True}


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.presets import build_tokenizer

    return build_tokenizer()


def _write(path, rows, kind="jsonl"):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "csv":
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
            writer.writeheader()
            for row in rows:  # lists go in JSON-encoded, as CSV exports do
                writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


# --------------------------------------------------------------------------- rows → records


def test_pair_with_string_prompt_system_key_and_margin():
    row = PAIR | {"system": "Be brief."}
    assert to_preference_record(row, "pairs", "f:3") == PreferenceRecord(
        prompt=[SYSTEM, _user("Reverse: a b c")], responses=["c b a", "a b c"], ranks=[0, 1], margin=0.5, source="f:3"
    )
    assert to_preference_record({k: v for k, v in PAIR.items() if k != "margin"}, "pairs").margin is None
    assert to_preference_record(PAIR | {"margin": "2"}, "pairs").margin == 2.0  # a CSV cell


def test_pair_with_multi_turn_prompt_and_message_responses():
    prompt = [SYSTEM, _user("Copy: a"), _assistant("a"), _user("Reverse: a b")]
    row = {"prompt": prompt, "chosen": [_assistant(" b a ")], "rejected": [*prompt, _assistant("a b")]}
    record = to_preference_record(row, "pairs")
    assert record.prompt == prompt and record.responses == [" b a ", "a b"]  # kept exactly
    # a whole conversation may leave out the system turn a 'system' key added
    row = {"prompt": "q", "system": "Be brief.", "chosen": [_user("q"), _assistant("yes")], "rejected": "no"}
    assert to_preference_record(row, "pairs").responses == ["yes", "no"]


def test_implicit_prompt_is_the_shared_turns():
    shared = [SYSTEM, _user("hi"), _assistant("hello"), _user("2+2?")]
    row = {"chosen": [*shared, _assistant("4")], "rejected": json.dumps([*shared, _assistant("5")])}
    record = to_preference_record(row, "pairs", "f:1")
    assert record.prompt == shared and record.responses == ["4", "5"] and record.ranks == [0, 1]
    row = {"system": "Be brief.", "chosen": [_user("q"), _assistant("a")], "rejected": [_user("q"), _assistant("b")]}
    assert to_preference_record(row, "pairs").prompt == [SYSTEM, _user("q")]


def test_sharegpt_turns_are_mapped():
    row = {"prompt": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"}],
           "chosen": [{"from": "gpt", "value": "good"}], "rejected": "bad"}
    record = to_preference_record(row, "pairs")
    assert record.prompt == [SYSTEM, _user("q")] and record.responses == ["good", "bad"]


@pytest.mark.parametrize(
    "extra, ranks",
    [
        ({}, [0, 1, 2]),  # neither ranks nor scores: best first
        ({"ranks": [2, 0, 2]}, [1, 0, 1]),  # ties kept, made dense
        ({"ranks": [1, 3, 2]}, [0, 2, 1]),
        ({"ranks": "[1, 0, 0]"}, [1, 0, 0]),  # a CSV cell
        ({"scores": [0.5, 2, 0.5]}, [1, 0, 1]),  # higher score = better
        ({"scores": [-1, 3, 7]}, [2, 1, 0]),
        ({"ranks": [0.0, 1.0, 2.0]}, [0, 1, 2]),  # whole numbers written as floats
    ],
)
def test_ranking_ranks(extra, ranks):
    row = {"prompt": "q", "responses": ["a", [_assistant("b")], "c"]} | extra
    record = to_preference_record(row, "ranking", "f:2")
    assert record.responses == ["a", "b", "c"] and record.ranks == ranks and record.desirable is None


@pytest.mark.parametrize("key, value, desirable", [("label", True, True), ("label", False, False),
                                                    ("desirable", True, True), ("label", "False", False),
                                                    ("label", "1", True), ("label", " true ", True)])
def test_unpaired_labels(key, value, desirable):
    record = to_preference_record({"prompt": "q", "completion": "a", key: value}, "unpaired")
    assert record.desirable is desirable and record.ranks is None and record.responses == ["a"]


ROWS = {"pairs": [PAIR, {"prompt": [_user("q")], "chosen": [_assistant("x")], "rejected": "y"}],
        "ranking": [RANKING, {"prompt": [SYSTEM, _user("q")], "responses": ["a", "b"], "ranks": [1, 0]}],
        "unpaired": [UNPAIRED, {"prompt": [_user("q")], "completion": [_assistant("z")], "label": False}]}


@pytest.mark.parametrize("fmt", list(ROWS))
@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_csv_and_parquet_give_the_same_records_as_jsonl(tmp_path, fmt, kind):
    if kind == "parquet":
        pytest.importorskip("pyarrow")
    rows = ROWS[fmt]
    if kind == "parquet":  # one type per column, every column in every row: turns go in JSON-encoded
        keys = list(dict.fromkeys(k for row in rows for k in row))
        rows = [{k: json.dumps(r[k]) if isinstance(r.get(k), list) and isinstance(r[k][0], dict) else r.get(k)
                 for k in keys} for r in rows]
    expected, _ = load_preference_records([_write(tmp_path / "d.jsonl", ROWS[fmt])], log=_quiet)
    records, report = load_preference_records([_write(tmp_path / f"d.{kind}", rows, kind)], log=_quiet)
    assert [(r.prompt, r.responses, r.ranks, r.desirable, r.margin) for r in records] == \
        [(r.prompt, r.responses, r.ranks, r.desirable, r.margin) for r in expected]
    assert report.files[0].format == fmt and report.good == report.total == 2


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    "rows, fmt",
    [
        (ROWS["pairs"], "pairs"),
        ([{"chosen": [_user("q"), _assistant("a")], "rejected": [_user("q"), _assistant("b")]}], "pairs"),
        (ROWS["ranking"], "ranking"),
        (ROWS["unpaired"], "unpaired"),
        ([UNPAIRED, PAIR, PAIR], "pairs"),  # the majority
        ([{"prompt": "q", "responses": ["a"], "chosen": "a", "rejected": "b"}], "pairs"),  # ties: pairs first
    ],
)
def test_detect_preference_format(rows, fmt):
    assert detect_preference_format(rows, where="d.jsonl") == fmt


def test_detection_failure_names_keys_seen_and_needed():
    with pytest.raises(DataError) as info:
        detect_preference_format([{"instruction": "q", "output": "a"}], where="d.jsonl")
    message = str(info.value)
    assert message.startswith("d.jsonl: cannot tell the preference format from the keys 'instruction', 'output'")
    assert "pairs needs 'chosen' and 'rejected'" in message and "unpaired needs 'prompt', 'completion'" in message
    with pytest.raises(DataError, match="no readable rows"):
        detect_preference_format([], where="d.jsonl")


def test_explicit_format_overrides_detection(tmp_path):
    path = _write(tmp_path / "d.jsonl", [PAIR | {"responses": ["x", "y"]}])
    records, report = load_preference_records([path], fmt="ranking", log=_quiet)
    assert records[0].responses == ["x", "y"] and report.files[0].format == "ranking"
    with pytest.raises(ValueError, match="unknown format 'dpo'; expected auto or one of pairs, ranking, unpaired"):
        load_preference_records([path], fmt="dpo")


# --------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize(
    "fmt, row, reason",
    [
        ("pairs", ["a", "b"], "expected an object, got a list"),
        ("pairs", {"prompt": "q", "rejected": "b"}, "missing key 'chosen' (pairs rows need 'chosen' and 'rejected'"),
        ("pairs", {"prompt": "q", "chosen": "", "rejected": "b"}, "'chosen' is empty"),
        ("pairs", {"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' is a number, expected a string or a list"),
        ("pairs", {"prompt": "q", "chosen": None, "rejected": "b"}, "'chosen' is null"),
        ("pairs", {"prompt": "", "chosen": "a", "rejected": "b"}, "no 'prompt', and 'chosen' is a string"),
        ("pairs", {"prompt": "q", "chosen": "same", "rejected": "same"},
         "'chosen' and 'rejected' are the same text, so there is no preference"),
        ("pairs", {"chosen": [_user("q"), _assistant("a")], "rejected": [_user("Q"), _assistant("b")]},
         "chosen and rejected do not share the prompt turns: they differ at turn 1"),
        ("pairs", {"chosen": [_user("q"), _assistant("x"), _user("r"), _assistant("a")],
                   "rejected": [_user("q"), _assistant("b")]},
         "chosen and rejected do not share the prompt turns: they differ at turn 2"),
        ("pairs", {"chosen": [_user("q"), _assistant("a")], "rejected": [_user("q")]},
         "'rejected' ends with a user turn, expected the assistant's reply"),
        ("pairs", {"chosen": [_assistant("a")], "rejected": [_assistant("b")]},
         "the prompt (the turns before the last of 'chosen') has no turns"),
        ("pairs", {"prompt": "q", "chosen": [_user("other"), _assistant("a")], "rejected": "b"},
         "'chosen' does not continue the prompt: it differs from it at turn 1"),
        ("pairs", {"prompt": [_user("q"), _assistant("a"), _user("r")], "chosen": [_user("q"), _assistant("x")],
                   "rejected": "b"}, "'chosen' does not continue the prompt: it differs from it at turn 2"),
        ("pairs", {"prompt": "q", "chosen": [_user("q")], "rejected": "b"},
         "'chosen' ends with a user turn, expected the assistant's reply"),
        ("pairs", {"prompt": [_user("q"), _assistant("a")], "chosen": "x", "rejected": "y"},
         "'prompt' ends with an assistant turn; a prompt must end with a user turn"),
        ("pairs", {"prompt": [SYSTEM], "chosen": "x", "rejected": "y"}, "'prompt' ends with a system turn"),
        ("pairs", {"prompt": [_user("q"), SYSTEM, _user("r")], "chosen": "x", "rejected": "y"},
         "'prompt' turn 2 is a system turn; a system message may only come first"),
        ("pairs", {"prompt": [{"role": "bot", "content": "q"}], "chosen": "x", "rejected": "y"},
         "'prompt' turn 1 has unknown role 'bot'"),
        ("pairs", {"prompt": [SYSTEM, _user("q")], "system": "s", "chosen": "x", "rejected": "y"},
         "both a 'system' key and a system turn opening 'prompt'"),
        ("pairs", {"prompt": {"text": "q"}, "chosen": "x", "rejected": "y"}, "'prompt' is an object, expected"),
        ("pairs", PAIR | {"margin": "big"}, "'margin' is 'big', expected a number"),
        ("pairs", PAIR | {"margin": [1]}, "'margin' is [1], expected a finite number"),
        ("pairs", PAIR | {"margin": float("nan")}, "'margin' is nan, expected a finite number"),
        ("ranking", {"responses": ["a", "b"]}, "missing key 'prompt' (ranking rows need 'prompt' and 'responses'"),
        ("ranking", {"prompt": "q", "responses": ["a"]}, "'responses' has 1 response(s); a ranking needs at least 2"),
        ("ranking", {"prompt": "q", "responses": "a, b"}, "'responses' is a string, expected a list of responses"),
        ("ranking", {"prompt": "q", "responses": ["a", 2]}, "response 2 is a number, expected a string or a list"),
        ("ranking", {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [0, 1]}, "'ranks' has 2 entries for 3"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "scores": [1, 2, 3]}, "'scores' has 3 entries for 2"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "ranks": [0, -1]},
         "'ranks' entry 2 is -1; ranks are whole numbers >= 0 (0 = best)"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "ranks": [0.5, 0]}, "'ranks' entry 1 is 0.5; ranks are"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "ranks": ["x", 0]}, "'ranks' entry 1 is 'x', expected"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "ranks": [True, 0]}, "'ranks' entry 1 is True"),
        ("ranking", {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 1, 1]},
         "all 3 responses are tied, so there is no preference"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "scores": [0.3, 0.3]}, "all 2 responses are tied"),
        ("ranking", {"prompt": "q", "responses": ["a", "b", "a"], "ranks": [0, 1, 2]},
         "responses 1 and 3 are the same text but ranked differently"),
        ("ranking", {"prompt": "q", "responses": ["a", "a"]}, "responses 1 and 2 are the same text but ranked"),
        ("ranking", {"prompt": "q", "responses": ["a", "b"], "ranks": [0, 1], "scores": [1, 0]},
         "both 'ranks' and 'scores' are given; give one"),
        ("unpaired", {"prompt": "q", "completion": "a"},
         "missing key 'label' (unpaired rows need 'prompt', 'completion' and 'label'"),
        ("unpaired", {"prompt": "q", "completion": "a", "label": "yes"}, "'label' is 'yes', expected true or false"),
        ("unpaired", {"prompt": "q", "completion": "a", "label": 2}, "'label' is 2, expected true or false"),
        ("unpaired", {"prompt": "q", "completion": "a", "desirable": None}, "'desirable' is null, expected true"),
        ("unpaired", {"prompt": "q", "completion": " ", "label": True}, "'completion' is empty"),
    ],
)
def test_bad_row_reasons(fmt, row, reason):
    with pytest.raises(BadRowError) as info:
        to_preference_record(row, fmt, "f:1")
    assert info.value.reason.startswith(reason)
    assert not isinstance(info.value, DataError)


def _mixed_pairs(tmp_path):
    """8 pair rows, 3 bad (lines 2, 5 and 7)."""
    rows = [PAIR, PAIR | {"rejected": "c b a"}, PAIR, PAIR, {"prompt": "q", "chosen": "a"}, PAIR,
            PAIR | {"margin": "x"}, PAIR]
    lines = [json.dumps(r) for r in rows]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_error_policy_lists_every_bad_row_with_its_location(tmp_path):
    path = _mixed_pairs(tmp_path)
    with pytest.raises(DataError) as info:
        load_preference_records([path], log=_quiet)
    message = str(info.value)
    assert message.startswith("3 of 8 rows are malformed") and "bad_rows=skip" in message
    assert f"{path}:2: 'chosen' and 'rejected' are the same text" in message
    assert f"{path}:5: missing key 'rejected'" in message
    assert f"{path}:7: 'margin' is 'x', expected a number" in message


def test_skip_policy_writes_rejects_and_counts_add_up(tmp_path):
    path = _mixed_pairs(tmp_path)
    rejects = tmp_path / "run" / "rejects.jsonl"
    logged = []
    records, report = load_preference_records([path], bad_rows="skip", max_bad_fraction=0.5,
                                              rejects_path=str(rejects), log=logged.append)
    assert len(records) == report.good == 5 and report.bad == 3 and report.good + report.bad == report.total == 8
    assert [r.source for r in records] == [f"{path}:{n}" for n in (1, 3, 4, 6, 8)]
    lines = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [r["location"] for r in lines] == [f"{path}:2", f"{path}:5", f"{path}:7"]
    assert lines[1]["row"] == {"prompt": "q", "chosen": "a"}
    assert len(logged) == 1 and "skipped 3 of 8 rows" in logged[0]
    with pytest.raises(DataError, match=r"3 of 8 rows \(37.50%\) are malformed, more than max_bad_fraction=0.1"):
        load_preference_records([path], bad_rows="skip", max_bad_fraction=0.1, log=_quiet)


# --------------------------------------------------------------------------- tokens


def _label_text(tokenizer, example: Example) -> str:
    return tokenizer.decode([t for t in example.labels if t != IGNORE_INDEX])


def _first_label(example: Example) -> int:
    return next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)


@pytest.mark.parametrize("template, end", [(CHATML, "<|im_end|>"), (ALPACA, "<|im_end|>")])
def test_only_the_final_assistant_turn_is_labelled(tokenizer, template, end):
    prompt = [SYSTEM, _user("Copy: a b"), _assistant("a b"), _user("Reverse: a b")]
    example = encode_response(prompt, "b a", tokenizer, template, "f:4")
    assert _label_text(tokenizer, example) == "b a" + end  # not the earlier "a b" turn
    start = _first_label(example)
    labelled = [i for i, t in enumerate(example.labels) if t != IGNORE_INDEX]
    assert labelled == list(range(start, start + len(labelled)))  # one contiguous span
    assert all(example.labels[i] == example.input_ids[i] for i in labelled) and example.source == "f:4"
    assert tokenizer.decode(example.input_ids[:start]).endswith("Reverse: a b" + end + "\n<|im_start|>assistant\n"
                                                                if template == CHATML else "### Response:\n")


def test_both_sides_of_a_pair_share_the_prompt_tokens(tokenizer):
    record = to_preference_record({"prompt": "Reverse: q m t", "chosen": "t m q", "rejected": " q m t"}, "pairs", "f:9")
    example = encode_preference(record, tokenizer, CHATML)
    chosen, rejected = example.sequences
    start = _first_label(chosen)
    assert _first_label(rejected) == start and chosen.input_ids[:start] == rejected.input_ids[:start]
    assert [_label_text(tokenizer, s) for s in example.sequences] == ["t m q<|im_end|>", " q m t<|im_end|>"]
    assert (example.ranks, example.margin, example.desirable, example.source) == ([0, 1], None, None, "f:9")


def test_slow_tokenizers_are_refused(tokenizer):
    slow = types.SimpleNamespace(is_fast=False)
    with pytest.raises(DataError, match="slow"):
        encode_response([_user("q")], "a", slow, CHATML)


def _seq(n_prompt: int, n_answer: int) -> Example:
    ids = list(range(1, n_prompt + n_answer + 1))
    return Example(ids, [IGNORE_INDEX] * n_prompt + ids[n_prompt:], "f")


def _examples():
    return [
        PreferenceExample([_seq(3, 2), _seq(3, 4)], [0, 1], None, None, "a"),  # rejected 7 long: cut to 6, 3 labels
        PreferenceExample([_seq(6, 2), _seq(6, 1)], [0, 1], None, None, "b"),  # prompt fills max_length
        PreferenceExample([_seq(2, 2)], None, True, None, "c"),  # fits
        PreferenceExample([_seq(5, 3), _seq(2, 1), _seq(4, 2)], [0, 1, 2], None, None, "d"),  # one too long
    ]


def test_fit_preference_length_truncate():
    kept, report = fit_preference_length(_examples(), 6, "truncate")
    assert [e.source for e in kept] == ["a", "c", "d"]
    assert [len(s) for s in kept[0].sequences] == [5, 6] and kept[0].sequences[1].num_label_tokens == 3
    assert [len(s) for s in kept[2].sequences] == [6, 3, 6] and kept[2].ranks == [0, 1, 2]
    assert report == {"records": 4, "max_length": 6, "policy": "truncate", "too_long_records": 3,
                      "truncated_sequences": 2, "dropped_too_long": 0, "dropped_no_labels": 1, "dropped_identical": 0,
                      "trimmed_identical": 0, "removed_identical": 0, "identical_sources": [], "dropped_records": 1,
                      "summary": "3 of 4 records have a sequence longer than 6 tokens: 2 sequences truncated; "
                                 "1 dropped with a response left without label tokens (prompt too long)"}


def test_fit_preference_length_drop():
    kept, report = fit_preference_length(_examples(), 6, "drop")
    assert [e.source for e in kept] == ["c"]
    assert (report["too_long_records"], report["truncated_sequences"], report["dropped_too_long"],
            report["dropped_records"]) == (3, 0, 3, 3)
    assert report["summary"] == "3 of 4 records have a sequence longer than 6 tokens: dropped"
    assert fit_preference_length(_examples(), 100)[1]["summary"] == (
        "0 of 4 records have a sequence longer than 100 tokens")
    with pytest.raises(ConfigError, match="unknown length policy 'cut'"):
        fit_preference_length([], 6, "cut")


# --------------------------------------------------------------------------- prepare_preference_data


def _cfg(**changes):
    cfg = dict(train_files=["synthetic"], eval_files=[], eval_fraction=0.1, format="auto", template="auto",
               max_length=64, overlength="truncate", bad_rows="error", max_bad_fraction=0.01,
               synthetic_tasks=["smallest", "reverse"], synthetic_size=40, synthetic_kind="pairs",
               synthetic_responses=3)
    return types.SimpleNamespace(**(cfg | changes))


def _user_text(tokenizer, example: PreferenceExample) -> str:
    text = tokenizer.decode(example.sequences[0].input_ids)
    return text.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


@pytest.mark.parametrize("kind, sequences", [("pairs", 2), ("ranking", 3), ("unpaired", 1)])
def test_prepare_synthetic(tmp_path, tokenizer, kind, sequences):
    logged = []
    data = prepare_preference_data(_cfg(synthetic_kind=kind), tokenizer, tmp_path / "run", seed=5, log=logged.append)
    assert len(data.train) == 36 and len(data.eval) == 4 == len(data.eval_records)
    assert all(len(e.sequences) == sequences for e in data.train + data.eval)
    train_prompts = {_user_text(tokenizer, e) for e in data.train}
    eval_prompts = {r.prompt[-1]["content"] for r in data.eval_records}
    assert len(eval_prompts) == 4 and not train_prompts & eval_prompts
    for e in data.train:  # the best (or desirable) response is the correct answer, and only it
        answers = [_label_text(tokenizer, s).removesuffix("<|im_end|>") for s in e.sequences]
        correct = [a == _correct(_user_text(tokenizer, e)) for a in answers]
        assert correct == ([e.desirable] if kind == "unpaired" else [r == 0 for r in e.ranks])
    if kind == "unpaired":
        assert sum(e.desirable for e in data.train) == 18 and all(e.ranks is None for e in data.train)
    else:
        assert all(e.desirable is None and e.margin is None for e in data.train)
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_read"] == {"source": "synthetic", "kind": kind, "tasks": ["smallest", "reverse"],
                                    "rows": 40, "bad": 0}
    assert (report["train_records"], report["eval_records"], report["train_sequences"]) == (36, 4, 36 * sequences)
    assert report["train_length"]["dropped_records"] == 0
    assert [line.split(":")[0] for line in logged] == ["train", "eval"]


def test_prepare_from_a_jsonl_file_with_skipped_rows(tmp_path, tokenizer):
    path = _mixed_pairs(tmp_path)
    run = tmp_path / "run"
    cfg = _cfg(train_files=[path], eval_fraction=0.2, bad_rows="skip", max_bad_fraction=0.5)
    logged = []
    data = prepare_preference_data(cfg, tokenizer, run, seed=0, log=logged.append)
    # the 5 good rows share one prompt: held out by prompt (stop 32), none can be, and the log says so
    assert (len(data.train), len(data.eval)) == (5, 0)
    assert "all 5 training rows share one prompt, so none is held out" in logged[1]
    assert len((run / "rejects-train.jsonl").read_text().splitlines()) == 3
    assert [_label_text(tokenizer, s) for s in data.train[0].sequences] == ["c b a<|im_end|>", "a b c<|im_end|>"]
    assert data.train[0].margin == 0.5
    report = json.loads((run / "data_report.json").read_text())
    assert (report["train_read"]["rows"], report["train_read"]["bad_rows"]) == (8, 3)
    assert report["eval_read"] == {"rows": 0, "split_from_train": True, "held_out_prompts_unique": True, "prompts": 0}
    assert "train: 5 preference records (2 responses); 0 of 5 records" in logged[2]


def test_prepare_with_eval_files_and_a_length_policy_that_leaves_nothing(tmp_path, tokenizer):
    train = _write(tmp_path / "train.jsonl", ROWS["ranking"])
    held = _write(tmp_path / "eval.jsonl", ROWS["unpaired"])
    data = prepare_preference_data(_cfg(train_files=[train], eval_files=[held]), tokenizer, tmp_path / "run", 0,
                                   log=_quiet)
    assert [e.ranks for e in data.train] == [[0, 1, 1], [1, 0]] and [e.desirable for e in data.eval] == [True, False]
    with pytest.raises(DataError, match="none of the 2 training records is left after the length policy"):
        prepare_preference_data(_cfg(train_files=[train], eval_fraction=0, max_length=8), tokenizer, tmp_path / "run",
                                0, log=_quiet)
    with pytest.raises(ConfigError, match="'synthetic' cannot be mixed with files"):
        prepare_preference_data(_cfg(train_files=[train, "synthetic"]), tokenizer, tmp_path / "run", 0, log=_quiet)


# --------------------------------------------------------------------------- synthetic preferences


def _correct(prompt: str) -> str:
    task, rest = prompt.split(": ", 1)
    if task == "Add":
        a, b = rest.split(" + ")
        return str(int(a) + int(b))
    letters = rest.split(" ")
    return {"Smallest letter": min(letters), "Largest letter": max(letters), "Copy": " ".join(letters),
            "Reverse": " ".join(letters[::-1]), "Count letters": str(len(letters))}[task]


def test_synthetic_pairs_prefer_the_correct_answer():
    rows = synthetic.make_preference_rows(list(synthetic.TASKS), 300, seed=2)
    assert all(row.keys() == {"prompt", "chosen", "rejected"} for row in rows)
    assert all(row["chosen"] == _correct(row["prompt"]) != row["rejected"] for row in rows)
    prompts = [e.instruction for e in synthetic.make_examples(list(synthetic.TASKS), 300, seed=2)]
    assert [row["prompt"] for row in rows] == prompts  # the same prompts as the SFT tasks
    for row in rows:  # the wrong answer has the right shape: same length for copy/reverse, a number, ...
        assert len(row["rejected"]) in ((len(row["chosen"]),) if not row["prompt"].startswith(("Add", "Count"))
                                        else (1, 2, 3))


def test_synthetic_rankings_rank_by_distance_from_correct():
    rows = synthetic.make_preference_rows(["count", "smallest"], 200, seed=4, kind="ranking", num_responses=4)
    for row in rows:
        correct, responses, ranks = _correct(row["prompt"]), row["responses"], row["ranks"]
        assert len(responses) == len(set(responses)) == 4 and ranks.count(0) == 1
        assert responses[ranks.index(0)] == correct
        assert sorted(set(ranks)) == list(range(max(ranks) + 1))  # dense
        if row["prompt"].startswith("Count"):
            distance = [abs(int(r) - int(correct)) for r in responses]
        else:
            letters = row["prompt"].split(": ")[1].split(" ")
            distance = [abs(ord(r) - ord(correct)) + (0 if r in letters else 26) for r in responses]
        for i in range(4):
            for j in range(4):
                assert (ranks[i] < ranks[j]) == (distance[i] < distance[j])
    assert all(row.keys() == {"prompt", "responses", "ranks"} for row in rows)
    assert any(len(set(row["ranks"])) < 4 for row in rows)  # count's off-by-one either way ties


@pytest.mark.parametrize("tasks, n, per_task", [(["copy", "reverse", "count"], 60, [10, 10, 10]),
                                                (["copy", "count"], 6, [2, 1]), (["copy", "count"], 8, [2, 2])])
def test_synthetic_unpaired_is_balanced_per_task(tasks, n, per_task):
    rows = synthetic.make_preference_rows(tasks, n, seed=0, kind="unpaired")
    assert sum(row["label"] for row in rows) == n // 2
    prefixes = {"copy": "Copy", "reverse": "Reverse", "count": "Count"}
    assert [sum(row["label"] for row in rows if row["prompt"].startswith(prefixes[t])) for t in tasks] == per_task
    assert all((row["completion"] == _correct(row["prompt"])) == row["label"] for row in rows)


def test_synthetic_preferences_are_deterministic_and_split_cleanly():
    args = (["reverse", "addition"], 50)
    for kind in ("pairs", "ranking", "unpaired"):
        assert synthetic.make_preference_rows(*args, seed=3, kind=kind) == \
            synthetic.make_preference_rows(*args, seed=3, kind=kind)
    assert synthetic.make_preference_rows(*args, seed=3) != synthetic.make_preference_rows(*args, seed=4)
    train, held = synthetic.make_preference_split(["smallest"], 300, 30, seed=1, kind="ranking", num_responses=5)
    assert len(train) == 300 and len(held) == len({r["prompt"] for r in held}) == 30
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert all(len(r["responses"]) == 5 for r in train + held)


def test_synthetic_preference_errors():
    with pytest.raises(ConfigError, match="unknown synthetic preference kind 'triples'"):
        synthetic.make_preference_rows(["copy"], 2, kind="triples")
    with pytest.raises(ConfigError, match="fewer than 6 plausible wrong answers"):
        synthetic.make_preference_rows(["count"], 2, kind="ranking", num_responses=7)
    with pytest.raises(ConfigError, match="at least 2 responses"):
        synthetic.make_preference_rows(["count"], 2, kind="ranking", num_responses=1)
