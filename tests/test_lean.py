"""Lean RMSNorm / SwiGLU (`posttrain.models.lean`): same values, fewer saved activations."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.models.lean import _RMSNorm, _SiluMul, _SwiGLUDown, lean_activations

HIDDEN, INTERMEDIATE, LAYERS = 64, 176, 2


def _model(seed=0, **extra):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False, **extra)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # norm weights away from 1, so their gradient path is exercised
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_rms_norm(x, weight, eps):
    """LlamaRMSNorm.forward, written out."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _grads(model, ids, autocast=False):
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(input_ids=ids).logits
    logits.float().pow(2).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _error_to_float64(grads, exact):
    """Mean over parameters of |g - g64| / |g64|."""
    errs = [((grads[n].double() - exact[n]).norm() / exact[n].norm()).item() for n in exact]
    return sum(errs) / len(errs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_autograd_bit_for_bit(dtype):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 64, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(64)).to(dtype).requires_grad_()
    grad = torch.randn(3, 5, 64, dtype=dtype)
    want = _hf_rms_norm(x, w, 1e-6)
    got = _RMSNorm.apply(x, w, 1e-6, None)
    assert torch.equal(want, got)
    for a, b in zip(torch.autograd.grad(want, (x, w), grad), torch.autograd.grad(got, (x, w), grad)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_rms_norm_backward_against_the_formula_in_float64():
    """d/dx of w·x/r, r = sqrt(mean(x²)+eps): (w⊙g)/r − x·Σ(w⊙g⊙x)/(n·r³); d/dw = Σ_tokens g⊙x/r.

    The module's formula normalises in float32 whatever the input dtype (as HF's does), so
    a float64 input agrees to float32 precision."""
    torch.manual_seed(1)
    n, eps = 48, 1e-5
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    w = torch.randn(n, dtype=torch.float64, requires_grad=True)
    g = torch.randn(4, n, dtype=torch.float64)
    gx, gw = torch.autograd.grad(_RMSNorm.apply(x, w, eps, None), (x, w), g)
    xd = x.detach()
    r = (xd.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    want_x = (w * g) / r - xd * (w * g * xd).sum(-1, keepdim=True) / (n * r**3)
    want_w = (g * xd / r).sum(0)
    torch.testing.assert_close(gx, want_x, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(gw, want_w, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul_matches_autograd_bit_for_bit(dtype):
    torch.manual_seed(0)
    gate = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    up = torch.randn(3, 5, 96, dtype=dtype, requires_grad=True)
    grad = torch.randn(3, 5, 96, dtype=dtype)
    want, got = F.silu(gate) * up, _SiluMul.apply(gate, up)
    assert torch.equal(want, got)
    for a, b in zip(torch.autograd.grad(want, (gate, up), grad), torch.autograd.grad(got, (gate, up), grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_swiglu_down_matches_autograd_bit_for_bit(bias, autocast):
    torch.manual_seed(0)
    gate = torch.randn(3, 5, 96, requires_grad=True)
    up = torch.randn(3, 5, 96, requires_grad=True)
    down = torch.nn.Linear(96, 32, bias=bias)
    grad = torch.randn(3, 5, 32)
    inputs = (gate, up, *down.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        want = down(F.silu(gate) * up)
        got = _SwiGLUDown.apply(gate, up, down.weight, down.bias, torch.bfloat16 if autocast else None)
    assert want.dtype == got.dtype and torch.equal(want, got)
    grad = grad.to(want.dtype)
    for a, b in zip(torch.autograd.grad(want, inputs, grad), torch.autograd.grad(got, inputs, grad)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_model_float32_same_logits_and_gradients():
    ref = _model()
    lean = copy.deepcopy(ref)
    assert lean_activations(lean) == 2 * LAYERS * 1 + LAYERS + 1  # two norms and an MLP per layer, the final norm
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    (l0, g0), (l1, g1) = _grads(ref, ids), _grads(lean, ids)
    assert torch.equal(l0, l1)
    # Each op's gradient is autograd's bit for bit (tests above); across the model the
    # engine may add a tensor's several incoming gradients in another order.
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)


def test_model_bf16_autocast_same_logits_and_gradients_as_accurate():
    """Under bf16 autocast the logits are identical; the gradients are as close to a float64
    computation as autograd's own (the shared bf16 copy sums its gradients in bf16)."""
    ref = _model()
    lean = copy.deepcopy(ref)
    lean_activations(lean)
    ids = torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(0))
    (l0, g0), (l1, g1) = _grads(ref, ids, autocast=True), _grads(lean, ids, autocast=True)
    assert torch.equal(l0, l1)
    _, exact = _grads(copy.deepcopy(ref).double(), ids)
    assert _error_to_float64(g0, exact) > 1e-3  # bf16 is really in play
    assert _error_to_float64(g1, exact) < 1.1 * _error_to_float64(g0, exact)


def _saved_bytes(model, ids, autocast):
    """Bytes of distinct storages autograd keeps during a forward (parameters and autocast's
    cached weight copies excluded), per token per hidden unit per layer."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weight_shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and tuple(t.shape) not in weight_shapes:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model.model(input_ids=ids)
    return sum(seen.values()) / ids.numel() / HIDDEN / LAYERS


def test_fewer_saved_activations():
    ref = _model()
    lean = copy.deepcopy(ref)
    lean_activations(lean)
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    i = INTERMEDIATE / HIDDEN
    # bf16 autocast, per token per hidden unit per layer: each norm keeps x (4 bytes) and not
    # the normalised x (4); q/k/v share one bf16 copy (2, not 6), gate/up too (2, not 4);
    # SwiGLU + down_proj keep gate and up (2i + 2i), not silu(gate) and down's input (2i + 2i).
    # The final norm, once per model, drops its normalised x (4 / LAYERS) and keeps float32.
    default, leaner = _saved_bytes(ref, ids, True), _saved_bytes(lean, ids, True)
    assert default - leaner == pytest.approx(4 + 4 + 4 + 2 + 4 * i + 4 / LAYERS, abs=0.05)
    assert leaner < 0.6 * default
    # float32: the norms drop the normalised x (4 + 4), the MLP silu(gate) and the product (8i).
    default32, leaner32 = _saved_bytes(ref, ids, False), _saved_bytes(lean, ids, False)
    assert default32 - leaner32 == pytest.approx(4 + 4 + 8 * i + 4 / LAYERS, abs=0.05)
    # A hook on down_proj (peft, IA3 and ZeRO-3 wrap or hook it) keeps down's own call, and
    # with it down's input.
    calls = []
    for layer in lean.model.layers:
        layer.mlp.down_proj.register_forward_hook(lambda *args: calls.append(1))
    hooked = _saved_bytes(lean, ids, True)
    assert len(calls) == LAYERS and hooked - leaner == pytest.approx(2 * i, abs=0.05)


def test_only_known_formulas_are_changed():
    model = _model()
    norm = model.model.layers[0].input_layernorm

    class LlamaRMSNorm(type(norm)):  # same name, another formula: the check must refuse it
        def forward(self, hidden_states):
            return 2 * super().forward(hidden_states)

    odd = LlamaRMSNorm(HIDDEN)
    assert lean_activations(torch.nn.ModuleList([odd])) == 0
    assert "forward" not in vars(odd)
    relu_model = _model(hidden_act="relu")  # LlamaMLP with another activation
    lean_activations(relu_model)
    assert "forward" not in vars(relu_model.model.layers[0].mlp)
    assert "forward" in vars(relu_model.model.layers[0].input_layernorm)


def test_leaves_global_rng_alone_and_is_idempotent():
    model = _model()
    state = torch.get_rng_state()
    first = lean_activations(model)
    assert torch.equal(state, torch.get_rng_state())
    assert first > 0 and lean_activations(model) == 0


def test_deepcopy_binds_to_the_copy():
    model = _model()
    lean_activations(model)
    twin = copy.deepcopy(model)
    assert twin.model.layers[0].mlp.forward.args[0] is twin.model.layers[0].mlp
    assert twin.model.layers[0].input_layernorm.forward.args[0] is twin.model.layers[0].input_layernorm


def test_a_lean_model_survives_a_pickle_round_trip():
    """torch.save(model) / pickle of a model with lean layers loads back (a bound method pickles
    as a lookup by name on the module, which fails), bound to the copy, computing the same."""
    model = _model()
    assert lean_activations(model, True) > 0
    twin = pickle.loads(pickle.dumps(model))
    assert twin.model.layers[0].mlp.forward.args[0] is twin.model.layers[0].mlp
    assert twin.model.layers[0].post_attention_layernorm.forward.args[0] is twin.model.layers[0].post_attention_layernorm
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, twin(input_ids=ids).logits)


def _lora(lean: bool, dropout: float = 0.0, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    from posttrain.models.loading import enable_gradient_checkpointing

    model = _model()
    if lean:
        lean_activations(model)
    if checkpointing:
        enable_gradient_checkpointing(model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                             lora_dropout=dropout))
    if lean:
        lean_activations(model)  # again, for the LoRA linears
    return model.train()


def test_lora_and_checkpointing_on_top():
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    (l0, g0), (l1, g1) = (_grads(_lora(lean, checkpointing=True), ids) for lean in (False, True))
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:  # the LoRA matrices
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7, msg=name)
    # bf16 autocast: same logits, gradients as close to float64 as peft's own path
    (l0, g0), (l1, g1) = (_grads(_lora(lean, checkpointing=True), ids, True) for lean in (False, True))
    assert torch.equal(l0, l1)
    _, exact = _grads(_lora(False).double(), ids)
    assert _error_to_float64(g0, exact) > 1e-3
    assert _error_to_float64(g1, exact) < 1.1 * _error_to_float64(g0, exact)


def test_lora_layers_share_the_bf16_input():
    """Under autocast a plain LoRA layer's lora_A reads the bf16 input the base layer reads
    (peft would cast it to float32 and autocast back to a bf16 copy of its own)."""
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    i = INTERMEDIATE / HIDDEN
    default, leaner = _saved_bytes(_lora(False), ids, True), _saved_bytes(_lora(True), ids, True)
    # lora_A of k and v share q's copy (4), up shares gate's (2), o reads attention's output (2);
    # SwiGLU drops silu(gate) (2i); down is wrapped, so its input stays; the final norm's
    # weight is frozen, so it kept x only already.
    assert default - leaner == pytest.approx(4 + 2 + 2 + 2 * i, abs=0.05)
    # LoRA dropout draws on lora_A's input in its own dtype: there peft's cast stays.
    dropout = _saved_bytes(_lora(True, dropout=0.1), ids, True)
    assert dropout > leaner + 4


def test_load_model_option():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    auto, forced = load_model(ModelConfig(path="tiny")), load_model(ModelConfig(path="tiny", lean_activations=True))
    plain = load_model(ModelConfig(path="tiny", lean_activations=False))
    assert not any("forward" in vars(m) for m in plain.modules())
    assert "forward" in vars(auto.model.layers[0].mlp) and "forward" in vars(forced.model.layers[0].mlp)
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    saved = {name: _saved_bytes_any(model, ids) for name, model in (("auto", auto), ("forced", forced), ("plain", plain))}
    assert saved["auto"] == saved["plain"] > saved["forced"]  # auto: the stock layers on CPU


def _saved_bytes_any(model, ids):
    total = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: total.append(t.untyped_storage().nbytes()) or t, lambda t: t):
        model(input_ids=ids)
    return sum(total)


def test_auto_is_lean_off_the_cpu(monkeypatch):
    """mode "auto" dispatches per call on the input's device (a meta tensor stands in for a GPU)."""
    import posttrain.models.lean as lean

    calls = []
    for fn in ("_RMSNorm", "_SwiGLUDown"):
        cls = getattr(lean, fn)
        monkeypatch.setattr(lean, fn, type(fn, (cls,), {"apply": classmethod(
            lambda c, *a, _cls=cls, _fn=fn: calls.append(_fn) or _cls.apply(*a))}))
    model = _model()
    lean_activations(model, "auto")
    calls.clear()  # the first check of a class runs the lean forward on a probe
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids)
    assert calls == []
    model.to("meta")(input_ids=ids.to("meta"))
    assert calls.count("_RMSNorm") == 2 * LAYERS + 1 and calls.count("_SwiGLUDown") == LAYERS


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_auto_uses_the_lean_layers_and_keeps_the_gradients():
    """On a GPU `auto` is on: same logits, gradients as close to float64 as the stock layers,
    and fewer bytes kept (bf16 autocast, full fine-tuning and LoRA)."""
    ids = torch.randint(0, 128, (4, 64), generator=torch.Generator().manual_seed(0))
    for build in (lambda lean: _on_cuda(_model(), lean), lambda lean: _on_cuda(_lora(False), lean)):
        ref, lean = build(False), build(True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            saved = [_cuda_saved_bytes(m, ids.cuda()) for m in (ref, lean)]
        assert saved[1] < 0.8 * saved[0], saved
        (l0, g0), (l1, g1) = (_grads_cuda(m, ids) for m in (ref, lean))
        assert torch.equal(l0, l1)
        _, exact = _grads(copy.deepcopy(ref).cpu().double(), ids)
        assert _error_to_float64(g1, exact) < 1.1 * _error_to_float64(g0, exact)


def _on_cuda(model, lean):
    model = model.cuda()
    if lean:
        lean_activations(model, "auto")
    return model


def _cuda_saved_bytes(model, ids):
    seen = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids)
    return sum(seen.values())


def _grads_cuda(model, ids):
    model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids.cuda()).logits
    logits.float().pow(2).mean().backward()
    return logits.detach().cpu(), {n: p.grad.detach().cpu() for n, p in model.named_parameters() if p.grad is not None}
