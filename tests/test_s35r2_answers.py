"""Answers (stop 35): final answers of worked solutions (GSM8K's "#### 72", MATH's \\boxed{...}) in the one
exact-match rule, the bundled math_answer reward, score --output refusing a non-JSONL name, --calibrate's
report of a std it could not divide by, and a bfloat16 reward model scoring with its float32 head."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.data.synthetic import answer_matches, final_answer
from posttrain.rewards import math_answer

GSM = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips in all.\n#### 72"
MATH = r"We have $\frac{1}{2}+\frac{1}{4}=\boxed{\frac{3}{4}}$."


def test_final_answer_reads_the_last_mark_boxes_nested_and_none_for_a_short_answer():
    assert final_answer(GSM) == "72"
    assert final_answer(MATH) == r"\frac{3}{4}"
    assert final_answer(r"\fbox{ 5 } then \boxed{\sqrt{\frac{1}{2}}}") == r"\sqrt{\frac{1}{2}}"
    assert final_answer(r"\boxed{1} so #### 2") == "2" and final_answer(r"#### \boxed{5}") == "5"  # the later mark
    assert final_answer(r"\boxed{3} then \boxed{\frac{1}{2") == "3"  # a box cut off marks nothing
    assert final_answer("72") is None and final_answer(r"\frac{3}{4}") is None and final_answer("") is None


def test_answer_matches_compares_a_marked_reference_by_its_final_answer_and_a_short_one_as_written():
    assert [answer_matches(p, GSM) for p in ["72", " 72\n", "so 72\n#### 72", "#### 73", "72 clips", GSM]] == \
        [True, True, True, False, False, True]
    assert [answer_matches(p, MATH) for p in [r"\frac{3}{4}", r"$\boxed{\frac{3}{4}}$", r"\boxed{\frac{1}{4}}",
                                              r"\dfrac{3}{4}"]] == [True, True, False, False]
    assert not answer_matches("#### 72", "72") and not answer_matches(r"\boxed{72}", "72")  # a short answer as written
    assert answer_matches("m", " m ") and not answer_matches("M", "m")


@pytest.mark.parametrize("response, answer, want", [
    ("72", "72", 1), ("72.0", "72", 1), ("72.50", "72.5", 1), ("1,000", "1000", 1), ("1000", "1,000", 1),
    ("The answer is 72.", "72", 1), ("48 - 24 = 24, so 48 + 24 = 72", "72", 1), ("so 5-3", "-3", 0),
    ("It is -12.", "-12", 1), ("<think>70?</think><answer>72 clips</answer>", "72", 1),
    ("<think>x</think><answer>\\boxed{72}</answer>", "72", 1), ("<answer>70</answer> or 72", "72", 0),
    ("Adding, \\boxed{72}.", "72", 1), ("so #### 72", GSM, 1), ("#### 73", GSM, 0), ("72", GSM, 1),
    ("\\frac{3}{4}", MATH, 1), ("$\\boxed{\\frac{3}{4}}$", MATH, 1), ("0.75", MATH, 0),
    ("\\dfrac{3}{4}", MATH, 0), ("no number here", "72", 0), ("1,00", "100", 0), ("yes", " yes ", 1),
    ("9" * 5000, "9" * 5000, 1), ("9" * 5000, "72", 0),  # past int conversion's limit: compared as text
])
def test_math_answer_takes_the_final_answer_and_compares_numbers_as_numbers(response, answer, want):
    assert math_answer([], response, {"answer": answer}) == want


def test_math_answer_reads_a_math_rows_solution_and_is_importable_by_spec():
    from posttrain.errors import DataError
    from posttrain.rewards import function_reward

    reward = function_reward("posttrain.rewards:math_answer")
    assert reward.row_keys == ("answer",)
    assert reward([[], []], [r"\boxed{\frac{3}{4}}", "3/4"], rows=[{"solution": MATH}] * 2) == [1.0, 0.0]
    with pytest.raises(DataError, match="math_answer reward needs an 'answer'"):
        math_answer([], "72", {})


def _main(capsys, *args) -> tuple[int, str]:
    from posttrain.cli import main

    capsys.readouterr()
    rc = main(["score", *map(str, args)])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("name", ["out.tsv", "out.PARQUET", "out.csv"])
def test_score_refuses_an_output_name_of_another_format_before_scoring(tmp_path, capsys, name):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    rc, err = _main(capsys, "--function", "len=tests.rewards_fixture:short", "--input", rows,
                    "--output", tmp_path / name)
    assert rc == 2 and "score writes JSON Lines: give a .jsonl name" in err, err
    assert not (tmp_path / name).exists()


@pytest.mark.parametrize("responses, said", [
    (["abc"], "calibrated len: mean -3, std undefined (one row); scale 1"),
    (["abc", "xyz"], "calibrated len: mean -3, std 0 (every value equal); scale 1"),
    (["a", "abc"], "calibrated len: mean -2, std 1.414\n"),
])
def test_calibrate_says_the_std_it_measured_and_when_the_scale_fell_back_to_1(tmp_path, capsys, responses, said):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": "p", "response": r}) + "\n" for r in responses))
    out = tmp_path / "out.jsonl"
    rc, err = _main(capsys, "--function", "len=tests.rewards_fixture:short", "--input", rows, "--output", out,
                    "--calibrate")
    assert rc == 0 and said in err, err
    assert "std 1\n" not in err and "std 1," not in err
    if len(set(responses)) == 1:  # shifted by the mean only
        assert [json.loads(line)["reward"] for line in out.read_text().splitlines()] == [0.0] * len(responses)


def test_a_bfloat16_reward_model_scores_with_its_saved_float32_head(tmp_path):
    """--dtype bfloat16: the body runs in bf16, the head in the float32 weights the checkpoint saved, so the
    reward equals the float32 head on the same bf16 body's hidden state (to 1e-6), not a bf16 rounding of it."""
    from posttrain.data.preferences import encode_response
    from posttrain.models.loading import load_tokenizer
    from posttrain.models.reward_model import load_reward_model
    from posttrain.rewards import RewardModelScorer

    tokenizer = load_tokenizer("tiny-2l")
    torch.manual_seed(0)
    model = load_reward_model("tiny-2l", pad_token_id=tokenizer.pad_token_id)
    torch.nn.init.normal_(model.score.weight)
    head = model.score.weight.detach().clone()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    scorer = RewardModelScorer(str(tmp_path), dtype="bfloat16", batch_size=1)
    body = scorer.model.base_model
    assert next(body.parameters()).dtype == torch.bfloat16
    assert scorer.model.score.weight.dtype == torch.float32 and torch.equal(scorer.model.score.weight, head)
    prompts = [[{"role": "user", "content": f"Smallest letter: {x}"}] for x in ("q m t", "k d z", "p x e")]
    responses = ["m", "z", "e e e"]
    got = scorer(prompts, responses)
    for prompt, response, reward in zip(prompts, responses, got):
        ids = encode_response(prompt, response, tokenizer, scorer.template, str(tmp_path)).input_ids
        with torch.no_grad():
            hidden = body(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        assert reward == pytest.approx(float(hidden.float() @ head[0]), abs=1e-6)
    assert len(set(got)) == 3 and any(torch.tensor(r).bfloat16().item() != r for r in got)  # not bf16-rounded
