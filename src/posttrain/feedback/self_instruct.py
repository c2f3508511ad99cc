"""Self-Instruct (Wang et al. 2022): a model grows a task set from a few seed tasks.

Each round, every candidate k (id "r{round}-{k}") is made from the pool as it stood when the
round began:

    sample in-context tasks (seeded: seed_examples seed tasks + generated_examples earlier ones)
      ──▶ ask for one new instruction
      ──▶ classification or generation? (the model is asked, or the type was fixed first and the
          examples were all of it)
      ──▶ instances (self_instruct.instances_per_task of them): classification writes the label
          first, then an input with that label (output-first, so labels do not all come out the
          same); generation writes the input first

then the round's candidates are judged in k order and the accepted ones join the pool:

    empty_instruction / truncated_instruction / starts_with_punctuation (not a letter or digit) /
    too_short / too_long (words; in Chinese, Japanese or Thai, 2 characters a word) / banned_word
    (whole words; in those scripts a run of characters)
    duplicate (same words after normalising)  ──  similar (ROUGE-L F >= threshold against any pool task)
    each instance: truncated_instance (the last one of a reply cut off) / unparseable_instance /
    empty_input / empty_output / output_repeats_input, then duplicate_instance (the same as an
    earlier one) / conflicting_instance (its input given with another output too: all such are
    dropped); a task with no instance left is rejected under its first instance's reason

candidates.jsonl, the append-only log, holds every candidate, accepted or not. The judging is a
pure function of the logged candidates in id order, so a resumed run rebuilds the pool and the
counters from it and continues exactly where the interrupted one stopped: no duplicates, no
gaps, and the same tasks as a run that was never stopped. At the end: tasks.jsonl (accepted,
with provenance and instances), rejected.jsonl (with reasons), sft.jsonl (alpaca rows for
posttrain sft, one per instance) and summary.json.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from posttrain.config.schema import user_path
from posttrain.data.quality.text import ngram_scale
from posttrain.errors import DataError, UserError
from posttrain.feedback.constitutional import ASSETS, ENDS_WITH_COLON, request_seed, unquoted
from posttrain.feedback.jobs import (STDERR, check_resume_settings, file_digest, model_identity, resolve_stream,
                                     write_jsonl)
from posttrain.feedback.rouge import RougePool, tokenize

_ANSWER_TOKENS = 16  # the yes/no question needs only its first word
_GENERATED_ID = re.compile(r"r\d+-\d+")  # "r{round}-{k}", a candidate's id
# An input that says there is none, lowercased, single-spaced, without surrounding brackets and dots
# ("None.", "(No input required)"): written as ""
_NO_INPUT = {"", "none", "n/a", "na", "<noinput>", "<no input>", "no input", "-", "null", "not applicable",
             "no input required", "no input needed", "no input is required", "no input is needed",
             "none required", "none needed", "not needed", "not required"}
# A line that only heads an instance ("Example 2:", "**Instance 3**", "### Example"): no part of the field
# before it (a line of a number alone may be an output: "Output:\n42")
_INSTANCE_HEADING = re.compile(r"\n[ \t]*(?:#{1,6}[ \t]*)?(?:\*\*|__)?[ \t]*(?:example|instance)[ \t]*#?[ \t]*\d*"
                               r"[ \t]*[:.)]?[ \t]*(?:\*\*|__)?[ \t]*:?\s*$", re.IGNORECASE)
# "Input:", or in markdown bold "**Input:**", "**Input**:", "__Input:__" (closing marks only after opening ones)
_FIELD = re.compile(r"^[ \t]*(?P<bold>\*\*|__)?[ \t]*(?P<name>input|output|label|class label|task)[ \t]*"
                    r"(?(bold)(?:(?P=bold)[ \t]*:|:[ \t]*(?P=bold))|:)[ \t]*", re.IGNORECASE | re.MULTILINE)
# "9." / "9)" / "9:" (not the "1." of "1.5") or a bullet ("-", "*", "•"; not the "-" of "-5" nor "**" of bold)
_ENUMERATION = re.compile(r"^\s*(?:\d+\s*[.):](?!\d)|-(?!\d)|\u2022|\*(?!\*))\s*")
# A line announcing the task: it ends in ":" (constitutional.ENDS_WITH_COLON) and names a task, an
# instruction or says "here" ("Sure! Here is a new task:", "Here you go:", "New instruction:").
_PREAMBLE_WORD = re.compile(r"\b(?:tasks?|instructions?|here)\b", re.IGNORECASE)
# "Task:", "New instruction 3.", "Tasks:", "Task #9:", "**Task:**", "**Task**:" after any numbering, or
# the label alone on its line ("### Instruction")
_LABEL = re.compile(r"^(?:\*\*|__)?\s*(?:new\s+)?(?:task|instruction)s?\s*#?\s*\d*\s*(?:\*\*|__)?\s*(?:[:.)]|$)"
                    r"\s*(?:\*\*|__)?\s*", re.IGNORECASE)
# Markdown that opens a line and is no part of its text: a heading's "#"s, a quote's ">"
_LINE_MARK = re.compile(r"^\s*(?:#{1,6}(?=\s)|>)\s*")
_EMPHASIZED = re.compile(r"^(\*\*|__)((?:(?!\1).)+)\1$")  # bold around the whole line, none inside
# A lead-in before the task on its line: "Sure! ", "OK, " and "Here is a new task: ", "Here's task 9: "
# (a "Here is ...:" that names no task or instruction, "Here is a list: ...", is the instruction's text)
_INTERJECTION = re.compile(r"^(?:sure|okay|ok|certainly|of course)[!.,]+\s*", re.IGNORECASE)
_HERE = re.compile(r"^here(?:'s|\u2019s|\s+is|\s+you\s+go)\b([^:]{0,60}):\s*", re.IGNORECASE)
_TASK_WORD = re.compile(r"\b(?:tasks?|instructions?)\b", re.IGNORECASE)
# Markdown around a reply, no part of its text: a code fence line ("```", "```text", "~~~") or a rule ("---",
# "***", "___", "- - -")
_FENCE = re.compile(r"^[ \t]*(?:`{3,}|~{3,})[ \t]*[\w+#.-]*[ \t]*$")
_RULE = re.compile(r"^[ \t]*([-*_])(?:[ \t]*\1){2,}[ \t]*$")
# Quotes wrapped around a whole instruction: straight, typographic, guillemets, CJK corner brackets
@dataclass(frozen=True)
class Task:
    id: str
    instruction: str
    input: str
    output: str
    is_classification: bool
    is_seed: bool = True


# --------------------------------------------------------------------------- seed tasks


def seed_path(name: str) -> Path:
    return ASSETS / "self_instruct_seeds.jsonl" if name == "default" else user_path(name)


def load_seed_tasks(name: str) -> list[Task]:
    """Seed tasks from JSONL (or any row file): instruction, output, optional input,
    is_classification and id; the original Self-Instruct layout (instances: [{input, output}])
    is read too, its first instance used. An id of the form this run's candidates take
    ("r0-3": an earlier run's tasks.jsonl used as seeds) becomes "seed:r0-3"."""
    from posttrain.data.readers import strict_rows

    path = seed_path(name)
    if not path.exists():
        raise DataError(f"seed task file {path} does not exist (data.seed_file; 'default' = the bundled seeds)")
    tasks, seen = [], {}
    for i, (location, row) in enumerate(strict_rows(str(path))):
        task = _seed_task(row, location, i)
        if task.id in seen:
            raise DataError(f"{location}: seed id {task.id!r} is already used at {seen[task.id]}")
        seen[task.id] = location
        tasks.append(task)
    if not tasks:
        raise DataError(f"{path}: no seed tasks")
    return tasks


def _seed_task(row: Any, location: str, index: int) -> Task:
    """One seed task from a row. A blank cell (CSV, Parquet null) is an absent value; a flag cell is
    true or false as the preference reader takes a KTO label (`_flag`)."""
    from posttrain.data.formats import flag_cell
    from posttrain.data.preferences import absent

    if not isinstance(row, dict):
        raise DataError(f"{location}: expected an object with 'instruction' and 'output'")
    if isinstance(row.get("instances"), list) and row["instances"] and "output" not in row:
        row = {**row, **row["instances"][0]}
    for key in ("instruction", "output"):
        if not isinstance(row.get(key), str) or not row[key].strip():
            raise DataError(f"{location}: {key!r} must be a non-empty string (seed tasks need 'instruction' and "
                            "'output'; 'input', 'is_classification' and 'id' are optional)")
    extra = "" if absent(row, "input") else row["input"]
    if not isinstance(extra, str):
        raise DataError(f"{location}: 'input' must be a string")
    flag = False if absent(row, "is_classification") else flag_cell(row["is_classification"])
    if flag is None:
        raise DataError(f"{location}: 'is_classification' must be true or false, got {row['is_classification']!r}")
    task_id = f"seed-{index}" if absent(row, "id") else str(row["id"])
    if _GENERATED_ID.fullmatch(task_id):  # kept apart from the generated task this run gives the same id
        task_id = f"seed:{task_id}"
    return Task(task_id, row["instruction"].strip(), extra.strip(), row["output"].strip(), flag)


# --------------------------------------------------------------------------- prompts and parsing


def instruction_messages(examples: list[Task]) -> list[dict[str, str]]:
    listed = "\n".join(f"{i}. {task.instruction}" for i, task in enumerate(examples, 1))
    return [{"role": "user", "content": (
        "Come up with a new task for an AI assistant. Here are some existing tasks:\n\n" + listed + "\n\n"
        "Write one new task instruction that differs from all of these in topic and wording, and that a "
        "text-only assistant can carry out. Reply with the instruction only, on a single line.")}]


def _is_markup(line: str) -> bool:
    """A code fence line or a markdown rule: wrapping, no text."""
    return bool(_FENCE.match(line) or _RULE.match(line))


def _reply_lines(reply: str) -> list[str]:
    """The non-empty lines of a reply from its instruction line on, fences and rules included:
    leading preamble lines ("Sure! Here is a new task:", "**New instruction:**") and fence or rule
    lines are skipped while another line follows. A line ending in ":" that names no task
    ("Complete the sentence:") is an instruction and is kept."""
    lines = [line for line in reply.splitlines() if line.strip()]
    while len(lines) > 1 and (_is_markup(lines[0]) or ENDS_WITH_COLON.search(lines[0])
                              and _PREAMBLE_WORD.search(lines[0]) or not _line_text(lines[0])):
        lines = lines[1:]
    return lines


def _line_text(line: str) -> str:
    """A line without a heading's or quote's mark, numbering or a bullet, bold around the whole of
    it, a lead-in ("Sure! ", "Here is a new task: ") and a "Task 9:" label: "" for a line that is
    only a label ("### Instruction")."""
    line = _ENUMERATION.sub("", _LINE_MARK.sub("", line, count=1), count=1).strip()
    line = _EMPHASIZED.sub(r"\2", line).strip()
    line = _INTERJECTION.sub("", line, count=1)
    here = _HERE.match(line)
    if here and _TASK_WORD.search(here[1]):
        line = line[here.end():]
    return _LABEL.sub("", line, count=1).strip()


def _instruction_lines(reply: str) -> list[str]:
    """`_reply_lines` without its fence and rule lines: the first is the instruction."""
    return [line for line in _reply_lines(reply) if not _is_markup(line)]


def clean_instruction(reply: str) -> str:
    """The first non-empty line of a reply after any preamble, code fence or markdown rule (see
    `_reply_lines`), without the markdown, numbering, lead-in and "Task 9:" label before its text
    (`_line_text`; markdown bold "**Task:**" too), and without quotes wrapped around the whole of
    it, straight or typographic (`constitutional.unquoted`; a line with the same quotes inside as
    well is kept as it is)."""
    line = unquoted(_line_text(next(iter(_instruction_lines(reply)), "")))
    return " ".join(line.split())


def type_messages(instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": (
        "Is the following a classification task, that is, is its answer one label out of a small, fixed set "
        f"of possible labels?\n\nTask: {instruction}\n\nAnswer yes or no.")}]


