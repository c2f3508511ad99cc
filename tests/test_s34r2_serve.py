"""`posttrain serve`, stop 34: a chat request's `tools` (and its history's tool calls and tool turns)
go to the chat template as training renders an agent row, refused naming them where the template does
not render them, so an RLAIF policy asked with a row's tools can be a `posttrain serve`; `tool_choice`
"auto" / "none" only (replies are plain text). A stop string led by a special token ('<|im_start|>user')
ends a serve completion and is cut from its text, streamed or not, as `rollout.generate` cuts it."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from posttrain.data.templates import CHATML, render
from posttrain.models.presets import build_tokenizer
from posttrain.serve.engine import AS_LOADED, Engine
from posttrain.serve.http import Server
from posttrain.serve.protocol import APIError, Limits, Request, parse_request
from tests.test_feedback_serve_edges import _post
from tests.test_s33r2_generation import Says
from tests.test_walkthrough_agentdata import ASK, TOOL_TEMPLATE, TOOLS

CALL = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
HISTORY = [ASK, {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "c1", "content": "sunny, 21 C"}]
STOP = "<|im_start|>user"


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def servers(tok):
    """The tiny tokenizer under ChatML (no tools shown) and under a Qwen2.5-like template that shows them."""
    made = {name: Server(Engine(Says(None, len(tok)), tok, {"m": AS_LOADED}, template, Limits()), port=0,
                         log_requests=False).start() for name, template in (("chatml", CHATML), ("tools", TOOL_TEMPLATE))}
    yield made
    for server in made.values():
        server.close()


def _chat(server, **body):
    status, text, _ = _post(server, "/v1/chat/completions", {"model": "m", "max_tokens": 2, "temperature": 0, **body})
    return status, json.loads(text)


def _prompt_tokens(tok, messages, tools=None) -> int:
    return len(_ids(tok, render(tok, TOOL_TEMPLATE, messages, True, tools=tools)))


# --------------------------------------------------------------------------- item 1: tools


def test_tools_are_rendered_by_the_chat_template(servers, tok):
    for choice in (None, "auto", "none"):
        status, answer = _chat(servers["tools"], messages=[ASK], tools=TOOLS,
                               **({} if choice is None else {"tool_choice": choice}))
        assert status == 200, answer
        assert answer["usage"]["prompt_tokens"] == _prompt_tokens(tok, [ASK], TOOLS) > _prompt_tokens(tok, [ASK])
        assert set(answer["choices"][0]["message"]) == {"role", "content"}  # plain text: no tool_calls parsed


def test_a_template_that_does_not_render_the_tools_is_a_400_naming_them(servers):
    status, answer = _chat(servers["chatml"], messages=[ASK], tools=TOOLS)
    assert status == 400 and answer["error"]["param"] == "tools"
    assert "does not render the row's 'tools'" in answer["error"]["message"]
    assert _chat(servers["chatml"], messages=[ASK], tools=[])[0] == 200  # an empty list is no tools


@pytest.mark.parametrize("body, param, said", [
    ({"tools": TOOLS, "tool_choice": "required"}, "tool_choice", "does not parse tool calls"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice",
     "does not parse tool calls"),
    ({"tool_choice": "auto"}, "tool_choice", "only allowed when tools are given"),
    ({"tools": "get_weather"}, "tools", "must be a list of function definitions"),
    ({"tools": [{"name": "get_weather"}]}, "tools[0]", '{"type": "function", "function"'),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools[0]", "only function tools"),
    ({"tools": [{"type": "function", "function": {"name": " "}}]}, "tools", "entry 1 is not a function definition"),
])
def test_bad_tools_and_a_forced_tool_choice_are_refused(body, param, said):
    with pytest.raises(APIError) as info:
        parse_request("chat", {"model": "m", "messages": [ASK], **body}, Limits())
    assert info.value.status == 400 and info.value.param == param and said in info.value.message


def test_completions_still_refuse_tools():
    with pytest.raises(APIError, match="tools is not supported") as info:
        parse_request("completion", {"model": "m", "prompt": "a", "tools": TOOLS}, Limits())
    assert info.value.param == "tools"
    assert parse_request("completion", {"model": "m", "prompt": "a", "tools": []}, Limits()).tools is None


def test_history_tool_calls_and_tool_turns_are_read_as_training_reads_them(servers, tok):
    request = parse_request("chat", {"model": "m", "messages": HISTORY, "tools": TOOLS}, Limits())
    call_turn = {"role": "assistant", "content": "", "tool_calls": [CALL]}  # a call-only turn's null content
    tool_turn = {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "c1"}
    assert request.messages == [ASK, call_turn, tool_turn]
    status, answer = _chat(servers["tools"], messages=HISTORY, tools=TOOLS)
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == _prompt_tokens(tok, request.messages, TOOLS)
    status, answer = _chat(servers["chatml"], messages=HISTORY)
    assert status == 400 and answer["error"]["param"] == "messages"
    assert "'tool_calls'" in answer["error"]["message"]


@pytest.mark.parametrize("messages, param, said", [
    ([ASK, {"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{x"}}]}],
     "messages[1]", "not JSON"),
    ([ASK, {"role": "assistant", "content": "a", "tool_calls": {"name": "f"}}], "messages[1].tool_calls", "a list"),
    ([{**ASK, "tool_calls": [CALL]}], "messages[0]", "only an assistant turn calls tools"),
    ([{**ASK, "tool_call_id": "c1"}], "messages[0].tool_call_id", "tool message"),
    ([ASK, {"role": "tool", "content": ""}], "messages[1]", "empty"),
    ([ASK, {"role": "assistant", "content": "a", "reasoning_content": "hm"}], "messages[1].reasoning_content",
     "unrecognized"),
])
def test_bad_tool_turns_are_refused_naming_the_message(messages, param, said):
    with pytest.raises(APIError) as info:
        parse_request("chat", {"model": "m", "messages": messages}, Limits())
    assert info.value.status == 400 and info.value.param == param and said in info.value.message


def test_an_rlaif_policy_with_a_rows_tools_runs_against_serve(servers):
    """RLAIF asks its policy with the row's tools (`OpenAICompatible.chat(tools=...)`); a serve whose
    template shows them answers, history tool turns included."""
    from posttrain.data.prompts import PromptRecord
    from posttrain.feedback.client import OpenAICompatible, Reply, Usage
    from posttrain.feedback.judge import PairwiseJudge
    from posttrain.feedback.rlaif import rlaif_record

    class Judge:
        model_name, usage = "judge", Usage()

        def chat(self, messages, **kwargs) -> Reply:
            return Reply("Verdict: A", "stop", 1, 1)

    policy = OpenAICompatible(servers["tools"].url + "/v1", "m", max_tokens=3, max_retries=0)
    for prompt in ([ASK], HISTORY):
        record = rlaif_record("0", PromptRecord(prompt, tools=TOOLS), policy=policy, judge=PairwiseJudge(Judge()),
                              num_responses=2, seed=0)
        assert len(record["responses"]) == 2 and all(r["text"] for r in record["responses"])


# --------------------------------------------------------------------------- item 2: special-led stops


@pytest.fixture(scope="module")
def scripted(tok):
    """An engine whose model says "Hello", then <|im_start|> and "user" in two tokens ("us", "er"), then more."""
    start = tok.convert_tokens_to_ids("<|im_start|>")
    script = _ids(tok, "Hello") + [start] + _ids(tok, "us") + _ids(tok, "er") + _ids(tok, "\nmore") + _ids(tok, " x") * 9
    engine = Engine(Says(script, len(tok)), tok, {"m": AS_LOADED}, CHATML, Limits())
    yield engine
    engine.close()


def _answer(engine, kind: str, stream: bool, stop: list[str]) -> tuple[list[str], str]:
    fields = {"messages": [{"role": "user", "content": "a"}]} if kind == "chat" else {"prompts": ["a"]}
    job = engine.submit(Request(kind=kind, model="m", max_tokens=12, temperature=0.0, stream=stream, stop=stop, **fields))
    pieces = []
    while (event := job.events.get(timeout=60))[0] != "end":
        pieces.append(event[2])
    return [*pieces, event[2]], event[3]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_special_led_stop_ends_the_answer_and_is_cut_streamed_or_not(scripted, tok, kind):
    from posttrain.rollout.generate import completion_text

    plain, reason = _answer(scripted, kind, False, [STOP])
    assert plain == ["Hello"] and reason == "stop"
    streamed, reason = _answer(scripted, kind, True, [STOP])
    assert "".join(streamed) == "Hello" and reason == "stop"
    assert not any("us" in piece for piece in streamed)  # nothing of the stop was sent before the cut
    start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = _ids(tok, "Hello") + [start] + _ids(tok, "us") + _ids(tok, "er")
    assert completion_text(tok, ids, [STOP]) == "Hello"  # the one rule serve shares


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_a_held_back_special_led_prefix_is_released_when_the_stop_does_not_follow(scripted, kind):
    """"<|im_start|>us" may start "<|im_start|>user"; once "er\\n" shows it is "<|im_start|>user\\n" and the stop
    asked for is "<|im_start|>usa", the held text is sent: streamed pieces add up to the plain answer."""
    plain, reason = _answer(scripted, kind, False, ["<|im_start|>usa"])
    assert plain == ["Hellouser\nmore x x"] and reason == "length"
    streamed, _ = _answer(scripted, kind, True, ["<|im_start|>usa"])
    assert "".join(streamed) == plain[0] and "us" not in streamed  # "us" was held, then sent with "er"


def test_a_special_led_stop_over_http_streams_as_it_answers(tok):
    start = tok.convert_tokens_to_ids("<|im_start|>")
    script = _ids(tok, "Sure") + [start] + _ids(tok, "user\nnext") + _ids(tok, " x") * 9
    server = Server(Engine(Says(script, len(tok)), tok, {"m": AS_LOADED}, CHATML, Limits()), port=0,
                    log_requests=False).start()
    try:
        body = {"model": "m", "messages": [ASK], "max_tokens": 10, "temperature": 0, "stop": STOP}
        status, answer = _chat(server, **body)
        assert status == 200 and answer["choices"][0]["message"]["content"] == "Sure"
        assert answer["choices"][0]["finish_reason"] == "stop"
        status, text, _ = _post(server, "/v1/chat/completions", {**body, "stream": True})
        deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in text.split("\n\n")
                  if e.startswith("data: {")]
        assert status == 200 and "".join(deltas) == "Sure"
    finally:
        server.close()
