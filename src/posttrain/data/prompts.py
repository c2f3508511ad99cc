"""Prompt data for online RL: rows → `PromptRecord`s (the turns to complete, an optional
reference answer for verifiers, and any other fields reward functions may read).

Accepted rows, detected per file like formats.py's:

    prompt    {"prompt": str | turns, "system"?, "answer"?, ...}   the turns must end with a user turn
                                                                   (or a tool turn's result)
    messages  {"messages": [...]} (or ShareGPT "conversations")    prompt = every turn before the
                                                                   last assistant turn; that turn
                                                                   is the answer (a conversation
                                                                   ending with the user's or a
                                                                   tool's turn is all prompt, with
                                                                   no answer)
    alpaca    {"instruction", "input"?, "output"?}                 prompt = the instruction (+ input),
                                                                   answer = the output

so SFT files double as RL prompt sets. A prompt row's question is the first of `QUESTION_KEYS`
it has ("prompt", "question", "problem": GSM8K's and MATH's keys too), and its reference answer
the first of `ANSWER_KEYS` it gives, not blank ("answer", else "solution"); a key not read is
one of the row's other fields. A row's `tools` (function definitions) are rendered into
its prompt by the chat template and reach reward functions as the row's "tools". Reading, the
bad-row policy (file:line, skip into a rejects file, `max_bad_fraction`) and the report are
formats.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from posttrain.data import formats
from posttrain.data.formats import BadRowError
from posttrain.data.pipeline import SYNTHETIC, note_none_held_out, rejects_file, split_eval, synthetic_split_sizes
from posttrain.data.preferences import prompt_key
from posttrain.data.records import WrittenFloat
from posttrain.errors import ConfigError, DataError

PROMPT_FORMATS = ("prompt", "messages", "alpaca")
QUESTION_KEYS = ("prompt", "question", "problem")  # a prompt row's question: the first of these it has
ANSWER_KEYS = ("answer", "solution")  # its reference answer: the first of these given, not blank
_RESERVED = {"system", "answer", "messages", "conversations", "instruction", "input", "output", "tools"}
_NEEDS = "'prompt', 'question' or 'problem' (with an optional 'answer' or 'solution')"


@dataclass
class PromptRecord:
    prompt: list[dict[str, Any]]  # chat turns, ending with a user (or tool) turn
    answer: str | None = None  # reference answer, for verifiable rewards
    fields: dict[str, Any] = field(default_factory=dict)  # the row's other keys, passed to reward functions
    source: str = "<memory>"
    tools: list[dict[str, Any]] | None = None  # function definitions, rendered into the prompt by the template

    def reward_row(self) -> dict[str, Any]:
        """What a reward function sees of the row besides the prompt: answer, tools and extra fields."""
        return {**self.fields, "answer": self.answer, **({} if self.tools is None else {"tools": self.tools})}


def detect_prompt_format(rows: list[dict], *, where: str = "the data") -> str:
    objects = [r for r in rows if isinstance(r, dict)]
    if objects and 2 * sum(question_key(r) is not None for r in objects) > len(objects):  # a stray row is a bad row
        return "prompt"
    if objects and 2 * sum("instruction" in r and "messages" not in r for r in objects) > len(objects):
        return "alpaca"  # "output" is optional in a prompt set: formats.detect_format would want it
    try:
        fmt = formats.detect_format(rows, where=where)
    except DataError:
        fmt = "text"
    if fmt == "text":  # plain text has no question to answer
        raise DataError(f"{where}: cannot tell the prompt format; rows need {_NEEDS}, 'messages', or alpaca's "
                        "'instruction'")
    return fmt


def question_key(row: dict) -> str | None:
    """The key of a prompt row's question: the first of `QUESTION_KEYS` the row has."""
    return next((key for key in QUESTION_KEYS if key in row), None)


