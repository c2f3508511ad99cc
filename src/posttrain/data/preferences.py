"""Preference data: rows → `PreferenceRecord`s → token sequences, for reward models,
DPO-family methods and KTO.

Three row formats are understood (detected per file, like formats.py's, or set):

    pairs     {"prompt", "chosen", "rejected", "margin"?,
               "score_chosen"? + "score_rejected"? | "score_ratio"?}   (UltraFeedback's, SHP's)
    ranking   {"prompt", "responses": [K], "ranks"?: [K ints, 0 = best, ties equal]
               | "scores"?: [K numbers, higher = better]}; neither: best first
    unpaired  {"prompt", "completion", "label": true/false}   (KTO; or "desirable")

A pair's own scores must put 'chosen' first: equal scores (score_ratio 1) are a tie and scores
favouring 'rejected' (score_ratio below 1) contradict the row; either is a bad row. A ranking
holds each answer once: repeats under the same rank are one answer, kept once; an answer given
under two ranks contradicts itself, so it is removed (every copy) and the rest of the ranking
trains — the row is bad only when no two answers ranked apart are left. Both are counted, and
the rows named, in the log and data_report.json (`repeated_responses`).

A prompt is a string (one user turn; an optional "system" key puts a system turn
first) or a list of turns as formats.py accepts them (OpenAI or ShareGPT keys, tool calls and
tool turns included). It must end with a user turn (or a tool turn: the reply follows a tool's
result); assistant turns before that are context. A response is a string or a list of turns:
the assistant's message alone, or the whole conversation repeating the prompt's turns (checked,
then stripped). A response that carries more than text (`tool_calls`, `reasoning_content`) is
kept as the whole message, and compared, ranked and rendered whole. A row's `tools` reach every
render of it, as in SFT. A pair without "prompt" gives whole
conversations on both sides; the turns before their last assistant turns are the
prompt, and must be the same on both sides. CSV and Parquet cells may hold any of the
lists JSON-encoded, or as Python's repr (what `datasets`' and pandas' `to_csv` write).

Reading, per-file detection, the bad-row policy, rejects file and `DataReport` are
formats.py's, run with this module's row converter: a row that cannot be trained on
(identical sides, tied scores, every response tied, ...) is a bad row with its file:line, never
dropped silently. Rankings are stored as dense ranks (0, 1, 2, ...; ties equal).

Encoding renders prompt + response with the chat template and labels only that final
assistant turn (content and end-of-turn marker), so every response to a prompt gets
the same prompt tokens and the same template treatment; assistant turns inside the
prompt are context and never trained on; a response that already ends with the template's
end-of-turn marker is rendered with it once, as SFT renders such an answer (counted in the log and
data_report.json, `end_of_turn_stripped`). Where the tokenizer would merge the prompt's last
characters with the response's first into one token, the prompt is tokenised on its own,
as generation tokenises it (`templates.tokenize_with_labels`).
"""

from __future__ import annotations

import json
import math
import numbers
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data import formats
from posttrain.data.formats import BadRowError, DataReport, _list, _string, _type_name, flag_cell, read_tools
from posttrain.data.pipeline import (SYNTHETIC, check_held_out, note_none_held_out, rejects_file, split_eval,
                                     synthetic_split_sizes, write_report)
from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.errors import ConfigError, DataError

PREFERENCE_FORMATS = ("pairs", "ranking", "unpaired")
_NEEDS = {
    "pairs": "'chosen' and 'rejected', and 'prompt' unless both are whole conversations",
    "ranking": "'prompt' and 'responses' (optional 'ranks' or 'scores')",
    "unpaired": "'prompt', 'completion' and 'label' (or 'desirable')",
}


@dataclass
class PreferenceRecord:
    """One prompt with its responses, before tokenisation.

    prompt:    chat turns before the response (optional system first, ends with a user or tool turn).
    responses: pairs [chosen, rejected]; ranking K of them; unpaired [completion]. Each the
               assistant's reply: its text, or, when it carries more (`tool_calls`,
               `reasoning_content`), the whole message without its role (`assistant_message`).
    ranks:     per response, 0 = best, equal = tie (pairs [0, 1]); None for unpaired.
    desirable: unpaired (KTO) only.  margin: a pair's optional margin.  source: "file:line".
    tools:     the row's function definitions, passed to every render as the template's `tools`.
    merged_responses, contradicted_responses: how many of a ranking's responses were repeats
               kept once, and copies of one answer under two ranks removed (`_distinct`).
    """

    prompt: list[dict[str, Any]]
    responses: list[str | dict[str, Any]]
    ranks: list[int] | None = None
    desirable: bool | None = None
    margin: float | None = None
    source: str = "<memory>"
    tools: list[dict[str, Any]] | None = None
    merged_responses: int = 0  # a ranking's repeats of an answer under the same rank, kept once
    contradicted_responses: int = 0  # a ranking's copies of an answer given under two ranks, removed


