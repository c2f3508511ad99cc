"""Edge cases of the AI-feedback logic, checked against independent computations: the verdict
parser on replies that name both responses (and their case), RLAIF over loopback with scripted
judges whose every verdict is known (always-"A", ties, unparsed, identical and empty responses:
which pairs are asked, in which order, which rows come out and which way round, and the
summary's figures recomputed by hand), Constitutional AI's principle sampling and RL-CAI with a
position-biased judge, and Self-Instruct's filters at their boundaries (ROUGE-L by a plain
LCS table, exactly 0.7; min/max words), dedup inside a round and the pool growing between
rounds, with the report's counts equal to the rows written."""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from posttrain.config import RLAIFConfig
from posttrain.config.synthesis import ConstitutionalConfig, SelfInstructConfig
from posttrain.feedback.client import Reply, Usage
from posttrain.feedback.constitutional import run_constitutional
from posttrain.feedback.judge import PairwiseJudge, parse_verdict
from posttrain.feedback.rlaif import run_rlaif
from posttrain.feedback.self_instruct import run_self_instruct
from tests.feedback_fixture import Scripted, judge_reply, shown_responses

ROOT = Path(__file__).resolve().parents[1]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def kappa(xs: list[str], ys: list[str]) -> float | None:
    """Cohen's kappa written out: (p_o - p_e) / (1 - p_e)."""
    n = len(xs)
    if n == 0:
        return None
    p_o = sum(x == y for x, y in zip(xs, ys)) / n
    labels = set(xs) | set(ys)
    p_e = sum((xs.count(k) / n) * (ys.count(k) / n) for k in labels)
    return None if p_e == 1 else (p_o - p_e) / (1 - p_e)


def lcs_table(a: list[str], b: list[str]) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def rouge_f(a: str, b: str) -> float:
    x, y = words(a), words(b)
    return 2 * lcs_table(x, y) / (len(x) + len(y))


# --------------------------------------------------------------------------- the verdict parser

# The module's own examples and the README's rules: the last explicit verdict counts; a line
# naming two options is not a verdict; MT-bench brackets count.
@pytest.mark.parametrize("reply, expected", [
    ("Final verdict - B.", "B"),
    ("My verdict is a tie", "tie"),
    ("verdict: [[A]]", "A"),
    ("Verdict: Response B", "B"),
    ("The final verdict: B", "B"),
    ("Verdict: draw.", "tie"),
    ("[[B]] is my final verdict", "B"),
    ("verdict: [[c]]", "tie"),
    ("Verdict: A is better than B", None),  # names both
    ("Verdict: B is worse than A", None),
    ("Verdict: A.\nVerdict: tie", "tie"),  # the last one wins
    ("Verdict: B\n\nResponse A rambles; Response A is long.", "B"),
    ("**Verdict:**\nB", None),  # not on the verdict line: never guessed
    ("Verdict: neither", None),
])
def test_verdict_parser_rules(reply, expected):
    assert parse_verdict(reply) == expected


def test_lowercase_verdict_line_naming_both_is_not_a_verdict():
    # The docstring: "names exactly one option ... markdown and case do not matter".
    assert parse_verdict("Verdict: A is worse than B") is None
    assert parse_verdict("verdict: a is worse than b") is None


def test_lowercase_replies_naming_the_loser_first_make_no_preference():
    class Backend:
        model_name, usage = "lower", Usage()

        def chat(self, messages, **_):
            a, b = shown_responses({"messages": messages})
            loser, winner = ("a", "b") if len(a) < len(b) else ("b", "a")  # prefers the longer
            return Reply(f"Some thoughts.\nverdict: {loser} is worse than {winner}", "stop", 1, 1)

    result = PairwiseJudge(Backend(), parse_retries=0).judge([{"role": "user", "content": "q"}], "short",
                                                              "a much longer answer")
    # The judge preferred the second response in both orders; it must never become "first".
    assert result.outcome in ("second", "unparsed")


def test_a_draw_is_a_tie():
    assert parse_verdict("Verdict: draw") == "tie" and parse_verdict("Verdict: a tie") == "tie"
    assert parse_verdict("Verdict: a draw") == "tie"
    assert parse_verdict("My verdict is a draw") == "tie"


# --------------------------------------------------------------------------- RLAIF over loopback

