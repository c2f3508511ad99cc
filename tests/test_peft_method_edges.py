"""Adversarial review of the PEFT methods against independent computations.

Expectations come from: the papers' formulas written out here in float64 on a plain
transformers copy of the base (LoRA W + (alpha/r) B A, rsLoRA alpha/sqrt(r), DoRA
m * V / ||V||_row, IA3 scaling of k, v and the FFN activation), the base model's own
parameter objects (which must never receive a gradient), unpadded single-row runs (for
padded batches with virtual tokens), plain peft loads, and counts by hand.
Not repeated here: what tests/test_adapters.py, test_adapter_edges.py, test_adapter_roundtrips.py
and test_peft_outcomes.py already check.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from posttrain.config import AdapterConfig
from posttrain.data.batching import padded_inputs
from posttrain.models.adapters import apply_adapters, format_report, parameter_report
from posttrain.models.loading import load_model, load_tokenizer, save_model

PRESET = "tiny-2l"  # hidden 64, 2 layers, 4 heads (no GQA), FFN 172, tied embeddings
HIDDEN, LAYERS, FFN, VOCAB = 64, 2, 172, 1024
TEXTS = ["Reverse: q m t", "Hello there, how are you today?", "x"]


def _cfg(method, **sections) -> AdapterConfig:
    cfg = AdapterConfig(method=list(method) if isinstance(method, (list, tuple)) else [method])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _nudge(model, seed=7, scale=0.05):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _adapted(method, seed=7, scale=0.05, **sections):
    return _nudge(apply_adapters(load_model(PRESET), _cfg(method, **sections)), seed, scale)


def _logits(model, **inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(PRESET)


@pytest.fixture(scope="module")
def batch(tokenizer):
    tokenizer.padding_side = "right"
    return dict(tokenizer(TEXTS[:2], return_tensors="pt", padding=True))


def _plain64():
    return load_model(PRESET).double().eval()


def _lora_factors(layer):
    return (layer.base_layer.weight.detach().double(), layer.lora_A["default"].weight.detach().double(),
            layer.lora_B["default"].weight.detach().double(), layer.scaling["default"])


def _lora_layers(model):
    return {name: module for name, module in model.lm.named_modules()
            if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {})}


# --------------------------------------------------------------------------- fresh adapters


def test_fresh_parameters_are_the_papers_identity_init():
    """LoRA: B = 0 and A random; DoRA: m = ||W||_row (so m * W / ||W|| = W); IA3: every vector 1."""
    lora = apply_adapters(load_model(PRESET), _cfg("lora", lora={"r": 4}))
    layers = _lora_layers(lora)
    assert len(layers) == LAYERS * 7
    for layer in layers.values():
        _, A, B, _ = _lora_factors(layer)
        assert B.abs().max() == 0 and A.abs().max() > 0
    dora = apply_adapters(load_model(PRESET), _cfg("dora", lora={"r": 4}))
    for name, layer in _lora_layers(dora).items():
        W = layer.base_layer.weight.detach().double()
        m = layer.lora_magnitude_vector["default"].weight.detach().double()
        torch.testing.assert_close(m, W.norm(dim=1), rtol=1e-6, atol=0, msg=name)
    ia3 = apply_adapters(load_model(PRESET), _cfg("ia3"))
    vectors = [p for n, p in ia3.named_parameters() if "ia3_l" in n]
    assert len(vectors) == LAYERS * 3 and all(torch.equal(v, torch.ones_like(v)) for v in vectors)


@pytest.mark.parametrize("method, sections", [
    ("prompt", {}), ("prefix", {}), ("prefix", {"virtual_tokens": {"projection": True, "projection_hidden": 16}}),
    ("prompt", {"virtual_tokens": {"init": "text", "init_text": "Answer exactly."}}),
], ids=["prompt", "prefix", "prefix-projection", "prompt-text"])
def test_fresh_virtual_tokens_change_the_output_of_every_real_token(method, sections, batch):
    # Virtual tokens are attended to by every real token, so even untrained ones are not the identity;
    # a model that dropped them (or put them after the input) would match the base at some position.
    base = _logits(load_model(PRESET).eval(), **batch)
    model = apply_adapters(load_model(PRESET), _cfg(method, **sections)).eval()
    got = _logits(model, **batch)
    assert got.shape == base.shape and torch.isfinite(got).all()
    per_position = (got - base).abs().amax(dim=-1)  # (B, T)
    real = batch["attention_mask"].bool()
    assert per_position[real].min() > 1e-4


# --------------------------------------------------------------------------- forward = formula (float64)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_lora_all_linear_whole_model_equals_W_plus_scaled_BA_in_float64(rslora, batch):
    r, alpha = 4, 6.0
    model = _adapted("lora", lora={"r": r, "alpha": alpha, "rslora": rslora})
    layers = _lora_layers(model)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    plain = _plain64()
    with torch.no_grad():
        for name, layer in layers.items():
            W, A, B, s = _lora_factors(layer)
            assert s == pytest.approx(scale)
            plain.get_submodule(name).weight.copy_(W + scale * B @ A)
    expected = _logits(plain, **batch)
    got = _logits(model, **batch).double()
    torch.testing.assert_close(got, expected, rtol=0, atol=2e-5)
    assert (expected - _logits(_plain64(), **batch)).abs().max() > 1e-2  # the update is visible


@pytest.mark.parametrize("rslora", [False, True], ids=["dora", "dora-rslora"])
def test_dora_whole_model_equals_magnitude_times_unit_direction_in_float64(rslora, batch):
    """DoRA (Liu et al. 2024, Eq. 5): W' = m * (W + s B A) / ||W + s B A||_c, the norm taken per
    output feature; m is trained separately from the direction."""
    r, alpha = 4, 8.0
    model = _adapted("dora", lora={"r": r, "alpha": alpha, "rslora": rslora, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]})
    layers = _lora_layers(model)
    assert len(layers) == LAYERS * 4
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    plain = _plain64()
    with torch.no_grad():
        for name, layer in layers.items():
            W, A, B, _ = _lora_factors(layer)
            m = layer.lora_magnitude_vector["default"].weight.detach().double()
            assert (m - W.norm(dim=1)).abs().max() > 1e-3  # the nudged magnitude differs from ||W||
            V = W + scale * B @ A
            plain.get_submodule(name).weight.copy_(m[:, None] * V / V.norm(dim=1, keepdim=True))
    expected = _logits(plain, **batch)
    torch.testing.assert_close(_logits(model, **batch).double(), expected, rtol=0, atol=2e-5)


def test_ia3_scales_k_v_outputs_and_the_ffn_activation_in_float64(batch):
    """IA3 (Liu et al. 2022, Eq. 1-2): l_k * (W_k x), l_v * (W_v x) and (l_ff * act(...)) W_down,
    i.e. the MLP activation entering down_proj; by hand with hooks on a plain float64 model."""
    model = _adapted("ia3", scale=0.3)
    vectors = {}
    for name, p in model.lm.named_parameters():
        if "ia3_l" in name:
            vectors[name.split(".ia3_l")[0]] = p.detach().double().flatten()
    assert sorted({k.rsplit(".", 1)[-1] for k in vectors}) == ["down_proj", "k_proj", "v_proj"]
    plain = _plain64()
    for name, vec in vectors.items():
        module = plain.get_submodule(name)
        if name.endswith("down_proj"):
            assert vec.numel() == FFN
            module.register_forward_pre_hook(lambda mod, args, vec=vec: (args[0] * vec,))
        else:
            assert vec.numel() == HIDDEN
            module.register_forward_hook(lambda mod, args, out, vec=vec: out * vec)
    expected = _logits(plain, **batch)
    torch.testing.assert_close(_logits(model, **batch).double(), expected, rtol=0, atol=2e-5)
    assert (expected - _logits(_plain64(), **batch)).abs().max() > 1e-2


# --------------------------------------------------------------------------- gradients and counts


GRAD_CASES = ["lora", "dora", "ia3", "prompt", "prefix", "bottleneck",
              ["lora", "bottleneck", "prompt"], ["ia3", "prefix", "bottleneck"], ["dora", "prefix"]]


@pytest.mark.parametrize("method", GRAD_CASES, ids=str)
def test_only_adapter_parameters_are_trainable_and_receive_gradients(method, batch):
    lm = load_model(PRESET)
    base_ids = {id(p) for p in lm.parameters()}  # taken before any adapter is injected
    base_total = sum(p.numel() for p in lm.parameters())
    model = _nudge(apply_adapters(lm, _cfg(method, lora={"r": 4})))
    model.train()
    logits = model(**batch).logits
    (logits.float().pow(2).mean()).backward()
    params = dict(model.named_parameters())
    base = {n: p for n, p in params.items() if id(p) in base_ids}
    extra = {n: p for n, p in params.items() if id(p) not in base_ids}
    assert extra and len(base) == len(base_ids)
    assert not [n for n, p in base.items() if p.requires_grad or p.grad is not None]
    assert not [n for n, p in extra.items() if not p.requires_grad]
    no_grad = [n for n, p in extra.items() if p.grad is None or p.grad.abs().max() == 0]
    assert not no_grad
    report = parameter_report(model)
    trainable = sum(p.numel() for p in extra.values())
    assert (report["trainable"], report["total"]) == (trainable, base_total + trainable)
    assert report["by_method"]["base"]["trainable"] == 0


def test_gradient_checkpointing_gives_the_same_adapter_gradients(batch):
    """A base loaded with model.gradient_checkpointing (frozen embeddings, adapters inside the
    recomputed blocks, bottleneck hooks, a soft prompt) gives the gradients of a plain backward."""
    def grads(checkpointing):
        torch.manual_seed(0)  # the adapters' random init (LoRA A, bottleneck down, soft prompt)
        lm = load_model(PRESET, gradient_checkpointing=checkpointing)
        cfg = _cfg(["lora", "bottleneck", "prompt"], lora={"target_modules": ["q_proj", "o_proj"]})
        model = _nudge(apply_adapters(lm, cfg)).train()
        assert bool(lm.is_gradient_checkpointing) == checkpointing
        model(**batch).logits.pow(2).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-8, msg=name)


def test_counts_by_hand_for_prefix_projection_gqa_prefix_and_custom_ia3():
    # prefix with projection (Li & Liang 2021): embedding n x h, then h -> p -> L*2*h MLP (weights + biases)
    n, p = 3, 16
    model = apply_adapters(load_model(PRESET), _cfg("prefix", virtual_tokens={"num_virtual_tokens": n,
                                                                              "projection": True, "projection_hidden": p}))
    expected = n * HIDDEN + (HIDDEN * p + p) + (p * LAYERS * 2 * HIDDEN + LAYERS * 2 * HIDDEN)
    report = parameter_report(model)
    assert report["by_method"]["prefix"] == {"trainable": expected, "total": expected}
    base_total = sum(q.numel() for q in load_model(PRESET).parameters())
    assert format_report(report).splitlines()[0] == (
        f"trainable {expected:,} / {base_total + expected:,} params ({100 * expected / (base_total + expected):.3f}%)")
    # custom IA3: q_proj rescales its output (h), up_proj (feed-forward) its input (h)
    ia3 = apply_adapters(load_model(PRESET), _cfg("ia3", ia3={"target_modules": ["q_proj", "up_proj"],
                                                              "feedforward_modules": ["up_proj"]}))
    by_module = parameter_report(ia3)["by_module"]
    assert by_module["q_proj"]["trainable"] == LAYERS * HIDDEN and by_module["up_proj"]["trainable"] == LAYERS * HIDDEN
    assert parameter_report(ia3)["trainable"] == 2 * LAYERS * HIDDEN


def test_prefix_on_a_gqa_model_has_keys_of_the_kv_width_and_pads_like_single_rows():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=0)
    n = 3
    model = _nudge(apply_adapters(LlamaForCausalLM(config), _cfg("prefix", virtual_tokens={"num_virtual_tokens": n})))
    kv_width = 2 * (32 // 4)
    assert parameter_report(model)["by_method"]["prefix"]["trainable"] == n * 2 * 2 * kv_width
    rows = [torch.tensor([[5, 6, 7, 8, 9]]), torch.tensor([[11, 12]])]
    alone = [_logits(model, input_ids=r)[0] for r in rows]
    ids = torch.zeros(2, 5, dtype=torch.long)
    mask = torch.zeros(2, 5, dtype=torch.long)
    ids[0], mask[0] = rows[0][0], 1
    ids[1, 3:], mask[1, 3:] = rows[1][0], 1  # left-padded
    out = _logits(model, **padded_inputs(ids, mask))
    torch.testing.assert_close(out[0], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out[1, 3:], alone[1], rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- padding with virtual tokens


@pytest.mark.parametrize("method", ["prompt", "prefix", ["lora", "prompt"], ["ia3", "prefix", "bottleneck"]], ids=str)
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone_with_virtual_tokens(method, side, tokenizer):
    """As the trainer and generator hand batches over (`data.batching.padded_inputs`: a left-padded
    batch passes its mask and real positions, a right-padded one no mask), each row's logits and
    final hidden states equal those of the row run alone, unpadded."""
    from posttrain.models.loading import final_hidden_and_head

    model = _adapted(method, virtual_tokens={"num_virtual_tokens": 4})
    alone = []
    for text in TEXTS:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        alone.append(_logits(model, input_ids=ids)[0])
    tokenizer.padding_side = side
    try:
        enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "right"
    inputs = padded_inputs(enc["input_ids"], enc["attention_mask"])
    out = _logits(model, **inputs)
    with torch.no_grad():
        hidden, weight, _ = final_hidden_and_head(model, **inputs)
    for i, row in enumerate(alone):
        real = enc["attention_mask"][i].bool()
        assert real.sum() == row.shape[0]
        torch.testing.assert_close(out[i][real], row, rtol=0, atol=1e-5)
        torch.testing.assert_close((hidden[i] @ weight.T)[real], row, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_kv_cache_decoding_with_virtual_tokens_equals_plain_peft_without_cache(method, tokenizer, tmp_path):
    """posttrain's batched, left-padded, KV-cached greedy generation against plain peft's full
    forward recomputed per token on each prompt alone (no cache, no padding)."""
    from peft import PeftModel

    from posttrain.rollout.generate import generate
    from posttrain.rollout.sampling import SamplingSettings

    model = _adapted(method, virtual_tokens={"num_virtual_tokens": 3}, scale=0.5)
    out = save_model(model, None, tmp_path / "a")
    reference = PeftModel.from_pretrained(load_model(PRESET), out).eval()
    prompts = ["Copy: a b c d e f", "x"]
    steps = 6
    got = generate(model, tokenizer, prompts, SamplingSettings(max_new_tokens=steps, temperature=0.0), batch_size=2)
    for prompt, completion in zip(prompts, got):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        new = []
        for _ in range(steps):
            token = int(_logits(reference, input_ids=ids)[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert completion == tokenizer.decode(new, skip_special_tokens=True)


# --------------------------------------------------------------------------- report labels, targets


def test_lora_on_the_embedding_is_reported_under_embed_tokens():
    # README: params.json gives trainable parameters "per module type"; _module_type's docstring
    # lists embed_tokens as one. peft names the embedding's factors lora_embedding_A / _B.
    model = apply_adapters(load_model(PRESET), _cfg("lora", lora={"r": 4, "target_modules": ["embed_tokens", "q_proj"]}))
    by_module = parameter_report(model)["by_module"]
    trained = {k for k, v in by_module.items() if v["trainable"]}
    assert trained == {"embed_tokens", "q_proj"}, trained
    assert by_module["embed_tokens"]["trainable"] == 4 * (VOCAB + HIDDEN)


def test_bottleneck_where_ffn_is_honoured_or_refused_on_an_opt_model():
    """OPT's FFN is fc1/fc2 directly in the layer (no `mlp` block). Asking for adapters after
    attention *and* the FFN must not silently give attention only."""
    from transformers import OPTConfig, OPTForCausalLM

    from posttrain.errors import ConfigError

    lm = OPTForCausalLM(OPTConfig(vocab_size=50, hidden_size=32, ffn_dim=40, num_hidden_layers=2, num_attention_heads=4,
                                  word_embed_proj_dim=32, max_position_embeddings=64))
    try:
        model = apply_adapters(lm, _cfg("bottleneck", bottleneck={"where": ["attention", "ffn"], "size": 4}))
    except ConfigError:
        return  # refused with a reason: fine
    targets = model.bottlenecks.targets
    assert any(re.search(r"self_attn\.out_proj$", t) for t in targets)
    assert any(not re.search(r"self_attn\.out_proj$", t) for t in targets), targets


@pytest.mark.parametrize("method", [["lora", "prompt"], ["bottleneck", "prefix"]], ids=str)
def test_load_adapted_trainable_gives_the_fresh_trainable_set(method, tmp_path):
    """`load_adapted(..., is_trainable=True)` (public API) must give back the parameters a fresh
    `apply_adapters` trains, with the saved values."""
    from posttrain.models.adapters import load_adapted

    model = _adapted(method, lora={"r": 4}, virtual_tokens={"num_virtual_tokens": 3})
    save_model(model, None, tmp_path / "a")
    reloaded = load_adapted(tmp_path / "a", is_trainable=True)
    fresh = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    again = {n: p.detach() for n, p in reloaded.named_parameters() if p.requires_grad}
    assert fresh.keys() == again.keys()
    for name, value in fresh.items():
        torch.testing.assert_close(again[name], value, rtol=0, atol=0)