def assistant_message(response: str | dict[str, Any]) -> dict[str, Any]:
    """A response (`PreferenceRecord.responses`) as the assistant turn that renders it."""
    return {"role": "assistant", "content": response} if isinstance(response, str) else {"role": "assistant",
                                                                                        **response}


def _reply(turns: list[dict[str, Any]], untrained: tuple[int, ...], what: str) -> str | dict[str, Any]:
    """The last of `turns`, the assistant's reply, as a response: its text when that is all it
    carries, else the whole message without its role."""
    last = turns[-1]
    if last["role"] != "assistant":
        raise BadRowError(f"{what} ends with a {last['role']} turn, expected the assistant's reply")
    if len(turns) - 1 in untrained:
        raise BadRowError(f"{what}: the reply is kept out of the loss ('weight': 0 or 'train': false), but a "
                          "preference trains on it")
    if last.keys() == {"role", "content"}:
        return last["content"]
    return {k: v for k, v in last.items() if k != "role"}


def prompt_key(record: PreferenceRecord) -> str:
    """What makes two records' prompts the same: their turns and tools (what renders before the reply).
    Any record with `prompt` and `tools` (a `prompts.PromptRecord` too)."""
    return json.dumps([record.prompt, record.tools], sort_keys=True, default=str)


def _same_key(response: str | dict[str, Any]) -> Any:
    """What two responses are compared by (whole messages), hashable."""
    return response if isinstance(response, str) else json.dumps(response, sort_keys=True, default=str)


@dataclass
class PreferenceExample:
    """A tokenised record: one sequence (prompt + response) per response, same order.
    closing: the special tokens closing each sequence (an encoder's [SEP]), kept when the length
    cut shortens it (`cut`); 0 for a decoder's."""

    sequences: list[Example]
    ranks: list[int] | None
    desirable: bool | None
    margin: float | None
    source: str
    closing: int = 0


# --------------------------------------------------------------------------- detection


_KEYS = {"pairs": ("chosen", "rejected"), "ranking": ("responses",), "unpaired": ("completion",)}  # to detect by


def detect_preference_format(rows: list[dict], *, where: str = "the data") -> str:
    """The format most of the first few rows fit; ties go to pairs, then ranking."""
    sample = [row for row in rows if isinstance(row, dict)][: formats._DETECT_ROWS]
    if not sample:
        raise DataError(f"{where}: no readable rows to detect the preference format from")
    counts = {fmt: sum(all(key in row for key in _KEYS[fmt]) for row in sample) for fmt in PREFERENCE_FORMATS}
    best = max(counts, key=lambda fmt: counts[fmt])
    if counts[best] == 0:
        seen = sorted({str(key) for row in sample for key in row})
        needs = "; ".join(f"{fmt} needs {keys}" for fmt, keys in _NEEDS.items())
        raise DataError(f"{where}: cannot tell the preference format from the keys {_list(seen)}; {needs}")
    return best


# --------------------------------------------------------------------------- one row


def to_preference_record(row: dict, fmt: str, location: str = "<memory>") -> PreferenceRecord:
    """Convert one row of format `fmt`; raises `BadRowError` saying what is wrong with it."""
    if not isinstance(row, dict):
        raise BadRowError(f"expected an object, got {_type_name(row)}")
    if fmt in _CONVERTERS:
        return _CONVERTERS[fmt](row, location)
    raise ValueError(f"unknown preference format {fmt!r}; expected one of {', '.join(PREFERENCE_FORMATS)}")


def absent(row: dict, key: str) -> bool:
    """Missing, null or blank (CSV and Parquet spell "absent" that way)."""
    value = row.get(key)
    return value is None or (isinstance(value, str) and not value.strip())


def _required(row: dict, key: str, fmt: str) -> Any:
    if key not in row:
        raise BadRowError(f"missing key {key!r} ({fmt} rows need {_NEEDS[fmt]}; this row has {_list(list(row))})")
    return row[key]


_TURNS_TEXT = re.compile(r"""\s*\[\s*\{\s*['"](role|from)['"]\s*:""")  # the start of a list of turns, as text


def _decoded(value: Any, any_list: bool = False, what: str = "a cell") -> Any:
    """A list from a CSV/Parquet cell (JSON, or Python's repr: `formats.decode_cell`), decoded.
    Text responses stay text unless they decode to a list that can only mean turns: an empty
    one, or one holding anything but plain text and numbers ('[{"content": ...}]' is turns
    missing their roles, a bad row as in JSON Lines); with any_list, where text is never
    valid, any list. Text that starts like a list of turns but is neither is a bad row, never
    trained on as text."""
    if not isinstance(value, str) or not value.lstrip().startswith("["):
        return value
    try:
        decoded = formats.decode_cell(value, what)
    except ValueError:
        if _TURNS_TEXT.match(value):
            raise BadRowError(f"{what} starts like a list of turns but is neither JSON nor a Python literal; "
                              "write the cell as JSON (json.dumps of the list)") from None
        return value
    if not isinstance(decoded, list):
        return value
    is_text = decoded and all(isinstance(item, (str, int, float)) for item in decoded)  # '[1, 2]', "['a']"
    return decoded if any_list or not is_text else value


