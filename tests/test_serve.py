"""Tests for `posttrain serve`: the official openai client against the server in-process,
answers equal to posttrain's own generator, batching under concurrency, cancellation,
malformed requests, an API key, a small load test and the CLI.

The served model is the tiny preset with its weights perturbed (a random-init tiny model
repeats one token greedily, which would make "the same answer" a weak check) plus a LoRA
adapter with nudged weights, so base and adapter answers differ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

from posttrain.inference import render
from posttrain.rollout.generate import generate, generate_token_ids, truncate_at_stop
from posttrain.rollout.sampling import SamplingSettings
from posttrain.serve import Limits, build_server
from posttrain.serve.http import Server

BODY_LIMIT = 64 * 1024
LIMITS = Limits(max_body_bytes=BODY_LIMIT, max_prompt_tokens=256, max_tokens=128, max_n=4)
PROMPTS = ["The quick brown fox", "Once upon a time", "Copy: a b c", "What is two plus three?", "Reverse: x y z",
           "hello world", "Please write a poem", "Reward models score", "A", "The cat sat on the mat",
           "Sampling with temperature", "Post-training turns", "Two plus", "Please write a short story",
           "Colours and numbers", "The sea and the sky"]


def _perturbed_tiny(directory: Path) -> Path:
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = load_model("tiny")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return save_model(model, load_tokenizer("tiny"), directory)


def _nudged_lora(base: Path, directory: Path) -> Path:
    """A LoRA adapter on `base` with random weights (a fresh one would equal the base)."""
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters
    from posttrain.models.loading import load_model, load_tokenizer, save_model

    model = apply_adapters(load_model(str(base)), AdapterConfig(method=["lora"]))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
    return save_model(model, load_tokenizer(str(base)), directory, base_model_path=base)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    base = _perturbed_tiny(root / "base")
    return base, _nudged_lora(base, root / "lora")


@pytest.fixture(scope="module")
def server(model_dirs):
    # 2 cores shared with other jobs: one torch thread is steadier than two competing ones.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base, lora = model_dirs
    server = build_server(str(base), adapters={"nudged": str(lora)}, served_model_name="base", port=0, limits=LIMITS,
                          max_batch_size=16, log_requests=False).start()
    yield server
    server.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _reference(server: Server, text: str, adapter: str | None, max_tokens: int, stop=()) -> str:
    """posttrain's own generator on the served model, once the server is idle (a streamed answer
    can reach the client before the worker has switched its adapters back)."""
    _wait_idle(server)
    model = server.engine.model
    if adapter is None:
        switch = model.adapters_disabled()
    else:
        model.use_adapter(adapter)
        switch = contextlib.nullcontext()
    with switch:
        settings = SamplingSettings(max_new_tokens=max_tokens, temperature=0, stop=list(stop))
        return generate(model, server.engine.tokenizer, [text], settings, batch_size=1)[0]


def _wait_idle(server: Server, seconds: float = 30) -> None:
    deadline = time.monotonic() + seconds
    while server.engine.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.engine.pending() == 0


def _chat_text(server: Server, content: str) -> str:
    return render({"messages": [{"role": "user", "content": content}]}, server.engine.tokenizer, server.engine.template)


def _raw(server: Server, method: str, path: str, body=None, headers=None):
    """(status, decoded JSON body, headers) of one plain HTTP request."""
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    try:
        connection.request(method, path, body=data, headers=headers or {})
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null"), dict(response.getheaders())
    finally:
        connection.close()


# ---------------------------------------------------------------- the generator's callback


def test_on_token_callback_ends_rows_at_their_own_lengths(server):
    """generate_token_ids(on_token=...) ends prompt i after lengths[i] tokens; the tokens are the
    same as an unlimited greedy run's first lengths[i] (the rows never see each other)."""
    engine = server.engine
    _wait_idle(server)
    prompts = [engine.tokenizer(p)["input_ids"] for p in PROMPTS[:4]]
    settings = SamplingSettings(max_new_tokens=12, temperature=0)
    with engine.model.adapters_disabled():
        free = generate_token_ids(engine.model, prompts, settings, pad_token_id=engine.pad_id,
                                  eos_token_ids=set(), batch_size=4)
        lengths, seen = [3, 12, 1, 7], []

        def on_token(i, ids):
            seen.append((i, len(ids)))
            return len(ids) >= lengths[i]

        limited = generate_token_ids(engine.model, prompts, settings, pad_token_id=engine.pad_id,
                                     eos_token_ids=set(), batch_size=4, on_token=on_token)
    assert [len(ids) for ids in limited] == lengths
    assert all(limited[i] == free[i][: lengths[i]] for i in range(4))
    assert sorted(seen) == sorted((i, n) for i in range(4) for n in range(1, lengths[i] + 1))


