"""Stop 35, backlog item: `data.train_on: all | last`, which assistant turns of a chat row sft trains.

`all` (the default) trains every assistant turn, as before; `last` trains each row's final assistant
turn only, the earlier ones context exactly as `weight: 0` makes them (one rule: the record's
`untrained` turns, `formats.to_record`), so the label mask, the held-out split's keys
(`pipeline.trained_prompt_keys`), streaming and packing all agree. A row whose final assistant turn
is itself kept out of the loss has nothing to train under `last`: a bad row. `last` with text rows
(no turns) is refused: up front for `data.format: text`, at read time for a file detected as text."""

from __future__ import annotations

import json

import pytest

from posttrain.data.formats import BadRowError, load_records, to_record
from posttrain.errors import ConfigError, DataError

IGNORE = -100
THREE = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "first answer"},
         {"role": "user", "content": "u2"}, {"role": "assistant", "content": "second answer"},
         {"role": "user", "content": "u3"}, {"role": "assistant", "content": "third answer"}]


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


def _pieces(tok, example) -> list[str]:
    """The labelled tokens as runs of consecutive positions, each decoded."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_labels_of_a_three_turn_row_all_vs_last_token_exact(tok):
    from posttrain.data.templates import encode_record, resolve_template

    chatml, row = resolve_template(tok, "chatml"), {"messages": THREE}
    default = encode_record(to_record(row, "messages", "a.jsonl:1"), tok, chatml)
    every = encode_record(to_record(row, "messages", "a.jsonl:1", train_on="all"), tok, chatml)
    last = encode_record(to_record(row, "messages", "a.jsonl:1", train_on="last"), tok, chatml)
    assert (every.input_ids, every.labels) == (default.input_ids, default.labels)  # all = before, bit for bit
    assert _pieces(tok, every) == [f"{a}<|im_end|>" for a in ("first answer", "second answer", "third answer")]
    assert last.input_ids == every.input_ids
    assert _pieces(tok, last) == ["third answer<|im_end|>"]
    # the same rule as weight 0 on the earlier answers: the same labels, token for token
    weighted = [{**m, "weight": 0} if i in (1, 3) else m for i, m in enumerate(THREE)]
    assert last.labels == encode_record(to_record({"messages": weighted}, "messages"), tok, chatml).labels


def test_last_gives_a_row_one_split_key_all_one_per_trained_answer():
    from posttrain.data.pipeline import retain_prompt_key, trained_prompt_keys

    every, last = (to_record({"messages": THREE}, "messages", train_on=t) for t in ("all", "last"))
    assert len(trained_prompt_keys(every)) == 3
    assert trained_prompt_keys(last) == [retain_prompt_key(last)]
    # a one-answer row [u1, a1] shares a key with the 3-turn row under all (a1 trained from u1), not under last
    short = to_record({"messages": THREE[:2]}, "messages")
    assert set(trained_prompt_keys(short)) & set(trained_prompt_keys(every))
    assert not set(trained_prompt_keys(short)) & set(trained_prompt_keys(last))


def test_a_row_whose_last_answer_has_weight_0_is_bad_under_last(tmp_path):
    row = {"messages": [*THREE[:5], {**THREE[5], "weight": 0}]}
    assert to_record(row, "messages", train_on="all").untrained == (5,)  # under all: a1, a2 train
    with pytest.raises(BadRowError, match="train_on=last"):
        to_record(row, "messages", "a.jsonl:1", train_on="last")
    path = _jsonl(tmp_path / "a.jsonl", [{"messages": THREE}, row])
    records, report = load_records([path], train_on="last", bad_rows="skip", max_bad_fraction=0.5, log=lambda s: None)
    assert len(records) == 1 and report.bad == 1 and report.first_bad[0].location == f"{path}:2"


def test_last_changes_nothing_for_one_answer_rows_and_trains_a_completions_final_turn():
    alpaca = {"instruction": "say hi", "output": "hi"}
    assert to_record(alpaca, "alpaca", train_on="last") == to_record(alpaca, "alpaca")
    pc = {"prompt": "q", "completion": "a"}
    assert to_record(pc, "prompt_completion", train_on="last") == to_record(pc, "prompt_completion")
    turns = {"prompt": "q", "completion": [THREE[1], THREE[2], THREE[3]]}
    assert to_record(turns, "prompt_completion", train_on="last").untrained == (1,)


def test_last_with_text_rows_is_refused(tmp_path):
    from posttrain.config import SFTConfig, validate_sft

    with pytest.raises(ConfigError, match="train_on"):
        validate_sft(SFTConfig.from_dict({"data": {"format": "text", "train_on": "last"}}))
    path = _jsonl(tmp_path / "t.jsonl", [{"text": "plain words"}] * 3)
    with pytest.raises(DataError, match="train_on=last"):
        load_records([path], train_on="last", log=lambda s: None)


def test_prepare_and_stream_and_pack_train_the_last_answer_only(tok, tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.data.batching import pack
    from posttrain.data.pipeline import prepare_sft_data, stream_sft_examples

    path = _jsonl(tmp_path / "d.jsonl", [{"messages": THREE}, {"messages": THREE[:4]}])
    cfg = SFTConfig.from_dict({"data": {"train_files": [path], "eval_fraction": 0.0, "template": "chatml",
                                        "train_on": "last", "max_length": 256}}).data
    prepared = prepare_sft_data(cfg, tok, None, seed=0, log=lambda s: None)
    assert [_pieces(tok, e) for e in prepared.train] == [["third answer<|im_end|>"], ["second answer<|im_end|>"]]
    streamed = list(stream_sft_examples(cfg, tok, None, log=lambda s: None))
    assert [(e.input_ids, e.labels) for e in streamed] == [(e.input_ids, e.labels) for e in prepared.train]
    packed = pack(prepared.train, 256)
    assert len(packed) == 1
    assert sorted(_pieces(tok, packed[0])) == ["second answer<|im_end|>", "third answer<|im_end|>"]