def _turns(value: list, what: str) -> list[dict[str, Any]]:
    return _read_turns(value, what)[0]


def _read_turns(value: list, what: str) -> tuple[list[dict[str, Any]], tuple[int, ...]]:
    """`formats.read_turns` of a non-empty list: the turns and those kept out of the loss."""
    if not value:
        raise BadRowError(f"{what} is an empty list")
    return formats.read_turns(value, what)


def _first_difference(a: list, b: list) -> int:
    """1-based number of the first turn where `a` and `b` differ."""
    return next((i for i, (x, y) in enumerate(zip(a, b), 1) if x != y), min(len(a), len(b)) + 1)


def _check_prompt(turns: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    if not turns:
        raise BadRowError(f"{what} has no turns")
    role = turns[-1]["role"]
    if role not in ("user", "tool"):
        article = "an" if role == "assistant" else "a"
        raise BadRowError(f"{what} ends with {article} {role} turn; a prompt must end with a user turn (or a tool "
                          "turn's result)")
    return turns


def _prompt(row: dict, fmt: str, key: str = "prompt") -> list[dict[str, str]]:
    """The prompt turns of a row, read from its `key` (a prompt set's question may be under another
    key: `prompts.question_key`)."""
    what = repr(key)
    value = _decoded(_required(row, key, fmt), what=what)
    if isinstance(value, str):
        turns = [{"role": "user", "content": _string(value, what)}]
    elif isinstance(value, list):
        turns = _turns(value, what)
    else:
        raise BadRowError(f"{what} is {_type_name(value)}, expected a string or a list of turns")
    turns, _ = formats.with_system(row, turns, what=what)
    return _check_prompt(turns, what)


def _response(value: Any, what: str, prompt: list[dict[str, Any]]) -> str | dict[str, Any]:
    """A response: a string, [assistant message], or prompt turns + assistant message (`_reply`)."""
    value = _decoded(value, what=what)
    if isinstance(value, str):
        return _string(value, what)
    if not isinstance(value, list):
        raise BadRowError(f"{what} is {_type_name(value)}, expected a string or a list of turns")
    turns, untrained = _read_turns(value, what)
    if len(turns) > 1:
        # A conversation may leave out the system turn that a 'system' key added.
        context = prompt[1:] if prompt[0]["role"] == "system" and turns[0]["role"] != "system" else prompt
        if turns[:-1] != context:
            n = _first_difference(turns[:-1], context)
            raise BadRowError(f"{what} does not continue the prompt: it differs from it at turn {n}")
    return _reply(turns, untrained, what)


def _pair(row: dict, location: str) -> PreferenceRecord:
    for key in ("chosen", "rejected"):
        _required(row, key, "pairs")
    if absent(row, "prompt"):
        prompt, chosen, rejected = _implicit_prompt(row)
    else:
        prompt = _prompt(row, "pairs")
        chosen, rejected = (_response(row[key], repr(key), prompt) for key in ("chosen", "rejected"))
        _check_not_repeated(row["prompt"], chosen, rejected)
    if _same_key(chosen) == _same_key(rejected):
        same = "text" if isinstance(chosen, str) else "message"
        raise BadRowError(f"'chosen' and 'rejected' are the same {same}, so there is no preference")
    _check_pair_scores(row)
    return PreferenceRecord(prompt, [chosen, rejected], ranks=[0, 1], margin=_margin(row), source=location,
                            tools=read_tools(row))


def _check_pair_scores(row: dict) -> None:
    """A pair's own scores, when it carries them — UltraFeedback's `score_chosen` / `score_rejected`,
    SHP's `score_ratio` (the chosen comment's score over the rejected one's) — must put 'chosen'
    first: equal scores are a tie, no preference, and scores favouring 'rejected' contradict the
    row; either is a bad row, never trained as a preference."""
    given = [key for key in ("score_chosen", "score_rejected") if not absent(row, key)]
    if len(given) == 1:
        other = "score_rejected" if given == ["score_chosen"] else "score_chosen"
        raise BadRowError(f"{given[0]!r} without {other!r}; give both scores or neither")
    if given:
        good, bad = (_number(row[key], repr(key)) for key in given)
        if good == bad:
            raise BadRowError(f"'score_chosen' and 'score_rejected' are both {good:g}: tied scores, so no preference")
        if bad > good:
            raise BadRowError(f"'score_rejected' ({bad:g}) is above 'score_chosen' ({good:g}): the scores favour "
                              "'rejected', contradicting the row")
    if not absent(row, "score_ratio"):
        ratio = _number(row["score_ratio"], "'score_ratio'")
        if ratio <= 0:
            raise BadRowError(f"'score_ratio' is {ratio:g}; it is the chosen side's score over the rejected side's, "
                              "above 0")
        if ratio == 1:
            raise BadRowError("'score_ratio' is 1: tied scores, so no preference")
        if ratio < 1:
            raise BadRowError(f"'score_ratio' is {ratio:g}, below 1: the scores favour 'rejected', contradicting "
                              "the row")


_REPEATED_PROMPT_MIN = 8  # characters: a shorter prompt ("Hi", "Q:") may begin a reply by chance


def _check_not_repeated(prompt: Any, chosen: str | dict[str, Any], rejected: str | dict[str, Any]) -> None:
    """A text prompt that both text sides begin with (Anthropic HH-RLHF's transcripts with a prompt
    column added) would be trained as part of the reply: a bad row."""
    prompt = _decoded(prompt, what="'prompt'")  # a table's cell may hold a list of turns, as text
    text = prompt.strip() if isinstance(prompt, str) else ""
    if len(text) >= _REPEATED_PROMPT_MIN and all(isinstance(side, str) and side.lstrip().startswith(text)
                                                 for side in (chosen, rejected)):
        raise BadRowError("'chosen' and 'rejected' both begin with the whole 'prompt' text, so the prompt would be "
                          "trained as part of the reply; give the sides as the replies alone (or as lists of turns "
                          "without 'prompt': their shared turns are the prompt)")


def _implicit_prompt(row: dict) -> tuple[list[dict[str, Any]], str | dict[str, Any], str | dict[str, Any]]:
    """No 'prompt': both sides are whole conversations sharing every turn but the last."""
    sides = []
    for key in ("chosen", "rejected"):
        value = _decoded(row[key], what=repr(key))
        if not isinstance(value, list):
            raise BadRowError(f"no 'prompt', and {key!r} is {_type_name(value)}; without a prompt, 'chosen' "
                              "and 'rejected' must be whole conversations (lists of turns)")
        turns, untrained = _read_turns(value, repr(key))
        sides.append((turns, _reply(turns, untrained, repr(key))))
    (chosen, chosen_reply), (rejected, rejected_reply) = sides
    if chosen[:-1] != rejected[:-1]:
        n = _first_difference(chosen[:-1], rejected[:-1])
        raise BadRowError(f"chosen and rejected do not share the prompt turns: they differ at turn {n}")
    prompt = _check_prompt(chosen[:-1], "the prompt (the turns before the last of 'chosen')")
    prompt, _ = formats.with_system(row, prompt, what="the conversations")
    return prompt, chosen_reply, rejected_reply


_FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def _number(value: Any, what: str) -> float:
    """A finite number that float32 holds: batches carry margins in float32, where 1e39 is inf
    and the loss of every step holding the row would be inf (skipped, the row never named)."""
    if isinstance(value, str):  # a CSV cell
        try:
            value = float(value)
        except ValueError:
            raise BadRowError(f"{what} is {value!r}, expected a number") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BadRowError(f"{what} is {value!r}, expected a finite number")
    try:
        number = float(value)
    except OverflowError:  # a whole number beyond float's range (JSON has no limit)
        raise BadRowError(f"{what} is a whole number too large for a float, expected a finite number") from None
    if not math.isfinite(number):
        raise BadRowError(f"{what} is {value!r}, expected a finite number")
    if abs(number) > _FLOAT32_MAX:
        raise BadRowError(f"{what} is {number:g}, expected a finite number within float32 range (±3.4e38)")
    return number


def _margin(row: dict) -> float | None:
    return None if absent(row, "margin") else _number(row["margin"], "'margin'")


def _ranking(row: dict, location: str) -> PreferenceRecord:
    prompt = _prompt(row, "ranking")
    items = _decoded(_required(row, "responses", "ranking"), any_list=True, what="'responses'")
    if not isinstance(items, list):
        raise BadRowError(f"'responses' is {_type_name(items)}, expected a list of responses")
    if len(items) < 2:
        raise BadRowError(f"'responses' has {len(items)} response(s); a ranking needs at least 2")
    responses = [_response(item, f"response {i}", prompt) for i, item in enumerate(items, 1)]
    keep, ranks, merged, contradicted = _distinct(responses, _ranks(row, responses))
    return PreferenceRecord(prompt, [responses[i] for i in keep], ranks=ranks, source=location, tools=read_tools(row),
                            merged_responses=merged, contradicted_responses=contradicted)


def _ranks(row: dict, responses: list[str | dict[str, Any]]) -> list[int]:
    """Dense ranks (0 = best) from 'ranks', 'scores', or the order of the responses."""
    given = [key for key in ("ranks", "scores") if not absent(row, key)]
    if len(given) == 2:
        raise BadRowError("both 'ranks' and 'scores' are given; give one (ranks: 0 = best; scores: higher = better)")
    values: list[float] = [float(i) for i in range(len(responses))]  # neither: best first
    for key in given:
        cell = _decoded(row[key], any_list=True, what=repr(key))
        if not isinstance(cell, list):
            raise BadRowError(f"{key!r} is {_type_name(cell)}, expected a list of numbers")
        if len(cell) != len(responses):
            raise BadRowError(f"{key!r} has {len(cell)} entries for {len(responses)} responses")
        values = [_number(v, f"{key!r} entry {i}") for i, v in enumerate(cell, 1)]
    if given == ["ranks"]:
        for i, value in enumerate(values, 1):
            if value < 0 or not value.is_integer():
                raise BadRowError(f"'ranks' entry {i} is {value:g}; ranks are whole numbers >= 0 (0 = best)")
    order = sorted(set(values), reverse=given == ["scores"])
    if len(order) == 1:
        raise BadRowError(f"all {len(responses)} responses are tied, so there is no preference")
    return [order.index(v) for v in values]


def _distinct(responses: list[str | dict[str, Any]], ranks: list[int]) -> tuple[list[int], list[int], int, int]:
    """A ranking with each answer once: (the indices kept, their dense ranks, repeats merged,
    copies removed). Copies of one answer under the same rank are one answer, kept once (the
    first); copies under different ranks contradict each other, so that answer is removed, every
    copy, and the rest of the ranking stands. A bad row when no two answers ranked apart are left."""
    keep, ranks_left, agreeing, contradicting = _each_once([_same_key(r) for r in responses], ranks)
    if ranks_left is None:
        first = contradicting[0][0]  # all tied is caught before: only a contradiction leaves < 2 ranks
        second = next(i for i in contradicting[0] if ranks[i] != ranks[first])
        same = "text" if isinstance(responses[first], str) else "message"
        raise BadRowError(f"responses {first + 1} and {second + 1} are the same {same} but ranked differently; "
                          "without the answers given under two ranks nothing ranked apart is left")
    return keep, ranks_left, sum(len(g) - 1 for g in agreeing), sum(len(g) for g in contradicting)


def _each_once(keys: list[Any], ranks: list[int]) -> tuple[list[int], list[int] | None, list[list[int]],
                                                           list[list[int]]]:
    """A ranking with each answer (equal `keys`) once: (the indices kept, their dense ranks — None when
    fewer than two ranks are left —, the groups of copies under one rank, those under two or more).
    Copies under one rank are one answer, kept once (the first); copies under two ranks contradict
    each other, so that answer is removed, every copy."""
    agreeing, contradicting = _copies(keys, ranks)
    keep = sorted(group[0] for group in agreeing)
    return keep, _dense(ranks, keep), agreeing, contradicting


def _copies(keys: list[Any], ranks: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    """The indices of equal `keys`, grouped: (the groups under one rank, those under two or more —
    one answer given under two ranks, which contradicts itself); indices in order in each group."""
    copies: dict[Any, list[int]] = {}
    for i, key in enumerate(keys):
        copies.setdefault(key, []).append(i)
    agreeing = [g for g in copies.values() if len({ranks[i] for i in g}) == 1]
    return agreeing, [g for g in copies.values() if len({ranks[i] for i in g}) > 1]


def _dense(ranks: list[int], keep: list[int]) -> list[int] | None:
    """The dense ranks (0, 1, ...) of the responses kept; None when fewer than two ranks are left."""
    left = sorted({ranks[i] for i in keep})
    return [left.index(ranks[i]) for i in keep] if len(left) >= 2 else None


def _unpaired(row: dict, location: str) -> PreferenceRecord:
    prompt = _prompt(row, "unpaired")
    completion = _response(_required(row, "completion", "unpaired"), "'completion'", prompt)
    # the key that holds a value (a table has both columns, one blank per row), else the one given
    filled = [key for key in ("label", "desirable") if not absent(row, key)]
    key = filled[0] if filled else "desirable" if "label" not in row and "desirable" in row else "label"
    value = _required(row, key, "unpaired")
    desirable = flag_cell(value)
    if desirable is None:
        raise BadRowError(f"{key!r} is {'null' if value is None else repr(value)}, expected true or false")
    return PreferenceRecord(prompt, [completion], desirable=desirable, source=location, tools=read_tools(row))


_CONVERTERS = {"pairs": _pair, "ranking": _ranking, "unpaired": _unpaired}


# --------------------------------------------------------------------------- files


def load_preference_records(
    paths: list[str],
    *,
    fmt: str = "auto",
    bad_rows: str = "error",
    max_bad_fraction: float = 0.01,
    rejects_path: str | None = None,
    log: Callable[[str], Any] = print,
) -> tuple[list[PreferenceRecord], DataReport]:
    """Read preference files with `formats.load_records`' policy (per-file detection, bad
    rows listed with file:line or skipped into `rejects_path`, `max_bad_fraction`)."""
    return formats._load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log,
                         to_preference_record, detect_preference_format, PREFERENCE_FORMATS)


# --------------------------------------------------------------------------- tokens


def encode_response(prompt: list[dict[str, Any]], response: str | dict[str, Any], tokenizer: Any, template: str,
                    source: str = "<memory>", special_tokens: bool = False, *,
                    tools: list[dict[str, Any]] | None = None) -> Example:
    """prompt + response as token ids, labelled on the response's turn only (all the template
    renders of it: content, tool calls, reasoning, end-of-turn marker); earlier assistant turns
    are context. A token straddling the prompt's end is split there, as generation tokenises the
    prompt alone (`tokenize_with_labels`). `tools`: the row's function definitions. A response
    that already ends with the template's end-of-turn marker has it stripped, as an SFT answer has
    (`templates.strip_end_of_turn`): the template writes it once.

    special_tokens: wrap the sequence in the tokenizer's own special tokens ([CLS] ... [SEP]),
    as an encoder reward model reads it; a decoder's template writes its own BOS."""
    from posttrain.data.templates import assistant_spans, check_not_rendered, strip_end_of_turn, tokenize_with_labels

    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{type(tokenizer).__name__} is a slow (Python) tokenizer; exact label masks need "
                        "character offsets, which only fast tokenizers give (load it with use_fast=True)")
    check_not_rendered(prompt, tokenizer, template, source)
    record = strip_end_of_turn(response_record(prompt, response, source, tools), tokenizer, template)
    # the response's turn only: the prompt's assistant turns are context, never rendered for spans
    text, spans = assistant_spans(record.messages, tokenizer, template, source, record.prompt_turns, tools=tools)
    ids, labels = tokenize_with_labels(tokenizer, text, spans)
    if special_tokens:
        lead, trail = special_tokens_around(tokenizer)
        ids, labels = lead + ids + trail, [IGNORE_INDEX] * len(lead) + labels + [IGNORE_INDEX] * len(trail)
    return Example(ids, labels, source)


