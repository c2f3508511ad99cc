"""Stop 35, multi-turn data beyond the pinned walkthrough (tests/test_walkthrough_multiturn.py): the
held-out split's keys, one per trained answer (`pipeline.trained_prompt_keys`, joined by
`split_eval(keys=...)`), and a conversation row's `system` key (`formats.with_system`)."""

from __future__ import annotations

import json

import pytest

from posttrain.data.records import Record


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _rec(messages, source="x", **kw) -> Record:
    return Record(messages=messages, source=source, **kw)


# --------------------------------------------------------------------------- split_eval(keys=...)


def test_split_eval_joins_rows_that_share_any_key_even_through_a_third():
    from posttrain.data.pipeline import split_eval

    # a-b share "k1", b-c share "k2": a and c never share a key, but all three are one group
    records = [("a", ["k1"]), ("b", ["k1", "k2"]), ("c", ["k2", "k3"])] + [(f"r{i}", [f"r{i}"]) for i in range(7)]
    chained = {"a", "b", "c"}
    for seed in range(20):
        train, held = split_eval(records, 0.3, seed, keys=lambda r: r[1])
        names = {name for name, _ in held}
        assert names.isdisjoint(chained) or chained <= names
        assert sorted(train + held) == sorted(records)


@pytest.mark.parametrize("seed", range(5))
def test_one_key_a_row_splits_as_key_did(seed):
    """A row with one key (a prompt-completion or one-answer row) is split as `key=` splits it."""
    from posttrain.data.pipeline import split_eval

    records = [(q % 7, k) for q in range(20) for k in range(q % 3 + 1)]
    assert split_eval(records, 0.2, seed, key=lambda r: r[0]) == split_eval(records, 0.2, seed,
                                                                             keys=lambda r: [r[0]])


def test_split_eval_refuses_key_and_keys_together():
    from posttrain.data.pipeline import split_eval

    with pytest.raises(ValueError, match="key or keys"):
        split_eval([1, 2, 3], 0.5, 0, key=str, keys=lambda r: [r])


# --------------------------------------------------------------------------- trained_prompt_keys


def test_a_row_is_keyed_by_every_answer_it_trains_and_by_its_last_answer():
    from posttrain.data.pipeline import (
        _context_key,
        retain_prompt_key,
        trained_prompt_keys,
    )

    convo = [U("q1"), A("a1"), U("q2"), A("a2")]
    both = _rec(convo)
    assert trained_prompt_keys(both) == [retain_prompt_key(both), _context_key(both, 1)]
    first_kept_out = _rec(convo, untrained=(1,))  # a1 is context: no key of its own
    assert trained_prompt_keys(first_kept_out) == [retain_prompt_key(first_kept_out)]
    last_kept_out = _rec(convo, untrained=(3,))  # a2 untrained: still exact match's prompt, so still a key
    assert set(trained_prompt_keys(last_kept_out)) == {retain_prompt_key(last_kept_out), _context_key(both, 1)}
    completion = _rec([U("q1"), A("a1")], prompt_turns=1)
    assert trained_prompt_keys(completion) == [retain_prompt_key(completion)]
    assert trained_prompt_keys(Record(text="t", source="x")) == [json.dumps("t")]
    tools = _rec(convo, tools=[{"name": "calc"}])
    assert not set(trained_prompt_keys(tools)) & set(trained_prompt_keys(both))


def test_sft_holds_a_short_row_out_with_the_longer_one_that_trains_its_answer(tmp_path):
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.models.loading import load_tokenizer

    rows = []
    for q in range(10):
        rows += [{"messages": [U(f"q{q}"), A(f"a{q}")]},
                 {"messages": [U(f"q{q}"), A(f"a{q}"), U("again"), A(f"b{q}")]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer("tiny")

    def opening(source: str) -> str:
        return rows[int(source.rsplit(":", 1)[1]) - 1]["messages"][0]["content"]

    for seed in range(3):
        data = prepare_sft_data(DataConfig(train_files=[str(path)], eval_fraction=0.3, max_length=64), tok, None,
                                seed, lambda _: None)
        held = {opening(r.source) for r in data.eval_records}
        assert data.eval and len(data.train) + len(data.eval) == 20
        assert not held & {opening(e.source) for e in data.train}


# --------------------------------------------------------------------------- a conversation's system key


def test_a_system_key_opens_the_conversation_and_moves_the_untrained_indices(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.data.templates import trained_turns

    row = {"system": "Be brief.", "messages": [U("q1"), {**A("a1"), "weight": 0}, U("q2"), A("a2")]}
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({"system": None, "messages": [U("q"), A("a")]}) + "\n")
    first, second = load_records([str(path)], log=lambda _: None)[0]
    assert first.messages[0] == {"role": "system", "content": "Be brief."} and first.untrained == (2,)
    assert trained_turns(first.messages, first.prompt_turns, first.untrained) == [4]
    assert second.messages == [U("q"), A("a")]  # a null system (a table's empty cell) is no system


def test_a_system_key_beside_a_system_turn_is_a_bad_row_named_by_its_line(tmp_path):
    from posttrain.data.formats import load_records
    from posttrain.data.prompts import load_prompt_records
    from posttrain.errors import DataError

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"system": "Be brief.", "conversations": [
        {"from": "system", "value": "Be long."}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]})
        + "\n")
    for load in (load_records, load_prompt_records):
        with pytest.raises(DataError, match=rf"{path}:1.*both a 'system' key and a system turn"):
            load([str(path)], log=lambda _: None)


def test_an_rl_prompt_read_from_a_conversation_keeps_its_system_key(tmp_path):
    from posttrain.data.prompts import load_prompt_records

    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"system": "Be brief.", "messages": [U("q"), A("a")]}) + "\n"
                    + json.dumps({"system": "Be brief.", "messages": [U("q")]}) + "\n")
    answered, open_ended = load_prompt_records([str(path)], log=lambda _: None)[0]
    assert answered.prompt == open_ended.prompt == [{"role": "system", "content": "Be brief."}, U("q")]
    assert "system" not in answered.fields and answered.answer == "a"
