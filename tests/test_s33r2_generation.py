"""Generation fixes of stop 33 (round 2), beyond the pinned walkthrough tests: a stop string that is one
special token ends a row by its id in the generator's stop check (generate, chat, the rollouts) and in
`serve`; a chat's seeded replies sample from (seed, reply number); a prompt row's own `completion` is
said once; non-finite sampling settings and penalties outside OpenAI's [-2, 2] are refused; a JSON
prompt too long for the model is named by file:line; indices and names must match the prompts."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch

from posttrain import cli
from posttrain.data.templates import CHATML
from posttrain.models.presets import build_tokenizer
from posttrain.rollout.generate import (
    _make_stop_check,
    chat_session,
    generate_token_ids,
    stop_token_ids,
)
from posttrain.rollout.sampling import SamplingSettings, request_seed


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class Says(torch.nn.Module):
    """A causal-LM stand-in that says `script` token by token whatever the prompt (then its last token on
    and on); with no script, every token equally likely."""

    def __init__(self, script: list[int] | None, vocab: int):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab, self.generation_config = script, vocab, None

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None):
        step = 0 if past_key_values is None else past_key_values
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        if self.script:
            logits[:, -1, self.script[min(step, len(self.script) - 1)]] = 1.0
        return types.SimpleNamespace(logits=logits, past_key_values=step + 1)


def test_only_a_stop_string_that_is_one_special_token_is_a_stop_id(tok):
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert stop_token_ids(tok, ["<|im_start|>", "", "\n", "user", "<|im_start|>user"]) == {start}
    assert stop_token_ids(tok, []) == set()


def test_the_rollouts_stop_check_ends_at_a_special_token_stop(tok):
    """`_make_stop_check` is what generate, chat and the RL rollouts end a row with."""
    start = tok.convert_tokens_to_ids("<|im_start|>")
    check = _make_stop_check(tok, ["<|im_start|>"])
    assert not check(_ids(tok, "Hello"))
    assert check(_ids(tok, "Hello") + [start])


def test_serve_ends_a_completion_at_a_special_token_stop(tok):
    from posttrain.serve.engine import AS_LOADED, Engine
    from posttrain.serve.protocol import Limits, Request

    start = tok.convert_tokens_to_ids("<|im_start|>")
    model = Says(_ids(tok, "Hello") + [start] + _ids(tok, "user\nmore") + _ids(tok, " words") * 10, len(tok))
    engine = Engine(model, tok, {"m": AS_LOADED}, CHATML, Limits())
    try:
        for stream in (False, True):
            job = engine.submit(Request(kind="chat", model="m", messages=[{"role": "user", "content": "a"}],
                                        max_tokens=12, temperature=0.0, stop=["<|im_start|>"], stream=stream))
            sent = ""
            while (event := job.events.get(timeout=30))[0] != "end":
                assert event[0] == "delta"
                sent += event[2]
            assert (sent + event[2], event[3], event[4]) == ("Hello", "stop", len(_ids(tok, "Hello")) + 1)
    finally:
        engine.close()


def test_a_chats_seeded_replies_sample_from_the_reply_number(tok, monkeypatch):
    """The same message after /reset: before, each reply drew from (seed, 0) and repeated the first."""
    import posttrain.rollout.generate as generate_module

    seen = []
    real = generate_module.generate
    monkeypatch.setattr(generate_module, "generate", lambda *a, **k: seen.append(a[3].seed) or real(*a, **k))
    lines = iter(["hi", "/reset", "hi", "/reset", "hi"])

    def read(_):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    written: list[str] = []
    chat_session(Says(None, len(tok)), tok, CHATML, SamplingSettings(max_new_tokens=6, temperature=1.0, seed=3),
                 read=read, write=written.append)
    assert seen == [request_seed(3, turn) for turn in range(3)]
    assert len(set(written)) == 3, written


def test_a_prompt_rows_own_completion_is_said_and_replaced(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi", "completion": "an old answer from the file"}) + "\n" + json.dumps({"prompt": "yo"}) + "\n")
    out = tmp_path / "o.jsonl"
    assert cli.main(["generate", "--model", "tiny", "--prompts", str(prompts), "--output", str(out),
                     "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert "1 of 2 prompt rows have a 'completion' field" in err, err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [list(row) for row in rows] == [["prompt", "completion"], ["prompt", "completion"]]
    assert rows[0]["completion"] != "an old answer from the file"  # two generated tokens cannot spell it


def test_a_json_prompt_too_long_is_named_by_its_line(tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hi"}) + "\n" + json.dumps({"prompt": "word " * 1100}) + "\n")
    code = cli.main(["generate", "--model", "tiny", "--prompts", str(prompts), "--output", str(tmp_path / "o.jsonl"),
                     "--max-new-tokens", "2"])
    err = capsys.readouterr().err
    assert code == 2 and f"{prompts}:2: the prompt has" in err, err


@pytest.mark.parametrize("field, value", [("temperature", math.inf), ("repetition_penalty", math.nan),
                                          ("frequency_penalty", math.nan), ("presence_penalty", -math.inf),
                                          ("top_p", math.nan)])
def test_sampling_settings_refuse_non_finite_values(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingSettings(**{field: value})


@pytest.mark.parametrize("field, value", [("frequency_penalty", 2.5), ("presence_penalty", -2.01)])
def test_a_penalty_past_openais_range_is_refused_where_a_user_sets_it(field, value):
    settings = SamplingSettings(**{field: value})  # the engine takes any finite penalty
    with pytest.raises(ValueError, match=field):
        settings.check_penalty_range()
    SamplingSettings(frequency_penalty=-2.0, presence_penalty=2.0).check_penalty_range()


def test_a_penalty_flag_past_the_range_is_refused_before_the_model_loads(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    code = cli.main(["generate", "--model", "does-not-exist", "--prompts", str(prompts),
                     "--output", str(tmp_path / "o.jsonl"), "--presence-penalty", "3"])
    assert code == 2 and "presence_penalty must be in [-2, 2]" in capsys.readouterr().err


def test_indices_and_names_must_match_the_prompts(tok):
    model = Says(_ids(tok, "a"), len(tok))
    settings = SamplingSettings(max_new_tokens=1, temperature=1.0, seed=0)
    for extra in ({"indices": [0]}, {"names": ["f:1"]}):
        with pytest.raises(ValueError, match="one per prompt"):
            generate_token_ids(model, [[1], [2]], settings, pad_token_id=0, eos_token_ids=set(), **extra)


def test_an_rl_rollout_stopped_by_a_special_token_stop_is_ended_and_not_penalised(tok):
    """rollout.stop=['<|im_start|>']: a completion the engine ends on that token (given to it as an
    end id, as EOS is) counts as ended, so reward.no_eos_penalty leaves it alone; one cut off by
    max_new_tokens is penalised."""
    from posttrain.config import GRPOConfig
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.rollouts import sample_and_score
    from tests.test_rl_edges import _FakeEngine

    start = tok.convert_tokens_to_ids("<|im_start|>")
    seen = {}

    class Engine(_FakeEngine):
        def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
            seen["ends"] = set(eos_token_ids)
            return super().generate(prompt_ids, settings, eos_token_ids=eos_token_ids, pad_token_id=pad_token_id)

    outs = [_ids(tok, "ab")[:2] + [start], _ids(tok, "hello world")[:6]]
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=6", "reward.no_eos_penalty=2.0",
                                 "rollout.stop=[<|im_start|>]"])
    records = [PromptRecord(prompt=[{"role": "user", "content": "q"}], source="p.jsonl:1")]
    rollout = sample_and_score(Engine(outs), tok, [[1, 5]], records, [0], cfg, lambda p, t, rows: [1.0, 1.0], seed=0)
    assert start in seen["ends"]
    assert rollout.rewards.tolist() == [1.0, -1.0]  # ended at the stop token; cut off: penalised
