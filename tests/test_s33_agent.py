"""AI feedback and serving (stop 33, backlog items): concurrent `LocalModel.chat` calls from several threads
are generated as one batch on the serving engine's worker, each reply exactly what it gets alone (greedy),
and the worker ends when idle (no thread keeps the model alive); a message's `name` is accepted by
`posttrain serve` and passed to the chat template, refused naming it where the template does not render it;
the pairwise judge is shown the row's tool definitions (plain rows' prompts byte for byte as before); an
aborted AI-feedback run leaves no worker thread behind."""

from __future__ import annotations

import functools
import hashlib
import threading
import time

import pytest

from posttrain.feedback.client import BackendError, LocalModel, Reply, Usage
from tests.test_s31_agentdata import CALLING, RESULT
from tests.test_s32_agent import NAME_TEMPLATE
from tests.test_walkthrough_agentdata import ASK, TOOLS

PROMPTS = [[{"role": "user", "content": text}] for text in
           ("Copy: a b", "Reverse: m b h q", "Smallest letter: z y x", "Copy: k", "Hi", "Reverse: a b c d e f",
            "Copy: p q r", "Smallest: c a")]


@pytest.fixture(scope="module")
def local():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    from posttrain.inference import load_for_inference

    model, tokenizer = load_for_inference("tiny", "float32")
    backend = LocalModel(model, tokenizer, name="tiny", max_tokens=12, temperature=0.0)
    yield backend
    backend.close()


def _workers(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name and t.is_alive()]


# --------------------------------------------------------------------------- item 1: batched local generation


def test_concurrent_local_chats_are_one_batch_and_each_gets_its_tokens_alone(local, monkeypatch):
    alone = [local.chat(p) for p in PROMPTS]
    rows: list[int] = []
    forward = local.model.forward
    first = threading.Event()

    @functools.wraps(forward)
    def counting(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 1:  # a batch's prefill (each decoding step feeds one column)
            rows.append(kwargs["input_ids"].shape[0])
        if not first.is_set():  # the first batch holds the model a moment: the other requests queue meanwhile
            first.set()
            time.sleep(0.3)
        return forward(*args, **kwargs)

    monkeypatch.setattr(local.model, "forward", counting)
    together: dict[int, Reply] = {}

    def ask(i: int) -> None:
        together[i] = local.chat(PROMPTS[i])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [together[i] for i in range(len(PROMPTS))] == alone  # text, finish reason and token counts
    assert sum(rows) == len(PROMPTS) and len(rows) <= 2  # the first batch, then all that queued meanwhile
    assert local.usage.requests == 2 * len(PROMPTS)


def test_an_idle_local_model_ends_its_worker_and_the_next_request_starts_one(local, monkeypatch):
    monkeypatch.setattr(LocalModel, "IDLE_EXIT_S", 0.05)
    idle = LocalModel(local.model, local.tokenizer, name="idle", max_tokens=3, temperature=0.0)
    before = _workers("posttrain-local-model")
    first = idle.chat(PROMPTS[0])
    deadline = time.monotonic() + 5
    while idle.engine._worker is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert idle.engine._worker is None and _workers("posttrain-local-model") == before
    assert idle.chat(PROMPTS[0]) == first
    idle.close()
    assert _workers("posttrain-local-model") == before


# --------------------------------------------------------------------------- item 2: a message's name in serve


def test_serve_passes_a_messages_name_to_the_template_and_refuses_it_where_not_rendered(local):
    from posttrain.data.templates import render
    from posttrain.feedback.client import OpenAICompatible
    from posttrain.serve.engine import AS_LOADED, Engine
    from posttrain.serve.http import Server
    from posttrain.serve.protocol import Limits, parse_request

    named = [{"role": "system", "content": "Be brief.", "name": "mod"}, {"role": "user", "content": "Hi", "name": "al"}]
    assert parse_request("chat", {"model": "m", "messages": named}, Limits()).messages == named
    with pytest.raises(Exception, match=r"messages\[1\].name must be a non-empty string"):
        parse_request("chat", {"model": "m", "messages": [named[0], {**named[1], "name": 3}]}, Limits())

    servers = {template: Server(Engine(local.model, local.tokenizer, {"m": AS_LOADED}, template, Limits()),
                                port=0, log_requests=False).start()
               for template in (NAME_TEMPLATE, local.template)}
    try:
        client = OpenAICompatible(servers[NAME_TEMPLATE].url + "/v1", "m", max_tokens=4, temperature=0.0,
                                  max_retries=0)
        reply = client.chat(named)  # as an OpenAI-compatible backend sends a row's turns
        text = render(local.tokenizer, NAME_TEMPLATE, named, True)
        assert "<|im_start|>user name=al\n" in text
        assert reply.prompt_tokens == len(local.tokenizer(text, add_special_tokens=False)["input_ids"])
        plain = OpenAICompatible(servers[local.template].url + "/v1", "m", max_tokens=4, max_retries=0)
        with pytest.raises(BackendError, match="HTTP 400: .*does not render the turns' 'name'") as info:
            plain.chat(named)
        assert info.value.status == 400
        assert plain.chat([{k: v for k, v in t.items() if k != "name"} for t in named]).completion_tokens >= 1
    finally:
        for server in servers.values():
            server.close()


# --------------------------------------------------------------------------- item 3: the judge sees the tools


def test_the_judge_is_shown_the_rows_tool_definitions():
    import json

    from posttrain.feedback.judge import TOOLS_HEADING, judge_messages

    user = judge_messages([ASK, CALLING, RESULT], "It is sunny.", "No idea.", tools=TOOLS)[1]["content"]
    assert f"{TOOLS_HEADING}\n{json.dumps(TOOLS[0])}\n\nConversation:\n" in user
    assert user.index("Principles:") < user.index(TOOLS_HEADING) < user.index("Conversation:")
    for empty in (None, []):
        assert judge_messages([ASK], "a", "b", tools=empty) == judge_messages([ASK], "a", "b")


def test_plain_rows_give_the_judge_byte_identical_prompts():
    from posttrain.feedback.judge import judge_messages

    digests = [hashlib.sha256(repr(judge_messages(turns, "It is sunny.", "No idea.")).encode()).hexdigest()[:16]
               for turns in ([ASK], [ASK, CALLING, RESULT])]
    assert digests == ["be36c5244f5ae64b", "81034a80e5b5b019"]  # before stop 33


class _Scripted:
    """A chat backend that records what it is asked; the policy answers by seed, the judge "Verdict: A"."""

    def __init__(self, name: str):
        self.model_name, self.usage, self.asked = name, Usage(), []

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None, tools=None) -> Reply:
        self.asked.append(messages)
        return Reply(f"answer {seed}" if self.model_name == "policy" else "Verdict: A", "stop", 1, 1)


