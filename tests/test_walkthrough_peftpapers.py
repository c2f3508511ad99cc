"""A PEFT-papers walk: each method read against its paper and against peft's own conventions.

Walked: README's "Parameter-efficient fine-tuning" section, `models/adapters/` (spec, build, model,
bottleneck, io) and the `adapter:` section of config/sections.py, as a PEFT researcher checks a new
toolkit: LoRA (Hu et al. 2021: B = 0, so step 0 is the base; scale alpha / r), rsLoRA (alpha / sqrt(r)),
LoRA+ (Hayou et al. 2024: B at lr x ratio), DoRA (Liu et al. 2024: magnitude = the weight's row norms),
IA3 (Liu et al. 2022: ones on k, v and the FFN's inner activation), prefix tuning (Li & Liang 2021,
MLP reparameterisation), prompt tuning (Lester et al. 2021, text init), Houlsby bottleneck adapters
(near-identity init, after attention and after the FFN) and QLoRA's refusal on a CPU machine.

Right, and pinned here where no test had it: the trainable / total counts of every peft method equal
peft's own `get_nb_trainable_parameters` (what `print_trainable_parameters` prints) for the same config,
prefix projection and rsLoRA included; step 0 is the base model bit for bit, not only within 1e-6, for
LoRA (dropout on, train mode), IA3 and bottlenecks in float32 and bfloat16, and DoRA in bfloat16 is
exactly plain peft's DoRA (both one bfloat16 step off the base: peft's float32 magnitude against a
bfloat16 norm); target names resolve as peft's suffix rule (`self_attn.q_proj` every layer's,
`layers.0.self_attn.q_proj` one). Right and already tested elsewhere: the papers' inits and formulas
in float64, save / load and plain-peft interop, merge, LoRA+ by hand, QLoRA's one-line refusal (exit 2,
no run directory).

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 33: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import pytest
import torch

from posttrain.config import AdapterConfig, SFTConfig, validate_sft
from posttrain.errors import ConfigError
from posttrain.models.adapters import apply_adapters, parameter_report, validate_adapter
from posttrain.models.loading import load_model, load_tokenizer

PRESET = "tiny-2l"  # hidden 64, 2 layers, FFN 172, tied embeddings


def _cfg(method, **sections) -> AdapterConfig:
    cfg = AdapterConfig(method=list(method) if isinstance(method, (list, tuple)) else [method])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer(PRESET)
    return dict(tokenizer(["Reverse: q m t", "Hello there, how are you today?"], return_tensors="pt", padding=True))


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


# --------------------------------------------------------------------------- counts against peft's own


def _peft_configs():
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig

    lora = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}
    return [
        ("lora", _cfg("lora", lora={"r": 4, "alpha": 8.0}), LoraConfig(**lora)),
        ("rslora-qv", _cfg("lora", lora={"r": 3, "rslora": True, "target_modules": ["q_proj", "v_proj"]}),
         LoraConfig(r=3, lora_alpha=16, use_rslora=True, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")),
        ("dora", _cfg("dora", lora={"r": 4, "alpha": 8.0}), LoraConfig(**lora, use_dora=True)),
        ("ia3", _cfg("ia3"), IA3Config(task_type="CAUSAL_LM")),
        ("prompt", _cfg("prompt", virtual_tokens={"num_virtual_tokens": 5}),
         PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
        ("prefix", _cfg("prefix", virtual_tokens={"num_virtual_tokens": 5}),
         PrefixTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM")),
        ("prefix-projection",
         _cfg("prefix", virtual_tokens={"num_virtual_tokens": 5, "projection": True, "projection_hidden": 16}),
         PrefixTuningConfig(num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=16, task_type="CAUSAL_LM")),
    ]


def test_trainable_and_total_counts_equal_peft_get_nb_trainable_parameters_for_the_same_config():
    """README: "At start the run prints ... trainable / total parameters per method": for one peft
    method these are the figures peft's `print_trainable_parameters` prints for the same config."""
    from peft import get_peft_model

    for name, ours, theirs in _peft_configs():
        report = parameter_report(apply_adapters(load_model(PRESET), ours))
        peft_counts = get_peft_model(load_model(PRESET), theirs).get_nb_trainable_parameters()
        assert (report["trainable"], report["total"]) == peft_counts, name


