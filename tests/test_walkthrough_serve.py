"""A client library's view of `posttrain serve`: the server walked as the official `openai` client,
LangChain, an lm-eval harness or a home-made judge pipeline sees it, against OpenAI's API reference
(response and chunk shapes, usage counts, n, stop, seed, max_tokens, the fields it cannot honour,
server-sent-event framing, error objects, keep-alive, concurrency). The README ("Serving: an
OpenAI-compatible server") promises that wire format, that streamed pieces add up to the
non-streamed answer, and that unsupported features "get a 400 rather than being ignored".

Two servers: the tiny preset (its own byte-level BPE tokenizer and ChatML) and a Llama-2-style model
directory built offline by `tests/test_walkthrough_tokenizers.build_family` (a SentencePiece-style
tokenizer with byte fallback and the "▁" dummy prefix its decoder strips, as Llama-2, Mistral and
Gemma ship). Requests go over plain `http.client`, and through the `openai` package where it is
installed. What is already pinned by tests/test_serve.py and tests/test_feedback_serve_edges.py
(the 36 malformed requests, the API key, SSE parsing of n choices, cancellation, load) is not
repeated.

The tests named for a failure pin a defect found on this walk (each a strict xfail until its fix, stop 30: they
assert the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")

from posttrain.serve import Limits, build_server  # noqa: E402

LIMITS = Limits(max_tokens=64, max_n=4)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    server = build_server("tiny", port=0, log_requests=False, limits=LIMITS, max_batch_size=16).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def llama2(one_thread, tmp_path_factory):
    """A Llama-2-style model directory (SentencePiece-style BPE with byte fallback), served as "m"."""
    from tests.test_walkthrough_tokenizers import build_family

    directory = build_family("llama2", tmp_path_factory.mktemp("serve_llama2") / "model")
    server = build_server(str(directory), served_model_name="m", port=0, log_requests=False, limits=LIMITS).start()
    yield server
    server.close()


def _post(server, path: str, body, method: str = "POST", connection=None):
    """(status, decoded body text, headers) of one request; a fresh connection unless one is given."""
    host, port = server.httpd.server_address[:2]
    own = connection is None
    connection = connection or http.client.HTTPConnection(host, port, timeout=120)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, data, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        if own:
            connection.close()


def _json(server, path: str, body, **kw):
    status, text, _ = _post(server, path, body, **kw)
    return status, json.loads(text)


def _texts(answer: dict) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in answer["choices"]]


def _sse(text: str) -> list[dict]:
    """The chunks of a server-sent-event body, checking OpenAI's framing: `data: {json}\\n\\n` events,
    the last one `data: [DONE]`."""
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", text[-200:]
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event, event
        chunks.append(json.loads(event[len("data: "):]))
    return chunks


def _streamed_texts(chunks: list[dict]) -> list[str]:
    texts: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return [texts[i] for i in sorted(texts)]


# --------------------------------------------------------------------------- defects


def test_byte_fallback_stream_stalls_and_drops_the_rest_of_the_answer(llama2):
    """README: "streamed pieces add up to the non-streamed answer". A Llama-2 / Mistral / Gemma tokenizer
    spells rare bytes as <0xNN> tokens, and its ByteFallback decoder decodes a run of them together: one
    U+FFFD per byte when the run is not valid UTF-8, so a byte that decoded as "L" alone becomes "\ufffd"
    once an invalid byte follows. Observed (seed 0, choice 1): tokens ['▁to', '<0x4C>', '<0xC6>', '▁app',
    ...]; the stream sends "L" after "▁to", every later decode reads "to\ufffd\ufffd app...", which no longer
    starts with what was sent, so nothing more is streamed: the streamed answer ends '... gl toL' where
    the plain one ends '... gl to\ufffd\ufffd app\ufffdurn mo' (23 characters streamed of 35). Seeds 0-2 × 2
    choices: 2 of 6 streamed answers are cut short (seed 1, choice 1: 17 characters of 42)."""
    body = {"model": "m", "messages": [{"role": "user", "content": "Grüße 北京"}], "max_tokens": 20,
            "temperature": 1.0, "n": 2}
    plain, streamed = [], []
    for seed in (0, 1, 2):
        status, answer = _json(llama2, CHAT, {**body, "seed": seed})
        assert status == 200
        plain.append(_texts(answer))
        status, text, _ = _post(llama2, CHAT, {**body, "seed": seed, "stream": True})
        assert status == 200
        streamed.append(_streamed_texts(_sse(text)))
    assert streamed == plain


def test_completion_text_drops_the_leading_space_on_a_sentencepiece_tokenizer(llama2):
    """A completion is the prompt's continuation: a client (an lm-eval harness, a code completer) appends
    `text` to its prompt. Llama-2 / Mistral tokenizers mark a word's space with "▁" and their decoder
    strips the one at the start of the decoded text (the dummy prefix), so the continuation must be
    decoded after the prompt's tokens (as vLLM does), not alone. Observed: prompt 'The cat sat', greedy
    tokens ['▁ag', '<0x6E>', '▁you', ...], text 'agn youetter har anf takes' where the tokens say
    ' agn youetter har anf takes' (and a stop string ' ag' would never match)."""
    from posttrain.rollout.generate import generate_token_ids
    from posttrain.rollout.sampling import SamplingSettings

    prompt = "The cat sat"
    status, answer = _json(llama2, COMPLETIONS, {"model": "m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200
    engine = llama2.engine
    tokenizer = engine.tokenizer
    prompt_ids = tokenizer(prompt)["input_ids"]
    completion = generate_token_ids(engine.model, [prompt_ids], SamplingSettings(max_new_tokens=8, temperature=0),
                                    pad_token_id=engine.pad_id, eos_token_ids=engine.eos_ids)[0]
    assert tokenizer.convert_ids_to_tokens(completion[:1])[0].startswith("▁")  # the first word has its space
    whole = tokenizer.decode(prompt_ids + completion, skip_special_tokens=True)
    assert whole.startswith(prompt)
    assert answer["choices"][0]["text"] == whole[len(prompt):]
    assert prompt + answer["choices"][0]["text"] == whole


def test_completions_logprobs_zero_is_silently_ignored(tiny):
    """OpenAI's completions reference: "The API will always return the logprob of the sampled token, so there
    may be up to logprobs+1 elements in the response": logprobs 0 asks for the sampled tokens' logprobs
    (the old `logprobs=0` scoring idiom; vLLM returns them too). The README: "Unsupported features
    (logprobs, tools, echo, best_of) ... get a 400 rather than being ignored"; protocol.py lists 0 among
    logprobs' "off" values. Observed: 200 with "logprobs": null."""
    status, answer = _json(tiny, COMPLETIONS, {"model": "tiny", "prompt": "hi", "max_tokens": 4, "logprobs": 0})
    refused = status == 400 and answer["error"]["param"] == "logprobs"
    honoured = status == 200 and answer["choices"][0]["logprobs"] is not None
    assert refused or honoured, answer


