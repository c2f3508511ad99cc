"""Adversarial review of AI feedback (feedback/) and serving (serve/).

Every test checks the product against an expectation written out here by hand. The defects
this review found are fixed; its tests stay as regression coverage.
Small and fast: scripted endpoints (tests/feedback_fixture.py), fake backends, and one
tiny-preset server shared by the serving tests.
"""

from __future__ import annotations

import http.client
import io
import json
import threading
from pathlib import Path

import pytest

from posttrain.errors import ConfigError, UserError
from posttrain.feedback.client import BackendError, OpenAICompatible, Reply, Usage
from posttrain.feedback.jobs import JsonlLog, run_items
from posttrain.feedback.judge import PairwiseJudge, cohen_kappa, parse_verdict
from posttrain.feedback.rouge import RougePool, lcs_length, rouge_l, tokenize
from posttrain.serve.protocol import APIError, Limits, parse_request
from tests.feedback_fixture import Scripted, judge_reply, longer_is_better, preference_judge, shown_responses

# --------------------------------------------------------------------------- small fakes


class ScriptedBackend:
    """A ChatBackend whose reply is `reply(messages)`; counts requests."""

    def __init__(self, reply, name="fake", prompt_tokens=7, completion_tokens=3):
        self.reply, self.model_name = reply, name
        self.usage = Usage()
        self.calls: list[list[dict]] = []
        self.pt, self.ct = prompt_tokens, completion_tokens
        self._lock = threading.Lock()

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None) -> Reply:
        with self._lock:
            self.calls.append(messages)
        text = self.reply(messages)
        self.usage.add(requests=1)
        return Reply(text, "stop", self.pt, self.ct)


TURNS = [{"role": "user", "content": "Name a prime number."}]


# =========================================================================== judge


def test_judge_that_always_answers_A_gives_inconsistent_never_a_preference():
    backend = ScriptedBackend(lambda m: "Both fine.\nVerdict: A")
    judgement = PairwiseJudge(backend).judge(TURNS, "2", "seven is prime")
    # ab: A names the first; ba: A names the second -> they disagree about the response
    assert judgement.outcome == "inconsistent"
    assert judgement.preferred is None
    assert (judgement.ab.verdict, judgement.ba.verdict) == ("A", "A")
    assert len(backend.calls) == 2  # one per order, no parse retries needed


def test_judge_tie_one_way_and_win_the_other_is_inconsistent():
    # "tie" when the first response is shown first, "B" (the first response) when swapped
    replies = iter(["Verdict: tie", "Verdict: B"])
    judgement = PairwiseJudge(ScriptedBackend(lambda m: next(replies))).judge(TURNS, "x", "y")
    assert judgement.outcome == "inconsistent"


def test_judge_consistent_swap_names_the_same_response():
    # ab says B (= second), ba says A (= second, now shown first) -> "second"
    replies = iter(["Verdict: B", "Final verdict: A"])
    judgement = PairwiseJudge(ScriptedBackend(lambda m: next(replies))).judge(TURNS, "x", "y")
    assert judgement.outcome == "second" and judgement.preferred == 1


def test_judge_unparseable_and_empty_replies_are_retried_then_unparsed_with_tokens_summed():
    backend = ScriptedBackend(lambda m: "" if len(m) == 2 else "Both are nice, hard to say.",
                              prompt_tokens=11, completion_tokens=5)
    judgement = PairwiseJudge(backend, parse_retries=2).judge(TURNS, "a", "b")
    assert judgement.outcome == "unparsed"
    assert len(backend.calls) == 6  # 3 attempts per order
    assert judgement.ab.replies == ["", "Both are nice, hard to say.", "Both are nice, hard to say."]
    assert (judgement.ab.prompt_tokens, judgement.ab.completion_tokens) == (33, 15)
    # the retry keeps the conversation: system, user, then (assistant, user) per failed attempt
    assert [m["role"] for m in backend.calls[2]] == ["system", "user", "assistant", "user", "assistant", "user"]


def test_judge_sees_unicode_responses_verbatim_and_parses_a_unicode_reply():
    first, second = "Zwei ist prim – 2 ✓", "七 (seven) 🙂"
    seen = []

    def reply(messages):
        seen.append(messages[-1]["content"])
        return "La réponse B est meilleure.\n**Verdict :** B" if len(seen) == 1 else "Verdict: A"

    judgement = PairwiseJudge(ScriptedBackend(reply)).judge(TURNS, first, second)
    assert f"[Response A]\n{first}\n[End of response A]" in seen[0]
    assert f"[Response A]\n{second}\n[End of response A]" in seen[1]
    assert judgement.outcome == "second"