# Response i of every prompt (sampled with seed i): two identical texts and one blank one.
# Response 3 repeats response 0: its pairs with 1 and 2 repeat (0, 1) and (0, 2) and are not asked.
TEXTS = ["w1", "w22", "w333", "w1", "   "]


def _policy(body: dict) -> str:
    return TEXTS[body["seed"]]


def _mixed_judge(body: dict) -> str:
    """By content: {w1, w22} judged on merit (longer wins); {w1, w333} always "A"; {w22, w333}
    a tie on prompt q0 and no verdict at all on q1."""
    a, b = shown_responses(body)
    conversation = "\n".join(m["content"] for m in body["messages"])  # a retry repeats the conversation
    pair = {a, b}
    if pair == {"w1", "w22"}:
        return judge_reply("A" if len(a) > len(b) else "B")
    if pair == {"w1", "w333"}:
        return judge_reply("A")
    if "Conversation:\nq1" in conversation:
        return "I cannot decide."
    return judge_reply("tie")


def _rlaif(tmp_path: Path, judge, n: int, prompts: list[str], concurrency: int = 2) -> tuple[Path, Scripted, list]:
    files = tmp_path / "prompts.jsonl"
    files.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "run"
    lines: list[str] = []
    with Scripted(_policy) as policy, Scripted(judge) as judge_server:
        cfg = RLAIFConfig.from_dict({
            "output_dir": str(out), "data": {"prompt_files": [str(files)]},
            "policy": {"base_url": policy.url, "api_key_env": ""},
            "judge": {"base_url": judge_server.url, "api_key_env": "", "parse_retries": 1},
            "rlaif": {"num_responses": n, "concurrency": concurrency}})
        run_rlaif(cfg, log=lines.append)
    return out, judge_server, lines


def test_rlaif_an_always_A_judge_yields_no_preferences_and_its_bias_is_reported(tmp_path):
    out, judge, _ = _rlaif(tmp_path, lambda body: judge_reply("A"), n=3, prompts=["q0", "q1"])
    rows, stats = read_jsonl(out / "preferences.jsonl"), json.loads((out / "summary.json").read_text())
    pairs = 2 * 3  # two prompts, C(3, 2) pairs each (w1, w22, w333 all differ)
    assert rows == [] and len(judge.requests) == 2 * pairs
    assert stats["outcomes"] == {"first": 0, "second": 0, "tie": 0, "inconsistent": pairs, "unparsed": 0}
    assert stats["preferences"] == 0 and stats["same_slot_twice"] == {"A": pairs, "B": 0}
    assert stats["consistent_rate"] == 0.0 and stats["inconsistent_rate"] == 1.0
    assert stats["first_slot_win_rate"] == 1.0
    # ab always names the first response, ba always the second: p_o = 0, p_e = 0 -> kappa 0
    assert stats["order_agreement_kappa"] == kappa(["first"] * pairs, ["second"] * pairs) == 0.0


