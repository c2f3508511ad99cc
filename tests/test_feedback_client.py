"""Chat backends: the OpenAI-compatible client against a scripted loopback endpoint (request
body, API key, token counts, retries on 429 / 5xx / timeouts / refused connections, Retry-After,
fail-at-once on other 4xx, the shared rate limit) and the in-process local model."""

from __future__ import annotations

import email.utils
import random
import socket
import threading
import time

import pytest

from posttrain.config import BackendConfig
from posttrain.feedback.client import (BackendError, LocalModel, OpenAICompatible, RateLimiter, backoff_delay,
                                       estimate_tokens, make_backend, parse_retry_after)
from tests.feedback_fixture import Scripted

HELLO = [{"role": "user", "content": "Say hello"}]


def client(url: str, **kwargs) -> OpenAICompatible:
    sleeps: list[float] = []
    kwargs.setdefault("sleep", sleeps.append)
    backend = OpenAICompatible(url, "judge-model", **kwargs)
    backend.sleeps = sleeps  # what it waited, without waiting
    return backend


def script(*answers):
    """A respond function that gives `answers` in turn, then repeats the last."""
    queue = list(answers)

    def respond(body):
        return queue.pop(0) if len(queue) > 1 else queue[0]

    return respond


def test_request_body_key_from_the_environment_and_token_counts(monkeypatch):
    monkeypatch.setenv("TEST_FEEDBACK_KEY", "sk-secret")
    with Scripted(lambda body: "hello there") as endpoint:
        backend = make_backend(BackendConfig(base_url=endpoint.url + "/", model="m1", api_key_env="TEST_FEEDBACK_KEY",
                                             max_tokens=7, temperature=0.5, seed=3))
        reply = backend.chat(HELLO, seed=11)
        _, body, headers = endpoint.requests[0]
    assert body == {"model": "m1", "messages": HELLO, "max_tokens": 7, "temperature": 0.5, "seed": 11}
    assert headers["Authorization"] == "Bearer sk-secret"
    assert "sk-secret" not in repr(backend) and "sk-secret" not in repr(vars(backend).get("usage"))
    assert (reply.text, reply.finish_reason) == ("hello there", "stop")
    assert (reply.prompt_tokens, reply.completion_tokens) == (2, 2)  # the scripted server counts words
    assert backend.usage.snapshot() == {"requests": 1, "retries": 0, "failures": 0, "prompt_tokens": 2,
                                        "completion_tokens": 2, "estimated": 0}


def test_no_key_variable_sends_no_authorization_and_missing_usage_is_estimated(monkeypatch):
    monkeypatch.delenv("TEST_FEEDBACK_KEY", raising=False)
    with Scripted(lambda body: "x" * 40, usage=False) as endpoint:
        backend = make_backend(BackendConfig(base_url=endpoint.url, api_key_env="TEST_FEEDBACK_KEY"))
        reply = backend.chat(HELLO)
        headers = endpoint.requests[0][2]
    assert "Authorization" not in headers
    assert reply.completion_tokens == estimate_tokens("x" * 40) == 10
    assert backend.usage.estimated == 1


def test_429_with_retry_after_is_honoured_then_succeeds():
    limited = (429, {"Retry-After": "2"}, {"error": {"message": "Rate limit reached", "type": "requests"}})
    with Scripted(script(limited, "ok")) as endpoint:
        backend = client(endpoint.url, backoff_s=0.01)
        assert backend.chat(HELLO).text == "ok"
    assert backend.sleeps == [2.0]
    assert len(endpoint.requests) == 2 and backend.usage.retries == 1 and backend.usage.requests == 1


def test_5xx_twice_then_success_backs_off_exponentially():
    error = (500, {}, {"error": {"message": "boom"}})
    with Scripted(script(error, (503, {}, b"<html>down</html>"), "ok")) as endpoint:
        backend = client(endpoint.url, backoff_s=1.0, rng=random.Random(0))
        assert backend.chat(HELLO).text == "ok"
    assert len(endpoint.requests) == 3 and backend.usage.retries == 2
    first, second = backend.sleeps
    assert 0.5 <= first <= 1.5 and 1.0 <= second <= 3.0  # base · 2^attempt · U(0.5, 1.5)


def test_400_fails_at_once_with_the_servers_message_on_one_line():
    bad = (400, {}, {"error": {"message": "max_tokens is too large:\n 9999 > 512", "param": "max_tokens"}})
    with Scripted(script(bad, "never")) as endpoint:
        backend = client(endpoint.url)
        with pytest.raises(BackendError) as info:
            backend.chat(HELLO)
    message = str(info.value)
    assert "HTTP 400" in message and "max_tokens is too large: 9999 > 512" in message and "\n" not in message
    assert info.value.status == 400 and len(endpoint.requests) == 1 and backend.usage.failures == 1
    assert backend.sleeps == []


