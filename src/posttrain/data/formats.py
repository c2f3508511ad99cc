"""Formats: rows → `Record`s, with a bad-row policy that never drops a row unannounced.

Four row formats are understood:

    alpaca    {"instruction", "input"?, "output", "system"?}
              → [system?] + user(instruction, + "\\n\\n" + input when input is non-empty)
                + assistant(output)
    messages  {"messages": [{"role", "content"}, ...], "tools"?, "system"?}, roles
              system/user/assistant/tool (developer is read as system); "conversations" is
              accepted in place of "messages", and ShareGPT turns {"from", "value"} with from =
              human/user/gpt/assistant/system are mapped. A "system" key (LLaMA-Factory's
              ShareGPT column) is the conversation's first turn, a system turn; a row with
              both it and a system turn of its own is a bad row. Agent data as OpenAI and Hugging
              Face write it: an assistant turn's `tool_calls` and `reasoning_content`, a tool
              turn's `tool_call_id`, any turn's `name`, per-turn `weight` (0 or 1) and `train`
              (boolean) to keep an assistant turn out of the loss, and the row's `tools`
              (function definitions), which every render of the row passes to the chat
              template (`read_turn`, `read_tools`).
    prompt_completion
              {"prompt", "completion", "system"?} (TRL's prompt-completion): the prompt as
              preferences.py reads it (text = one user turn, or turns), the completion text
              (one assistant turn) or turns; loss on the completion's assistant turns only.
    text      {"text"}: plain text for continued pre-training.

Content strings are kept exactly as given (no stripping): label tokens decoded later
must equal the assistant text. A content given as a list of text parts
([{"type": "text", "text": ...}]) is those texts joined, as `serve` reads a request; any
other part (an image) makes a bad row. A CSV cell holding a list is read as JSON or as
Python's repr (what `datasets`' and pandas' `to_csv` write), see `decode_cell`. A JSON number
with a fraction or exponent is a `WrittenFloat`, which keeps the text the file wrote.

`load_records` reads everything into memory; `iter_records` streams. Both count every
row per file (`DataReport`), report each malformed one with its "file:line" and reason, and
apply `bad_rows`: "error" stops with the locations, "skip" writes every bad row to
`rejects_path` and fails when a file has more than `max_bad_fraction` of its rows malformed (so
the mix has no more either). Both name the split a DatasetDict directory is read through and the
splits not read. `load_records` also counts the rows whose content is in more than one file
(`in_several_files`): said, never dropped (`posttrain quality` removes duplicates).
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import functools
import hashlib
import io
import itertools
import json
import numbers
import os
import tokenize
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.readers import (DICT_SPLIT, Malformed, check_path, dataset_dict_splits, iter_rows,
                                    unusable_text_at)
from posttrain.data.records import Record, WrittenFloat
from posttrain.errors import DataError

FORMATS = ("alpaca", "messages", "prompt_completion", "text")
_NEEDS = {
    "alpaca": "'instruction' and 'output' (optional 'input', 'system')",
    "messages": "'messages' or 'conversations' (a list of turns; optional 'system', 'tools')",
    "prompt_completion": "'prompt' and 'completion' (each text or a list of turns)",
    "text": "'text'",
}
_ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"developer": "system"}  # OpenAI's system turn for its reasoning models (serve reads it so too)
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SHAREGPT_CALLS = ("function_call", "observation", "function", "tool")  # ShareGPT's agent turns: not read
_DETECT_ROWS = 8  # good rows looked at to detect a file's format
_DETECT_SCAN = 100  # ...or this many rows, once at least one good row is seen
_SHOWN = 5  # bad rows quoted in messages


class BadRowError(Exception):
    """A row that does not fit its format. `reason` says precisely why (no location)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- detection


def _fits(row: dict, fmt: str) -> bool:
    if fmt == "messages":
        return "messages" in row or "conversations" in row
    if fmt == "alpaca":
        return "instruction" in row and "output" in row
    if fmt == "prompt_completion":
        return "prompt" in row and "completion" in row
    return "text" in row


def detect_format(rows: list[dict], *, where: str = "the data") -> str:
    """The format most of the first few rows fit; ties go to messages, alpaca, prompt_completion,
    then text (structured keys win over a "text" column, which is often a rendering of them)."""
    sample = [row for row in rows if isinstance(row, dict)][:_DETECT_ROWS]
    if not sample:
        raise DataError(f"{where}: no readable rows to detect the format from")
    order = ("messages", "alpaca", "prompt_completion", "text")
    counts = {fmt: sum(_fits(row, fmt) for row in sample) for fmt in order}
    best = max(counts, key=lambda fmt: counts[fmt])  # max keeps the first of equals
    if counts[best] == 0:
        seen = sorted({str(key) for row in sample for key in row})
        needs = "; ".join(f"{fmt} needs {keys}" for fmt, keys in _NEEDS.items())
        raise DataError(f"{where}: cannot tell the row format from the keys {_list(seen)}; {needs}")
    return best


def _list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(n) for n in names[:limit]) or "none"
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# --------------------------------------------------------------------------- one row


