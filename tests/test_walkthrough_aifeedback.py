"""An AI-feedback walk, read against the papers: Constitutional AI (Bai et al. 2022), Self-Instruct
(Wang et al. 2023) and RLAIF (Lee et al. 2023), with in-process scripted backends (no model loaded).

Walked: README's "AI feedback" section and src/posttrain/feedback/. Constitutional AI: the
critique -> revision chain with a principle drawn per round, SL-CAI rows (prompt + final revision,
the generation-only system prompt left out), RL-CAI pairs from a judge asked in both orders, and the
summary's counts against the rows written, over a run that mixes kept, dropped (empty, cut off),
unchanged, judged-for, judged-against and inconsistent chains. Self-Instruct: the 6 seed + 2
generated in-context examples, the keyword and length filters, output-first instances for
classification, ROUGE-L >= 0.7 against the pool (checked against an independent character- and
word-level LCS), and which settings a resume refuses. RLAIF: both orders per pair, ties and
inconsistent verdicts kept out of the rows and counted, and a prompt that occurs twice in the data.
The judge's parser was tried on replies that name "A" in their reasoning, bracketed and markdown
verdicts.

Right: the chain's counts add up (SFT rows = revised + unchanged chains; pairs = the judge's
consistent verdicts; rounds = kept + dropped by reason), the system prompt is sent but never
written, the pool filter is exact for space-separated text, and a resume refuses a generator or
in-context setting that changes the tasks while allowing concurrency and max_rounds to change.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 33: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from posttrain.config import RLAIFConfig
from posttrain.config.synthesis import ConstitutionalConfig, SelfInstructConfig, SelfInstructFilterConfig
from posttrain.errors import ConfigError
from posttrain.feedback.client import Reply, Usage
from posttrain.feedback.constitutional import run_constitutional
from posttrain.feedback.rouge import rouge_l
from posttrain.feedback.self_instruct import Task, TaskPool, instruction_rejection, run_self_instruct


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def lcs(a: list[str], b: list[str]) -> int:
    """The textbook LCS table, written out here."""
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def _shown(text: str, slot: str) -> str:
    return re.search(rf"\[Response {slot}\]\n(.*?)\n\[End of response {slot}\]", text, re.S).group(1)


# --------------------------------------------------------------------------- Constitutional AI


class _CAIPolicy:
    """Replies from the request alone. Initial: "draft: P"; critique: "critique of <response>";
    revision: "better: <response>". Markers in the prompt: NOREV (every revision blank), CUTREV
    (revisions cut off by max_tokens), ECHO (the revision repeats the response word for word)."""

    model_name = "cai-policy"

    def __init__(self):
        self.usage, self.requests = Usage(), []

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None) -> Reply:
        self.requests.append(messages)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        assistant = [m["content"] for m in messages if m["role"] == "assistant"]
        self.usage.add(requests=1)
        if not assistant:
            return Reply(f"draft: {prompt}", "stop", 1, 1)
        if len(assistant) == 1:
            return Reply(f"critique of <{assistant[0]}>", "stop", 1, 1)
        if "NOREV" in prompt:
            return Reply("   ", "stop", 1, 1)
        if "ECHO" in prompt:
            return Reply(assistant[0], "stop", 1, 1)
        return Reply(f"better: {assistant[0]}", "length" if "CUTREV" in prompt else "stop", 1, 1)


class _CAIJudge:
    """By the prompt: KEEP prefers the revision in both orders, BACK the original in both, SLOT always
    says A (inconsistent), EVEN says tie; the verdict comes after reasoning that names the other slot."""

    model_name = "cai-judge"

    def __init__(self):
        self.usage = Usage()

    def chat(self, messages, **_) -> Reply:
        text = messages[-1]["content"]
        self.usage.add(requests=1)
        a_is_revision = _shown(text, "A").startswith("better")
        if "SLOT" in text:
            verdict = "A"
        elif "EVEN" in text:
            verdict = "tie"
        elif "BACK" in text:
            verdict = "B" if a_is_revision else "A"
        else:
            verdict = "A" if a_is_revision else "B"
        other = "B" if verdict == "A" else "A"
        return Reply(f"Response {other} is shorter, and A and B both answer.\nVerdict: {verdict}", "stop", 1, 1)


def test_cai_summary_counts_equal_the_rows_written_and_the_system_prompt_is_not_written(tmp_path):
    prompts = ["KEEP one", "BACK two", "SLOT three", "EVEN four", "NOREV five", "CUTREV six", "ECHO seven"]
    files = tmp_path / "p.jsonl"
    files.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    cfg = ConstitutionalConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "data": {"prompt_files": [str(files)]},
        "constitutional": {"rounds": 2, "concurrency": 2, "rl_cai": True, "system": "SYSTEM-SECRET be kind"}})
    policy, judge = _CAIPolicy(), _CAIJudge()
    out = run_constitutional(cfg, policy=policy, judge_backend=judge, stream=None)
    summary = json.loads((out / "summary.json").read_text())
    sft, pairs, chains = (read_jsonl(out / name) for name in ("sft.jsonl", "preferences.jsonl", "chains.jsonl"))

    # every request began with the system turn; no output row carries it
    assert all(r[0] == {"role": "system", "content": "SYSTEM-SECRET be kind"} for r in policy.requests)
    assert "SYSTEM-SECRET" not in (out / "sft.jsonl").read_text() + (out / "preferences.jsonl").read_text()

    status = summary["status"]
    assert status == {"no_revision": 2, "revised": 4, "unchanged": 1}
    assert summary["sft_rows"] == len(sft) == status["revised"] + status["unchanged"]
    assert summary["judge"] == {"revision": 1, "original": 1, "tie": 1, "inconsistent": 1, "unparsed": 0}
    assert sum(summary["judge"].values()) == status["revised"]  # the judge sees revised chains only
    assert summary["preference_rows"] == len(pairs) == summary["judge"]["revision"] + summary["judge"]["original"]
    assert summary["rounds"] == 2 * len(prompts) == summary["rounds_kept"] + sum(summary["rounds_dropped"].values())
    assert summary["rounds_dropped"] == {"empty_revision": 2, "truncated_revision": 2}

    by_id = {c["id"]: c for c in chains}
    rows = {p["id"]: (p["chosen"], p["rejected"]) for p in pairs}
    assert rows == {"q0": (by_id["q0"]["final"], by_id["q0"]["initial"]),
                    "q1": (by_id["q1"]["initial"], by_id["q1"]["final"])}  # the judge's side chosen
    # SL-CAI: the final revision of two rounds, built on the first revision
    assert sft[0]["messages"] == [{"role": "user", "content": "KEEP one"},
                                  {"role": "assistant", "content": "better: better: draft: KEEP one"}]
    assert judge.usage.requests == 2 * status["revised"]  # both orders, no retries (every reply had a verdict)


# --------------------------------------------------------------------------- Self-Instruct / ROUGE-L

CJK_SEED = "请写一首关于秋天的诗"  # "write a poem about autumn": 10 characters, no spaces
CJK_NEAR = "请写一首关于春天的诗"  # the same request about spring: one character differs


def test_cjk_near_duplicate_instructions_are_caught_by_rouge_l_and_are_not_too_short():
    # Independently: per character, the two share 9 of 10 characters in order -> F = 2*9/20 = 0.9
    want = 2 * lcs(list(CJK_SEED), list(CJK_NEAR)) / (len(CJK_SEED) + len(CJK_NEAR))
    assert want == pytest.approx(0.9)
    got = rouge_l(CJK_NEAR, CJK_SEED)
    assert got >= 0.7, f"ROUGE-L of two Chinese instructions one character apart is {got} (per character: {want})"

    pool = TaskPool([Task("s0", CJK_SEED, "", "秋风起", False)], SelfInstructFilterConfig(min_words=1), target=5)
    candidate = {"instruction": CJK_NEAR, "raw_instruction": CJK_NEAR, "instruction_finish_reason": "stop"}
    reason, detail = pool.rejection(candidate)
    assert reason == "similar", f"the near-duplicate joins the pool: reason {reason!r}, {detail}"
    # with the default filters (min_words=3) a ten-character Chinese instruction is one "word"
    assert instruction_rejection(candidate, SelfInstructFilterConfig()) is None, \
        f"rejected as {instruction_rejection(candidate, SelfInstructFilterConfig())!r}"


def test_rouge_l_equals_an_independent_lcs_over_punctuated_mixed_text():
    pairs = [("Don't list 3.5 reasons; list THREE!", "do not list three reasons, please"),
             ("Résumé: write a naïve haiku (5-7-5).", "write a haiku — naïve, 5/7/5"),
             ("Ελληνικά: γράψε ένα ποίημα", "γράψε ένα μικρό ποίημα")]
    for a, b in pairs:
        # words: maximal runs of letters/digits, lowercased; apostrophes, dots, slashes and dashes split
        wa, wb = re.findall(r"[^\W_]+", a.lower()), re.findall(r"[^\W_]+", b.lower())
        assert rouge_l(a, b) == pytest.approx(2 * lcs(wa, wb) / (len(wa) + len(wb)))
    assert rouge_l("Don't stop", "don t STOP") == 1.0


_VOCAB = ("river lantern copper quiet harvest violin marble orbit pepper canyon meadow anchor ribbon glacier "
          "thimble saddle walnut prism comet tundra falcon ember pillow quartz banjo lagoon cobalt tulip").split()


class _Generator:
    """Each instruction: six words drawn by the request's seed (no two alike), then an instance."""

    model_name = "gen"

    def __init__(self):
        self.usage = Usage()

    def chat(self, messages, *, seed=None, **_) -> Reply:
        content = messages[-1]["content"]
        self.usage.add(requests=1)
        if content.startswith("Come up with"):
            return Reply("Describe the " + " ".join(random.Random(seed).sample(_VOCAB, 6)), "stop", 1, 1)
        if content.startswith("Is the following"):
            return Reply("No.", "stop", 1, 1)
        return Reply("Input: None\nOutput: A plain description.", "stop", 1, 1)