def response_record(prompt: list[dict[str, Any]], response: str | dict[str, Any], source: str = "<memory>",
                    tools: list[dict[str, Any]] | None = None) -> Record:
    """prompt + response as the chat record SFT would train: the response its one trained turn."""
    return Record(messages=[*prompt, assistant_message(response)], source=source, prompt_turns=len(prompt),
                  tools=tools)


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids a tokenizer puts before and after a single sequence of its own ([CLS] / [SEP]
    for BERT): found by encoding one word with and without them."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    at = next((k for k in range(len(full) - len(bare) + 1) if full[k : k + len(bare)] == bare), 0)
    return list(full[:at]), list(full[at + len(bare) :])


def encode_preference(record: PreferenceRecord, tokenizer: Any, template: str,
                      special_tokens: bool = False) -> PreferenceExample:
    sequences = [encode_response(record.prompt, r, tokenizer, template, record.source, special_tokens,
                                 tools=record.tools) for r in record.responses]
    closing = len(special_tokens_around(tokenizer)[1]) if special_tokens else 0  # [SEP]: kept on a cut
    return PreferenceExample(sequences, record.ranks, record.desirable, record.margin, record.source, closing)


def cut(values: list[int], max_length: int, closing: int = 0) -> list[int]:
    """A sequence's ids (or labels) cut to `max_length` from its end, keeping its last `closing`
    (an encoder's [SEP], as its tokenizer's own truncation keeps it), so only content is lost:
    values[:max_length - closing] + values[len - closing:]. The closing tokens are kept while the
    cut leaves room for one more token (closing < max_length - 1), else the plain first max_length.
    A sequence that fits is returned whole. The one cut of training (`fit_preference_length`) and
    of an encoder reward model's scoring (`rewards.RewardModelScorer`)."""
    if len(values) <= max_length:
        return list(values)
    keep = closing if 0 < closing < max_length - 1 else 0
    return values[: max_length - keep] + values[len(values) - keep :]