def to_record(row: dict, fmt: str, location: str = "<memory>", train_on: str = "all") -> Record:
    """Convert one row of format `fmt`; raises `BadRowError` saying what is wrong with it.
    `train_on` (data.train_on): "all" trains every assistant turn the row does not keep out of the
    loss, "last" its final assistant turn only (`last_turn_only`)."""
    record = _record(row, fmt, location)
    return last_turn_only(record) if train_on == "last" else record


def last_turn_only(record: Record) -> Record:
    """`record` with every assistant turn but the final one kept out of the loss, context as
    `weight: 0` makes it (data.train_on=last). A row whose final assistant turn is itself kept out
    is a bad row: nothing is left to train. A text row has no turns: refused (DataError)."""
    if record.messages is None:
        raise DataError(f"{record.source}: a text row has no turns, so data.train_on=last has no final assistant turn "
                        f"to train; set data.train_on=all, or give chat rows (messages, alpaca, prompt_completion)")
    final = max(i for i, m in enumerate(record.messages) if m["role"] == "assistant")
    if final in record.untrained:
        raise BadRowError("the final assistant turn is kept out of the loss ('weight': 0 or 'train': false) and "
                          "data.train_on=last trains that turn only, so nothing to train on")
    earlier = (i for i, m in enumerate(record.messages[:final]) if m["role"] == "assistant")
    return dataclasses.replace(record, untrained=tuple(sorted(set(record.untrained).union(earlier))))


def _record(row: dict, fmt: str, location: str) -> Record:
    if not isinstance(row, dict):
        raise BadRowError(f"expected an object, got {_type_name(row)}")
    if fmt == "text":
        if read_tools(row) is not None:
            raise BadRowError("'tools' given with a text row: only chat turns go through the chat template that "
                              "renders them")
        return Record(text=_required_string(row, "text", fmt), source=location)
    if fmt == "alpaca":
        return Record(messages=_alpaca_messages(row), source=location, tools=read_tools(row))
    if fmt == "messages":
        messages, untrained = _chat_messages(row)
        return Record(messages=messages, source=location, tools=read_tools(row), untrained=untrained)
    if fmt == "prompt_completion":
        prompt, completion, untrained = _prompt_completion(row)
        return Record(messages=prompt + completion, source=location, prompt_turns=len(prompt), tools=read_tools(row),
                      untrained=tuple(len(prompt) + i for i in untrained))
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    kinds = ((bool, "a boolean"), (dict, "an object"), (list, "a list"), (str, "a string"), ((int, float), "a number"))
    return next((name for kind, name in kinds if isinstance(value, kind)), type(value).__name__)


