"""The pairwise judge: strict verdict parsing, both orders combined, Cohen's kappa by hand, the
prompt, parse retries, and — against scripted endpoints whose preferences are known, one of
them position-biased — that asking in both orders recovers the true preference."""

from __future__ import annotations

import itertools
import random

import pytest

from posttrain.feedback.client import OpenAICompatible, Reply, Usage
from posttrain.feedback.judge import (DEFAULT_RUBRIC, PairwiseJudge, cohen_kappa, combine_orders, judge_messages,
                                      parse_verdict, render_conversation, to_original)
from tests.feedback_fixture import Scripted, is_biased, longer_is_better, preference_judge

VERDICTS = [
    ("Verdict: A", "A"),
    ("verdict: b", "B"),
    ("Verdict: tie", "tie"),
    ("My verdict is a tie.", "tie"),
    ("**Verdict:** **B**", "B"),
    ("### Final verdict: A", "A"),
    ("- **Final Verdict**: tie", "tie"),
    ("Verdict: Response B", "B"),
    ("Verdict: Assistant A", "A"),
    ("verdict:A", "A"),
    ("Verdict: A (Response A answers the question)", "A"),
    ("Verdict - B.", "B"),
    ("[[A]]", "A"),
    ("Final verdict: [[B]]", "B"),
    ("[[C]]", "tie"),
    # A mentioned early, the verdict at the end: the verdict counts, not the first letter.
    ("A is shorter, but Response A misses the point. B answers it.\n\nVerdict: B", "B"),
    ("Response A is better in every way.", None),
    ("A", None),
    ("I prefer the first one.", None),
    ("", None),
    # Echoed instructions are not verdicts; the last explicit verdict counts.
    ("I must end with Verdict: A, Verdict: B or Verdict: tie.\nVerdict: B", "B"),
    ("Output [[A]] if A is better, [[B]] if B is.\nSo: [[A]]", "A"),
    ("Verdict: A\nOn reflection, that was wrong.\nVerdict: B", "B"),
    ("Verdict: A or B", None),
    ("verdict: a, not b", None),
    ("Verdict: Answer pending", None),
    ("The verdict should not be A", None),
    ("Verdict: A\n\nVerdict: maybe", "A"),
]


@pytest.mark.parametrize("text, expected", VERDICTS)
def test_parse_verdict(text, expected):
    assert parse_verdict(text) == expected


@pytest.mark.parametrize("ab, ba", list(itertools.product(["A", "B", "tie", None], repeat=2)))
def test_combine_orders_table(ab, ba):
    # ab shows the first response as A; ba shows the second as A.
    expected = {("A", "B"): "first", ("B", "A"): "second", ("tie", "tie"): "tie"}.get((ab, ba), "inconsistent")
    if ab is None or ba is None:
        expected = "unparsed"
    assert combine_orders(ab, ba) == expected


def test_to_original():
    assert [to_original(v, "ab") for v in ("A", "B", "tie", None)] == ["first", "second", "tie", None]
    assert [to_original(v, "ba") for v in ("A", "B", "tie", None)] == ["second", "first", "tie", None]


def test_cohen_kappa_by_hand():
    # 10 items; x: 6 first, 4 second; y: 5 first, 5 second; they agree on 5 firsts and 4 seconds
    xs = ["first"] * 6 + ["second"] * 4
    ys = ["first"] * 5 + ["second"] * 5
    # p_o = 9/10; p_e = 0.6·0.5 + 0.4·0.5 = 0.5; κ = (0.9 - 0.5) / 0.5 = 0.8
    assert cohen_kappa(xs, ys) == pytest.approx(0.8)
    assert cohen_kappa(["tie", "first"], ["first", "tie"]) == pytest.approx(-1.0)  # p_o 0, p_e 0.5
    assert cohen_kappa([], []) is None and cohen_kappa(["first"] * 3, ["first"] * 3) is None
    with pytest.raises(ValueError):
        cohen_kappa(["first"], [])


def test_judge_messages_carry_rubric_conversation_and_both_responses_in_order():
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    system, user = judge_messages(turns, "red", "the sky", rubric="Prefer colours.")
    assert system["role"] == "system" and user["role"] == "user"
    text = user["content"]
    assert "Prefer colours." in text and "System: Be brief.\n\nUser: Name a colour." in text
    assert text.index("[Response A]\nred\n[End of response A]") < text.index("[Response B]\nthe sky\n")
    assert text.rstrip().endswith("(tie only if neither response is better than the other).")
    assert render_conversation([{"role": "user", "content": "hi"}]) == "hi"
    assert DEFAULT_RUBRIC in judge_messages(turns, "a", "b")[1]["content"]


