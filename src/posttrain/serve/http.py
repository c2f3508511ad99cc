"""The HTTP layer: routes, the loopback Host check, API key, body limits, JSON and server-sent events.

Standard library only: `ThreadingHTTPServer` gives each connection a thread; those threads
only parse, validate and wait, while the engine's single worker thread runs the model.
Every failure a client can cause becomes a JSON error in OpenAI's shape with a 4xx status
(a 5xx only for the server's own faults), and the connection is closed whenever part of
a request body was left unread, so a bad request can never poison the next one.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import queue
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

from posttrain.serve.engine import Engine, Job
from posttrain.serve.protocol import (
    APIError,
    chunk_body,
    completion_body,
    new_id,
    parse_request,
    usage,
    usage_chunk,
)

_POST_ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion"}
_GET_ROUTES = {"/v1/models", "/health"}
_DRAIN_BYTES = 16 << 20  # a refused body up to this size is read and dropped; a larger one closes the connection
_LINGER_S = 10.0  # after answering, how long a closing connection still reads what the client sends (`_linger`)


class Server:
    """The engine behind an HTTP server on (host, port); port 0 picks a free one."""

    def __init__(self, engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 request_timeout_s: float = 600.0, log_requests: bool = True, allowed_hosts: tuple[str, ...] = ()):
        self.engine, self.api_key, self.request_timeout_s = engine, api_key, request_timeout_s
        self.log_requests = log_requests  # one access-log line per request on stderr
        self.started = time.time()
        self.httpd = _HTTPServer((host, port), _Handler)
        self.httpd.app = self
        # Bound to loopback, only loopback names (and these) may be asked for: a web page whose
        # DNS name is rebound to 127.0.0.1 must not reach a server meant for this machine.
        self.loopback = ipaddress.ip_address(self.httpd.server_address[0]).is_loopback
        self.allowed_hosts = frozenset(_host_name(name) for name in allowed_hosts)  # any port
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> Server:
        """Serve from a background thread (tests, notebooks); `close()` stops it."""
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="posttrain-serve-http", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def close(self, close_engine: bool = True) -> None:
        """Stop serving; also stop the engine unless another server shares it."""
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread.join(timeout=10)
        self.httpd.server_close()
        if close_engine:
            self.engine.close()


def _host_name(host: str) -> str:
    """The name in a Host header, without its port: "localhost:8000" -> "localhost", "[::1]:80" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _origin_name(origin: str) -> str:
    try:
        return urlsplit(origin.strip()).hostname or ""  # "null" (a sandboxed page) has none
    except ValueError:
        return ""


