"""Generation, stop 34 (backlog items): the model's generation_config.json supplies the sampling
settings the user did not give (user > model's generation_config > posttrain's defaults, as
transformers' `generate` reads them, and said on stderr); a stop string that starts with a special
token ('<|im_start|>user') ends a row and is cut from the text; with no chat template
(`--template none`, raw prompts) no template's end-of-turn marker is implied; the vLLM engine's
SamplingParams carry the same stop ids as the transformers path, from one pure builder; min-p
sampling (Nguyen et al. 2024)."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GenerationConfig

from posttrain import cli, inference
from posttrain.models.presets import build_tokenizer
from posttrain.rollout import generate as gen
from posttrain.rollout.engines import VLLMEngine, vllm_sampling_kwargs
from posttrain.rollout.generate import (
    _make_stop_check,
    completion_text,
    eos_token_ids,
    generate,
    stop_strings,
)
from posttrain.rollout.sampling import SamplingSettings, apply_min_p, generation_config_settings, sample_next
from tests import test_rollout_engines
from tests.test_s33r2_generation import Says


tiny, fake_vllm = test_rollout_engines.tiny, test_rollout_engines.fake_vllm  # fixtures: the tiny preset, a fake vllm


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --------------------------------------------------------------------------- item 1: generation_config


def test_generation_config_settings_are_read_as_transformers_reads_them():
    """Only what the file sets; its temperature only when it samples (do_sample), 1.0 when it samples
    without naming one; greedy (do_sample unset or false) leaves posttrain's default (greedy)."""
    sampled = GenerationConfig(do_sample=True, temperature=0.3, top_k=7, top_p=0.9, repetition_penalty=1.1)
    assert generation_config_settings(sampled) == {"temperature": 0.3, "top_k": 7, "top_p": 0.9,
                                                   "repetition_penalty": 1.1}
    assert generation_config_settings(GenerationConfig(do_sample=True)) == {"temperature": 1.0}
    assert generation_config_settings(GenerationConfig(temperature=0.3, top_p=0.5)) == {"top_p": 0.5}
    assert generation_config_settings(GenerationConfig(do_sample=True, min_p=0.05)) == {"temperature": 1.0,
                                                                                         "min_p": 0.05}
    assert generation_config_settings(None) == {}


@pytest.fixture(scope="module")
def gc_model(tmp_path_factory):
    """The tiny preset saved with a sampling generation_config (temperature 0.3, top_k 7, top_p 0.9)."""
    from posttrain.models.loading import save_model

    model, tokenizer = inference.load_for_inference("tiny")
    model.generation_config.do_sample = True
    model.generation_config.temperature = 0.3
    model.generation_config.top_k = 7
    model.generation_config.top_p = 0.9
    out = tmp_path_factory.mktemp("gc") / "model"
    save_model(model, tokenizer, out)
    return out


def _generate_args(model, prompts, output, *flags):
    return cli.build_parser().parse_args(["generate", "--model", str(model), "--prompts", str(prompts),
                                          "--output", str(output), "--max-new-tokens", "2", *flags])


