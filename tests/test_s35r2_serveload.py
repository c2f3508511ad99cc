"""`posttrain serve` beyond tests/test_walkthrough_serveload.py's pinned defects (stop 35): HEAD,
a body far over the size limit, the --max-prompt-tokens refusal, a lone surrogate's field, and the
sampler's greedy cut-off."""

from __future__ import annotations

import http.client
import json

import pytest

torch = pytest.importorskip("torch")

from posttrain.rollout import GREEDY_BELOW, is_greedy
from posttrain.rollout.sampling import sample_next
from posttrain.serve import Limits, build_server
from posttrain.serve.engine import AS_LOADED, Engine
from posttrain.serve.http import _DRAIN_BYTES, Server

LIMITS = Limits(max_tokens=64, max_n=2)


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = build_server("tiny", port=0, log_requests=False, limits=LIMITS).start()
    yield server
    server.close()
    torch.set_num_threads(threads)


def _request(server, method: str, path: str, body: bytes | str | None = None) -> tuple[int, dict, bytes]:
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=120)
    try:
        connection.request(method, path, body, {"Content-Type": "application/json"} if body is not None else {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_head_answers_as_get_without_a_body(tiny):
    status, headers, body = _request(tiny, "HEAD", "/health")
    assert status == 200 and body == b"" and int(headers["Content-Length"]) > 0
    assert _request(tiny, "HEAD", "/v1/models")[0] == 200
    status, _, body = _request(tiny, "HEAD", "/nowhere")
    assert status == 404 and body == b""
    status, headers, body = _request(tiny, "HEAD", "/v1/completions")
    assert status == 405 and headers["Allow"] == "POST" and body == b""
    assert _request(tiny, "GET", "/nowhere")[0] == 404


def test_a_body_past_what_is_drained_gets_its_413_not_a_broken_pipe(tiny):
    """Past _DRAIN_BYTES the body is not read before the answer; the connection closes after it, and
    the server reads what the client still sends meanwhile (`_linger`), so it sees the 413."""
    size = _DRAIN_BYTES + (4 << 20)
    status, headers, body = _request(tiny, "POST", "/v1/completions", b"x" * size)
    error = json.loads(body)["error"]
    assert status == 413 and error["code"] == "request_too_large" and str(size) in error["message"]
    assert headers.get("Connection") == "close"
    ok = _request(tiny, "POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 1}))
    assert ok[0] == 200


def test_a_lone_surrogate_is_named_by_its_field(tiny):
    body = {"model": "tiny", "max_tokens": 1, "messages": [{"role": "user", "content": "ok"},
                                                           {"role": "user", "content": "cut \udc80"}]}
    status, _, raw = _request(tiny, "POST", "/v1/chat/completions", json.dumps(body))
    error = json.loads(raw)["error"]
    assert status == 400 and error["param"] == "messages" and "'messages'[1]['content']" in error["message"]
    assert "lone surrogate" in error["message"]
    paired = {"model": "tiny", "prompt": "an emoji \ud83d\ude00", "max_tokens": 1}  # a whole pair is text
    assert _request(tiny, "POST", "/v1/completions", json.dumps(paired))[0] == 200


def test_a_body_nested_too_deeply_to_walk_is_a_400(tiny):
    for depth in range(960, 1000, 3):  # where json.loads stops and the check's walk would
        body = '{"model": "tiny", "prompt": "x", "user": ' + "[" * depth + '"a"' + "]" * depth + "}"
        status, _, raw = _request(tiny, "POST", "/v1/completions", body)
        assert status == 400, (depth, raw)


def test_a_prompt_over_max_prompt_tokens_names_the_flag(tiny):
    engine = Engine(tiny.engine.model, tiny.engine.tokenizer, {"tiny": AS_LOADED}, tiny.engine.template,
                    Limits(max_prompt_tokens=8))
    side = Server(engine, "127.0.0.1", 0, log_requests=False).start()
    try:
        body = {"model": "tiny", "prompt": "hello " * 20, "max_tokens": 1}
        status, _, raw = _request(side, "POST", "/v1/completions", json.dumps(body))
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == "prompt" and error["code"] == "context_length_exceeded"
        assert "--max-prompt-tokens" in error["message"] and "up to 8" in error["message"]
        status, _, raw = _request(side, "POST", "/v1/completions", json.dumps({**body, "prompt": ["hi", "x " * 20]}))
        assert status == 400 and json.loads(raw)["error"]["param"] == "prompt[1]"
    finally:
        side.close()


def test_a_temperature_below_the_cut_off_is_greedy_and_above_it_samples():
    logits = torch.tensor([[1.0, 30.0, 29.9999, -5.0], [0.0, 0.0, 2.0, 1.0]])
    for temperature in (0.0, 1e-40, 1e-300, GREEDY_BELOW / 2):
        assert is_greedy(temperature)
        assert sample_next(logits, temperature).tolist() == [1, 2]
    assert not is_greedy(GREEDY_BELOW)
    generator = torch.Generator().manual_seed(0)
    # at the cut-off it still samples: finite, and 30 vs 29.9999 is e^10 : 1 there
    assert sample_next(logits, GREEDY_BELOW, generator=generator).tolist() in ([1, 2], [2, 2])
