"""A security and secrets walk, as a platform engineer reviews a training tool before letting a team use
it: where an API key goes (config.yaml, run.json, logs, report.json / report.md, the HTTP requests
themselves), what can run code (pickles, YAML tags, remote code, chat templates, reward functions),
where posttrain writes and deletes, and what `posttrain serve` answers to clients it should not trust.

The brief's rules: "safetensors, no pickle; `trust_remote_code` only on explicit request"; configs
validated up front. README, AI feedback: `api_key_env` is "the *name* of the environment variable with
the key ... the key is never written anywhere"; Serving: `--api-key-env VAR` "requires `Authorization:
Bearer` on `/v1/*`".

No real network: OpenAI-compatible endpoints are the suite's scripted loopback server
(`tests/feedback_fixture.py`), and a second loopback address (127.0.0.2) stands for another host.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 30: each asserts
the right behaviour); the others pin behaviour that was right but had no test."""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from posttrain.errors import UserError
from tests.cli_runner import run_cli
from tests.feedback_fixture import Scripted

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-proj-Walkthrough7SecretKey0123"  # what a hosted API key looks like
HELLO = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


def _files_holding(directory: Path, secret: str) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*")
                  if p.is_file() and secret.encode() in p.read_bytes())


class _Recorder:
    """Any GET or POST answered with a chat completion; every request's (method, headers) kept.
    Bound to 127.0.0.2: another host than the scripted endpoint's 127.0.0.1."""

    def __init__(self):
        self.seen: list[tuple[str, dict]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self):
                recorder.seen.append((self.command, dict(self.headers)))
                data = json.dumps({"choices": [{"message": {"role": "assistant", "content": "from elsewhere"},
                                                "finish_reason": "stop"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _answer

            def log_message(self, *args):
                pass

        try:
            self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        except OSError:  # a system without the whole 127/8 on loopback (macOS)
            pytest.skip("127.0.0.2 is not a loopback address here")
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.2:{self.server.server_address[1]}"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def tiny_server():
    """`posttrain serve tiny` on loopback without a key, as the README's first command starts it."""
    from posttrain.serve import build_server

    server = build_server("tiny", port=0, log_requests=False).start()
    yield server
    server.close()


def _request(server, method: str, path: str, body: dict | None = None, headers: dict | None = None):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode()
    finally:
        connection.close()


# --------------------------------------------------------------------------- defects


def test_a_redirect_to_another_host_does_not_receive_the_api_key():
    """README: a backend takes "the *name* of the environment variable with the key (... the key is never
    written anywhere)". An endpoint (or anything in front of it) that answers 302 with a Location on
    another host got the key: observed `Authorization: Bearer sk-...` at 127.0.0.2, the POST turned into a
    GET, and that host's answer taken as the judge's reply. requests and httpx drop Authorization on a
    redirect to another host; a POST to /chat/completions has no legitimate redirect."""
    from posttrain.feedback.client import OpenAICompatible

    with _Recorder() as elsewhere:
        moved = (302, {"Location": elsewhere.url + "/v1/chat/completions"}, b"")
        with Scripted(lambda body: moved) as endpoint:
            backend = OpenAICompatible(endpoint.url, "judge", api_key=KEY, max_retries=0, sleep=lambda s: None)
            try:
                backend.chat(HELLO)
            except UserError:
                pass  # refusing the redirect is right too
            assert endpoint.requests[0][2]["Authorization"] == f"Bearer {KEY}"  # the endpoint itself gets it
        leaked = [headers for _, headers in elsewhere.seen if KEY in json.dumps(headers)]
    assert leaked == []


@pytest.mark.parametrize("command, example, setting", [
    ("rlaif", "examples/rlaif.yaml", "policy.api_key_env"),
    ("redteam", "examples/redteam.yaml", "target.api_key_env"),
])
def test_a_key_given_where_the_variable_name_goes_is_refused_and_never_written(capsys, tmp_path, command, example,
                                                                               setting):
    """The setting is named `api_key_env` where most tools take `api_key`, and the natural slip is the key
    itself: `policy.api_key_env=sk-proj-...`. Observed: no Authorization sent, an HTTP 401 after the run
    started ("check the API key variable, *.api_key_env"), and the key in RUN/config.yaml, which is shared
    with the run. A name that cannot be an environment variable (`sk-proj-...` has hyphens) should stop
    the run before any request or file, naming the setting and not echoing the value."""
    out = tmp_path / "run"
    denied = (401, {}, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
    with Scripted(lambda body: denied) as server:
        extra = ([f"policy.base_url={server.url}", f"judge.base_url={server.url}", "data.limit=1"]
                 if command == "rlaif" else
                 ["target.kind=openai", f"target.base_url={server.url}", "probes.limit=1", "attacks.names=[direct]"])
        rc, text = run_cli(capsys, command, example, f"output_dir={out}", *extra, f"{setting}={KEY}")
        sent = len(server.requests)
    assert rc == 2 and setting in text and sent == 0
    assert KEY not in text
    assert not out.exists() or _files_holding(out, KEY) == []


def test_health_without_the_key_does_not_name_the_served_models():
    """README: "`GET /health` (queue length and batching counters; no key needed)" and "`--api-key-env VAR`
    requires `Authorization: Bearer` on `/v1/*`", so `GET /v1/models` answers 401 without the key. Observed:
    /health answers anyone `"models": ["/home/alice/projects/acme-support/runs/sft"]` — what /v1/models
    guards, and a local path (the default served name is MODEL as given on the command line)."""
    from posttrain.serve import build_server

    name = "/home/alice/projects/acme-support/runs/sft"
    server = build_server("tiny", served_model_name=name, api_key="serve-key", port=0, log_requests=False).start()
    try:
        models_status, _ = _request(server, "GET", "/v1/models")
        status, body = _request(server, "GET", "/health")
    finally:
        server.close()
    assert models_status == 401
    assert name not in body, (status, body)


def test_loopback_server_refuses_a_request_for_another_host_name(tiny_server):
    """The default `--host 127.0.0.1` and the warning for another host without a key say the key-less
    server is meant for this machine only. A browser page on attacker.example whose DNS name is rebound to
    127.0.0.1 sends `Host: attacker.example:PORT` (and its Origin): observed 200 with the completion, which
    the page may read (same origin to the browser). Ollama (CVE-2024-28224) and Jupyter answer such
    requests with 403 unless the Host is a loopback name or explicitly allowed."""
    port = tiny_server.httpd.server_address[1]
    status, body = _request(tiny_server, "POST", "/v1/completions",
                            {"model": "tiny", "prompt": "hello", "max_tokens": 2},
                            {"Host": f"attacker.example:{port}", "Origin": f"http://attacker.example:{port}",
                             "Content-Type": "text/plain;charset=UTF-8"})
    assert 400 <= status < 500 and "choices" not in body, (status, body)


def test_demo_does_not_delete_a_directory_it_did_not_write(tmp_path, monkeypatch):
    """`posttrain demo --output-dir ~/work` (or `.`) deleted the whole directory, the user's files with it,
    before training began: `shutil.rmtree(cfg.output_dir)  # the demo always starts from scratch`. It
    should clear only a directory an earlier demo wrote (its config.yaml / summary.json), and otherwise
    refuse, or train beside the files without removing them."""
    import posttrain.train.sft as sft

    mine = tmp_path / "work"
    (mine / "notes").mkdir(parents=True)
    (mine / "notes" / "todo.txt").write_text("not posttrain's")

    class Started(Exception):
        pass

    def started(cfg):
        raise Started

    monkeypatch.setattr(sft, "run_sft", started)  # stop where training would begin
    from posttrain.demo import run_demo

    with pytest.raises((Started, UserError)):
        run_demo(str(mine))
    assert (mine / "notes" / "todo.txt").read_text() == "not posttrain's"


# --------------------------------------------------------------------------- right, and now tested


def test_redteam_keys_of_target_judge_and_attacker_are_sent_and_written_nowhere(capsys, tmp_path, monkeypatch):
    """README: the key is "never written anywhere". A red-team run with all three HTTP backends keyed
    (target, LLM judge, PAIR attacker) sends each its own variable's key, and no file of the run holds
    either key: config.yaml records the variables' names."""
    monkeypatch.setenv("WALK_TARGET_KEY", KEY)
    monkeypatch.setenv("WALK_HELPER_KEY", KEY + "-helper")

    def respond(body):
        return {"target": "Sure, here is how.", "judge": "LABEL: full_compliance",
                "attacker": "IMPROVEMENT: none\nPROMPT: please explain"}[body["model"]]

    out = tmp_path / "rt"
    with Scripted(respond) as server:
        rc, text = run_cli(capsys, "redteam", "examples/redteam.yaml", f"output_dir={out}", "probes.limit=1",
                           "attacks.names=[direct]", "target.kind=openai", "target.model=target",
                           f"target.base_url={server.url}", "target.api_key_env=WALK_TARGET_KEY",
                           "classifier=judge", "judge.kind=openai", "judge.model=judge", f"judge.base_url={server.url}",
                           "judge.api_key_env=WALK_HELPER_KEY", "attacks.pair.enabled=true", "attacks.pair.rounds=1",
                           "attacks.pair.attacker.kind=openai", "attacks.pair.attacker.model=attacker",
                           f"attacks.pair.attacker.base_url={server.url}",
                           "attacks.pair.attacker.api_key_env=WALK_HELPER_KEY")
        keys = {(body["model"], headers.get("Authorization")) for _, body, headers in server.requests}
    assert rc == 0, text
    assert keys == {("target", f"Bearer {KEY}"), ("judge", f"Bearer {KEY}-helper"),
                    ("attacker", f"Bearer {KEY}-helper")}
    assert KEY not in text
    assert {"config.yaml", "responses.jsonl", "report.json", "report.md"} <= {p.name for p in out.iterdir()}
    assert _files_holding(out, KEY) == []
    assert "WALK_TARGET_KEY" in (out / "config.yaml").read_text()


@pytest.mark.parametrize("where", ["config", "attacks_file", "constitution"])
def test_yaml_python_tags_are_refused_without_running_anything(capsys, tmp_path, where):
    """Every YAML posttrain reads is read with a SafeLoader: a `!!python/object/apply` tag in a config, an
    attacks file or a constitution stops the run with exit 2, and its command never runs."""
    marker = tmp_path / "ran"
    evil = f"!!python/object/apply:os.system ['touch {marker}']"
    if where == "config":
        config = tmp_path / "sft.yaml"
        config.write_text(f"output_dir: {evil}\n")
        argv = ["sft", config]
    elif where == "attacks_file":
        attacks = tmp_path / "attacks.yaml"
        attacks.write_text(f"- name: evil\n  template: {evil}\n")
        argv = ["redteam", "examples/redteam.yaml", f"output_dir={tmp_path / 'rt'}", f"attacks.file={attacks}"]
    else:
        principles = tmp_path / "principles.yaml"
        principles.write_text(f"- name: evil\n  critique: {evil}\n  revision: x\n")
        argv = ["constitutional", "examples/constitutional.yaml", f"output_dir={tmp_path / 'cai'}",
                f"constitutional.constitution={principles}", "policy.kind=openai",
                "policy.base_url=http://127.0.0.1:9/v1"]
    rc, text = run_cli(capsys, *argv)
    assert rc == 2 and "python/object" in text and "\n" not in text.strip()
    assert not marker.exists()


def test_serve_listens_on_loopback_unless_told_and_warns_without_a_key(capsys, monkeypatch):
    """`posttrain serve MODEL` binds 127.0.0.1 by default; every interface without a key is said."""
    import posttrain.serve as serve
    from posttrain.cli import build_parser

    args = build_parser().parse_args(["serve", "tiny"])
    assert args.host == "127.0.0.1" and args.api_key_env is None
    bound = {}

    class Stopped:
        engine = type("E", (), {"targets": {"tiny": None}})()
        url = "http://0.0.0.0:8000"

        def serve_forever(self):
            raise KeyboardInterrupt

        def close(self):
            pass

    def fake_build(model, **kwargs):
        bound.update(kwargs)
        return Stopped()

    monkeypatch.setattr(serve, "build_server", fake_build)
    assert serve.main(build_parser().parse_args(["serve", "tiny", "--host", "0.0.0.0"])) == 0
    assert bound["host"] == "0.0.0.0" and bound["api_key"] is None
    assert "without an API key; anyone who can reach it can use it" in capsys.readouterr().err


def test_serve_refuses_huge_max_tokens_and_hides_its_internals(tiny_server):
    """A request for 10^9 tokens is a 400 naming the limit, never a queued generation; a malformed body
    is a 400 whose message names no local path or traceback."""
    status, body = _request(tiny_server, "POST", "/v1/chat/completions",
                            {"model": "tiny", "messages": HELLO, "max_tokens": 10**9})
    assert status == 400 and "between 1 and 512" in body
    host, port = tiny_server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=30)
    connection.request("POST", "/v1/completions", body=b'{"model": "tiny", "prompt": [' * 5000,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    assert response.status == 400 and "Traceback" not in text and "/src/" not in text and str(ROOT) not in text
