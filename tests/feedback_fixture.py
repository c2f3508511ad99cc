"""A scripted OpenAI-compatible endpoint for the feedback tests: a stdlib HTTP server on a free
loopback port whose answers a Python function decides, and judges with known preferences."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from posttrain.feedback.judge import RESPONSE_END, RESPONSE_START


class Scripted:
    """POST /v1/chat/completions answered by `respond(body)`, which returns the reply text, or
    (status, headers, body) to answer with something else (an error, a Retry-After, ...).
    Every request is kept in `.requests` as (arrival time, decoded body, headers)."""

    def __init__(self, respond, *, usage: bool = True, delay_s: float = 0.0):
        self.respond, self.usage, self.delay_s = respond, usage, delay_s
        self.requests: list[tuple[float, dict, dict]] = []
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with scripted.lock:
                    scripted.requests.append((time.monotonic(), body, dict(self.headers)))
                if scripted.delay_s:
                    time.sleep(scripted.delay_s)
                answer = scripted.respond(body)
                if isinstance(answer, str):
                    answer = (200, {}, scripted.completion(body, answer))
                status, headers, payload = answer
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def completion(self, body: dict, text: str) -> dict:
        out = {"id": "chatcmpl-test", "object": "chat.completion", "model": body.get("model"),
               "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}
        if self.usage:
            prompt = sum(len(m["content"].split()) for m in body["messages"])
            out["usage"] = {"prompt_tokens": prompt, "completion_tokens": len(text.split()),
                            "total_tokens": prompt + len(text.split())}
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Scripted":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shown_responses(body: dict) -> tuple[str, str]:
    """The two responses a judge request shows, as (A, B)."""
    text = next(m["content"] for m in body["messages"] if RESPONSE_START.format(slot="A") in m["content"])
    found = []
    for slot in ("A", "B"):
        start, end = re.escape(RESPONSE_START.format(slot=slot)), re.escape(RESPONSE_END.format(slot=slot))
        found.append(re.search(f"{start}\n(.*?)\n{end}", text, re.S).group(1))
    return found[0], found[1]


def longer_is_better(a: str, b: str) -> str:
    """The known preference of the scripted judges: the longer text; equal lengths tie."""
    return "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"


def is_biased(a: str, b: str, fraction: float) -> bool:
    """Whether a position-biased judge ignores this pair's content (the same in both orders)."""
    digest = hashlib.sha256("\x00".join(sorted([a, b])).encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def judge_reply(verdict: str) -> str:
    # Mentions of A and B before the verdict line, as real judges write them.
    return (f"Response A and Response B both try. A is clear; B is also readable.\n\n"
            f"**Verdict:** {verdict}")


def preference_judge(bias: float = 0.0, prefer=longer_is_better):
    """A respond function: judges by `prefer`, except that on a `bias` fraction of pairs it
    answers "A" whatever the order (a judge that picks the first slot)."""
    def respond(body: dict) -> str:
        a, b = shown_responses(body)
        return judge_reply("A" if is_biased(a, b, bias) else prefer(a, b))

    return respond