@pytest.mark.parametrize("text, expected", [
    ("Verdict: B\n\nOn reflection:\nVerdict: tie", "tie"),  # the last statement wins
    ("Verdict: B\n\nOn reflection, verdict: tie", "B"),  # documented: only lines that start with "verdict"
    ("Response A is better than B in every way.", None),  # no verdict statement
    ("### Final Verdict: [[B]]", "B"),
    ("[[C]]", "tie"),
    ("Verdict: A or B, hard to say", None),  # names two options
    ("verdict – a", "A"),
    ("", None),
])
def test_parse_verdict_more_cases(text, expected):
    assert parse_verdict(text) == expected


def test_cohen_kappa_by_hand_for_a_judge_that_always_picks_slot_A():
    # ab verdict A -> "first"; ba verdict A -> "second": p_o = 0, p_e = 1*0 + 0*1 = 0 -> kappa 0
    assert cohen_kappa(["first"] * 4, ["second"] * 4) == 0.0
    # 3 items: x = f f s, y = f s s -> p_o = 2/3; p_e = (2/3)(1/3) + (1/3)(2/3) = 4/9 -> (2/3-4/9)/(5/9) = 2/5
    assert cohen_kappa(["f", "f", "s"], ["f", "s", "s"]) == pytest.approx(0.4)


# =========================================================================== ROUGE-L


def _hand_lcs(a, b):
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_rouge_l_against_hand_lcs():
    # the cat sat on the mat / the cat on a mat: LCS = the cat on mat = 4 -> F = 2*4/(6+5)
    assert lcs_length(tokenize("The cat sat on the mat."), tokenize("the cat, on a mat")) == 4
    assert rouge_l("The cat sat on the mat.", "the cat, on a mat") == pytest.approx(8 / 11)
    # repeated words: a a a b / a b a -> LCS 2 -> F = 4/7
    assert rouge_l("a a a b", "a b a") == pytest.approx(4 / 7)
    # no shared word (accents are letters, so café != cafe)
    assert rouge_l("Café naïve", "cafe naive") == 0.0
    assert rouge_l("", "anything") == 0.0
    words = "one two three four five six seven eight nine ten".split()
    a = [words[(i * 7) % 10] for i in range(70)]
    b = [words[(i * 3) % 10] for i in range(65)]  # > 64 tokens: the bit-parallel path spans words
    assert lcs_length(a, b) == _hand_lcs(a, b)


def test_rouge_pool_most_similar_equals_brute_force():
    texts = ["write a poem about the sea", "summarise the article in two lines", "translate the poem to French",
             "write a story about the sea and the sky", "list three prime numbers"]
    pool = RougePool(texts)
    query = "Write a short poem about the sea."
    scores = [rouge_l(query, t) for t in texts]
    best = max(scores)
    score, index = pool.most_similar(query)
    assert score == pytest.approx(best) and index == scores.index(best)
    assert pool.most_similar("zebra") == (0.0, -1)


# =========================================================================== jobs


def _group_work(item_id, n):
    return [{"value": f"{item_id}:{j}:{n * j}"} for j in range(3)]


def test_interrupted_group_run_with_a_torn_group_resumes_to_the_uninterrupted_records(tmp_path):
    items = [(f"i{n}", n) for n in range(6)]
    with JsonlLog(tmp_path / "whole.jsonl") as log:
        run_items(items, _group_work, log, concurrency=2, stream=None)
        whole = sorted(log.records, key=lambda r: r["id"])

    path = tmp_path / "cut.jsonl"

    def interrupted(item_id, n):
        if n == 3:
            raise KeyboardInterrupt
        return _group_work(item_id, n)

    with JsonlLog(path) as log:
        with pytest.raises(KeyboardInterrupt):
            run_items(items, interrupted, log, concurrency=1, stream=None)
    # a kill in the middle of item i3's group: two whole lines, a torn third one
    group = [{"id": f"i3/{j}", **_group_work("i3", 3)[j], "item": "i3", "parts": 3} for j in range(3)]
    with path.open("a") as f:
        f.write(json.dumps(group[0]) + "\n" + json.dumps(group[1]) + "\n" + json.dumps(group[2])[:10])
    warnings = io.StringIO()
    with JsonlLog(path, warn=warnings) as log:
        assert log.items == {"i0", "i1", "i2"}  # i3's partial group is not counted as done
        summary = run_items(items, _group_work, log, concurrency=2, stream=None)
        resumed = sorted(log.records, key=lambda r: r["id"])
    assert "unfinished" in warnings.getvalue()
    assert (summary.skipped, summary.written) == (3, 3)
    assert resumed == whole
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)) == 18