def _settings_used(monkeypatch, args) -> SamplingSettings:
    used = []
    real = gen.generate

    def spy(model, tokenizer, texts, settings, **kwargs):
        used.append(settings)
        return real(model, tokenizer, texts, settings, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    assert inference.main(args) == 0
    return used[0]


def _unset(args, *names):
    """`args` as the parser gives them when these sampling flags are not on the command line (None)."""
    for name in names:
        setattr(args, name, None)
    return args


SAMPLING_FLAGS = ("temperature", "top_k", "top_p", "repetition_penalty")


def test_generate_takes_what_the_user_did_not_set_from_the_models_generation_config(gc_model, tmp_path,
                                                                                     monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    args = _unset(_generate_args(gc_model, prompts, tmp_path / "o.jsonl"), *SAMPLING_FLAGS)
    used = _settings_used(monkeypatch, args)
    assert (used.temperature, used.top_k, used.top_p, used.repetition_penalty) == (0.3, 7, 0.9, 1.0), used
    err = capsys.readouterr().err
    assert "generation_config" in err and "temperature 0.3" in err and "top_k 7" in err, err


def test_a_flag_given_beats_the_models_generation_config(gc_model, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    args = _unset(_generate_args(gc_model, prompts, tmp_path / "o.jsonl", "--temperature", "0", "--top-k", "3"),
                  "top_p", "repetition_penalty")
    used = _settings_used(monkeypatch, args)
    assert (used.temperature, used.top_k, used.top_p) == (0.0, 3, 0.9), used


def test_a_model_without_sampling_settings_keeps_posttrains_defaults(tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    args = _unset(_generate_args("tiny", prompts, tmp_path / "o.jsonl"), *SAMPLING_FLAGS)
    used = _settings_used(monkeypatch, args)
    assert (used.temperature, used.top_k, used.top_p, used.repetition_penalty) == (0.0, 0, 1.0, 1.0), used
    assert "generation_config" not in capsys.readouterr().err


def test_a_bad_value_in_generation_config_is_a_one_line_error(tmp_path, monkeypatch):
    from posttrain.errors import UserError

    model = Says(None, 8)
    model.generation_config = GenerationConfig(do_sample=True, top_p=0.0)
    with pytest.raises(UserError, match="generation_config.*top_p"):
        inference.with_model_defaults(SamplingSettings(), set(), model)


def test_the_cli_leaves_unset_sampling_flags_to_the_model(gc_model, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    used = _settings_used(monkeypatch, _generate_args(gc_model, prompts, tmp_path / "o.jsonl"))
    assert (used.temperature, used.top_k) == (0.3, 7), used


# --------------------------------------------------------------------------- item 2: special-led stop strings


def test_a_stop_string_starting_with_a_special_token_ends_the_row_and_is_cut(tok):
    start = tok.convert_tokens_to_ids("<|im_start|>")
    ids = _ids(tok, "hello there") + [start] + _ids(tok, "user\nmore")
    stop = ["<|im_start|>user"]
    check = _make_stop_check(tok, stop)
    fired = [k for k in range(1, len(ids) + 1) if check(ids[:k])]
    assert fired and fired[0] == len(_ids(tok, "hello there")) + 1 + len(_ids(tok, "user")), fired
    assert completion_text(tok, ids, stop) == "hello there"
    # the special token alone, or followed by another role, is not this stop string
    other = _ids(tok, "hi") + [start] + _ids(tok, "assistant\nok")
    assert not any(check(other[:k]) for k in range(1, len(other) + 1))
    assert completion_text(tok, other, stop) == tok.decode(other, skip_special_tokens=True)


def test_generate_ends_at_a_special_led_stop_string(tok):
    start = tok.convert_tokens_to_ids("<|im_start|>")
    script = _ids(tok, "Hello") + [start] + _ids(tok, "user\nmore") + _ids(tok, " words") * 10
    model = Says(script, len(tok))
    settings = SamplingSettings(max_new_tokens=20, temperature=0.0, stop=["<|im_start|>user"])
    assert generate(model, tok, ["a"], settings, raw=True) == ["Hello"]


def test_a_special_led_stop_is_one_rule_with_the_stop_ids(tok):
    """The check's ids are `stop_token_ids`' (a stop that is one special token); a special-led stop
    string asks for special tokens' text where the check decodes."""
    start = tok.convert_tokens_to_ids("<|im_start|>")
    check = _make_stop_check(tok, ["<|im_start|>", "\n\n"])
    assert check.token_ids == {start} and not check.special_text
    assert _make_stop_check(tok, ["<|im_start|>user"]).special_text


# --------------------------------------------------------------------------- item 3: no template


def test_no_template_implies_no_end_of_turn_marker():
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"  # EOS apart from ChatML's <|im_end|>
    end, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    model = Says(None, len(tokenizer))
    assert eos_token_ids(model, tokenizer, None) == {end, im_end}  # the tokenizer's own template: its marker
    assert eos_token_ids(model, tokenizer, raw=True) == {end}
    assert stop_strings(tokenizer, ["x"], raw=True) == ["x"]


def test_generate_with_raw_prompts_runs_past_the_template_marker():
    tokenizer = build_tokenizer()
    tokenizer.eos_token = "<|endoftext|>"
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    script = _ids(tokenizer, "Hi") + [im_end] + _ids(tokenizer, "more") + [tokenizer.eos_token_id]
    model = Says(script, len(tokenizer))
    settings = SamplingSettings(max_new_tokens=20, temperature=0.0)
    assert generate(model, tokenizer, ["a"], settings, raw=True) == ["Himore"]
    assert generate(model, tokenizer, ["a"], settings) == ["Hi"]  # under the tokenizer's template: its marker


# --------------------------------------------------------------------------- item 4: vLLM's parameters


def test_vllm_parameters_carry_the_transformers_paths_stop_ids(tok):
    start = tok.convert_tokens_to_ids("<|im_start|>")
    settings = SamplingSettings(max_new_tokens=5, temperature=0.7, top_k=0, stop=["<|im_start|>", "\n\n"], seed=3)
    check = _make_stop_check(tok, settings.stop)
    kwargs = vllm_sampling_kwargs(settings, {2}, check, 4)
    assert kwargs["stop_token_ids"] == sorted({2, start})
    assert kwargs["stop"] == ["<|im_start|>", "\n\n"] and kwargs["top_k"] == -1 and kwargs["max_tokens"] == 5
    assert kwargs["skip_special_tokens"] is True
    special = vllm_sampling_kwargs(replace_stop(settings, ["<|im_start|>user"]), {2},
                                   _make_stop_check(tok, ["<|im_start|>user"]), 0)
    assert special["skip_special_tokens"] is False  # vLLM looks for the stop in text that keeps '<|im_start|>'
    assert vllm_sampling_kwargs(settings, {2}, None, 0)["stop_token_ids"] == [2]


def replace_stop(settings, stop):
    from dataclasses import replace

    return replace(settings, stop=stop)


# --------------------------------------------------------------------------- item 5: min-p


def test_min_p_keeps_tokens_at_least_p_times_the_top_probability():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64))
    kept = apply_min_p(logits, 0.2)  # threshold 0.2 * 0.5 = 0.1
    assert torch.isfinite(kept).tolist() == [[True, True, True, False]]
    assert torch.equal(kept[:, :3], logits[:, :3])
    assert torch.equal(apply_min_p(logits, 0.0), logits)
    probs = torch.softmax(apply_min_p(logits, 0.2), dim=-1)
    assert math.isclose(float(probs[0, 0]), 0.5 / 0.95, rel_tol=1e-12)


def test_min_p_is_checked_and_sampled_after_temperature():
    with pytest.raises(ValueError, match="min_p"):
        SamplingSettings(min_p=1.5)
    # at T = 0.5 the second token's probability falls under 0.6 of the first's: min-p after temperature
    logits = torch.log(torch.tensor([[0.6, 0.4]], dtype=torch.float64))
    draws = {int(sample_next(logits, 0.5, min_p=0.6, generator=torch.Generator().manual_seed(s))[0])
             for s in range(20)}
    assert draws == {0}
    draws = {int(sample_next(logits, 1.0, min_p=0.6, generator=torch.Generator().manual_seed(s))[0])
             for s in range(40)}
    assert draws == {0, 1}


def test_the_vllm_engine_ends_at_a_special_led_stop_where_the_transformers_engine_does(tiny, fake_vllm):
    """The fake vLLM looks for stop strings in text decoded as SamplingParams.skip_special_tokens says."""
    tokenizer = tiny[0]
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    stream = _ids(tokenizer, "hi there") + [start] + _ids(tokenizer, "user\nmore words")
    fake_vllm.LLM.script = lambda prompt, params, index: iter(stream)
    engine = VLLMEngine(str(tiny[2]), tiny[1])
    stop = ["<|im_start|>user"]
    check = _make_stop_check(tokenizer, stop)
    settings = SamplingSettings(max_new_tokens=len(stream), stop=stop, seed=0)
    out = engine.generate([[1, 5]], settings, eos_token_ids={2}, pad_token_id=3, stop_check=check)[0]
    assert out == stream[: len(_ids(tokenizer, "hi there")) + 1 + len(_ids(tokenizer, "user"))], out
    assert completion_text(tokenizer, out, stop) == "hi there"