def answer_key(row: dict) -> str | None:
    """The key of a row's reference answer: the first of `ANSWER_KEYS` given, not null or blank."""
    return next((key for key in ANSWER_KEYS if not _blank(row.get(key))), None)


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def to_prompt_record(row: dict, fmt: str, location: str = "<memory>") -> PromptRecord:
    if fmt not in PROMPT_FORMATS:
        raise BadRowError(f"format {fmt!r} cannot give prompts; use one of {', '.join(PROMPT_FORMATS)}")
    key = "messages" if "messages" in row else "conversations"
    turns = row.get(key) if fmt == "messages" else None
    if isinstance(turns, str):  # a CSV cell: JSON or Python's repr
        try:
            turns = formats.decode_cell(turns, repr(key))
        except ValueError:
            pass  # reported, with the row's file:line, when the conversation is read
    if isinstance(turns, list) and turns and _role(turns[-1], len(turns)) in ("user", "tool"):
        # A conversation that ends with the user's (or a tool's) turn is all prompt, with no reference answer.
        turns = [formats._turn(turn, i) for i, turn in enumerate(turns, 1)]  # ShareGPT's from / value too
        row, fmt = {**{k: v for k, v in row.items() if k != key}, "prompt": turns}, "prompt"
    read = {question_key(row), answer_key(row)} if fmt == "prompt" else {"prompt"}
    extra = {k: v for k, v in row.items() if k not in _RESERVED and k not in read}
    if fmt == "prompt":
        from posttrain.data.preferences import _prompt

        key = question_key(row)
        if key is None:
            raise BadRowError(f"missing key 'prompt' (prompt rows need {_NEEDS}; this row has "
                              f"{', '.join(map(str, row)) or 'no keys'})")
        return PromptRecord(_prompt(row, "pairs", key), reference_answer(row), extra, location,
                            formats.read_tools(row))
    if fmt == "alpaca" and formats._optional_string(row, "output") is None:  # a question; its answer, if any, a
        record = formats.to_record({**row, "output": "-"}, fmt, location)  # prompt row's
        return PromptRecord((record.messages or [])[:-1], reference_answer(row), extra, location, record.tools)
    record = formats.to_record(row, fmt, location)
    messages = record.messages or []
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    turns = messages if last is None else messages[:last]
    if not turns or turns[-1]["role"] not in ("user", "tool"):
        raise BadRowError("the conversation has no user turn before its last assistant turn to use as a prompt")
    return PromptRecord(turns, None if last is None else formats.text_answer(messages[last]), extra, location,
                        record.tools)


def reference_answer(row: dict) -> str | None:
    """The reference answer as text, from `answer_key`: None when none is given (null or blank is
    none, like other optional fields: a blank answer would make exact match reward an empty
    completion); a number as the file writes it, a boolean as JSON spells it ("true")."""
    key = answer_key(row)
    if key is None:
        return None
    answer = row[key]
    if isinstance(answer, bool):
        return "true" if answer else "false"
    if isinstance(answer, WrittenFloat):  # 2.50 and 1e3 as written, not as Python's float spells them
        return answer.written
    if not isinstance(answer, (str, int, float)):
        raise BadRowError(f"{key!r} is {formats._type_name(answer)}, expected a string")
    return str(answer)


def _role(turn: Any, number: int) -> str | None:
    try:
        return formats._turn(turn, number)["role"]
    except BadRowError:
        return None  # reported, with the row's file:line, when the whole conversation is read


def load_prompt_records(paths: list[str], *, fmt: str = "auto", bad_rows: str = "error",
                        max_bad_fraction: float = 0.01, rejects_path: str | None = None,
                        log: Callable[[str], Any] = print) -> tuple[list[PromptRecord], formats.DataReport]:
    return formats._load(paths, fmt, bad_rows, max_bad_fraction, rejects_path, log, to_prompt_record,
                         detect_prompt_format, PROMPT_FORMATS)


def _synthetic(cfg, seed: int) -> tuple[list[PromptRecord], list[PromptRecord]]:
    """The bundled verifiable tasks as prompts with their answers; held-out prompts never train."""
    from posttrain.data import synthetic

    train, held_out = synthetic.make_split(cfg.synthetic_tasks, *synthetic_split_sizes(cfg), seed=seed)
    return ([synthetic_record(e, i, "") for i, e in enumerate(train)],
            [synthetic_record(e, i, "eval") for i, e in enumerate(held_out)])


