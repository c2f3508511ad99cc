"""Review: reading and preparing preference data (pairs, rankings, unpaired), checked against
expectations written out here (the tokenizer's own chat template with {% generation %} tags,
hand-rendered templates, hand-enumerated pairs and weights)."""

from __future__ import annotations

import copy
import json
import types

import pytest

from posttrain.data.formats import BadRowError
from posttrain.data.preferences import (
    PreferenceRecord,
    encode_preference,
    encode_response,
    fit_preference_length,
    load_preference_records,
    prepare_preference_data,
    to_preference_record,
)
from posttrain.data.records import IGNORE_INDEX
from posttrain.data.templates import ALPACA, CHATML
from posttrain.errors import DataError


def _quiet(*_):
    pass


def _u(text):
    return {"role": "user", "content": text}


def _a(text):
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "Be brief."}
PAIR = {"prompt": "q", "chosen": "a", "rejected": "b"}


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.presets import build_tokenizer

    return build_tokenizer()


def _cfg(files, **changes):
    cfg = dict(train_files=files, eval_files=[], eval_fraction=0.0, format="auto", template="auto",
               max_length=256, overlength="truncate", bad_rows="error", max_bad_fraction=0.0,
               synthetic_tasks=[], synthetic_size=0, synthetic_kind="pairs", synthetic_responses=2)
    return types.SimpleNamespace(**(cfg | changes))