class FakeBackend:
    """In-process backend answering from a list of texts; records the messages it was sent."""

    model_name = "fake-judge"

    def __init__(self, texts):
        self.texts, self.calls, self.usage = list(texts), [], Usage()

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None):
        self.calls.append((messages, max_tokens, temperature, seed))
        return Reply(self.texts.pop(0), "stop", 10, 3)


def test_parse_retry_asks_for_the_verdict_line_in_the_same_conversation():
    backend = FakeBackend(["Both are fine I think.", "Verdict: B", "Verdict: A"])
    judge = PairwiseJudge(backend, parse_retries=1, max_tokens=64, temperature=0.0)
    result = judge.judge([{"role": "user", "content": "q"}], "first answer", "second answer")
    assert result.ab.verdict == "B" and result.ab.replies == ["Both are fine I think.", "Verdict: B"]
    assert result.ba.verdict == "A" and result.outcome == "second" and result.preferred == 1
    retry_messages = backend.calls[1][0]
    assert retry_messages[-2] == {"role": "assistant", "content": "Both are fine I think."}
    assert "Verdict: A, Verdict: B or Verdict: tie" in retry_messages[-1]["content"]
    assert backend.calls[0][1:] == (64, 0.0, None)
    assert result.ab.prompt_tokens == 20 and result.ab.completion_tokens == 6
    assert result.to_dict()["judge"] == "fake-judge"


def test_no_retries_leaves_the_pair_unparsed():
    backend = FakeBackend(["no idea", "Verdict: A"])
    result = PairwiseJudge(backend, parse_retries=0).judge([{"role": "user", "content": "q"}], "x", "y")
    assert result.outcome == "unparsed" and result.ab.verdict is None and result.preferred is None


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    pairs = []
    while len(pairs) < n:
        a, b = (" ".join(rng.choices(words, k=rng.randint(1, 6))) for _ in range(2))
        if len(a) != len(b):
            pairs.append((a, b))
    return pairs


PROMPT = [{"role": "user", "content": "Say something about Greek letters."}]


def test_an_unbiased_scripted_judge_is_recovered_exactly():
    pairs = random_pairs(20)
    with Scripted(preference_judge(bias=0.0)) as endpoint:
        judge = PairwiseJudge(OpenAICompatible(endpoint.url, "scripted"), parse_retries=0)
        results = [judge.judge(PROMPT, a, b) for a, b in pairs]
        assert len(endpoint.requests) == 40 and endpoint.requests[0][1]["temperature"] == 1.0  # backend default
    truth = ["first" if longer_is_better(a, b) == "A" else "second" for a, b in pairs]
    assert [r.outcome for r in results] == truth


def test_position_bias_is_caught_and_debiasing_recovers_the_true_preference():
    """A judge that, on 40% of pairs, answers "A" whatever it is shown: read in one order it
    is wrong on every biased pair whose better response was second; read in both orders every
    biased pair is flagged inconsistent and every pair kept has the true winner."""
    bias = 0.4
    pairs = random_pairs(60, seed=1)
    with Scripted(preference_judge(bias=bias)) as endpoint:
        judge = PairwiseJudge(OpenAICompatible(endpoint.url, "biased"), parse_retries=0)
        results = [judge.judge(PROMPT, a, b) for a, b in pairs]
    truth = ["first" if longer_is_better(a, b) == "A" else "second" for a, b in pairs]
    biased = [is_biased(a, b, bias) for a, b in pairs]
    assert 15 <= sum(biased) <= 33  # the scripted fraction, roughly; the exact set is known below
    single_order = [to_original(r.ab.verdict, "ab") for r in results]
    assert sum(s != t for s, t in zip(single_order, truth)) > 0  # one order alone is fooled
    for result, true, was_biased in zip(results, truth, biased):
        assert result.outcome == ("inconsistent" if was_biased else true)
        if was_biased:
            assert result.ab.verdict == result.ba.verdict == "A"
    inconsistency_rate = sum(r.outcome == "inconsistent" for r in results) / len(results)
    assert inconsistency_rate == sum(biased) / len(pairs)
