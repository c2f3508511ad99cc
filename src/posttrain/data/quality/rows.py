"""Rows for the quality pass: read with the training stages' readers and bad-row rules, kept
with the row exactly as read (so the kept rows are written back unchanged), and seen through
three texts every check agrees on.

    prompt     the turns before the response (system, user and tool turns; a preference row's prompt)
    response   what the model is trained to produce: assistant turns (not those a row keeps out of
               the loss: a prompt-completion row's prompt, `weight: 0` / `train: false`); a pair's
               chosen response, a ranking's best (all tied best); a KTO row's completion when
               desirable, else ""
    full       every text of the row, responses rejected or not included
    instruction  the first user turn (what the statistics of prompts describe: a system prompt
               shared by every row would hide the instructions' variety); "" for text rows

Each turn, and each preference response, gives one text (`message_text`): an agent turn's
reasoning, its content, then each tool call as a fenced block `name(arguments)`, the arguments the
JSON text as written (an object as `json.dumps` writes it), one per line. The fence makes the
filters read a call as they read code, not as prose (its arguments' keys repeat by design); word
counts, echo, dedup and decontamination read it whole. A row's `tools` (function definitions) are
in none of the texts: an agent dataset repeats the same definitions on every row, which would make
every row a near duplicate of every other. PII redaction reads every string of the row as read,
tools and calls included (run.py). Benchmark files for decontamination are read by
`load_eval_items` (a question without its answer is an item too) and searched as `eval_text` says.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from posttrain.data import formats
from posttrain.data.formats import FORMATS, DataReport, detect_format, to_record
from posttrain.data.preferences import (PREFERENCE_FORMATS, PreferenceRecord, detect_preference_format,
                                        to_preference_record)
from posttrain.data.prompts import PROMPT_FORMATS, PromptRecord, detect_prompt_format, to_prompt_record
from posttrain.data.records import Record
from posttrain.data.templates import trained_turns
from posttrain.errors import DataError

ALL_FORMATS = FORMATS + PREFERENCE_FORMATS
_PREFERENCE_KEYS = ("chosen", "rejected", "responses")
_UNPAIRED_KEYS = ("label", "desirable")  # a 'completion' with one of these is KTO's; without, sft's prompt_completion


@dataclass
class Row:
    raw: Any  # the row as read (a dict), rewritten only by PII redaction
    record: Record | PreferenceRecord
    format: str
    source: str  # "file:line"
    prompt: str = ""
    response: str = ""
    full: str = ""
    turns: int = 1
    instruction: str = ""

    def __post_init__(self) -> None:
        self.prompt, self.response, self.full, self.turns = texts(self.record)
        turns = self.record.prompt if isinstance(self.record, PreferenceRecord) else self.record.messages or []
        self.instruction = next((t["content"] for t in turns if t["role"] == "user"), "")


def texts(record: Record | PreferenceRecord) -> tuple[str, str, str, int]:
    """(prompt, response, full, turns) of a record; see the module docstring."""
    if isinstance(record, PreferenceRecord):
        prompt = "\n".join(map(message_text, record.prompt))
        responses = [message_text(response) for response in record.responses]
        trained = [responses[i] for i in trained_responses(record)]
        return prompt, "\n".join(trained), "\n".join([prompt, *responses]), len(record.prompt) + 1
    if record.text is not None:
        return "", record.text, record.text, 1
    messages = record.messages
    prompt = "\n".join(message_text(m) for m in messages if m["role"] != "assistant")
    # a prompt-completion row's prompt turns and the turns marked out of the loss are context only
    response = "\n".join(message_text(messages[i])
                         for i in trained_turns(messages, record.prompt_turns, record.untrained))
    return prompt, response, "\n".join(map(message_text, messages)), len(messages)


def message_text(message: str | dict[str, Any]) -> str:
    """One text for a turn, or a preference response (a string, or the message without its role):
    its reasoning, its content and each tool call (`call_text`), one per line, the empty left out."""
    if isinstance(message, str):
        return message
    parts = [message.get("reasoning_content"), message.get("content"),
             *map(call_text, message.get("tool_calls") or ())]
    return "\n".join(part for part in parts if isinstance(part, str) and part)


def call_text(call: dict[str, Any]) -> str:
    """A tool call as a fenced block "```\\nname(arguments)\\n```": the arguments as the row writes
    them (JSON text), or an object as `json.dumps` writes it."""
    function = call.get("function", call)
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False, default=str)
    return f"```\n{function.get('name')}({arguments})\n```"


def trained_responses(record: PreferenceRecord) -> list[int]:
    """Which of a preference record's responses are its trained response (see the module
    docstring): a pair's chosen, a ranking's best (every one tied best), a desirable KTO
    completion; none for an undesirable one."""
    if record.ranks is None:
        return list(range(len(record.responses))) if record.desirable else []
    return [i for i, rank in enumerate(record.ranks) if rank == min(record.ranks)]


def detect_any_format(rows: list[dict], *, where: str = "the data") -> str:
    """A preference format when the first rows have preference keys, else an SFT format."""
    sample = [row for row in rows if isinstance(row, dict)][: formats._DETECT_ROWS]
    if any(key in row for row in sample for key in _PREFERENCE_KEYS) or \
            any("completion" in row and any(key in row for key in _UNPAIRED_KEYS) for row in sample):
        return detect_preference_format(rows, where=where)
    return detect_format(rows, where=where)


def convert(row: Any, fmt: str, location: str = "<memory>") -> Row:
    """One row of any format as a `Row`; raises formats.BadRowError when it is malformed."""
    record = to_preference_record(row, fmt, location) if fmt in PREFERENCE_FORMATS else to_record(row, fmt, location)
    return Row(raw=row, record=record, format=fmt, source=location)


def load_rows(paths: list[str], *, fmt: str, bad_rows: str, max_bad_fraction: float,
              rejects_path: str | None, log: Callable[[str], Any]) -> tuple[list[Row], DataReport]:
    """Every well-formed row of the files, in order; malformed ones are handled by the training
    stages' policy (formats.load_records): stop, or skip into `rejects_path` with file:line."""
    return formats._load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, convert, detect_any_format,
                         ALL_FORMATS)


