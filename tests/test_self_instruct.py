"""Self-Instruct: seed files, parsing, every filter and its counter, seeded in-context sampling,
the round loop against a scripted generator (target reached, pool never near-duplicated),
resume after a kill and after failures (same tasks as an uninterrupted run), and end to end
over HTTP against the tiny served model; the SFT file trains with `posttrain sft` as it is."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from posttrain.config.synthesis import SelfInstructConfig, SelfInstructFilterConfig, SelfInstructLoopConfig
from posttrain.errors import ConfigError, DataError, UserError
from posttrain.feedback.client import BackendError, Reply, Usage
from posttrain.feedback.rouge import rouge_l
from posttrain.feedback.self_instruct import (Task, TaskPool, clean_instruction, instance_messages,
                                              instruction_rejection, load_seed_tasks, parse_instance, parse_yes_no,
                                              plan_candidate, run_self_instruct)

ROOT = Path(__file__).resolve().parents[1]
SEEDS = load_seed_tasks("default")
VOCAB = ("river lantern copper quiet harvest violin marble orbit pepper canyon meadow anchor ribbon glacier "
         "thimble saddle walnut prism comet tundra falcon ember pillow quartz banjo lagoon cobalt tulip "
         "sparrow granite velvet ladder maple puzzle kettle nectar harbor cactus summit oyster").split()


class FakeGenerator:
    """Replies that depend only on the request (and its per-candidate seed), never on timing.

    Instructions: mostly new random word strings ("Classify ..." or "Explain ..."), and by design
    some seed copies (duplicate), seed near-copies (similar), banned words, too-short and empty
    ones. Classify tasks get yes from the type question, Explain tasks no, others an unclear
    answer; instances are well-formed except for some unparseable ones.
    """

    model_name = "fake-generator"

    def __init__(self, exit_after: int | None = None, fail_first: int = 0, delay: float = 0.0):
        self.usage = Usage()
        self.requests: list[str] = []
        self.exit_after, self.fail_first, self.delay = exit_after, fail_first, delay
        self._lock = threading.Lock()

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None) -> Reply:
        content = messages[-1]["content"]
        with self._lock:
            self.requests.append(content)
            if self.exit_after is not None and len(self.requests) > self.exit_after:
                os._exit(137)  # as abrupt as kill -9
            failing = content.startswith("Come up with") and self.fail_first > 0
            self.fail_first -= failing
        time.sleep(self.delay)
        if failing:
            raise BackendError("HTTP 503: scripted failure")
        rng = random.Random(seed)
        if content.startswith("Come up with"):
            text = self._instruction(rng)
        elif content.startswith("Is the following"):
            task = content.split("Task: ", 1)[1]
            text = "Yes, it is." if task.startswith("Classify") else "No." if task.startswith("Explain") else "Hmm"
        else:
            text = ("I would rather not." if rng.random() < 0.1 else
                    "Label: positive\nInput: what a lovely day" if "pick one of its possible labels" in content else
                    f"Input: None\nOutput: {' '.join(rng.sample(VOCAB, 5))}\n\nTask: another one")
        self.usage.add(requests=1)
        return Reply(text, "stop", 20, 10)

    @staticmethod
    def _instruction(rng: random.Random) -> str:
        x = rng.random()
        if x < 0.08:
            return rng.choice(SEEDS).instruction  # duplicate
        if x < 0.16:
            return rng.choice(SEEDS).instruction + " Thanks"  # near-duplicate
        if x < 0.24:
            return f"Draw a picture of a {rng.choice(VOCAB)}"  # banned word
        if x < 0.31:
            return "Hi"
        if x < 0.35:
            return "   "
        verb = rng.choice(["Classify", "Explain", "Describe"])
        return f"{rng.randint(1, 9)}. {verb} the {' '.join(rng.sample(VOCAB, 7))}."


def config(out: Path, **sections) -> SelfInstructConfig:
    data = {"output_dir": str(out), "self_instruct": {"num_tasks": 20, "per_round": 8, "concurrency": 3}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return SelfInstructConfig.from_dict(data)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def outputs(out: Path) -> dict[str, str]:
    return {name: (out / name).read_text() for name in ("tasks.jsonl", "rejected.jsonl", "sft.jsonl")}


# --------------------------------------------------------------------------- seeds, parsing, filters


def test_default_seeds_mix_both_task_types():
    assert len(SEEDS) == 25 and len({t.id for t in SEEDS}) == 25
    assert 8 <= sum(t.is_classification for t in SEEDS) <= 17
    assert all(t.instruction and t.output for t in SEEDS)


def test_seed_file_layouts_and_errors(tmp_path):
    path = tmp_path / "seeds.jsonl"
    rows = [{"instruction": "Add the numbers.", "input": "2 3", "output": "5"},
            {"id": "orig", "instruction": "Name a colour.", "instances": [{"input": "", "output": "red"}],
             "is_classification": False}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_seed_tasks(str(path)) == [Task("seed-0", "Add the numbers.", "2 3", "5", False),
                                          Task("orig", "Name a colour.", "", "red", False)]
    for row, message in [({"instruction": "x"}, ":1: 'output' must be a non-empty string"),
                         ({"instruction": "x", "output": "y", "is_classification": "yes"}, "must be true or false")]:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(DataError, match=message):
            load_seed_tasks(str(path))
    path.write_text("{broken\n")
    with pytest.raises(DataError, match=f"{path}:1"):
        load_seed_tasks(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_seed_tasks(str(tmp_path / "nope.jsonl"))


def test_clean_instruction_and_yes_no():
    assert clean_instruction("\n 9. Write a poem about tea.\n10. Another task") == "Write a poem about tea."
    assert clean_instruction("Task 9: \"List three   fruits.\"") == "List three fruits."
    assert clean_instruction("New instruction: Sort the words.") == "Sort the words."
    assert clean_instruction("- Name a river") == "Name a river" and clean_instruction("  \n ") == ""
    assert parse_yes_no("Yes, it is.") is True and parse_yes_no("no") is False
    assert parse_yes_no("Maybe") is None and parse_yes_no("") is None


def test_parse_instance():
    assert parse_instance("Input: None\nOutput: Paris", False) == ("", "Paris", None)
    assert parse_instance("input: the cat\noutput:\n  le chat\n\nTask: next", False) == ("the cat", "le chat", None)
    assert parse_instance("Output: only this", False) == ("", "only this", None)
    assert parse_instance("Just an answer", False) == ("", "", "unparseable_instance")
    assert parse_instance("Input: x\nOutput:   ", False) == ("x", "", "empty_output")
    assert parse_instance("Label: spam\nInput: Win a prize now", True) == ("Win a prize now", "spam", None)
    assert parse_instance("Class label: odd\nInput: 7", True) == ("7", "odd", None)
    assert parse_instance("Label: spam\nInput: none", True) == ("", "spam", "empty_input")
    assert parse_instance("Input: text only", True) == ("", "", "unparseable_instance")
    prompt = instance_messages("Tell sarcasm from sincerity.", True, [SEEDS[0]])[0]["content"]
    assert "Label: negative\nInput: The battery" in prompt and prompt.endswith("Task: Tell sarcasm from sincerity.")


def _candidate(instruction: str, **fields) -> dict:
    return {"id": "r0-0", "instruction": instruction, "raw_instruction": instruction, "round": 0, "examples": [],
            "instruction_finish_reason": "stop", "input": "", "output": "out", "is_classification": False,
            "type_source": "model", "model": "m", "instance_error": None, **fields}


def test_instruction_filters():
    f = SelfInstructFilterConfig(min_words=3, max_words=8)
    assert instruction_rejection(_candidate(""), f) == "empty_instruction"
    assert instruction_rejection(_candidate("Do it"), f) == "too_short"
    assert instruction_rejection(_candidate("one two three four five six seven eight nine"), f) == "too_long"
    assert instruction_rejection(_candidate("Describe the IMAGE below."), f) == "banned_word"
    assert instruction_rejection(_candidate("Tell me how to go to the station"), f) == "banned_word"  # a phrase
    assert instruction_rejection(_candidate("Imagine a filed report"), f) is None  # whole words only
    cut = _candidate("Write a story about", instruction_finish_reason="length")
    assert instruction_rejection(cut, f) == "truncated_instruction"
    assert instruction_rejection(cut, SelfInstructFilterConfig(drop_truncated=False)) is None
    complete_line = _candidate("Write a story", raw_instruction="Write a story\n2. And",
                               instruction_finish_reason="length")
    assert instruction_rejection(complete_line, f) is None  # the cut came after the instruction's line


def test_pool_rejects_duplicates_and_near_duplicates_and_counts():
    seeds = [Task("s0", "Write a haiku about the first snow of winter.", "", "x", False)]
    pool = TaskPool(seeds, SelfInstructFilterConfig(), target=2)
    assert pool.apply(_candidate("write a HAIKU about the first snow, of winter", id="a")) == "duplicate"
    # LCS(write a haiku about the first snow of winter, write a haiku about the last snow of winter) = 8 of 9
    assert rouge_l("Write a haiku about the last snow of winter", seeds[0].instruction) == pytest.approx(16 / 18)
    assert pool.apply(_candidate("Write a haiku about the last snow of winter", id="b")) == "similar"
    assert pool.rejected[-1]["most_similar"] == "s0" and pool.rejected[-1]["rouge_l"] == pytest.approx(0.8889)
    assert pool.apply(_candidate("List three uses of a paperclip", id="c", instance_error="empty_output")) \
        == "empty_output"
    assert pool.apply(_candidate("List three uses of a paperclip", id="d", instance_finish_reason="length")) \
        == "truncated_instance"
    assert pool.apply(_candidate("List three uses of a paperclip", id="e")) is None
    assert pool.apply(_candidate("List three uses of a paperclip", id="f")) == "duplicate"  # now in the pool
    assert pool.apply(_candidate("Explain tides to a child", id="g")) is None
    assert pool.full and pool.apply(_candidate("Name five rivers in Africa", id="h")) is None and pool.surplus == 1
    assert [t["id"] for t in pool.accepted] == ["e", "g"] and pool.accepted[0]["rouge_l"] < 0.7
    assert pool.counters()["rejected"] == {"duplicate": 2, "empty_output": 1, "similar": 1, "truncated_instance": 1}


def test_plan_is_seeded_and_mixes_seed_and_generated_examples():
    loop = SelfInstructLoopConfig(seed_examples=6, generated_examples=2)
    pool = TaskPool(SEEDS, SelfInstructFilterConfig(), target=10)
    first = plan_candidate(pool, 0, 3, loop)
    assert first == plan_candidate(pool, 0, 3, loop) and first != plan_candidate(pool, 0, 4, loop)
    assert len(first["examples"]) == 8 and first["type"] is None  # no generated tasks yet: 8 seed tasks
    for i, text in enumerate(["Explain tides to a child", "Name five rivers in Africa", "Sort these words"]):
        pool.apply(_candidate(text, id=f"r0-{i}"))
    plan = plan_candidate(pool, 1, 0, loop)
    generated = [e for e in plan["examples"] if e.startswith("r0-")]
    assert len(plan["examples"]) == 8 and len(generated) == 2
    typed = SelfInstructLoopConfig(task_type="examples", classification_fraction=0.5)
    by_id = {t.id: t for t in pool.tasks}
    plans = [plan_candidate(pool, 2, k, typed) for k in range(20)]
    assert {p["type"] for p in plans} == {"classification", "generation"}
    for p in plans:
        assert {by_id[e].is_classification for e in p["examples"]} == {p["type"] == "classification"}


# --------------------------------------------------------------------------- the command


def test_run_reaches_the_target_with_every_filter_counted(tmp_path):
    generator = FakeGenerator()
    out = run_self_instruct(config(tmp_path / "run", self_instruct={"num_tasks": 30}), generator=generator,
                            stream=None)
    summary = json.loads((out / "summary.json").read_text())
    tasks, rejected = read_jsonl(out / "tasks.jsonl"), read_jsonl(out / "rejected.jsonl")
    assert summary["accepted"] == len(tasks) == 30 and summary["reached_target"]
    assert summary["accepted"] + sum(summary["rejected"].values()) + summary["surplus"] == summary["candidates"]
    assert summary["candidates"] == 8 * summary["rounds"] == len(read_jsonl(out / "candidates.jsonl"))
    assert {"duplicate", "similar", "banned_word", "too_short", "empty_instruction",
            "unparseable_instance"} <= set(summary["rejected"])
    assert summary["rejected"] == {r: sum(x["reason"] == r for x in rejected) for r in summary["rejected"]}
    pool = [t.instruction for t in SEEDS]
    for task in tasks:  # nothing accepted is close to anything before it
        assert max(rouge_l(task["instruction"], other) for other in pool) < 0.7
        assert task["model"] == "fake-generator" and len(task["examples"]) == 8 and task["output"]
        pool.append(task["instruction"])
    kinds = {t["is_classification"] for t in tasks}
    assert kinds == {True, False}
    assert all(t["input"] and t["output"] == "positive" for t in tasks if t["is_classification"])
    assert summary["accepted_types"]["classification"] == sum(t["is_classification"] for t in tasks)
    # an instruction rejected on its own (or by the round's starting pool) costs one request, not three
    early = [c for c in read_jsonl(out / "candidates.jsonl") if "skipped_after" in c]
    assert early and generator.usage.requests == 3 * summary["candidates"] - 2 * len(early) \
        - sum(c["type_source"] == "examples" for c in read_jsonl(out / "candidates.jsonl"))

    from posttrain.data.formats import load_records

    records, _ = load_records([str(out / "sft.jsonl")], log=lambda _: None)
    assert len(records) == 30 and records[0].messages[-1]["content"] == tasks[0]["output"]


def test_task_type_from_examples(tmp_path):
    out = run_self_instruct(config(tmp_path / "run", self_instruct={"task_type": "examples", "num_tasks": 8}),
                            generator=FakeGenerator(), stream=None)
    candidates = read_jsonl(out / "candidates.jsonl")
    assert all(c["type_source"] in ("examples", "skipped") for c in candidates)
    assert all(c["is_classification"] == (c["type"] == "classification") for c in candidates)
    with pytest.raises(DataError, match="no classification seed tasks"):
        path = tmp_path / "gen_only.jsonl"
        path.write_text(json.dumps({"instruction": "Write a poem.", "output": "A poem."}) + "\n")
        run_self_instruct(config(tmp_path / "r2", data={"seed_file": str(path)},
                                 self_instruct={"task_type": "examples"}), generator=FakeGenerator(), stream=None)


def test_failures_stop_the_round_and_a_rerun_completes_it(tmp_path):
    whole = run_self_instruct(config(tmp_path / "whole"), generator=FakeGenerator(), stream=None)
    with pytest.raises(UserError, match="2 candidates of round 0 failed .*HTTP 503.*rerun the same command"):
        run_self_instruct(config(tmp_path / "run"), generator=FakeGenerator(fail_first=2), stream=None)
    assert len(read_jsonl(tmp_path / "run" / "candidates.jsonl")) == 6
    run_self_instruct(config(tmp_path / "run"), generator=FakeGenerator(), stream=None)
    assert outputs(tmp_path / "run") == outputs(whole)


def test_raising_num_tasks_continues_the_same_run(tmp_path):
    whole = run_self_instruct(config(tmp_path / "whole"), generator=FakeGenerator(), stream=None)
    run_self_instruct(config(tmp_path / "run", self_instruct={"num_tasks": 7}), generator=FakeGenerator(), stream=None)
    assert len(read_jsonl(tmp_path / "run" / "tasks.jsonl")) == 7
    run_self_instruct(config(tmp_path / "run"), generator=FakeGenerator(), stream=None)
    assert outputs(tmp_path / "run") == outputs(whole)
    with pytest.raises(ConfigError, match="rouge_threshold=0.7, now 0.5"):
        run_self_instruct(config(tmp_path / "run", filters={"rouge_threshold": 0.5}), generator=FakeGenerator(),
                          stream=None)


def test_config_is_validated_up_front():
    from posttrain.config.synthesis import validate_self_instruct

    with pytest.raises(ConfigError, match="did you mean filters.rouge_threshold"):
        SelfInstructConfig.from_dict({"filters": {"rouge": 0.5}})
    with pytest.raises(ConfigError, match="filters.min_words must be >= 1 and <= filters.max_words"):
        validate_self_instruct(SelfInstructConfig.from_dict({"filters": {"min_words": 9, "max_words": 4}}))


_KILLED_RUN = """
import sys
from pathlib import Path
from tests.test_self_instruct import FakeGenerator, config
from posttrain.feedback.self_instruct import run_self_instruct
run_self_instruct(config(Path(sys.argv[1])), generator=FakeGenerator(exit_after=int(sys.argv[2]), delay=0.002),
                  stream=None)
