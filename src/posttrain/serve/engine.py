"""The batching worker: one thread owns the model; HTTP threads hand it jobs through a queue.

    HTTP thread: validate ─▶ render + tokenize ─▶ check lengths ─▶ Job ─▶ queue ─┐
    worker:      take the first job, wait up to batch_wait_s for more (≤ max_batch_size rows),
                 group jobs that can share one forward (same model/adapter and sampling),
                 generate each group with rollout.generate_token_ids ─▶ events per choice
    HTTP thread: ◀─ events ("delta" while streaming, "end" per choice, "error") ─┘

Rows of one group may differ in prompt, max_tokens and stop strings: the generator runs to
the largest max_tokens and each row is ended by the per-token callback. Sampling settings
shared by a whole batch (temperature, top_p, top_k, penalties) are part of the group key. A
sampled request with a seed runs in a group of its own, so its seed alone decides its tokens.
Greedy rows give the same text alone or batched: the generator left-pads and masks, so a
row never sees its neighbours.

`feedback.client.LocalModel` runs on this engine too: it renders and tokenizes a chat request
itself and hands the job to `enqueue`, so requests from a pipeline's worker threads are batched
as the server's are. Its engine has `idle_exit_s`: the worker ends when no job has come for that
long (nothing keeps the model alive between runs) and `enqueue` starts a new one.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from posttrain.models.loading import position_limit
from posttrain.rollout.generate import (
    StopCheck,
    eos_token_ids,
    generate_token_ids,
    pad_token_id,
    prompt_token_ids,
    special_led_stops,
    special_stop_start,
    stop_strings,
    truncate_at_stop,
)
from posttrain.rollout import is_greedy
from posttrain.rollout.sampling import SamplingSettings
from posttrain.serve.protocol import APIError, Limits, Request

AS_LOADED = ""  # target: run the model as loaded (a plain model, or an adapter dir given as MODEL)
BASE = None  # target: the base model with every adapter switched off
# any other target string is the name of a loaded LoRA / IA3 adapter
CONTEXT_TOKENS = 4  # a completion is decoded after this many of its prompt's last tokens
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # a byte-fallback token (Llama-2, Mistral, Gemma)


@dataclass
class Choice:
    """One generated answer of a job: its prompt, its limits and what was sent so far."""

    job: Job
    index: int
    prompt_ids: list[int]
    max_tokens: int
    context_ids: list[int] = field(default_factory=list)  # completions: the prompt's last tokens
    context_text: str = ""  # their text, dropped from the front of the decoded continuation
    sent: str = ""  # text already streamed
    ended: bool = False


@dataclass
class Job:
    """One HTTP request's work. The worker puts events on `events`; the HTTP thread reads them."""

    request: Request
    target: str | None
    prompt_tokens: int
    choices: list[Choice] = field(default_factory=list)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    stop_check: StopCheck | None = None  # what ends a row at a stop string, as generate's (set by `enqueue`)
    led: dict = field(default_factory=dict)  # stop strings that start with a special token: {stop: its id}

    def group_key(self) -> tuple:
        r = self.request
        if is_greedy(r.temperature):  # greedy (0, or below sampling's cut-off): top_p, top_k and the seed change nothing
            sampling: tuple = (0.0,)
        else:
            sampling = (r.temperature, r.top_p, r.top_k, id(self) if r.seed is not None else None)
        return (self.target, sampling, r.presence_penalty, r.frequency_penalty, r.repetition_penalty)


