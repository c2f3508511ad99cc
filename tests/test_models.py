"""Presets, tokenizer, loading, the hidden-state path and saving — checked against
transformers and peft themselves. Adapters: test_adapters.py."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from posttrain.config import AdapterConfig, ModelConfig
from posttrain.errors import ConfigError, UserError
from posttrain.models import presets
from posttrain.models.adapters import apply_adapters, count_parameters
from posttrain.models.loading import (
    HiddenPathUnsupported,
    final_hidden_and_head,
    load_model,
    load_tokenizer,
    save_model,
    supports_hidden_path,
)


@pytest.fixture(scope="module", autouse=True)
def preset_cache(tmp_path_factory):
    """A private preset cache, so these tests exercise the build and touch no home directory."""
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("preset-cache")
        mp.setenv("POSTTRAIN_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="module")
def tokenizer(preset_cache):
    return load_tokenizer("tiny-2l")


@pytest.fixture
def batch(tokenizer):
    return tokenizer(["Reverse: q m t", "Hello there, how are you today?"], return_tensors="pt", padding=True)


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- presets and tokenizer


def test_preset_build_is_bitwise_reproducible(tmp_path):
    presets.build_preset("tiny-2l", tmp_path / "first")
    presets.build_preset("tiny-2l", tmp_path / "second")
    first, second = _digest(tmp_path / "first"), _digest(tmp_path / "second")
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(first)
    assert first == second


def test_tokenizer_training_is_identical_in_another_process():
    # Rust hash maps are seeded per process, so an in-process rebuild would not catch order effects
    code = "from posttrain.models.presets import train_bpe; print(train_bpe().to_str())"
    other = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert other.strip() == presets.train_bpe().to_str()


def test_preset_path_builds_once_and_survives_a_race(preset_cache):
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(presets.preset_path("tiny-2l"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1
    directory = results[0]
    assert directory.parent == preset_cache / "presets"
    assert (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left
    assert presets.preset_path("tiny-2l") == directory


def test_preset_shapes_and_parameter_counts():
    tiny = load_model("tiny")
    assert tiny.config.hidden_size == 128 and tiny.config.num_hidden_layers == 4
    assert tiny.config.num_attention_heads == 4 and tiny.config.max_position_embeddings == 1024
    assert tiny.config.tie_word_embeddings
    assert tiny.get_output_embeddings().weight is tiny.get_input_embeddings().weight
    assert count_parameters(tiny) == (922_752, 922_752)
    small = load_model("tiny-2l")
    assert small.config.hidden_size == 64 and small.config.num_hidden_layers == 2
    assert count_parameters(small)[1] == 164_672
    assert presets.is_preset("tiny") and not presets.is_preset("./tiny") and not presets.is_preset(None)


def test_unknown_preset_name_is_a_user_error():
    with pytest.raises(UserError, match="unknown preset 'huge'"):
        presets.preset_path("huge")


def test_letters_and_digits_are_single_tokens(tokenizer):
    for letter in "abcdefghijklmnopqrstuvwxyz":
        assert len(tokenizer.encode(" " + letter, add_special_tokens=False)) == 1, letter
        assert len(tokenizer.encode(letter, add_special_tokens=False)) == 1, letter
    for digit in "0123456789":
        assert len(tokenizer.encode(digit, add_special_tokens=False)) == 1, digit
    # so a spaced answer costs one token per letter
    assert len(tokenizer.encode("t m q", add_special_tokens=False)) == 3
    assert tokenizer.tokenize("Add: 23 + 48")[-2:] == ["4", "8"]


def test_tokenizer_specials_chat_template_and_reload(tokenizer, tmp_path):
    assert 1024 <= len(tokenizer) <= 2048
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|pad|>"
    ids = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>", "<|pad|>", "<|endoftext|>"])
    assert len(set(ids)) == 4 and all(i < len(tokenizer) for i in ids)
    messages = [{"role": "user", "content": "Copy: a b"}, {"role": "assistant", "content": "a b"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nCopy: a b<|im_end|>\n<|im_start|>assistant\na b<|im_end|>\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nCopy: a b<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer.encode("Hello, world 42!\n  x")) == "Hello, world 42!\n  x"

    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again.apply_chat_template(messages, tokenize=False) == text
    assert again.eos_token == "<|im_end|>" and again.pad_token == "<|pad|>"
    assert again.encode("Reverse: q m t") == tokenizer.encode("Reverse: q m t")


def test_generation_config_stops_at_end_of_turn(tokenizer):
    model = load_model("tiny-2l")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


# --------------------------------------------------------------------------- loading


def test_load_model_accepts_config_object_and_options():
    model = load_model(ModelConfig(path="tiny-2l", dtype="bfloat16", gradient_checkpointing=True))
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config.use_cache is False
    assert model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing") else model.is_gradient_checkpointing
    with pytest.raises(ConfigError, match="model.dtype"):
        load_model("tiny-2l", dtype="float8")


def test_missing_or_unusable_model_dirs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(UserError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(UserError, match="no model weights"):
        load_model(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(UserError, match="does not unpickle"):
        load_model(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_unknown_architecture_is_a_user_error(tmp_path):
    source = presets.preset_path("tiny-2l")
    for f in source.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "no-such-arch"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="trust_remote_code"):
        load_model(tmp_path)


def test_tokenizer_without_pad_falls_back_to_a_special_token_the_data_never_carries(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token == "<|im_end|>" and loaded.pad_token == "<|pad|>"  # not eos: see `pad_fallback`


def _family_config(family: str, vocab_size: int):
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    if family == "gemma2":
        return transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=30.0)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}
    return cls[family](**common, tie_word_embeddings=family == "qwen2")


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gpt2"])
def test_families_load_and_hidden_path_matches_logits(family, tokenizer, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(_family_config(family, len(tokenizer))).save_pretrained(tmp_path)
    model = load_model(str(tmp_path)).eval()
    assert supports_hidden_path(model)
    with torch.no_grad():
        hidden, weight, bias = final_hidden_and_head(model, **batch, labels=batch["input_ids"])
        logits = hidden @ weight.T + (bias if bias is not None else 0)
    assert hidden.shape == (*batch["input_ids"].shape, 64)
    plain_logits = _logits(model, batch)
    torch.testing.assert_close(logits, plain_logits, rtol=0, atol=1e-6)

    peft_model = apply_adapters(model, AdapterConfig(method=["lora"]))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    with torch.no_grad():
        hidden, weight, bias = final_hidden_and_head(peft_model, **batch)
        logits = hidden @ weight.T + (bias if bias is not None else 0)
    torch.testing.assert_close(logits, _logits(peft_model, batch), rtol=0, atol=1e-6)
    assert (logits - plain_logits).abs().max() > 1e-4  # the LoRA layers were on the path


def test_softcapped_logits_refuse_the_hidden_path(tokenizer, batch, tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_config(_family_config("gemma2", len(tokenizer))).save_pretrained(tmp_path)
    model = load_model(str(tmp_path))
    assert not supports_hidden_path(model)
    with pytest.raises(HiddenPathUnsupported, match="final_logit_softcapping"):
        final_hidden_and_head(model, **batch)


# --------------------------------------------------------------------------- saving


def test_full_model_save_reloads_with_identical_logits(tmp_path, batch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = load_model("tiny-2l").eval()
    with torch.no_grad():
        model.model.layers[0].mlp.down_proj.weight.add_(0.01)  # not just the preset weights again
    out = save_model(model, load_tokenizer("tiny-2l"), tmp_path / "full")
    assert (out / "model.safetensors").is_file() and not list(out.glob("*.bin"))
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(model, batch), rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(out).eos_token == "<|im_end|>"
    assert load_model(str(out)).config.vocab_size == model.config.vocab_size
