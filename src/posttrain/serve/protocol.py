"""The OpenAI wire format: request validation, response bodies and stream chunks.

Pure Python, no torch: a request body (already JSON-decoded) becomes a `Request`, or an
`APIError` that the HTTP layer sends as OpenAI's error object

    {"error": {"message": ..., "type": "invalid_request_error", "param": "max_tokens", "code": null}}

Validation follows the OpenAI API reference: the same field names, ranges and defaults
(temperature 1, top_p 1, n 1, max_tokens 16 for completions). Fields this server cannot
honour (logprobs, echo, response_format, a tool_choice that forces a call, ...) are refused
rather than silently ignored, and unknown fields are refused as OpenAI does, so a caller never
gets something other than it asked for. Fields accepted and ignored (store, metadata,
service_tier) are still type-checked.

Tools: a chat request's `tools` (function definitions) and its history's tool calls and tool
turns go to the chat template, as training renders an agent row (`data.templates.render`,
which refuses a template that would not show them); the reply is plain text: tool calls are
not parsed out of it, so `tool_choice` may be "auto" or "none" only (the tools are shown
either way), never a forced call.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; over a limit is a 4xx, never a crash."""

    max_body_bytes: int = 1 << 20  # request body size (413 above it)
    max_prompt_tokens: int = 2048  # tokens in one rendered prompt (also capped by the model's context)
    max_tokens: int = 512  # upper bound on max_tokens; also chat's default when max_tokens is absent
    max_n: int = 8  # choices per prompt
    max_prompts: int = 32  # prompts in one /v1/completions request (a list of strings)
    max_pending: int = 256  # requests queued or generating; more are refused with 503


class APIError(Exception):
    """A request the server refuses; `status` is the HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    """One validated request: chat (`messages`) or text completion (`prompts`)."""

    kind: str  # "chat" | "completion"
    model: str
    messages: list[dict] | None = None  # chat: [{"role", "content"}] with text content, and "name" if given
    tools: list[dict] | None = None  # chat: function definitions for the chat template (None: none given)
    prompts: list[str] | None = None  # completion: one or more raw prompts
    max_tokens: int | None = None  # None: as many as the limit and the context allow
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension (vLLM has it too); 0 = off
    n: int = 1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # extension; 1 = off
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


_COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "presence_penalty",
           "frequency_penalty", "repetition_penalty", "stream", "stream_options", "user"}
_CHAT_ONLY = {"messages", "max_completion_tokens", "metadata", "store", "service_tier", "tools", "tool_choice"}
_COMPLETION_ONLY = {"prompt"}
# Known OpenAI fields we cannot honour: allowed only at their "off" value (tools and tool_choice:
# on /v1/completions; chat reads them, `_tools`).
# logprobs 0 is not off: on /v1/completions it asks for the sampled tokens' logprobs.
_UNSUPPORTED_OFF = {"logprobs": (None, False), "top_logprobs": (None, 0), "logit_bias": (None, {}),
                    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                    "function_call": (None, "none"), "echo": (None, False), "best_of": (None, 1),
                    "suffix": (None, ""), "parallel_tool_calls": (None, True, False),
                    "response_format": (None, {"type": "text"})}
_ROLES = {"system", "user", "assistant", "developer", "tool"}
# Message fields other than role and content: allowed only at their "off" value (clients often send
# back an earlier reply's message whole, with tool_calls: null, refusal: null, ...).
# A message's `name`, an assistant turn's `tool_calls` and a tool turn's `tool_call_id` are passed
# to the chat template (the engine refuses them where the template does not render them, as
# training data's are).
_MESSAGE_OFF = {"function_call": (None,), "refusal": (None,), "audio": (None,), "annotations": (None, [])}
_TOOL_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")  # what a tool-bearing turn is read from


def parse_request(kind: str, body: object, limits: Limits) -> Request:
    """Validate a decoded JSON body for /v1/chat/completions ("chat") or /v1/completions."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _check_text(body)
    known = _COMMON | (_CHAT_ONLY if kind == "chat" else _COMPLETION_ONLY)
    for name, value in body.items():
        if name in known:
            continue
        if name in _UNSUPPORTED_OFF:
            if not any(value == off and type(value) is type(off) for off in _UNSUPPORTED_OFF[name]):
                raise APIError(400, f"{name} is not supported by this server; leave it out", param=name)
        else:
            raise APIError(400, f"unrecognized request argument: {name}", param=name)
    request = Request(kind=kind, model=_string(body, "model", required=True))
    if kind == "chat":
        request.messages = _messages(body.get("messages"))
        request.tools = _tools(body)
        # both are checked; max_completion_tokens (the newer name) wins when both are given
        newer = _integer(body, "max_completion_tokens", 1, limits.max_tokens)
        older = _integer(body, "max_tokens", 1, limits.max_tokens)
        request.max_tokens = newer if newer is not None else older
        _ignored_chat_fields(body)
    else:
        request.prompts = _prompts(body.get("prompt"), limits)
        max_tokens = _integer(body, "max_tokens", 1, limits.max_tokens)
        request.max_tokens = 16 if max_tokens is None else max_tokens  # OpenAI's default for completions
    _sampling(request, body, limits)
    return request


