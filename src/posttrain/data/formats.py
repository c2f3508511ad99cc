"""Formats: rows → `Record`s, with a bad-row policy that never drops a row unannounced.

Four row formats are understood:

    alpaca    {"instruction", "input"?, "output", "system"?}
              → [system?] + user(instruction, + "\\n\\n" + input when input is non-empty)
                + assistant(output)
    messages  {"messages": [{"role", "content"}, ...]}, roles system/user/assistant;
              "conversations" is accepted in place of "messages", and ShareGPT turns
              {"from", "value"} with from = human/user/gpt/assistant/system are mapped.
    prompt_completion
              {"prompt", "completion", "system"?} (TRL's prompt-completion): the prompt as
              preferences.py reads it (text = one user turn, or turns), the completion text
              (one assistant turn) or turns; loss on the completion's assistant turns only.
    text      {"text"}: plain text for continued pre-training.

Content strings are kept exactly as given (no stripping): label tokens decoded later
must equal the assistant text. A content given as a list of text parts
([{"type": "text", "text": ...}]) is those texts joined, as `serve` reads a request; any
other part (an image) makes a bad row. A CSV cell holding a list is read as JSON or as
Python's repr (what `datasets`' and pandas' `to_csv` write), see `decode_cell`.

`load_records` reads everything into memory; `iter_records` streams. Both count every
row (`DataReport`), report each malformed one with its "file:line" and reason, and
apply `bad_rows`: "error" stops with the locations, "skip" writes every bad row to
`rejects_path` and fails only above `max_bad_fraction`.
"""

from __future__ import annotations

import ast
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from posttrain.data.readers import Malformed, check_path, iter_rows, lone_surrogate_at
from posttrain.data.records import Record
from posttrain.errors import DataError

FORMATS = ("alpaca", "messages", "prompt_completion", "text")
_NEEDS = {
    "alpaca": "'instruction' and 'output' (optional 'input', 'system')",
    "messages": "'messages' or 'conversations' (a list of turns)",
    "prompt_completion": "'prompt' and 'completion' (each text or a list of turns)",
    "text": "'text'",
}
_ROLES = ("system", "user", "assistant")
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
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


def to_record(row: dict, fmt: str, location: str = "<memory>") -> Record:
    """Convert one row of format `fmt`; raises `BadRowError` saying what is wrong with it."""
    if not isinstance(row, dict):
        raise BadRowError(f"expected an object, got {_type_name(row)}")
    if fmt == "text":
        return Record(text=_required_string(row, "text", fmt), source=location)
    if fmt == "alpaca":
        return Record(messages=_alpaca_messages(row), source=location)
    if fmt == "messages":
        return Record(messages=_chat_messages(row), source=location)
    if fmt == "prompt_completion":
        prompt, completion = _prompt_completion(row)
        return Record(messages=prompt + completion, source=location, prompt_turns=len(prompt))
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


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


def _chat_messages(row: dict) -> list[dict[str, str]]:
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
    messages = [_turn(turn, number) for number, turn in enumerate(turns, 1)]
    roles = [message["role"] for message in messages]
    if "system" in roles[1:]:
        number = roles.index("system", 1) + 1
        raise BadRowError(f"turn {number} is a system turn; a system message may only come first")
    if "assistant" not in roles:
        raise BadRowError("no assistant turn, so nothing to train on")
    if roles[0] == "assistant":
        raise BadRowError("the first turn is the assistant's: it answers no prompt; start with a system or user turn")
    return messages


