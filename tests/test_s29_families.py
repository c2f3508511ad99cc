"""Model families beyond the walk's (tests/test_walkthrough_families.py pins the CLI runs): dropout that
a family applies through float attributes or its config, ALiBi families and block masks, bottleneck
adapters' attention outputs, prefix tuning's key/value heads, and IA3's targets where peft has no
default. Tiny random models (hidden 32, 2 layers) built in memory from transformers configs."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.errors import ConfigError

# name -> (model_type, config)
_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 256}
_FALCON = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4}
FAMILIES = {
    "falcon": ("falcon", _FALCON),  # Falcon-7B: multi-query
    "falcon_new": ("falcon", {**_FALCON, "new_decoder_architecture": True, "num_kv_heads": 2}),  # Falcon-40B
    "falcon_alibi": ("falcon", {**_FALCON, "alibi": True}),  # Falcon-RW
    "bloom": ("bloom", {"hidden_size": 32, "n_layer": 2, "n_head": 4}),
    "mpt": ("mpt", {"d_model": 32, "n_layers": 2, "n_heads": 4, "max_seq_len": 256}),
    "gptj": ("gptj", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 4}),
    "codegen": ("codegen", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 4}),
    "phi": ("phi", {**_LLAMA_LIKE, "num_key_value_heads": 4}),
    "persimmon": ("persimmon", {**_LLAMA_LIKE, "num_key_value_heads": 4}),
    "gpt_neo": ("gpt_neo", {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "max_position_embeddings": 256,
                            "attention_types": [[["global", "local"], 1]], "window_size": 256}),
    "opt": ("opt", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "word_embed_proj_dim": 32, "max_position_embeddings": 256}),
    "xglm": ("xglm", {"d_model": 32, "ffn_dim": 64, "num_layers": 2, "attention_heads": 4,
                      "max_position_embeddings": 256}),
    "gpt2": ("gpt2", {"n_embd": 32, "n_layer": 2, "n_head": 4, "n_positions": 256}),
    "olmo2": ("olmo2", _LLAMA_LIKE),
    "phi3": ("phi3", _LLAMA_LIKE),
    "starcoder2": ("starcoder2", _LLAMA_LIKE),
}
IDS_OF = {"vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 2}
IDS = torch.tensor([[5, 17, 33, 60, 2, 11, 9, 40], [3, 8, 21, 50, 13, 1, 7, 30]])


def tiny(name: str, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    kind, settings = FAMILIES[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **IDS_OF, **{**settings, **overrides}))
    return model.eval()  # OPT and GPT-2 ship dropout on


# --------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("name, rates", [
    ("opt", {"dropout": 0.5, "attention_dropout": 0.5, "activation_dropout": 0.5}),  # float attributes
    ("xglm", {"dropout": 0.5, "attention_dropout": 0.5, "activation_dropout": 0.5}),
    ("falcon", {"hidden_dropout": 0.5, "attention_dropout": 0.5}),  # read from the config in forward
    ("gpt_neo", {"resid_dropout": 0.5, "embed_dropout": 0.5, "attention_dropout": 0.5}),  # the config, again
    ("gptj", {"resid_pdrop": 0.5, "embd_pdrop": 0.5, "attn_pdrop": 0.5}),  # attention_dropout, a float
    ("phi", {"resid_pdrop": 0.5, "embd_pdrop": 0.5, "attention_dropout": 0.5}),
    ("bloom", {"hidden_dropout": 0.5, "attention_dropout": 0.5}),
    ("codegen", {"resid_pdrop": 0.5, "embd_pdrop": 0.5, "attn_pdrop": 0.5}),
])
def test_disable_dropout_makes_train_mode_equal_eval_mode_and_saves_the_checkpoints_rates(tmp_path, name, rates):
    """With every rate at 0.5, train mode is noisy; after `disable_dropout` it equals eval mode, and a
    saved full model's config still carries the checkpoint's rates."""
    from posttrain.models.loading import disable_dropout, save_model

    model = tiny(name, **rates)
    with torch.no_grad():
        expected = model.eval()(input_ids=IDS).logits
        model.train()
        assert not torch.allclose(model(input_ids=IDS).logits, expected)
        notes = []
        disable_dropout(model, notes.append, "test")
        assert torch.allclose(model(input_ids=IDS).logits, expected, atol=1e-6)
    assert len(notes) == 1 and notes[0].startswith("note: dropout switched off in ")
    save_model(model, None, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert {key: saved[key] for key in rates} == rates
    assert all(getattr(model.config, key) == 0 for key in rates)  # and it trains on without them


def test_disable_dropout_twice_and_on_a_copy_keeps_the_checkpoints_rates(tmp_path):
    """GRPO's frozen reference is a deepcopy of the policy after `disable_dropout`; a second call
    finds nothing on and must not forget the rates the first put aside."""
    import copy

    from posttrain.models.loading import disable_dropout, save_model

    model = tiny("falcon", hidden_dropout=0.3)
    disable_dropout(model, lambda _: None, "test")
    notes = []
    disable_dropout(model, notes.append, "test")
    assert notes == []
    for saved, out in ((model, tmp_path / "a"), (copy.deepcopy(model), tmp_path / "b")):
        save_model(saved, None, out)
        assert json.loads((out / "config.json").read_text())["hidden_dropout"] == 0.3
    assert model.config.hidden_dropout == 0.0


def test_disable_dropout_is_silent_where_nothing_was_on():
    from posttrain.models.loading import disable_dropout

    notes = []
    disable_dropout(tiny("olmo2"), notes.append, "test")
    assert notes == []


# --------------------------------------------------------------------------- ALiBi and block masks


@pytest.mark.parametrize("name", ["falcon_alibi", "bloom", "mpt"])
def test_alibi_families_take_no_block_mask_even_with_sdpa(name):
    """Shared-prompt rows hand the model a 4-D mask; ALiBi builds its biases from a 2-D one (Falcon's
    `build_alibi_tensor` raised ValueError). Bloom and MPT load with eager attention today, which is
    refused already; with sdpa they would still be, for ALiBi."""
    from posttrain.models.attention import block_masks_allowed, uses_alibi

    model = tiny(name)
    model.config._attn_implementation = "sdpa"
    notes = []
    assert uses_alibi(model.config) and not block_masks_allowed(model, "dpo.share_prompt", notes.append)
    assert notes == ["note: dpo.share_prompt is off: the model's ALiBi position biases are built from a 2-D "
                     "padding mask, not a block mask; each response gets its own row"]


@pytest.mark.parametrize("name", ["falcon", "gptj", "phi", "olmo2"])
def test_rotary_families_with_sdpa_take_block_masks(name):
    from posttrain.models.attention import block_masks_allowed, uses_alibi

    model = tiny(name)
    assert model.config._attn_implementation == "sdpa"
    assert not uses_alibi(model.config) and block_masks_allowed(model, "dpo.share_prompt")


# --------------------------------------------------------------------------- bottleneck adapters


@pytest.mark.parametrize("name, attention, ffn", [
    ("falcon", "self_attention.dense", "mlp"), ("bloom", "self_attention.dense", "mlp"),
    ("gptj", "attn.out_proj", "mlp"), ("codegen", "attn.out_proj", "mlp"), ("phi", "self_attn.dense", "mlp"),
    ("persimmon", "self_attn.dense", "mlp"), ("mpt", "attn.out_proj", "ffn"),
    ("gpt_neo", "attn.attention.out_proj", "mlp"), ("opt", "self_attn.out_proj", "fc2"),
    ("gpt2", "attn.c_proj", "mlp"), ("starcoder2", "self_attn.o_proj", "mlp"),
])
def test_bottleneck_defaults_find_one_attention_output_and_one_ffn_per_layer(name, attention, ffn):
    """The attention pattern takes each layer's output projection and nothing else (not a q/k/v
    projection, not an MLP layer); with the adapters' up projections moved, the model's output moves
    and its shapes hold."""
    from posttrain.models.adapters.bottleneck import BottleneckSet, bottleneck_targets

    model = tiny(name)
    for where, suffix in (("attention", attention), ("ffn", ffn)):
        targets = bottleneck_targets(model, [where])
        assert len(targets) == 2 and all(t.endswith("." + suffix) for t in targets), targets
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        adapters = BottleneckSet(model.config.hidden_size, bottleneck_targets(model, ["attention", "ffn"]), 4,
                                 "relu", 1e-1)
        adapters.attach(model)
        assert torch.equal(model(input_ids=IDS).logits, base)  # up starts at zero
        for adapter in adapters.adapters.values():
            adapter.up.weight.normal_()
        assert not torch.allclose(model(input_ids=IDS).logits, base)


# --------------------------------------------------------------------------- prefix tuning


@pytest.mark.parametrize("name, heads", [("falcon", 1), ("falcon_new", 4), ("mpt", 4), ("bloom", 4)])
def test_prefix_tuning_sizes_its_keys_and_values_as_the_model_caches_them(name, heads):
    """Falcon-7B's multi-query attention caches one key/value head (peft assumed 4 and the KV cache
    refused the concatenation); Falcon-40B's layout broadcasts its 2 to all 4; MPT names its heads
    `n_heads`, which peft did not find. The prefix trains: the loss has a gradient on it."""
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters

    model = apply_adapters(tiny(name), AdapterConfig(method=["prefix"]))
    config = model.virtual_peft.peft_config["default"]
    assert config.num_attention_heads == heads and config.token_dim == heads * 8
    loss = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), labels=IDS).loss
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


# --------------------------------------------------------------------------- IA3 targets


@pytest.mark.parametrize("name, targets, feedforward", [
    ("olmo2", ["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    ("phi3", ["qkv_proj", "down_proj"], ["down_proj"]),  # fused: q is scaled too
    ("starcoder2", ["k_proj", "v_proj", "mlp.c_proj"], ["mlp.c_proj"]),
    ("mpt", ["Wqkv", "down_proj"], ["down_proj"]),
    ("persimmon", ["query_key_value", "dense_4h_to_h"], ["dense_4h_to_h"]),
])
def test_ia3_without_a_peft_default_targets_keys_values_and_the_ffn_down_projection(name, targets, feedforward):
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters

    model = apply_adapters(tiny(name), AdapterConfig(method=["ia3"]))
    config = model.weight_peft.peft_config["default"]
    assert sorted(config.target_modules) == sorted(targets) and sorted(config.feedforward_modules) == feedforward
    assert model(input_ids=IDS).logits.shape == (2, 8, 64)


def test_ia3_with_peft_default_is_peft_default():
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters

    model = apply_adapters(tiny("falcon"), AdapterConfig(method=["ia3"]))
    config = model.weight_peft.peft_config["default"]
    assert sorted(config.target_modules) == ["dense_4h_to_h", "query_key_value"]


def test_ia3_targets_named_without_feedforward_on_a_type_peft_does_not_know():
    """peft asks for feedforward_modules when it has no default (a ValueError traceback before): the
    named targets that are an FFN down projection are taken."""
    from posttrain.config import AdapterConfig, IA3Config
    from posttrain.models.adapters import apply_adapters

    cfg = AdapterConfig(method=["ia3"], ia3=IA3Config(target_modules=["k_proj", "v_proj", "down_proj"]))
    config = apply_adapters(tiny("olmo2"), cfg).weight_peft.peft_config["default"]
    assert sorted(config.feedforward_modules) == ["down_proj"]


def test_ia3_without_a_default_or_recognisable_names_is_refused_in_one_line():
    from posttrain.config import AdapterConfig
    from posttrain.models.adapters import apply_adapters

    model = tiny("olmo2")
    for layer in model.model.layers:  # an FFN whose output projection has a name we do not know
        layer.mlp.add_module("out_linear", layer.mlp.down_proj)
        del layer.mlp.down_proj
    with pytest.raises(ConfigError) as info:
        apply_adapters(model, AdapterConfig(method=["ia3"]))
    text = str(info.value)
    assert "\n" not in text and "'olmo2'" in text and "adapter.ia3.target_modules" in text and "out_linear" in text
