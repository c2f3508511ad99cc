"""Synthetic instruction tasks whose answers can be checked exactly.

A tiny model learns the easy ones in a minute or two of CPU training, which makes them
the outcome tests and the demo of every stage. Letters and digits are space-separated so
that each is one token of the bundled tokenizer; instructions are short because every
prompt token costs training time.

    smallest  "Smallest letter: q m t"  → "m"       (alphabetically first letter)
    largest   "Largest letter: q m t"   → "t"
    copy      "Copy: q m t"             → "q m t"
    reverse   "Reverse: q m t"          → "t m q"
    count     "Count letters: q m t"    → "3"
    addition  "Add: 23 + 48"            → "71"      (two-digit operands; hard for tiny models)

Rows use alpaca keys ({"instruction", "output"}); records are [user, assistant] messages.
`make_preference_rows` gives the same prompts as preference rows (data/preferences.py
formats): the correct answer preferred to plausible wrong ones, e.g. for count "3" over
"4" (off by one), for reverse "t m q" over "q m t" (left unreversed).
Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
import re
import string
import zlib
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from posttrain.data.records import Record
from posttrain.errors import ConfigError

MIN_LETTERS, MAX_LETTERS = 3, 6


@dataclass(frozen=True)
class SyntheticExample:
    task: str
    instruction: str
    output: str

    def to_row(self) -> dict[str, str]:
        return {"instruction": self.instruction, "output": self.output}

    def to_record(self, index: int = 0) -> Record:
        messages = [{"role": "user", "content": self.instruction}, {"role": "assistant", "content": self.output}]
        return Record(messages=messages, source=f"synthetic:{self.task}:{index}")


def _letters(rng: random.Random) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(MIN_LETTERS, MAX_LETTERS))]


def _smallest(rng: random.Random) -> tuple[str, str]:
    letters = _letters(rng)
    return "Smallest letter: " + " ".join(letters), min(letters)


def _largest(rng: random.Random) -> tuple[str, str]:
    letters = _letters(rng)
    return "Largest letter: " + " ".join(letters), max(letters)


def _copy(rng: random.Random) -> tuple[str, str]:
    letters = " ".join(_letters(rng))
    return "Copy: " + letters, letters


def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = _letters(rng)
    return "Reverse: " + " ".join(letters), " ".join(reversed(letters))


def _count(rng: random.Random) -> tuple[str, str]:
    letters = _letters(rng)
    return "Count letters: " + " ".join(letters), str(len(letters))


def _addition(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"Add: {a} + {b}", str(a + b)


TASKS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "smallest": _smallest,
    "largest": _largest,
    "copy": _copy,
    "reverse": _reverse,
    "count": _count,
    "addition": _addition,
}


def _check_tasks(tasks: str | Sequence[str]) -> list[str]:
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    if not names:
        raise ConfigError(f"data.synthetic_tasks is empty; choose from {', '.join(TASKS)}")
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown synthetic task {name!r}; choose from {', '.join(TASKS)}")
    return names


HELD_OUT_SHARE = 8  # one prompt in 8 is reserved for evaluation, in every split and every stage


def is_held_out(instruction: str) -> bool:
    """Whether a prompt belongs to the evaluation side of the fixed partition (by a stable hash
    of its text): training never draws one, whatever the seed, the task mix or the stage, so an
    SFT model has not seen the held-out prompts its RM / DPO / RL stages are measured on."""
    return zlib.crc32(instruction.encode()) % HELD_OUT_SHARE == 0


def make_examples(
    tasks: str | Sequence[str], n: int, seed: int = 0, *, exclude: Iterable[str] = (), unique: bool = False,
    side: str | None = None,
) -> list[SyntheticExample]:
    """`n` examples cycling through `tasks` in order (so the mix is balanced).

    exclude: instructions that must not be produced.
    unique:  no instruction is repeated within the result.
    side:    "train" or "held_out": draw only from that side of the fixed partition (`is_held_out`).
    """
    names = _check_tasks(tasks)
    if n < 0:
        raise ConfigError(f"number of synthetic examples must be >= 0, got {n}")
    rng = random.Random(f"posttrain-synthetic-{seed}")  # a str seed hashes the same in every process
    banned = set(exclude)
    examples: list[SyntheticExample] = []
    for i in range(n):
        task = names[i % len(names)]
        for _attempt in range(100_000):
            instruction, output = TASKS[task](rng)
            if instruction not in banned and (side is None or is_held_out(instruction) == (side == "held_out")):
                break
        else:
            raise ConfigError(f"synthetic task {task!r} ran out of distinct prompts; ask for fewer examples")
        if unique:
            banned.add(instruction)
        examples.append(SyntheticExample(task, instruction, output))
    return examples


def make_rows(tasks: str | Sequence[str], n: int, seed: int = 0, **kwargs) -> list[dict[str, str]]:
    """Alpaca-style rows: [{"instruction": "Reverse: q m t", "output": "t m q"}, ...]."""
    return [example.to_row() for example in make_examples(tasks, n, seed, **kwargs)]


def make_records(tasks: str | Sequence[str], n: int, seed: int = 0, **kwargs) -> list[Record]:
    """Records with messages [user: instruction, assistant: output]."""
    return [example.to_record(i) for i, example in enumerate(make_examples(tasks, n, seed, **kwargs))]


def make_split(
    tasks: str | Sequence[str], n_train: int, n_eval: int, seed: int = 0
) -> tuple[list[SyntheticExample], list[SyntheticExample]]:
    """(train, eval) examples from the two sides of the fixed partition (`is_held_out`): no eval
    instruction ever appears in this train set or in any other split's. Eval prompts are
    distinct, from a stream separate from the training stream."""
    held_out = make_examples(tasks, n_eval, seed=seed + 1_000_003, unique=True, side="held_out")
    train = make_examples(tasks, n_train, seed=seed, side="train")
    return train, held_out


_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")  # MATH's \boxed{...} (and \fbox{...}) around a final answer
_HASHES = "####"  # GSM8K's mark before a final answer


def final_answer(text: str) -> str | None:
    """The final answer a worked solution marks, trimmed: the content of its last closed
    \\boxed{...} or \\fbox{...} (braces nested: \\boxed{\\frac{3}{4}} gives \\frac{3}{4}; MATH's
    form) or the text after its last "####" (GSM8K's "... #### 72" gives 72), whichever mark comes
    later; None when the text marks none (a short answer, "72")."""
    closing, opened = {}, []  # each "{"'s matching "}", in one pass (linear in any text)
    for i, char in enumerate(text):
        if char == "{":
            opened.append(i)
        elif char == "}" and opened:
            closing[opened.pop()] = i
    box_at, boxed = -1, None
    for match in _BOX.finditer(text):
        end = closing.get(match.end() - 1)
        if end is not None:  # closed (a box cut off mid-answer marks nothing)
            box_at, boxed = match.start(), text[match.end():end]
    hashes_at = text.rfind(_HASHES)
    if hashes_at > box_at:
        return text[hashes_at + len(_HASHES):].strip()
    return None if boxed is None else boxed.strip()


def answer_matches(prediction: str, expected: str) -> bool:
    """Exact match, surrounding whitespace trimmed and otherwise as written (case-sensitive).
    A reference that marks a final answer (`final_answer`: GSM8K's "#### 72", MATH's
    \\boxed{...}) is compared by that answer, with the prediction's own marked final answer
    when it marks one, else the whole prediction: "72" and "... #### 72" match "... #### 72"."""
    reference = final_answer(expected)
    if reference is None:
        return prediction.strip() == expected.strip()
    given = final_answer(prediction)
    return (prediction.strip() if given is None else given) == reference


def exact_match(predictions: Sequence[str], expected: Sequence[str]) -> float:
    """Fraction of predictions that match their expected answer exactly (0.0 for none)."""
    if len(predictions) != len(expected):
        raise ValueError(f"{len(predictions)} predictions for {len(expected)} expected answers")
    if not predictions:
        return 0.0
    return sum(answer_matches(p, e) for p, e in zip(predictions, expected)) / len(predictions)


# --------------------------------------------------------------------------- preferences
#
# Verifiable preferences: the correct answer is preferred to plausible wrong ones. Each
# task's `_WRONG` function draws one wrong answer; `_distance` says how wrong it is (0 only
# for the correct answer), which orders the responses of a ranking, equal distances tied.

PREFERENCE_KINDS = ("pairs", "ranking", "unpaired")


def _operands(instruction: str) -> list[str]:
    """The letters (or "23", "+", "48") after the instruction's colon."""
    return instruction.split(": ", 1)[1].split(" ")


def _wrong_letter(letters: list[str], correct: str, rng: random.Random) -> str:
    others = sorted(set(letters) - {correct})  # mostly a letter from the list: the plausible mistake
    if others and rng.random() < 0.8:
        return rng.choice(others)
    return rng.choice([c for c in string.ascii_lowercase if c != correct])


def _wrong_sequence(letters: list[str], correct: str, rng: random.Random, unreversed: bool) -> str:
    """One letter changed, two positions swapped, or (reverse) the letters left in order."""
    out = correct.split(" ")
    move = rng.choice(("change", "swap", "unreversed") if unreversed else ("change", "swap"))
    if move == "unreversed":
        return " ".join(letters)
    i, j = rng.sample(range(len(out)), 2)
    if move == "swap":
        out[i], out[j] = out[j], out[i]
    else:
        out[i] = rng.choice([c for c in string.ascii_lowercase if c != out[i]])
    return " ".join(out)


def _wrong_number(correct: str, rng: random.Random, offsets: tuple[int, ...]) -> str:
    return str(int(correct) + rng.choice(offsets))  # counts are >= 3 and sums >= 20: never below 1


_WRONG: dict[str, Callable[[list[str], str, random.Random], str]] = {
    "smallest": _wrong_letter,
    "largest": _wrong_letter,
    "copy": lambda letters, correct, rng: _wrong_sequence(letters, correct, rng, unreversed=False),
    "reverse": lambda letters, correct, rng: _wrong_sequence(letters, correct, rng, unreversed=True),
    "count": lambda letters, correct, rng: _wrong_number(correct, rng, (-2, -1, 1, 2, 3)),  # +3: room for K=6
    "addition": lambda operands, correct, rng: _wrong_number(correct, rng, (-10, -2, -1, 1, 2, 10)),
}


def _distance(task: str, letters: list[str], answer: str, correct: str) -> int:
    """How wrong `answer` is: alphabetical distance (+26 for a letter not in the list),
    wrong positions, or numeric difference."""
    if task in ("smallest", "largest"):
        return abs(ord(answer) - ord(correct)) + (0 if answer in letters else 26)
    if task in ("copy", "reverse"):
        return sum(a != b for a, b in zip(answer.split(" "), correct.split(" ")))
    return abs(int(answer) - int(correct))


def _wrong_answers(example: SyntheticExample, k: int, rng: random.Random) -> list[str]:
    """`k` distinct wrong answers to `example` (never the correct one)."""
    letters = _operands(example.instruction)
    wrong: list[str] = []
    for _attempt in range(1_000):
        if len(wrong) == k:
            return wrong
        answer = _WRONG[example.task](letters, example.output, rng)
        if answer != example.output and answer not in wrong:
            wrong.append(answer)
    raise ConfigError(f"synthetic task {example.task!r} has fewer than {k} plausible wrong answers for "
                      f"{example.instruction!r}; ask for fewer responses")


def _preference_row(example: SyntheticExample, index: int, n_tasks: int, kind: str, num_responses: int,
                    rng: random.Random) -> dict:
    prompt, correct = example.instruction, example.output
    if kind == "pairs":
        return {"prompt": prompt, "chosen": correct, "rejected": _wrong_answers(example, 1, rng)[0]}
    if kind == "unpaired":
        # Alternate within each task, offset by the task's position: every task and the
        # whole set are balanced to within one row, for any number of tasks.
        desirable = (index // n_tasks + index % n_tasks) % 2 == 0
        return {"prompt": prompt, "completion": correct if desirable else _wrong_answers(example, 1, rng)[0],
                "label": desirable}
    responses = [correct, *_wrong_answers(example, num_responses - 1, rng)]
    rng.shuffle(responses)  # position says nothing: only the ranks do
    letters = _operands(prompt)
    distances = [_distance(example.task, letters, r, correct) for r in responses]
    order = sorted(set(distances))
    return {"prompt": prompt, "responses": responses, "ranks": [order.index(d) for d in distances]}


def make_preference_rows(
    tasks: str | Sequence[str], n: int, seed: int = 0, *, kind: str = "pairs", num_responses: int = 4,
    exclude: Iterable[str] = (), unique: bool = False, side: str | None = None,
) -> list[dict]:
    """`n` preference rows over `tasks` (cycled, as in make_examples), chosen = correct:

    pairs     {"prompt", "chosen", "rejected"}           one plausible wrong answer
    ranking   {"prompt", "responses", "ranks"}           correct + num_responses-1 wrong,
              shuffled; ranks by distance from correct (0 = correct, equal distances tied)
    unpaired  {"prompt", "completion", "label"}          alternately correct / wrong per task
    """
    if kind not in PREFERENCE_KINDS:
        raise ConfigError(f"unknown synthetic preference kind {kind!r}; choose from {', '.join(PREFERENCE_KINDS)}")
    if kind == "ranking" and num_responses < 2:
        raise ConfigError(f"a ranking needs at least 2 responses, got num_responses={num_responses}")
    names = _check_tasks(tasks)
    examples = make_examples(names, n, seed, exclude=exclude, unique=unique, side=side)
    rng = random.Random(f"posttrain-preference-{seed}")  # its own stream: prompts match make_examples'
    return [_preference_row(e, i, len(names), kind, num_responses, rng) for i, e in enumerate(examples)]


def make_preference_split(
    tasks: str | Sequence[str], n_train: int, n_eval: int, seed: int = 0, *, kind: str = "pairs",
    num_responses: int = 4,
) -> tuple[list[dict], list[dict]]:
    """(train, eval) preference rows from the two sides of the fixed partition (see make_split)."""
    held_out = make_preference_rows(tasks, n_eval, seed + 1_000_003, kind=kind, num_responses=num_responses,
                                    unique=True, side="held_out")
    train = make_preference_rows(tasks, n_train, seed, kind=kind, num_responses=num_responses, side="train")
    return train, held_out