def _turn(turn: Any, number: int) -> dict[str, str]:
    if not isinstance(turn, dict):
        raise BadRowError(f"turn {number} is {_type_name(turn)}, expected an object with 'role' and 'content'")
    if turn.get("role") is not None:
        role = _role_name(turn, "role", number)
        if role not in _ROLES:
            raise BadRowError(f"turn {number} has unknown role {role!r} (expected {', '.join(_ROLES)})")
        content_key = "content"
    elif turn.get("from") is not None:  # ShareGPT
        if _role_name(turn, "from", number) not in _SHAREGPT_ROLES:
            raise BadRowError(f"turn {number} has unknown 'from' {turn['from']!r} (expected {', '.join(_SHAREGPT_ROLES)})")
        role, content_key = _SHAREGPT_ROLES[turn["from"]], "value"
    else:
        raise BadRowError(f"turn {number} has no 'role' (or ShareGPT 'from'); it has {_list(list(turn))}")
    if content_key not in turn:
        raise BadRowError(f"turn {number} ({role}) has no {content_key!r}")
    what = f"turn {number} ({role}) {content_key}"
    return {"role": role, "content": _string(_joined_parts(turn[content_key], what), what)}


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
    """A list or object written into one CSV cell: JSON, or Python's repr of it (what `datasets`'
    and pandas' `to_csv` write: single quotes, True, None), read with `ast.literal_eval`, which
    takes literals only and runs no code. ValueError when it is neither; BadRowError when it holds
    a lone surrogate (an escape like "\\ud800"), as the readers refuse one in a row."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or JSON that Python's json refuses
        try:
            value = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise ValueError("neither JSON nor a Python literal") from None
    where = lone_surrogate_at(value)
    if where is not None:
        raise BadRowError(f"{what} is not valid Unicode: a lone surrogate at {where}")
    return value


def _prompt_completion(row: dict) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """TRL's prompt-completion row as (prompt turns, completion turns)."""
    from posttrain.data.preferences import _decoded, _prompt, _turns  # preferences imports this module

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
        return prompt, [{"role": "assistant", "content": _string(value, "'completion'")}]
    if not isinstance(value, list):
        raise BadRowError(f"'completion' is {_type_name(value)}, expected a string or a list of turns")
    completion = _turns(value, "'completion'")
    if completion[0]["role"] != "assistant":
        raise BadRowError(f"'completion' starts with a {completion[0]['role']} turn, expected the assistant's reply")
    return prompt, completion


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


@dataclass
class DataReport:
    """Row counts per file (good + bad == total, always) and the first few bad rows."""

    files: list[FileReport] = field(default_factory=list)
    first_bad: list[Reject] = field(default_factory=list)
    rejects_path: str | None = None

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
        return {
            "rows": self.total, "good_rows": self.good, "bad_rows": self.bad, "rejects_path": self.rejects_path,
            "files": [vars(f).copy() for f in self.files], "first_bad": [vars(r).copy() for r in self.first_bad],
        }


class _BadRows:
    """Where malformed rows go: remembered for messages, written to the rejects file
    (skip), or raised at once (error, when streaming)."""

    def __init__(self, policy: str, rejects_path: str | None, report: DataReport, raise_at_once: bool):
        self.policy, self.report, self.raise_at_once = policy, report, raise_at_once
        self._file = None
        if policy == "skip" and rejects_path:
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
    if report.bad_fraction > max_bad_fraction:
        raise DataError(
            f"{report.bad} of {report.total} rows ({report.bad_fraction:.2%}) are malformed, more than "
            f"max_bad_fraction={max_bad_fraction} ({max_bad_fraction:.2%}); fix the data or raise the threshold"
        )


def load_records(
    paths: list[str],
    *,
    fmt: str = "auto",
    bad_rows: str = "error",
    max_bad_fraction: float = 0.01,
    rejects_path: str | None = None,
    log: Callable[[str], Any] = print,
) -> tuple[list[Record], DataReport]:
    """Read every file into Records. Each file's format is detected from its first good rows
    when `fmt="auto"`. With bad_rows="error" every file is read first and one DataError lists
    how many rows are bad and where; with "skip" bad rows go to `rejects_path` (JSONL) and
    the run fails only if their fraction exceeds `max_bad_fraction`."""
    return _load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, to_record, detect_format, FORMATS)


def _load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, convert_row, detect,
          known) -> tuple[list, DataReport]:
    """`load_records` with the row converter, detector and format names as parameters."""
    _check_arguments(paths, fmt, bad_rows, max_bad_fraction, known)
    report = DataReport()
    with _BadRows(bad_rows, rejects_path, report, raise_at_once=False) as sink:
        records = []
        for path in paths:
            report.files.append(FileReport(os.fspath(path)))
            records.extend(_file_records(os.fspath(path), fmt, report.files[-1], sink, convert_row, detect))
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
) -> Iterator[Record]:
    """Stream Records from files larger than memory, with `load_records`' policy as far as
    streaming allows: bad_rows="error" raises at the first bad row, with its location;
    "skip" writes rejects as it goes, then logs the summary and checks `max_bad_fraction`
    once the last file ends. A file with no good rows fails when it ends. Pass `report`
    to read the counts afterwards."""
    _check_arguments(paths, fmt, bad_rows, max_bad_fraction)
    for path in paths:
        check_path(path)  # a missing last file should fail now, not hours into training
    return _stream(list(paths), fmt, bad_rows, max_bad_fraction, rejects_path, log, report or DataReport())


def _stream(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, report) -> Iterator[Record]:
    with _BadRows(bad_rows, rejects_path, report, raise_at_once=True) as sink:
        for path in paths:
            counts = FileReport(os.fspath(path))
            report.files.append(counts)
            yield from _file_records(counts.path, fmt, counts, sink)
            _check_has_good_rows(counts)
    _finish(report, bad_rows, max_bad_fraction, log)