def test_self_instruct_resume_refuses_what_changes_tasks_and_allows_what_does_not(tmp_path):
    def cfg(**over) -> SelfInstructConfig:
        data = {"output_dir": str(tmp_path / "run"), "generator": {"max_tokens": 64},
                "self_instruct": {"num_tasks": 2, "per_round": 2, "concurrency": 1}}
        for key, value in over.items():
            section, name = key.split("__")
            data.setdefault(section, {})[name] = value
        return SelfInstructConfig.from_dict(data)

    run_self_instruct(cfg(), generator=_Generator(), stream=None)
    for key, value, shown in (("generator__max_tokens", 128, "generator.max_tokens=64, now 128"),
                              ("self_instruct__seed_examples", 5, "seed_examples=6, now 5"),
                              ("filters__banned_words", ["poem"], "banned_words=")):
        with pytest.raises(ConfigError, match=re.escape(shown)):
            run_self_instruct(cfg(**{key: value}), generator=_Generator(), stream=None)
    # more tasks, another concurrency and max_rounds: the same run goes on
    run_self_instruct(cfg(self_instruct__num_tasks=4, self_instruct__concurrency=2, self_instruct__max_rounds=9),
                      generator=_Generator(), stream=None)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["accepted"] == len(read_jsonl(tmp_path / "run" / "sft.jsonl")) == 4
    assert summary["candidates"] == len(read_jsonl(tmp_path / "run" / "candidates.jsonl")) == 4


