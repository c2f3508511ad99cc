"""Agent data and local feedback models (stop 32, backlog items): a turn's `name` reaches the chat template
(kept when the template renders it, a bad row naming it with its file:line when not; rows without one label
as before); the pairwise judge shows a conversation's tool calls, reasoning and tool results instead of empty
turns, and plain conversations exactly as before; a LocalModel reply stops at an end-of-turn marker the
tokenizer spells in several tokens, as generate and the rollouts do."""

from __future__ import annotations

import hashlib
import json

import pytest

from posttrain.data.formats import BadRowError, load_records, to_record
from posttrain.data.templates import CHATML, encode_record
from posttrain.errors import DataError
from tests.test_s31_agentdata import CALLING, RESULT, _labelled_pieces
from tests.test_walkthrough_agentdata import ASK, TOOL_TEMPLATE

# ChatML that writes a turn's name after its role, as OpenAI's ChatML did ("<|im_start|>user name=alice").
NAME_TEMPLATE = CHATML.replace(
    "message['role'] + '\n'",
    "message['role'] + (' name=' + message['name'] if message['name'] is defined else '') + '\n'")
NAMED = [{"role": "system", "content": "You moderate.", "name": "mod"},
         {"role": "user", "content": "Hi, I am Alice.", "name": "alice"},
         {"role": "assistant", "content": "Hello Alice.", "name": "helper"}]
PLAIN = [{k: v for k, v in turn.items() if k != "name"} for turn in NAMED]
# an answer's own name would be in its header, which the generation prompt cannot know (not prefix-stable)
ASKED_BY_NAME = [*NAMED[:2], PLAIN[2]]


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


# --------------------------------------------------------------------------- item 1: a turn's name


def test_a_turns_name_is_kept_on_every_role_and_must_be_text():
    record = to_record({"messages": NAMED}, "messages", "a.jsonl:1")
    assert record.messages == NAMED
    assert to_record({"messages": [{**NAMED[1], "name": None}, NAMED[2]]}, "messages").messages[0] == PLAIN[1]
    with pytest.raises(BadRowError, match=r"turn 1 \(user\) 'name' is a number"):
        to_record({"messages": [{**NAMED[1], "name": 3}, NAMED[2]]}, "messages")


def test_a_template_that_renders_the_name_trains_with_it(tok):
    example = encode_record(to_record({"messages": ASKED_BY_NAME}, "messages", "a.jsonl:1"), tok, NAME_TEMPLATE)
    text = tok.decode(example.input_ids)
    assert "<|im_start|>system name=mod\n" in text and "<|im_start|>user name=alice\n" in text
    assert _labelled_pieces(tok, example) == ["Hello Alice.<|im_end|>"]


def test_a_template_that_does_not_render_the_name_reports_the_row_with_its_location(tok, tmp_path):
    path = tmp_path / "named.jsonl"
    path.write_text(json.dumps({"messages": PLAIN}) + "\n" + json.dumps({"messages": ASKED_BY_NAME}) + "\n")
    records, _ = load_records([str(path)], log=lambda _: None)
    encode_record(records[0], tok, CHATML)
    with pytest.raises(DataError, match=rf"{path}:2: the chat template does not render the turns' 'name'"):
        encode_record(records[1], tok, CHATML)


def test_rows_without_a_name_label_exactly_as_before(tok):
    """The same row under ChatML and under the name-writing template (which renders it alike), and a tool
    turn's name, which names the tool the call names (templates need not write it), as stop 31 trained it."""
    plain = encode_record(to_record({"messages": PLAIN}, "messages"), tok, CHATML)
    assert _labelled_pieces(tok, plain) == ["Hello Alice.<|im_end|>"]
    under_names = encode_record(to_record({"messages": PLAIN}, "messages"), tok, NAME_TEMPLATE)
    assert (under_names.input_ids, under_names.labels) == (plain.input_ids, plain.labels)
    answer = {"role": "assistant", "content": "Sunny."}
    tool_row = encode_record(to_record({"messages": [ASK, CALLING, RESULT, answer]}, "messages"), tok, TOOL_TEMPLATE)
    assert "name" in RESULT and _labelled_pieces(tok, tool_row)[-1] == "Sunny.<|im_end|>"


# --------------------------------------------------------------------------- item 2: what the judge sees


def test_the_judge_sees_tool_calls_reasoning_and_tool_results():
    from posttrain.feedback.judge import judge_messages, render_conversation

    calling = to_record({"messages": [ASK, CALLING, RESULT, {"role": "assistant", "content": "x"}]},
                        "messages").messages[1]
    thinking = {"role": "assistant", "content": "Let me check.", "reasoning_content": "The user wants weather."}
    shown = render_conversation([ASK, thinking, calling, RESULT])
    assert shown == (
        "User: Weather in Paris?\n\n"
        "Assistant: [reasoning]\nThe user wants weather.\n[end of reasoning]\nLet me check.\n\n"
        'Assistant: [calls tool get_weather with arguments {"city": "Paris"}]\n\n'
        "Tool (get_weather, result of call_1): sunny, 24C")
    user = judge_messages([ASK, calling, RESULT], "It is sunny.", "No idea.")[1]["content"]
    assert "The conversation includes tool calls" in user and "get_weather" in user
    assert render_conversation([{**ASK, "name": "alice"}]) == "User (alice): Weather in Paris?"


def test_plain_conversations_are_shown_to_the_judge_byte_for_byte_as_before():
    from posttrain.feedback.judge import judge_messages, render_conversation

    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
             {"role": "assistant", "content": "Red."}, {"role": "user", "content": "Another?"}]
    assert render_conversation(turns) == "System: Be brief.\n\nUser: Name a colour.\n\nAssistant: Red.\n\nUser: Another?"
    digests = [hashlib.sha256(repr(judge_messages(t, "Blue.", "Green.")).encode()).hexdigest()
               for t in (turns, turns[1:2])]
    assert digests == ["1f3110a048ed9438cebbc0b6cd726f68246c8eb3d3d4c3b46aecb88437705f41",  # before stop 32
                       "a0868fba26b4eba9e0ed04bf04081275f46d4ff47812b24ef2ab723a355eee46"]


# --------------------------------------------------------------------------- item 4: several-token end marker


def test_a_local_model_stops_at_an_end_of_turn_marker_of_several_tokens():
    from posttrain.feedback.client import LocalModel
    from posttrain.models.presets import IM_END
    from tests.test_s29_generation import Scripted, _ids, plain

    tokenizer = plain.__wrapped__()  # ChatML on a tokenizer that spells <|im_end|> in ordinary tokens
    assert len(_ids(tokenizer, IM_END)) > 1
    model = Scripted(_ids(tokenizer, "b" + IM_END + "c c c c c c"), len(tokenizer))
    local = LocalModel(model, tokenizer, name="scripted", max_tokens=20, temperature=0.0)
    reply = local.chat([{"role": "user", "content": "a"}])
    assert (reply.text, reply.finish_reason) == ("b", "stop")
    assert reply.completion_tokens == len(_ids(tokenizer, "b" + IM_END))