def _check_text(body: dict) -> None:
    """400 for a lone surrogate in any string of the body, a key or a value (half of a UTF-16 pair:
    what `json.dumps` writes for text cut inside an emoji, "\\ud83d"); no tokenizer takes one, and
    training's readers refuse such a row alike (`data.readers.lone_surrogate_at`, the one rule)."""
    from posttrain.data.readers import lone_surrogate_at

    for name, value in body.items():
        try:
            where = lone_surrogate_at({name: value})
        except RecursionError:  # json.loads took a few levels fewer than the Python stack holds
            raise APIError(400, f"{name} is nested too deeply", param=name) from None
        if where is not None:
            raise APIError(400, f"the text at {where[:200]} holds a lone surrogate (half of a UTF-16 surrogate pair, as "
                           "left by cutting an emoji in two), which is not valid Unicode; send whole characters",
                           param=name)


def _sampling(request: Request, body: dict, limits: Limits) -> None:
    from posttrain.rollout.sampling import PENALTY_RANGE  # the one range, the CLI's too

    for name, low, high in (("temperature", 0.0, 2.0), ("top_p", 0.0, 1.0), ("presence_penalty", *PENALTY_RANGE),
                            ("frequency_penalty", *PENALTY_RANGE), ("repetition_penalty", 0.0, 10.0)):
        value = _number(body, name, low, high)
        if value is not None:
            setattr(request, name, value)
    if request.top_p == 0 or request.repetition_penalty == 0:
        param = "top_p" if request.top_p == 0 else "repetition_penalty"
        raise APIError(400, f"{param} must be greater than 0", param=param)
    request.top_k = _integer(body, "top_k", 0, 1 << 20) or 0
    request.n = _integer(body, "n", 1, limits.max_n) or 1
    request.seed = _integer(body, "seed", -(1 << 63), (1 << 63) - 1)
    request.stop = _stop(body.get("stop"))
    request.stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise APIError(400, "stream_options must be an object with only include_usage", param="stream_options")
        if not request.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        request.include_usage = _boolean(options, "include_usage")
    if "user" in body:
        _string(body, "user")


def _ignored_chat_fields(body: dict) -> None:
    """store, metadata and service_tier change nothing here, but are type-checked as OpenAI does:
    store a boolean, metadata up to 16 string keys (64 characters) with string values (512),
    service_tier a string."""
    _boolean(body, "store")
    _string(body, "service_tier")
    metadata = body.get("metadata")
    if metadata is not None and not (isinstance(metadata, dict) and len(metadata) <= 16 and all(
            isinstance(v, str) and len(k) <= 64 and len(v) <= 512 for k, v in metadata.items())):
        raise APIError(400, "metadata must be an object of at most 16 string values (keys up to 64 characters, "
                       "values up to 512)", param="metadata")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _integer(body: dict, name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if not _is_int(value):
        raise APIError(400, f"{name} must be an integer, got {type(value).__name__}", param=name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}, got {value}", param=name)
    return value


def _number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)):
        raise APIError(400, f"{name} must be a number, got {type(value).__name__}", param=name)
    if not low <= value <= high:  # also refuses NaN
        raise APIError(400, f"{name} must be between {low:g} and {high:g}, got {value}", param=name)
    return float(value)


def _string(body: dict, name: str, required: bool = False) -> str | None:
    value = body.get(name)
    if value is None and required:
        raise APIError(400, f"missing required field: {name}", param=name)
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a string, got {type(value).__name__}", param=name)
    return value


def _boolean(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {type(value).__name__}", param=name)
    return value


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise APIError(400, "stop must be a string or a list of strings", param="stop")
    if len(stops) > 4 or any(not s or len(s) > 256 for s in stops):
        raise APIError(400, "stop takes up to 4 non-empty strings of at most 256 characters", param="stop")
    return stops


def _messages(value: object) -> list[dict]:
    if value is None:
        raise APIError(400, "missing required field: messages", param="messages")
    if not isinstance(value, list) or not value:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where} must be an object with role and content", param=where)
        role = message.get("role")
        if role not in _ROLES:
            raise APIError(400, f"{where}.role must be one of {', '.join(sorted(_ROLES))}, got {role!r}",
                           param=f"{where}.role")
        name = message.get("name")
        if name is not None and not (isinstance(name, str) and name):
            raise APIError(400, f"{where}.name must be a non-empty string", param=f"{where}.name")
        for key, given in message.items():  # nothing is silently dropped: a field we cannot honour is a 400
            if key in _TOOL_KEYS:
                continue
            if key not in _MESSAGE_OFF:
                raise APIError(400, f"unrecognized field in {where}: {key}", param=f"{where}.{key}")
            if not any(given == off and type(given) is type(off) for off in _MESSAGE_OFF[key]):
                raise APIError(400, f"{where}.{key} is not supported by this server; leave it out",
                               param=f"{where}.{key}")
        calls = message.get("tool_calls")
        if calls is not None and not isinstance(calls, list):
            raise APIError(400, f"{where}.tool_calls must be a list of tool calls", param=f"{where}.tool_calls")
        if role == "tool" or calls:
            messages.append(_tool_turn(message, i))
            continue
        if message.get("tool_call_id") is not None:
            raise APIError(400, f"{where}.tool_call_id belongs to a tool message (role: tool) only",
                           param=f"{where}.tool_call_id")
        messages.append({"role": "system" if role == "developer" else role,
                         "content": _text_content(message.get("content"), f"{where}.content"),
                         **({} if name is None else {"name": name})})
    return messages


