"""Lean decoder layers: RMSNorm and SwiGLU that keep fewer activations for the backward.

Autograd keeps every intermediate an op asks for. In a Llama-style decoder layer that
is more than the backward needs:

  RMSNorm  `w * (x * rsqrt(mean(x²) + eps))` keeps x and the normalised x (two float32
           copies of the hidden state) for the weight's and x's gradients;
  SwiGLU   `silu(gate) * up` keeps gate, silu(gate) and up;
  autocast each linear that reads the norm's float32 output casts it to bf16 again and
           keeps its own copy: three for q/k/v, two for gate/up.

`lean_activations(model)` gives those modules a forward through an `autograd.Function`
that keeps x and the [.., 1] inverse RMS (the normalised x is recomputed in the
backward, an elementwise op), keeps gate and up (silu(gate) is recomputed), and, under
bf16 autocast, returns the norm's output already in bf16 so q/k/v (and gate/up) share
one copy. Measured with `saved_tensors_hooks` on a hidden-1024, intermediate-2816 layer
under bf16 autocast: 56 -> 37 bytes kept per token per hidden unit per layer (see
`tests/test_lean.py`), a third of the activation memory of full fine-tuning, for an
elementwise op or two in the backward.

Forward values are bit for bit the module's own (the same ops in the same order; the
bf16 cast is the one autocast's linear would make). In float32 the gradients are bit
for bit autograd's too. Under bf16 autocast one thing differs: the gradients q, k and v
(gate and up) hand back to the shared bf16 copy are summed in bf16, where autograd sums
each copy's gradient after casting it to float32.

Only module classes whose forward is known to be exactly the formula here are changed
(`_NORMS`, `_MLPS`), and each class is checked once per process against its own forward
on a small random input; a class that disagrees is left alone. The final norm (read by
the float32 vocabulary projection) keeps its float32 output.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

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
        ctx.y_dtype, ctx.eps = y.dtype, eps
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


def _bf16_autocast(device_type: str) -> bool:
    return torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.bfloat16


def _norm_forward(self, hidden_states):
    out_dtype = None
    if self._lean_cast and _bf16_autocast(hidden_states.device.type):
        out_dtype = torch.bfloat16
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon, out_dtype)


def _mlp_forward(self, x):
    return self.down_proj(_SiluMul.apply(self.gate_proj(x), self.up_proj(x)))


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


def lean_activations(model: torch.nn.Module) -> int:
    """Give the model's known RMSNorm and SwiGLU modules the lean forward; returns how many.

    Call it before adapters are added (the check runs each MLP's own linears). Norms inside
    decoder layers (`input_layernorm`, `post_attention_layernorm`) return bf16 under bf16
    autocast; any other norm keeps its own output dtype.
    """
    layer_norms = {id(getattr(m, name)) for m in model.modules() for name in _LAYER_NORMS
                   if isinstance(getattr(m, name, None), torch.nn.Module)}
    changed = 0
    for module in model.modules():
        name = type(module).__name__
        if getattr(module, "_lean", False):
            continue
        if name in _NORMS and _eligible(module, "norm"):
            module._lean_cast = id(module) in layer_norms
            module.forward = types.MethodType(_norm_forward, module)
        elif name in _MLPS and _eligible(module, "mlp"):  # the check rejects an act_fn other than silu
            module.forward = types.MethodType(_mlp_forward, module)
        else:
            continue
        module._lean = True
        changed += 1
    return changed