def test_a_result_that_cannot_be_encoded_is_a_failed_item_not_a_crash(tmp_path):
    text = json.loads('"truncated emoji \\ud83d"')  # valid JSON, as a server may send it
    with JsonlLog(tmp_path / "log.jsonl") as log:
        summary = run_items([("bad", text), ("good", "fine")], lambda i, x: {"text": x}, log, concurrency=1,
                            stream=None)
        assert "good" in log.done
    assert summary.written + summary.failed == 2


# =========================================================================== client


def _ok(text="hi", **extra):
    return (200, {}, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                      **extra})


def test_client_retries_408_and_5xx_then_counts_one_request():
    answers = iter([(408, {}, {"error": {"message": "slow"}}), (502, {}, b"bad gateway"), _ok("done")])
    sleeps = []
    with Scripted(lambda body: next(answers)) as endpoint:
        client = OpenAICompatible(endpoint.url, "m", max_retries=3, backoff_s=0.5, sleep=sleeps.append)
        reply = client.chat([{"role": "user", "content": "abcdefgh"}])
    assert reply.text == "done"
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] <= 0.75 and 0.5 <= sleeps[1] <= 1.5  # base * 2^k * U(.5, 1.5)
    snap = client.usage.snapshot()
    assert (snap["requests"], snap["retries"], snap["failures"]) == (1, 2, 0)
    # no usage in the answer: estimated at ~4 characters a token ("abcdefgh" -> 2, "done" -> 1)
    assert (reply.prompt_tokens, reply.completion_tokens, snap["estimated"]) == (2, 1, 1)


def test_client_caps_a_huge_retry_after_and_gives_up_with_the_last_error():
    sleeps = []
    with Scripted(lambda body: (429, {"Retry-After": "5000"}, {"error": {"message": "slow  down\nplease"}})) as ep:
        client = OpenAICompatible(ep.url, "m", max_retries=2, sleep=sleeps.append)
        with pytest.raises(BackendError, match="gave up after 2 retries; last error: HTTP 429: slow down please"):
            client.chat([{"role": "user", "content": "x"}])
    assert sleeps == [600.0, 600.0]
    assert client.usage.snapshot()["failures"] == 1


def test_client_404_fails_at_once_with_status_and_message():
    with Scripted(lambda body: (404, {}, {"error": {"message": "model 'nope' not found"}})) as ep:
        client = OpenAICompatible(ep.url, "nope", max_retries=5, sleep=lambda s: None)
        with pytest.raises(BackendError, match="HTTP 404: model 'nope' not found") as info:
            client.chat([{"role": "user", "content": "x"}])
    assert info.value.status == 404 and len(ep.requests) == 1


def test_client_reply_text_is_always_a_string():
    parts = [{"type": "text", "text": "Verdict: A"}]
    with Scripted(lambda body: _ok(parts)) as ep:
        client = OpenAICompatible(ep.url, "m", max_retries=0)
        try:
            reply = client.chat([{"role": "user", "content": "x"}])
        except BackendError:
            return
    assert isinstance(reply.text, str)


def test_client_malformed_usage_is_estimated_not_a_crash():
    with Scripted(lambda body: _ok("four", usage="n/a")) as ep:
        client = OpenAICompatible(ep.url, "m", max_retries=0)
        reply = client.chat([{"role": "user", "content": "12345678"}])
    assert (reply.text, reply.prompt_tokens, reply.completion_tokens) == ("four", 2, 1)


# =========================================================================== RLAIF


def _prompts_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def _rlaif_config(out, prompts, policy_url, judge_url):
    from posttrain.config import RLAIFConfig

    return RLAIFConfig.from_dict({
        "output_dir": str(out),
        "policy": {"base_url": policy_url, "model": "pol", "api_key_env": "", "max_retries": 0},
        "judge": {"base_url": judge_url, "model": "jud", "api_key_env": "", "max_retries": 0},
        "data": {"prompt_files": [str(prompts)]},
        "rlaif": {"num_responses": 3, "concurrency": 1}})