def _hf_final_turn(tokenizer, messages):
    """(input_ids, labels) from transformers' own apply_chat_template on the preset template's
    {% generation %} tags, keeping only the last assistant turn's run of marked tokens."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    last = max(i for i, m in enumerate(mask) if m)
    first = last
    while first > 0 and mask[first - 1]:
        first -= 1
    labels = [t if first <= i <= last else IGNORE_INDEX for i, t in enumerate(ids)]
    return ids, labels


def _labelled(example):
    return [t for t in example.labels if t != IGNORE_INDEX]


def _first_label(example):
    return next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)


# =========================================================================== reading files


def test_jsonl_with_bom_crlf_blank_lines_and_no_final_newline(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [PAIR, PAIR | {"chosen": "c\r\nd"}, PAIR | {"prompt": "é😀"}]
    data = (b"\xef\xbb\xbf" + json.dumps(rows[0]).encode() + b"\r\n\r\n   \r\n"
            + json.dumps(rows[1]).encode() + b"\r\n" + json.dumps(rows[2], ensure_ascii=False).encode("utf-8"))
    path.write_bytes(data)
    records, report = load_preference_records([str(path)], log=_quiet)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4", f"{path}:5"]
    assert [r.responses for r in records] == [["a", "b"], ["c\r\nd", "b"], ["a", "b"]]  # CRLF inside a value kept
    assert records[2].prompt == [_u("é😀")]
    assert (report.total, report.good, report.bad) == (3, 3, 0)


def test_comment_lines_are_reported_bad_rows_with_their_line_not_lost(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("# a comment\n" + json.dumps(PAIR) + "\n// another\n" + json.dumps(PAIR | {"chosen": "z"}) + "\n")
    with pytest.raises(DataError) as info:
        load_preference_records([str(path)], log=_quiet)
    assert f"{path}:1: invalid JSON" in str(info.value) and f"{path}:3: invalid JSON" in str(info.value)
    rejects = tmp_path / "rejects.jsonl"
    logged = []
    records, report = load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=0.5,
                                              rejects_path=str(rejects), log=logged.append)
    assert [r.source for r in records] == [f"{path}:2", f"{path}:4"]
    assert [json.loads(line)["row"] for line in rejects.read_text().splitlines()] == ["# a comment", "// another"]
    assert (report.total, report.good, report.bad) == (4, 2, 2) and "skipped 2 of 4 rows" in logged[0]


def test_json_array_with_bom_and_crlf_gives_each_element_its_line(tmp_path):
    rows = [PAIR, PAIR | {"rejected": "a"}, PAIR | {"chosen": "z"}, "not an object"]
    body = ",\r\n".join(json.dumps(r, indent=1).replace("\n", "\r\n") for r in rows)
    path = tmp_path / "p.json"
    path.write_text("\ufeff[\r\n" + body + "\r\n]\r\n", newline="")
    # element k starts at line: 2, 7, 12, 17 (each object spans 5 lines)
    with pytest.raises(DataError) as info:
        load_preference_records([str(path)], log=_quiet)
    message = str(info.value)
    assert f"{path}:7: 'chosen' and 'rejected' are the same text" in message
    assert f"{path}:17: expected a JSON object, got a string" in message
    records, report = load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=0.5, log=_quiet)
    assert [r.source for r in records] == [f"{path}:2", f"{path}:12"] and (report.good, report.bad) == (2, 2)


def test_json_file_holding_one_object_per_line_and_a_wrapper_object(tmp_path):
    lines = tmp_path / "lines.json"
    lines.write_text(json.dumps(PAIR) + "\n\n" + json.dumps(PAIR | {"chosen": "y"}))
    records, _ = load_preference_records([str(lines)], log=_quiet)
    assert [(r.source, r.responses) for r in records] == [(f"{lines}:1", ["a", "b"]), (f"{lines}:3", ["y", "b"])]
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 2, "data": [PAIR, PAIR | {"chosen": "w"}]}))
    records, _ = load_preference_records([str(wrapped)], log=_quiet)
    assert [r.responses[0] for r in records] == ["a", "w"]


def test_csv_with_bom_crlf_and_multiline_cells_keeps_line_numbers(tmp_path):
    path = tmp_path / "p.csv"
    text = ("\ufeffprompt,chosen,rejected\r\n"
            "q,a,b\r\n"
            "\"multi\r\nline\",x,y\r\n"
            "q,same,same\r\n"
            "q,\"[{\"\"role\"\": \"\"assistant\"\", \"\"content\"\": \"\"m\"\"}]\",n\r\n")
    path.write_bytes(text.encode("utf-8"))
    records, report = load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=0.5, log=_quiet)
    assert [r.source for r in records] == [f"{path}:2", f"{path}:3", f"{path}:6"]
    assert records[1].prompt == [_u("multi\r\nline")] and records[2].responses == ["m", "n"]
    assert report.first_bad[0].location == f"{path}:5"
    assert report.files[0].format == "pairs"  # the BOM did not hide the 'prompt' column


def test_a_file_mixing_formats_reports_the_minority_rows_and_files_may_differ(tmp_path):
    mixed = tmp_path / "mixed.jsonl"
    rows = [PAIR, {"prompt": "q", "responses": ["a", "b"]}, PAIR | {"chosen": "c"},
            {"prompt": "q", "completion": "a", "label": True}]
    mixed.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError) as info:
        load_preference_records([str(mixed)], log=_quiet)
    assert f"{mixed}:2: missing key 'chosen'" in str(info.value)
    assert f"{mixed}:4: missing key 'chosen'" in str(info.value)
    # one format per file, different formats in different files: all read
    files = []
    for name, row in [("p", PAIR), ("r", {"prompt": "q", "responses": ["a", "b", "c"], "ranks": [1, 0, 2]}),
                      ("u", {"prompt": "q", "completion": "a", "desirable": False})]:
        files.append(tmp_path / f"{name}.jsonl")
        files[-1].write_text(json.dumps(row) + "\n")
    records, report = load_preference_records([str(f) for f in files], log=_quiet)
    assert [f.format for f in report.files] == ["pairs", "ranking", "unpaired"]
    assert [(r.ranks, r.desirable) for r in records] == [([0, 1], None), ([1, 0, 2], None), (None, False)]


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_unpaired_label_or_desirable_column_in_csv_and_parquet(tmp_path, kind):
    """Docstring: unpaired {"prompt", "completion", "label": true/false} (or "desirable"); blank/null
    cells spell "absent" in CSV/Parquet (formats._optional_string, preferences.absent). A JSONL file
    whose rows use either key reads fine; the same rows as a table must too."""
    rows = [{"prompt": "q", "completion": "a", "label": True},
            {"prompt": "q", "completion": "b", "desirable": False}]
    jsonl = tmp_path / "u.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [r.desirable for r in load_preference_records([str(jsonl)], log=_quiet)[0]] == [True, False]
    if kind == "csv":
        path = tmp_path / "u.csv"
        path.write_text("prompt,completion,label,desirable\nq,a,true,\nq,b,,false\n")
    else:
        pa = pytest.importorskip("pyarrow")
        import pyarrow.parquet as pq

        path = tmp_path / "u.parquet"
        pq.write_table(pa.Table.from_pylist([r | {k: None for k in ("label", "desirable") if k not in r}
                                             for r in rows]), path)
    records, _ = load_preference_records([str(path)], log=_quiet)
    assert [r.desirable for r in records] == [True, False]


@pytest.mark.parametrize("value, desirable", [("TRUE", True), (" 0 ", False), ("false\r", False)])
def test_unpaired_label_strings(value, desirable):
    assert to_preference_record({"prompt": "q", "completion": "a", "label": value}, "unpaired").desirable is desirable


@pytest.mark.parametrize("value", ["yes", "no", "y", 2, 1.0, [True]])
def test_unpaired_label_that_is_not_a_boolean_is_a_bad_row(value):
    with pytest.raises(BadRowError, match="'label' is .*expected true or false"):
        to_preference_record({"prompt": "q", "completion": "a", "label": value}, "unpaired")


# =========================================================================== rows → records


def test_every_way_of_giving_a_side_gives_the_same_record():
    prompt = [SYSTEM, _u("Copy: a"), _a("a"), _u("Reverse: a b")]
    base = to_preference_record({"prompt": prompt, "chosen": "b a", "rejected": "a b"}, "pairs")
    variants = [
        {"prompt": prompt[1:], "system": "Be brief.", "chosen": [_a("b a")], "rejected": "a b"},
        {"prompt": prompt, "chosen": [*prompt, _a("b a")], "rejected": [*prompt[1:], _a("a b")]},
        {"chosen": [*prompt, _a("b a")], "rejected": [*prompt, _a("a b")]},  # no prompt: shared turns
        {"system": "Be brief.", "chosen": [*prompt[1:], _a("b a")], "rejected": [*prompt[1:], _a("a b")]},
        {"prompt": json.dumps(prompt), "chosen": json.dumps([_a("b a")]), "rejected": "a b"},  # CSV cells
        {"prompt": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Copy: a"},
                    {"from": "gpt", "value": "a"}, {"from": "user", "value": "Reverse: a b"}],
         "chosen": [{"from": "gpt", "value": "b a"}], "rejected": "a b"},
    ]
    assert base.prompt == prompt and base.responses == ["b a", "a b"]
    for row in variants:
        record = to_preference_record(row, "pairs")
        assert (record.prompt, record.responses, record.ranks) == (prompt, ["b a", "a b"], [0, 1]), row


@pytest.mark.parametrize("row, reason", [
    ({"prompt": "q", "chosen": _a("x"), "rejected": "y"}, "'chosen' is an object, expected a string or a list"),
    ({"prompt": "q", "chosen": [SYSTEM, _u("q"), _a("x")], "rejected": "y"},
     "'chosen' does not continue the prompt: it differs from it at turn 1"),
    ({"chosen": [SYSTEM, _u("q"), _a("x")], "rejected": [_u("q"), _a("y")]},
     "chosen and rejected do not share the prompt turns: they differ at turn 1"),
    ({"prompt": "q", "chosen": [_u("q"), _a("x"), _u("more"), _a("z")], "rejected": "y"},
     "'chosen' does not continue the prompt: it differs from it at turn 2"),
    ({"prompt": "q", "chosen": "x", "rejected": [_u("q"), _a("x")]}, "'chosen' and 'rejected' are the same text"),
    ({"prompt": "q", "chosen": "\t \n", "rejected": "y"}, "'chosen' is empty"),
    ({"prompt": "q", "chosen": [_a("")], "rejected": "y"}, "'chosen' turn 1 (assistant) content is empty"),
    ({"prompt": " ", "chosen": "x", "rejected": "y"}, "no 'prompt', and 'chosen' is a string"),
])
def test_pair_problems_are_bad_rows(row, reason):
    with pytest.raises(BadRowError) as info:
        to_preference_record(row, "pairs", "f:1")
    assert info.value.reason.startswith(reason), info.value.reason


@pytest.mark.parametrize("extra, ranks", [
    ({"ranks": [1, 2, 3]}, [0, 1, 2]),  # 1-based: only the order matters
    ({"ranks": ["2", "1", "2"]}, [1, 0, 1]),  # numbers as strings
    ({"ranks": "[5, 9, 5]"}, [0, 1, 0]),  # JSON-encoded cell
    ({"scores": [-0.5, -2.5, 10]}, [1, 2, 0]),
    ({"scores": "[1e-9, 0, 0]"}, [0, 1, 1]),
    ({"ranks": "", "scores": None}, [0, 1, 2]),  # blank cells: neither given, best first
])
def test_rank_encodings(extra, ranks):
    row = {"prompt": "q", "responses": ["x", "y", "z"]} | extra
    assert to_preference_record(row, "ranking").ranks == ranks


def test_duplicate_responses_tied_are_accepted_and_k1_all_ties_are_not():
    record = to_preference_record({"prompt": "q", "responses": ["a", "b", "a"], "ranks": [0, 1, 0]}, "ranking")
    assert record.responses == ["a", "b"] and record.ranks == [0, 1] and record.merged_responses == 1  # kept once
    for row, reason in [({"prompt": "q", "responses": ["a"], "ranks": [0]}, "'responses' has 1 response(s)"),
                        ({"prompt": "q", "responses": ["a", "b", "c"], "scores": [2, 2, 2]}, "all 3 responses are tied"),
                        ({"prompt": "q", "responses": ["a", [_u("q"), _a("a")]], "ranks": [0, 1]},
                         "responses 1 and 2 are the same text but ranked differently")]:
        with pytest.raises(BadRowError) as info:
            to_preference_record(row, "ranking")
        assert info.value.reason.startswith(reason)


def test_unicode_is_kept_exactly_and_not_normalised():
    nfc, nfd = "caf\u00e9 \U0001F600", "cafe\u0301 \U0001F600"
    record = to_preference_record({"prompt": "Say caf\u00e9", "chosen": nfc, "rejected": nfd}, "pairs")
    assert record.responses == [nfc, nfd]  # different code points: a real (if odd) pair, kept as given


# =========================================================================== tokens and labels


@pytest.mark.parametrize("response", ["b a", "  lead", "trail  \n", "\U0001F600 e\u0301 x", "line1\r\nline2",
                                      "\n\nstarts with newlines", "x<|im_end|>y"])
@pytest.mark.parametrize("prompt", [[_u("Reverse: a b")], [SYSTEM, _u("Copy: a"), _a("a"), _u("Reverse: a b")]],
                         ids=["one-turn", "system+multi-turn"])
def test_ids_and_labels_equal_the_tokenizers_own_template_with_generation_tags(tokenizer, prompt, response):
    """The preset template marks {% generation %} around content + <|im_end|>: transformers'
    assistant mask of the final turn is the documented label set."""
    from posttrain.data.templates import resolve_template

    example = encode_response(prompt, response, tokenizer, resolve_template(tokenizer, "auto"), "f:1")
    ids, labels = _hf_final_turn(tokenizer, [*prompt, _a(response)])
    assert example.input_ids == ids
    assert example.labels == labels
    assert tokenizer.decode(_labelled(example)) == response + "<|im_end|>"


def test_alpaca_template_by_hand(tokenizer):
    """ALPACA renders 'system\\n\\n### Instruction:\\n...\\n\\n### Response:\\n' + answer + eos + '\\n\\n';
    labels are the answer and eos only (the earlier response is context)."""
    prompt = [SYSTEM, _u("Copy: a"), _a("a"), _u("Reverse: a b")]
    head = ("Be brief.\n\n### Instruction:\nCopy: a\n\n### Response:\na<|im_end|>\n\n"
            "### Instruction:\nReverse: a b\n\n### Response:\n")
    answer = "b a<|im_end|>"
    head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    tail_ids = tokenizer("\n\n", add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(head + answer + "\n\n", add_special_tokens=False)["input_ids"]
    assert full_ids == head_ids + answer_ids + tail_ids  # clean token boundaries for this text
    example = encode_response(prompt, "b a", tokenizer, ALPACA)
    assert example.input_ids == full_ids
    assert example.labels == [IGNORE_INDEX] * len(head_ids) + answer_ids + [IGNORE_INDEX] * len(tail_ids)


def test_ranking_responses_share_the_prompt_tokens_and_each_equals_its_own_render(tokenizer):
    row = {"prompt": [_u("Copy: a"), _a("a"), _u("Count letters: a b")], "system": "Be brief.",
           "responses": ["2", [_u("Copy: a"), _a("a"), _u("Count letters: a b"), _a("3")], " 1 ", "\U0001F600"],
           "scores": [3, 1, 2, 0]}
    record = to_preference_record(row, "ranking", "r:1")
    example = encode_preference(record, tokenizer, CHATML)
    cuts = {_first_label(s) for s in example.sequences}
    assert len(cuts) == 1
    cut = cuts.pop()
    assert len({tuple(s.input_ids[:cut]) for s in example.sequences}) == 1
    for sequence, text in zip(example.sequences, ["2", "3", " 1 ", "\U0001F600"]):
        rendered = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCopy: a<|im_end|>\n"
                    "<|im_start|>assistant\na<|im_end|>\n<|im_start|>user\nCount letters: a b<|im_end|>\n"
                    f"<|im_start|>assistant\n{text}<|im_end|>\n")
        assert sequence.input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(_labelled(sequence)) == text + "<|im_end|>"
        assert sequence.source == "r:1"
    assert example.ranks == [0, 2, 1, 3]


def _newline_merging_tokenizer():
    """Byte-level BPE whose pre-tokenizer keeps a run of newlines together (as Llama 3's and
    Qwen2's regexes do: \\s*[\\r\\n]+), with "\\n\\n" one token."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["ĊĊ"] = len(vocab)
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")]))
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\s*[\r\n]+|[^\r\n]+"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|pad|>"])
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|pad|>")