def _string(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRowError(f"{what} is {_type_name(value)}, expected a string")
    if not value or value.isspace():  # isspace: no copy of a long string
        raise BadRowError(f"{what} is empty")
    return value


def _required_string(row: dict, key: str, fmt: str) -> str:
    if key not in row:
        raise BadRowError(f"missing key {key!r} ({fmt} rows need {_NEEDS[fmt]}; this row has {_list(list(row))})")
    return _string(row[key], repr(key))


def _optional_string(row: dict, key: str) -> str | None:
    """None for an absent, null or blank value (CSV and Parquet spell "absent" that way)."""
    value = row.get(key)
    if value is None or (isinstance(value, str) and (not value or value.isspace())):
        return None
    return _string(value, repr(key))


def _alpaca_messages(row: dict) -> list[dict[str, str]]:
    instruction = _required_string(row, "instruction", "alpaca")
    output = _required_string(row, "output", "alpaca")
    extra_input = _optional_string(row, "input")
    system = _optional_string(row, "system")
    prompt = instruction if extra_input is None else instruction + "\n\n" + extra_input
    messages = [{"role": "system", "content": system}] if system is not None else []
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _chat_messages(row: dict) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """The turns of a messages row, and the indices of the assistant turns kept out of the loss. The
    row's "system" key, when given, is the first turn (`with_system`)."""
    # a table holds both columns when it mixes the two, one null or blank per row
    filled = [key for key in ("messages", "conversations") if row.get(key) not in (None, "")]
    key = filled[0] if filled else "messages" if "messages" in row else "conversations"
    if key not in row:
        raise BadRowError(f"missing key 'messages' (messages rows need {_NEEDS['messages']}; this row has {_list(list(row))})")
    turns = row[key]
    if isinstance(turns, str):  # a CSV cell
        try:
            turns = decode_cell(turns, repr(key))
        except ValueError:
            raise BadRowError(f"{key!r} is a string that is not a JSON list of turns (nor Python's repr of "
                              "one)") from None
    if not isinstance(turns, list):
        raise BadRowError(f"{key!r} is {_type_name(turns)}, expected a list of turns")
    if not turns:
        raise BadRowError(f"{key!r} is an empty list")
    messages, untrained = read_turns(turns)
    roles = [message["role"] for message in messages]
    if "assistant" not in roles:
        raise BadRowError("no assistant turn, so nothing to train on")
    if roles[0] == "assistant":
        raise BadRowError("the first turn is the assistant's: it answers no prompt; start with a system or user turn")
    check_some_trained(messages, untrained)
    return with_system(row, messages, untrained, repr(key))


def with_system(row: dict, turns: list[dict[str, Any]], untrained: tuple[int, ...] = (),
                what: str = "the conversation") -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """`turns` opened by the row's "system" key as a system turn (the untrained indices moved
    with them), or as they are when the row has none (absent, null or blank). A row with both a
    "system" key and a system turn opening `what` is a bad row: which to train with is unclear."""
    system = _optional_string(row, "system")
    if system is None:
        return turns, untrained
    if turns and turns[0]["role"] == "system":
        raise BadRowError(f"both a 'system' key and a system turn opening {what}; give one")
    return [{"role": "system", "content": system}, *turns], tuple(i + 1 for i in untrained)


def check_some_trained(messages: list[dict[str, Any]], untrained: tuple[int, ...]) -> None:
    """A row whose every assistant turn is kept out of the loss has nothing to train on."""
    if untrained and all(i in untrained for i, m in enumerate(messages) if m["role"] == "assistant"):
        raise BadRowError("every assistant turn is kept out of the loss ('weight': 0 or 'train': false), so nothing "
                          "to train on")


def read_turns(turns: list, what: str = "") -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """Every turn read by `read_turn`; the indices of the assistant turns kept out of the loss; and
    the order roles must keep: a system turn only first, a tool turn only after an assistant turn
    that calls a tool (or another tool turn). `what` names the list in a reason ("'prompt'")."""
    prefix = f"{what} " if what else ""
    messages, untrained = [], []
    try:
        for number, turn in enumerate(turns, 1):
            message, trained = read_turn(turn, number)
            messages.append(message)
            if not trained:
                untrained.append(number - 1)
    except BadRowError as e:
        raise BadRowError(prefix + e.reason) from None
    roles = [message["role"] for message in messages]
    if "system" in roles[1:]:
        number = roles.index("system", 1) + 1
        raise BadRowError(f"{prefix}turn {number} is a system turn; a system message may only come first")
    caller = None  # the last turn that is not a tool's
    for i, message in enumerate(messages if "tool" in roles else ()):
        if message["role"] != "tool":
            caller = message
        elif caller is None or "tool_calls" not in caller:
            raise BadRowError(f"{prefix}turn {i + 1} is a tool turn that answers no call: a tool turn follows an "
                              "assistant turn with 'tool_calls' (or another tool turn)")
    return messages, tuple(untrained)


def _turn(turn: Any, number: int) -> dict[str, Any]:
    return read_turn(turn, number)[0]


def read_turn(turn: Any, number: int) -> tuple[dict[str, Any], bool]:
    """One turn as a message, and whether the loss may cover it: the one reader of turns, for SFT,
    preference and prompt rows alike.

    OpenAI / Hugging Face keys: `role` (system, user, assistant, tool; developer is read as
    system) and `content` (text, or text parts); on an assistant turn `tool_calls` (then the
    content may be null, empty or missing) and `reasoning_content`; on a tool turn
    `tool_call_id`; on any turn `name` (who speaks: a participant, or the tool that answered),
    `weight` (0 or 1) and `train` (a boolean), which keep an assistant turn out of the loss
    when 0 / false. ShareGPT's `from` / `value`. A null (or
    blank, or empty list) value is an absent key: a Parquet table writes every key on every turn.
    The message keeps the keys the chat template reads, and no other."""
    if not isinstance(turn, dict):
        raise BadRowError(f"turn {number} is {_type_name(turn)}, expected an object with 'role' and 'content'")
    if turn.get("role") is not None:
        role = _role_name(turn, "role", number)
        role = _ROLE_ALIASES.get(role, role)
        if role not in _ROLES:
            raise BadRowError(f"turn {number} has unknown role {role!r} (expected {', '.join(_ROLES)}; "
                              "developer is read as system)")
        content_key = "content"
    elif turn.get("from") is not None:  # ShareGPT
        name = _role_name(turn, "from", number)
        if name in _SHAREGPT_CALLS:
            raise BadRowError(f"turn {number} is a ShareGPT {name!r} turn, which is not read: give tool calls as "
                              "OpenAI messages (an assistant turn's 'tool_calls', then a 'tool' turn with the result)")
        if name not in _SHAREGPT_ROLES:
            raise BadRowError(f"turn {number} has unknown 'from' {turn['from']!r} (expected {', '.join(_SHAREGPT_ROLES)})")
        role, content_key = _SHAREGPT_ROLES[name], "value"
    else:
        raise BadRowError(f"turn {number} has no 'role' (or ShareGPT 'from'); it has {_list(list(turn))}")
    plain = len(turn) == 2 and content_key in turn  # role and content alone: the common turn, read fast
    calls = None if plain else _tool_calls(turn, number, role)
    if content_key not in turn and calls is None:
        raise BadRowError(f"turn {number} ({role}) has no {content_key!r}")
    content = turn.get(content_key)
    if not isinstance(content, str) or not content or content.isspace():  # else plain text, kept as it is
        what = f"turn {number} ({role}) {content_key}"
        content = _joined_parts(content, what)
        if calls is not None and content in (None, ""):  # a call with no text beside it
            content = ""
        elif calls is None or not isinstance(content, str):
            content = _string(content, what)
    message: dict[str, Any] = {"role": role, "content": content}
    if plain:
        return message, True
    reasoning = _turn_text(turn, "reasoning_content", number, role, "assistant")
    if reasoning is not None:
        message["reasoning_content"] = reasoning
    if calls is not None:
        message["tool_calls"] = calls
    call_id = _turn_text(turn, "tool_call_id", number, role, "tool", refuse_elsewhere=False)
    if call_id is not None:
        message["tool_call_id"] = call_id
    name = _turn_text(turn, "name", number, role, role)  # any turn's: the speaker's, or the tool's
    if name is not None:
        message["name"] = name
    return message, _trained(turn, number, role)


def flag_cell(value: Any) -> bool | None:
    """A true/false cell as a table spells it: a boolean; "true", "false", "1" or "0" in any case
    and spacing (CSV); the integer 1 or 0 (JSON, Parquet); anything else None."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0"):
        return value.strip().lower() in ("true", "1")
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and value in (0, 1):
        return bool(value)
    return value if isinstance(value, bool) else None


def _blank(value: Any) -> bool:
    """Null, a blank string or an empty list: how JSON, CSV and Parquet write an absent value."""
    return value is None or (isinstance(value, str) and (not value or value.isspace())) or value == []


def _turn_text(turn: dict, key: str, number: int, role: str, only: str, refuse_elsewhere: bool = True) -> str | None:
    """A turn's optional text `key`, which only a turn of role `only` carries (on another it is a
    bad row, or ignored with refuse_elsewhere=False)."""
    value = turn.get(key)
    if _blank(value) or (role != only and not refuse_elsewhere):
        return None
    if role != only:
        raise BadRowError(f"turn {number} ({role}) has {key!r}; only an {only} turn carries it")
    return _string(value, f"turn {number} ({role}) {key!r}")


def _tool_calls(turn: dict, number: int, role: str) -> list[dict[str, Any]] | None:
    """An assistant turn's `tool_calls`, checked: [{"type": "function", "function": {"name": str,
    "arguments": JSON text or an object}, "id"?}, ...]; None when it has none."""
    value = turn.get("tool_calls")
    what = f"turn {number} ({role}) 'tool_calls'"
    if isinstance(value, str) and not _blank(value):  # a list written as text inside the turn
        try:
            value = decode_cell(value, what)
        except ValueError:
            raise BadRowError(f"{what} is a string that is not a JSON list of calls") from None
    if _blank(value):
        return None
    if role != "assistant":
        raise BadRowError(f"{what}: only an assistant turn calls tools")
    if not isinstance(value, list):
        raise BadRowError(f"{what} is {_type_name(value)}, expected a list of calls")
    return [_tool_call(call, f"{what} entry {i}") for i, call in enumerate(value, 1)]


_CALL_LAYOUT = '{"type": "function", "function": {"name": ..., "arguments": ...}}'


def _tool_call(call: Any, what: str) -> dict[str, Any]:
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        raise BadRowError(f"{what} is not a function call ({_CALL_LAYOUT})")
    if call.get("type") not in (None, "function"):
        raise BadRowError(f"{what} has type {call['type']!r}; only function calls are read ({_CALL_LAYOUT})")
    function = {k: v for k, v in call["function"].items() if v is not None}  # a Parquet struct's absent keys
    name, arguments = function.get("name"), function.get("arguments")
    if not isinstance(name, str) or not name.strip():
        raise BadRowError(f"{what} has no function name ({_CALL_LAYOUT})")
    if isinstance(arguments, str):
        try:
            json.loads(arguments)
        except (ValueError, RecursionError):
            raise BadRowError(f"{what} 'arguments' is text that is not JSON") from None
    elif not isinstance(arguments, dict):
        raise BadRowError(f"{what} 'arguments' is {_type_name(arguments)}, expected JSON text or an object")
    return {**{k: v for k, v in call.items() if v is not None}, "function": function}


def _trained(turn: dict, number: int, role: str) -> bool:
    """Whether the loss may cover the turn: `weight` 0 or `train` false keep it out (OpenAI's and
    axolotl's per-turn flags); only an assistant turn is ever trained, so one marked 1 / true is a
    bad row elsewhere."""
    weight, train = turn.get("weight"), turn.get("train")
    trained = True
    if weight is not None:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or weight not in (0, 1):
            raise BadRowError(f"turn {number} ({role}) 'weight' is {weight!r}; a turn's weight is 0 (kept out of "
                              "the loss) or 1")
        trained = weight == 1
    if train is not None:
        if not isinstance(train, bool):
            raise BadRowError(f"turn {number} ({role}) 'train' is {train!r}, expected true or false")
        if weight is not None and train != trained:
            raise BadRowError(f"turn {number} ({role}) has 'weight' {weight!r} and 'train' {train!r}, which disagree")
        trained = train
    if role != "assistant" and trained and (weight is not None or train is not None):
        raise BadRowError(f"turn {number} ({role}) is marked for the loss, but only assistant turns are trained")
    return trained


def text_answer(message: dict[str, Any]) -> str | None:
    """An assistant turn's content when non-blank text is all it carries (no tool calls, no
    reasoning): the reference answer exact match and verifiable rewards compare a completion
    with; None otherwise (a turn that only calls a tool has no text answer)."""
    if "tool_calls" in message or "reasoning_content" in message:
        return None
    content = message.get("content")
    return content if isinstance(content, str) and content.strip() else None


def read_tools(row: dict) -> list[dict[str, Any]] | None:
    """A row's `tools`: function definitions as OpenAI and transformers' `apply_chat_template(tools=...)`
    take them ({"type": "function", "function": {"name", "description"?, "parameters"?}}, or the
    function object alone), kept as given; a CSV cell decoded like turns (`decode_cell`). None
    when absent, null, blank or empty."""
    value = row.get("tools")
    if isinstance(value, str) and not _blank(value):
        try:
            value = decode_cell(value, "'tools'")
        except ValueError:
            raise BadRowError("'tools' is a string that is not a JSON list of function definitions (nor Python's "
                              "repr of one)") from None
    if _blank(value):
        return None
    if not isinstance(value, list):
        raise BadRowError(f"'tools' is {_type_name(value)}, expected a list of function definitions")
    for i, tool in enumerate(value, 1):
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"].strip():
            raise BadRowError(f"'tools' entry {i} is not a function definition "
                              '({"type": "function", "function": {"name": ..., "parameters": ...}})')
    return value


def _role_name(turn: dict, key: str, number: int) -> str:
    """A turn's 'role' (or ShareGPT 'from'), which must be text: a list or object is a bad row."""
    if not isinstance(turn[key], str):
        raise BadRowError(f"turn {number} {key!r} is {_type_name(turn[key])}, expected a string")
    return turn[key]