def load_eval_items(path: str, log: Callable[[str], Any]) -> tuple[list[Row | PromptRecord], DataReport]:
    """Every benchmark item of an evaluation file, malformed rows skipped and counted. A whole
    training row (SFT or preference) is read as one, every text of it at hand; any other row as
    `posttrain evaluate` reads a prompt set (data/prompts.py): a conversation ending with the
    user's turn, an alpaca row without an output, `{"prompt", "answer"?}`. A file fitting no
    training format is read as a prompt set, or refused naming the keys those read."""

    def detect(rows: list[dict], *, where: str) -> str:
        try:
            return detect_any_format(rows, where=where)
        except DataError:
            return detect_prompt_format(rows, where=where)

    def item(row: Any, fmt: str, location: str) -> Row | PromptRecord:
        if fmt in ALL_FORMATS:
            try:
                return convert(row, fmt, location)
            except formats.BadRowError:
                if fmt not in PROMPT_FORMATS and fmt != "prompt_completion":
                    raise  # a preference or text row has no form without its answer
        return to_prompt_record(row, "prompt" if fmt == "prompt_completion" else fmt, location)

    return formats._load([path], "auto", "skip", 1.0, None, log, item, detect, ALL_FORMATS + PROMPT_FORMATS)


def eval_text(item: Row | PromptRecord, on: str) -> str:
    """What of a benchmark item is searched for in the training rows: with on=full every text of
    it (a prompt record's prompt and answer); with on=prompt the prompt's turns but the system's
    (a system prompt the items share is no leak, and searched with it, a short question would be
    found only beside it). A row without a prompt (text) is searched whole."""
    if isinstance(item, PromptRecord):
        turns = item.prompt
        full = "\n".join([*map(message_text, turns), *([item.answer] if item.answer else [])])
    else:
        record = item.record
        turns = record.prompt if isinstance(record, PreferenceRecord) else \
            [m for m in record.messages or [] if m["role"] != "assistant"]
        full = item.full
    prompt = "\n".join(message_text(turn) for turn in turns if turn["role"] != "system")
    return full if on == "full" or not prompt else prompt


def reconvert(row: Row, raw: Any) -> Row:
    """The same row with new raw content (after redaction)."""
    return convert(raw, row.format, row.source)

