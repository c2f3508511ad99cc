"""Agent chat data, read and trained through the model's own chat template (stop 31): an assistant turn's
`tool_calls` and `reasoning_content`, `tool` turns, a row's `tools`, `developer` as system, per-turn `weight`
and `train`; in SFT, preference and RL prompt data alike. Beyond the walk's pinned cases
(test_walkthrough_agentdata.py): whole trajectories, what is refused and why, and JSON numbers that keep
the text their file wrote."""

from __future__ import annotations

import copy
import json
import pickle

import pytest

from posttrain.data.formats import BadRowError, load_records, to_record
from posttrain.errors import DataError
from tests.test_walkthrough_agentdata import ASK, CALL_LONDON, CALL_PARIS, TOOL_TEMPLATE, TOOLS

RESULT = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 24C"}
CALLING = {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]}
TRAJECTORY = [ASK, CALLING, RESULT, {"role": "assistant", "content": "It is sunny in Paris."}]


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


def _render(tok, messages, tools=None, generation_prompt=False, template=TOOL_TEMPLATE):
    return tok.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                   add_generation_prompt=generation_prompt)


def _labelled_pieces(tok, example) -> list[str]:
    """The labelled tokens as runs of consecutive positions, each decoded."""
    runs, run = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != -100:
            run.append(token)
        elif run:
            runs, run = runs + [tok.decode(run)], []
    return runs + ([tok.decode(run)] if run else [])


def _reason(row, fmt="messages") -> str:
    with pytest.raises(BadRowError) as info:
        to_record(row, fmt, "a.jsonl:1")
    return info.value.reason


# --------------------------------------------------------------------------- sft


def test_a_whole_tool_trajectory_trains_on_both_assistant_turns_exactly(tok):
    """user -> assistant calls a tool -> the tool's result -> assistant answers, with the row's tools: the ids
    are transformers' rendering with tools=..., the labels exactly the two assistant turns as the template
    writes them (the call block, the answer, each end-of-turn marker); the tool's result is context."""
    from posttrain.data.templates import encode_record

    record = to_record({"messages": TRAJECTORY, "tools": TOOLS}, "messages", "a.jsonl:1")
    assert record.messages[1] == {"role": "assistant", "content": "", "tool_calls": [CALL_PARIS]}
    assert record.messages[2] == RESULT and record.tools == TOOLS
    example = encode_record(record, tok, TOOL_TEMPLATE)
    plain = [{**m, "content": m["content"] or ""} for m in TRAJECTORY]
    assert tok.decode(example.input_ids) == _render(tok, plain, TOOLS)
    call = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert _labelled_pieces(tok, example) == [call, "It is sunny in Paris.<|im_end|>"]


def test_a_turn_kept_out_of_the_loss_is_context_and_a_row_with_none_left_is_bad(tok):
    from posttrain.data.templates import encode_record

    calling = {**CALLING, "weight": 0}
    example = encode_record(to_record({"messages": [ASK, calling, RESULT, TRAJECTORY[3]], "tools": TOOLS},
                                      "messages"), tok, TOOL_TEMPLATE)
    assert _labelled_pieces(tok, example) == ["It is sunny in Paris.<|im_end|>"]
    assert "<tool_call>" in tok.decode(example.input_ids)
    reason = _reason({"messages": [ASK, {"role": "assistant", "content": "x", "train": False}]})
    assert "every assistant turn is kept out of the loss" in reason


@pytest.mark.parametrize("turn, needle", [
    ({"role": "assistant", "content": "a", "weight": 2}, "'weight' is 2"),
    ({"role": "assistant", "content": "a", "weight": 0.5}, "'weight' is 0.5"),
    ({"role": "assistant", "content": "a", "weight": True}, "'weight' is True"),
    ({"role": "assistant", "content": "a", "train": "no"}, "'train' is 'no'"),
    ({"role": "assistant", "content": "a", "weight": 0, "train": True}, "disagree"),
    ({"role": "assistant", "content": "a", "tool_calls": "not json"}, "not a JSON list of calls"),
    ({"role": "assistant", "content": "a", "tool_calls": {"function": {}}}, "expected a list of calls"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]},
     "no function name"),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{city: Paris}"}}]}, "not JSON"),
    ({"role": "assistant", "content": None, "tool_calls": [{"type": "retrieval", "function": {"name": "f"}}]},
     "type 'retrieval'"),
    ({"role": "assistant", "content": None, "tool_calls": []}, "content is null"),
    ({"role": "assistant", "content": "a", "reasoning_content": 3}, "'reasoning_content' is a number"),
])
def test_agent_keys_are_checked_and_a_bad_one_names_itself(turn, needle):
    assert needle in _reason({"messages": [ASK, turn]})


