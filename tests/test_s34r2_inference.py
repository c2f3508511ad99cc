"""Inference, stop 34 round 2: the RL rewards see a completion cut as generation cut it (a stop string
that starts with a special token, '<|im_start|>user', cut at that token: `generate.completion_text`),
in the rollouts and in the held-out figures; one end-of-turn finder (`templates.end_of_turn`) serves
training and generation; generate's prompt rows render through `templates.render` (file:line on a
row the template refuses, the row's tools shown) and chat folds a system message into the first user
turn under a template without a system role."""

from __future__ import annotations

import json

import pytest

from posttrain.config import GRPOConfig
from posttrain.data.prompts import PromptRecord
from posttrain.data.templates import ALPACA, CHATML
from posttrain.data.templates import end_of_turn as template_end_of_turn
from posttrain.errors import DataError
from posttrain.models.presets import build_tokenizer
from posttrain.rollout.generate import end_of_turn
from tests.test_rl_edges import _FakeEngine
from tests.test_s33r2_generation import Says
from tests.test_s34r2_serve import STOP, _ids  # the special-led stop string, text -> ids


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _records(n):
    return [PromptRecord([{"role": "user", "content": "x"}], "y", source=f"s34r2:{i}") for i in range(n)]


def test_the_rollout_reward_sees_the_text_cut_at_a_special_led_stop(tok):
    """The stop check ended the row at '<|im_start|>user': the reward gets the text before the
    special token (not "Hello user"), and the row counts as ended (no no-EOS penalty)."""
    from posttrain.train.rollouts import sample_and_score

    start = tok.convert_tokens_to_ids("<|im_start|>")
    led = _ids(tok, "Hello") + [start] + _ids(tok, "user")
    cut = _ids(tok, "abc def ghi")[:3]  # cut off by max_new_tokens
    seen = []

    def score(prompts, texts, rows):
        seen.extend(texts)
        return [0.0] * len(texts)

    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=3",
                                 "reward.no_eos_penalty=1.0", "reward.normalize=false", f"rollout.stop=[{STOP!r}]"])
    rollout = sample_and_score(_FakeEngine([led, cut]), tok, [[1, 5]], _records(1), [0], cfg, score, seed=0)
    assert seen[0] == "Hello" and rollout.texts[0] == "Hello"
    assert rollout.rewards.tolist() == [0.0, -1.0]  # the stopped row ended; the cut one is penalised
    assert rollout.stats.ended_fraction == 0.5


def test_the_held_out_reward_sees_the_text_cut_at_a_special_led_stop(tok):
    from posttrain.train.rollouts import held_out_reward

    start = tok.convert_tokens_to_ids("<|im_start|>")
    model = Says(_ids(tok, "Hello") + [start] + _ids(tok, "user\nmore") + _ids(tok, " words") * 10, len(tok))
    seen = []

    def score(prompts, texts, rows):
        seen.extend(texts)
        return [float(text == "Hello") for text in texts]

    cfg = GRPOConfig.load(None, ["rollout.max_new_tokens=12", "rollout.temperature=0.01", "eval.prompts=1",
                                 "eval.samples=2", f"rollout.stop=[{STOP!r}]"])
    out = held_out_reward(model, tok, [_ids(tok, "a")], _records(1), score, cfg)
    assert seen and set(seen) == {"Hello"}, seen
    assert out["reward"] == out["greedy_reward"] == 1.0


def test_generation_and_training_find_one_end_of_turn_marker(tok):
    """`rollout.generate.end_of_turn` is `templates.end_of_turn` (None for ""), with the tokenizer's own
    template by default, None with no template."""
    assert end_of_turn(tok, CHATML) == template_end_of_turn(tok, CHATML) == "<|im_end|>"
    assert end_of_turn(tok, ALPACA) == template_end_of_turn(tok, ALPACA) == tok.eos_token
    assert end_of_turn(tok) == template_end_of_turn(tok, tok.chat_template)
    nothing = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert template_end_of_turn(tok, nothing) == "" and end_of_turn(tok, nothing) is None
    bare = build_tokenizer()
    bare.chat_template = None
    assert end_of_turn(bare) is None