def _policy_by_seed(body):
    return "r" * (body["seed"] + 1)  # response i is "r" * (i + 1): all different lengths


def test_rlaif_with_a_judge_that_always_answers_A_writes_no_preferences(tmp_path):
    from posttrain.feedback.rlaif import run_rlaif

    prompts = _prompts_file(tmp_path / "p.jsonl", ["first prompt", "second prompt"])
    with Scripted(_policy_by_seed) as policy, Scripted(lambda body: "Verdict: A") as judge:
        run_rlaif(_rlaif_config(tmp_path / "out", prompts, policy.url, judge.url), log=lambda line: None)
    out = tmp_path / "out"
    assert (out / "preferences.jsonl").read_text() == ""
    stats = json.loads((out / "summary.json").read_text())
    # 2 prompts x 3 pairs, each judged in both orders, all "A"
    assert stats["judged"] == 6 and stats["outcomes"]["inconsistent"] == 6 and stats["preferences"] == 0
    assert stats["same_slot_twice"] == {"A": 6, "B": 0}
    assert stats["first_slot_win_rate"] == 1.0
    assert stats["order_agreement_kappa"] == 0.0
    assert stats["consistent_rate"] == 0.0 and stats["inconsistent_rate"] == 1.0
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text().splitlines()]
    assert [[p["pair"] for p in r["pairs"]] for r in raw] == [[[0, 1], [0, 2], [1, 2]]] * 2


def test_rlaif_longer_is_better_judge_gives_every_pair_with_the_longer_chosen(tmp_path):
    from posttrain.feedback.rlaif import run_rlaif

    prompts = _prompts_file(tmp_path / "p.jsonl", ["only prompt"])
    with Scripted(_policy_by_seed) as policy, Scripted(preference_judge()) as judge:
        run_rlaif(_rlaif_config(tmp_path / "out", prompts, policy.url, judge.url), log=lambda line: None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("rr", "r"), ("rrr", "r"), ("rrr", "rr")]
    assert all(r["prompt"] == "only prompt" for r in rows)


def test_rlaif_judge_without_verdicts_is_retried_then_unparsed_and_counted(tmp_path):
    from posttrain.feedback.rlaif import run_rlaif

    prompts = _prompts_file(tmp_path / "p.jsonl", ["only prompt"])
    with Scripted(_policy_by_seed) as policy, Scripted(lambda body: "Hard to say, both have merit.") as judge:
        run_rlaif(_rlaif_config(tmp_path / "out", prompts, policy.url, judge.url), log=lambda line: None)
        requests = len(judge.requests)
    stats = json.loads((tmp_path / "out" / "summary.json").read_text())
    # 3 pairs x 2 orders x (1 + parse_retries=1) attempts
    assert requests == 12
    assert stats["outcomes"]["unparsed"] == 3 and stats["preferences"] == 0
    assert stats["unparsed_replies"] == 6 and stats["judge_retries"] == 6
    assert stats["consistent_rate"] is None and stats["order_agreement_kappa"] is None
    assert stats["first_slot_win_rate"] is None
    assert (tmp_path / "out" / "preferences.jsonl").read_text() == ""


def test_rlaif_survives_a_reply_with_a_lone_surrogate(tmp_path):
    from posttrain.feedback.rlaif import run_rlaif

    def policy_reply(body):
        text = "r" * (body["seed"] + 1)
        return text + "\ud83d" if "broken" in body["messages"][-1]["content"] else text

    def judge_reply_by_length(body):  # no hashing: the fixture's biased judge cannot encode a surrogate
        return judge_reply(longer_is_better(*shown_responses(body)))

    prompts = _prompts_file(tmp_path / "p.jsonl", ["broken prompt", "good prompt"])
    with Scripted(policy_reply) as policy, Scripted(judge_reply_by_length) as judge:
        run_rlaif(_rlaif_config(tmp_path / "out", prompts, policy.url, judge.url), log=lambda line: None)
    rows = [json.loads(line) for line in (tmp_path / "out" / "preferences.jsonl").read_text().splitlines()]
    assert {"good prompt"} <= {r["prompt"] for r in rows}


# =========================================================================== Constitutional AI