def _tool_turn(message: dict, i: int) -> dict:
    """messages[i], an assistant turn with tool calls or a tool's result, read as training reads an
    agent row's turn (`data.formats.read_turn`: the calls' function names and JSON arguments are
    checked; a call-only turn's null content is empty)."""
    from posttrain.data.formats import BadRowError, read_turn

    try:
        turn, _ = read_turn({key: message[key] for key in _TOOL_KEYS if key in message}, i)
    except BadRowError as exc:
        raise APIError(400, f"messages[{i}]: {exc.reason}", param=f"messages[{i}]") from None
    return turn


def _tools(body: dict) -> list[dict] | None:
    """A chat request's `tools` (None when absent or empty) and its `tool_choice`, checked.

    Each tool is an OpenAI function definition, {"type": "function", "function": {"name": ...,
    "description"?, "parameters"?}}, read as training reads a row's tools (`data.formats.read_tools`).
    tool_choice "auto" (the default with tools) or "none" change nothing (the tools are shown either
    way); a forced call ("required", or a named function) is refused, since the
    reply is plain text that this server does not parse into tool calls."""
    from posttrain.data.formats import BadRowError, read_tools

    value, choice = body.get("tools"), body.get("tool_choice")
    if value is not None and not isinstance(value, list):
        raise APIError(400, f"tools must be a list of function definitions, got {type(value).__name__}",
                       param="tools")
    for i, tool in enumerate(value or []):
        if not (isinstance(tool, dict) and tool.get("type") == "function" and isinstance(tool.get("function"), dict)):
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., '
                           '"parameters": ...}} (only function tools are supported)', param=f"tools[{i}]")
    try:
        tools = read_tools({"tools": value})
    except BadRowError as exc:
        raise APIError(400, f"{exc.reason} (entries counted from 1)", param="tools") from None
    if choice is not None and not (isinstance(choice, str) and choice in ("auto", "none")):
        raise APIError(400, f"tool_choice {repr(choice)[:120]} is not supported: this server returns the reply as "
                       "plain text and does not parse tool calls out of it, so it cannot force one; use \"auto\" or "
                       "\"none\"", param="tool_choice")
    if choice == "auto" and tools is None:
        raise APIError(400, "tool_choice is only allowed when tools are given", param="tool_choice")
    return tools


def _text_content(content: object, where: str) -> str:
    """A string, or a list of {"type": "text", "text": ...} parts joined (as training data's are)."""
    from posttrain.data.formats import join_text_parts

    if isinstance(content, str):
        return content
    joined = join_text_parts(content)
    if joined is not None:
        return joined
    raise APIError(400, f"{where} must be a string or a list of text parts (no images or audio)", param=where)


def _prompts(value: object, limits: Limits) -> list[str]:
    if value is None:
        raise APIError(400, "missing required field: prompt", param="prompt")
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompt must be a string or a non-empty list of strings (token ids are not supported)",
                       param="prompt")
    if len(prompts) > limits.max_prompts:
        raise APIError(400, f"at most {limits.max_prompts} prompts per request, got {len(prompts)}", param="prompt")
    return prompts


# ---------------------------------------------------------------- responses


def new_id(kind: str) -> tuple[str, int]:
    """A response's id and its `created` time, taken once: every chunk of a stream carries both."""
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24], int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(kind: str, request_id: str, created: int, model: str, choices: list[tuple[str, str]],
                    counts: dict) -> dict:
    """The non-streaming response; `choices` is [(text, finish_reason)] in choice order."""
    if kind == "chat":
        items = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": reason} for i, (text, reason) in enumerate(choices)]
        obj = "chat.completion"
    else:
        items = [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                 for i, (text, reason) in enumerate(choices)]
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": items,
            "usage": counts}


def chunk_body(kind: str, request_id: str, created: int, model: str, index: int, *, text: str | None = None,
               role: bool = False, finish_reason: str | None = None) -> dict:
    """One streamed chunk for choice `index`: a role opener (chat), a text delta, or the finish."""
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        obj = "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_chunk(kind: str, request_id: str, created: int, model: str, counts: dict) -> dict:
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    return {"id": request_id, "object": obj, "created": created, "model": model, "choices": [],
            "usage": counts}