def fit_preference_length(examples: list[PreferenceExample], max_length: int,
                          policy: str = "truncate") -> tuple[list[PreferenceExample], dict]:
    """Apply the length policy to whole records. "truncate" cuts each over-long sequence's
    end (the prompt is kept; an encoder's closing [SEP], `PreferenceExample.closing`, stays:
    `cut`); "drop" drops a record with any over-long sequence. Either way
    a record with a sequence left without label tokens (prompt too long) is dropped, since
    its responses can no longer be compared.

    Responses ranked differently may come out as the same tokens — the text differed, but only in
    what the cut removed or in what the chat template normalises (many templates trim each
    message): a preference between identical inputs teaches nothing (a pair) or the impossible (a
    ranking). They go as reading settles an answer given twice (`_each_once`): under two ranks every
    copy is removed, under one rank (a tie) it is kept once, and the rest of the ranking trains; a
    record left without two ranks (a pair, always) is dropped. Every drop and removal is counted in
    the report (`removed_identical`: the responses removed, both kinds); the records with identical
    responses are named by file:line."""
    if policy not in ("truncate", "drop"):
        raise ConfigError(f"unknown length policy {policy!r}; choose truncate or drop")
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    report = {"records": len(examples), "max_length": max_length, "policy": policy, "too_long_records": 0,
              "truncated_sequences": 0, "dropped_too_long": 0, "dropped_no_labels": 0, "dropped_identical": 0,
              "trimmed_identical": 0, "removed_identical": 0, "identical_sources": []}
    kept = []
    for example in examples:
        over = [len(s) > max_length for s in example.sequences]
        report["too_long_records"] += any(over)
        if any(over) and policy == "drop":
            report["dropped_too_long"] += 1
            continue
        closing = example.closing
        sequences = [Example(cut(s.input_ids, max_length, closing), cut(s.labels, max_length, closing), s.source)
                     if o else s for s, o in zip(example.sequences, over)]
        if any(s.num_label_tokens == 0 for s in sequences):
            report["dropped_no_labels"] += 1
            continue
        ranks = example.ranks
        if ranks is not None:
            keep, ranks_left, _, _ = _each_once([(tuple(s.input_ids), tuple(s.labels)) for s in sequences], ranks)
            if len(keep) < len(sequences):
                report["identical_sources"].append(example.source)
                ranks = ranks_left
                if ranks is None:
                    report["dropped_identical"] += 1
                    continue
                report["trimmed_identical"] += 1
                report["removed_identical"] += len(sequences) - len(keep)
                sequences, over = [sequences[i] for i in keep], [over[i] for i in keep]
        report["truncated_sequences"] += sum(over)  # of the sequences kept
        kept.append(PreferenceExample(sequences, ranks, example.desirable, example.margin, example.source, closing))
    report["dropped_records"] = report["dropped_too_long"] + report["dropped_no_labels"] + report["dropped_identical"]
    report["summary"] = _length_summary(report)
    return kept, report