# --------------------------------------------------------------------------- RLAIF


class _SampledPolicy:
    """A seeded sampler: the reply depends on the seed (as a sampling server's does)."""

    model_name = "policy"

    def __init__(self):
        self.usage = Usage()

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None) -> Reply:
        self.usage.add(requests=1)
        return Reply(f"answer {'x' * (seed + 1)}", "stop", 1, 1)


class _LongerWins:
    model_name = "judge"

    def __init__(self):
        self.usage = Usage()

    def chat(self, messages, **_) -> Reply:
        self.usage.add(requests=1)
        text = messages[-1]["content"]
        return Reply("Verdict: " + ("A" if len(_shown(text, "A")) > len(_shown(text, "B")) else "B"), "stop", 1, 1)


def test_rlaif_a_prompt_occurring_twice_does_not_write_the_same_rows_twice(tmp_path, monkeypatch):
    import posttrain.feedback.rlaif as rlaif

    files = tmp_path / "p.jsonl"
    files.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Say hi", "Say bye", "Say hi")))
    judge = _LongerWins()
    monkeypatch.setattr(rlaif, "_backends", lambda cfg: (_SampledPolicy(), judge))
    cfg = RLAIFConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "data": {"prompt_files": [str(files)]},
        "policy": {"api_key_env": "", "temperature": 1.0}, "judge": {"api_key_env": ""},
        "rlaif": {"num_responses": 3, "concurrency": 1}})
    rlaif.run_rlaif(cfg, log=lambda _: None)
    rows = read_jsonl(tmp_path / "run" / "preferences.jsonl")
    distinct = {(r["prompt"], r["chosen"], r["rejected"]) for r in rows}
    assert len(distinct) == len(rows), (
        f"{len(rows)} preference rows, {len(distinct)} distinct: the repeat of 'Say hi' was sampled with the same "
        f"seeds and judged again ({judge.usage.requests} judge requests)")
