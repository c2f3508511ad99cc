"""`posttrain serve`: the key's variable name, the loopback Host / Origin check, /health with a key,
exact streaming with a byte-fallback tokenizer, completions decoded after the prompt, logprobs 0."""

from __future__ import annotations

import http.client
import json

import pytest

from tests.test_feedback_serve_edges import _post

torch = pytest.importorskip("torch")

from posttrain.serve import Limits, build_server  # noqa: E402
from posttrain.serve.http import Server  # noqa: E402
from tests.cli_runner import run_cli  # noqa: E402

KEY = "sk-proj-Serve7SecretKey0123"


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(one_thread):
    server = build_server("tiny", port=0, log_requests=False, limits=Limits(max_tokens=64),
                          allowed_hosts=("proxy.example",)).start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def llama2(one_thread, tmp_path_factory):
    from tests.test_walkthrough_tokenizers import build_family

    directory = build_family("llama2", tmp_path_factory.mktemp("s30_serve") / "model")
    server = build_server(str(directory), served_model_name="m", port=0, log_requests=False,
                          limits=Limits(max_tokens=64)).start()
    yield server
    server.close()


def _request(server, method, path, body=None, headers=None):
    status, text, _ = _post(server, path, body, headers, method)
    return status, text


def _streamed(text: str) -> list[str]:
    pieces: dict[int, str] = {}
    for event in text.split("\n\n"):
        if event.startswith("data: {"):
            for choice in json.loads(event[len("data: "):])["choices"]:
                piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
                pieces[choice["index"]] = pieces.get(choice["index"], "") + (piece or "")
    return [pieces[i] for i in sorted(pieces)]


def _texts(text: str) -> list[str]:
    return [c["message"]["content"] if "message" in c else c["text"] for c in json.loads(text)["choices"]]


@pytest.mark.parametrize("value", [KEY, "", "MY-KEY", "1ABC", "KEY NAME"])
def test_api_key_env_refuses_a_value_that_is_not_a_variable_name_without_echoing_it(capsys, value):
    rc, text = run_cli(capsys, "serve", "tiny", "--api-key-env", value)
    assert rc == 2 and "--api-key-env takes the NAME" in text and len(text.strip().splitlines()) == 1
    if value:
        assert value not in text


@pytest.mark.parametrize("host, origin, status", [
    ("localhost:{port}", None, 200), ("LOCALHOST", None, 200), ("127.0.0.7:{port}", None, 200),
    ("[::1]:{port}", "http://[::1]:3000", 200), ("127.0.0.1:{port}", "http://localhost:5173", 200),
    ("proxy.example", "https://proxy.example", 200), ("proxy.example:8443", None, 200),
    ("attacker.example:{port}", None, 403), ("localhost.attacker.example", None, 403),
    ("127.0.0.1.nip.io:{port}", None, 403), ("127.0.0.1:{port}", "http://attacker.example", 403),
    ("127.0.0.1:{port}", "null", 403),
])
def test_loopback_server_answers_only_loopback_and_allowed_names(tiny, host, origin, status):
    port = tiny.httpd.server_address[1]
    headers = {"Host": host.format(port=port), **({"Origin": origin} if origin else {})}
    got, body = _request(tiny, "POST", "/v1/completions", {"model": "tiny", "prompt": "hi", "max_tokens": 1}, headers)
    assert got == status, body
    if status == 403:
        error = json.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"} and "--allowed-host" in error["message"]
        assert _request(tiny, "GET", "/health", None, headers)[0] == 403


def test_a_server_bound_beyond_loopback_does_not_check_the_host(tiny):
    server = Server(tiny.engine, "0.0.0.0", 0, log_requests=False).start()
    try:
        assert not server.loopback
        host = http.client.HTTPConnection("127.0.0.1", server.httpd.server_address[1], timeout=60)
        host.request("GET", "/health", headers={"Host": "anything.example"})
        assert host.getresponse().status == 200
        host.close()
    finally:
        server.close(close_engine=False)


