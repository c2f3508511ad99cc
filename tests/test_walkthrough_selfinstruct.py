"""A Self-Instruct walk, read against the paper (Wang et al. 2023), with in-process scripted generators.

Walked: `posttrain self-instruct` (src/posttrain/feedback/self_instruct.py, its config and README
section): the instruction prompt (6 seed + 2 generated in-context tasks, seed tasks filling in while
the pool has none), the keyword filter against the paper's list, the length filter, ROUGE-L >= 0.7
against the whole pool and among one round's own candidates, classification found by a yes/no
question and written label first, the instance parser on replies a chat model writes (markdown bold,
"None.", code fences), the alpaca rows in sft.jsonl, seed files in JSONL, JSON, Parquet and CSV with a
bad row (file:line), resume and determinism under self_instruct.seed.

Right: every keyword of the paper's list is rejected as a whole word; a near-duplicate within one round
is judged against the candidates accepted before it; a bad seed row stops the run with its file:line
before any request is sent and before the output directory is made; a Parquet seed file's boolean
flags are read as they are; the counts in summary.json add up to the candidates.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 34: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.config.synthesis import SelfInstructConfig, SelfInstructFilterConfig
from posttrain.errors import DataError
from posttrain.feedback.client import Reply, Usage
from posttrain.feedback.self_instruct import clean_instruction, instruction_rejection, load_seed_tasks, \
    run_self_instruct

# The paper's keyword filter (section 2.3 and its released code): instructions naming these are dropped,
# a text-only model cannot act on them.
PAPER_KEYWORDS = ["image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
                  "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram"]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Scripted:
    """Instruction replies handed out in order (concurrency 1 keeps the order); the type question
    answered "No."; every instance reply is `instance`. Records every request."""

    model_name = "scripted"

    def __init__(self, instructions: list[str], instance: str = "Input: None\nOutput: Soft rain on the roof."):
        self.usage, self.instructions, self.instance = Usage(), list(instructions), instance
        self.requests: list[str] = []

    def chat(self, messages, **_):
        content = messages[-1]["content"]
        self.requests.append(content)
        self.usage.add(requests=1)
        if content.startswith("Come up with"):
            return Reply(self.instructions.pop(0), "stop", 1, 1)
        if content.startswith("Is the following"):
            return Reply("No.", "stop", 1, 1)
        return Reply(self.instance, "stop", 1, 1)


def run(tmp_path: Path, generator: Scripted, per_round: int = 1, **data) -> Path:
    cfg = SelfInstructConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "data": data,
        "self_instruct": {"num_tasks": 10, "per_round": per_round, "max_rounds": 1, "concurrency": 1}})
    return run_self_instruct(cfg, generator=generator, stream=None)


def _candidate(instruction: str) -> dict:
    return {"instruction": instruction, "raw_instruction": instruction, "instruction_finish_reason": "stop"}


# --------------------------------------------------------------------------- defects


def test_csv_seed_file_reads_its_flag_cells_and_blank_ids(tmp_path):
    """load_seed_tasks reads "JSONL (or any row file)". A CSV cell is text: the preference reader takes
    "true"/"false" cells as booleans for a CSV (data/preferences.py), and a blank cell is no value."""
    path = tmp_path / "seeds.csv"
    path.write_text("id,instruction,input,output,is_classification\n"
                    ",Label the review as positive or negative.,The soup was cold.,negative,true\n"
                    ",Write a haiku about the sea.,,Waves fold into foam,false\n")
    try:
        tasks = load_seed_tasks(str(path))
    except DataError as exc:
        raise AssertionError(f"the CSV seed file was refused: {exc}") from None
    assert [(t.is_classification, t.input) for t in tasks] == [(True, "The soup was cold."), (False, "")]
    assert len({t.id for t in tasks}) == 2 and "" not in {t.id for t in tasks}


def test_instruction_wrapped_in_curly_quotes_is_unwrapped(tmp_path):
    """clean_instruction's docstring: "without quotes wrapped around the whole of it". Models write
    typographic quotes as often as straight ones; the SFT row must not carry them."""
    assert clean_instruction('"Write a limerick about a sleepy cat."') == "Write a limerick about a sleepy cat."
    out = run(tmp_path, Scripted(["\u201cWrite a limerick about a sleepy cat.\u201d"]))
    rows = read_jsonl(out / "sft.jsonl")
    assert [r["instruction"] for r in rows] == ["Write a limerick about a sleepy cat."], \
        f"sft.jsonl instructions: {[r['instruction'] for r in rows]}"


def test_fenced_instruction_reply_gives_the_instruction_not_the_fence(tmp_path):
    """A chat model that puts its one line in a code fence: the task is the line inside. The fence
    line alone has no words at all, so min_words=3 ("reject instructions with fewer words") must never
    let it through."""
    out = run(tmp_path, Scripted(["```\nWrite a haiku about rain on a tin roof.\n```"]))
    rows = read_jsonl(out / "sft.jsonl")
    assert [r["instruction"] for r in rows] == ["Write a haiku about rain on a tin roof."], \
        f"sft.jsonl instructions: {[r['instruction'] for r in rows]}"
    assert instruction_rejection(_candidate("```"), SelfInstructFilterConfig()) is not None, \
        "'```' passes the length filter as 3 words"


def test_fenced_instance_reply_leaves_no_fence_in_the_output(tmp_path):
    """parse_instance reads markdown bold labels; a reply put in a code fence as a whole is the same
    markdown wrapping, and its closing ``` is no part of the output the SFT row trains on."""
    out = run(tmp_path, Scripted(["Name the capital city of France."],
                                 instance="```\nInput: None\nOutput: Paris\n```"))
    rows = read_jsonl(out / "sft.jsonl")
    assert [(r["input"], r["output"]) for r in rows] == [("", "Paris")], f"sft.jsonl rows: {rows}"


# --------------------------------------------------------------------------- right, and untested


def test_every_keyword_of_the_papers_filter_is_rejected_by_default():
    filters = SelfInstructFilterConfig()
    for keyword in PAPER_KEYWORDS:
        text = f"Please {keyword.upper()} something about the old harbour town"
        assert instruction_rejection(_candidate(text), filters) == "banned_word", keyword
    assert instruction_rejection(_candidate("Explain what a drawer is used for"), filters) is None  # whole words


def test_a_bad_seed_row_stops_the_run_before_any_request_or_output(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text(json.dumps({"instruction": "Add the two numbers.", "input": "2 3", "output": "5"}) + "\n"
                     + json.dumps({"instruction": "Name a colour.", "output": "   "}) + "\n")
    generator = Scripted(["Write a haiku about rain on a tin roof."])
    with pytest.raises(DataError, match=rf"{seeds}:2: 'output' must be a non-empty string"):
        run(tmp_path, generator, seed_file=str(seeds))
    assert generator.requests == [] and not (tmp_path / "run").exists()


def test_parquet_seed_file_keeps_its_boolean_flags(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "seeds.parquet"
    pq.write_table(pa.table({"instruction": ["Label the review.", "Write a poem about tea."],
                             "input": ["Great food.", None], "output": ["positive", "Steam curls up."],
                             "is_classification": [True, False]}), path)
    tasks = load_seed_tasks(str(path))
    assert [(t.id, t.input, t.is_classification) for t in tasks] == [("seed-0", "Great food.", True),
                                                                      ("seed-1", "", False)]


def test_near_duplicates_within_one_round_and_the_counts_add_up(tmp_path):
    """Two near-identical new instructions in the same round: the first joins the pool, the second is
    'similar' to it (not to a seed), and summary.json's counts add up to the candidates."""
    first = "Write a short bedtime story about a brave little lighthouse keeper."
    near = "Write a short bedtime story about a brave old lighthouse keeper."
    out = run(tmp_path, Scripted([first, near, "Hi", "List three uses of copper in houses."]), per_round=4)
    tasks, rejected = read_jsonl(out / "tasks.jsonl"), read_jsonl(out / "rejected.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    assert [t["id"] for t in tasks] == ["r0-0", "r0-3"]
    assert [(r["id"], r["reason"], r.get("most_similar")) for r in rejected] == [
        ("r0-1", "similar", "r0-0"), ("r0-2", "too_short", None)]
    assert summary["rejected"] == {"similar": 1, "too_short": 1}
    assert summary["accepted"] + sum(summary["rejected"].values()) + summary["surplus"] == summary["candidates"] == 4