def parse_yes_no(reply: str) -> bool | None:
    words = tokenize(reply)
    return {"yes": True, "no": False}.get(words[0]) if words else None


def _example_block(task: Task) -> str:
    if task.is_classification:
        return f"Task: {task.instruction}\nLabel: {task.output}\nInput: {task.input or 'None'}"
    return f"Task: {task.instruction}\nInput: {task.input or 'None'}\nOutput: {task.output}"


def instance_messages(instruction: str, is_classification: bool, examples: list[Task],
                      count: int = 1) -> list[dict[str, str]]:
    """The request for `count` instances of the new task, after `examples` (one instance each)."""
    if count > 1 and is_classification:
        ask = (f"For the last task below, write {count} different instances: for each, first pick one of its "
               "possible labels (a different one each time while there are any left), then write an input that "
               "has that label. Use the format of the examples: a 'Label:' line, then an 'Input:' line; put a "
               "blank line between instances.")
    elif count > 1:
        ask = (f"For the last task below, write {count} different instances: for each, an input for it (None if "
               "the task needs no input), then the correct output. Use the format of the examples: an 'Input:' "
               "line, then an 'Output:' line; put a blank line between instances.")
    elif is_classification:  # output-first: choosing the label first keeps the labels varied
        ask = ("For the last task below, first pick one of its possible labels, then write an input that has "
               "that label. Use the format of the examples: a 'Label:' line, then an 'Input:' line.")
    else:
        ask = ("For the last task below, write an input for it (None if the task needs no input), then the "
               "correct output. Use the format of the examples: an 'Input:' line, then an 'Output:' line.")
    blocks = [_example_block(task) for task in examples] + [f"Task: {instruction}"]
    return [{"role": "user", "content": ask + "\n\n" + "\n\n".join(blocks)}]


