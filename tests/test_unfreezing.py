"""Gradual unfreezing (ULMFiT): depth groups from the top down, one more every N steps, the
embeddings last; adapters start from their own top; frozen parameters are never touched."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import AdapterConfig
from posttrain.models.adapters import apply_adapters
from posttrain.models.loading import load_model
from posttrain.train.optim import freeze_by_pattern, param_groups
from posttrain.train.unfreezing import GradualUnfreezing

# tiny-2l: 2 layers of 49,536 parameters, a 64-wide final norm, a 65,536-entry embedding tied to the head
LAYER_0 = {f"model.layers.0.{m}.weight" for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm")}
LAYER_1 = {n.replace("layers.0.", "layers.1.") for n in LAYER_0}
EMBEDDING = {"model.embed_tokens.weight"}


@pytest.fixture(scope="module")
def full_model():
    return load_model("tiny-2l")


def _lora(target_modules, extra=()) -> torch.nn.Module:
    cfg = AdapterConfig(method=["lora", *extra])
    cfg.lora.target_modules = target_modules
    return apply_adapters(load_model("tiny-2l"), cfg)


def _inactive(model, unfreezing, step) -> set[str]:
    name = {id(p): n for n, p in model.named_parameters()}
    return {name[id(p)] for p in unfreezing.inactive_parameters(step)}


def test_full_model_unfreezes_from_the_head_down_one_layer_every_n_steps(full_model):
    messages: list[str] = []
    unfreezing = GradualUnfreezing(full_model, every=10, log=messages.append)
    assert unfreezing.depths == [3, 2, 1, 0] and unfreezing.all_trained_at() == 30
    assert _inactive(full_model, unfreezing, 0) == LAYER_1 | LAYER_0 | EMBEDDING  # the final norm alone trains
    assert _inactive(full_model, unfreezing, 9) == LAYER_1 | LAYER_0 | EMBEDDING
    assert _inactive(full_model, unfreezing, 10) == LAYER_0 | EMBEDDING
    assert _inactive(full_model, unfreezing, 19) == LAYER_0 | EMBEDDING
    assert _inactive(full_model, unfreezing, 20) == EMBEDDING
    assert unfreezing.inactive_parameters(30) == [] and unfreezing.inactive_parameters(10_000) == []
    assert messages == [
        "gradual unfreezing: 4 depth groups, one more every 10 steps from the top; everything trains from step 30",
        "step 0: gradual unfreezing trains the head (64 params)",
        "step 10: gradual unfreezing trains layer 1 and the head (49,600 params)",
        "step 20: gradual unfreezing trains layers 0–1 and the head (99,136 params)",
        "step 30: gradual unfreezing trains the embeddings, layers 0–1 and the head (164,672 params)",
    ]


def test_the_tied_head_is_the_embedding_matrix_and_joins_last(full_model):
    unfreezing = GradualUnfreezing(full_model, every=5, log=lambda _: None)
    assert full_model.lm_head.weight is full_model.model.embed_tokens.weight
    assert unfreezing.groups[-1] == [full_model.model.embed_tokens.weight]
    assert _inactive(full_model, unfreezing, 14) == EMBEDDING and unfreezing.inactive_parameters(15) == []


def test_every_one_step_adds_a_group_per_step(full_model):
    unfreezing = GradualUnfreezing(full_model, every=1, log=lambda _: None)
    assert [len(unfreezing.inactive_parameters(s)) for s in range(5)] == [19, 10, 1, 0, 0]
    assert unfreezing.all_trained_at() == 3


def test_the_schedule_is_a_pure_function_of_the_step(full_model):
    messages: list[str] = []
    unfreezing = GradualUnfreezing(full_model, every=4, log=messages.append)
    at_five = _inactive(full_model, unfreezing, 5)
    assert _inactive(full_model, unfreezing, 0) == LAYER_1 | LAYER_0 | EMBEDDING  # back, as a resume would ask
    assert at_five == LAYER_0 | EMBEDDING
    fresh = GradualUnfreezing(full_model, every=4, log=lambda _: None)
    assert _inactive(full_model, unfreezing, 0) == _inactive(full_model, fresh, 0)
    assert len(messages) == 3  # construction, step 5, step 0: repeated steps of one set log nothing more


def test_lora_on_the_layers_starts_from_the_top_layer_not_the_empty_head():
    model = _lora(["all-linear"])
    messages: list[str] = []
    unfreezing = GradualUnfreezing(model, every=10, log=messages.append)
    assert unfreezing.depths == [2, 1] and unfreezing.all_trained_at() == 10
    inactive = _inactive(model, unfreezing, 0)
    assert len(inactive) == 14 and all(".layers.0." in n and ".lora_" in n for n in inactive)  # 7 modules × A, B
    assert unfreezing.inactive_parameters(10) == []
    assert messages[1].startswith("step 0: gradual unfreezing trains layer 1 (")


def test_depths_without_trained_parameters_are_skipped():
    model = _lora([r"re:.*layers\.0\.self_attn\.q_proj"], extra=["prompt"])  # virtual tokens, then layer 0
    messages: list[str] = []
    unfreezing = GradualUnfreezing(model, every=3, log=messages.append)
    assert unfreezing.depths == [3, 1]
    assert _inactive(model, unfreezing, 2) == {
        f"base.base_model.model.model.layers.0.self_attn.q_proj.lora_{m}.default.weight" for m in "AB"}
    assert unfreezing.inactive_parameters(3) == []  # layer 0 joins after 3 steps, not 6
    assert messages[1] == "step 2: gradual unfreezing trains the head (1,024 params)"
    single = GradualUnfreezing(_lora([r"re:.*layers\.1\.self_attn\.q_proj"]), every=3, log=lambda _: None)
    assert single.all_trained_at() == 0 and single.inactive_parameters(0) == []


def test_frozen_parameters_are_never_returned():
    model = load_model("tiny-2l")
    freeze_by_pattern(model, ["model.layers.0.*"])
    unfreezing = GradualUnfreezing(model, every=2, log=lambda _: None)
    assert unfreezing.depths == [3, 2, 0]  # no layer 0 group: the embeddings join second
    assert _inactive(model, unfreezing, 2) == EMBEDDING
    returned = {n for step in range(8) for n in _inactive(model, unfreezing, step)}
    assert returned == LAYER_1 | EMBEDDING and not returned & LAYER_0


@pytest.mark.parametrize("make", [lambda: load_model("tiny-2l"), lambda: _lora(["all-linear"], extra=["prompt"])])
def test_groups_are_the_optimizers_depths(make):
    model = make()
    unfreezing = GradualUnfreezing(model, every=1, log=lambda _: None)
    depth_of = {id(p): d for d, group in zip(unfreezing.depths, unfreezing.groups) for p in group}
    num_layers = unfreezing.num_layers
    for group in param_groups(model, lr=1.0, weight_decay=0.0, layer_lr_decay=0.5):  # lr = 0.5^(top - depth)
        depth = num_layers + 1 - round(math.log2(1 / group["lr"]))
        assert {depth_of[id(p)] for p in group["params"]} == {depth}, group["names"]


def test_every_must_be_positive(full_model):
    with pytest.raises(ValueError, match="every >= 1"):
        GradualUnfreezing(full_model, every=0)