def test_stream_chunks_share_one_created_timestamp(tiny, monkeypatch):
    """OpenAI's chunk object: "created: The Unix timestamp (in seconds) of when the chat completion was
    created. Each chunk has the same timestamp." `protocol.chunk_body` calls time.time() for each chunk.
    A clock that ticks a second per reading makes every stream cross a second boundary, which a real
    one does whenever a stream is slow or starts at x.999 s. Observed: created 1000, 1001, 1002, ..."""
    import posttrain.serve.protocol as protocol

    ticks = iter(range(1000, 1_000_000))
    monkeypatch.setattr(protocol, "time", SimpleNamespace(time=lambda: float(next(ticks))))
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 1.0,
            "seed": 3, "stream": True, "stream_options": {"include_usage": True}}
    status, text, _ = _post(tiny, CHAT, body)
    chunks = _sse(text)
    assert status == 200 and len(chunks) >= 4
    assert len({c["id"] for c in chunks}) == 1
    assert len({c["created"] for c in chunks}) == 1, [c["created"] for c in chunks]


# --------------------------------------------------------------------------- right, and now pinned


@pytest.mark.parametrize("field, value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]),
    ("tool_choice", "auto"),
    ("response_format", {"type": "json_object"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    ("top_logprobs", 2),
    ("logit_bias", {"50": 5}),
    ("functions", [{"name": "f", "parameters": {}}]),
])
def test_features_it_cannot_honour_are_refused_with_openai_errors(tiny, field, value):
    """A client that asks for tools or a JSON response format must not get free text back as if it had
    worked: 400, OpenAI's error object, the field named in `param`."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, field: value}
    status, answer = _json(tiny, CHAT, body)
    assert status == 400
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == field
    assert field in answer["error"]["message"]


def test_fields_at_their_off_values_and_nulls_are_accepted_as_openai_clients_send_them(tiny):
    """Clients send some fields at their defaults (LangChain's stream: false, the SDK's nulls, a
    response_format of text, an empty tools list); those change nothing and must not be refused."""
    body = {"model": "tiny", "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 3, "temperature": 0, "stream": False, "response_format": {"type": "text"}, "tools": [],
            "logprobs": False, "parallel_tool_calls": True, "seed": None, "stop": None, "n": None, "user": "u1",
            "top_p": None, "presence_penalty": None}
    status, answer = _json(tiny, CHAT, body)
    assert status == 200, answer
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    assert answer["id"].startswith("chatcmpl-") and isinstance(answer["created"], int)
    (choice,) = answer["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3


def test_usage_counts_the_prompt_once_and_every_choice_and_prompt(tiny):
    """usage.prompt_tokens is the rendered prompt once however many choices (n); completions sum their
    prompts; completion_tokens sums every choice; total is the sum of the two."""
    tokenizer = tiny.engine.tokenizer
    messages = [{"role": "user", "content": "Name three colours"}]
    rendered = tokenizer.apply_chat_template(messages, chat_template=tiny.engine.template, tokenize=False,
                                             add_generation_prompt=True)
    prompt_tokens = len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    status, answer = _json(tiny, CHAT, {"model": "tiny", "messages": messages, "max_tokens": 5, "temperature": 1.0,
                                        "seed": 4, "n": 3})
    assert status == 200 and len(answer["choices"]) == 3
    usage = answer["usage"]
    assert usage["prompt_tokens"] == prompt_tokens
    assert usage["completion_tokens"] <= 15 and usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
    prompts = ["The cat", "Once upon a time"]
    status, answer = _json(tiny, COMPLETIONS, {"model": "tiny", "prompt": prompts, "max_tokens": 4, "n": 2,
                                               "temperature": 1.0, "seed": 4})
    expected_prompt = sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    assert status == 200 and [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    assert answer["usage"]["prompt_tokens"] == expected_prompt
    if all(c["finish_reason"] == "length" for c in answer["choices"]):
        assert answer["usage"]["completion_tokens"] == 16


def test_seed_repeats_and_max_completion_tokens_caps_the_answer(tiny):
    """Same seed, same text (and the same text streamed); another seed, another text;
    max_completion_tokens (the newer name) caps the answer as max_tokens does."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 0.9,
            "top_p": 0.9, "max_completion_tokens": 12}
    first, again, other = (_json(tiny, CHAT, {**body, "seed": s})[1] for s in (21, 21, 22))
    assert _texts(first) == _texts(again) != _texts(other)
    assert first["usage"]["completion_tokens"] <= 12
    status, text, headers = _post(tiny, CHAT, {**body, "seed": 21, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    chunks = _sse(text)
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finishes = [c["choices"][0]["finish_reason"] for c in chunks]
    assert finishes[:-1] == [None] * (len(chunks) - 1) and finishes[-1] == first["choices"][0]["finish_reason"]
    assert _streamed_texts(chunks) == _texts(first)


def test_keep_alive_connection_serves_requests_after_streams(tiny):
    """httpx (the openai client) reuses one connection: a streamed answer (chunked, ended by the zero
    chunk) must leave the connection ready for the next request, streamed or not."""
    host, port = tiny.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "seed": 1,
                "temperature": 1.0}
        results = []
        for body in ({**chat, "stream": True}, chat, {"model": "tiny", "prompt": "x", "max_tokens": 3, "stream": True},
                     {**chat, "stream": True, "n": 2}):
            path = CHAT if "messages" in body else COMPLETIONS
            status, text, _ = _post(tiny, path, body, connection=connection)
            assert status == 200
            results.append(_streamed_texts(_sse(text)) if body.get("stream") else _texts(json.loads(text)))
        assert results[0] == results[1]  # the same seed streamed and not
        assert results[3][0] == results[0][0] and len(results[3]) == 2
    finally:
        connection.close()


def test_concurrent_mixed_requests_each_get_their_own_answer(tiny):
    """Chat and completions, streamed and not, stop strings, n, seeded sampling and greedy with a
    penalty (a random-init model repeats one token greedily otherwise), all at once: each answer equals
    the same request sent alone."""

    def ask(spec):
        path, body = spec
        if body.get("stream"):
            status, text, _ = _post(tiny, path, body)
            assert status == 200
            return _streamed_texts(_sse(text))
        status, answer = _json(tiny, path, body)
        assert status == 200, answer
        return _texts(answer)

    prompts = ["The cat", "Once upon a time", "Reward models", "hello", "Post-training", "Colours"]
    greedy = {"model": "tiny", "temperature": 0, "repetition_penalty": 1.5}
    specs = []
    for i, p in enumerate(prompts):
        specs.append((COMPLETIONS, {**greedy, "prompt": p, "max_tokens": 6 + 3 * i, "stream": i % 2 == 0}))
        specs.append((CHAT, {**greedy, "messages": [{"role": "user", "content": p}], "max_tokens": 16 - i,
                             "n": 1 + i % 2, "stream": i % 3 == 0}))
        specs.append((CHAT, {"model": "tiny", "messages": [{"role": "user", "content": p}], "max_tokens": 10,
                             "temperature": 0.9, "seed": i, "stream": i % 2 == 1}))
    first = [ask(s) for s in specs]
    for k, (spec, answer) in enumerate(zip(specs, first)):  # stop strings cut from the middle of some answers
        if k % 3 == 1 and len(answer[0]) > 6:
            spec[1]["stop"] = [answer[0][3:5], "never-there"]
    alone = [ask(s) for s in specs]
    assert sum(a != f for a, f in zip(alone, first)) >= 2  # the stop strings really cut
    barrier = threading.Barrier(len(specs))

    def together(spec):
        barrier.wait()
        return ask(spec)

    before = tiny.engine.snapshot()["batches"]
    with ThreadPoolExecutor(len(specs)) as pool:
        at_once = list(pool.map(together, specs))
    assert at_once == alone
    assert tiny.engine.snapshot()["batches"] - before < len(specs)  # some really shared a batch


def test_openai_client_sees_typed_errors_and_streams_completions(tiny):
    """The official client: a refused field is a BadRequestError naming the param, an unknown model a
    NotFoundError, and a streamed /v1/completions with two prompts adds up per choice."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=tiny.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert refused.value.param == "tools" and refused.value.status_code == 400
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "x"}])
    assert missing.value.code == "model_not_found"
    assert [m.id for m in client.models.list().data] == ["tiny"]
    kwargs = dict(model="tiny", prompt=["Once", "The sea"], max_tokens=5, temperature=0.8, seed=9)
    plain = client.completions.create(**kwargs)
    pieces: dict[int, str] = {}
    for chunk in client.completions.create(**kwargs, stream=True):
        for choice in chunk.choices:
            pieces[choice.index] = pieces.get(choice.index, "") + choice.text
    assert [pieces[i] for i in range(2)] == [c.text for c in plain.choices]