def join_text_parts(content: Any) -> str | None:
    """Content given as parts, [{"type": "text", "text": ...}, ...] (OpenAI's and TRL's layout for
    multimodal messages): the texts joined, as `serve` joins a request's; None when it is not a
    list of text parts. Extra keys in a part are ignored (a Parquet table gives every part the
    keys of all, None where absent)."""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                         isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    return None


def _joined_parts(content: Any, what: str) -> Any:
    if not isinstance(content, list):
        return content
    joined = join_text_parts(content)
    if joined is None:
        kinds = sorted({str(p.get("type")) if isinstance(p, dict) else _type_name(p) for p in content} - {"text"})
        if not kinds:
            raise BadRowError(f"{what} has a text part whose 'text' is not a string")
        raise BadRowError(f"{what} is a list with {_list(kinds)} parts; only text parts "
                          "([{\"type\": \"text\", \"text\": ...}]) can be trained on")
    return joined


def decode_cell(text: str, what: str = "a cell") -> Any:
    """A list or object written into one CSV cell: JSON, or Python's repr of it (what pandas'
    `to_csv` writes: single quotes, True, None), or numpy's repr of an array (what `datasets`'
    `to_csv` writes for a list column: elements apart without commas, `['m' 'q' 't']`, and
    `array([...], dtype=object)` for a list inside a dict: `_as_python_literal`), read with
    `ast.literal_eval`, which takes literals only and runs no code. ValueError when it is neither,
    and for two strings side by side, which Python would join into one ('m' 'q' → 'mq');
    BadRowError when it holds what the readers refuse in a row (`readers.unusable_text_at`): a
    lone surrogate (an escape like "\\ud800") or a NUL."""
    try:
        value = json.loads(text, parse_float=WrittenFloat)
    except (ValueError, RecursionError):  # not JSON, or JSON that Python's json refuses
        try:
            value = ast.literal_eval(_as_python_literal(text.strip()))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError, tokenize.TokenError):
            raise ValueError("neither JSON nor a Python literal") from None
    problem = unusable_text_at(value)
    if problem is not None:
        raise BadRowError(f"{what}: {problem}")
    return value


