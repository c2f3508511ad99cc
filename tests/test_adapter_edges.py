"""Review of the parameter-efficient methods against independent computations: plain peft /
transformers on the same weights, and formulas written out here."""

from __future__ import annotations

import argparse
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from posttrain.config import AdapterConfig
from posttrain.errors import ConfigError
from posttrain.models.adapters import (
    apply_adapters,
    combine_adapters,
    load_adapted,
    merged_weights,
    parameter_report,
)
from posttrain.models.loading import load_model, load_tokenizer, save_model

PRESET = "tiny-2l"  # hidden 64, 2 layers, FFN 172
HIDDEN, LAYERS, FFN = 64, 2, 172


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer(PRESET)
    return tokenizer(["Reverse: q m t", "Hello there, how are you today?"], return_tensors="pt", padding=True)


def _cfg(method, **sections) -> AdapterConfig:
    cfg = AdapterConfig(method=list(method) if isinstance(method, (list, tuple)) else [method])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _nudge(model, seed=3, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _adapted(method, seed=3, **sections):
    return _nudge(apply_adapters(load_model(PRESET), _cfg(method, **sections)), seed)


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def _base_logits(batch):
    return _logits(load_model(PRESET).eval(), batch)


# --------------------------------------------------------------------------- targets


def test_regex_target_adapts_exactly_the_matching_modules():
    model = apply_adapters(load_model(PRESET), _cfg("lora", lora={"target_modules": [r"re:.*layers\.1\.self_attn\.(q|v)_proj"]}))
    adapted = {re.sub(r"^.*model\.layers", "layers", n).rsplit(".lora_A", 1)[0]
               for n, _ in model.named_parameters() if "lora_A" in n}
    assert adapted == {"layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj"}


@pytest.mark.parametrize("targets", [["nope_proj"], ["re:.*nothing_here"]], ids=["name", "regex"])
def test_targets_matching_nothing_stop_with_the_linear_names(targets):
    with pytest.raises(ConfigError, match="q_proj"):
        apply_adapters(load_model(PRESET), _cfg("lora", lora={"target_modules": targets}))


def test_a_target_name_that_matches_nothing_stops_even_next_to_a_valid_one():
    # README: "Target names that match nothing stop the run with the model's linear layer names."
    with pytest.raises(ConfigError):
        apply_adapters(load_model(PRESET), _cfg("lora", lora={"target_modules": ["q_proj", "v_porj"]}))


def test_ia3_empty_feedforward_modules_means_the_default():
    # sections.py: feedforward_modules "empty = default"; peft's default for llama is down_proj,
    # which IA3 rescales on its input (a vector of FFN entries), the others on their output.
    model = apply_adapters(load_model(PRESET), _cfg("ia3", ia3={"target_modules": ["k_proj", "v_proj", "down_proj"]}))
    shapes = {n.split(".")[-3]: tuple(p.shape) for n, p in model.named_parameters() if "ia3_l" in n and ".layers.0." in n}
    assert shapes == {"k_proj": (HIDDEN, 1), "v_proj": (HIDDEN, 1), "down_proj": (1, FFN)}


def test_ia3_feedforward_outside_targets_is_a_config_error():
    with pytest.raises(ConfigError):
        apply_adapters(load_model(PRESET), _cfg("ia3", ia3={"target_modules": ["k_proj"], "feedforward_modules": ["down_proj"]}))


# --------------------------------------------------------------------------- LoRA math


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_layer_output_by_hand(rslora):
    r, alpha = 4, 8.0
    model = _adapted("lora", lora={"r": r, "alpha": alpha, "rslora": rslora, "target_modules": ["q_proj"]})
    layer = model.lm.model.layers[0].self_attn.q_proj
    W = layer.base_layer.weight.detach()
    A, B = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    x = torch.randn(3, 5, HIDDEN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = layer(x)
    expected = x @ W.T + scale * (x @ A.T @ B.T)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # scale 4 (rsLoRA) vs 2 (plain) must differ visibly from the other choice
    other = alpha / r if rslora else alpha / math.sqrt(r)
    assert (got - (x @ W.T + other * (x @ A.T @ B.T))).abs().max() > 1e-3


# --------------------------------------------------------------------------- bottleneck math


def _hand_bottleneck_hooks(lm, tensors: dict, activation):
    """Hooks on a plain model applying h + W_up act(W_down h + b_down) + b_up after each target."""
    targets = sorted({k.rsplit(".", 2)[0] for k in tensors})
    modules = dict(lm.named_modules())
    for t in targets:
        wd, bd = tensors[f"{t}.down.weight"], tensors[f"{t}.down.bias"]
        wu, bu = tensors[f"{t}.up.weight"], tensors[f"{t}.up.bias"]

        def hook(module, args, out, wd=wd, bd=bd, wu=wu, bu=bu):
            return out + activation(out @ wd.T + bd) @ wu.T + bu

        modules[t].register_forward_hook(hook)
    return targets


def test_bottleneck_forward_by_hand(batch):
    model = _adapted("bottleneck", bottleneck={"size": 8, "activation": "gelu", "where": ["attention", "ffn"]})
    tensors = model.bottlenecks.state()
    plain = load_model(PRESET).eval()
    targets = _hand_bottleneck_hooks(plain, tensors, F.gelu)
    assert targets == sorted([f"model.layers.{i}.{m}" for i in range(LAYERS) for m in ("mlp", "self_attn.o_proj")])
    assert tensors["model.layers.0.mlp.down.weight"].shape == (8, HIDDEN)
    torch.testing.assert_close(_logits(model, batch), _logits(plain, batch), rtol=0, atol=1e-5)
    assert (_logits(model, batch) - _base_logits(batch)).abs().max() > 1e-3


@pytest.mark.parametrize("init_std", [0.0, 1e-3])
def test_fresh_bottleneck_is_the_identity(init_std, batch):
    model = apply_adapters(load_model(PRESET), _cfg("bottleneck", bottleneck={"init_std": init_std})).eval()
    torch.testing.assert_close(_logits(model, batch), _base_logits(batch), rtol=0, atol=0)
    down = [p for n, p in model.named_parameters() if n.endswith("down.weight")]
    assert all(p.std().item() == pytest.approx(init_std, rel=0.3, abs=1e-12) for p in down)


# --------------------------------------------------------------------------- save / load


@pytest.mark.parametrize("method, sections", [
    ("lora", {"lora": {"r": 4, "alpha": 8.0, "rslora": True, "target_modules": [r"re:.*\.(q|o|down)_proj"]}}),
    ("dora", {"lora": {"r": 2, "target_modules": ["v_proj", "up_proj"]}}),
    ("ia3", {"ia3": {"target_modules": ["q_proj", "up_proj"], "feedforward_modules": ["up_proj"]}}),
    ("prefix", {"virtual_tokens": {"num_virtual_tokens": 3}}),
], ids=["rslora-regex", "dora-names", "ia3-custom", "prefix"])
def test_single_method_loads_in_plain_peft(method, sections, batch, tmp_path):
    from peft import PeftModel

    model = _adapted(method, **sections)
    out = save_model(model, load_tokenizer(PRESET), tmp_path / "a")
    reloaded = PeftModel.from_pretrained(load_model(PRESET), out).eval()
    length = batch["input_ids"].shape[1]
    ours = _logits(model, batch)
    torch.testing.assert_close(_logits(reloaded, batch)[:, -length:], ours, rtol=0, atol=1e-6)
    assert (ours - _base_logits(batch)).abs().max() > 1e-3


def test_mix_round_trip_and_independent_reconstruction(batch, tmp_path):
    """lora (on o_proj too) + bottleneck after attention and FFN + prompt: reload gives identical
    logits, and plain peft LoRA + hand bottleneck hooks + a hand-prepended soft prompt agree."""
    from peft import PeftModel
    from safetensors.torch import load_file

    model = _adapted(["lora", "bottleneck", "prompt"],
                     lora={"r": 4, "target_modules": ["q_proj", "o_proj"]},
                     bottleneck={"size": 6, "activation": "tanh"}, virtual_tokens={"num_virtual_tokens": 3})
    ours = _logits(model, batch)
    out = save_model(model, load_tokenizer(PRESET), tmp_path / "mix")
    manifest = json.loads((out / "posttrain_adapters.json").read_text())
    assert sorted(manifest["components"]) == ["bottleneck", "lora", "prompt"]
    torch.testing.assert_close(_logits(load_adapted(out).eval(), batch), ours, rtol=0, atol=0)

    plain = PeftModel.from_pretrained(load_model(PRESET), out / "lora").eval()
    _hand_bottleneck_hooks(plain.base_model.model, load_file(str(out / "bottleneck" / "bottleneck.safetensors")), torch.tanh)
    prompt = load_file(str(out / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert prompt.shape == (3, HIDDEN)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        embeds = plain.base_model.model.get_input_embeddings()(ids)
        embeds = torch.cat([prompt.expand(ids.shape[0], -1, -1), embeds], dim=1)
        mask = torch.cat([torch.ones(ids.shape[0], 3, dtype=mask.dtype), mask], dim=1)
        hand = plain.base_model.model(inputs_embeds=embeds, attention_mask=mask).logits[:, 3:]
    torch.testing.assert_close(ours, hand, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- disabled adapters


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prompt", "prefix", "bottleneck",
                                    ["dora", "bottleneck", "prefix"], ["ia3", "prompt", "bottleneck"]], ids=str)
def test_adapters_disabled_is_the_base_and_reenables_after_an_exception(method, batch):
    base = _base_logits(batch)
    model = _adapted(method)
    adapted = _logits(model, batch)
    assert (adapted - base).abs().max() > 1e-3
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    with pytest.raises(RuntimeError, match="boom"):
        with model.adapters_disabled():
            torch.testing.assert_close(_logits(model, batch), base, rtol=0, atol=0)
            raise RuntimeError("boom")
    torch.testing.assert_close(_logits(model, batch), adapted, rtol=0, atol=0)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable


# --------------------------------------------------------------------------- merge


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_posttrain_merge_cli_equals_unmerged_plain_peft(method, batch, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from posttrain.inference import merge_main

    sections = {"lora": {"rslora": True, "r": 4}} if method != "ia3" else {}
    adapter = save_model(_adapted(method, **sections), load_tokenizer(PRESET), tmp_path / "adapter")
    merge_main(argparse.Namespace(adapter=str(adapter), output=str(tmp_path / "merged"), dtype="float32",
                                  trust_remote_code=False))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    keys = load_file(str(tmp_path / "merged" / "model.safetensors")).keys()
    assert not any("lora" in k or "ia3" in k or "base_layer" in k for k in keys)
    unmerged = PeftModel.from_pretrained(load_model(PRESET), adapter).eval()
    expected = _logits(unmerged, batch)
    assert (expected - _base_logits(batch)).abs().max() > 1e-3
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("method", ["lora", "ia3"])
def test_merged_weights_equal_plain_peft_merge_and_leave_the_model(method, batch):
    import copy

    model = _adapted(method)
    before = _logits(model, batch)
    expected = copy.deepcopy(model.weight_peft).merge_and_unload().state_dict()
    got = dict(merged_weights(model))
    assert set(got) <= set(expected) and set(expected) - set(got) <= {"lm_head.weight"}
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(_logits(model, batch), before, rtol=0, atol=0)


# --------------------------------------------------------------------------- LoRA+ and schedule


def test_lora_plus_one_adamw_step_by_hand(batch):
    from posttrain.config import TrainConfig
    from posttrain.models.adapters import plan_adapters
    from posttrain.models.adapters.schedule import AdapterTraining
    from posttrain.train.optim import make_optimizer

    ratio, lr, wd, eps = 4.0, 1e-2, 0.1, 1e-8
    cfg = _cfg("lora", lora={"r": 4, "lr_ratio_b": ratio, "target_modules": ["q_proj", "v_proj"]})
    model = _nudge(apply_adapters(load_model(PRESET), cfg)).train()
    training = AdapterTraining(model, plan_adapters(cfg), ratio, log=lambda _: None)
    optimizer = make_optimizer(model, TrainConfig(lr=lr, weight_decay=wd, adam_eps=eps), training.lr_scale)
    out = model(**batch)
    out.logits.float().pow(2).mean().backward()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert named and all("lora_" in n for n in named)
    before = {n: (p.detach().clone(), p.grad.detach().clone()) for n, p in named.items()}
    optimizer.step()
    for n, p in named.items():
        p0, g = before[n]
        rate = lr * (ratio if "lora_B" in n else 1.0)
        expected = p0 * (1 - rate * wd) - rate * g / (g.abs() + eps)  # first step: m̂ = g, v̂ = g²
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=n)


def test_staged_run_trains_only_the_named_methods(tmp_path):
    """lora + bottleneck + text-initialised prompt, schedule 0:bottleneck, 5:all, one step:
    lora B and the prompt stay exactly at their init, the bottleneck's up projection moves."""
    from safetensors.torch import load_file

    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    text = "Answer exactly."
    cfg = SFTConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "model": {"path": PRESET},
        "adapter": {"method": ["lora", "bottleneck", "prompt"], "schedule": ["0:bottleneck", "5:all"],
                    "virtual_tokens": {"num_virtual_tokens": 4, "init": "text", "init_text": text},
                    "lora": {"target_modules": ["q_proj"]}},
        "data": {"synthetic_size": 16, "max_length": 32},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-2, "schedule": "constant", "progress_bar": False}})
    final = run_sft(cfg) / "final"
    lora = load_file(str(final / "lora" / "adapter_model.safetensors"))
    assert all(t.abs().max() == 0 for k, t in lora.items() if "lora_B" in k)
    bottleneck = load_file(str(final / "bottleneck" / "bottleneck.safetensors"))
    assert max(t.abs().max() for k, t in bottleneck.items() if ".up." in k) > 0
    prompt = load_file(str(final / "prompt" / "adapter_model.safetensors"))["prompt_embeddings"]
    ids = load_tokenizer(PRESET)(text)["input_ids"]
    ids = (ids * 4)[:4]
    init = load_model(PRESET).get_input_embeddings().weight.detach()[ids]
    torch.testing.assert_close(prompt, init, rtol=0, atol=0)