def synthetic_record(example, index: int, split: str = "eval") -> PromptRecord:
    """A synthetic task example as a prompt with its answer (and its task, for rewards)."""
    return PromptRecord([{"role": "user", "content": example.instruction}], example.output,
                        {"task": example.task}, f"synthetic:{example.task}:{split}{index}")


def prepare_prompts(cfg, run_dir: Path | None, seed: int, log: Callable[[str], None] = print,
                    eval_prompts: int | None = None) -> tuple[list[PromptRecord], list[PromptRecord], dict]:
    """Train and held-out prompts per `cfg` (a PromptDataConfig); the report as a dict.

    No held-out prompt is a training prompt: the split holds out whole prompts, and a held-out
    file's prompt also among the training prompts is dropped from the held-out side
    (`drop_trained_prompts`). eval_prompts: the run's eval.prompts; at 0, prompts the split holds
    out are neither trained on nor scored, and that is said (the split stays as it is: a resume
    may change eval.*, never the training prompts)."""
    def read(files: list[str], name: str):
        if SYNTHETIC in files:
            raise ConfigError(f"data.{name}_files: 'synthetic' cannot be mixed with files")
        records, report = load_prompt_records(files, fmt=cfg.format, bad_rows=cfg.bad_rows,
                                              max_bad_fraction=cfg.max_bad_fraction,
                                              rejects_path=rejects_file(run_dir, name), log=log)
        return records, report.to_dict()

    if cfg.train_files == [SYNTHETIC]:
        train, held_out = _synthetic(cfg, seed)
        report = {"source": "synthetic", "tasks": list(cfg.synthetic_tasks), "train": len(train), "eval": len(held_out)}
        if cfg.eval_files:  # held-out files given: they, not the synthetic split, are the held-out set
            held_out, report["eval_read"] = read(cfg.eval_files, "eval")
            report["eval"] = len(held_out)
    elif cfg.eval_files:
        (train, train_report), (held_out, eval_report) = read(cfg.train_files, "train"), read(cfg.eval_files, "eval")
        report = {"train_read": train_report, "eval_read": eval_report}
    else:
        records, report = read(cfg.train_files, "train")
        train, held_out = split_eval(records, cfg.eval_fraction, seed, key=prompt_key)  # a prompt on one side only
        report = {"train_read": report, "eval_split_from_train": len(held_out)}
        note_none_held_out(cfg, records, held_out, log)
        if held_out and eval_prompts is not None and eval_prompts <= 0:
            log(f"data.eval_fraction={cfg.eval_fraction}: {len(held_out)} held-out prompts are neither trained on "
                "nor scored (eval.prompts=0); set data.eval_fraction=0 to train on them")
    if not train:
        raise DataError("no training prompts: check data.train_files")
    if cfg.eval_files:
        held_out, report["eval_also_trained"] = drop_trained_prompts(train, held_out, cfg.eval_files, log)
    if cfg.system_prompt:
        train, held_out, report["system_prompt"] = with_system_prompt(train, held_out, cfg.system_prompt, log)
    return train, held_out, report


def drop_trained_prompts(train: list[PromptRecord], held_out: list[PromptRecord], eval_files: list[str],
                         log: Callable[[str], None] = print) -> tuple[list[PromptRecord], dict]:
    """The held-out prompts (from `eval_files`) less those that are also training prompts (the
    same turns and tools, `preferences.prompt_key`, whatever key a row gives its question under):
    a held-out figure on a trained prompt is a training figure. Returns the prompts kept and
    the count for data_report.json ({"dropped", "sources"}: the first few by file:line); a drop
    is logged, and held-out files of training prompts only are refused."""
    from posttrain.data.formats import _SHOWN

    trained = {prompt_key(record) for record in train}
    kept = [record for record in held_out if prompt_key(record) not in trained]
    dropped = [record.source for record in held_out if prompt_key(record) in trained]
    files = ", ".join(map(str, eval_files))
    if held_out and not kept:
        raise DataError(f"data.eval_files {files}: every one of the {len(held_out)} held-out prompts is also a "
                        f"training prompt, so every held-out figure would be a training figure; give other "
                        f"prompts, or leave data.eval_files empty to hold out data.eval_fraction of the training "
                        f"prompts")
    if dropped:
        log(f"data.eval_files: {len(dropped)} of the {len(held_out)} held-out prompts are also training prompts; "
            f"dropped from the held-out side (first: {', '.join(dropped[:_SHOWN])})")
    return kept, {"dropped": len(dropped), "sources": dropped[:_SHOWN]}