_SKIPPED = (tokenize.NL, tokenize.NEWLINE, tokenize.COMMENT, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
_VALUES = (tokenize.STRING, tokenize.NUMBER, tokenize.NAME)


def _as_python_literal(text: str) -> str:
    """`text` as a Python literal, with numpy's array repr turned into a list's: a comma between
    two elements of a list that numpy writes side by side (`['m' 'q' 't']`, `[-1  2]`, dicts one
    a line), `array(X, dtype=...)` as X. Tokens, not characters, so nothing inside a string is
    touched. ValueError for two values side by side anywhere else (Python would join two strings
    into one); tokenize.TokenError for text that does not tokenize (an unclosed string)."""
    tokens = [t for t in tokenize.generate_tokens(io.StringIO(text).readline) if t.type not in _SKIPPED]
    out: list[str] = []
    open_brackets: list[str] = []  # "[", "{", "(", or "array" for numpy's array( ... )
    ends_value = False  # the token before ends a value: the next value needs a comma before it
    at = 0
    while at < len(tokens):
        token, following = tokens[at], tokens[at + 1].string if at + 1 < len(tokens) else ""
        at += 1
        if open_brackets[-1:] == ["array"]:
            if token.string == ",":  # the dtype=... after the list: up to the array's ")"
                while at < len(tokens) and tokens[at].string != ")":
                    at += 1
                continue
            if token.string == ")":
                open_brackets.pop()
                ends_value = True
                continue
        starts_value = token.type in _VALUES or token.string in ("[", "{", "(", "-")
        if ends_value and starts_value:
            if open_brackets[-1:] != ["["]:
                raise ValueError(f"two values side by side outside a list, before {token.string[:20]!r}")
            out.append(",")
        ends_value = False
        if token.string == "array" and following == "(":  # numpy's array([...], dtype=object): its list
            open_brackets.append("array")
            at += 1
            continue
        if token.string in ("[", "{", "("):
            open_brackets.append(token.string)
        elif token.string in ("]", "}", ")") and open_brackets:
            open_brackets.pop()
        out.append(token.string)
        ends_value = token.type in _VALUES or token.string in ("]", "}", ")")
    return " ".join(out)


def _prompt_completion(row: dict) -> tuple[list[dict[str, Any]], list[dict[str, Any]], tuple[int, ...]]:
    """TRL's prompt-completion row as (prompt turns, completion turns, indices of the completion's
    assistant turns kept out of the loss)."""
    from posttrain.data.preferences import _decoded, _prompt, _read_turns  # preferences imports this module

    for key in ("prompt", "completion"):
        if key not in row:
            raise BadRowError(f"missing key {key!r} (prompt_completion rows need {_NEEDS['prompt_completion']}; "
                              f"this row has {_list(list(row))})")
    for key in ("label", "desirable"):
        if row.get(key) not in (None, ""):
            raise BadRowError(f"a {key!r} marks an unpaired preference row (kto's format); sft would train on "
                              f"every completion, undesirable ones too: use posttrain kto, or drop the column")
    prompt = _prompt(row, "pairs")
    value = _decoded(row["completion"], what="'completion'")
    if isinstance(value, str):
        return prompt, [{"role": "assistant", "content": _string(value, "'completion'")}], ()
    if not isinstance(value, list):
        raise BadRowError(f"'completion' is {_type_name(value)}, expected a string or a list of turns")
    completion, untrained = _read_turns(value, "'completion'")
    if completion[0]["role"] != "assistant":
        raise BadRowError(f"'completion' starts with a {completion[0]['role']} turn, expected the assistant's reply")
    check_some_trained(completion, untrained)
    return prompt, completion, untrained


# --------------------------------------------------------------------------- reports


@dataclass
class Reject:
    """One malformed row: where, why, and the row (the raw text when it did not parse)."""

    location: str
    reason: str
    row: Any


@dataclass
class FileReport:
    path: str
    format: str | None = None  # None when the file had no row to detect it from
    total: int = 0
    good: int = 0
    bad: int = 0
    split: str | None = None  # the split read of a DatasetDict directory; None for any other file


@dataclass
class DataReport:
    """Row counts per file (good + bad == total, always), the first few bad rows, and the rows
    whose content is in more than one file (each as the places it is found; None: not counted,
    as when streaming)."""

    files: list[FileReport] = field(default_factory=list)
    first_bad: list[Reject] = field(default_factory=list)
    rejects_path: str | None = None
    in_several_files: list[list[str]] | None = None

    @property
    def total(self) -> int:
        return sum(f.total for f in self.files)

    @property
    def good(self) -> int:
        return sum(f.good for f in self.files)

    @property
    def bad(self) -> int:
        return sum(f.bad for f in self.files)

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 0.0

    def summary(self) -> str:
        return f"{self.total} rows from {len(self.files)} file(s): {self.good} good, {self.bad} malformed"

    def to_dict(self) -> dict[str, Any]:
        """For data_report.json (first_bad rows may hold values JSON needs `default=str` for)."""
        entry = {
            "rows": self.total, "good_rows": self.good, "bad_rows": self.bad, "rejects_path": self.rejects_path,
            "files": [{k: v for k, v in vars(f).items() if k != "split" or v is not None} for f in self.files],
            "first_bad": [vars(r).copy() for r in self.first_bad],
        }
        if self.in_several_files is not None:
            entry["rows_in_several_files"] = len(self.in_several_files)
            entry["first_in_several_files"] = self.in_several_files[:_SHOWN]
        return entry


class _CopiesAcrossFiles:
    """Rows of one content read from more than one file. A row's content is every field of its
    record but `source` (so the same conversation in two formats is one content), kept as an
    8-byte digest; copies inside one file are no concern here."""

    def __init__(self) -> None:
        self._first: dict[bytes, tuple[int, str]] = {}  # digest → (file number, location) where first read
        self.places: dict[bytes, list[str]] = {}  # digest → where read, for the contents in several files

    def add(self, file_no: int, records: list) -> None:
        for record in records:
            content = {k: v for k, v in vars(record).items() if k != "source"}
            digest = hashlib.blake2b(json.dumps(content, sort_keys=True, default=str).encode("utf-8", "surrogatepass"),
                                     digest_size=8).digest()
            first_no, first_at = self._first.setdefault(digest, (file_no, record.source))
            if first_no != file_no:
                self.places.setdefault(digest, [first_at]).append(record.source)


class _BadRows:
    """Where malformed rows go: remembered for messages, written to the rejects file
    (skip), or raised at once (error, when streaming). The rejects file is begun empty under skip
    and removed under error: what an earlier reading (an earlier run in the same directory) put
    there never stays beside this reading's report."""

    def __init__(self, policy: str, rejects_path: str | None, report: DataReport, raise_at_once: bool):
        self.policy, self.report, self.raise_at_once = policy, report, raise_at_once
        self._file = None
        if policy != "skip" and rejects_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rejects_path)
        elif policy == "skip" and rejects_path:
            os.makedirs(os.path.dirname(os.path.abspath(rejects_path)), exist_ok=True)
            # truncated: no stale rejects. backslashreplace: a lone surrogate in a row (which UTF-8
            # cannot encode) is written as its JSON escape "\\ud800", so every row survives, as read
            self._file = open(rejects_path, "w", encoding="utf-8", errors="backslashreplace")
            report.rejects_path = rejects_path

    def add(self, reject: Reject) -> None:
        if len(self.report.first_bad) < _SHOWN:
            self.report.first_bad.append(reject)
        if self.policy == "error" and self.raise_at_once:
            raise DataError(f"{reject.location}: {reject.reason} (fix the row, or set bad_rows=skip to skip bad rows)")
        if self._file is not None:
            entry = {"location": reject.location, "reason": reject.reason, "row": reject.row}
            self._file.write(json.dumps(entry, ensure_ascii=False, default=str) + "\n")

    def __enter__(self) -> "_BadRows":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._file is not None:
            self._file.close()


