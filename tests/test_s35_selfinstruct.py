"""Self-Instruct with several instances per task (stop 35, backlog: "posttrain makes one instance per
task; the paper generates several and filters them").

Pinned: `self_instruct.instances_per_task` (default 1: the prompt, requests and SFT rows as before;
validated >= 1; recorded in the run's resume settings, a log recorded before the key existed resumes
at 1 and is refused at another value); the instance prompt asks for that many; `parse_instances`
reads several input/output (or label-first) instances; the paper's two instance filters (section 2.3:
"filter out instances that are exactly the same or those with the same input but different outputs"),
each counted; a task none of whose instances is left is rejected with a counted reason; tasks.jsonl
holds the instances, the in-context examples use the first, sft.jsonl has one row per instance.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from posttrain.config.synthesis import SelfInstructConfig, validate_self_instruct
from posttrain.errors import ConfigError
from posttrain.feedback.self_instruct import instance_messages, load_seed_tasks, parse_instance, parse_instances, \
    run_self_instruct
from tests.test_walkthrough_selfinstruct import Scripted, read_jsonl

SEEDS = load_seed_tasks("default")


def cfg(out: Path, instances: int = 1, per_round: int = 1, **loop) -> SelfInstructConfig:
    return SelfInstructConfig.from_dict({
        "output_dir": str(out), "self_instruct": {"num_tasks": 10, "per_round": per_round, "max_rounds": 1,
                                                  "concurrency": 1, "instances_per_task": instances, **loop}})


# --------------------------------------------------------------------------- prompt and parsing


def test_the_prompt_asks_for_that_many_instances_and_one_is_unchanged():
    one = instance_messages("Name a river.", False, SEEDS[:2])
    assert instance_messages("Name a river.", False, SEEDS[:2], count=1) == one
    assert "3" not in one[0]["content"].split("\n\n")[0]
    for is_classification in (False, True):
        three = instance_messages("Name a river.", is_classification, SEEDS[:2], count=3)[0]["content"]
        assert "3 different instances" in three and three.endswith("Task: Name a river.")


def test_parse_instances_reads_several_in_either_order():
    reply = "Input: the cat\nOutput: le chat\n\nInput: None\nOutput: rien\n\nInput: a dog\nOutput: un chien"
    assert parse_instances(reply, False) == [("the cat", "le chat", None), ("", "rien", None),
                                             ("a dog", "un chien", None)]
    headed = ("Example 1:\nInput: 2 + 2\nOutput: 4\n\n**Example 2**\nInput: 3 + 3\nOutput: 6\n\n"
              "Example 3\nOutput: 7\n\nTask: another task\nInput: x\nOutput: y")
    assert parse_instances(headed, False) == [("2 + 2", "4", None), ("3 + 3", "6", None), ("", "7", None)]
    labels = "Label: positive\nInput: What a lovely day\n\nLabel: negative\nInput: The soup was cold"
    assert parse_instances(labels, True) == [("What a lovely day", "positive", None),
                                             ("The soup was cold", "negative", None)]
    assert parse_instances("Input: x\nOutput:\n\nInput: y\nOutput: z", False) == [("x", "", "empty_output"),
                                                                                  ("y", "z", None)]
    assert parse_instances("Input: 6 * 7\nOutput:\n42\n\nInput: 2 * 3\nOutput:\n6.", False) == [
        ("6 * 7", "42", None), ("2 * 3", "6.", None)]  # a number alone on its line is an output, no heading
    assert parse_instances("Just an answer", False) == [("", "", "unparseable_instance")]
    for one, flag in (("Input: None\nOutput: Paris\n\nTask: next", False), ("Label: spam\nInput: Win now", True)):
        assert parse_instances(one, flag) == [parse_instance(one, flag)]


# --------------------------------------------------------------------------- filters, records, rows


def test_duplicate_and_conflicting_instances_are_dropped_and_counted(tmp_path):
    instance = ("Input: red\nOutput: warm\n\n"      # kept
                "Input: red\nOutput: warm\n\n"      # an exact duplicate of the first
                "Input: blue\nOutput: cold\n\n"     # same input as the next, another output: both dropped
                "Input: blue\nOutput: calm\n\n"
                "Input: None\nOutput: grey\n\n"     # no input: several outputs are no conflict
                "Input: None\nOutput: green")
    generator = Scripted(["Describe the feeling a colour gives you."], instance=instance)
    out = run_self_instruct(cfg(tmp_path / "run", instances=6), generator=generator, stream=None)
    assert "6 different instances" in generator.requests[-1]
    [task] = read_jsonl(out / "tasks.jsonl")
    assert task["instances"] == [{"input": "red", "output": "warm"}, {"input": "", "output": "grey"},
                                 {"input": "", "output": "green"}]
    assert (task["input"], task["output"]) == ("red", "warm")  # the first: what in-context examples show
    assert [d["reason"] for d in task["instances_dropped"]] == ["duplicate_instance", "conflicting_instance",
                                                                "conflicting_instance"]
    rows = read_jsonl(out / "sft.jsonl")
    assert [(r["id"], r["input"], r["output"]) for r in rows] == [
        ("r0-0/0", "red", "warm"), ("r0-0/1", "", "grey"), ("r0-0/2", "", "green")]
    assert {r["instruction"] for r in rows} == {task["instruction"]}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["instances"] == {"per_task": 6, "kept": 3,
                                    "dropped": {"conflicting_instance": 2, "duplicate_instance": 1}}
    assert summary["accepted"] == 1 and summary["rejected"] == {}


def test_a_task_with_no_instance_left_is_rejected_with_a_counted_reason(tmp_path):
    conflicting = "Input: 7\nOutput: odd\n\nInput: 7\nOutput: even"
    out = run_self_instruct(cfg(tmp_path / "run", instances=2, per_round=2),
                            generator=Scripted(["Say if the copper kettle count is odd.",
                                                "Write a limerick about a sleepy cat."],
                                               instance=conflicting), stream=None)
    assert read_jsonl(out / "tasks.jsonl") == [] and read_jsonl(out / "sft.jsonl") == []
    rejected = read_jsonl(out / "rejected.jsonl")
    assert [(r["id"], r["reason"]) for r in rejected] == [("r0-0", "conflicting_instance"),
                                                         ("r0-1", "conflicting_instance")]
    assert rejected[0]["instances_dropped"] == [{"input": "7", "output": "odd", "reason": "conflicting_instance"},
                                                {"input": "7", "output": "even", "reason": "conflicting_instance"}]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rejected"] == {"conflicting_instance": 2}
    assert summary["instances"] == {"per_task": 2, "kept": 0, "dropped": {"conflicting_instance": 4}}


def test_a_cut_off_reply_loses_only_its_last_instance(tmp_path):
    class CutOff(Scripted):
        def chat(self, messages, **kw):
            reply = super().chat(messages, **kw)
            return dataclasses.replace(reply, finish_reason="length") if "instances" in messages[-1]["content"] \
                else reply

    out = run_self_instruct(cfg(tmp_path / "run", instances=3),
                            generator=CutOff(["Translate a word into French."],
                                             instance="Input: cat\nOutput: chat\n\nInput: dog\nOutput: chi"),
                            stream=None)
    [task] = read_jsonl(out / "tasks.jsonl")
    assert task["instances"] == [{"input": "cat", "output": "chat"}]
    assert json.loads((out / "summary.json").read_text())["instances"]["dropped"] == {"truncated_instance": 1}
    assert [r["id"] for r in read_jsonl(out / "sft.jsonl")] == ["r0-0"]  # one instance: the task's own id


# --------------------------------------------------------------------------- default, config, resume


def test_default_one_instance_keeps_the_rows_and_requests(tmp_path):
    generator = Scripted(["Name the capital city of France."], instance="Input: None\nOutput: Paris\n\nInput: x")
    out = run_self_instruct(cfg(tmp_path / "run"), generator=generator, stream=None)
    assert generator.requests[-1].split("\n\n")[0] == (
        "For the last task below, write an input for it (None if the task needs no input), then the correct "
        "output. Use the format of the examples: an 'Input:' line, then an 'Output:' line.")
    assert [(r["id"], r["input"], r["output"]) for r in read_jsonl(out / "sft.jsonl")] == [("r0-0", "", "Paris")]
    assert len(generator.requests) == 3
    assert "instances" not in read_jsonl(out / "candidates.jsonl")[0]  # the log's records as before


def test_instances_per_task_is_validated():
    with pytest.raises(ConfigError, match="self_instruct.instances_per_task must be >= 1"):
        validate_self_instruct(SelfInstructConfig.from_dict({"self_instruct": {"instances_per_task": 0}}))


def test_resume_under_another_instances_per_task_is_refused(tmp_path):
    out = tmp_path / "run"
    run_self_instruct(cfg(out), generator=Scripted(["Name the capital city of France."]), stream=None)
    with pytest.raises(ConfigError, match="instances_per_task=1, now 3"):
        run_self_instruct(cfg(out, instances=3), generator=Scripted([]), stream=None)
    # a log recorded before the key existed: its candidates had one instance each
    settings = json.loads((out / "settings.json").read_text())
    del settings["instances_per_task"]
    (out / "settings.json").write_text(json.dumps(settings))
    with pytest.raises(ConfigError, match="instances_per_task"):
        run_self_instruct(cfg(out, instances=3), generator=Scripted([]), stream=None)
    (out / "settings.json").write_text(json.dumps(settings))
    run_self_instruct(cfg(out, max_rounds=2), generator=Scripted(["List three uses of copper in houses."]),
                      stream=None)
    assert len(read_jsonl(out / "tasks.jsonl")) == 2