def _cai_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def _cai_config(out, prompts, **policy):
    from posttrain.config.synthesis import ConstitutionalConfig

    return ConstitutionalConfig.from_dict({
        "output_dir": str(out), "data": {"prompt_files": [str(prompts)]},
        "policy": {"api_key_env": "", "max_retries": 0, **policy},
        "constitutional": {"rounds": 1, "concurrency": 1}})


class _Failing:
    def __init__(self, name):
        self.model_name, self.usage = name, Usage()

    def chat(self, messages, **kwargs):
        raise BackendError("HTTP 404: the model does not exist", 404)


def test_constitutional_rerun_after_a_run_that_logged_nothing_accepts_a_corrected_model(tmp_path):
    from posttrain.feedback.constitutional import run_constitutional

    prompts = _cai_prompts(tmp_path / "p.jsonl", ["Say hi."])
    cfg = _cai_config(tmp_path / "out", prompts)
    with pytest.raises(UserError, match="every item failed"):
        run_constitutional(cfg, policy=_Failing("wrong-name"), stream=None)
    assert (tmp_path / "out" / "chains.jsonl").read_text() == ""  # nothing was recorded
    fixed = ScriptedBackend(lambda m: "Hello there.", name="right-name")
    run_constitutional(cfg, policy=fixed, stream=None)
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert [row["messages"][-1]["content"] for row in sft] == ["Hello there."]


def test_constitutional_resume_refuses_a_changed_policy_temperature(tmp_path):
    from posttrain.feedback.constitutional import run_constitutional

    prompts = _cai_prompts(tmp_path / "p.jsonl", ["One?", "Two?"])
    with Scripted(lambda body: f"answer at temperature {body['temperature']}") as endpoint:
        first = _cai_config(tmp_path / "out", prompts, base_url=endpoint.url, temperature=0.0)
        first.data.limit = 1
        run_constitutional(first, stream=None)
        second = _cai_config(tmp_path / "out", prompts, base_url=endpoint.url, temperature=1.0)
        try:
            run_constitutional(second, stream=None)
        except ConfigError:
            return  # refused: what README promises
    # not refused: then the outputs must at least not mix answers made under both settings
    sft = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert len({row["messages"][-1]["content"] for row in sft}) == 1, sft


# =========================================================================== Self-Instruct


def test_clean_instruction_documented_cases():
    from posttrain.feedback.self_instruct import clean_instruction

    assert clean_instruction("\n  9. Write a haiku about rain.\nmore") == "Write a haiku about rain."
    assert clean_instruction("Task 9: Sort the   list.") == "Sort the list."
    assert clean_instruction('"Name three rivers."') == "Name three rivers."


def test_clean_instruction_keeps_a_leading_decimal_number():
    from posttrain.feedback.self_instruct import clean_instruction

    assert clean_instruction("1.5 litres is how many millilitres?") == "1.5 litres is how many millilitres?"


def test_clean_instruction_keeps_inner_quotes_intact():
    from posttrain.feedback.self_instruct import clean_instruction

    text = '"Hello" is a greeting; translate it and "Goodbye"'
    assert clean_instruction(text) == text


def test_clean_instruction_markdown_bold_label():
    from posttrain.feedback.self_instruct import clean_instruction

    assert clean_instruction("**Task:** Sort the list of numbers.") == "Sort the list of numbers."


def test_clean_instruction_numbering_and_label_together():
    from posttrain.feedback.self_instruct import clean_instruction

    assert clean_instruction("1. Task: Write a haiku about rain.") == "Write a haiku about rain."


@pytest.mark.parametrize("reply, classification, expected", [
    ("Input: None\nOutput: 42", False, ("", "42", None)),
    ("Input: 2 + 2\nOutput:", False, ("2 + 2", "", "empty_output")),
    ("Label: positive\nInput: I love it", True, ("I love it", "positive", None)),
    ("Class label: negative\nInput: n/a", True, ("", "negative", "empty_input")),
    ("The answer is 42", False, ("", "", "unparseable_instance")),
    ("Label: yes", True, ("", "", "unparseable_instance")),
    ("Input: ünïcödé 北京\nOutput: ✓", False, ("ünïcödé 北京", "✓", None)),
])
def test_parse_instance_more_cases(reply, classification, expected):
    from posttrain.feedback.self_instruct import parse_instance

    assert parse_instance(reply, classification) == expected