def _field_text(text: str) -> str:
    """A field's text without the markdown that closed the reply or parted it from the next field:
    trailing rule lines ("---") and a trailing fence line that opens no block of the field's own
    (an odd count of fence lines: it closed a fence around the whole reply)."""
    lines = text.strip().splitlines()
    while lines and (_RULE.match(lines[-1]) or _FENCE.match(lines[-1])
                     and sum(bool(_FENCE.match(line)) for line in lines) % 2):
        lines.pop()
    return "\n".join(lines).strip()


def _same_text(a: str, b: str) -> bool:
    """The same words (`normalise`); texts with no words at all, the same characters."""
    return normalise(a) == normalise(b) if normalise(a) else a.strip() == b.strip()


def _field_name(match: re.Match) -> str:
    """input, output, label ("Label:", "Class label:") or task."""
    return "label" if "label" in match["name"].lower() else match["name"].lower()


def parse_instance(reply: str, is_classification: bool) -> tuple[str, str, str | None]:
    """(input, output, error) from an 'Input:' / 'Output:' (or 'Label:') reply, in a code fence or
    not; error is None or a rejection reason: unparseable_instance, empty_input, empty_output, or
    output_repeats_input (the output is the input again, a filter of the paper's)."""
    found = list(_FIELD.finditer(reply))
    fields: dict[str, str] = {}
    for match, following in zip(found, found[1:] + [None]):
        name = _field_name(match)
        end = following.start() if following is not None else len(reply)
        fields.setdefault(name, _field_text(reply[match.end():end]))
    given_input = fields.get("input", "")
    given_input = "" if " ".join(given_input.lower().strip("()[]. ").split()) in _NO_INPUT else given_input
    if is_classification:
        label = fields.get("label", fields.get("output"))
        if label is None or "input" not in fields:
            return "", "", "unparseable_instance"
        if not label:
            return given_input, "", "empty_output"
        if not given_input:
            return "", label, "empty_input"
        return given_input, label, "output_repeats_input" if _same_text(label, given_input) else None
    if "output" not in fields:
        return "", "", "unparseable_instance"
    output = fields["output"]
    if not output:
        return given_input, "", "empty_output"
    return given_input, output, "output_repeats_input" if given_input and _same_text(output, given_input) else None