# --------------------------------------------------------------------------- freeze tuning and report


def test_freeze_tuning_trains_exactly_the_top_layers_by_name():
    model = apply_adapters(load_model("tiny"), _cfg("freeze", freeze={"top_layers": 3}))
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if re.match(r"model\.layers\.[123]\.", n)}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert parameter_report(model)["trainable"] == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_report_counts_and_memory_by_hand():
    r, m, n_virtual = 4, 8, 3
    base_total = sum(p.numel() for p in load_model(PRESET).parameters())
    model = apply_adapters(load_model(PRESET), _cfg(
        ["lora", "bottleneck", "prompt"], lora={"r": r, "target_modules": ["q_proj", "down_proj"]},
        bottleneck={"size": m, "where": ["ffn"]}, virtual_tokens={"num_virtual_tokens": n_virtual}))
    lora = LAYERS * (r * (HIDDEN + HIDDEN) + r * (FFN + HIDDEN))
    bottleneck = LAYERS * (m * HIDDEN + m + HIDDEN * m + HIDDEN)
    prompt = n_virtual * HIDDEN
    trainable = lora + bottleneck + prompt
    report = parameter_report(model)
    assert report["by_method"]["lora"] == {"trainable": lora, "total": lora}
    assert report["by_method"]["bottleneck"] == {"trainable": bottleneck, "total": bottleneck}
    assert report["by_method"]["prompt"] == {"trainable": prompt, "total": prompt}
    assert report["by_method"]["base"] == {"trainable": 0, "total": base_total}
    assert (report["trainable"], report["total"]) == (trainable, base_total + trainable)
    assert report["by_module"]["down_proj"]["trainable"] == LAYERS * r * (FFN + HIDDEN)
    mib = 2**20
    memory = report["memory_mib"]
    assert memory["weights"] == pytest.approx((base_total + trainable) * 4 / mib)
    assert memory["gradients"] == pytest.approx(trainable * 4 / mib)
    assert memory["optimizer"] == pytest.approx(2 * trainable * 4 / mib)


# --------------------------------------------------------------------------- several adapters


def test_weighted_mix_of_equal_rank_loras_is_the_weighted_sum_of_updates(tmp_path):
    from safetensors.torch import load_file

    dirs, deltas = {}, {}
    for i, name in enumerate(["a", "b"]):
        model = _adapted("lora", seed=10 + i, lora={"r": 4, "alpha": 8.0, "target_modules": ["q_proj"]})
        dirs[name] = save_model(model, load_tokenizer(PRESET), tmp_path / name)
        t = load_file(str(dirs[name] / "adapter_model.safetensors"))
        A = next(v for k, v in t.items() if "layers.0" in k and "lora_A" in k)
        B = next(v for k, v in t.items() if "layers.0" in k and "lora_B" in k)
        deltas[name] = (8.0 / 4) * B @ A
    model = load_adapted(dirs)
    combine_adapters(model, {"a": 0.7, "b": 0.3}, "mix")
    layer = model.lm.model.layers[0].self_attn.q_proj
    x = torch.eye(HIDDEN)
    with torch.no_grad():
        delta = (layer(x) - layer.get_base_layer()(x)).T
    torch.testing.assert_close(delta, 0.7 * deltas["a"] + 0.3 * deltas["b"], rtol=0, atol=1e-5)
