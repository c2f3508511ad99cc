"""AI feedback (stop 34, backlog items): a Constitutional AI original cut off by max_tokens never
becomes the rejected side of a pair (the pair is dropped, counted by reason and logged; the SFT
row from its complete revision is kept); the RL-CAI judge is shown the system prompt the policy
answered under (plain rows' judge prompts byte for byte as before); a greedy RLAIF policy's
identical responses are counted as identical pairs, never judged nor written; the RLAIF policy is
given a row's tool definitions (by the local chat template, or in the OpenAI request body)."""

from __future__ import annotations

import json

import pytest

from posttrain.feedback.client import Reply, Usage
from posttrain.feedback.constitutional import (ChainSettings, count_outcomes, judge_chain, preference_row,
                                               run_chain, run_constitutional, sft_row, summary_lines)
from posttrain.feedback.judge import PairwiseJudge, judge_messages
from tests.test_constitutional import PRINCIPLES, FakeJudge, FakePolicy, config, read_jsonl, write_prompts
from tests.test_walkthrough_agentdata import ASK, TOOL_TEMPLATE, TOOLS


class CutPolicy(FakePolicy):
    """FakePolicy whose initial answer to a prompt holding LONG stops at max_tokens."""

    def chat(self, messages, **kwargs) -> Reply:
        reply = FakePolicy.chat(self, messages, **kwargs)
        first = not any(m["role"] == "assistant" for m in messages)
        prompt = next(m["content"] for m in messages if m["role"] == "user")
        return Reply(reply.text, "length", 10, 5) if first and "LONG" in prompt else reply


class Recording:
    """A chat backend that keeps every request (messages and keyword arguments); the policy answers
    the same text whatever the seed (greedy), the judge "Verdict: A"."""

    def __init__(self, name: str, answer: str = "Verdict: A"):
        self.model_name, self.usage, self.answer, self.asked = name, Usage(), answer, []

    def chat(self, messages, **kwargs) -> Reply:
        self.asked.append((messages, kwargs))
        return Reply(self.answer, "stop", 1, 1)


# --------------------------------------------------------------------------- item 1: a cut-off original


def test_a_truncated_original_gives_no_pair_and_is_counted():
    turns = [{"role": "user", "content": "LONG story"}]
    record = run_chain(CutPolicy(), "p", turns, PRINCIPLES, ChainSettings(rounds=1))
    assert record["initial_finish_reason"] == "length" and record["status"] == "revised"
    assert preference_row(record) is None  # a cut answer as `rejected` teaches "finish your sentences"
    assert sft_row(record)["messages"][-1]["content"] == "revision 1 of: LONG story"  # the revision is complete
    plain = run_chain(CutPolicy(), "q", [{"role": "user", "content": "short"}], PRINCIPLES, ChainSettings())
    outcome = count_outcomes([record, plain])
    assert outcome["pairs_dropped"] == {"truncated_original": 1}
    kept = run_chain(CutPolicy(), "p", turns, PRINCIPLES, ChainSettings(drop_truncated=False))
    assert preference_row(kept) is not None  # drop_truncated: false keeps it, as it keeps cut revisions


def test_a_run_drops_and_logs_pairs_with_a_truncated_original(tmp_path, capsys):
    prompts = write_prompts(tmp_path / "p.jsonl", ["What is up?", "LONG one"])
    judge = FakeJudge()
    cfg = config(tmp_path / "run", prompts, constitutional={"rl_cai": True, "rounds": 1})
    out = run_constitutional(cfg, policy=CutPolicy(), judge_backend=judge, stream=None)
    assert [p["id"] for p in read_jsonl(out / "preferences.jsonl")] == ["q0"]
    assert [r["id"] for r in read_jsonl(out / "sft.jsonl")] == ["q0", "q1"]
    assert judge.usage.requests == 2  # the cut original is not judged: one pair, both orders
    summary = json.loads((out / "summary.json").read_text())
    assert summary["pairs_dropped"] == {"truncated_original": 1} and summary["preference_rows"] == 1
    assert any("1 truncated_original" in line for line in summary_lines(summary))


# --------------------------------------------------------------------------- item 2: the RL-CAI judge sees the system