def parse_instances(reply: str, is_classification: bool) -> list[tuple[str, str, str | None]]:
    """Several instances, each as `parse_instance` reads one, from a reply that writes them one after
    another. An instance ends where a field it already has comes again, or (generation, input first)
    where an 'Input:' follows its 'Output:'; a 'Task:' after an instance ends the reply's instances (the
    model went on to a task of its own), one before them is ignored. A line that only heads the next
    instance ("Example 2:") is no part of the one before. A reply without fields is one unparseable
    instance."""
    starts, names, end = [0], set(), len(reply)
    for match in _FIELD.finditer(reply):
        name = _field_name(match)
        if is_classification and name == "output":
            name = "label"  # parse_instance takes an 'Output:' as the label when there is none
        if name == "task":
            if names:
                end = match.start()
                break
            continue
        if names and (name in names or name == "input" and "output" in names and not is_classification):
            starts.append(match.start())
            names = set()
        names.add(name)
    bounds = zip(starts, starts[1:] + [end])
    return [parse_instance(_INSTANCE_HEADING.sub("", reply[a:b]), is_classification) for a, b in bounds]


def candidate_instances(candidate: dict[str, Any]) -> list[dict[str, Any]]:
    """A logged candidate's instances as {input, output, error}: its 'instances' list, or (one
    instance asked for, the log's layout before instances_per_task) its input, output and instance_error."""
    if "instances" in candidate:
        return candidate["instances"]
    return [{"input": candidate["input"], "output": candidate["output"], "error": candidate.get("instance_error")}]