def test_401_names_the_key_variable():
    with Scripted(lambda body: (401, {}, {"error": {"message": "Incorrect API key provided"}})) as endpoint:
        with pytest.raises(BackendError, match="HTTP 401: Incorrect API key provided.*api_key_env"):
            client(endpoint.url).chat(HELLO)


def test_retries_run_out_with_the_last_error():
    with Scripted(lambda body: (502, {}, {"error": {"message": "bad gateway"}})) as endpoint:
        backend = client(endpoint.url, max_retries=2, backoff_s=0.0)
        with pytest.raises(BackendError, match=r"gave up after 2 retries; last error: HTTP 502: bad gateway"):
            backend.chat(HELLO)
    assert len(endpoint.requests) == 3 and backend.usage.snapshot()["failures"] == 1


def test_refused_connection_and_a_timeout_are_retried():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = client(f"http://127.0.0.1:{port}/v1", max_retries=1)
    with pytest.raises(BackendError, match="cannot connect"):
        backend.chat(HELLO)
    assert backend.usage.retries == 1

    calls = []

    def slow_once(body):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)
        return "late but fine"

    with Scripted(slow_once) as endpoint:
        backend = client(endpoint.url, timeout_s=0.2, backoff_s=0.0)
        assert backend.chat(HELLO).text == "late but fine"
    assert backend.usage.retries >= 1 and backend.usage.failures == 0


def test_a_reply_without_choices_is_an_error_not_a_crash():
    with Scripted(lambda body: (200, {}, {"object": "chat.completion", "choices": []})) as endpoint:
        with pytest.raises(BackendError, match=r"no choices\[0\]\.message\.content"):
            client(endpoint.url).chat(HELLO)


def test_rate_limit_spaces_requests_across_threads():
    rate = 20.0
    with Scripted(lambda body: "ok") as endpoint:
        backend = OpenAICompatible(endpoint.url, "m", requests_per_second=rate)
        start = time.monotonic()
        threads = [threading.Thread(target=lambda: [backend.chat(HELLO) for _ in range(3)]) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        arrivals = sorted(t for t, _, _ in endpoint.requests)
    assert len(arrivals) == 9
    # The first goes at once, then one every 1/rate seconds: the last cannot arrive before 8/rate
    # (the server runs in this process, on the same clock); unlimited, all 9 take a few ms.
    assert arrivals[-1] - start >= 8 / rate * 0.99 and elapsed >= 8 / rate * 0.99
    gaps = sorted(b - a for a, b in zip(arrivals, arrivals[1:]))
    assert gaps[len(gaps) // 2] > 0.5 / rate  # spaced out, not sent in a burst after a wait


def test_rate_limiter_token_bucket_arithmetic():
    now = [0.0]
    waits = []
    limiter = RateLimiter(2.0, burst=2, clock=lambda: now[0], sleep=waits.append)
    assert [limiter.acquire() for _ in range(4)] == [0.0, 0.0, 0.5, 1.0]  # burst of 2, then reservations
    now[0] = 10.0  # long idle: the bucket refills to the burst size, no more
    assert [limiter.acquire() for _ in range(3)] == [0.0, 0.0, 0.5]
    assert waits == [0.5, 1.0, 0.5]


def test_retry_after_and_backoff_helpers():
    assert parse_retry_after("3") == 3.0 and parse_retry_after(" 0.5 ") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    date = email.utils.formatdate(1_000_030, usegmt=True)
    assert parse_retry_after(date, now=1_000_000) == pytest.approx(30.0)
    assert parse_retry_after("-5") == 0.0
    rng = random.Random(0)
    delays = [backoff_delay(attempt, 1.0, rng) for attempt in range(10)]
    assert all(min(60.0, 0.5 * 2**a) <= d <= min(60.0, 1.5 * 2**a) for a, d in enumerate(delays))
    assert delays[-1] == 60.0


@pytest.fixture(scope="module")
def local():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    return make_backend(BackendConfig(kind="local", model="tiny", max_tokens=12, temperature=0.0))


def test_local_model_counts_tokens_exactly_and_is_deterministic_greedy(local):
    assert isinstance(local, LocalModel) and local.model_name == "tiny"
    reply = local.chat(HELLO)
    text = local.tokenizer.apply_chat_template(HELLO, chat_template=local.template, tokenize=False,
                                               add_generation_prompt=True)
    assert reply.prompt_tokens == len(local.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert 1 <= reply.completion_tokens <= 12
    assert reply.finish_reason == ("length" if reply.completion_tokens == 12 else "stop")
    assert local.chat(HELLO).text == reply.text


def test_local_model_is_shared_safely_by_threads(local):
    prompts = [[{"role": "user", "content": f"Copy: {c} {c}"}] for c in "abcdef"]
    alone = [local.chat(p, temperature=1.0, seed=5, max_tokens=6).text for p in prompts]
    together: dict[int, str] = {}

    def ask(i):
        together[i] = local.chat(prompts[i], temperature=1.0, seed=5, max_tokens=6).text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(prompts))] == alone
    assert local.usage.requests >= 2 * len(prompts) + 2
