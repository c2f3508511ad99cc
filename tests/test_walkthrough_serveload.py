"""`posttrain serve` under an evaluation harness or an RLAIF judge loop: several clients at once,
streamed and non-streamed requests side by side, a client that leaves mid-stream, a shutdown while
a request runs, and the odd values such loops send (a lone surrogate from a policy's reply,
an extreme temperature), against the README's Serving section ("Errors have OpenAI's JSON shape;
the server stays up after any bad request", "A client that disconnects mid-stream frees its row",
"A sampled request with a seed runs alone, so it is reproducible under load") and http.py's
promise that "every failure a client can cause becomes a JSON error in OpenAI's shape with a 4xx
status (a 5xx only for the server's own faults)".

Walked (the tiny preset served in-process on a free port, plain `http.client`): 16 greedy
completions of very different prompt lengths, 40 tokens each, at once give exactly the texts they
give one by one; max_tokens 0 / negative / huge, n > 1 greedy (n copies), temperature 0 with a seed,
an unknown model, malformed JSON, a form content type (accepted: the body is read as JSON),
/v1/models with a query string, HEAD and OPTIONS, a prompt past the positions, a client that
leaves a non-streamed request, and Ctrl-C (`posttrain serve` in a subprocess) while a 1000-token
stream runs: the stream ends with its finish chunk and [DONE], and the process exits 0. What
tests/test_serve.py, tests/test_walkthrough_serve.py, tests/test_feedback_serve_edges.py and
tests/test_walkthrough_lengths.py already pin (the malformed requests, concurrency of mixed
requests, seeds under load, a client leaving mid-stream frees its row, the context check) is not
repeated.

Right: greedy answers do not depend on their batch; a request that a client leaves mid-stream
does not change the answer of the request batched beside it; `close()` (what Ctrl-C calls) lets
the running stream finish and refuses the request queued behind it with a 503 in OpenAI's shape.
Wrong: a prompt, message or stop string holding a lone surrogate (what `json.dumps` sends for a
policy reply cut inside an emoji, as posttrain's own feedback client does) is a 500 "internal
error: TypeError" with a traceback on the server, which clients then retry as a server fault; a
temperature inside OpenAI's [0, 2] but below float32's range (1e-40) is a 500 "generation failed";
a list of prompts with one past the positions is refused without naming which, or the model's context.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 35: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest

torch = pytest.importorskip("torch")

from posttrain.serve import Limits, build_server  # noqa: E402
from posttrain.serve.engine import AS_LOADED, Engine  # noqa: E402
from posttrain.serve.http import Server  # noqa: E402

LIMITS = Limits(max_tokens=512, max_n=4)
GREEDY = {"model": "tiny", "temperature": 0, "repetition_penalty": 1.5}  # a random-init model repeats one token else


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 cores shared with other jobs
    server = build_server("tiny", port=0, log_requests=False, limits=LIMITS).start()
    yield server
    server.close()
    torch.set_num_threads(threads)


def _side_server(tiny, **engine_kwargs) -> Server:
    """A second server on the fixture's model (idle while this one runs), with its own engine settings."""
    base = tiny.engine
    engine = Engine(base.model, base.tokenizer, {"tiny": AS_LOADED}, base.template, LIMITS, **engine_kwargs)
    return Server(engine, "127.0.0.1", 0, log_requests=False).start()


def _connection(server, timeout: float = 120) -> http.client.HTTPConnection:
    host, port = server.httpd.server_address[:2]
    return http.client.HTTPConnection(host, port, timeout=timeout)


def _post(server, path: str, body) -> tuple[int, dict]:
    """(status, decoded JSON) of one request; the body is sent as `json.dumps` writes it (ASCII, escapes)."""
    connection = _connection(server)
    try:
        connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def _open_stream(server, body) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = _connection(server)
    connection.request("POST", "/v1/completions", json.dumps({**body, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    return connection, response


def _wait_for(condition, seconds: float = 60) -> None:
    """Poll `condition` (a state the test itself brings about) until it holds; fail after `seconds`."""
    tick = threading.Event()
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        tick.wait(0.005)
    raise AssertionError("the server never reached the expected state")


# --------------------------------------------------------------------------- defects


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "Judge this reply: ok \ud83d", "max_tokens": 2}),
    ("/v1/chat/completions", {"model": "tiny", "max_tokens": 2,
                              "messages": [{"role": "user", "content": "Which is better? A: fine \ud83d B: fine"}]}),
    ("/v1/completions", {"model": "tiny", "prompt": "hello", "stop": ["\udc80"], "max_tokens": 2}),
], ids=["prompt", "chat message", "stop"])
def test_a_lone_surrogate_in_the_text_is_a_client_error_not_a_500(tiny, path, body):
    """An RLAIF judge prompt quotes the policy's reply; a reply cut inside an emoji holds half a
    surrogate pair, which `json.dumps` (posttrain's feedback client, `requests`) sends as "\\ud83d".
    Measured: 500 {"message": "internal error: TypeError", "type": "server_error"} and a traceback
    on the server's stderr, from the Rust tokenizer refusing the string; a client retries a 5xx as
    the server's fault. Readers call such text a bad row (tests/test_s30_readers.py); the server
    should answer 400 invalid_request_error, and go on serving."""
    status, answer = _post(tiny, path, body)
    assert status == 400 and answer["error"]["type"] == "invalid_request_error", (status, answer)
    assert _post(tiny, "/v1/completions", {**GREEDY, "prompt": "hello", "max_tokens": 2})[0] == 200