# --------------------------------------------------------------------------- files


def _file_records(path: str, fmt: str, counts: FileReport, bad_rows: _BadRows,
                  convert_row: Callable = to_record, detect: Callable = detect_format) -> Iterator[Any]:
    """The records of one file, counting every row and handing bad ones to `bad_rows`.
    `convert_row(row, fmt, location)` and `detect(rows, where=...)` default to this module's
    formats; the preference formats (data/preferences.py) pass their own."""

    def convert(location: str, row: Any) -> Any:
        counts.total += 1
        try:
            if isinstance(row, Malformed):
                raise BadRowError(row.reason)
            record = convert_row(row, counts.format, location)
        except BadRowError as e:
            counts.bad += 1
            bad_rows.add(Reject(location, e.reason, row.raw if isinstance(row, Malformed) else row))
            return None
        counts.good += 1
        return record

    rows: Iterable = iter_rows(path)
    counts.format = None if fmt == "auto" else fmt
    if fmt == "auto":
        rows = iter(rows)
        for location, row in rows:  # bad rows before the first good one are bad in any format
            if not isinstance(row, Malformed):
                head = _read_ahead(rows, [(location, row)])
                counts.format = detect([r for _, r in head if not isinstance(r, Malformed)], where=path)
                rows = itertools.chain(head, rows)
                break
            convert(location, row)
    for location, row in rows:
        record = convert(location, row)
        if record is not None:
            yield record


