"""Lean decoder layers: RMSNorm and SwiGLU that keep fewer activations for the backward.

Autograd keeps every intermediate an op asks for. In a Llama-style decoder layer that
is more than the backward needs:

  RMSNorm  `w * (x * rsqrt(mean(x²) + eps))` keeps x and the normalised x (two float32
           copies of the hidden state) for the weight's and x's gradients;
  SwiGLU   `down(silu(gate) * up)` keeps gate, silu(gate), up and the product;
  autocast each linear that reads the norm's float32 output casts it to bf16 again and
           keeps its own copy: three for q/k/v, two for gate/up.

`lean_activations(model)` gives those modules a forward through `autograd.Function`s
that keep less and recompute the rest with an elementwise op or two in the backward:

  `_RMSNorm`     keeps x and the [.., 1] inverse RMS; under bf16 autocast a decoder
                 layer's norm returns its output already in bf16, so q/k/v (gate/up) share
                 one copy;
  `_SwiGLUDown`  keeps gate and up; silu(gate) and the product are recomputed. Used when
                 down_proj is a plain `nn.Linear` nothing hooks; otherwise (a peft or IA3
                 wrapper, ZeRO-3's hooks) `_SiluMul` keeps gate and up and down_proj keeps
                 its input as usual;
  LoRA input     peft casts a LoRA linear's input to float32 for lora_A, whose autocast
                 casts it back to a bf16 copy of its own; under autocast, plain LoRA (no
                 dropout, no DoRA) gets the input as it is, the same bf16 values.

Measured with `saved_tensors_hooks` on hidden-1024, intermediate-2816 layers under bf16
autocast: 56 -> 31 bytes kept per token per hidden unit per layer for full fine-tuning,
48 -> 35 with LoRA on every linear (`tests/test_lean.py` checks the arithmetic on a small
model). Time is about even on CPU (a 4-layer model, float32 and bf16 autocast), and so are
the CPU benchmarks' step time and peak RSS, where activations are a small share of memory:
`model.lean_activations: auto` (`on_cpu=False`) therefore uses the lean forwards only on
tensors off the CPU, where activation memory is what limits the batch.

Each Function's forward and gradients are bit for bit those of the ops it replaces (the
same ops in the same order; the bf16 cast is the one autocast's linear would make). Across
a model, the autograd engine may add a tensor's incoming gradients in another order, so
float32 gradients agree to rounding. Under bf16 autocast the gradients q, k and v (gate and
up) hand back to the shared bf16 copy are summed in bf16, where autograd sums each copy's
gradient after casting it to float32; the gradients stay as close to a float64 computation
as autograd's own (tested).

Only module classes whose forward is known to be exactly the formula here are changed
(`_NORMS`, `_MLPS`); each class is checked once per process against its own forward on a
small input, and each MLP's activation function every time. The final norm (read by the
float32 vocabulary projection) keeps its own output dtype.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.nn.modules import module as nn_module

# Classes whose forward is HF Llama's RMSNorm / SwiGLU MLP, formula for formula.
_NORMS = frozenset({"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"})
_MLPS = frozenset({"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"})
# The decoder-layer children whose output only autocast-eligible linears read.
_LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")

_checked: dict[tuple[str, str], bool] = {}


class _RMSNorm(torch.autograd.Function):
    """y = w * (x32 * rsqrt(mean(x32²) + eps)).to(x.dtype), optionally cast to out_dtype.

    Keeps x and rstd; the backward replays autograd's own derivative formulas (mul, to,
    rsqrt, mean, pow) in its order, so float32 gradients match autograd's bit for bit.
    """

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype):
        x32 = x.to(torch.float32)
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.y_dtype = y.dtype
        ctx.save_for_backward(x, rstd, weight)
        return y if out_dtype is None else y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, rstd, weight = ctx.saved_tensors
        grad = grad.to(ctx.y_dtype)
        x32 = x.to(torch.float32)
        h = x32 * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * h.to(x.dtype)).to(weight.dtype).sum_to_size(weight.shape)
        if not ctx.needs_input_grad[0]:
            return None, grad_weight, None, None
        grad_h = (grad * weight).to(x.dtype).to(torch.float32)
        grad_rstd = (grad_h * x32).sum(-1, keepdim=True)
        grad_variance = -0.5 * grad_rstd * rstd.pow(3)
        grad_square = grad_variance.expand_as(x32) / x32.shape[-1]
        grad_x = grad_h * rstd + grad_square * (2 * x32)
        return grad_x.to(x.dtype), grad_weight, None, None


class _SiluMul(torch.autograd.Function):
    """silu(gate) * up, keeping gate and up; silu(gate) is recomputed in the backward."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = grad * F.silu(gate)
        return grad_gate, grad_up


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(gate) * up) for a plain `nn.Linear` down: keeps gate, up and the weight as the
    matmul used it; down's input (the product) is recomputed in the backward.

    Under autocast the product, weight and bias are cast to its dtype, as autocast's linear
    casts them (the weight's copy is what autograd would keep too).
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, compute_dtype):
        product = F.silu(gate) * up
        if compute_dtype is None:
            out = F.linear(product, weight, bias)
        else:
            weight = weight.to(compute_dtype)
            bias = None if bias is None else bias.to(compute_dtype)
            with torch.autocast(gate.device.type, enabled=False):
                out = F.linear(product.to(compute_dtype), weight, bias)
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up, weight = ctx.saved_tensors
        wants = ctx.needs_input_grad
        silu = F.silu(gate)
        grad_gate = grad_up = grad_weight = grad_bias = None
        if wants[2]:
            product = (silu * up).to(weight.dtype)
            grad_weight = grad.flatten(0, -2).t().mm(product.flatten(0, -2))
        if wants[3] and ctx.has_bias:
            grad_bias = grad.flatten(0, -2).sum(0)
        if wants[0] or wants[1]:
            grad_product = grad.matmul(weight).to(silu.dtype)
            if wants[0]:
                grad_gate = torch.ops.aten.silu_backward(grad_product * up, gate)
            if wants[1]:
                grad_up = grad_product * silu
        return grad_gate, grad_up, grad_weight, grad_bias, None