def test_rlaif_gives_the_judge_the_rows_tools():
    from posttrain.data.prompts import PromptRecord
    from posttrain.feedback.judge import TOOLS_HEADING, PairwiseJudge
    from posttrain.feedback.rlaif import rlaif_record

    judge = _Scripted("judge")
    for tools, shown in ((TOOLS, True), (None, False)):
        judge.asked.clear()
        record = rlaif_record("0", PromptRecord([ASK], tools=tools), policy=_Scripted("policy"),
                              judge=PairwiseJudge(judge), num_responses=2, seed=0)
        assert [p["outcome"] for p in record["pairs"]] == ["inconsistent"]
        assert len(judge.asked) == 2 and all((TOOLS_HEADING in m[1]["content"]) == shown for m in judge.asked)


# --------------------------------------------------------------------------- item 4: no thread outlives a run


def test_a_failing_rlaif_run_with_two_local_models_leaves_no_thread_behind(tmp_path, monkeypatch):
    """An aborted run has joined its item workers (jobs.run_items) and ended its local models' workers
    (client.close_local) when it returns: no thread is left holding the policy or the judge."""
    import json

    from posttrain.config import RLAIFConfig
    from posttrain.feedback import rlaif
    from posttrain.feedback.jobs import RunAborted

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Copy: {c}"}) + "\n" for c in "abc"))
    cfg = RLAIFConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "data": {"prompt_files": [str(prompts)]},
        "policy": {"kind": "local", "model": "tiny", "max_tokens": 3},
        "judge": {"kind": "local", "model": "tiny", "template": "chatml", "max_tokens": 3},  # a second model
        "rlaif": {"num_responses": 2, "concurrency": 2}})
    made = []
    monkeypatch.setattr(rlaif, "_backends", lambda cfg, real=rlaif._backends: made.extend(real(cfg)) or made)

    def failing(judge, turns, texts, tools=None):
        judge.backend.chat(turns, max_tokens=2)  # the judge's model generates, then the item fails
        raise RuntimeError("judge down")

    monkeypatch.setattr(rlaif, "judge_pairs", failing)
    before = set(threading.enumerate())
    with pytest.raises(RunAborted, match="judge down"):
        rlaif.run_rlaif(cfg, log=lambda _: None)
    assert made[0] is not made[1] and made[0].usage.requests and made[1].usage.requests
    left = [t.name for t in set(threading.enumerate()) - before if t.is_alive() and t.name != "tqdm_monitor"]
    assert not left  # tqdm's monitor (started by the weights' loading bar) holds no model


def test_a_closed_local_model_answers_its_next_request(local):
    """`close` ends the worker only: a run that closes the backends it was handed (so none outlives
    it) leaves them usable by the caller, whose next request starts a new worker."""
    first = local.chat(PROMPTS[0]).text
    local.close()
    assert not _workers("posttrain-local-model")
    assert local.chat(PROMPTS[0]).text == first


@pytest.mark.parametrize("stage", ["constitutional", "self_instruct", "redteam"])
def test_ai_feedback_and_red_team_runs_end_their_local_models_workers(stage, local, tmp_path):
    """Every run that drives a LocalModel ends its worker before it returns (client.close_local),
    as rlaif does: no thread is left holding the model."""
    import json

    if stage == "constitutional":
        from posttrain.config import ConstitutionalConfig
        from posttrain.feedback.constitutional import run_constitutional

        prompts = tmp_path / "p.jsonl"
        prompts.write_text(json.dumps({"prompt": "Copy: a"}) + "\n")
        cfg = ConstitutionalConfig.from_dict({"output_dir": str(tmp_path / "run"),
                                              "data": {"prompt_files": [str(prompts)]},
                                              "constitutional": {"rounds": 1}})
        run_constitutional(cfg, policy=local, stream=None)
    elif stage == "self_instruct":
        from posttrain.config import SelfInstructConfig
        from posttrain.feedback.self_instruct import run_self_instruct

        cfg = SelfInstructConfig.from_dict({"output_dir": str(tmp_path / "run"),
                                            "self_instruct": {"num_tasks": 1, "per_round": 1, "max_rounds": 1}})
        try:
            run_self_instruct(cfg, generator=local, stream=None)
        except Exception:  # the tiny model's candidates may all be rejected; the threads are the point
            pass
    else:
        from posttrain.config import RedTeamConfig
        from posttrain.safety.run import run_redteam

        cfg = RedTeamConfig.from_dict({"output_dir": str(tmp_path / "run"), "probes": {"limit": 1},
                                       "attacks": {"names": ["direct"]}})
        run_redteam(cfg, target=local, log=lambda _: None, stream=None)
    assert local.usage.requests
    assert not _workers("posttrain-local-model")