def _read_ahead(rows: Iterator, head: list) -> list:
    """Buffer a few more rows for detection; the buffer stays small so streaming stays lazy."""
    good = 1
    while good < _DETECT_ROWS and len(head) < _DETECT_SCAN:
        item = next(rows, None)
        if item is None:
            break
        head.append(item)
        good += not isinstance(item[1], Malformed)
    return head


def check_readable(path: str, detect: Callable = detect_format, fmt: str = "auto") -> None:
    """What can be known of a data file cheaply, before a model loads: it exists, a reader takes
    it, its first rows parse as a file, and (fmt auto) they are in a format `detect` knows.
    Raises DataError; bad rows are left to the read, with its policy. (A .json file is read
    whole: JSON cannot stream.)"""
    rows = iter_rows(path)
    try:
        head = [row for _, row in itertools.islice(rows, _DETECT_SCAN) if not isinstance(row, Malformed)]
    finally:
        getattr(rows, "close", lambda: None)()
    if fmt == "auto" and head:
        detect(head, where=os.fspath(path))


def _note_split(counts: FileReport, log: Callable[[str], Any]) -> None:
    """A DatasetDict directory: its split read is set in `counts` and said, with the splits not read."""
    splits = dataset_dict_splits(counts.path)
    if not splits or DICT_SPLIT not in splits:  # (no train split: refused by the reader)
        return
    counts.split = DICT_SPLIT
    others = [s for s in splits if s != DICT_SPLIT]
    skipped = f"; not read: split {', '.join(map(repr, others))} (give DIR/SPLIT to read one)" if others else ""
    log(f"{counts.path}: a DatasetDict, read through its {DICT_SPLIT!r} split{skipped}")


def _over_bad_fraction(counts: FileReport, max_bad_fraction: float) -> bool:
    """`max_bad_fraction` holds for each file: a file mostly malformed is refused by name whatever it
    is mixed with (and the mix, each file within it, never passes it either)."""
    return bool(counts.total) and counts.bad / counts.total > max_bad_fraction


def _check_bad_fraction(counts: FileReport, max_bad_fraction: float) -> None:
    if _over_bad_fraction(counts, max_bad_fraction):
        raise DataError(
            f"{counts.path}: {counts.bad} of {counts.total} rows ({counts.bad / counts.total:.2%}) are malformed, "
            f"more than max_bad_fraction={max_bad_fraction} ({max_bad_fraction:.2%}, applied to each file); "
            "fix the data or raise the threshold"
        )


def _check_has_good_rows(counts: FileReport) -> None:
    if counts.good:
        return
    why = "the file has no rows" if not counts.total else f"all {counts.total} rows are malformed"
    raise DataError(f"{counts.path}: no usable rows ({why})")


# --------------------------------------------------------------------------- policy