def _fusable(linear) -> bool:
    """A plain nn.Linear that no hook watches (peft, IA3, DeepSpeed ZeRO-3 and user hooks
    replace or wrap it), so computing it inside `_SwiGLUDown` skips nothing."""
    return (type(linear) is torch.nn.Linear and not linear._forward_hooks and not linear._forward_pre_hooks
            and not nn_module._global_forward_hooks and not nn_module._global_forward_pre_hooks)


def _autocast_dtype(device_type: str):
    """The autocast dtype in force on this device type, or None."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _stock_here(module, x) -> bool:
    """lean_activations(mode="auto") and a CPU tensor: the module's own forward."""
    return not module._lean_on_cpu and x.device.type == "cpu"


def _norm_forward(self, hidden_states):
    if _stock_here(self, hidden_states):
        return type(self).forward(self, hidden_states)
    out_dtype = None
    if self._lean_cast and _autocast_dtype(hidden_states.device.type) == torch.bfloat16:
        out_dtype = torch.bfloat16
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)


def _mlp_forward(self, x):
    if _stock_here(self, x):
        return type(self).forward(self, x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    down = self.down_proj
    if torch.is_grad_enabled() and _fusable(down):
        return _SwiGLUDown.apply(gate, up, down.weight, down.bias, _autocast_dtype(gate.device.type))
    return down(_SiluMul.apply(gate, up))


def _agrees(module, lean_forward, probe: torch.Tensor) -> bool:
    """Whether lean_forward gives the module's own output, bit for bit, on `probe`."""
    with torch.no_grad():
        return torch.equal(type(module).forward(module, probe), lean_forward(module, probe))


def _probe(width: int, like: torch.Tensor, dtype=None) -> torch.Tensor:
    """A [2, 3, width] random input; its own generator leaves the global RNG (and the run's seeds) alone."""
    values = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(0))
    return values.to(device=like.device, dtype=dtype or like.dtype)