def test_a_response_starting_with_a_newline_keeps_its_newline_and_the_shared_prompt(tmp_path):
    """preferences.py: 'every response to a prompt gets the same prompt tokens'; README: the loss
    covers the assistant turn's content plus its end-of-turn marker."""
    tokenizer = _newline_merging_tokenizer()
    record = to_preference_record({"prompt": "q", "chosen": "\nyes", "rejected": "no"}, "pairs")
    chosen, rejected = encode_preference(record, tokenizer, CHATML).sequences
    prompt_ids = tokenizer("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n",
                           add_special_tokens=False)["input_ids"]
    assert rejected.input_ids[:_first_label(rejected)] == prompt_ids
    assert chosen.input_ids[:_first_label(chosen)] == prompt_ids
    assert tokenizer.decode(_labelled(chosen)) == "\nyes<|im_end|>"


def test_a_tokenizer_that_prefixes_each_string_keeps_the_joint_tokens():
    """tokenize_with_labels tokenises the prompt alone only when the two halves decode to the
    whole text; a tokenizer that prefixes a space to every string it is given (SentencePiece's
    dummy prefix) would add one inside the sequence, so the joint tokens stay."""
    real = _newline_merging_tokenizer()

    class Prefixing:
        is_fast = True

        def __getattr__(self, name):
            return getattr(real, name)

        def __call__(self, text, **kwargs):
            return real(text if text.startswith("<|im_start|>") else " " + text, **kwargs)

    record = to_preference_record({"prompt": "q", "chosen": "\nyes", "rejected": "no"}, "pairs")
    chosen = encode_preference(record, Prefixing(), CHATML).sequences[0]
    joint = real("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n\nyes<|im_end|>\n",
                 add_special_tokens=False)["input_ids"]
    assert chosen.input_ids == joint
    assert real.decode(_labelled(chosen)) == "yes<|im_end|>"  # the merged newline token stays context