def test_rlaif_pairs_orders_rows_and_summary_against_a_scripted_judge(tmp_path):
    prompts = ["q0", "q1"]
    out, judge, lines = _rlaif(tmp_path, _mixed_judge, n=5, prompts=prompts, concurrency=1)
    raw = read_jsonl(out / "raw.jsonl")
    rows = read_jsonl(out / "preferences.jsonl")
    stats = json.loads((out / "summary.json").read_text())

    # Which pairs are asked: all i < j except identical texts, blank ones and a later copy of a
    # response (its pairs would ask the same question again); ab shows i as A, then ba.
    asked = [(i, j) for i, j in combinations(range(5), 2)
             if TEXTS[i].strip() and TEXTS[j].strip() and TEXTS[i] != TEXTS[j]
             and TEXTS.index(TEXTS[i]) == i and TEXTS.index(TEXTS[j]) == j]
    assert asked == [(0, 1), (0, 2), (1, 2)]
    shown = [shown_responses(body) for _, body, _ in judge.requests]
    expected_shown = []
    for prompt in prompts:  # concurrency 1: prompt by prompt, pair by pair, ab then ba (+ a retry if unparsed)
        for i, j in asked:
            retry = prompt == "q1" and {TEXTS[i], TEXTS[j]} == {"w22", "w333"}
            expected_shown += [(TEXTS[i], TEXTS[j])] * (1 + retry) + [(TEXTS[j], TEXTS[i])] * (1 + retry)
    assert shown == expected_shown

    # Outcomes by hand, per pair, from the judge's rules.
    def outcome(prompt: str, i: int, j: int) -> str:
        pair = {TEXTS[i], TEXTS[j]}
        if pair == {"w1", "w22"}:
            return "first" if len(TEXTS[i]) > len(TEXTS[j]) else "second"
        if pair == {"w1", "w333"}:
            return "inconsistent"
        return "unparsed" if prompt == "q1" else "tie"

    by_prompt = {record["prompt"][0]["content"]: record for record in raw}
    for prompt in prompts:
        got = {tuple(p["pair"]): p["outcome"] for p in by_prompt[prompt]["pairs"]}
        want = {(i, j): outcome(prompt, i, j) for i, j in asked}
        want.update({(0, 3): "identical", (1, 3): "repeated", (2, 3): "repeated", **{(i, 4): "empty" for i in range(4)}})
        assert got == want

    # Rows: one per consistent win, the longer text chosen, with its provenance.
    expected_rows = [(prompt, i, j) for prompt in prompts for i, j in asked
                     if outcome(prompt, i, j) in ("first", "second")]
    assert [(r["prompt"], r["provenance"]["pair"]) for r in rows] == [(p, [i, j]) for p, i, j in expected_rows]
    for row in rows:
        i, j = row["provenance"]["pair"]
        winner = i if len(TEXTS[i]) > len(TEXTS[j]) else j
        assert (row["chosen"], row["rejected"]) == ("w22", "w1") and row["provenance"]["chosen_index"] == winner
        assert row["provenance"]["outcome"] == ("first" if winner == i else "second")
        assert row["provenance"]["source"].endswith(f"prompts.jsonl:{prompts.index(row['prompt']) + 1}")
        assert row["provenance"]["ab"]["verdict"] in ("A", "B") and row["provenance"]["ab"]["replies"]

    # The summary, recomputed from the rules.
    outcomes = Counter(outcome(p, i, j) for p in prompts for i, j in asked)
    parsed = [(p, i, j) for p in prompts for i, j in asked if outcome(p, i, j) != "unparsed"]
    assert stats["outcomes"] == {k: outcomes[k] for k in ("first", "second", "tie", "inconsistent", "unparsed")}
    assert stats["preferences"] == len(rows) == 2  # one per prompt: no row written twice
    assert stats["pairs"] == 2 * 10 and stats["not_judged"] == {"identical": 2, "empty": 8, "repeated": 4}
    consistent = outcomes["first"] + outcomes["second"] + outcomes["tie"]
    assert (consistent, len(parsed)) == (3, 5) and stats["consistent_rate"] == pytest.approx(consistent / len(parsed))
    assert stats["inconsistent_rate"] == pytest.approx(outcomes["inconsistent"] / len(parsed))

    def labels(order: str) -> list[str]:
        out = []
        for p, i, j in parsed:
            o = outcome(p, i, j)
            out.append(o if o != "inconsistent" else ("first" if order == "ab" else "second"))
        return out

    assert stats["order_agreement_kappa"] == pytest.approx(kappa(labels("ab"), labels("ba")))
    # slot verdicts: a win is one "A" and one "B"; an always-"A" pair two "A"s; ties and no-verdicts none
    a_slots = outcomes["first"] + outcomes["second"] + 2 * outcomes["inconsistent"]
    b_slots = outcomes["first"] + outcomes["second"]
    assert stats["first_slot_win_rate"] == pytest.approx(a_slots / (a_slots + b_slots))
    assert stats["unparsed_replies"] == 2 and stats["judge_retries"] == 2
    # tokens as the scripted server counts them (words), retries included
    judge_prompt = sum(len(m["content"].split()) for _, body, _ in judge.requests for m in body["messages"])
    judge_completion = sum(len(_mixed_judge(body).split()) for _, body, _ in judge.requests)
    assert stats["tokens"] == {"policy_prompt": 2 * 5, "policy_completion": 2 * sum(len(t.split()) for t in TEXTS),
                               "judge_prompt": judge_prompt, "judge_completion": judge_completion}
    assert any(f"wrote {len(rows)} preference rows" in line for line in lines)


# --------------------------------------------------------------------------- Constitutional AI