@pytest.mark.parametrize("messages, needle", [
    ([ASK, RESULT, {"role": "assistant", "content": "a"}], "turn 2 is a tool turn that answers no call"),
    ([{**ASK, "weight": 1}, {"role": "assistant", "content": "a"}], "only assistant turns are trained"),
    ([{**ASK, "reasoning_content": "hm"}, {"role": "assistant", "content": "a"}], "only an assistant turn"),
    ([{**ASK, "tool_calls": [CALL_PARIS]}, {"role": "assistant", "content": "a"}], "only an assistant turn calls"),
    ([ASK, {"role": "developer", "content": "Be brief."}, {"role": "assistant", "content": "a"}],
     "turn 2 is a system turn"),
])
def test_turn_order_and_roles(messages, needle):
    assert needle in _reason({"messages": messages})


def test_developer_is_system_and_sharegpt_tool_turns_are_refused_by_name():
    record = to_record({"messages": [{"role": "developer", "content": "Be brief."}, ASK,
                                     {"role": "assistant", "content": "Sunny."}]}, "messages")
    assert record.messages[0] == {"role": "system", "content": "Be brief."}
    reason = _reason({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"},
                                        {"from": "observation", "value": "r"}, {"from": "gpt", "value": "a"}]})
    assert "ShareGPT 'function_call' turn" in reason and "'tool_calls'" in reason


def test_tools_as_a_csv_cell_are_decoded_and_bad_tools_are_bad_rows(tmp_path):
    import csv

    path = tmp_path / "agent.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["messages", "tools"])
        writer.writerow([json.dumps([ASK, {"role": "assistant", "content": "a"}]), json.dumps(TOOLS)])
        writer.writerow([json.dumps([ASK, {"role": "assistant", "content": "a"}]), repr(TOOLS)])
        writer.writerow([json.dumps([ASK, {"role": "assistant", "content": "a"}]), ""])
    records, _ = load_records([str(path)], log=lambda _: None)
    assert [r.tools for r in records] == [TOOLS, TOOLS, None]
    row = {"messages": [ASK, {"role": "assistant", "content": "a"}]}
    assert "'tools' is an object" in _reason({**row, "tools": TOOLS[0]})
    assert "'tools' entry 1 is not a function definition" in _reason({**row, "tools": [{"type": "function"}]})
    assert "text row" in _reason({"text": "t", "tools": TOOLS}, "text")


@pytest.mark.parametrize("key, messages, tools", [
    ("'tools'", [ASK, {"role": "assistant", "content": "a"}], TOOLS),
    ("'tool_calls'", [ASK, {"role": "assistant", "content": "Let me see.", "tool_calls": [CALL_PARIS]}], None),
    ("'reasoning_content'", [ASK, {"role": "assistant", "content": "a", "reasoning_content": "hm"}], None),
    ("'tool' turns", [ASK, {"role": "assistant", "content": "x", "tool_calls": [CALL_PARIS]}, RESULT,
                      {"role": "assistant", "content": "a"}], None),
], ids=["tools", "tool_calls", "reasoning", "tool-turns"])
def test_what_the_template_leaves_out_is_refused_naming_it(tok, key, messages, tools):
    """The built-in chatml template renders no tools, calls or reasoning; a tool-aware template that drops
    tool turns loses the results: the row is refused naming what would be lost, never trained without it."""
    from posttrain.data.records import Record
    from posttrain.data.templates import encode_record, resolve_template

    no_tool_turns = TOOL_TEMPLATE.replace("message['role'] == 'tool'", "false")
    template = no_tool_turns if key == "'tool' turns" else resolve_template(tok, "chatml")
    with pytest.raises(DataError, match="a.jsonl:1: the chat template does not render") as info:
        encode_record(Record(messages, source="a.jsonl:1", tools=tools), tok, template)
    assert key in str(info.value)


def test_prompt_completion_keeps_the_completions_loss_flags(tok):
    from posttrain.data.templates import encode_record

    completion = [{"role": "assistant", "content": "x", "tool_calls": [CALL_PARIS], "weight": 0}, RESULT,
                  {"role": "assistant", "content": "Sunny."}]
    record = to_record({"prompt": [ASK], "completion": completion, "tools": TOOLS}, "prompt_completion")
    assert (record.prompt_turns, record.untrained, record.tools) == (1, (1,), TOOLS)
    assert _labelled_pieces(tok, encode_record(record, tok, TOOL_TEMPLATE)) == ["Sunny.<|im_end|>"]


# --------------------------------------------------------------------------- preferences


def test_a_pair_differing_only_in_its_call_trains_on_the_calls(tmp_path, tok):
    from posttrain.data.preferences import encode_preference, load_preference_records

    sides = [{"role": "assistant", "content": None, "tool_calls": [call]} for call in (CALL_PARIS, CALL_LONDON)]
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": [ASK], "chosen": [sides[0]], "rejected": [sides[1]], "tools": TOOLS}) + "\n")
    (record,), _ = load_preference_records([str(path)], log=lambda _: None)
    assert record.responses == [{"content": "", "tool_calls": [c]} for c in (CALL_PARIS, CALL_LONDON)]
    example = encode_preference(record, tok, TOOL_TEMPLATE)
    for sequence, side in zip(example.sequences, sides):
        assert tok.decode(sequence.input_ids) == _render(tok, [ASK, {**side, "content": ""}], TOOLS)
    chosen, rejected = (_labelled_pieces(tok, s) for s in example.sequences)
    assert len(chosen) == len(rejected) == 1 and "Paris" in chosen[0] and "London" in rejected[0]


