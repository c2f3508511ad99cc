"""Self-Instruct, stop 34 round 2: an output that repeats its input is rejected and counted (the paper's
filter), accepted tasks whose type answer was unclear are counted in summary.json, and the edges of the
fence, rule, quote and seed-cell rules the walkthrough (tests/test_walkthrough_selfinstruct.py) pinned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config.synthesis import SelfInstructConfig, SelfInstructFilterConfig
from posttrain.errors import DataError
from posttrain.feedback.client import Reply, Usage
from posttrain.feedback.self_instruct import clean_instruction, instruction_cut_off, instruction_rejection, \
    load_seed_tasks, parse_instance, run_self_instruct


class Scripted:
    """Instruction replies in order; the type question answered `type_answer`; every instance `instance`."""

    model_name = "scripted"

    def __init__(self, instructions: list[str], instance: str, type_answer: str = "No."):
        self.usage, self.instructions, self.instance, self.type_answer = Usage(), list(instructions), instance, \
            type_answer

    def chat(self, messages, **_):
        content = messages[-1]["content"]
        self.usage.add(requests=1)
        if content.startswith("Come up with"):
            return Reply(self.instructions.pop(0), "stop", 1, 1)
        if content.startswith("Is the following"):
            return Reply(self.type_answer, "stop", 1, 1)
        return Reply(self.instance, "stop", 1, 1)


def run(tmp_path: Path, generator: Scripted, per_round: int = 1) -> Path:
    cfg = SelfInstructConfig.from_dict({
        "output_dir": str(tmp_path / "run"),
        "self_instruct": {"num_tasks": 10, "per_round": per_round, "max_rounds": 1, "concurrency": 1}})
    return run_self_instruct(cfg, generator=generator, stream=None)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_an_output_that_repeats_its_input_is_rejected_and_counted(tmp_path):
    assert parse_instance("Input: The cat sat.\nOutput: the cat sat", False) == \
        ("The cat sat.", "the cat sat", "output_repeats_input")
    assert parse_instance("Label: positive\nInput: Positive.", True) == ("Positive.", "positive", "output_repeats_input")
    assert parse_instance("Input: None\nOutput: None", False) == ("", "None", None)  # no input: nothing repeated
    assert parse_instance("Input: 2 + 2\nOutput: 4", False) == ("2 + 2", "4", None)
    assert parse_instance("Input: ???\nOutput: ???", False)[2] == "output_repeats_input"
    assert parse_instance("Input: ???\nOutput: !!", False)[2] is None
    out = run(tmp_path, Scripted(["Repeat the sentence back exactly as written."],
                                 instance="Input: The sky is blue.\nOutput: The sky is blue."))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == {"output_repeats_input": 1} and summary["accepted"] == 0
    assert [r["reason"] for r in read_jsonl(out / "rejected.jsonl")] == ["output_repeats_input"]


def test_unclear_type_answers_are_counted_in_the_summary(tmp_path):
    out = run(tmp_path, Scripted(["Write a haiku about rain on a tin roof.", "List three uses of copper in houses."],
                                 instance="Input: None\nOutput: Soft rain.", type_answer="Hmm, hard to say."),
              per_round=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["accepted"] == 2 and summary["accepted_types"] == {"generation": 2}
    assert summary["type_unclear"] == 2
    assert {t["type_source"] for t in read_jsonl(out / "tasks.jsonl")} == {"model_unclear"}


def test_fences_and_rules_around_an_instruction():
    assert clean_instruction("```text\nWrite a haiku about rain.\n```") == "Write a haiku about rain."
    assert clean_instruction("Sure! Here is a new task:\n\n---\n**Task:** Sort the list.\n---") == "Sort the list."
    assert clean_instruction("Here is a task:\n```") == ""  # nothing but the preamble and a fence
    filters = SelfInstructFilterConfig()
    for text in ("```", "---", "+ + + + +"):
        candidate = {"instruction": text, "raw_instruction": text, "instruction_finish_reason": "stop"}
        assert instruction_rejection(candidate, filters) == "empty_instruction", text
    two_words = {"instruction": "Sort `` ``` numbers", "raw_instruction": "", "instruction_finish_reason": "stop"}
    assert instruction_rejection(two_words, filters) == "too_short"  # backticks are no words


def test_a_closing_fence_shows_the_instruction_line_was_not_cut():
    assert instruction_cut_off("```\nWrite a haiku about", "length")
    assert not instruction_cut_off("```\nWrite a haiku about rain.\n```", "length")
    assert instruction_cut_off("Here is a task:\n```\nWrite a haiku", "length")
    assert not instruction_cut_off("```\nWrite a haiku about", "stop")


def test_quotes_unwrapped_only_when_they_wrap_the_whole_line():
    for wrapped in ("\u201cName a river.\u201d", "\u2018Name a river.\u2019", "\u00abName a river.\u00bb",
                    "\u300cName a river.\u300d", "'Name a river.'", "Task: \u201cName a river.\u201d"):
        assert clean_instruction(wrapped) == "Name a river.", wrapped
    kept = ["\u201cHi\u201d and \u201cbye\u201d mean what?", "\u2018Don\u2019t\u2019 is a contraction of what?",
            "\u201cName a river.", "\u201cName a river.\""]
    for text in kept:
        assert clean_instruction(text) == text, text


def test_fenced_instance_replies():
    assert parse_instance("```text\nLabel: positive\nInput: What a day!\n```", True) == ("What a day!", "positive", None)
    assert parse_instance("Input: x = 1\n---\nOutput: 1\n***", False) == ("x = 1", "1", None)
    # a code block of the output's own is kept whole; the fence around the reply is not
    code = "```python\nprint(1)\n```"
    assert parse_instance(f"Input: None\nOutput:\n{code}", False) == ("", code, None)
    assert parse_instance(f"```\nInput: None\nOutput:\n{code}\n```", False) == ("", code, None)
    assert parse_instance("Input: None\nOutput:\n```", False) == ("", "", "empty_output")


def test_seed_cells(tmp_path):
    path = tmp_path / "seeds.csv"
    path.write_text("id,instruction,input,output,is_classification\n"
                    "a,Label it.,  ,yes, TRUE \n"
                    ",Write a poem.,,Rain,0\n"
                    "  ,Write a song.,,La,\n")
    tasks = load_seed_tasks(str(path))
    assert [(t.id, t.input, t.is_classification) for t in tasks] == [("a", "", True), ("seed-1", "", False),
                                                                      ("seed-2", "", False)]
    for cell in ("yes", "2"):
        path.write_text(f"instruction,output,is_classification\nLabel it.,yes,{cell}\n")
        with pytest.raises(DataError, match=rf"{path}:2: 'is_classification' must be true or false, got '{cell}'"):
            load_seed_tasks(str(path))
    jsonl = tmp_path / "seeds.jsonl"
    jsonl.write_text(json.dumps({"instruction": "Label it.", "output": "yes", "is_classification": 1}) + "\n"
                     + json.dumps({"instruction": "Write.", "output": "Rain", "is_classification": None,
                                   "input": None, "id": None}) + "\n")
    assert [(t.id, t.is_classification) for t in load_seed_tasks(str(jsonl))] == [("seed-0", True),
                                                                                   ("seed-1", False)]