def with_system_prompt(train: list[PromptRecord], held_out: list[PromptRecord], system: str,
                       log: Callable[[str], None] = print) -> tuple[list[PromptRecord], list[PromptRecord], dict]:
    """`data.system_prompt`: `system` as a system turn put first in every train and held-out prompt
    that has none (so the rollouts and the held-out figures see the same prompts); a prompt with
    its own (a system turn, or the row's 'system' key) keeps it. Returns the records and the
    counts for data_report.json ({"added", "kept_own"}); the prompts that kept their own are said
    once."""
    def opened(record: PromptRecord) -> PromptRecord:
        return dataclasses.replace(record, prompt=[{"role": "system", "content": system}, *record.prompt])

    own = lambda record: record.prompt[0]["role"] == "system"  # noqa: E731 (a system turn comes only first)
    kept = sum(map(own, train + held_out))
    added = len(train) + len(held_out) - kept
    train, held_out = ([r if own(r) else opened(r) for r in records] for records in (train, held_out))
    if kept:
        log(f"data.system_prompt: {kept} prompts kept their own system turn (of {len(train) + len(held_out)})")
    return train, held_out, {"added": added, "kept_own": kept}


def encode_prompts(records: list[PromptRecord], tokenizer, template: str, max_length: int,
                   log: Callable[[str], None] = print, name: str = "train",
                   cfg=None) -> tuple[list[list[int]], list[PromptRecord]]:
    """Token ids of each prompt with the generation prompt appended, and the records kept
    (`encode_prompts_report` without its report)."""
    return encode_prompts_report(records, tokenizer, template, max_length, log, name, cfg)[:2]


def encode_prompts_report(records: list[PromptRecord], tokenizer, template: str, max_length: int,
                          log: Callable[[str], None] = print, name: str = "train",
                          cfg=None) -> tuple[list[list[int]], list[PromptRecord], dict]:
    """Token ids of each prompt with the generation prompt appended, the records kept, and what
    happened to the others for data_report.json. Prompts longer than `max_length` are dropped —
    never cut, which would change the question — counted, and the first few named by file:line
    (`too_long_sources`). A prompt already rendered with the chat template, or one the template
    cannot render, is a bad row: an error, or skipped and counted (`unrendered`) under
    `cfg.bad_rows=skip` (cfg: the data config; None stops at it)."""
    from posttrain.data.formats import _SHOWN
    from posttrain.data.pipeline import check_unrendered, encoded_or_skipped
    from posttrain.data.templates import check_not_rendered, render

    def encode(record: PromptRecord) -> list[int]:
        check_not_rendered(record.prompt, tokenizer, template, record.source)
        text = render(tokenizer, template, record.prompt, True, record.source, record.tools)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has BOS

    ids, kept, unrendered, too_long = [], [], [], []
    for record in records:
        tokens = encode(record) if cfg is None else encoded_or_skipped(encode, record, cfg, unrendered)
        if tokens is None:
            continue
        if len(tokens) > max_length:
            too_long.append(record.source)
            continue
        ids.append(tokens)
        kept.append(record)
    if cfg is not None:
        check_unrendered(unrendered, len(records), cfg, log, name)
    shown = f" (first: {', '.join(too_long[:_SHOWN])})" if too_long else ""
    log(f"{name}: {len(kept)} prompts" + (f"; {len(too_long)} longer than {max_length} tokens dropped{shown}"
                                          if too_long else ""))
    if records and not kept:
        raise DataError(f"every {name} prompt is longer than data.max_prompt_length={max_length} tokens")
    report = {"prompts": len(records), "kept": len(kept), "max_length": max_length,
              "dropped_too_long": len(too_long), "too_long_sources": too_long[:_SHOWN],
              "unrendered": len(unrendered), "unrendered_first": unrendered[:3]}
    return ids, kept, report