def test_dpo_exact_match_asks_an_agent_pair_with_its_tools_and_leaves_a_call_unscored(tmp_path, monkeypatch):
    """DPO's held-out exact match builds each prompt's best response as a turn: a tool-call response is
    that whole message (not its content alone, which crashed on the message), with the row's tools."""
    from types import SimpleNamespace

    import posttrain.train.sft as sft
    from posttrain.data.preferences import load_preference_records
    from posttrain.eval.exact_match import answered
    from posttrain.train.preference import _exact_match

    path = tmp_path / "p.jsonl"
    call = {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]}
    rows = [{"prompt": [ASK], "chosen": [call], "rejected": [{"role": "assistant", "content": "No idea."}],
             "tools": TOOLS},
            {"prompt": [ASK], "chosen": "Sunny.", "rejected": "Rainy."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records, _ = load_preference_records([str(path)], log=lambda _: None)
    seen = []
    monkeypatch.setattr(sft, "exact_match_report", lambda model, tok, recs, *a, **k: seen.extend(recs) or {})
    cfg = SimpleNamespace(eval=SimpleNamespace(exact_match_prompts=8, max_new_tokens=4), data=SimpleNamespace(
        template="auto"))
    _exact_match(cfg, None, None, SimpleNamespace(eval_records=records), "before")
    assert seen[0].tools == TOOLS and seen[0].messages[-1]["tool_calls"] == [CALL_PARIS]
    assert answered(seen) == [seen[1]]  # a call is no text answer to compare with


def test_a_plain_pair_still_reads_as_text_and_agent_pairs_compare_whole_messages():
    from posttrain.data.preferences import to_preference_record

    assert to_preference_record({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairs").responses == ["a", "b"]
    same = {"role": "assistant", "content": "a", "tool_calls": [CALL_PARIS]}
    with pytest.raises(BadRowError, match="the same message"):
        to_preference_record({"prompt": [ASK], "chosen": [same], "rejected": [same]}, "pairs")
    with pytest.raises(BadRowError, match="responses 1 and 3 are the same message but ranked differently"):
        to_preference_record({"prompt": [ASK], "responses": [[same], "b", [same]]}, "ranking")
    with pytest.raises(BadRowError, match="kept out of the loss"):
        to_preference_record({"prompt": "q", "chosen": [{"role": "assistant", "content": "a", "weight": 0}],
                              "rejected": "b"}, "pairs")


def test_whole_conversations_with_a_tool_result_make_the_prompt_and_kto_renders_tools(tok):
    from posttrain.data.preferences import encode_preference, to_preference_record

    shared = [ASK, CALLING, RESULT]
    record = to_preference_record({"chosen": [*shared, {"role": "assistant", "content": "Sunny."}],
                                   "rejected": [*shared, {"role": "assistant", "content": "Rain."}]}, "pairs")
    assert record.prompt[-1] == RESULT and record.responses == ["Sunny.", "Rain."]
    kto = to_preference_record({"prompt": shared, "completion": "Sunny.", "label": True, "tools": TOOLS}, "unpaired")
    (sequence,) = encode_preference(kto, tok, TOOL_TEMPLATE).sequences
    assert "Current weather in a city" in tok.decode(sequence.input_ids)
    assert _labelled_pieces(tok, sequence) == ["Sunny.<|im_end|>"]


# --------------------------------------------------------------------------- rl prompts


def test_an_rl_prompt_may_end_with_a_tool_result_and_its_tools_reach_rewards_and_the_policy(tok):
    from posttrain.data.prompts import encode_prompts, to_prompt_record

    record = to_prompt_record({"messages": [ASK, CALLING, RESULT], "tools": json.dumps(TOOLS), "level": 1},
                              "messages")
    assert record.prompt[-1] == RESULT and record.tools == TOOLS
    assert record.reward_row() == {"level": 1, "answer": None, "tools": TOOLS}
    ids, _ = encode_prompts([record], tok, TOOL_TEMPLATE, 4096, log=lambda _: None)
    plain = [{**m, "content": m["content"] or ""} for m in record.prompt]
    assert tok.decode(ids[0]) == _render(tok, plain, TOOLS, generation_prompt=True)


# --------------------------------------------------------------------------- numbers as written


def test_a_written_float_is_a_float_that_remembers_its_text():
    from posttrain.data.formats import decode_cell
    from posttrain.data.prompts import reference_answer as _answer
    from posttrain.data.records import WrittenFloat

    number = WrittenFloat("2.50")
    assert number == 2.5 and type(number + 1) is float and type(float(number)) is float
    assert pickle.loads(pickle.dumps(number)).written == "2.50" and copy.deepcopy(number).written == "2.50"
    assert json.dumps({"m": number}) == '{"m": 2.5}'
    cell = decode_cell('[{"answer": 1e3}]')
    assert _answer(cell[0]) == "1e3" and _answer({"answer": 2.5}) == "2.5" and _answer({"answer": 42}) == "42"