# --------------------------------------------------------------------------- step 0 is the base, bit for bit


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step0_is_the_base_bit_for_bit_in_train_and_eval_mode(dtype, batch):
    """B = 0 (LoRA, with dropout on), ones (IA3) and a zero up projection (Houlsby) add exactly zero,
    so the first forward is the base's own logits, bit for bit, in the dtype the base is in."""
    base = _logits(load_model(PRESET, dtype=dtype).eval(), batch)
    cases = [("lora", {"lora": {"r": 4, "dropout": 0.1, "rslora": True}}), ("ia3", {}),
             ("bottleneck", {"bottleneck": {"activation": "gelu"}}), (["lora", "bottleneck"], {})]
    for method, sections in cases:
        model = apply_adapters(load_model(PRESET, dtype=dtype), _cfg(method, **sections))
        for mode in ("train", "eval"):
            getattr(model, mode)()
            got = _logits(model, batch)
            assert torch.equal(got, base), (method, mode, float((got.float() - base.float()).abs().max()))


def test_dora_at_step0_in_bfloat16_is_plain_peft_dora_bit_for_bit(batch):
    """DoRA's step 0 in bfloat16 is peft's own: its float32 magnitude against the bfloat16 weight's
    norm puts it one bfloat16 step off the base, and posttrain adds nothing to that."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load_model(PRESET, dtype="bfloat16"), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", use_dora=True, task_type="CAUSAL_LM")).eval()
    ours = apply_adapters(load_model(PRESET, dtype="bfloat16"), _cfg("dora")).eval()
    assert torch.equal(_logits(ours, batch), _logits(peft_model, batch))


# --------------------------------------------------------------------------- target names


def test_dotted_target_names_resolve_by_peft_suffix_rule():
    """`target_modules` names are matched as peft matches them: a module whose path ends in the name."""
    def adapted(targets):
        model = apply_adapters(load_model(PRESET), _cfg("lora", lora={"r": 2, "target_modules": targets}))
        return sorted(n.split("model.layers.")[1].rsplit(".lora_A", 1)[0]
                      for n, _ in model.named_parameters() if "lora_A" in n)

    assert adapted(["self_attn.q_proj"]) == ["0.self_attn.q_proj", "1.self_attn.q_proj"]
    assert adapted(["layers.0.self_attn.q_proj", "mlp.down_proj"]) == [
        "0.mlp.down_proj", "0.self_attn.q_proj", "1.mlp.down_proj"]


def test_a_regex_target_matching_nothing_is_named_as_written_with_a_full_path_to_match():
    """`re:q_proj` is peft's fullmatch against the whole module path, so it matches nothing; the stop
    should quote what the user wrote and show a path the pattern has to match, not claim that
    'q_proj' matches no layer next to a list of layers holding q_proj."""
    with pytest.raises(ConfigError) as info:
        apply_adapters(load_model(PRESET), _cfg("lora", lora={"target_modules": ["re:q_proj"]}))
    message = str(info.value)
    assert "re:q_proj" in message and "model.layers.0.self_attn.q_proj" in message, message


# --------------------------------------------------------------------------- settings checked up front


def test_a_bottleneck_init_that_can_never_train_is_refused_up_front(batch):
    """Houlsby's near-identity init needs a non-zero down projection: with W_down = 0 and W_up = 0
    (and act(0) = 0 for relu, gelu, silu, tanh) neither weight ever receives a gradient, so the
    adapter is a trained constant bias. Either validation refuses it or the weights train."""
    cfg = _cfg("bottleneck", bottleneck={"init_std": 0.0, "size": 4})
    try:
        validate_adapter(cfg)
    except ConfigError:
        return
    model = apply_adapters(load_model(PRESET), cfg).train()
    model(**batch).logits.pow(2).mean().backward()
    grads: dict[str, float] = {}
    for name, param in model.named_parameters():
        if name.startswith("bottlenecks."):  # bottlenecks.adapters.<target>.down.weight, ...
            key = ".".join(name.split(".")[-2:])
            grads[key] = max(grads.get(key, 0.0), float(param.grad.abs().max()))
    assert grads["down.weight"] > 0 and grads["up.weight"] > 0, grads


@pytest.mark.parametrize("overrides, named", [
    (["adapter.lora.r=16", "adapter.lora.target_modules=[q_proj, v_proj]"], r"adapter\.lora\."),  # method left at full
    (["adapter.method=ia3", "adapter.lora.dora=true"], r"adapter\.lora\.dora"),
    (["adapter.method=lora", "adapter.bottleneck.size=64"], r"adapter\.bottleneck\.size"),
], ids=["full-with-lora-section", "ia3-with-dora", "lora-with-bottleneck-size"])
def test_adapter_settings_no_chosen_method_reads_are_refused_up_front(overrides, named):
    """As `adapter.virtual_tokens.*` and `dpo.simpo_gamma` are: a setting away from its default that
    nothing in the run reads is a ConfigError naming it, before the model loads."""
    cfg = SFTConfig.load(None, ["model.path=tiny-2l", *overrides])
    with pytest.raises(ConfigError, match=named):
        validate_sft(cfg)