def _length_summary(r: dict) -> str:
    line = f"{r['too_long_records']} of {r['records']} records have a sequence longer than {r['max_length']} tokens"
    if r["policy"] == "truncate" and r["truncated_sequences"]:
        line += f": {r['truncated_sequences']} sequences truncated"
    elif r["dropped_too_long"]:
        line += ": dropped"
    if r["dropped_no_labels"]:
        line += f"; {r['dropped_no_labels']} dropped with a response left without label tokens (prompt too long)"
    if r["dropped_identical"]:
        line += (f"; {r['dropped_identical']} dropped whose differently ranked responses are the same tokens after "
                 "the chat template and the cut")
    if r["trimmed_identical"]:
        line += (f"; {r['removed_identical']} responses removed from {r['trimmed_identical']} rankings, the same "
                 "tokens as another after the chat template and the cut (under two ranks: every copy; under one: "
                 "all but the first; the rest of each ranking kept)")
    if r["identical_sources"]:
        shown = r["identical_sources"]
        line += f" ({', '.join(shown[:5])}{', …' if len(shown) > 5 else ''})"
    return line


# --------------------------------------------------------------------------- config → examples


@dataclass
class PreparedPreferences:
    train: list[PreferenceExample]
    eval: list[PreferenceExample]
    eval_records: list[PreferenceRecord]  # held-out records (for generation-based metrics)
    report: dict = field(default_factory=dict)