def test_the_rl_cai_judge_is_shown_the_system_prompt_the_policy_answered_under():
    judge = Recording("judge")
    pairwise = PairwiseJudge(judge, "- kind: Be kind.")
    prompt = [{"role": "user", "content": "Q"}]
    record = run_chain(FakePolicy(), "p", prompt, PRINCIPLES, ChainSettings(system="Answer as a pirate."))
    judge_chain(pairwise, record)
    shown = judge.asked[0][0][1]["content"]
    assert "Conversation:\nSystem: Answer as a pirate.\n\nUser: Q\n\n" in shown

    judge.asked.clear()  # plain rows: the same messages as before
    plain = run_chain(FakePolicy(), "p", prompt, PRINCIPLES, ChainSettings())
    judge_chain(pairwise, plain)
    assert judge.asked[0][0] == judge_messages(prompt, plain["initial"], plain["final"], "- kind: Be kind.")

    judge.asked.clear()  # a prompt's own system turn (the one the policy got) is shown once
    own = [{"role": "system", "content": "Be terse."}, *prompt]
    judge_chain(pairwise, run_chain(FakePolicy(), "p", own, PRINCIPLES, ChainSettings(system="ignored")))
    assert judge.asked[0][0][1]["content"].count("System:") == 1 and "ignored" not in judge.asked[0][0][1]["content"]


# --------------------------------------------------------------------------- item 4: a greedy policy


def test_identical_responses_are_counted_never_judged_nor_written():
    from posttrain.config import RLAIFConfig
    from posttrain.config.feedback import validate_rlaif
    from posttrain.data.prompts import PromptRecord
    from posttrain.errors import ConfigError
    from posttrain.feedback.rlaif import preference_rows, rlaif_record, summarize, summary_lines

    with pytest.raises(ConfigError, match="policy.temperature must be at least 1e-05"):
        validate_rlaif(RLAIFConfig.from_dict({"policy": {"temperature": 0.0}}))
    judge = Recording("judge")
    records = [rlaif_record(f"x{k}", PromptRecord([ASK]), policy=Recording("policy", "Sunny."),
                            judge=PairwiseJudge(judge), num_responses=3, seed=0, temperature=0.0, occurrence=k)
               for k in (1, 2)]  # one prompt twice in the data, answered greedily
    assert judge.asked == [] and [row for r in records for row in preference_rows(r)] == []
    stats = summarize(records)
    assert stats["not_judged"]["identical"] == 6 and stats["preferences"] == 0
    assert "6 identical" in summary_lines(stats)[0]


# --------------------------------------------------------------------------- item 5: the policy sees the tools


def test_the_rlaif_policy_is_given_the_rows_tools():
    from posttrain.data.prompts import PromptRecord
    from posttrain.feedback.rlaif import rlaif_record

    for tools in (TOOLS, None):
        policy = Recording("policy")
        rlaif_record("0", PromptRecord([ASK], tools=tools), policy=policy, judge=PairwiseJudge(Recording("judge")),
                     num_responses=2, seed=0)
        assert [kwargs.get("tools") for _, kwargs in policy.asked] == [tools, tools]
        if tools is None:  # a plain row's request is as before: backends without a tools argument still work
            assert all("tools" not in kwargs for _, kwargs in policy.asked)


def test_backends_pass_tools_to_the_model():
    from posttrain.feedback.client import OpenAICompatible
    from tests.feedback_fixture import Scripted

    with Scripted(lambda body: "ok") as server:
        client = OpenAICompatible(server.url, "m", max_retries=0)
        client.chat([ASK], tools=TOOLS)
        client.chat([ASK])
        assert server.requests[0][1]["tools"] == TOOLS and "tools" not in server.requests[1][1]


def test_a_local_policy_renders_the_tools_or_refuses_them():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    from posttrain.data.templates import render
    from posttrain.errors import DataError
    from posttrain.feedback.client import LocalModel
    from posttrain.inference import load_for_inference

    model, tokenizer = load_for_inference("tiny", "float32")
    backend = LocalModel(model, tokenizer, name="tiny", max_tokens=2, temperature=0.0)
    try:
        with pytest.raises(DataError, match="does not render the row's 'tools'"):
            backend.chat([ASK], tools=TOOLS)  # chatml shows no tools: refused, never asked without them
        plain = backend.chat([ASK])
        backend.template = TOOL_TEMPLATE
        text = render(tokenizer, TOOL_TEMPLATE, [ASK], True, tools=TOOLS)
        assert backend.chat([ASK], tools=TOOLS).prompt_tokens == len(tokenizer(text, add_special_tokens=False)
                                                                     ["input_ids"]) > plain.prompt_tokens
    finally:
        backend.close()
