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
Everything is deterministic given the seed.
"""

from __future__ import annotations

import random
import string
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


def make_examples(
    tasks: str | Sequence[str], n: int, seed: int = 0, *, exclude: Iterable[str] = (), unique: bool = False
) -> list[SyntheticExample]:
    """`n` examples cycling through `tasks` in order (so the mix is balanced).

    exclude: instructions that must not be produced (e.g. held-out prompts).
    unique:  no instruction is repeated within the result.
    """
    names = _check_tasks(tasks)
    if n < 0:
        raise ConfigError(f"number of synthetic examples must be >= 0, got {n}")
    rng = random.Random(f"posttrain-synthetic-{seed}")  # a str seed hashes the same in every process
    banned = set(exclude)
    examples: list[SyntheticExample] = []
    for i in range(n):
        task = names[i % len(names)]
        for _attempt in range(10_000):
            instruction, output = TASKS[task](rng)
            if instruction not in banned:
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
    """(train, eval) examples where no eval instruction ever appears in train.

    The eval set is drawn first with distinct prompts (from a stream separate from
    the training stream), then training examples that would repeat one are redrawn.
    """
    held_out = make_examples(tasks, n_eval, seed=seed + 1_000_003, unique=True)
    train = make_examples(tasks, n_train, seed=seed, exclude={e.instruction for e in held_out})
    return train, held_out


def answer_matches(prediction: str, expected: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == expected.strip()


def exact_match(predictions: Sequence[str], expected: Sequence[str]) -> float:
    """Fraction of predictions that match their expected answer exactly (0.0 for none)."""
    if len(predictions) != len(expected):
        raise ValueError(f"{len(predictions)} predictions for {len(expected)} expected answers")
    if not predictions:
        return 0.0
    return sum(answer_matches(p, e) for p, e in zip(predictions, expected)) / len(predictions)