# ---------------------------------------------------------------- the openai client


def test_chat_completion_equals_posttrain_generate(server, client):
    messages = [{"role": "user", "content": "Please write a poem"}]
    response = client.chat.completions.create(model="base", messages=messages, max_tokens=20, temperature=0)
    text = _chat_text(server, "Please write a poem")
    answer = response.choices[0].message.content
    assert answer == _reference(server, text, None, 20)
    assert len(answer) > 10 and response.choices[0].message.role == "assistant"
    assert response.object == "chat.completion" and response.model == "base"
    assert response.choices[0].finish_reason in ("stop", "length")
    prompt_tokens = len(server.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert response.usage.prompt_tokens == prompt_tokens
    assert 1 <= response.usage.completion_tokens <= 20
    assert response.usage.total_tokens == prompt_tokens + response.usage.completion_tokens
    unbounded = client.chat.completions.create(model="base", messages=messages, temperature=0)
    assert unbounded.usage.completion_tokens <= LIMITS.max_tokens  # no max_tokens: the server's limit
    assert unbounded.choices[0].message.content.startswith(answer)


def test_text_completion_several_prompts_and_choices(server, client):
    response = client.completions.create(model="base", prompt="The quick brown fox", max_tokens=12, temperature=0)
    assert response.choices[0].text == _reference(server, "The quick brown fox", None, 12)
    assert response.choices[0].finish_reason == "length" and response.usage.completion_tokens == 12
    many = client.completions.create(model="base", prompt=PROMPTS[:3], max_tokens=6, temperature=0, n=2)
    assert [c.index for c in many.choices] == [0, 1, 2, 3, 4, 5]
    expected = [_reference(server, p, None, 6) for p in PROMPTS[:3]]
    assert [c.text for c in many.choices] == [e for e in expected for _ in range(2)]  # greedy: n copies
    assert many.usage.completion_tokens == 36


def test_streaming_adds_up_to_the_non_streamed_answer(server, client):
    messages = [{"role": "user", "content": "Once upon a time"}]
    whole = client.chat.completions.create(model="base", messages=messages, max_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="base", messages=messages, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 3  # really streamed, not one piece at the end
    assert "".join(pieces) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # the usage chunk comes last


def test_stop_string_cuts_the_same_way_streamed_or_not(server, client):
    """A stop string from the middle of the greedy answer: both ways end just before it, and a
    streamed piece never shows a character that the stop string later takes back."""
    full = client.completions.create(model="base", prompt="What is two plus three?", max_tokens=24,
                                     temperature=0).choices[0].text
    stop = full[9:12]
    expected = truncate_at_stop(full, [stop])
    assert 0 < len(expected) < 12
    plain = client.completions.create(model="base", prompt="What is two plus three?", max_tokens=24,
                                      temperature=0, stop=[stop, "zzzz"])
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="base", prompt="What is two plus three?", max_tokens=24, temperature=0, stop=stop, stream=True))
    assert plain.choices[0].text == streamed == expected
    assert plain.choices[0].finish_reason == "stop"
    assert expected == _reference(server, "What is two plus three?", None, 24, stop=[stop])