def _local_name(name: str, allowed: frozenset[str]) -> bool:
    """localhost, 127.x.x.x, ::1, or a name given with --allowed-host."""
    if name == "localhost" or name in allowed:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: a burst of clients connects at once
    app: Server


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections
    server_version = "posttrain-serve"
    timeout = 60  # seconds a client may stall while sending a request before it is dropped
    server: _HTTPServer

    # ---------------------------------------------------------------- dispatch

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # a GET's status and headers, without its body (`_send_json`)
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        self._body_read, self._headers_sent, self._allow = False, False, None
        try:
            path = unquote(urlsplit(self.path).path)
            if self.server.app.loopback:
                self._check_host()
            allowed = self._allowed(path)
            if allowed is None:
                raise APIError(404, f"no route {path[:200]}; routes: POST /v1/chat/completions, POST /v1/completions, "
                               "GET /v1/models, GET /health", code="not_found")
            self._allow = allowed
            if method != allowed and not (method == "HEAD" and allowed == "GET"):
                raise APIError(405, f"{method} is not allowed on {path[:200]}; use {allowed}", code="method_not_allowed")
            if path != "/health":
                self._authorize()
            if method == "POST":
                self._complete(_POST_ROUTES[path])
            elif path == "/health":
                self._send_json(200, self._health())
            else:
                self._models(path)
        except APIError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - a bug in one request must not take the server down
            traceback.print_exc(file=sys.stderr)
            self._send_error(APIError(500, f"internal error: {type(exc).__name__}", kind="server_error"))

    @staticmethod
    def _allowed(path: str) -> str | None:
        if path in _POST_ROUTES:
            return "POST"
        if path in _GET_ROUTES or path.startswith("/v1/models/"):
            return "GET"
        return None

    def _check_host(self) -> None:
        """403 unless the Host header (and the Origin, when sent) names this machine or an --allowed-host."""
        app = self.server.app
        host = self.headers.get("Host")
        if host is not None and not _local_name(_host_name(host), app.allowed_hosts):
            raise APIError(403, f"Host {host[:100]!r} is not a loopback name; a reverse proxy's name is accepted "
                           "with --allowed-host NAME", code="host_not_allowed")
        origin = self.headers.get("Origin")
        if origin is not None and not _local_name(_origin_name(origin), app.allowed_hosts):
            raise APIError(403, f"Origin {origin[:100]!r} is not a loopback origin; a reverse proxy's name is "
                           "accepted with --allowed-host NAME", code="origin_not_allowed")

    def _has_key(self) -> bool:
        key = self.server.app.api_key
        if key is None:
            return True
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _authorize(self) -> None:
        if not self._has_key():
            raise APIError(401, "missing or wrong API key; send the header Authorization: Bearer <key>",
                           code="invalid_api_key")

    # ---------------------------------------------------------------- routes

    def _health(self) -> dict:
        engine = self.server.app.engine
        health = {"status": "ok" if engine.alive() else "worker stopped", "pending": engine.pending(),
                  "uptime_s": round(time.time() - self.server.app.started, 1), "stats": engine.snapshot()}
        if self._has_key():  # the names are what /v1/models guards (by default a local path)
            health["models"] = list(engine.targets)
        return health

    def _models(self, path: str) -> None:
        app = self.server.app
        cards = {name: {"id": name, "object": "model", "created": int(app.started), "owned_by": "posttrain"}
                 for name in app.engine.targets}
        if path == "/v1/models":
            self._send_json(200, {"object": "list", "data": list(cards.values())})
            return
        name = path[len("/v1/models/"):]
        if name not in cards:
            raise APIError(404, f"the model {name[:200]!r} does not exist", param="model", code="model_not_found")
        self._send_json(200, cards[name])

    def _complete(self, kind: str) -> None:
        app = self.server.app
        request = parse_request(kind, self._read_json(app.engine.limits.max_body_bytes), app.engine.limits)
        job = app.engine.submit(request)
        try:
            if request.stream:
                self._stream(job)
            else:
                choices: list[tuple[str, str]] = [("", "")] * len(job.choices)
                tokens = 0
                for event in self._events(job):
                    _, index, text, reason, count = event
                    choices[index] = (text, reason)
                    tokens += count
                self._send_json(200, completion_body(kind, *new_id(kind), request.model, choices,
                                                     usage(job.prompt_tokens, tokens)))
        finally:
            job.cancelled.set()  # a no-op when finished; frees the rows when the client went away

    def _events(self, job: Job, deltas: bool = False):
        """Yield the job's "end" events (and "delta" ones if asked) until every choice ended."""
        app, remaining = self.server.app, len(job.choices)
        deadline = time.monotonic() + app.request_timeout_s
        while remaining:
            try:
                event = job.events.get(timeout=1.0)
            except queue.Empty:
                if not app.engine.alive():
                    raise APIError(503, "the generation worker has stopped", kind="server_error") from None
                if time.monotonic() > deadline:
                    raise APIError(504, "generation took too long", kind="server_error") from None
                continue
            if event[0] == "error":
                raise event[1]
            if event[0] == "end":
                remaining -= 1
                yield event
            elif deltas:
                yield event

    def _stream(self, job: Job) -> None:
        request = job.request
        kind, (request_id, created) = request.kind, new_id(request.kind)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self._headers_sent = True
        if kind == "chat":
            for choice in job.choices:
                self._sse(chunk_body(kind, request_id, created, request.model, choice.index, role=True))
        tokens = 0
        try:
            for event in self._events(job, deltas=True):
                if event[0] == "delta":
                    self._sse(chunk_body(kind, request_id, created, request.model, event[1], text=event[2]))
                    continue
                _, index, rest, reason, count = event
                tokens += count
                if rest:
                    self._sse(chunk_body(kind, request_id, created, request.model, index, text=rest))
                self._sse(chunk_body(kind, request_id, created, request.model, index, finish_reason=reason))
            if request.include_usage:
                self._sse(usage_chunk(kind, request_id, created, request.model, usage(job.prompt_tokens, tokens)))
        except APIError as error:  # headers are out: report in the stream, as OpenAI does
            self._sse(error.body())
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")

    # ---------------------------------------------------------------- I/O

    def _read_json(self, max_bytes: int) -> object:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise APIError(411, "send the body with a Content-Length header (chunked request bodies are not supported)")
        header = self.headers.get("Content-Length")
        if header is None:
            raise APIError(411, "missing Content-Length header")
        try:
            length = int(header)
        except ValueError:
            raise APIError(400, f"Content-Length is not a number: {header!r}") from None
        if length < 0:
            raise APIError(400, f"Content-Length is negative: {length}")
        if length > max_bytes:
            raise APIError(413, f"the request body is {length} bytes; the limit is {max_bytes}",
                           code="request_too_large")
        if length == 0:
            raise APIError(400, "the request body is empty; send a JSON object")
        raw = self.rfile.read(length)
        if len(raw) < length:
            raise ConnectionResetError("the client closed the connection mid-body")
        self._body_read = True
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise APIError(400, f"the request body is not valid JSON: {str(exc)[:200]}") from None

    def _send_json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        unread = not self._body_read and not self._discard_body()
        if status == 503:
            self.send_header("Retry-After", "1")
        if status == 405:
            self.send_header("Allow", getattr(self, "_allow", None) or "GET, POST")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self._headers_sent = True
        if getattr(self, "command", None) != "HEAD":
            self.wfile.write(data)
        if unread:
            self._linger()

    def _discard_body(self) -> bool:
        """Read and drop a body that was refused unread (up to _DRAIN_BYTES), so the connection
        stays usable and the client is not reset while it still sends; False when a body is left
        unread: a larger or chunked one, which closes the connection (after `_linger`)."""
        headers = getattr(self, "headers", None)
        if headers is None:
            return True
        if headers.get("Transfer-Encoding"):
            self.close_connection = True
            return False
        try:
            length = int(headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if length == 0:
            return True
        if self.close_connection or not 0 <= length <= _DRAIN_BYTES:
            self.close_connection = True
            return False
        while length > 0:
            data = self.rfile.read(min(length, 1 << 16))
            if not data:
                self.close_connection = True
                return True
            length -= len(data)
        self._body_read = True
        return True

    def _linger(self) -> None:
        """After the answer to a request whose body is left unread, end the sending side and read
        and drop what the client still sends, until it closes or _LINGER_S pass (a "lingering
        close", as nginx does): a socket closed with unread data resets the connection, and a
        client still sending its body would get a broken pipe instead of the answer."""
        deadline = time.monotonic() + _LINGER_S
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            while (left := deadline - time.monotonic()) > 0:
                self.connection.settimeout(left)
                if not self.rfile.read1(1 << 16):
                    return
        except OSError:  # reset or timed out: nothing more can be done
            return

    def _send_error(self, error: APIError) -> None:
        if self._headers_sent:  # too late for a status; drop the connection
            self.close_connection = True
            return
        try:
            self._send_json(error.status, error.body())
        except OSError:
            self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, huge headers) in JSON too."""
        self.close_connection = True
        self._body_read, self._headers_sent = False, False
        phrase = HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "error"
        status = 405 if code == 501 else code  # an unknown method is the client's mistake
        self._send_error(APIError(status, message or phrase))

    def _sse(self, body: dict) -> None:
        self._write_chunk(b"data: " + json.dumps(body).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        """One HTTP/1.1 chunk (an empty one ends the response); flushed so the client sees it now."""
        self.wfile.write(f"{len(data):X}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def log_message(self, format: str, *args) -> None:
        if self.server.app.log_requests:
            super().log_message(format, *args)
