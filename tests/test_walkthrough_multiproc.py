"""Review tests: what a user meets launching posttrain under torchrun with 2 CPU processes (gloo),
beyond "two processes train like one" (tests/test_distributed_*.py).

README, "Pipelines": "A data stage runs on one process: a pipeline started with torchrun refuses
to run one". start_run's `log` "prints on the main process only". The commands launched alone
under torchrun should do the same: run their work once (one process prints, one writes) or refuse
with a message that says why; a run's messages and errors should be printed once, not once per
process.

Two launches: one torchrun job runs a plan of command lines in sequence (the driver pattern of
tests/test_distributed_preference.py), each with its stdout / stderr captured per process; a
second launch checks that an exception raised on one rank only ends the job promptly.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]

# Runs several `posttrain` command lines in one process, one after another, each with its
# Python-level stdout / stderr written to <workdir>/<name>.rank<R>.out|err, and its exit code
# (or exception) to <workdir>/codes.rank<R>.json. accelerate's end_training() destroys the process
# group at each training run's end; the driver keeps it for the next one (test harness only).
DRIVER = """
import contextlib, json, os, sys
import accelerate.state

accelerate.state.PartialState.destroy_process_group = lambda self, group=None: None
sys.path.insert(0, os.getcwd())  # tests.rewards_fixture, as `python -m posttrain` finds it
from posttrain.cli import main

plan, workdir = json.loads(open(sys.argv[1]).read()), sys.argv[2]
rank = os.environ.get("RANK", "0")
codes = {}
for name, argv in plan:
    with open(os.path.join(workdir, f"{name}.rank{rank}.out"), "w") as out, \\
            open(os.path.join(workdir, f"{name}.rank{rank}.err"), "w") as err, \\
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            codes[name] = main(argv)
        except SystemExit as exc:
            codes[name] = exc.code
        except Exception as exc:
            codes[name] = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(workdir, f"codes.rank{rank}.json"), "w") as fh:
        fh.write(json.dumps(codes))