# =========================================================================== length


def test_truncation_cuts_the_end_of_the_response_and_keeps_the_prompt(tokenizer):
    record = to_preference_record({"prompt": "Copy: a b c", "responses": ["a b c", "a b c d e f g h i j k", "z"],
                                   "ranks": [0, 1, 2]}, "ranking", "f:3")
    full = [_hf_final_turn(tokenizer, [_u("Copy: a b c"), _a(r)])[0] for r in ["a b c", "a b c d e f g h i j k", "z"]]
    max_length = len(full[0]) + 2  # the long response's first letters survive, "z" and "a b c" fit
    assert len(full[1]) > max_length >= len(full[2])
    kept, report = fit_preference_length([encode_preference(record, tokenizer, CHATML)], max_length)
    assert len(kept) == 1
    cut = kept[0].sequences
    assert [s.input_ids for s in cut] == [full[0], full[1][:max_length], full[2]]
    assert tokenizer.decode(_labelled(cut[1])).startswith("a b c") and "<|im_end|>" not in tokenizer.decode(
        _labelled(cut[1]))
    assert (report["too_long_records"], report["truncated_sequences"], report["dropped_records"]) == (1, 1, 0)
    assert report["summary"] == f"1 of 1 records have a sequence longer than {max_length} tokens: 1 sequences truncated"