def _check_arguments(paths: list[str], fmt: str, bad_rows: str, max_bad_fraction: float,
                     known: tuple[str, ...] = FORMATS) -> None:
    if isinstance(paths, (str, os.PathLike)):
        raise TypeError("paths must be a list of paths, not a single path")
    if not paths:
        raise DataError("no data files given; list at least one file")
    if fmt != "auto" and fmt not in known:
        raise ValueError(f"unknown format {fmt!r}; expected auto or one of {', '.join(known)}")
    if bad_rows not in ("error", "skip"):
        raise ValueError(f"bad_rows must be 'error' or 'skip', got {bad_rows!r}")
    if not 0.0 <= max_bad_fraction <= 1.0:
        raise ValueError(f"max_bad_fraction must be between 0 and 1, got {max_bad_fraction}")


def _quoted(report: DataReport) -> str:
    lines = [f"  {r.location}: {r.reason}" for r in report.first_bad]
    if report.bad > len(report.first_bad):
        lines.append(f"  ... and {report.bad - len(report.first_bad)} more")
    return "\n".join(lines)


def _finish(report: DataReport, bad_rows: str, max_bad_fraction: float, log: Callable[[str], Any]) -> None:
    """After the last row: the error-policy failure, the skip summary and threshold."""
    if report.bad and bad_rows == "error":
        raise DataError(
            f"{report.bad} of {report.total} rows are malformed; fix them, or set bad_rows=skip to skip "
            f"them (up to max_bad_fraction):\n{_quoted(report)}"
        )
    if report.bad:
        where = f" (all written to {report.rejects_path})" if report.rejects_path else ""
        log(f"skipped {report.bad} of {report.total} rows ({report.bad_fraction:.2%}) as malformed{where}:\n{_quoted(report)}")
    for counts in report.files:
        _check_has_good_rows(counts)
    for counts in report.files:
        _check_bad_fraction(counts, max_bad_fraction)
    if report.in_several_files:
        n, first = len(report.in_several_files), " = ".join(report.in_several_files[0])
        log(f"{n} {'row appears' if n == 1 else 'rows appear'} in more than one file, each read (and trained) as "
            f"often as it appears (first: {first}); `posttrain quality` removes duplicates")


def load_records(
    paths: list[str],
    *,
    fmt: str = "auto",
    bad_rows: str = "error",
    max_bad_fraction: float = 0.01,
    rejects_path: str | None = None,
    log: Callable[[str], Any] = print,
    train_on: str = "all",
) -> tuple[list[Record], DataReport]:
    """Read every file into Records. Each file's format is detected from its first good rows
    when `fmt="auto"`. With bad_rows="error" every file is read first and one DataError lists
    how many rows are bad and where; with "skip" bad rows go to `rejects_path` (JSONL) and
    the run fails only if their fraction exceeds `max_bad_fraction`. `train_on`: `to_record`'s."""
    return _load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log,
                 functools.partial(to_record, train_on=train_on), detect_format, FORMATS)


def _load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, convert_row, detect,
          known) -> tuple[list, DataReport]:
    """`load_records` with the row converter, detector and format names as parameters."""
    _check_arguments(paths, fmt, bad_rows, max_bad_fraction, known)
    report, copies = DataReport(), _CopiesAcrossFiles()
    with _BadRows(bad_rows, rejects_path, report, raise_at_once=False) as sink:
        records = []
        for file_no, path in enumerate(paths):
            report.files.append(FileReport(os.fspath(path)))
            _note_split(report.files[-1], log)
            file_records = list(_file_records(os.fspath(path), fmt, report.files[-1], sink, convert_row, detect))
            if len(paths) > 1:  # (one file has no copies in another: no row hashed)
                copies.add(file_no, file_records)
            records.extend(file_records)
    report.in_several_files = list(copies.places.values())
    _finish(report, bad_rows, max_bad_fraction, log)
    return records, report


def iter_records(
    paths: list[str],
    *,
    fmt: str = "auto",
    bad_rows: str = "error",
    max_bad_fraction: float = 0.01,
    rejects_path: str | None = None,
    log: Callable[[str], Any] = print,
    report: DataReport | None = None,
    train_on: str = "all",
) -> Iterator[Record]:
    """Stream Records from files larger than memory, with `load_records`' policy as far as
    streaming allows: bad_rows="error" raises at the first bad row, with its location;
    "skip" writes rejects as it goes and checks `max_bad_fraction` as each file ends (a file
    with no good rows fails then too), then logs the summary once the last file ends. Pass
    `report` to read the counts as they grow and afterwards. Rows in several files are not
    counted (a digest kept per row would grow without bound). `train_on`: `to_record`'s."""
    _check_arguments(paths, fmt, bad_rows, max_bad_fraction)
    for path in paths:
        check_path(path)  # a missing last file should fail now, not hours into training
    return _stream(list(paths), fmt, bad_rows, max_bad_fraction, rejects_path, log, report or DataReport(),
                   functools.partial(to_record, train_on=train_on))


def _stream(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, report, convert_row) -> Iterator[Record]:
    with _BadRows(bad_rows, rejects_path, report, raise_at_once=True) as sink:
        for path in paths:
            counts = FileReport(os.fspath(path))
            report.files.append(counts)
            _note_split(counts, log)
            yield from _file_records(counts.path, fmt, counts, sink, convert_row)
            _check_has_good_rows(counts)
            if _over_bad_fraction(counts, max_bad_fraction):  # refused as the file ends, the summary said
                _finish(report, bad_rows, max_bad_fraction, log)
    _finish(report, bad_rows, max_bad_fraction, log)