"""


def test_resume_after_kill_gives_the_same_tasks(tmp_path):
    whole = run_self_instruct(config(tmp_path / "whole"), generator=FakeGenerator(), stream=None)
    killed = tmp_path / "killed"
    result = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(killed), "40"], cwd=ROOT, capture_output=True,
                            text=True)
    assert result.returncode == 137, result.stderr[-2000:]
    before = read_jsonl(killed / "candidates.jsonl")
    assert before and not (killed / "tasks.jsonl").exists()
    run_self_instruct(config(killed), generator=FakeGenerator(), stream=None)
    ids = [c["id"] for c in read_jsonl(killed / "candidates.jsonl")]
    rounds = json.loads((killed / "summary.json").read_text())["rounds"]
    assert sorted(ids) == sorted(f"r{r}-{k}" for r in range(rounds) for k in range(8))  # no duplicates, no gaps
    assert ids[:len(before)] == [c["id"] for c in before]  # appended to, never rewritten
    assert outputs(killed) == outputs(whole)


# --------------------------------------------------------------------------- end to end over HTTP


def test_end_to_end_over_http_and_sft_trains_on_the_output(tmp_path):
    torch = pytest.importorskip("torch")
    from posttrain.cli import main
    from posttrain.serve import build_server

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = build_server("tiny", port=0, log_requests=False).start()
    out = tmp_path / "si"
    args = ["self-instruct", str(ROOT / "examples" / "self_instruct.yaml"), f"output_dir={out}",
            f"generator.base_url={server.url}/v1", "generator.model=tiny", "generator.max_tokens=16",
            "self_instruct.per_round=4", "self_instruct.task_type=examples", "self_instruct.instance_examples=1",
            "self_instruct.concurrency=4", "filters.drop_truncated=false", "filters.min_words=1"]
    try:
        assert main(args + ["self_instruct.max_rounds=1"]) == 0
        assert main(args + ["self_instruct.max_rounds=2"]) == 0  # resumes with round 1
    finally:
        server.close()
        torch.set_num_threads(threads)
    candidates = read_jsonl(out / "candidates.jsonl")
    assert sorted(c["id"] for c in candidates) == sorted(f"r{r}-{k}" for r in range(2) for k in range(4))
    seed_ids = {t.id for t in SEEDS}
    for c in candidates:  # random-init model: gibberish text, so check shapes and provenance
        assert c["model"] == "tiny" and c["type"] in ("classification", "generation")
        assert len(c["examples"]) == 8 and set(c["examples"]) <= seed_ids | {x["id"] for x in candidates}
        assert isinstance(c["raw_instruction"], str)
        if "skipped_after" not in c:
            assert c["type_source"] == "examples" and isinstance(c["raw_instance"], str)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["candidates"] == 8 and summary["rounds"] == 2
    assert summary["accepted"] + sum(summary["rejected"].values()) + summary["surplus"] == 8
    assert len(read_jsonl(out / "sft.jsonl")) == summary["accepted"]

    fake = run_self_instruct(config(tmp_path / "fake", self_instruct={"num_tasks": 12}), generator=FakeGenerator(),
                             stream=None)
    result = subprocess.run(
        [sys.executable, "-m", "posttrain", "sft", f"output_dir={tmp_path / 'sft'}", "model.path=tiny",
         f"data.train_files=[{fake / 'sft.jsonl'}]", "train.max_steps=2", "train.batch_size=4",
         "train.progress_bar=false", "data.eval_fraction=0", "eval.exact_match_prompts=0", "data.max_length=128"],
        cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "sft" / "final").is_dir()