class _Generator(ScriptedBackend):
    def __init__(self):
        def reply(messages):
            content = messages[-1]["content"]
            if content.startswith("Come up with"):
                return "Explain how tides follow the moon."
            if content.startswith("Is the following"):
                return "No."
            return "Input: None\nOutput: The moon pulls the sea."
        super().__init__(reply, name="fixed-generator")


def test_self_instruct_rerun_after_a_run_that_logged_nothing_accepts_a_corrected_generator(tmp_path):
    from posttrain.config.synthesis import SelfInstructConfig
    from posttrain.feedback.self_instruct import run_self_instruct

    cfg = SelfInstructConfig.from_dict({"output_dir": str(tmp_path / "out"), "self_instruct": {
        "num_tasks": 1, "per_round": 2, "max_rounds": 1, "concurrency": 1}})
    with pytest.raises(UserError, match="every item failed"):
        run_self_instruct(cfg, generator=_Failing("broken-generator"), stream=io.StringIO())
    assert (tmp_path / "out" / "candidates.jsonl").read_text() == ""
    run_self_instruct(cfg, generator=_Generator(), stream=io.StringIO())
    rows = [json.loads(line) for line in (tmp_path / "out" / "sft.jsonl").read_text().splitlines()]
    assert [r["instruction"] for r in rows] == ["Explain how tides follow the moon."]


def test_self_instruct_same_instruction_twice_in_a_round_is_accepted_once(tmp_path):
    from posttrain.config.synthesis import SelfInstructConfig
    from posttrain.feedback.self_instruct import run_self_instruct

    cfg = SelfInstructConfig.from_dict({"output_dir": str(tmp_path / "out"), "self_instruct": {
        "num_tasks": 5, "per_round": 3, "max_rounds": 1, "concurrency": 2}})
    run_self_instruct(cfg, generator=_Generator(), stream=io.StringIO())
    tasks = [json.loads(line) for line in (tmp_path / "out" / "tasks.jsonl").read_text().splitlines()]
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected.jsonl").read_text().splitlines()]
    assert [t["id"] for t in tasks] == ["r0-0"]  # judged in k order: the first is kept
    assert [(r["id"], r["reason"]) for r in rejected] == [("r0-1", "duplicate"), ("r0-2", "duplicate")]


# =========================================================================== serve: protocol (no model)