class Engine:
    """Owns the model, the tokenizer and the worker thread."""

    def __init__(self, model, tokenizer, targets: dict[str, str | None], template: str | None, limits: Limits, *,
                 max_batch_size: int = 16, batch_wait_s: float = 0.005, idle_exit_s: float | None = None,
                 name: str = "posttrain-serve-worker"):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model, self.tokenizer, self.targets = model, tokenizer, dict(targets)
        self.template, self.limits = template, limits
        self.max_batch_size, self.batch_wait_s, self.idle_exit_s = max_batch_size, batch_wait_s, idle_exit_s
        # template None (`--template none`): no template, so no end-of-turn marker, and no chat
        raw = template is None
        self.eos_ids = eos_token_ids(model, tokenizer, template, raw=raw)  # the template's end-of-turn token too
        self.turn_stops = stop_strings(tokenizer, [], template, raw=raw)  # its marker when several tokens
        self.pad_id = pad_token_id(tokenizer, self.eos_ids)
        # A run of byte tokens decodes together (one U+FFFD per byte when not valid UTF-8), so its
        # text may change until a non-byte token ends the run: streaming holds it back till then.
        self.byte_ids = frozenset(i for t, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(t))
        # decode's clean-up (" ." -> ".", " n't" -> "n't", ...) may rewrite a space in the last 4 characters
        self.cleans_spaces = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False))
        self.context = position_limit(model)  # what one row may hold: the position table, less virtual tokens
        # A fast tokenizer may not be used from two threads at once ("Already borrowed").
        self._tokenizer_lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._lock = threading.Lock()
        self._pending = 0
        self.stats = {"requests": 0, "refused_busy": 0, "batches": 0, "rows": 0, "largest_batch": 0,
                      "completion_tokens": 0, "generation_errors": 0}
        self._closing = threading.Event()
        self._name = name
        self._worker: threading.Thread | None = None  # with idle_exit_s: started by the first enqueue
        if idle_exit_s is None:
            self._start_worker()

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------- HTTP side

    def submit(self, request: Request) -> Job:
        """Check the request against the model and the limits, queue it; APIError if refused."""
        if request.model not in self.targets:
            raise APIError(404, f"the model {request.model!r} does not exist; served: {', '.join(self.targets)}",
                           param="model", code="model_not_found")
        with self._lock:
            self._check_room()  # refuse early, before any tokenizing, when the queue is full
        texts = [self._render(request)] if request.kind == "chat" else request.prompts
        if request.kind == "chat" and self.turn_stops:  # the answer ends with the turn, as rendered
            request.stop = list(dict.fromkeys([*request.stop, *self.turn_stops]))
        job = Job(request=request, target=self.targets[request.model], prompt_tokens=0)
        for i, text in enumerate(texts):
            ids = self.encode(text, special=request.kind == "completion")
            max_tokens = self._check_lengths(request, len(ids), f"prompt[{i}]" if len(texts) > 1 else None)
            job.prompt_tokens += len(ids)
            context = ids[-CONTEXT_TOKENS:] if request.kind == "completion" else []
            context_text = self.decode(context)
            for _ in range(request.n):
                job.choices.append(Choice(job, len(job.choices), ids, max_tokens, context, context_text))
        return self.enqueue(job)

    def enqueue(self, job: Job) -> Job:
        """Queue a job whose choices hold their prompt ids and max_tokens (checked by the caller);
        APIError 503 when the server is full or closing. Starts the worker if it is idle. Stop
        strings end a row as they end `rollout.generate`'s (`generate.StopCheck`: one that is a
        special token by its id, one that starts with one, '<|im_start|>user', in the text that
        keeps special tokens, where the answer is cut: `special_led_stops`)."""
        if job.request.stop:
            with self._tokenizer_lock:
                job.stop_check = StopCheck(self.tokenizer, job.request.stop)
                job.led = special_led_stops(self.tokenizer, job.request.stop)
        with self._lock:
            self._check_room()
            self._pending += 1
            self.stats["requests"] += 1
            self._queue.put(job)
            if self._worker is None:
                self._start_worker()
        return job

    def _check_room(self) -> None:
        """Raise 503 when the server is full or closing (called holding self._lock)."""
        if self._closing.is_set():
            raise APIError(503, "the server is shutting down", kind="server_error")
        if self._pending >= self.limits.max_pending:
            self.stats["refused_busy"] += 1
            raise APIError(503, f"the server is busy ({self._pending} requests pending); retry shortly",
                           kind="server_error", code="server_busy")

    def _render(self, request: Request) -> str:
        """The messages rendered as training renders a row (`data.templates.render`), with the
        request's `tools`: a turn's `name`, tool calls and tool turns and the tools go to the
        template, and are refused (400, naming them) where the template does not render them."""
        from posttrain.data.templates import render
        from posttrain.errors import DataError

        if self.template is None:
            raise APIError(400, "this server runs with --template none (no chat template): send the prompt "
                                "to /v1/completions", param="messages")
        try:
            return render(self.tokenizer, self.template, request.messages, True, source="request",
                          tools=request.tools)
        except DataError as exc:
            raise APIError(400, str(exc), param="tools" if self._renders_without_tools(request) else "messages") \
                from None
        except Exception as exc:  # noqa: BLE001 - a template may raise on an order of roles it does not support
            raise APIError(400, f"the chat template cannot render these messages: {exc}", param="messages") from None

    def _renders_without_tools(self, request: Request) -> bool:
        """Whether a request the template refused renders without its tools (the tools are what it refused)."""
        from posttrain.data.templates import render

        if request.tools is None:
            return False
        try:
            render(self.tokenizer, self.template, request.messages, True, source="request")
            return True
        except Exception:  # noqa: BLE001 - DataError or a template's own error: the messages are refused too
            return False

    def encode(self, text: str, special: bool) -> list[int]:
        # Chat text is rendered by the template, BOS and all; a raw completion prompt gets the
        # tokenizer's special tokens, as the OpenAI API and vLLM treat it as the whole input.
        with self._tokenizer_lock:
            return prompt_token_ids(self.tokenizer, text, raw=special)

    def decode(self, ids: list[int]) -> str:
        with self._tokenizer_lock:
            return self.tokenizer.decode(ids, skip_special_tokens=True)

    def text(self, choice: Choice, ids: list[int]) -> str:
        """The text of `choice`'s tokens `ids`. A chat answer is decoded alone (a message's start);
        a completion after its prompt's last tokens, whose text is then dropped, since a SentencePiece
        decoder strips the leading space of a text it decodes from the start (as vLLM does)."""
        if not choice.context_ids:
            return self.decode(ids)
        whole = self.decode(choice.context_ids + ids)
        # the context's text is whole's prefix unless a byte run crosses the boundary
        return whole[len(os.path.commonprefix([choice.context_text, whole])):]

    def _check_lengths(self, request: Request, prompt_tokens: int, which: str | None = None) -> int:
        """The max_tokens this prompt may use; APIError when the prompt or the total is too long.
        `which` names the prompt among several ("prompt[1]"); the refusal says which limit binds:
        the model's context (its positions, less one for the first new token) or --max-prompt-tokens."""
        param = which or ("messages" if request.kind == "chat" else "prompt")
        subject = f"{which} has" if which else "the prompt has"
        if prompt_tokens == 0:
            raise APIError(400, f"{which or 'the prompt'} is empty after tokenization", param=param)
        limit = self.limits.max_prompt_tokens
        if self.context is not None and self.context - 1 < limit:
            if prompt_tokens > self.context - 1:
                raise APIError(400, f"{subject} {prompt_tokens} tokens; this model's context is {self.context} "
                               f"tokens, so a prompt may have {self.context - 1} (one is left for the answer); "
                               "shorten the prompt", param=param, code="context_length_exceeded")
        elif prompt_tokens > limit:
            raise APIError(400, f"{subject} {prompt_tokens} tokens; this server takes prompts of up to {limit} "
                           "(its --max-prompt-tokens); shorten the prompt", param=param,
                           code="context_length_exceeded")
        if request.max_tokens is None:  # chat without max_tokens: what the limit and the context allow
            room = self.limits.max_tokens if self.context is None else self.context - prompt_tokens
            return min(self.limits.max_tokens, room)
        if self.context is not None and prompt_tokens + request.max_tokens > self.context:
            raise APIError(400, f"this model's context is {self.context} tokens; "
                           f"{subject} {prompt_tokens} and "
                           f"max_tokens asks for {request.max_tokens}; lower max_tokens or shorten the prompt",
                           param="max_tokens", code="context_length_exceeded")
        return request.max_tokens

    def snapshot(self) -> dict:
        """Counters since start: requests, batches (generator calls), rows, tokens, refusals."""
        with self._lock:
            return dict(self.stats)

    def pending(self) -> int:
        with self._lock:
            return self._pending

    def alive(self) -> bool:
        """Whether jobs are served: the worker runs, or is idle (ended; the next job starts one)."""
        worker = self._worker
        return worker.is_alive() if worker is not None else not self._closing.is_set()

    def end_worker(self) -> None:
        """End the worker now, as an idle `idle_exit_s` engine's ends by itself: nothing is
        refused, and a job queued meanwhile, or later, starts a new one."""
        worker = self._worker
        if worker is None:
            return
        self._closing.set()
        worker.join(timeout=30)
        with self._lock:
            self._closing.clear()
            self._worker = None
            if not self._queue.empty():
                self._start_worker()

    def close(self) -> None:
        """Stop the worker; queued jobs are refused with 503."""
        self._closing.set()
        worker = self._worker
        if worker is not None:
            worker.join(timeout=30)
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            self._fail(job, APIError(503, "the server is shutting down", kind="server_error"))

    # ---------------------------------------------------------------- worker side

    def _work(self) -> None:
        idle_since = time.monotonic()
        poll = 0.1 if self.idle_exit_s is None else min(0.1, self.idle_exit_s)
        while not self._closing.is_set():
            try:
                jobs = [self._queue.get(timeout=poll)]
            except queue.Empty:
                if self.idle_exit_s is not None and time.monotonic() - idle_since >= self.idle_exit_s:
                    with self._lock:  # enqueue puts and starts under this lock: no job is left unserved
                        if self._queue.empty():
                            self._worker = None
                            return
                continue
            rows = len(jobs[0].choices)
            deadline = time.monotonic() + self.batch_wait_s
            while rows < self.max_batch_size:
                try:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                except queue.Empty:
                    break
                jobs.append(job)
                rows += len(job.choices)
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:
                if job.cancelled.is_set():
                    self._release(job)
                else:
                    groups.setdefault(job.group_key(), []).append(job)
            for group in groups.values():
                self._generate(group)
            idle_since = time.monotonic()

    def _generate(self, group: list[Job]) -> None:
        choices = [c for job in group for c in job.choices]
        first = group[0].request
        settings = SamplingSettings(
            max_new_tokens=max(c.max_tokens for c in choices), temperature=first.temperature, top_k=first.top_k,
            top_p=first.top_p, repetition_penalty=first.repetition_penalty,
            frequency_penalty=first.frequency_penalty, presence_penalty=first.presence_penalty,
            seed=None if is_greedy(first.temperature) else first.seed)
        try:
            with self._activate(group[0].target):
                results = generate_token_ids(
                    self.model, [c.prompt_ids for c in choices], settings, pad_token_id=self.pad_id,
                    eos_token_ids=self.eos_ids, batch_size=self.max_batch_size,
                    on_token=lambda i, ids: self._on_token(choices[i], ids))
            for choice, ids in zip(choices, results):
                if not choice.ended:  # cannot happen unless the generator changes; never leave a client waiting
                    self._end(choice, ids, "length")
            with self._lock:
                self.stats["batches"] += 1
                self.stats["rows"] += len(choices)
                self.stats["largest_batch"] = max(self.stats["largest_batch"], len(choices))
                self.stats["completion_tokens"] += sum(len(ids) for ids in results)
        except Exception as exc:  # noqa: BLE001 - the worker must outlive any one failed batch
            traceback.print_exc(file=sys.stderr)
            with self._lock:
                self.stats["generation_errors"] += 1
            for job in group:
                self._fail(job, APIError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error"))
        finally:
            for job in group:
                self._release(job)

    @contextlib.contextmanager
    def _activate(self, target: str | None):
        if target == AS_LOADED:
            yield
        elif target is BASE:
            disabled = getattr(self.model, "adapters_disabled", None)
            with disabled() if disabled is not None else contextlib.nullcontext():
                yield
        else:
            self.model.use_adapter(target)
            yield

    def _on_token(self, choice: Choice, ids: list[int]) -> bool:
        """Called by the generator after each token of `choice`; True ends the row."""
        if choice.ended:
            return True
        if choice.job.cancelled.is_set():  # the client went away: free the row
            choice.ended = True
            return True
        job = choice.job
        stop, stream = job.request.stop, job.request.stream
        # A completion's text is decoded after its prompt's last tokens (`text`), which may give it a
        # leading space that its tokens decoded alone (the check's tail) lose: its stops are looked for there too.
        text = self.text(choice, ids) if stream or (stop and choice.context_ids) else ""
        reason = "stop" if ids[-1] in self.eos_ids else None
        if reason is None and job.stop_check is not None:
            with self._tokenizer_lock:
                reason = "stop" if job.stop_check(ids) else None
        if reason is None and stop and choice.context_ids and truncate_at_stop(text, stop) != text:
            reason = "stop"
        if reason is None and len(ids) >= choice.max_tokens:
            reason = "length"
        if reason is not None:
            self._end(choice, ids, reason)
            return True
        if stream and ids[-1] not in self.byte_ids:
            self._stream_delta(choice, text, ids)
        return False

    def _led_stop_start(self, job: Job, ids: list[int]) -> int | None:
        """Where a stop string that starts with a special token may be starting in `ids` (`job.led`):
        the first place, within the stop's reach (`StopCheck.window`), holding its special token
        from which the tokens, decoded with special tokens kept, are still a prefix of it; None if
        there is none. Should the rest follow, the answer is cut there (`_end`)."""
        window = job.stop_check.window if job.stop_check is not None else 0
        for at in range(max(len(ids) - window, 0), len(ids)):
            for s, lead in job.led.items():
                if ids[at] == lead:
                    with self._tokenizer_lock:
                        tail = self.tokenizer.decode(ids[at:], skip_special_tokens=False)
                    if s.startswith(tail):
                        return at
        return None

    def _stream_delta(self, choice: Choice, text: str, ids: list[int]) -> None:
        """Send the part of `text` (the text of `ids`) that can no longer change. Held back: all
        of it while the tokens end in a byte-token run (see byte_ids), a trailing incomplete UTF-8
        character (decoded as U+FFFD), a space that decode's clean-up may still remove, a tail that
        may be the start of a stop string, and the text from a special token on whose tokens may be
        the start of a stop string led by it (`_led_stop_start`), so the streamed pieces add up to
        exactly the non-streamed text."""
        if choice.job.led and (at := self._led_stop_start(choice.job, ids)) is not None:
            text = self.text(choice, ids[:at])
        body = text.rstrip("\ufffd")
        hold = 0
        if self.cleans_spaces and (space := body.rfind(" ", max(len(body) - 4, 0))) != -1:
            hold = len(body) - space
        for s in choice.job.request.stop:
            for k in range(min(len(s) - 1, len(body)), 0, -1):
                if body.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        new = body[: len(body) - hold]
        if len(new) > len(choice.sent) and new.startswith(choice.sent):
            choice.job.events.put(("delta", choice.index, new[len(choice.sent):]))
            choice.sent = new

    def _end(self, choice: Choice, ids: list[int], reason: str) -> None:
        """The choice's final text, cut as `generate.completion_text` cuts it: at the special token of a
        stop string led by one, then before the earliest stop string; what streaming has not sent."""
        stop, cut = choice.job.request.stop, len(ids)
        if choice.job.led:
            with self._tokenizer_lock:
                cut = special_stop_start(self.tokenizer, ids, stop)
        final = truncate_at_stop(self.text(choice, ids[:cut]), stop)
        rest = final[len(choice.sent):] if final.startswith(choice.sent) else ""
        choice.ended = True
        choice.job.events.put(("end", choice.index, rest, reason, len(ids)))

    def _fail(self, job: Job, error: APIError) -> None:
        job.events.put(("error", error))

    def _release(self, job: Job) -> None:
        with self._lock:
            self._pending -= 1