def _read(files: list[str], cfg, run_dir: Path | None, log: Callable[[str], None], name: str):
    if SYNTHETIC in files:
        raise ConfigError(f"data.{name}_files: 'synthetic' cannot be mixed with files")
    records, report = load_preference_records(
        files, fmt=cfg.format, bad_rows=cfg.bad_rows, max_bad_fraction=cfg.max_bad_fraction,
        rejects_path=rejects_file(run_dir, name), log=log,
    )
    return records, report.to_dict()


def _synthetic(cfg, seed: int) -> tuple[list[PreferenceRecord], list[PreferenceRecord]]:
    """Bundled verifiable preferences; held-out prompts never appear in training."""
    from posttrain.data import synthetic

    kind = cfg.synthetic_kind
    train, held_out = synthetic.make_preference_split(cfg.synthetic_tasks, *synthetic_split_sizes(cfg), seed=seed,
                                                      kind=kind, num_responses=cfg.synthetic_responses)
    return ([to_preference_record(row, kind, f"synthetic-train:{i}") for i, row in enumerate(train)],
            [to_preference_record(row, kind, f"synthetic-eval:{i}") for i, row in enumerate(held_out)])


def _encode_split(records, tokenizer, template: str, cfg, log, name: str,
                  special_tokens: bool = False) -> tuple[list[PreferenceExample], dict]:
    from posttrain.data.pipeline import check_unrendered, encoded_or_skipped
    from posttrain.data.templates import DoubledMarkers

    unrendered: list[str] = []  # rows the chat template cannot render: bad rows under bad_rows=skip
    doubled = DoubledMarkers()  # rows with a response ending in the end-of-turn marker (stripped)

    def encode(record: PreferenceRecord) -> PreferenceExample:
        example = encode_preference(record, tokenizer, template, special_tokens)
        doubled.count([response_record(record.prompt, r, record.source, record.tools) for r in record.responses],
                      tokenizer, template)
        return example

    examples = [e for e in (encoded_or_skipped(encode, record, cfg, unrendered) for record in records)
                if e is not None]
    check_unrendered(unrendered, len(records), cfg, log, name)
    if doubled.rows:
        log(doubled.summary(name))
    examples, length = fit_preference_length(examples, cfg.max_length, cfg.overlength)
    length["unrendered"] = len(unrendered)
    length |= doubled.entry()
    length["repeated_responses"] = repeated = _repeated(records)
    kinds = sorted({"unpaired" if r.ranks is None else f"{len(r.responses)} responses" for r in records})
    log(f"{name}: {len(examples)} preference records ({', '.join(kinds)}); {length['summary']}")
    if repeated["records"]:
        shown = ", ".join(repeated["sources"][:5]) + (", …" if repeated["records"] > 5 else "")
        log(f"{name}: repeated responses in {repeated['records']} rankings: {repeated['merged']} merged (the same "
            f"answer under the same rank, kept once), {repeated['removed_contradicted']} removed (one answer under "
            f"two ranks; the rest of each ranking kept) ({shown})")
    return examples, length


