"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP").

After a sub-layer's output h (attention output projection, and/or the FFN):

    h <- h + W_up · act(W_down · h + b_down) + b_up,    W_down: (m, d), W_up: (d, m), m << d

W_up and b_up start at zero, so at step 0 each adapter is the identity and the adapted
model computes exactly what the base does ("near-identity" init; W_down is a small
Gaussian so gradients reach it once W_up moves). Unlike LoRA, the adapter sits in series
with a nonlinearity, so it cannot be folded into the base weights: it is never merged.

peft has no such method; these modules hang off the model through forward hooks, so the
base model's own parameter names and its `save_pretrained` output stay untouched.
"""

from __future__ import annotations

import re

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}

# Submodules (full dotted path) whose output an adapter follows. Attention: the output
# projection, a child of the attention module named o_proj (Llama, Qwen2, Mistral, Gemma),
# out_proj (OPT, BART, XGLM, GPT-J, CodeGen, MPT, GPT-Neo's attn.attention), c_proj (GPT-2,
# StarCoder) or dense (GPT-NeoX attention, Falcon / Bloom self_attention, Phi / Persimmon
# self_attn); q/k/v projections and MLP layers have other names or parents.
# FFN: the whole MLP block, or where the layer holds fc1 / fc2 itself (OPT, XGLM), its output
# projection fc2.
_ATTENTION_OUTPUT = re.compile(r".*\.(self_attn|attn|attention|self_attention)\.(o_proj|out_proj|c_proj|dense)$")
_FFN = re.compile(r".*\.(layers|h|blocks)\.\d+\.(mlp|feed_forward|ffn|fc2)$")


class Bottleneck(nn.Module):
    def __init__(self, hidden: int, size: int, activation: str = "relu", init_std: float = 1e-3):
        super().__init__()
        self.down = nn.Linear(hidden, size)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(size, hidden)
        nn.init.normal_(self.down.weight, std=init_std)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # compute in the adapter's dtype (fp32 next to a bf16 base), return in the input's
        delta = self.up(self.act(self.down(hidden.to(self.down.weight.dtype))))
        return hidden + delta.to(hidden.dtype)


def bottleneck_targets(model: nn.Module, where: list[str]) -> list[str]:
    """Full module paths that get an adapter after them, in model order."""
    patterns = [_ATTENTION_OUTPUT if w == "attention" else _FFN for w in where]
    return [name for name, _ in model.named_modules() if any(p.fullmatch(name) for p in patterns)]


def _key(path: str) -> str:
    return path.replace(".", "__")  # ModuleDict keys cannot contain dots


class BottleneckSet(nn.Module):
    """All bottleneck adapters of one model, attached to it by forward hooks."""

    def __init__(self, hidden: int, targets: list[str], size: int, activation: str, init_std: float):
        super().__init__()
        self.targets = list(targets)
        self.settings = {"size": size, "activation": activation, "init_std": init_std, "hidden": hidden}
        self.adapters = nn.ModuleDict({_key(t): Bottleneck(hidden, size, activation, init_std) for t in targets})
        self.enabled = True
        self._handles: list = []

    def attach(self, model: nn.Module) -> None:
        modules = dict(model.named_modules())
        for target in self.targets:
            adapter = self.adapters[_key(target)]
            self._handles.append(modules[target].register_forward_hook(self._hook(adapter)))

    def _hook(self, adapter: Bottleneck):
        def after(module, args, output):
            if not self.enabled:
                return output
            if isinstance(output, tuple):  # attention blocks that return (hidden, weights, ...)
                return (adapter(output[0]),) + tuple(output[1:])
            return adapter(output)

        return after

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def state(self) -> dict[str, torch.Tensor]:
        """Tensors keyed by target path, e.g. 'model.layers.0.mlp.down.weight'."""
        out = {}
        for target in self.targets:
            for name, tensor in self.adapters[_key(target)].state_dict().items():
                out[f"{target}.{name}"] = tensor.detach().contiguous().cpu()
        return out

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for target in self.targets:
            adapter = self.adapters[_key(target)]
            wanted = {name: tensors.get(f"{target}.{name}") for name in adapter.state_dict()}
            missing = [f"{target}.{n}" for n, t in wanted.items() if t is None]
            if missing:
                raise ValueError(f"bottleneck weights lack {missing[0]}")
            adapter.load_state_dict(wanted)