def judge_instances(candidate: dict[str, Any], filters) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(kept, dropped) instances of a candidate, in order; each dropped one with its reason: its
    parse error, or truncated_instance (the last instance of a reply cut off by max_tokens, with
    drop_truncated), then the paper's two (section 2.3): duplicate_instance (the same input and
    output as an earlier instance) and conflicting_instance (a non-empty input also given with
    another output: every instance with it is dropped, there is no telling which output is right;
    tasks that need no input may have several outputs). Same text: the same words (`_same_text`)."""
    instances = candidate_instances(candidate)
    cut = filters.drop_truncated and candidate.get("instance_finish_reason") == "length"
    reasons = ["truncated_instance" if cut and i == len(instances) - 1 else instance["error"]
               for i, instance in enumerate(instances)]
    clean = [i for i, reason in enumerate(reasons) if reason is None]
    for n, i in enumerate(clean):
        a = instances[i]
        if any(_same_text(a["input"], b["input"]) and _same_text(a["output"], b["output"])
               for b in (instances[j] for j in clean[:n])):
            reasons[i] = "duplicate_instance"
    distinct = [i for i in clean if reasons[i] is None]
    for i in distinct:
        a = instances[i]
        if a["input"] and any(_same_text(a["input"], instances[j]["input"])
                              and not _same_text(a["output"], instances[j]["output"]) for j in distinct):
            reasons[i] = "conflicting_instance"
    kept = [{"input": x["input"], "output": x["output"]} for x, reason in zip(instances, reasons) if reason is None]
    dropped = [{"input": x["input"], "output": x["output"], "reason": reason}
               for x, reason in zip(instances, reasons) if reason is not None]
    return kept, dropped


# --------------------------------------------------------------------------- filters and the pool


def normalise(text: str) -> str:
    """The text's words, lowercased, single-spaced: what counts as the same instruction."""
    return " ".join(tokenize(text))


def instruction_cut_off(reply: str, finish_reason: str) -> bool:
    """Whether max_tokens cut the reply inside its instruction line (no line follows it, not even
    a closing fence)."""
    lines = _reply_lines(reply)
    first = next((i for i, line in enumerate(lines) if not _is_markup(line)), len(lines))
    return finish_reason == "length" and first >= len(lines) - 1


def instruction_rejection(candidate: dict[str, Any], filters) -> str | None:
    """The first filter a candidate's instruction fails on its own (no pool needed), or None."""
    instruction = candidate["instruction"]
    tokens = tokenize(instruction)
    words = [token for token in tokens if any(char.isalnum() for char in token)]  # not "`", "+", "€"
    if not words:
        return "empty_instruction"
    if filters.drop_truncated and instruction_cut_off(candidate["raw_instruction"],
                                                      candidate["instruction_finish_reason"]):
        return "truncated_instruction"
    if not instruction[0].isalnum():  # "- ", "(", "...", "→": Self-Instruct filters these (any script's letters pass)
        return "starts_with_punctuation"
    # A text mostly of character words (Chinese, Japanese, Thai: a token per character) counts
    # NGRAM_SCALE characters a word, as quality's n-gram checks do: min_words=3 asks six characters there.
    scale = ngram_scale(words)
    if len(words) < filters.min_words * scale:
        return "too_short"
    if len(words) > filters.max_words * scale:
        return "too_long"
    padded = f" {' '.join(tokens)} "
    if any(f" {normalise(banned)} " in padded for banned in filters.banned_words if normalise(banned)):
        return "banned_word"
    return None