def test_models_list_and_an_adapter_picked_by_name(server, client):
    assert sorted(m.id for m in client.models.list().data) == ["base", "nudged"]
    assert client.models.retrieve("nudged").id == "nudged"
    messages = [{"role": "user", "content": "hello world"}]
    answers = {name: client.chat.completions.create(model=name, messages=messages, max_tokens=16,
                                                    temperature=0).choices[0].message.content
               for name in ("base", "nudged", "base")}
    text = _chat_text(server, "hello world")
    assert answers["nudged"] == _reference(server, text, "nudged", 16)
    assert answers["base"] == _reference(server, text, None, 16)
    assert answers["nudged"] != answers["base"]  # the adapter is really applied, and really switched off


def test_seeded_sampling_repeats_and_n_choices_differ(server, client):
    def sample(seed):
        response = client.completions.create(model="nudged", prompt="Once upon a time", max_tokens=12,
                                             temperature=1.0, top_p=0.95, seed=seed, n=3)
        return [c.text for c in response.choices]

    with ThreadPoolExecutor(6) as pool:  # alongside other traffic: the seed alone decides
        futures = [pool.submit(sample, 7) for _ in range(3)]
        noise = [pool.submit(client.completions.create, model="base", prompt=p, max_tokens=8, temperature=0.8)
                 for p in PROMPTS[:3]]
        runs = [f.result() for f in futures]
        [f.result() for f in noise]
    assert runs[0] == runs[1] == runs[2]
    assert len(set(runs[0])) > 1  # three samples, not one repeated
    assert sample(8) != runs[0]


def test_api_key_is_required_when_configured(server):
    keyed = Server(server.engine, "127.0.0.1", 0, api_key="s3cret-key", log_requests=False).start()
    try:
        url = keyed.url + "/v1"
        request = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).chat.completions.create(**request)
        good = openai.OpenAI(base_url=url, api_key="s3cret-key", max_retries=0)
        assert good.chat.completions.create(**request).choices[0].message.content is not None
        status, body, _ = _raw(keyed, "GET", "/v1/models")  # no Authorization header at all
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert _raw(keyed, "GET", "/health")[0] == 200  # health checks need no key
    finally:
        keyed.close(close_engine=False)


# ---------------------------------------------------------------- concurrency and batching


def test_concurrent_requests_are_batched_and_answer_like_one_by_one(server, client):
    def ask(i):
        if i % 2:
            return client.completions.create(model="base", prompt=PROMPTS[i], max_tokens=8 + i,
                                              temperature=0).choices[0].text
        return client.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPTS[i]}],
                                              max_tokens=8 + i, temperature=0).choices[0].message.content

    one_by_one = [ask(i) for i in range(16)]
    before = server.engine.snapshot()
    barrier = threading.Barrier(16)

    def ask_together(i):
        barrier.wait()
        return ask(i)

    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask_together, range(16)))
    after = server.engine.snapshot()
    assert together == one_by_one
    assert len(set(one_by_one)) >= 12  # distinct prompts, distinct answers: nothing mixed up
    requests, batches = after["requests"] - before["requests"], after["batches"] - before["batches"]
    print(f"\n16 concurrent requests -> {batches} generator batches (largest {after['largest_batch']} rows)")
    assert requests == 16 and batches < requests and after["largest_batch"] > 1
    _wait_idle(server)  # the last answer can arrive just before the worker counts its batch done
    status, health, _ = _raw(server, "GET", "/health")
    assert status == 200 and health["stats"]["batches"] == server.engine.snapshot()["batches"]


def test_a_client_that_leaves_mid_stream_frees_its_row(server):
    before = server.engine.snapshot()["completion_tokens"]
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("POST", "/v1/completions", body=json.dumps(
        {"model": "base", "prompt": "hello", "max_tokens": 128, "temperature": 0, "stream": True}))
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")  # first chunk arrived
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    _wait_idle(server)
    assert _raw(server, "GET", "/health")[1]["status"] == "ok"
    # generation stops when the server notices the closed socket, well before 128 tokens
    generated = server.engine.snapshot()["completion_tokens"] - before
    print(f"\nclient left after the first chunk: {generated} of 128 tokens generated")
    assert generated < 128


# ---------------------------------------------------------------- bad requests

