"""A reward-function walk: what a user meets writing their own reward module for GRPO / RLOO / PPO,
`posttrain score` and `posttrain evaluate`.

Walked, as a user with a module of their own named `NAME=module:function`: the documented call
(`fn(prompt_turns, response[, row])`, a TRL-style batch function refused), return values (bool,
int, numpy and torch scalars, None, a list, a one-element array, NaN, inf, 1e39, a wrong-length
batch), a function that raises on one row or reads a row key some rows lack, one that prints,
weights and names beside `reward.format_regex` and reward models, the built-in `exact_match` on
number and boolean answers, the columns `posttrain score` writes, a module that cannot be imported,
a function name that is wrong or names no function, and the `posttrain` command run from the
directory that holds the module. The reward layer (`posttrain.rewards`) and the rollout's scoring
(`train.rollouts.sample_and_score`, with an engine that hands back fixed completions) are called
directly; `posttrain score` runs in-process; evaluate stops before its first model loads.

Right: bools, ints, numpy and 0-d torch scalars are taken as floats; None, lists, arrays, text,
NaN, inf and |r| > float32's range stop the scoring naming the component; a wrong-length batch is
named; a missing module or attribute is a one-line ConfigError naming the spec; a TRL batch function
is refused before any model loads; `posttrain score` names a raising function's row by file:line,
past the first batch too.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 32: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.config import GRPOConfig
from posttrain.data.prompts import PromptRecord
from posttrain.errors import ConfigError, DataError, UserError
from tests.cli_runner import run_cli
from tests.test_rl_edges import _FakeEngine

TURNS = [{"role": "user", "content": "q"}]

USER_MODULE = '''
import math
import numpy as np
import torch

THRESHOLD = 0.5


def as_bool(prompt, response):
    return "a" in response


def as_int(prompt, response):
    return len(response)


def as_numpy(prompt, response):
    return np.float32(0.5)


def as_tensor(prompt, response):
    return torch.tensor(0.25)


def numpy_nan(prompt, response):
    return np.float64("nan")


def numpy_inf(prompt, response):
    return np.float32("inf")


def needs_difficulty(prompt, response, row):
    return float(row["difficulty"])


def nan_on_b(prompt, response):
    return math.nan if response == "b" else 1.0


def raise_on_b(prompt, response):
    if response == "b":
        raise ValueError("cannot judge b")
    return 1.0
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    """The user's reward module, importable by name (as PYTHONPATH would make it)."""
    (tmp_path / "walk_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("walk_user_rewards", None)
    yield "walk_user_rewards"
    sys.modules.pop("walk_user_rewards", None)


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


# --------------------------------------------------------------------------- return values


def test_bool_int_numpy_and_torch_scalars_are_floats_and_numpy_nan_or_inf_are_refused(module):
    """A per-sample function may return a bool, an int, a numpy or a 0-d torch scalar (taken as a
    float); a numpy NaN or inf stops the scoring naming the component, as a Python float's does."""
    from posttrain.rewards import CombinedReward, RewardComponent, function_reward

    prompts, responses = [TURNS, TURNS], ["a", "bb"]
    expected = {"as_bool": [1.0, 0.0], "as_int": [1.0, 2.0], "as_numpy": [0.5, 0.5], "as_tensor": [0.25, 0.25]}
    for name, values in expected.items():
        combined = CombinedReward([RewardComponent(name, function_reward(f"{module}:{name}"))])
        totals, raw = combined.score(prompts, responses)
        assert raw == {name: values} and all(type(v) is float for v in raw[name]), (name, raw)
    for name, said in (("numpy_nan", "nan"), ("numpy_inf", "inf")):
        combined = CombinedReward([RewardComponent("mine", function_reward(f"{module}:{name}"))])
        with pytest.raises(DataError, match=rf"reward 'mine' returned {said} for response 1"):
            combined.score(prompts, responses)


@pytest.mark.parametrize("attr", ["THRESHOLD", "np"])
def test_a_reward_spec_naming_something_not_callable_is_refused_up_front(module, attr):
    """README: 'A function posttrain cannot call that way ... is refused before the model loads'.
    `module:THRESHOLD` (a float) or `module:np` (a module) is accepted by the check run before the
    policy loads (`inspect.signature` cannot read it, so it is let through as a builtin) and the
    run stops at its first rollout with "'float' object is not callable"."""
    from posttrain.rewards import function_reward

    try:
        reward = function_reward(f"{module}:{attr}")
    except ConfigError as exc:
        assert attr in str(exc)
        return
    with pytest.raises(UserError) as called:
        reward([TURNS], ["a"])
    pytest.fail(f"accepted up front; the first call says: {called.value}")


# --------------------------------------------------------------------------- names


@pytest.mark.parametrize("overrides", [
    ["reward.functions=[format={m}:as_bool]", "reward.format_regex=[a-z]+"],
    ["reward.functions=[judge={m}:as_bool]", "reward.models=[judge=runs/rm/final]"],
], ids=["function_named_format", "function_and_model_one_name"])
def test_reward_components_with_one_name_are_refused_before_the_policy_loads(module, overrides):
    """A function named `format` beside `reward.format_regex` (whose component is called
    `format`), or a function and a reward model both named `judge`: `check_reward_functions`
    (the check `start_rl_run` runs before the policy loads) passes them, and `build_reward`, run
    after the policy is built and the prompts encoded, refuses them ('reward components need
    distinct names')."""
    from posttrain.train.rollouts import check_reward_functions

    cfg = GRPOConfig.load(None, [o.format(m=module) for o in overrides])
    try:
        check_reward_functions(cfg)
    except ConfigError as exc:
        assert "name" in str(exc)
        return
    pytest.fail(f"check_reward_functions passed {cfg.reward.functions} with {cfg.reward.models or 'format_regex'}")


# --------------------------------------------------------------------------- errors by row


@pytest.mark.parametrize("fn", ["raise_on_b", "nan_on_b"])
def test_a_reward_failing_inside_a_rollout_names_the_prompt_row_by_file_line(tokenizer, module, fn):
    """`posttrain score` names the row a function raised on by file:line; a GRPO/PPO rollout
    says 'reward 'mine' raised ValueError: cannot judge b (on response 3 of 4)' (or 'returned nan
    for response 3 (of 4)'): the 3rd completion of a rollout whose prompts were drawn at random,
    which the user cannot map back to a row. The prompt record (train.jsonl:7 here) is at hand."""
    from posttrain.train.rollouts import build_reward, sample_and_score

    eos = tokenizer.eos_token_id
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"] + [eos]  # noqa: E731
    records = [PromptRecord(TURNS, "a", source="train.jsonl:3"), PromptRecord(TURNS, "b", source="train.jsonl:7")]
    cfg = GRPOConfig.load(None, [f"reward.functions=[mine={module}:{fn}]", "rollout.num_generations=2",
                                 "rollout.max_new_tokens=4"])
    engine = _FakeEngine([enc("a"), enc("a"), enc("b"), enc("a")])
    with pytest.raises(DataError) as exc:
        sample_and_score(engine, tokenizer, [[1, 5], [1, 6]], records, [0, 1], cfg, build_reward(cfg), 0)
    assert "train.jsonl:7" in str(exc.value), str(exc.value)


def test_score_names_the_row_of_a_non_finite_reward_by_file_line(capsys, tmp_path, module):
    """Row 4 of 4, scored with --batch-size 2, gets NaN: the error reads 'returned nan for
    response 2 (of 2)' (its place in the second batch); a function that raises on the same row is
    named `rows.jsonl:4`."""
    rows = _write(tmp_path / "rows.jsonl", "".join(json.dumps({"prompt": "q", "response": r}) + "\n"
                                                   for r in ["a", "a", "a", "b"]))
    rc, out = run_cli(capsys, "score", "--function", f"n={module}:nan_on_b", "--batch-size", "2",
                      "--input", rows, "--output", tmp_path / "out.jsonl")
    assert rc == 2 and "nan" in out, out
    assert f"{rows}:4" in out, out


def test_score_names_a_raising_functions_row_by_file_line_past_the_first_batch(capsys, tmp_path, module):
    rows = _write(tmp_path / "rows.jsonl", "".join(json.dumps({"prompt": "q", "response": r}) + "\n"
                                                   for r in ["a", "a", "a", "b", "a"]))
    rc, out = run_cli(capsys, "score", "--function", f"judge={module}:raise_on_b", "--batch-size", "2",
                      "--input", rows, "--output", tmp_path / "out.jsonl")
    assert rc == 2 and f"{rows}:4: reward 'judge' raised ValueError: cannot judge b" in out, out
    assert not (tmp_path / "out.jsonl").exists()


def test_evaluate_names_a_prompt_row_without_an_answer_by_file_line_before_any_model_loads(tmp_path, monkeypatch):
    """grpo/rloo/ppo name the first prompt row without the 'answer' exact_match reads by file:line
    before the policy loads (`check_prompt_rows`). evaluate, given the same prompts and reward, loads
    the policy (and the reference), answers every prompt, and only then stops with "reward 'em': the
    exact_match reward needs an 'answer' in every prompt row (on response 2 of 2)"."""
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval import alignment

    prompts = _write(tmp_path / "p.jsonl", json.dumps({"prompt": "Copy: a", "answer": "a"}) + "\n"
                     + json.dumps({"prompt": "Copy: b"}) + "\n")

    def no_model(*args, **kwargs):
        raise AssertionError("a model loaded before the prompt rows were checked")

    monkeypatch.setattr(alignment, "_load_side", no_model)
    cfg = EvaluateConfig.load(None, [f"output_dir={tmp_path / 'ev'}", "policy=tiny", f"prompts.files=[{prompts}]",
                                     "reward.functions=[em=posttrain.rewards:exact_match]",
                                     "generation.max_new_tokens=2", "generation.samples=0"])
    with pytest.raises(DataError, match=rf"^{prompts}:2: .*'answer'"):
        alignment.run_evaluate(cfg, log=lambda _: None)


# --------------------------------------------------------------------------- built-ins


def test_score_exact_match_compares_a_boolean_or_decimal_answer_as_the_file_writes_it(capsys, tmp_path):
    """README: exact_match 'A number or boolean answer is compared as the file writes it (42,
    true)'; GRPO's prompt rows do so (`data.prompts.reference_answer`). `posttrain score` hands exact_match the
    row as json parsed it: `true` is compared as 'True', `2.50` as '2.5', `1e3` as '1000.0'; only
    the integer matches."""
    rows = _write(tmp_path / "rows.jsonl",
                  '{"prompt": "Is it?", "response": "true", "answer": true}\n'
                  '{"prompt": "How many?", "response": "42", "answer": 42}\n'
                  '{"prompt": "Price?", "response": "2.50", "answer": 2.50}\n'
                  '{"prompt": "Big?", "response": "1e3", "answer": 1e3}\n')
    out = tmp_path / "out.jsonl"
    rc, said = run_cli(capsys, "score", "--function", "em=posttrain.rewards:exact_match", "--input", rows,
                       "--output", out)
    assert rc == 0, said
    scores = [json.loads(line)["reward"] for line in out.read_text().splitlines()]
    assert scores == [1.0, 1.0, 1.0, 1.0], scores


# --------------------------------------------------------------------------- the command


def test_the_posttrain_command_imports_a_reward_module_from_the_working_directory(tmp_path):
    """A user writes my_rewards.py beside their data and runs `posttrain score --function
    r=my_rewards:fn` there: 'cannot be imported: No module named ...', with no hint of where it
    looked. `python -m posttrain score` with the same arguments in the same directory scores the
    file (it puts the working directory on sys.path; the console script puts its bin directory)."""
    (tmp_path / "walk_cwd_rewards.py").write_text("def short(prompt, response):\n    return float(len(response) < 3)\n")
    _write(tmp_path / "rows.jsonl", json.dumps({"prompt": "q", "response": "ab"}) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    args = ["score", "--function", "s=walk_cwd_rewards:short", "--input", "rows.jsonl", "--output", "-"]
    module_run = subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=60)
    assert module_run.returncode == 0 and json.loads(module_run.stdout)["reward"] == 1.0, module_run.stderr
    command = Path(sys.executable).with_name("posttrain")
    run = subprocess.run([str(command), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr.strip().splitlines()[-1]
    assert math.isclose(json.loads(run.stdout)["reward"], 1.0)