class TaskPool:
    """Seed tasks plus the accepted ones, with what judging a candidate needs; and the counters."""

    def __init__(self, seeds: list[Task], filters, target: int):
        self.filters, self.target = filters, target
        self.tasks: list[Task] = []
        self.rouge = RougePool()
        self.normalised: set[str] = set()
        self.accepted: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.instances_dropped: Counter = Counter()
        self.surplus = 0
        for task in seeds:
            self._add(task)

    def _add(self, task: Task) -> None:
        self.tasks.append(task)
        self.rouge.add(task.instruction)
        self.normalised.add(normalise(task.instruction))

    @property
    def full(self) -> bool:
        return len(self.accepted) >= self.target

    def seeds(self) -> list[Task]:
        return [task for task in self.tasks if task.is_seed]

    def generated(self) -> list[Task]:
        return [task for task in self.tasks if not task.is_seed]

    def similar(self, instruction: str) -> tuple[float, str | None]:
        """(highest ROUGE-L F against the pool, id of that pool task)."""
        score, index = self.rouge.most_similar(instruction)
        return score, self.tasks[index].id if index >= 0 else None

    def rejection(self, candidate: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
        """Why `candidate` may not join the pool (None: it may), and the similarity found."""
        return self._judge(candidate)[:2]

    def _judge(self, candidate: dict[str, Any]) -> tuple[str | None, dict[str, Any], list[dict], list[dict]]:
        """`rejection`, and the candidate's kept and dropped instances (`judge_instances`; none while its
        instruction is rejected). A candidate none of whose instances is left is rejected under its
        first instance's reason."""
        instruction = candidate["instruction"]
        reason = instruction_rejection(candidate, self.filters)
        if reason:
            return reason, {}, [], []
        if normalise(instruction) in self.normalised:
            return "duplicate", {}, [], []
        score, nearest = self.similar(instruction)
        detail = {"rouge_l": round(score, 4), "most_similar": nearest}
        if score >= self.filters.rouge_threshold:
            return "similar", detail, [], []
        kept, dropped = judge_instances(candidate, self.filters)
        return None if kept else dropped[0]["reason"], detail, kept, dropped

    def apply(self, candidate: dict[str, Any]) -> str | None:
        """Judge one candidate (in id order) and add it to the pool if accepted; returns the reason if not.
        The pool's task shows its first instance as an in-context example."""
        reason, detail, kept, dropped = self._judge(candidate)
        several = "instances" in candidate  # instances_per_task > 1: the records list them
        if reason is not None:
            self.instances_dropped.update(d["reason"] for d in dropped)
            self.rejected.append({"id": candidate["id"], "instruction": candidate["instruction"], "reason": reason,
                                  **detail, **({"instances_dropped": dropped} if several and dropped else {})})
            return reason
        if self.full:  # the last round made more good tasks than were still wanted
            self.surplus += 1
            return None
        self.instances_dropped.update(d["reason"] for d in dropped)
        task = Task(candidate["id"], instruction=candidate["instruction"], input=kept[0]["input"],
                    output=kept[0]["output"], is_classification=candidate["is_classification"], is_seed=False)
        self._add(task)
        self.accepted.append({"id": task.id, "instruction": task.instruction, "input": task.input,
                              "output": task.output, "instances": kept,
                              **({"instances_dropped": dropped} if dropped else {}),
                              "is_classification": task.is_classification,
                              "round": candidate["round"], "examples": candidate["examples"],
                              "type_source": candidate["type_source"], "model": candidate["model"], **detail})
        return None

    def counters(self) -> dict[str, Any]:
        """The counts summary.json holds. type_unclear: accepted tasks whose yes/no type answer was
        neither (taken as generation, and counted there too). instances: those of the accepted tasks
        (kept) and those dropped from tasks that reached the instance filters, accepted or rejected
        for having none left (a task beyond the target is in neither)."""
        types = Counter("classification" if t["is_classification"] else "generation" for t in self.accepted)
        return {"accepted": len(self.accepted), "target": self.target, "surplus": self.surplus,
                "rejected": dict(sorted(Counter(r["reason"] for r in self.rejected).items())),
                "accepted_types": dict(sorted(types.items())),
                "type_unclear": sum(t["type_source"] == "model_unclear" for t in self.accepted),
                "instances": {"kept": sum(len(t["instances"]) for t in self.accepted),
                              "dropped": dict(sorted(self.instances_dropped.items()))}}


# --------------------------------------------------------------------------- one candidate


def plan_candidate(pool: TaskPool, round_number: int, k: int, loop) -> dict[str, Any]:
    """The in-context examples (and, with task_type=examples, the type) of candidate k of a
    round: drawn from the pool at the round's start with an RNG seeded by (seed, id)."""
    rng = random.Random(f"{loop.seed}/r{round_number}-{k}")
    wanted_type = None
    seeds, generated = pool.seeds(), pool.generated()
    if loop.task_type == "examples":
        wanted_type = rng.random() < loop.classification_fraction
        seeds = [t for t in seeds if t.is_classification == wanted_type]
        generated = [t for t in generated if t.is_classification == wanted_type]
    picked_generated = rng.sample(generated, min(loop.generated_examples, len(generated)))
    count = min(loop.seed_examples + loop.generated_examples - len(picked_generated), len(seeds))
    examples = rng.sample(seeds, count) + picked_generated  # seed tasks fill in for missing generated ones
    rng.shuffle(examples)
    return {"round": round_number, "k": k, "examples": [t.id for t in examples],
            "type": None if wanted_type is None else ("classification" if wanted_type else "generation")}


def make_candidate(backend, candidate_id: str, plan: dict[str, Any], pool: TaskPool, loop) -> dict[str, Any]:
    """Ask for the instruction, its type and its instances. Calls that cannot change the verdict
    are skipped: no instance for an instruction the round's starting pool already rejects."""
    by_id = {task.id: task for task in pool.tasks}
    examples = [by_id[task_id] for task_id in plan["examples"]]
    record: dict[str, Any] = {"id": candidate_id, **plan, "model": backend.model_name}
    reply = backend.chat(instruction_messages(examples), seed=request_seed(loop.seed, candidate_id, "instruction"))
    instruction = clean_instruction(reply.text)
    record.update(instruction=instruction, raw_instruction=reply.text,
                  instruction_finish_reason=reply.finish_reason)
    early = instruction_rejection(record, pool.filters)
    if early is None and (normalise(instruction) in pool.normalised
                          or pool.similar(instruction)[0] >= pool.filters.rouge_threshold):
        early = "duplicate_or_similar"
    if early is not None:  # rejected whatever the rest of the round does: spare the other requests
        return {**record, "is_classification": plan["type"] == "classification", "type_source": "skipped",
                "input": "", "output": "", "instance_error": None, "skipped_after": early}
    if plan["type"] is not None:
        is_classification, source = plan["type"] == "classification", "examples"
    else:
        reply = backend.chat(type_messages(instruction), max_tokens=_ANSWER_TOKENS,
                             seed=request_seed(loop.seed, candidate_id, "type"))
        answer = parse_yes_no(reply.text)
        is_classification, source = bool(answer), "model" if answer is not None else "model_unclear"
        record["type_answer"] = reply.text
    rng = random.Random(f"{loop.seed}/{candidate_id}/instance")
    same_type = [t for t in pool.seeds() if t.is_classification == is_classification] or pool.seeds()
    shown = rng.sample(same_type, min(loop.instance_examples, len(same_type)))
    count = loop.instances_per_task
    reply = backend.chat(instance_messages(instruction, is_classification, shown, count),
                         seed=request_seed(loop.seed, candidate_id, "instance"))
    if count == 1:
        given_input, output, error = parse_instance(reply.text, is_classification)
        instances: dict[str, Any] = {"input": given_input, "output": output, "instance_error": error}
    else:  # the first `count` written; any further ones were not asked for
        instances = {"instances": [{"input": x, "output": y, "error": error}
                                   for x, y, error in parse_instances(reply.text, is_classification)[:count]]}
    return {**record, "is_classification": is_classification, "type_source": source, "instance_examples":
            [t.id for t in shown], "raw_instance": reply.text, "instance_finish_reason": reply.finish_reason,
            **instances}


# --------------------------------------------------------------------------- the command


def run_self_instruct(cfg, *, generator=None, stream: TextIO | None = STDERR) -> Path:
    """`posttrain self-instruct`: rounds of candidates until num_tasks are accepted (or
    max_rounds), resumable from candidates.jsonl; then the output files. `generator`
    replaces the backend the config describes (tests, notebooks)."""
    from posttrain.config.synthesis import SelfInstructConfig, validate_self_instruct
    from posttrain.feedback.client import close_local, make_backend
    from posttrain.feedback.jobs import JsonlLog, RunAborted, run_items
    from posttrain.feedback.rlaif import backend_settings

    cfg = SelfInstructConfig.for_run(cfg, "run_self_instruct")
    validate_self_instruct(cfg)
    loop, filters = cfg.self_instruct, cfg.filters
    seeds = load_seed_tasks(cfg.data.seed_file)
    _check_seed_types(seeds, loop, cfg.data.seed_file)
    out = user_path(cfg.output_dir)
    backend = generator or make_backend(cfg.generator)
    # Everything that decides the candidates (generator.seed is not: each request's seed comes from
    # self_instruct.seed), a local model's files included; a resume with other values is refused, a
    # run with no candidates yet is not.
    candidates = out / "candidates.jsonl"
    generator_settings = {k: v for k, v in backend_settings(cfg.generator).items() if k != "seed"}
    check_resume_settings(out, {
        "generator": {**generator_settings, "model": backend.model_name, **model_identity(cfg.generator)},
        "seed_file": file_digest(seed_path(cfg.data.seed_file)),
        "per_round": loop.per_round, "seed_examples": loop.seed_examples,
        "generated_examples": loop.generated_examples, "task_type": loop.task_type,
        "classification_fraction": loop.classification_fraction, "instance_examples": loop.instance_examples,
        "instances_per_task": loop.instances_per_task, "seed": loop.seed, "min_words": filters.min_words,
        "max_words": filters.max_words,
        "banned_words": sorted(filters.banned_words), "rouge_threshold": filters.rouge_threshold,
        "drop_truncated": filters.drop_truncated}, candidates.is_file() and candidates.stat().st_size > 0,
        unrecorded={"instances_per_task": None if loop.instances_per_task == 1 else (
            "its candidates were made one instance per task (before self_instruct.instances_per_task was "
            f"recorded), now {loop.instances_per_task}; resume with instances_per_task=1, or use a new output_dir")})
    pool = TaskPool(seeds, filters, loop.num_tasks)
    show = resolve_stream(stream) or sys.stderr
    failure = None
    try:
        with JsonlLog(candidates) as log:
            logged = {record["id"]: record for record in log.records}
            round_number = 0
            while not pool.full and round_number < loop.max_rounds:
                items = [(f"r{round_number}-{k}", plan_candidate(pool, round_number, k, loop))
                         for k in range(loop.per_round)]
                if any(item_id not in logged for item_id, _ in items):
                    try:
                        summary = run_items(items,
                                            lambda item_id, plan: make_candidate(backend, item_id, plan, pool, loop),
                                            log, concurrency=loop.concurrency,
                                            desc=f"self-instruct round {round_number}", stream=stream)
                    except RunAborted as exc:  # the whole round failed: the finished rounds are still written
                        failure = exc
                        break
                    logged = {record["id"]: record for record in log.records}
                    if summary.failed:  # the next round's examples depend on this whole round: stop here
                        failure = UserError(f"self-instruct: {summary.failed} candidates of round {round_number} "
                                            f"failed (first: {summary.errors[0]}); rerun the same command to retry them "
                                            "(finished candidates are kept)")
                        break
                before = Counter(r["reason"] for r in pool.rejected)
                for item_id, _ in items:
                    pool.apply(logged[item_id])
                print(_round_line(round_number, pool, Counter(r["reason"] for r in pool.rejected) - before), file=show)
                round_number += 1
        _write_outputs(out, pool, round_number, loop, backend, cfg, show)
    finally:
        close_local(backend)
    if failure is not None:
        raise failure
    return out


def _check_seed_types(seeds: list[Task], loop, name: str) -> None:
    """task_type=examples shows examples of one type only, so the seeds must have each type it asks for."""
    if loop.task_type != "examples":
        return
    kinds = {task.is_classification for task in seeds}
    for flag, needed, what in ((True, loop.classification_fraction > 0, "classification"),
                               (False, loop.classification_fraction < 1, "generation")):
        if needed and flag not in kinds:
            raise DataError(f"{seed_path(name)}: no {what} seed tasks (is_classification: {str(flag).lower()}), but "
                            f"self_instruct.task_type=examples with classification_fraction="
                            f"{loop.classification_fraction} asks for {what} tasks")


def _round_line(round_number: int, pool: TaskPool, rejected: Counter) -> str:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(rejected.items())) or "none"
    return f"self-instruct round {round_number}: {len(pool.accepted)}/{pool.target} tasks; rejected {reasons}"