class _Policy:
    """Initial answer, critique and revision, each naming what it answers."""

    model_name = "cai-policy"

    def __init__(self):
        self.usage, self.requests, self._lock = Usage(), [], threading.Lock()

    def chat(self, messages, **_):
        with self._lock:
            self.requests.append(messages)
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        prompt = messages[0]["content"]
        if not assistant:
            text = f"first answer to {prompt}"
        elif len(assistant) == 1:
            text = f"critique of [{assistant[0]}]"
        else:
            text = f"better version of [{assistant[0]}]"
        return Reply(text, "stop", 1, 1)


def _cai(tmp_path: Path, name: str, n_prompts: int, **constitutional) -> tuple[Path, _Policy]:
    judge = constitutional.pop("_judge", None)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n" for i in range(n_prompts)))
    cfg = ConstitutionalConfig.from_dict({"output_dir": str(tmp_path / name), "data": {"prompt_files": [str(prompts)]},
                                          "constitutional": constitutional})
    policy = _Policy()
    return run_constitutional(cfg, policy=policy, judge_backend=judge, stream=None), policy


def test_constitutional_principles_are_seeded_per_prompt_and_each_round_uses_its_own(tmp_path):
    constitution = yaml.safe_load((ROOT / "src/posttrain/assets/constitution.yaml").read_text())["principles"]
    critique_of = {p["name"]: " ".join(p["critique"].split()) for p in constitution}
    revision_of = {p["name"]: " ".join(p["revision"].split()) for p in constitution}
    out1, policy = _cai(tmp_path, "a", 12, rounds=3, seed=7, concurrency=1)
    out2, _ = _cai(tmp_path, "b", 12, rounds=3, seed=7, concurrency=4)
    out3, _ = _cai(tmp_path, "c", 12, rounds=3, seed=8, concurrency=2)

    def plan(out: Path) -> dict[str, list[str]]:
        return {c["id"]: [s["principle"] for s in c["rounds"]] for c in read_jsonl(out / "chains.jsonl")}

    assert plan(out1) == plan(out2)  # the same whatever order the prompts finish in
    assert plan(out1) != plan(out3)  # another seed, other principles
    assert {name for names in plan(out1).values() for name in names} <= set(critique_of)
    assert len({name for names in plan(out1).values() for name in names}) >= 5  # 36 draws from 8
    # concurrency 1: per prompt, initial, then (critique, revision) x 3, the recorded principle's texts sent
    chains = {c["id"]: c for c in read_jsonl(out1 / "chains.jsonl")}
    for n, (prompt_id, names) in enumerate(plan(out1).items()):
        requests = policy.requests[7 * n: 7 * n + 7]
        current = f"first answer to question {n}"
        for r, name in enumerate(names):
            critique, revision = requests[1 + 2 * r], requests[2 + 2 * r]
            assert critique[-2]["content"] == current and " ".join(critique[-1]["content"].split()) == critique_of[name]
            assert " ".join(revision[-1]["content"].split()).startswith(revision_of[name])
            current = f"better version of [{current}]"
        assert chains[prompt_id]["final"] == current
    pairs = read_jsonl(out1 / "preferences.jsonl")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [(chains[p["id"]]["final"], chains[p["id"]]["initial"])
                                                              for p in pairs]
    assert len(pairs) == 12 == json.loads((out1 / "summary.json").read_text())["preference_rows"]


def test_rl_cai_with_an_always_A_judge_writes_no_pairs_and_counts_them_inconsistent(tmp_path):
    class AlwaysA:
        model_name, usage = "always-a", Usage()

        def chat(self, messages, **_):
            return Reply("Verdict: A", "stop", 1, 1)

    out, _ = _cai(tmp_path, "rl", 4, rounds=1, rl_cai=True, _judge=AlwaysA())
    summary = json.loads((out / "summary.json").read_text())
    assert read_jsonl(out / "preferences.jsonl") == [] and summary["preference_rows"] == 0
    assert summary["judge"] == {"revision": 0, "original": 0, "tie": 0, "inconsistent": 4, "unparsed": 0}
    assert summary["sft_rows"] == len(read_jsonl(out / "sft.jsonl")) == 4


# --------------------------------------------------------------------------- Self-Instruct

SEEDS = [{"id": "s0", "instruction": "Summarize the plot of a famous novel in two sentences", "output": "x"},
         {"id": "s1", "instruction": "Translate the given sentence into French", "input": "Hi", "output": "Salut"}]
