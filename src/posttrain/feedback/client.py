"""Chat backends for AI feedback: a model that answers a list of messages with one reply.

    ChatBackend        the protocol judges and pipelines use: model_name, usage, chat(messages) -> Reply
    OpenAICompatible   any OpenAI-compatible HTTP endpoint (posttrain serve, vLLM, Ollama, a hosted
                       API): stdlib urllib, no redirect followed (the key goes to base_url only),
                       retries with exponential backoff and jitter on 429 / 5xx /
                       timeouts / dropped connections (Retry-After honoured), a shared client-side
                       rate limit, token counts from the response's `usage` (estimated when absent)
    LocalModel         a model loaded in this process (preset, model dir, run dir or adapter dir),
                       the chat template applied, exact token counts; concurrent requests from
                       several threads are generated as one batch (the serving engine's worker)
    make_backend(cfg)  a BackendConfig -> the backend it describes
    shared_or_new      a second role's backend: a local model already loaded, shared, when both
                       configs name the same one (policy and judge, target and attacker)
    close_local        end the worker threads of a run's local models before it returns

Backends are thread-safe: pipelines call one backend from several worker threads.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from posttrain.errors import UserError
from posttrain.rollout import is_greedy

MAX_BACKOFF_S = 60.0  # longest wait between retries that we choose ourselves
MAX_RETRY_AFTER_S = 600.0  # longest Retry-After we honour; a larger one is capped
RETRYABLE_STATUS = {408, 409, 425, 429}  # besides every 5xx


class BackendError(UserError):
    """A request that failed for good: a 4xx other than 429, or retries exhausted."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass
class Reply:
    text: str
    finish_reason: str  # "stop" (the model ended its turn) or "length" (hit max_tokens), as the server says
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Usage:
    """Counters of one backend since it was made; safe to update from several threads."""

    requests: int = 0  # successful replies
    retries: int = 0  # attempts repeated after a retryable failure
    failures: int = 0  # requests that failed for good
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated: int = 0  # replies whose token counts were estimated (the server sent no usage)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "retries": self.retries, "failures": self.failures,
                    "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                    "estimated": self.estimated}


class ChatBackend(Protocol):
    model_name: str  # recorded in provenance
    usage: Usage

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
             temperature: float | None = None, seed: int | None = None, tools: list[dict] | None = None) -> Reply:
        """`tools`: function definitions the model may call (a row's `tools`); callers pass it only
        when a row has them, so a backend without the argument serves plain rows."""


def estimate_tokens(text: str) -> int:
    """A rough token count for servers that report none: about 4 characters per token."""
    return max(1, round(len(text) / 4)) if text else 0