CHAT = {"model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
BAD_REQUESTS = [
    # (what, method, path, body, headers, status, param)
    ("invalid JSON", "POST", "/v1/chat/completions", b'{"model": "base", "messages": [', None, 400, None),
    ("not UTF-8", "POST", "/v1/chat/completions", b"\xff\xfe\x00junk", None, 400, None),
    ("deeply nested", "POST", "/v1/completions", b"[" * 30000 + b"]" * 30000, None, 400, None),
    ("a list, not an object", "POST", "/v1/chat/completions", [CHAT], None, 400, None),
    ("missing messages", "POST", "/v1/chat/completions", {"model": "base"}, None, 400, "messages"),
    ("missing model", "POST", "/v1/chat/completions", {"messages": CHAT["messages"]}, None, 400, "model"),
    ("missing prompt", "POST", "/v1/completions", {"model": "base"}, None, 400, "prompt"),
    ("messages a string", "POST", "/v1/chat/completions", {**CHAT, "messages": "hi"}, None, 400, "messages"),
    ("empty messages", "POST", "/v1/chat/completions", {**CHAT, "messages": []}, None, 400, "messages"),
    ("bad role", "POST", "/v1/chat/completions", {**CHAT, "messages": [{"role": "robot", "content": "x"}]}, None,
     400, "messages[0].role"),
    ("image content", "POST", "/v1/chat/completions",
     {**CHAT, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, None,
     400, "messages[0].content"),
    ("max_tokens a string", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": "10"}, None, 400, "max_tokens"),
    ("max_tokens negative", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": -5}, None, 400, "max_tokens"),
    ("max_tokens huge", "POST", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": 10**9}, None, 400,
     "max_tokens"),
    ("max_tokens a bool", "POST", "/v1/chat/completions", {**CHAT, "max_tokens": True}, None, 400, "max_tokens"),
    ("temperature a string", "POST", "/v1/chat/completions", {**CHAT, "temperature": "hot"}, None, 400,
     "temperature"),
    ("temperature too high", "POST", "/v1/chat/completions", {**CHAT, "temperature": 9}, None, 400, "temperature"),
    ("top_p zero", "POST", "/v1/chat/completions", {**CHAT, "top_p": 0}, None, 400, "top_p"),
    ("n too large", "POST", "/v1/chat/completions", {**CHAT, "n": 100}, None, 400, "n"),
    ("stop a number", "POST", "/v1/chat/completions", {**CHAT, "stop": 5}, None, 400, "stop"),
    ("stream a string", "POST", "/v1/chat/completions", {**CHAT, "stream": "yes"}, None, 400, "stream"),
    ("logprobs", "POST", "/v1/chat/completions", {**CHAT, "logprobs": True}, None, 400, "logprobs"),
    ("unknown field", "POST", "/v1/chat/completions", {**CHAT, "temprature": 0.5}, None, 400, "temprature"),
    ("token-id prompt", "POST", "/v1/completions", {"model": "base", "prompt": [1, 2, 3]}, None, 400, "prompt"),
    ("prompt too long", "POST", "/v1/completions", {"model": "base", "prompt": "hello world " * 300}, None, 400,
     "prompt"),
    ("unknown model", "POST", "/v1/chat/completions", {**CHAT, "model": "gpt-4"}, None, 404, "model"),
    ("unknown model card", "GET", "/v1/models/gpt-4", None, None, 404, "model"),
    ("body over the limit", "POST", "/v1/completions", b"{" + b" " * BODY_LIMIT + b"}", None, 413, None),
    ("empty body", "POST", "/v1/completions", None, None, 400, None),
    ("unknown route", "GET", "/v2/everything", None, None, 404, None),
    ("unknown POST route", "POST", "/v1/embeddings", {"model": "base", "input": "x"}, None, 404, None),
    ("GET on a POST route", "GET", "/v1/chat/completions", None, None, 405, None),
    ("DELETE on models", "DELETE", "/v1/models", None, None, 405, None),
    ("PUT with a body", "PUT", "/v1/chat/completions", CHAT, None, 405, None),
    ("POST on health", "POST", "/health", CHAT, None, 405, None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_request_gets_a_json_4xx_and_the_server_stays_up(server, case):
    _, method, path, body, headers, status, param = case
    got, answer, response_headers = _raw(server, method, path, body, headers)
    assert got == status, answer
    if status == 405:
        assert response_headers["Allow"] in ("GET", "POST")
    error = answer["error"]
    assert isinstance(error["message"], str) and error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert _raw(server, "GET", "/health")[1]["status"] == "ok"


def _exchange(server: Server, data: bytes) -> bytes:
    """Send raw bytes, read until the server closes the connection."""
    with socket.create_connection(server.httpd.server_address[:2], timeout=10) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def test_garbage_on_the_socket_and_the_server_still_answers(server, client):
    host, port = server.httpd.server_address[:2]
    for junk in (b"GARBAGE\r\n\r\n", b"FOO /health HTTP/1.1\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n",
                 b"\x00\xff" * 100 + b"\r\n\r\n"):
        reply = _exchange(server, junk)
        if reply.startswith(b"HTTP/"):  # a 4xx with a JSON error, and the connection closed
            head, _, body = reply.partition(b"\r\n\r\n")
            assert re.match(rb"HTTP/1\.[01] 4\d\d", head), head
            assert "error" in json.loads(body)
        elif reply:  # a one-word request line is HTTP/0.9, which has no status line: the error alone
            assert "error" in json.loads(reply)
    head, _, body = _exchange(server, b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked"
                              b"\r\n\r\n5\r\nhello\r\n0\r\n\r\n").partition(b"\r\n\r\n")  # no Content-Length
    assert head.startswith(b"HTTP/1.1 411") and "Content-Length" in json.loads(body)["error"]["message"]
    # a request body that promises more than it sends: dropped when the client gives up
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{\"mo")
    answer = client.completions.create(model="base", prompt="A", max_tokens=3, temperature=0)
    assert answer.choices[0].text == _reference(server, "A", None, 3)


def test_keep_alive_connection_survives_a_refused_request(server):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body=json.dumps({**CHAT, "n": 100}))
        first = connection.getresponse()
        assert first.status == 400 and json.loads(first.read())["error"]["param"] == "n"
        connection.request("POST", "/health", body=b'{"x": 1}')  # 405 with an unread body: drained
        second = connection.getresponse()
        assert second.status == 405 and "error" in json.loads(second.read())
        connection.request("POST", "/v1/chat/completions", body=json.dumps(CHAT))
        third = connection.getresponse()
        assert third.status == 200 and json.loads(third.read())["choices"][0]["message"]["role"] == "assistant"
    finally:
        connection.close()


# ---------------------------------------------------------------- load


def _hammer(server: Server, clients: int, seconds: float, max_tokens: int) -> tuple[list, list[float], float]:
    """`clients` threads send chat requests back to back for `seconds`: (statuses, latencies, elapsed)."""
    host, port = server.httpd.server_address[:2]
    statuses, latencies, lock = [], [], threading.Lock()
    stop_at = time.monotonic() + seconds

    def run(worker):
        connection = http.client.HTTPConnection(host, port, timeout=120)
        number = 0
        while time.monotonic() < stop_at:
            body = {"model": "base", "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"{PROMPTS[(worker + number) % 16]} {number}"}]}
            started = time.monotonic()
            try:
                connection.request("POST", "/v1/chat/completions", body=json.dumps(body))
                response = connection.getresponse()
                answer = json.loads(response.read())
                ok = (response.status == 200 and answer["choices"][0]["message"]["content"] is not None) or (
                    response.status == 503 and answer["error"]["code"] == "server_busy")
                outcome = response.status if ok else f"bad {response.status}: {answer}"
            except (OSError, http.client.HTTPException, ValueError) as exc:
                outcome = f"lost: {type(exc).__name__}: {exc}"
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=120)
            with lock:
                statuses.append(outcome)
                if outcome == 200:
                    latencies.append(time.monotonic() - started)
            if outcome == 503:
                time.sleep(0.05)  # a polite client backs off (the response says Retry-After: 1)
            number += 1
        connection.close()

    begun = time.monotonic()
    threads = [threading.Thread(target=run, args=(w,)) for w in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, latencies, time.monotonic() - begun


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def test_load_nothing_is_lost(server):
    before = server.engine.snapshot()
    clients, seconds, max_tokens = 8, 4.0, 16
    statuses, latencies, elapsed = _hammer(server, clients, seconds, max_tokens)
    after = server.engine.snapshot()
    lost = [s for s in statuses if s not in (200, 503)]
    assert not lost, lost[:3]
    assert statuses.count(200) == len(latencies) > clients
    batches = after["batches"] - before["batches"]
    tokens = after["completion_tokens"] - before["completion_tokens"]
    print(f"\nload: {clients} clients x {seconds:.0f}s, chat, max_tokens {max_tokens}, greedy, torch threads "
          f"{torch.get_num_threads()}: {len(latencies)} answered, {statuses.count(503)} refused, "
          f"{len(latencies) / elapsed:.1f} req/s, {tokens / elapsed:.0f} completion tokens/s, latency "
          f"p50 {_percentile(latencies, 0.5) * 1000:.0f} ms, p90 {_percentile(latencies, 0.9) * 1000:.0f} ms, "
          f"p99 {_percentile(latencies, 0.99) * 1000:.0f} ms; {batches} batches, "
          f"{(after['rows'] - before['rows']) / max(batches, 1):.1f} rows per batch")

    # Over capacity: at most 3 requests pending, 10 clients. Refusals are 503 with a JSON error, none lost.
    limits = server.engine.limits
    server.engine.limits = dataclasses.replace(limits, max_pending=3)
    try:
        statuses, latencies, elapsed = _hammer(server, 10, 2.0, max_tokens)
    finally:
        server.engine.limits = limits
    lost = [s for s in statuses if s not in (200, 503)]
    assert not lost, lost[:3]
    assert statuses.count(503) > 0 and statuses.count(200) > 0
    print(f"over capacity (max_pending 3, 10 clients x 2s): {statuses.count(200)} answered, "
          f"{statuses.count(503)} refused with 503, 0 lost")
    # a job is released when its batch ends, which may be just after its client has its answer
    deadline = time.monotonic() + 10
    while _raw(server, "GET", "/health")[1]["pending"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _raw(server, "GET", "/health")[1]["pending"] == 0


# ---------------------------------------------------------------- the CLI


def _posttrain(*args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "posttrain", *map(str, args)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_cli_refuses_an_unset_key_variable():
    process = _posttrain("serve", "tiny", "--api-key-env", "POSTTRAIN_TEST_SURELY_UNSET_VAR")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    assert stderr.strip() == ("error: --api-key-env POSTTRAIN_TEST_SURELY_UNSET_VAR: that environment variable is "
                              "unset or empty")


def test_cli_serves_with_a_key_from_the_environment_and_stops_on_ctrl_c(model_dirs):
    base, _ = model_dirs
    env_key = {"POSTTRAIN_TEST_KEY": "k-123"}
    process = subprocess.Popen(
        [sys.executable, "-m", "posttrain", "serve", str(base), "--served-model-name", "m", "--port", "0",
         "--threads", "1", "--api-key-env", "POSTTRAIN_TEST_KEY"],
        env={**os.environ, **env_key, "PYTHONUNBUFFERED": "1"}, text=True, stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even when the suite runs as `cmd &`
    try:
        url = None
        deadline = time.monotonic() + 120
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            assert line or process.poll() is None, "the server exited before serving"
            found = re.search(r"serving m at (http://\S+)/v1", line)
            url = found.group(1) if found else None
        assert url is not None
        client = openai.OpenAI(base_url=url + "/v1", api_key="k-123", max_retries=0)
        answer = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=0)
        assert answer.usage.completion_tokens == 5
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    finally:
        process.send_signal(signal.SIGINT)
        process.communicate(timeout=60)
    assert process.returncode == 0