"""

COMMON = ["model.path=tiny", "train.max_steps=1", "train.progress_bar=false", "train.resume=never"]


def _plan(root: Path) -> list[tuple[str, list[str]]]:
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Copy: {w}"}) + "\n" for w in ("a b", "c d", "e")))
    scored = root / "score_in.jsonl"
    scored.write_text("".join(json.dumps({"prompt": "Copy: a b", "response": r}) + "\n" for r in ("a b", "c")))
    out = root / "runs"
    return [
        # a training run: orpo on a config file whose dpo.loss is dpo (the alias prints a note), LoRA
        ("orpo", ["orpo", "examples/dpo.yaml", f"output_dir={out / 'orpo'}", *COMMON, "adapter.method=lora",
                  "data.synthetic_size=16", "train.batch_size=2", "eval.exact_match_prompts=0"]),
        # an error every process meets before training (a misspelt key)
        ("config-error", ["sft", f"output_dir={out / 'config-error'}", *COMMON, "train.nosuch=1"]),
        # the commands that are not training stages
        ("evaluate", ["evaluate", "examples/evaluate.yaml", f"output_dir={out / 'evaluate'}", "prompts.limit=4",
                      "generation.max_new_tokens=3", "generation.samples=1", "safety.redteam=false"]),
        ("quality", ["quality", "examples/quality.yaml", f"output_dir={out / 'quality'}"]),
        ("rlaif", ["rlaif", "examples/rlaif.yaml", f"output_dir={out / 'rlaif'}", "policy.kind=local",
                   "policy.model=tiny", "judge.kind=local", "judge.model=tiny", "judge.max_tokens=8",
                   "policy.max_tokens=4", "data.limit=3", "rlaif.num_responses=2", "rlaif.concurrency=1"]),
        ("generate", ["generate", "--model", "tiny", "--prompts", str(prompts), "--output", str(out / "gen.jsonl"),
                      "--max-new-tokens", "3"]),
        ("score", ["score", "--function", "short=tests.rewards_fixture:short", "--input", str(scored),
                   "--output", str(out / "scored.jsonl")]),
        ("merge", ["merge", str(out / "orpo"), str(out / "merged")]),
    ]


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    root = tmp_path_factory.mktemp("walkthrough-mp")
    plan = _plan(root)
    (root / "plan.json").write_text(json.dumps(plan))
    (root / "driver.py").write_text(DRIVER)
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(root / "driver.py"), str(root / "plan.json"), str(root)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, check=False, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    codes = [json.loads((root / f"codes.rank{r}.json").read_text()) for r in (0, 1)]
    return {"root": root, "codes": codes}


def _lines(launch, name: str, stream: str) -> list[str]:
    """Every line the two processes printed on `stream` for the command `name`."""
    return [line for r in (0, 1)
            for line in (launch["root"] / f"{name}.rank{r}.{stream}").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- training: messages once


def test_orpo_trains_in_two_processes(launch):
    assert [c["orpo"] for c in launch["codes"]] == [0, 0]
    run = launch["root"] / "runs" / "orpo"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in records if "loss" in r] == [2]
    assert (run / "final" / "adapter_model.safetensors").is_file()
    assert (run / "summary.json").is_file()


def test_run_directory_line_is_printed_once(launch):
    lines = _lines(launch, "orpo", "out")
    assert sum(line.startswith("run directory:") for line in lines) == 1, lines


def test_alias_note_is_printed_once(launch):
    lines = _lines(launch, "orpo", "out")
    assert sum(line.startswith("note: posttrain orpo runs dpo.loss=orpo") for line in lines) == 1, lines


def test_a_config_error_is_printed_once(launch):
    assert [c["config-error"] for c in launch["codes"]] == [2, 2]  # every process stops
    errors = [line for line in _lines(launch, "config-error", "err") if line.startswith("error:")]
    assert errors and all("train.nosuch" in line for line in errors)
    assert len(errors) == 1, errors


# --------------------------------------------------------------------------- commands that are not stages

# What each command prints once when it has done its work.
DONE = {"evaluate": "run directory:", "quality": "run directory:", "rlaif": "run directory:",
        "generate": "wrote 3 completions", "score": "scored 2 rows", "merge": "merged lora into the base"}


@pytest.mark.parametrize("command", list(DONE))
def test_a_command_that_is_not_a_stage_runs_once_or_refuses_under_torchrun(launch, command):
    codes = [c[command] for c in launch["codes"]]
    printed = _lines(launch, command, "out") + _lines(launch, command, "err")
    refused = [line for line in printed if "torchrun" in line or "processes" in line]
    if any(code != 0 for code in codes):
        # a refusal: says why (not a race such as "raw.jsonl is being written by another run")
        assert refused, (codes, printed[-6:])
        assert not any("being written by another run" in line for line in printed), printed[-6:]
    else:
        done = [line for line in printed if DONE[command] in line]
        assert len(done) == 1, done


def test_the_outputs_of_the_commands_are_whole(launch):
    """Whatever the duplication, the files the commands wrote hold their rows once."""
    out = launch["root"] / "runs"
    if (out / "gen.jsonl").is_file():
        assert len((out / "gen.jsonl").read_text().splitlines()) == 3
    if (out / "scored.jsonl").is_file():
        rows = [json.loads(line) for line in (out / "scored.jsonl").read_text().splitlines()]
        assert [r["reward"] for r in rows] == [-3.0, -1.0]
    kept = out / "quality" / "kept.jsonl"
    if kept.is_file():
        assert len(kept.read_text().splitlines()) == 25


# --------------------------------------------------------------------------- failure on one rank

RANK_ONE_REWARD = """
import os

def boom(prompt, response):
    if os.environ.get("RANK") == "1":
        raise ValueError("boom on rank 1")
    return 0.0
"""


def test_a_reward_that_fails_on_one_rank_ends_the_job_promptly_with_its_error(tmp_path):
    (tmp_path / "rank_one_reward.py").write_text(RANK_ONE_REWARD)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Copy: {w}", "answer": w}) + "\n" for w in ("a b", "c d")))
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(tmp_path)}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "posttrain", "grpo", *COMMON, f"data.train_files=[{prompts}]", "data.eval_fraction=0",
                             "reward.functions=[b=rank_one_reward:boom]", "rollout.num_generations=2",
                             "rollout.max_new_tokens=2", "train.batch_size=2", "eval.prompts=0",
                             f"output_dir={tmp_path / 'run'}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False, env=env)
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    assert re.search(r"error: \S+p\.jsonl:\d+: reward 'b' raised ValueError: boom on rank 1", result.stderr)
    assert not (tmp_path / "run" / "final").exists()