def test_a_tiny_temperature_inside_openais_range_is_answered(tiny):
    """protocol.py accepts any temperature in OpenAI's [0, 2]. Measured at 1e-40: the sampler divides
    the float32 logits by it, they overflow to inf, and the batch fails: 500 "generation failed:
    ValueError: sampling probabilities contain inf or nan, or a row sums to 0", one more
    generation_errors in /health. A temperature that small is greedy in all but name (vLLM decodes
    below 1e-5 greedily); the answer should be the greedy one."""
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 6, "repetition_penalty": 1.5}
    errors = tiny.engine.snapshot()["generation_errors"]
    status, answer = _post(tiny, "/v1/completions", {**body, "temperature": 1e-40})
    assert status == 200, (status, answer, tiny.engine.snapshot()["generation_errors"] - errors)
    greedy = _post(tiny, "/v1/completions", {**body, "temperature": 0})[1]
    assert answer["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_a_too_long_prompt_in_a_batch_of_prompts_is_named_with_the_models_context(tiny):
    """lm-eval's completions backend sends its batch as one /v1/completions request with a list of
    prompts. One of them past the positions refuses the whole request (fine), but measured:
    {"message": "the prompt has 3301 tokens; the limit is 1023", "param": "prompt"}: neither which
    prompt (chat errors say messages[i]) nor where 1023 comes from (--max-prompt-tokens is 2048;
    it is the model's 1024 positions, less one), nor the fix, where the max_tokens check says "this
    model's context is 1024 tokens ... lower max_tokens or shorten the prompt"."""
    status, answer = _post(tiny, "/v1/completions", {**GREEDY, "prompt": ["hi", "hello " * 1100], "max_tokens": 2})
    error = answer["error"]
    assert status == 400 and error["code"] == "context_length_exceeded", answer
    assert "[1]" in f"{error['param']} {error['message']}" and "1024" in error["message"], error


# --------------------------------------------------------------------------- right, and untested


def test_a_client_leaving_mid_stream_does_not_change_the_answer_batched_beside_it(tiny):
    """Two requests in one batch (max_batch_size 2: the worker waits for the second); the streamed
    one's client shuts its socket after the first chunk. Its row stops early, and the other's
    answer is the one it gives alone: a request's output does not depend on what runs beside it."""
    neighbour = {**GREEDY, "prompt": "Reward models score answers", "max_tokens": 24}
    status, alone = _post(tiny, "/v1/completions", neighbour)
    assert status == 200
    side = _side_server(tiny, max_batch_size=2, batch_wait_s=60.0)
    try:
        connection, response = _open_stream(side, {**GREEDY, "prompt": "The cat sat on the mat", "max_tokens": 400})
        answers = []
        other = threading.Thread(target=lambda: answers.append(_post(side, "/v1/completions", neighbour)))
        other.start()
        assert response.readline().startswith(b"data: ")  # generating: the neighbour is in the batch
        connection.sock.shutdown(socket.SHUT_RDWR)
        connection.close()
        other.join(timeout=120)
        status, beside = answers[0]
        assert status == 200 and beside["choices"] == alone["choices"]
        _wait_for(lambda: side.engine.pending() == 0)  # the batch is counted once it ends
        stats = side.engine.snapshot()
        assert stats["batches"] == 1 and stats["rows"] == 2  # they really shared one batch
        print(f"\nleaver + neighbour: {stats['completion_tokens']} tokens generated (400 + 24 asked)")
        assert stats["completion_tokens"] < 400  # the leaver's row stopped well before its 400 tokens
    finally:
        side.close()


def test_close_lets_the_running_stream_finish_and_refuses_the_queued_request(tiny):
    """What Ctrl-C runs (`Server.close`): the stream that is generating ends normally (its finish
    chunk, then [DONE]), the request queued behind it gets 503 in OpenAI's shape, and the port is
    closed."""
    side = _side_server(tiny)
    host, port = side.httpd.server_address[:2]
    try:
        connection, response = _open_stream(side, {**GREEDY, "prompt": "Once upon a time", "max_tokens": 400})
        assert response.readline().startswith(b"data: ")  # the stream is generating
        queued = []
        waiter = threading.Thread(target=lambda: queued.append(
            _post(side, "/v1/completions", {**GREEDY, "prompt": "hello", "max_tokens": 4})))
        waiter.start()
        _wait_for(lambda: side.engine.pending() == 2)  # the second request is queued behind the stream
    except BaseException:
        side.close()
        raise
    side.close()
    rest = response.read().decode()
    connection.close()
    waiter.join(timeout=120)
    events = [e for e in rest.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    status, answer = queued[0]
    assert status == 503 and answer["error"]["type"] == "server_error", answer
    assert "shutting down" in answer["error"]["message"]
    with pytest.raises(OSError):
        socket.create_connection((host, port), timeout=5).close()