class RateLimiter:
    """Token bucket shared by all threads: on average `rate` acquisitions per second, at most
    `burst` at once. A caller that finds the bucket empty reserves the next token and sleeps
    until it is due, so waiting threads are served in arrival order."""

    def __init__(self, rate: float, burst: int = 1, *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst, self._clock, self._sleep = rate, burst, clock, sleep
        self._tokens = float(burst)
        self._updated = clock()
        self._lock = threading.Lock()

    def acquire(self) -> float:
        """Take one token, sleeping if none is left; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
            self._updated = now
            self._tokens -= 1  # below zero = tokens reserved by waiting callers
            wait = -self._tokens / self.rate if self._tokens < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent/invalid."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(attempt: int, base_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: base · 2^attempt · U(0.5, 1.5), capped at MAX_BACKOFF_S."""
    return min(MAX_BACKOFF_S, base_s * (2 ** attempt) * rng.uniform(0.5, 1.5))


class _RefuseRedirects(urllib.request.HTTPRedirectHandler):
    """Follow no redirect: urllib would resend the Authorization header to wherever a 3xx points
    (another host included) and turn the POST into a GET. The 3xx surfaces as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_RefuseRedirects)


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


class OpenAICompatible:
    """POST {base_url}/chat/completions with the standard OpenAI body, standard library only."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 5, backoff_s: float = 1.0, requests_per_second: float = 0.0,
                 max_tokens: int = 128, temperature: float = 1.0, seed: int | None = None,
                 sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model_name = model
        self._api_key = api_key  # kept out of repr, records and error messages
        self.timeout_s, self.max_retries, self.backoff_s = timeout_s, max_retries, backoff_s
        self.defaults = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        self.usage = Usage()
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._limiter = RateLimiter(requests_per_second, sleep=sleep) if requests_per_second > 0 else None
        self._told = threading.Event()  # the first retry is said once: a dead server is otherwise silent for a minute

    def __repr__(self) -> str:
        return f"OpenAICompatible(url={self.url!r}, model={self.model_name!r})"

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
             temperature: float | None = None, seed: int | None = None, tools: list[dict] | None = None) -> Reply:
        body = {"model": self.model_name, "messages": messages, **self._settings(max_tokens, temperature, seed),
                **({"tools": tools} if tools else {})}
        data = self._post(json.dumps(body).encode())
        try:
            choice = data["choices"][0]
            text = _reply_text(choice["message"]["content"])
            finish = choice.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError):
            self.usage.add(failures=1)
            raise BackendError(f"POST {self.url}: the response has no choices[0].message.content text: "
                               f"{json.dumps(data)[:200]}") from None
        usage = data.get("usage")
        usage = usage if isinstance(usage, dict) else {}  # absent or malformed: estimated below
        prompt_tokens, completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        estimated = not (_is_count(prompt_tokens) and _is_count(completion_tokens))
        if estimated:
            prompt_tokens = estimate_tokens("".join(m.get("content", "") for m in messages))
            completion_tokens = estimate_tokens(text)
        self.usage.add(requests=1, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                       estimated=int(estimated))
        return Reply(text, finish, prompt_tokens, completion_tokens)

    def _settings(self, max_tokens, temperature, seed) -> dict[str, Any]:
        given = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        chosen = {k: self.defaults[k] if v is None else v for k, v in given.items()}
        return {k: v for k, v in chosen.items() if v is not None}

    def _post(self, payload: bytes) -> dict:
        """One request with retries; returns the decoded JSON body or raises BackendError."""
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        for attempt in range(self.max_retries + 1):
            if self._limiter is not None:
                self._limiter.acquire()
            try:
                return self._attempt(urllib.request.Request(self.url, data=payload, headers=headers, method="POST"))
            except _Retryable as exc:
                if attempt == self.max_retries:
                    self.usage.add(failures=1)
                    raise BackendError(f"POST {self.url}: gave up after {self.max_retries} retries; last error: "
                                       f"{exc.reason}") from None
                self.usage.add(retries=1)
                if not self._told.is_set():
                    self._told.set()
                    print(f"warning: POST {self.url}: {exc.reason}; retrying (up to {self.max_retries} times, "
                          "backing off; max_retries and backoff_s set how long)", file=sys.stderr, flush=True)
                delay = backoff_delay(attempt, self.backoff_s, self._rng)
                if exc.retry_after is not None:
                    delay = min(exc.retry_after, MAX_RETRY_AFTER_S)
                self._sleep(delay)
        raise AssertionError("unreachable")

    def _attempt(self, request: urllib.request.Request) -> dict:
        try:
            with _OPENER.open(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as exc:
            if 300 <= exc.code < 400:
                self.usage.add(failures=1)
                raise BackendError(_redirect_message(self.url, exc), exc.code) from None
            message = _error_message(exc)
            if exc.code in RETRYABLE_STATUS or exc.code >= 500:
                raise _Retryable(f"HTTP {exc.code}: {message}", parse_retry_after(exc.headers.get("Retry-After")))
            self.usage.add(failures=1)
            hint = " (check the API key variable, *.api_key_env)" if exc.code in (401, 403) else ""
            raise BackendError(f"POST {self.url}: HTTP {exc.code}: {message}{hint}", exc.code) from None
        except urllib.error.URLError as exc:
            raise _Retryable(f"cannot connect: {exc.reason}") from None
        except (TimeoutError, socket.timeout):
            raise _Retryable(f"no response within {self.timeout_s:g}s") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise _Retryable(f"connection dropped: {type(exc).__name__}: {exc}") from None
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise _Retryable(f"the response is not JSON: {raw[:120]!r}") from None


def _redirect_message(url: str, exc: urllib.error.HTTPError) -> str:
    """A 3xx answer, said with where it points: the API key is sent to base_url only, so the user
    decides whether the new address is the endpoint."""
    location = " ".join((exc.headers.get("Location") or "").split())[:200]
    if not location:
        return f"POST {url}: HTTP {exc.code} redirect with no Location; check *.base_url"
    base = location.split("?")[0]
    base = base[:-len("/chat/completions")] if base.endswith("/chat/completions") else location
    return (f"POST {url}: HTTP {exc.code} redirect to {location}; posttrain follows no redirect (the API key goes "
            f"to base_url only): if that is the endpoint, set *.base_url={base}")


def _reply_text(content: Any) -> str:
    """A reply's message.content as text: a string, null (""), or the text parts of a list of
    parts joined (as some OpenAI-compatible servers send it); anything else raises TypeError."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) for p in content):
        texts = [p.get("text") for p in content if p.get("type", "text") == "text"]
        if all(isinstance(t, str) for t in texts):
            return "".join(texts)
    raise TypeError(f"content is {type(content).__name__}")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _error_message(exc: urllib.error.HTTPError) -> str:
    """The server's own message (OpenAI's {"error": {"message"}} or any text), on one line."""
    try:
        raw = exc.read().decode("utf-8", "replace")
    except Exception:  # noqa: BLE001 - a broken body must not hide the status
        raw = ""
    try:
        data = json.loads(raw)
        error = data.get("error", data) if isinstance(data, dict) else data
        message = error.get("message", raw) if isinstance(error, dict) else str(error)
    except json.JSONDecodeError:
        message = raw
    message = " ".join(str(message).split()) or exc.reason or "no message"
    return message[:300]


class LocalModel:
    """A model in this process, on the serving engine's batching worker (`serve.engine.Engine`):
    requests from several threads that queue while the model is busy are generated as the next
    left-padded batch (no window is waited, so a lone caller is not slowed), greedy or unseeded
    sampling alike; a greedy reply is the same alone or batched, and a seeded sampled request
    runs alone, so its seed decides its tokens. A reply ends at the template's end-of-turn marker, one token (an EOS
    id) or several (a stop string, cut off the text), as `rollout.generate` ends a completion.
    The worker ends when idle for IDLE_EXIT_S (or on `close`) and starts again with the next request.

    Under a template with no system role (Gemma's, Mistral's raise on one), a leading system
    turn (a judge's instructions, a red-team attack's) is folded into the first user turn
    (`data.templates.fold_system`): the one place every local judge, policy and target goes
    through. An HTTP backend sends system turns as they are: its server applies its template."""

    IDLE_EXIT_S = 0.25  # seconds without a request before the worker ends

    def __init__(self, model, tokenizer, *, name: str, template: str = "auto", max_tokens: int = 128,
                 temperature: float = 1.0, seed: int | None = None, max_batch_size: int = 16,
                 batch_wait_s: float = 0.0):
        from posttrain.data.templates import has_system_role, resolve_template
        from posttrain.serve.engine import AS_LOADED, Engine
        from posttrain.serve.protocol import Limits

        self.model, self.tokenizer, self.model_name = model, tokenizer, name
        self.template = resolve_template(tokenizer, template)
        self.system_role = has_system_role(tokenizer, self.template)
        self.defaults = {"max_tokens": max_tokens, "temperature": temperature, "seed": seed}
        # no queue limit: the callers are this process's own threads, never more than it started
        self.engine = Engine(model, tokenizer, {name: AS_LOADED}, self.template, Limits(max_pending=sys.maxsize),
                             max_batch_size=max_batch_size, batch_wait_s=batch_wait_s,
                             idle_exit_s=self.IDLE_EXIT_S, name="posttrain-local-model")
        self.usage = Usage()

    @classmethod
    def load(cls, path: str, *, dtype: str = "float32", template: str = "auto", **defaults: Any) -> "LocalModel":
        from posttrain.inference import load_for_inference

        model, tokenizer = load_for_inference(path, dtype)
        return cls(model, tokenizer, name=path, template=template, **defaults)

    def __repr__(self) -> str:
        return f"LocalModel({self.model_name!r})"

    def close(self) -> None:
        """End the worker now (it also ends by itself when idle); a later request starts a new one,
        so closing a backend the caller made and uses again is harmless."""
        self.engine.end_worker()

    def chat(self, messages: list[dict[str, str]], *, max_tokens: int | None = None,
             temperature: float | None = None, seed: int | None = None, tools: list[dict] | None = None) -> Reply:
        """One reply; `tools` are rendered by the chat template (`data.templates.render`), and a
        template that does not show them is refused (DataError) rather than asked without them."""
        from posttrain.serve.engine import AS_LOADED, Choice, Job
        from posttrain.serve.protocol import APIError, Request

        max_tokens = self.defaults["max_tokens"] if max_tokens is None else max_tokens
        temperature = self.defaults["temperature"] if temperature is None else temperature
        seed = self.defaults["seed"] if seed is None else seed
        if not self.system_role:
            from posttrain.data.templates import fold_system

            messages = fold_system(messages)
        if tools:
            from posttrain.data.templates import render

            text = render(self.tokenizer, self.template, messages, True, self.model_name, tools)
        else:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                      add_generation_prompt=True)
        prompt_ids = self.engine.encode(text, special=False)  # the template has BOS
        context = self.engine.context
        if context is not None:
            if len(prompt_ids) >= context:
                self.usage.add(failures=1)
                raise BackendError(f"{self.model_name}: the prompt has {len(prompt_ids)} tokens; the model's "
                                   f"context is {context}")
            max_tokens = min(max_tokens, context - len(prompt_ids))
        request = Request(kind="chat", model=self.model_name, max_tokens=max_tokens, temperature=temperature,
                          seed=None if is_greedy(temperature) else seed, stop=list(self.engine.turn_stops))
        job = Job(request=request, target=AS_LOADED, prompt_tokens=len(prompt_ids))
        job.choices.append(Choice(job, 0, prompt_ids, max_tokens))
        try:
            event = self.engine.enqueue(job).events.get()
        except APIError as exc:  # closed
            event = ("error", exc)
        if event[0] == "error":
            self.usage.add(failures=1)
            raise BackendError(f"{self.model_name}: {event[1].message}", event[1].status)
        _, _, reply_text, finish, completion_tokens = event
        self.usage.add(requests=1, prompt_tokens=len(prompt_ids), completion_tokens=completion_tokens)
        return Reply(reply_text, finish, len(prompt_ids), completion_tokens)


def make_backend(cfg) -> ChatBackend:
    """The backend a BackendConfig describes. The API key is read from the environment here."""
    if cfg.kind == "local":
        return LocalModel.load(cfg.model, dtype=cfg.dtype, template=cfg.template, max_tokens=cfg.max_tokens,
                               temperature=cfg.temperature, seed=cfg.seed)
    if cfg.kind == "openai":
        api_key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        return OpenAICompatible(cfg.base_url, cfg.model, api_key=api_key or None, timeout_s=cfg.timeout_s,
                                max_retries=cfg.max_retries, backoff_s=cfg.backoff_s,
                                requests_per_second=cfg.requests_per_second, max_tokens=cfg.max_tokens,
                                temperature=cfg.temperature, seed=cfg.seed)
    raise ValueError(f"unknown backend kind {cfg.kind!r}")


def close_local(*backends: ChatBackend) -> None:
    """End the worker threads of the LocalModels among `backends` (others hold none): a run that
    made its backends closes them before it returns, even when it fails, so no thread is left
    holding a model."""
    for backend in backends:
        if isinstance(backend, LocalModel):
            backend.close()


SAME_MODEL = ("kind", "model", "dtype", "template")  # the BackendConfig fields that decide the weights and prompts


def shared_or_new(backend: ChatBackend, backend_cfg, other_cfg) -> ChatBackend:
    """The backend `other_cfg` describes, for a role beside `backend` (made from `backend_cfg`):
    `backend` itself when it is a LocalModel and both configs name the same local model
    (SAME_MODEL), so the weights are loaded and held once; else a new one (`make_backend`).
    A shared model's defaults are `backend_cfg`'s sampling settings, and its usage counts both
    roles' requests: every caller of the other role passes its own max_tokens, temperature and seed."""
    same = all(getattr(backend_cfg, f) == getattr(other_cfg, f) for f in SAME_MODEL)
    return backend if isinstance(backend, LocalModel) and same else make_backend(other_cfg)
