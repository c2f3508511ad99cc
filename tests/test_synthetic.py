"""Synthetic verifiable tasks: correct answers, determinism, held-out split, tokenisation."""

from __future__ import annotations

import subprocess
import sys

import pytest

from posttrain.data import synthetic
from posttrain.data.records import Record
from posttrain.errors import ConfigError


def _letters(instruction: str) -> list[str]:
    return instruction.split(": ", 1)[1].split(" ")


def test_each_task_computes_the_right_answer():
    for example in synthetic.make_examples(list(synthetic.TASKS), 600, seed=3):
        if example.task == "addition":
            a, b = example.instruction.removeprefix("Add: ").split(" + ")
            assert example.output == str(int(a) + int(b))
            assert 10 <= int(a) <= 99 and 10 <= int(b) <= 99
            continue
        letters = _letters(example.instruction)
        assert 3 <= len(letters) <= 6 and all(len(c) == 1 and c.islower() for c in letters)
        expected = {
            "smallest": min(letters),
            "largest": max(letters),
            "copy": " ".join(letters),
            "reverse": " ".join(letters[::-1]),
            "count": str(len(letters)),
        }[example.task]
        assert example.output == expected, example


def test_examples_from_the_docstring():
    row = next(r for r in synthetic.make_rows(["reverse"], 5, seed=0))
    assert row.keys() == {"instruction", "output"}
    assert row["instruction"].startswith("Reverse: ")
    assert row["output"] == " ".join(reversed(_letters(row["instruction"])))


def test_tasks_cycle_for_a_balanced_mix():
    examples = synthetic.make_examples(["smallest", "copy", "reverse"], 9, seed=0)
    assert [e.task for e in examples] == ["smallest", "copy", "reverse"] * 3


def test_deterministic_by_seed_even_across_processes():
    rows = synthetic.make_rows(["smallest", "reverse", "addition"], 50, seed=7)
    assert rows == synthetic.make_rows(["smallest", "reverse", "addition"], 50, seed=7)
    assert rows != synthetic.make_rows(["smallest", "reverse", "addition"], 50, seed=8)
    code = "from posttrain.data.synthetic import make_rows; print(make_rows(['smallest', 'reverse', 'addition'], 50, seed=7))"
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert other.strip() == str(rows)


def test_records_are_user_then_assistant():
    records = synthetic.make_records("copy", 3, seed=1)
    assert all(isinstance(r, Record) and r.text is None for r in records)
    assert [m["role"] for m in records[0].messages] == ["user", "assistant"]
    assert records[0].messages[0]["content"].startswith("Copy: ")
    assert records[0].messages[1]["content"] == records[0].messages[0]["content"].removeprefix("Copy: ")
    assert records[2].source == "synthetic:copy:2"


def test_split_keeps_held_out_prompts_out_of_training():
    # 3-letter words repeat often in 4000 draws, so a naive split would leak
    train, held_out = synthetic.make_split(["smallest", "count", "addition"], 4000, 300, seed=0)
    assert len(train) == 4000 and len(held_out) == 300
    held_prompts = {e.instruction for e in held_out}
    assert len(held_prompts) == 300  # distinct
    assert not held_prompts & {e.instruction for e in train}
    assert synthetic.make_split(["smallest"], 10, 5, seed=0) == synthetic.make_split(["smallest"], 10, 5, seed=0)


def test_exclude_and_unique_and_exhaustion():
    first = synthetic.make_examples("smallest", 20, seed=0, unique=True)
    assert len({e.instruction for e in first}) == 20
    again = synthetic.make_examples("smallest", 20, seed=0, exclude={e.instruction for e in first})
    assert not {e.instruction for e in first} & {e.instruction for e in again}
    with pytest.raises(ConfigError, match="ran out of distinct prompts"):
        synthetic.make_examples("addition", 90 * 90 + 1, seed=0, unique=True)


def test_unknown_task_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown synthetic task 'sort'.*smallest"):
        synthetic.make_rows(["sort"], 3)
    with pytest.raises(ConfigError, match="empty"):
        synthetic.make_rows([], 3)


def test_answer_matching():
    assert synthetic.answer_matches(" t m q\n", "t m q")
    assert not synthetic.answer_matches("t m  q", "t m q")
    assert not synthetic.answer_matches("t m", "t m q")
    assert synthetic.exact_match(["a", "b ", "c"], ["a", "b", "d"]) == pytest.approx(2 / 3)
    assert synthetic.exact_match([], []) == 0.0


def test_every_letter_and_digit_of_a_task_is_one_token():
    from posttrain.models.presets import build_tokenizer

    tokenizer = build_tokenizer()
    for example in synthetic.make_examples(["reverse", "addition"], 20, seed=0):
        answer_ids = tokenizer.encode(example.output, add_special_tokens=False)
        assert len(answer_ids) == len(example.output.replace(" ", "")), example
        instruction_ids = tokenizer.encode(example.instruction, add_special_tokens=False)
        assert len(instruction_ids) <= 18  # short prompts: wording + one token per letter/digit/symbol


def test_no_stage_trains_on_another_stages_held_out_prompts():
    """The demo's chain: SFT on three tasks, then RM / DPO on one, with other seeds and split
    sizes. Their held-out prompts (exact match, pairwise accuracy) must not be in any training
    split — the splits once drew held-out prompts per call, so SFT saw 3 of DPO's 200."""
    from posttrain.data.synthetic import make_preference_split, make_split

    sft_train, sft_eval = make_split(["smallest", "copy", "reverse"], 22_800, 1_200, seed=0)
    trained = {e.instruction for e in sft_train}
    for seed in (0, 1, 2):
        pref_train, pref_eval = make_preference_split(["smallest"], 3_000, 200, seed=seed)
        assert not trained & {row["prompt"] for row in pref_eval}
        assert not {e.instruction for e in sft_eval} & {row["prompt"] for row in pref_train}