def _eligible(module, kind: str) -> bool:
    """Whether the module computes the formula here: its class's forward is checked once per
    process on a probe; an MLP's activation (an attribute of the instance) every time."""
    cls = type(module)
    module._lean_on_cpu = True  # the check runs the lean forward on a CPU probe
    try:
        if kind == "mlp":
            probe = _probe(8, module.gate_proj.weight, torch.float32)
            with torch.no_grad():
                if not torch.equal(module.act_fn(probe), F.silu(probe)):
                    return False
        key = (cls.__module__ + "." + cls.__qualname__, kind)
        if key not in _checked:
            if kind == "norm":
                module._lean_cast = False
                _checked[key] = _agrees(module, _norm_forward, _probe(module.weight.shape[0], module.weight))
            else:
                weight = module.gate_proj.weight
                if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
                    return False  # quantised: the probe would need the bitsandbytes kernels; left alone
                _checked[key] = _agrees(module, _mlp_forward, _probe(weight.shape[1], weight))
    except Exception:  # an unexpected signature or attribute: not the formula we know
        return False
    return _checked[key]


def _plain_lora(layer) -> bool:
    """Every active adapter of a peft LoRA layer is vanilla LoRA without dropout."""
    return all(name not in layer.lora_variant and isinstance(layer.lora_dropout[name], torch.nn.Identity)
               for name in layer.active_adapters if name in layer.lora_A)


def _lora_cast_input(self, x, dtype):
    """peft casts a LoRA layer's input to the adapter's dtype (float32) before lora_A, whose
    autocast then casts it back to bf16 and keeps that copy. Under autocast, for plain LoRA,
    lora_A gets the input as it is: the same bf16 values reach the matmul, and lora_A keeps
    the tensor the base layer and its siblings read, not a copy of its own."""
    if (x is not None and x.is_floating_point() and not _stock_here(self, x)
            and _autocast_dtype(x.device.type) is not None and _plain_lora(self)):
        return x
    return type(self)._cast_input_dtype(self, x, dtype)


def _lora_linear_class():
    try:
        from peft.tuners.lora.layer import Linear
    except ImportError:  # peft absent or reorganised: nothing to change
        return None
    return Linear


def lean_activations(model: torch.nn.Module, mode: bool | str = True) -> int:
    """Give the model's known RMSNorm and SwiGLU modules the lean forward, and its peft LoRA
    linears the input pass-through under autocast; returns how many modules changed.

    mode is `model.lean_activations`: True, False (nothing changes) or "auto", which keeps the
    modules' own forward for CPU tensors (decided per call, as the model moves to its device
    after loading).
    Call it again after adapters are added (modules already changed are skipped). Norms
    inside decoder layers (`input_layernorm`, `post_attention_layernorm`) return bf16 under
    bf16 autocast; any other norm keeps its own output dtype.
    """
    if mode is False:
        return 0
    on_cpu = mode is True
    layer_norms = {id(getattr(m, name)) for m in model.modules() for name in _LAYER_NORMS
                   if isinstance(getattr(m, name, None), torch.nn.Module)}
    lora_linear = _lora_linear_class()
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if getattr(module, "_lean", False):
            continue
        if lora_linear is not None and isinstance(module, lora_linear):
            module._lean_on_cpu = on_cpu
            module._cast_input_dtype = functools.partial(_lora_cast_input, module)
        elif name in _NORMS and _eligible(module, "norm"):
            module._lean_cast, module._lean_on_cpu = id(module) in layer_norms, on_cpu
            module.forward = functools.partial(_norm_forward, module)
        elif name in _MLPS and _eligible(module, "mlp"):  # the check rejects an act_fn other than silu
            module._lean_on_cpu = on_cpu
            module.forward = functools.partial(_mlp_forward, module)
        else:
            continue
        module._lean = True
        changed += 1
    return changed