_SOURCES_SHOWN = 20  # rows named in data_report.json; the counts cover them all


def _repeated(records: list[PreferenceRecord]) -> dict:
    """How many ranking responses `_distinct` merged or removed, and in which rows (the first
    _SOURCES_SHOWN)."""
    touched = [r for r in records if r.merged_responses or r.contradicted_responses]
    return {"merged": sum(r.merged_responses for r in touched),
            "removed_contradicted": sum(r.contradicted_responses for r in touched),
            "records": len(touched), "sources": [r.source for r in touched[:_SOURCES_SHOWN]]}


def prepare_preference_data(cfg, tokenizer, run_dir: Path | None, seed: int, log: Callable[[str], None] = print,
                            special_tokens: bool = False) -> PreparedPreferences:
    """Load train (and eval) preference data per `cfg` (a PreferenceDataConfig) into
    examples, as `pipeline.prepare_sft_data` does for SFT; write data_report.json.
    special_tokens: for an encoder reward model (see `encode_response`)."""
    from posttrain.data.templates import adopt_template

    template = adopt_template(tokenizer, cfg.template)
    if cfg.train_files == [SYNTHETIC]:
        train_records, eval_records = _synthetic(cfg, seed)
        read_report = {"source": "synthetic", "kind": cfg.synthetic_kind, "tasks": list(cfg.synthetic_tasks),
                       "rows": len(train_records) + len(eval_records), "bad": 0}
        eval_read = {"rows": len(eval_records), "held_out_prompts_unique": True}
        if cfg.eval_files:  # held-out files given: they, not the synthetic split, are the held-out set
            eval_records, eval_read = _read(cfg.eval_files, cfg, run_dir, log, "eval")
    elif cfg.eval_files:
        train_records, read_report = _read(cfg.train_files, cfg, run_dir, log, "train")
        eval_records, eval_read = _read(cfg.eval_files, cfg, run_dir, log, "eval")
    else:
        records, read_report = _read(cfg.train_files, cfg, run_dir, log, "train")
        # by prompt: the rows of one prompt (SHP's comment pairs, a KTO set's good and bad completion)
        # are held out together, so held-out figures are never taken on a prompt the run trained on
        train_records, eval_records = split_eval(records, cfg.eval_fraction, seed, key=prompt_key)
        eval_read = {"rows": len(eval_records), "split_from_train": True, "held_out_prompts_unique": True,
                     "prompts": len({prompt_key(r) for r in eval_records})}
        note_none_held_out(cfg, records, eval_records, log)
    train, train_len = _encode_split(train_records, tokenizer, template, cfg, log, "train", special_tokens)
    if not train:
        raise DataError(f"none of the {len(train_records)} training records is left after the length policy "
                        f"({train_len['summary']}); raise data.max_length or shorten the prompts")
    evaluation, eval_len = (_encode_split(eval_records, tokenizer, template, cfg, log, "eval", special_tokens)
                            if eval_records else ([], {}))
    report = {"train_read": read_report, "eval_read": eval_read, "train_length": train_len, "eval_length": eval_len,
              "train_records": len(train), "eval_records": len(evaluation),
              "train_sequences": sum(len(e.sequences) for e in train),
              "train_label_tokens": sum(s.num_label_tokens for e in train for s in e.sequences)}
    write_report(run_dir, report)
    check_held_out(cfg, len(evaluation), eval_read, eval_len, eval_len.get("summary"))
    return PreparedPreferences(train, evaluation, eval_records, report)