def _write_outputs(out: Path, pool: TaskPool, rounds: int, loop, backend, cfg, show: TextIO) -> None:
    sft = [{"id": t["id"] if len(t["instances"]) == 1 else f"{t['id']}/{i}", "instruction": t["instruction"],
            "input": instance["input"], "output": instance["output"]}
           for t in pool.accepted for i, instance in enumerate(t["instances"])]
    write_jsonl(out / "tasks.jsonl", pool.accepted)
    write_jsonl(out / "rejected.jsonl", pool.rejected)
    write_jsonl(out / "sft.jsonl", sft)
    counters = pool.counters()
    counters["instances"] = {"per_task": loop.instances_per_task, **counters["instances"]}
    candidates = rounds * loop.per_round
    summary = {**counters, "rounds": rounds, "candidates": candidates, "reached_target": pool.full,
               "usage": backend.usage.snapshot(), "config": cfg.to_dict()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    reasons = ", ".join(f"{n} {reason}" for reason, n in counters["rejected"].items()) or "none"
    unclear = (f", {counters['type_unclear']} of them generation for an unclear type answer"
               if counters["type_unclear"] else "")
    print(f"self-instruct: {counters['accepted']}/{pool.target} tasks from {candidates} candidates in {rounds} rounds "
          f"({', '.join(f'{n} {k}' for k, n in counters['accepted_types'].items()) or 'none'}{unclear}); "
          f"rejected: {reasons}"
          + (f"; {pool.surplus} good ones beyond the target left out" if pool.surplus else ""), file=show)
    if not pool.full and rounds >= loop.max_rounds:
        print(f"self-instruct: stopped at max_rounds={loop.max_rounds} before reaching num_tasks={pool.target}; "
              "see the rejection counts (raise max_rounds to go on: the run resumes)", file=show)
    if loop.instances_per_task > 1:
        dropped = ", ".join(f"{n} {k}" for k, n in counters["instances"]["dropped"].items()) or "none"
        print(f"self-instruct: {len(sft)} instances of {counters['accepted']} tasks (up to "
              f"{loop.instances_per_task} each); instances dropped: {dropped}", file=show)
    print(f"self-instruct: wrote {len(sft)} SFT rows to {out / 'sft.jsonl'}", file=show)