LIMITS = Limits(max_tokens=64, max_n=4)
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("kind, body, param", [
    ("chat", {**CHAT, "max_tokens": 0}, "max_tokens"),
    ("completion", {"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("completion", {"model": "m", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("chat", {**CHAT, "max_completion_tokens": 65}, "max_completion_tokens"),
    ("chat", {**CHAT, "n": 0}, "n"),
    ("chat", {**CHAT, "n": "2"}, "n"),
    ("chat", {**CHAT, "stop": ["ok", 5]}, "stop"),
    ("chat", {**CHAT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("chat", {**CHAT, "stop": [""]}, "stop"),
    ("chat", {**CHAT, "top_p": 1.5}, "top_p"),
    ("chat", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("chat", {**CHAT, "stream": True, "stream_options": {"include_usage": "yes"}}, "include_usage"),
    ("chat", {**CHAT, "messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ("chat", {**CHAT, "messages": [{"role": "function", "content": "x"}]}, "messages[0].role"),
    ("completion", {"model": "m", "prompt": {"text": "x"}}, "prompt"),
    ("completion", {"model": "m", "prompt": ["a", 1]}, "prompt"),
    ("completion", {"model": "m", "prompt": "x", "echo": True}, "echo"),
    ("completion", {"model": "m", "prompt": "x", "best_of": 2}, "best_of"),
    ("chat", {**CHAT, "model": 7}, "model"),
    ("chat", {**CHAT, "seed": 1.5}, "seed"),
])
def test_protocol_refuses_bad_values_with_400_and_the_param(kind, body, param):
    with pytest.raises(APIError) as info:
        parse_request(kind, body, LIMITS)
    assert info.value.status == 400 and info.value.param == param


def test_protocol_defaults_and_accepted_forms():
    chat = parse_request("chat", {**CHAT, "stop": "END"}, LIMITS)
    assert (chat.max_tokens, chat.temperature, chat.top_p, chat.n, chat.stop) == (None, 1.0, 1.0, 1, ["END"])
    completion = parse_request("completion", {"model": "m", "prompt": ["a", "b"], "logprobs": None}, LIMITS)
    assert (completion.max_tokens, completion.prompts) == (16, ["a", "b"])  # OpenAI's default for completions
    dev = parse_request("chat", {**CHAT, "messages": [{"role": "developer", "content": [
        {"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]}]}, LIMITS)
    assert dev.messages == [{"role": "system", "content": "Be brief."}]


@pytest.mark.parametrize("bad", ["ten", -3])
def test_protocol_validates_max_tokens_even_when_max_completion_tokens_is_given(bad):
    with pytest.raises(APIError) as info:
        parse_request("chat", {**CHAT, "max_completion_tokens": 5, "max_tokens": bad}, LIMITS)
    assert info.value.status == 400 and info.value.param == "max_tokens"


@pytest.mark.parametrize("extra", [{"refusal": "no"}, {"tool_calls": [{"id": "c1", "type": "function"}]}])
def test_protocol_refuses_message_fields_it_drops(extra):
    body = {**CHAT, "messages": [{"role": "assistant", "content": "x", **extra}, {"role": "user", "content": "y"}]}
    with pytest.raises(APIError) as info:
        parse_request("chat", body, LIMITS)
    assert info.value.status == 400


@pytest.mark.parametrize("field, value", [("store", "yes"), ("metadata", "x"), ("service_tier", 3)])
def test_protocol_type_checks_ignored_chat_fields(field, value):
    with pytest.raises(APIError) as info:
        parse_request("chat", {**CHAT, field: value}, LIMITS)
    assert info.value.status == 400 and info.value.param == field


# =========================================================================== serve: over HTTP (tiny preset)


@pytest.fixture(scope="module")
def server():
    torch = pytest.importorskip("torch")
    from posttrain.serve import build_server

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = build_server("tiny", port=0, log_requests=False, limits=Limits(max_tokens=64, max_n=4),
                          max_batch_size=8).start()
    yield server
    server.close()
    torch.set_num_threads(threads)


def _post(server, path, body, headers=None, method="POST"):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        data = None if body is None else json.dumps(body)
        connection.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        response = connection.getresponse()
        return response.status, response.read().decode(), dict(response.getheaders())
    finally:
        connection.close()


def _json(server, path, body, **kw):
    status, text, _ = _post(server, path, body, **kw)
    return status, json.loads(text)


SAMPLED = {"model": "tiny", "temperature": 1.0, "max_tokens": 24}


def _texts(answer):
    return [c["message"]["content"] if "message" in c else c["text"] for c in answer["choices"]]


def test_stop_string_spanning_tokens_cuts_like_hand_truncation_streamed_or_not(server):
    body = {**SAMPLED, "prompt": "Once upon", "seed": 11}
    status, full = _json(server, "/v1/completions", body)
    text = _texts(full)[0]
    assert status == 200 and len(text) >= 8, text
    stop = text[3:7]  # four characters from the middle: spans a token boundary unless one token holds all
    expected = text[:text.find(stop)]
    status, cut = _json(server, "/v1/completions", {**body, "stop": [stop, "never-there"]})
    assert status == 200 and _texts(cut) == [expected] and cut["choices"][0]["finish_reason"] == "stop"
    assert cut["usage"]["completion_tokens"] <= full["usage"]["completion_tokens"]
    streamed = _stream(server, "/v1/completions", {**body, "stop": stop})
    assert streamed["texts"] == {0: expected} and streamed["finish"] == {0: "stop"}


def _stream(server, path, body):
    status, raw, headers = _post(server, path, {**body, "stream": True})
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]", raw[-300:]
    chunks = []
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event, event
        chunks.append(json.loads(event[len("data: "):]))
    texts, finish, roles, usage = {}, {}, {}, None
    for chunk in chunks:
        assert chunk["id"] == chunks[0]["id"]
        if not chunk["choices"]:
            usage = chunk["usage"]
            continue
        (choice,) = chunk["choices"]
        index = choice["index"]
        assert index not in finish, "a chunk after the choice's finish chunk"
        if "delta" in choice:
            if "role" in choice["delta"]:
                assert index not in texts
                roles[index] = choice["delta"]["role"]
            texts[index] = texts.get(index, "") + (choice["delta"].get("content") or "")
        else:
            texts[index] = texts.get(index, "") + choice["text"]
        if choice["finish_reason"] is not None:
            finish[index] = choice["finish_reason"]
    if usage is not None:
        assert chunks[-1]["choices"] == []  # the usage chunk comes last
    return {"texts": texts, "finish": finish, "roles": roles, "usage": usage}


def test_chat_stream_sse_format_n_choices_and_usage_match_the_plain_answer(server):
    body = {**SAMPLED, "messages": [{"role": "user", "content": "Grüße aus 北京 🙂"}], "seed": 5, "n": 3}
    status, plain = _json(server, "/v1/chat/completions", body)
    assert status == 200 and [c["index"] for c in plain["choices"]] == [0, 1, 2]
    assert plain["usage"]["total_tokens"] == plain["usage"]["prompt_tokens"] + plain["usage"]["completion_tokens"]
    streamed = _stream(server, "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}})
    assert streamed["roles"] == {0: "assistant", 1: "assistant", 2: "assistant"}
    assert [streamed["texts"][i] for i in range(3)] == _texts(plain)
    assert streamed["finish"] == {i: c["finish_reason"] for i, c in enumerate(plain["choices"])}
    assert streamed["usage"] == plain["usage"]
    assert len(set(_texts(plain))) > 1  # sampled choices differ


def test_completion_prompts_times_n_are_ordered_prompt_major(server):
    one = {"model": "tiny", "temperature": 0, "max_tokens": 6}
    singles = [_texts(_json(server, "/v1/completions", {**one, "prompt": p})[1])[0] for p in ("Alpha", "Beta gamma")]
    status, both = _json(server, "/v1/completions", {**one, "prompt": ["Alpha", "Beta gamma"], "n": 2})
    assert status == 200
    assert [c["index"] for c in both["choices"]] == [0, 1, 2, 3]
    assert _texts(both) == [singles[0], singles[0], singles[1], singles[1]]  # greedy: n copies per prompt
    assert both["usage"]["completion_tokens"] == 4 * 6 or any(c["finish_reason"] == "stop" for c in both["choices"])


def test_max_tokens_one_gives_one_token(server):
    status, answer = _json(server, "/v1/chat/completions", {**SAMPLED, "seed": 1, "max_tokens": 1,
                                                            "messages": [{"role": "user", "content": "x"}]})
    assert status == 200 and answer["usage"]["completion_tokens"] == 1
    assert answer["choices"][0]["finish_reason"] in ("length", "stop")


def test_unknown_model_name_is_404_and_the_models_list_has_only_the_served_name(server):
    status, answer = _json(server, "/v1/chat/completions", {**SAMPLED, "model": "tiny-adapter",
                                                            "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and answer["error"]["code"] == "model_not_found" and answer["error"]["param"] == "model"
    status, models = _json(server, "/v1/models", None, method="GET")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]


def test_wrong_typed_bodies_over_http_get_400_and_keep_alive_survives(server):
    host, port = server.httpd.server_address[:2]
    connection = http.client.HTTPConnection(host, port, timeout=60)
    try:
        for body, param in [({"model": "tiny", "messages": {"role": "user"}}, "messages"),
                            ({"model": "tiny", "prompt": "x", "max_tokens": "5"}, None),
                            ({"model": ["tiny"], "prompt": "x"}, "model")]:
            path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
            connection.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            response = connection.getresponse()
            error = json.loads(response.read())["error"]
            assert response.status == 400 and error["type"] == "invalid_request_error"
            assert error["param"] == (param or "max_tokens")
        connection.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "ok", "max_tokens": 2}),
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status == 200 and len(json.loads(response.read())["choices"]) == 1
    finally:
        connection.close()


def test_api_key_wrong_key_and_scheme_refused_right_key_any_case_accepted(server):
    from posttrain.serve.http import Server

    keyed = Server(server.engine, port=0, api_key="s3cret", log_requests=False).start()
    try:
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
        for headers in ({"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret"},
                        {"Authorization": "Bearer s3cret-and-more"}, {"Authorization": "s3cret"}):
            status, answer = _json(keyed, "/v1/completions", body, headers=headers)
            assert status == 401 and answer["error"]["code"] == "invalid_api_key", headers
            assert "s3cret" not in json.dumps(answer)
        assert _json(keyed, "/v1/completions", body, headers={"Authorization": "bearer s3cret"})[0] == 200
        assert _json(keyed, "/health", None, method="GET")[0] == 200  # no key needed
    finally:
        keyed.close(close_engine=False)