def test_tied_responses_identical_after_the_cut_are_kept_once_differently_ranked_ones_are_not(tokenizer):
    long = "Copy: a b c d e f g h"
    tied = to_preference_record({"prompt": long, "responses": ["a b c d e f g h", "a b c d e f g x", "z"],
                                 "ranks": [0, 0, 1]}, "ranking", "tied:1")
    apart = to_preference_record({"prompt": long, "responses": ["a b c d e f g h", "a b c d e f g x", "z"],
                                  "ranks": [0, 1, 1]}, "ranking", "apart:1")
    examples = [encode_preference(r, tokenizer, CHATML) for r in (tied, apart)]
    max_length = _first_label(examples[0].sequences[0]) + 3
    kept, report = fit_preference_length(examples, max_length)
    assert [e.source for e in kept] == ["tied:1"]  # equal ranks: one answer, kept once (stop 35)
    assert kept[0].ranks == [0, 1] and kept[0].sequences[1].input_ids == examples[0].sequences[2].input_ids
    assert report["dropped_identical"] == 1 and report["removed_identical"] == 1
    assert report["identical_sources"] == ["tied:1", "apart:1"]
    assert "apart:1" in report["summary"]


def test_drop_policy_drops_the_whole_record_and_counts_it(tokenizer):
    records = [to_preference_record({"prompt": "q", "chosen": "a b c d e f g h i j", "rejected": "b"}, "pairs", "f:1"),
               to_preference_record({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairs", "f:2")]
    examples = [encode_preference(r, tokenizer, CHATML) for r in records]
    max_length = max(len(s) for s in examples[1].sequences)
    kept, report = fit_preference_length(examples, max_length, "drop")
    assert [e.source for e in kept] == ["f:2"]
    assert (report["too_long_records"], report["dropped_too_long"], report["truncated_sequences"],
            report["dropped_records"]) == (1, 1, 0, 1)


def test_identical_after_template_is_named_by_file_line_in_log_and_data_report(tmp_path, tokenizer):
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = CHATML.replace("message['content']", "(message['content'] | trim)")
    path = tmp_path / "p.jsonl"
    rows = [{"prompt": "Say no", "chosen": "no", "rejected": "yes"},
            {"prompt": "Say yes", "chosen": "yes", "rejected": " yes\n"},
            {"prompt": "Pick", "responses": ["x", "x ", "y"], "ranks": [0, 1, 2]}]
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[1]) + "\n")
    rank_path = tmp_path / "r.jsonl"
    rank_path.write_text(json.dumps(rows[2]) + "\n")
    logged = []
    data = prepare_preference_data(_cfg([str(path), str(rank_path)], template="tokenizer"), trimming,
                                   tmp_path / "run", 0, log=logged.append)
    assert [e.source for e in data.train] == [f"{path}:1"]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_length"]["identical_sources"] == [f"{path}:2", f"{rank_path}:1"]
    assert report["train_length"]["dropped_identical"] == 2 and report["train_records"] == 1
    assert f"{path}:2" in logged[-1] and f"{rank_path}:1" in logged[-1]


# =========================================================================== report, split, order


def test_counts_add_up_and_the_eval_split_is_seeded(tmp_path, tokenizer):
    path = tmp_path / "p.jsonl"
    lines = []
    for i in range(20):
        lines.append(json.dumps({"prompt": f"q{i}", "chosen": "a", "rejected": "b"}))
    lines[4] = json.dumps({"prompt": "q4", "chosen": "a", "rejected": "a"})  # bad
    lines[9] = json.dumps({"prompt": "Copy: " + " ".join("abcdefghijklmnopqrstuvwxyz" * 2), "chosen": "a",
                           "rejected": "b"})  # prompt alone longer than max_length
    path.write_text("\n".join(lines) + "\n")

    def run(seed, name):
        cfg = _cfg([str(path)], eval_fraction=0.25, bad_rows="skip", max_bad_fraction=0.2, max_length=40)
        data = prepare_preference_data(cfg, tokenizer, tmp_path / name, seed, log=_quiet)
        return data, json.loads((tmp_path / name / "data_report.json").read_text())

    a, report = run(7, "a")
    b, _ = run(7, "b")
    c, _ = run(8, "c")
    assert (report["train_read"]["rows"], report["train_read"]["good_rows"], report["train_read"]["bad_rows"]) == (
        20, 19, 1)
    held = report["eval_read"]["rows"]
    assert held == round(0.25 * 19) == len(a.eval_records)
    dropped = report["train_length"]["dropped_records"] + (report["eval_length"] or {}).get("dropped_records", 0)
    assert dropped == 1  # the over-long prompt, wherever it landed
    assert report["train_records"] + report["eval_records"] + dropped == 19
    assert report["train_records"] == len(a.train)
    sources = [e.source for e in a.train]
    numbers = [int(s.rsplit(":", 1)[1]) for s in sources]
    assert numbers == sorted(numbers)  # file order kept
    eval_sources = {r.source for r in a.eval_records}
    assert not eval_sources & set(sources) and f"{path}:5" not in eval_sources | set(sources)
    assert ([e.source for e in b.train], [r.source for r in b.eval_records]) == (sources, [r.source for r in
                                                                                           a.eval_records])
    assert {r.source for r in c.eval_records} != eval_sources  # another seed, another held-out set
    assert len(c.eval_records) == held


# =========================================================================== items for the stages


def _items(tokenizer, specs):
    from posttrain.train.grouped import items_from_examples

    records = [PreferenceRecord([_u(p)], list(r), ranks=None if k is None else list(k), desirable=d, margin=m,
                                source=f"s:{i}") for i, (p, r, k, d, m) in enumerate(specs)]
    return items_from_examples([encode_preference(r, tokenizer, CHATML) for r in records])


def test_pair_weights_every_prompt_once(tokenizer):
    from posttrain.train.preference import pair_extras

    items = _items(tokenizer, [("p", ("a", "b"), (0, 1), None, None),
                               ("q", ("w", "x", "y", "z"), (0, 1, 2, 3), None, None),
                               ("r", ("a", "b", "a", "c"), (0, 1, 0, 1), None, None),  # duplicate tied, tie at 1
                               ("s", ("b", "a"), (1, 0), None, None)])
    extras = pair_extras(items)
    pairs = list(zip(extras["chosen_row"].tolist(), extras["rejected_row"].tolist()))
    # rows: p 0-1, q 2-5, r 6-9, s 10-11
    expected = [(0, 1),
                (2, 3), (2, 4), (2, 5), (3, 4), (3, 5), (4, 5),
                (6, 7), (6, 9), (8, 7), (8, 9),
                (11, 10)]
    assert sorted(pairs) == sorted(expected)
    weight = dict(zip(pairs, extras["pair_weight"].tolist()))
    assert [weight[p] for p in expected] == pytest.approx([1.0] + [1 / 6] * 6 + [1 / 4] * 4 + [1.0])
    assert sum(extras["pair_weight"].tolist()) == pytest.approx(len(items))


def test_reward_extras_and_the_comparison_check(tokenizer):
    from posttrain.train.reward import _check_comparisons, reward_extras

    items = _items(tokenizer, [("p", ("a", "b"), (0, 1), None, 1.5), ("q", ("x", "y", "z"), (2, 0, 1), None, None)])
    extras = reward_extras(items)
    assert extras["ranks"].tolist()[0][:2] == [0, 1] and extras["ranks"].tolist()[1] == [2, 0, 1]
    assert extras["valid"].tolist() == [[True, True, False], [True, True, True]]
    assert extras["margins"].tolist() == [1.5, 0.0]
    logged = []
    _check_comparisons(items, None, logged.append)
    assert logged == []  # pairs keep their margins beside rankings: nothing to warn about
    unpaired = _items(tokenizer, [("u", ("a",), None, True, None)])
    with pytest.raises(DataError, match="unpaired"):
        _check_comparisons(items + unpaired, None, _quiet)


def test_dpo_items_refuse_unpaired_rows_and_name_the_first(tokenizer):
    from posttrain.data.preferences import PreferenceExample
    from posttrain.train.preference import _items as stage_items

    items = _items(tokenizer, [("p", ("a", "b"), (0, 1), None, None), ("u", ("a",), None, True, None)])
    data = types.SimpleNamespace(
        train=[PreferenceExample(i.sequences, i.ranks, i.desirable, i.margin, i.source) for i in items], eval=[])
    cfg = types.SimpleNamespace(dpo=types.SimpleNamespace(loss="dpo", kto_desirable_weight=1.0, kto_undesirable_weight=1.0),
                                data=types.SimpleNamespace(max_length=64))
    with pytest.raises(DataError, match=r"needs pairs or rankings; 1 rows are unpaired \(first: s:1\)"):
        stage_items(data, cfg, _quiet)
    cfg.dpo.loss = "kto"
    train, evaluation = stage_items(data, cfg, _quiet)
    assert [i.desirable for i in train] == [True, False, True] and evaluation == []


def test_kto_items_split_rankings_and_mismatch_with_the_next_prompt(tokenizer):
    """Best (ties included) desirable; each KL row = own prompt + the next prompt-run's k-th
    response, equal to rendering that conversation with the chat template."""
    from posttrain.train.preference import kto_items

    specs = [("Copy: a", ("a", "b"), (0, 1), None, None),  # run A: 2 items
             ("Rev: x y", ("y x",), None, False, None),  # run B: 1 item
             ("Count: a b", ("2", "3", "2 "), (0, 1, 0), None, None)]  # run C: 3 items, tie at best
    items = _items(tokenizer, specs)
    single = kto_items(items, 512, _quiet)
    assert [i.desirable for i in single] == [True, False, False, True, False, True]
    assert [i.source for i in single] == ["s:0", "s:0", "s:1", "s:2", "s:2", "s:2"]
    prompts = ["Copy: a", "Copy: a", "Rev: x y", "Count: a b", "Count: a b", "Count: a b"]
    responses = ["a", "b", "y x", "2", "3", "2 "]
    partner = [2, 2, 3, 0, 1, 0]  # A→B (cyclic k), B→C[0], C→A[k % 2]
    for n, item in enumerate(single):
        own, mismatched = item.sequences
        ids, labels = _hf_final_turn(tokenizer, [_u(prompts[n]), _a(responses[n])])
        assert (own.input_ids, own.labels) == (ids, labels)
        ids, labels = _hf_final_turn(tokenizer, [_u(prompts[n]), _a(responses[partner[n]])])
        assert (mismatched.input_ids, mismatched.labels) == (ids, labels), n
