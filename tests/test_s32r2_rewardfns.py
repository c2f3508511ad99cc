"""Reward functions (s32): a reward's print() kept off `posttrain score --output -`'s rows, a
failure named by its row's file:line in held-out scoring and evaluate, exact_match's answer read
as a prompt row's is."""

from __future__ import annotations

import json
import sys

import pytest

from posttrain.data.prompts import PromptRecord
from posttrain.errors import DataError
from posttrain.rewards import CombinedReward, RewardComponent, exact_match, function_reward, rows_named

TURNS = [{"role": "user", "content": "q"}]

MODULE = '''
import math

print("loaded")


def loud(prompt, response):
    print("judging", response)
    return float(len(response))


def nan_on_b(prompt, response):
    return math.nan if response == "b" else 1.0
'''


@pytest.fixture
def module(tmp_path, monkeypatch):
    (tmp_path / "s32r2_rewards.py").write_text(MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("s32r2_rewards", None)
    yield "s32r2_rewards"
    sys.modules.pop("s32r2_rewards", None)


def test_a_reward_that_prints_leaves_score_output_on_stdout_as_jsonl(capsys, tmp_path, module):
    from posttrain import cli

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "q", "response": r}) + "\n" for r in ["a", "bb"]))
    assert cli.main(["score", "--function", f"n={module}:loud", "--input", str(rows), "--output", "-"]) == 0
    said = capsys.readouterr()
    assert [json.loads(line)["reward"] for line in said.out.splitlines()] == [1.0, 2.0], said.out
    assert "loaded" in said.err and "judging bb" in said.err


def test_rows_named_says_a_non_finite_value_by_its_rows_file_line(module):
    combined = CombinedReward([RewardComponent("n", function_reward(f"{module}:nan_on_b"))])
    with pytest.raises(DataError) as plain:
        combined.score([TURNS, TURNS], ["a", "b"])
    assert str(plain.value).startswith("reward 'n' returned nan for response 2 (of 2); rewards must be finite")
    with pytest.raises(DataError) as named, rows_named(["p.jsonl:3", "p.jsonl:9"]):
        combined.score([TURNS, TURNS], ["a", "b"])
    assert str(named.value).startswith("p.jsonl:9: reward 'n' returned nan; rewards must be finite"), named.value


def test_evaluate_names_a_failing_rewards_prompt_row(module):
    from posttrain.eval.alignment import Side, _rewards

    records = [PromptRecord(TURNS, "a", source="p.jsonl:1"), PromptRecord(TURNS, "b", source="p.jsonl:2")]
    side = Side("policy", "tiny", None, None, "chatml")
    side.responses = ["a", "b"]
    combined = CombinedReward([RewardComponent("n", function_reward(f"{module}:nan_on_b"))])
    with pytest.raises(DataError, match=r"^p\.jsonl:2: reward 'n' returned nan"):
        _rewards([side], records, combined)


@pytest.mark.parametrize(("answer", "response", "expected"), [
    (True, "true", 1.0), (False, "False", 0.0), (42, "42", 1.0), ("  ", "", None), ([1], "1", None)])
def test_exact_match_reads_the_answer_as_a_prompt_row_does(answer, response, expected):
    if expected is None:  # blank is no answer (as RL's rows read it); a list is not one
        with pytest.raises(DataError, match="answer"):
            exact_match(TURNS, response, {"answer": answer})
    else:
        assert exact_match(TURNS, response, {"answer": answer}) == expected