def test_health_names_the_models_to_a_request_with_the_key(tiny):
    server = Server(tiny.engine, "127.0.0.1", 0, api_key="serve-key", log_requests=False).start()
    try:
        _, anonymous = _request(server, "GET", "/health")
        _, keyed = _request(server, "GET", "/health", headers={"Authorization": "Bearer serve-key"})
    finally:
        server.close(close_engine=False)
    assert "models" not in json.loads(anonymous) and json.loads(anonymous)["status"] == "ok"
    assert json.loads(keyed)["models"] == ["tiny"]
    assert json.loads(_request(tiny, "GET", "/health")[1])["models"] == ["tiny"]  # no key configured


@pytest.mark.parametrize("path, body", [
    ("/v1/completions", {"model": "tiny", "prompt": "hi", "logprobs": 0}),
    ("/v1/chat/completions", {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "logprobs": 0}),
])
def test_logprobs_zero_is_refused(tiny, path, body):
    status, text = _request(tiny, "POST", path, body)
    assert status == 400 and json.loads(text)["error"]["param"] == "logprobs"


def test_byte_fallback_streams_add_up_on_both_routes_with_stops(llama2):
    """Many seeds and prompts with rare characters (byte tokens), chat and completions, with and without a
    stop string cut from the middle of the answer: streamed == non-streamed, every time."""
    cases = []
    for seed in range(6):
        for prompt in ("Grüße 北京", "naïve café ✓", "The cat sat"):
            cases.append(("/v1/chat/completions", {"messages": [{"role": "user", "content": prompt}]}, seed))
            cases.append(("/v1/completions", {"prompt": prompt}, seed))
    for path, body, seed in cases:
        body = {"model": "m", **body, "max_tokens": 24, "temperature": 1.0, "n": 2, "seed": seed}
        status, text = _request(llama2, "POST", path, body)
        assert status == 200
        plain = _texts(text)
        if seed % 2 and len(plain[0]) > 8:
            body["stop"] = [plain[0][4:7]]
            plain = _texts(_request(llama2, "POST", path, body)[1])
        status, text = _request(llama2, "POST", path, {**body, "stream": True})
        assert status == 200 and _streamed(text) == plain, (path, body)


def test_completion_stop_string_matches_the_leading_space(llama2):
    """The continuation keeps the space its first "▁" token carries, so a stop string starting with that
    space matches, and prompt + text reads as the model wrote it."""
    body = {"model": "m", "prompt": "The cat sat", "max_tokens": 8, "temperature": 0}
    text = _texts(_request(llama2, "POST", "/v1/completions", body)[1])[0]
    assert text.startswith(" ")
    stop = text[:3]
    assert _texts(_request(llama2, "POST", "/v1/completions", {**body, "stop": [stop]})[1]) == [""]
    status, streamed = _request(llama2, "POST", "/v1/completions", {**body, "stream": True})
    assert _streamed(streamed) == [text]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_stream_holds_a_space_that_decodes_clean_up_may_still_remove(kind):
    """A tokenizer whose decode cleans up spaces (" n't" -> "n't", " ." -> "."; Llama-3's config asks for it,
    and transformers before 5 honours it) rewrites text behind the streamed end: "do n" then "don't"."""
    from posttrain.data.templates import CHATML
    from posttrain.models.presets import IM_END, build_tokenizer
    from posttrain.serve.engine import AS_LOADED, Engine
    from posttrain.serve.protocol import Request
    from tests.test_s29_generation import Scripted

    tokenizer = build_tokenizer()
    tokenizer.clean_up_tokenization_spaces = True
    tokenizer.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # transformers 5
    pieces = ["do", " ", "n", "'t", " go", " ", ".", " ok", " ", ",", IM_END]
    script = [i for piece in pieces for i in tokenizer(piece, add_special_tokens=False)["input_ids"]]
    engine = Engine(Scripted(script, len(tokenizer)), tokenizer, {"m": AS_LOADED}, CHATML, Limits())

    def answer(stream: bool) -> str:
        fields = {"messages": [{"role": "user", "content": "a"}]} if kind == "chat" else {"prompts": ["a"]}
        job = engine.submit(Request(kind=kind, model="m", max_tokens=20, temperature=0.0, stream=stream, **fields))
        text = ""
        while (event := job.events.get(timeout=30))[0] != "end":
            text += event[2]
        return text + event[2]

    try:
        assert answer(stream=True) == answer(stream=False) == "don't go. ok,"
    finally:
        engine.close()