BASE = "list three clear benefits of regular morning exercise for adults"  # 10 words
ROUND_0 = [BASE,
           "List three clear benefits of regular morning exercise, for ADULTS!",  # the same words: duplicate
           "list three clear reasons of regular morning walks for kids",  # LCS 7 of 10 + 10: F = 0.7 exactly
           "list three clear reasons behind regular morning walks for kids",  # LCS 6: F = 0.6, kept
           "list three clear benefits of regular morning exercise for older adults"]  # 11 words: too long
ROUND_1 = ["list three clear reasons behind regular morning walks for teens",  # 0.9 against r0-3
           "Name three rivers",  # exactly min_words
           "Name rivers",  # one short
           "Explain how tides form on coastal beaches",
           "Describe a quiet harbor at dawn in detail"]


class _Generator:
    """Hands out the scripted instructions in request order (concurrency 1); every type question
    is answered no, every instance is well formed."""

    model_name = "scripted-generator"

    def __init__(self, instructions: list[str]):
        self.usage, self.instructions, self.prompts = Usage(), list(instructions), []

    def chat(self, messages, **_):
        content = messages[-1]["content"]
        if content.startswith("Come up with"):
            self.prompts.append(content)
            return Reply(self.instructions.pop(0), "stop", 1, 1)
        if content.startswith("Is the following"):
            return Reply("No.", "stop", 1, 1)
        return Reply("Input: None\nOutput: a fine answer", "stop", 1, 1)


def test_self_instruct_boundaries_batch_dedup_pool_growth_and_counts(tmp_path):
    seeds = tmp_path / "seeds.jsonl"
    seeds.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
    assert rouge_f(ROUND_0[2], BASE) == 0.7 and rouge_f(ROUND_0[3], BASE) == 0.6
    assert rouge_f(ROUND_1[0], ROUND_0[3]) == 0.9 and rouge_f(ROUND_1[0], BASE) == 0.6
    cfg = SelfInstructConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "data": {"seed_file": str(seeds)},
        "self_instruct": {"num_tasks": 100, "per_round": 5, "max_rounds": 2, "seed_examples": 2,
                          "generated_examples": 2, "concurrency": 1},
        "filters": {"min_words": 3, "max_words": 10, "rouge_threshold": 0.7}})
    generator = _Generator(ROUND_0 + ROUND_1)
    out = run_self_instruct(cfg, generator=generator, stream=None)
    tasks, rejected = read_jsonl(out / "tasks.jsonl"), read_jsonl(out / "rejected.jsonl")
    sft, summary = read_jsonl(out / "sft.jsonl"), json.loads((out / "summary.json").read_text())
    assert [t["id"] for t in tasks] == ["r0-0", "r0-3", "r1-1", "r1-3", "r1-4"]
    assert {r["id"]: r["reason"] for r in rejected} == {"r0-1": "duplicate", "r0-2": "similar", "r0-4": "too_long",
                                                          "r1-0": "similar", "r1-2": "too_short"}
    similar = {r["id"]: r for r in rejected if r["reason"] == "similar"}
    assert (similar["r0-2"]["most_similar"], similar["r0-2"]["rouge_l"]) == ("r0-0", 0.7)
    assert (similar["r1-0"]["most_similar"], similar["r1-0"]["rouge_l"]) == ("r0-3", 0.9)
    # the pool grew: round 1 shows the two tasks accepted in round 0 among its examples
    round_1 = [c for c in read_jsonl(out / "candidates.jsonl") if c["round"] == 1]
    assert all(set(c["examples"]) == {"s0", "s1", "r0-0", "r0-3"} for c in round_1)
    assert all(BASE in prompt and ROUND_0[3] in prompt for prompt in generator.prompts[5:])
    # counts equal rows
    assert summary["accepted"] == len(tasks) == len(sft) == 5 and summary["candidates"] == 10
    assert summary["rejected"] == dict(Counter(r["reason"] for r in rejected))
    assert summary["accepted"] + len(rejected) + summary["surplus"] == summary["candidates"]
    assert [(r["instruction"], r["input"], r["output"]) for r in sft] == \
        [(t["instruction"], "", "a fine answer") for t in tasks]
    assert not summary["reached_target"] and summary["rounds"] == 2