GEMMA_LIKE = (
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_a_prompt_row_renders_through_the_training_render_naming_its_place(tok):
    from posttrain.inference import render

    row = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    with pytest.raises(DataError, match=r"^p\.jsonl:2: the chat template failed .*System role not supported"):
        render(row, tok, GEMMA_LIKE, "p.jsonl:2")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with pytest.raises(DataError, match=r"^p\.jsonl:3: the chat template does not render the row's 'tools'"):
        render({"prompt": "Weather?", "tools": tools}, tok, CHATML, "p.jsonl:3")
    with pytest.raises(DataError, match=r"^p\.jsonl:4: --template none needs plain prompts"):
        render({"prompt": "Weather?", "tools": tools}, tok, None, "p.jsonl:4")
    with pytest.raises(DataError, match=r"^p\.jsonl:5: 'tools' entry 1 is not a function definition"):
        render({"prompt": "Weather?", "tools": [{"x": 1}]}, tok, CHATML, "p.jsonl:5")
    asked = render({"prompt": "Hi"}, tok, CHATML, "p.jsonl:6")
    assert asked == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_a_bad_tools_field_is_said_when_the_prompts_are_read(tmp_path):
    from posttrain.inference import read_prompt_rows

    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "tools": "nope"}) + "\n")
    with pytest.raises(DataError, match=rf"^{prompts}:2: 'tools' is a string"):
        read_prompt_rows(str(prompts))


def test_chat_folds_the_system_message_under_a_template_without_a_system_role(tok, capsys, monkeypatch):
    """Said once on stderr; the model is asked the system text before the first user message, and the
    history keeps the system turn (a `/reset` keeps it)."""
    from posttrain.rollout import generate as gen
    from posttrain.rollout.sampling import SamplingSettings

    model = Says(_ids(tok, "ok") + [tok.convert_tokens_to_ids("<|im_end|>")], len(tok))
    lines = iter(["Hi", "/reset", "Again", "/exit"])
    asked, written = [], []
    real = gen.generate

    def spy(model, tokenizer, prompts, settings, **kw):
        asked.extend(prompts)
        return real(model, tokenizer, prompts, settings, **kw)

    monkeypatch.setattr(gen, "generate", spy)
    history = gen.chat_session(model, tok, GEMMA_LIKE, SamplingSettings(max_new_tokens=3, temperature=0.0),
                               read=lambda _: next(lines), write=written.append, system="Be brief.")
    assert asked == ["<|im_start|>user\nBe brief.\n\nHi<|im_end|>\n<|im_start|>assistant\n",
                     "<|im_start|>user\nBe brief.\n\nAgain<|im_end|>\n<|im_start|>assistant\n"], asked
    assert written == ["ok", "ok"]
    assert history[0] == {"role": "system", "content": "Be brief."}
    assert capsys.readouterr().err.count("no system role") == 1


def test_chat_refuses_a_message_the_template_refuses_in_one_line_and_goes_on(tok):
    from posttrain.rollout.generate import chat_session
    from posttrain.rollout.sampling import SamplingSettings

    picky = ("{%- if messages[-1]['content'] == 'bad' %}{{- raise_exception('no such word') }}{%- endif %}" + CHATML)
    model = Says(_ids(tok, "ok") + [tok.convert_tokens_to_ids("<|im_end|>")], len(tok))
    lines = iter(["bad", "good", "/exit"])
    written = []
    history = chat_session(model, tok, picky, SamplingSettings(max_new_tokens=3, temperature=0.0),
                           read=lambda _: next(lines), write=written.append)
    assert len(written) == 2 and written[0].startswith("[chat: the chat template failed") and "no such word" in \
        written[0] and "\n" not in written[0] and written[1] == "ok"
    assert [m["content"] for m in history] == ["good", "ok"]
