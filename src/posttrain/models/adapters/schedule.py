"""Per-method training controls: staged unfreezing and LoRA+ learning rates.

Staged schedule (`adapter.schedule`, e.g. "0:prompt", "200:prompt+lora", "400:all"): every
adapter parameter is in the optimizer from the start; at each step the parameters of
methods not yet (or no longer) trained have their gradients dropped before the optimizer
step, so AdamW leaves them and their moments untouched. Dropping gradients rather than
toggling requires_grad keeps DDP's gradient buckets and the checkpoint contents fixed for
the whole run, and the schedule is a pure function of the step, so resume needs no state.

LoRA+ (Hayou et al. 2024): the B matrices learn at lr × `lr_ratio_b`.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from posttrain.models.adapters.spec import AdapterPlan


class AdapterTraining:
    def __init__(self, model: nn.Module, plan: AdapterPlan, lora_lr_ratio_b: float = 1.0,
                 log: Callable[[str], None] = print):
        self.plan = plan
        self.ratio_b = lora_lr_ratio_b
        self.log = log
        method_of = getattr(model, "method_of", None)
        self._by_method: dict[str, list[nn.Parameter]] = {}
        if method_of is not None:
            for name, param in model.named_parameters():
                if param.requires_grad:
                    self._by_method.setdefault(method_of(name), []).append(param)
        self._current: frozenset[str] | None = None

    def lr_scale(self, param_name: str) -> float:
        # peft names a LoRA's B `lora_B`, and `lora_embedding_B` on an embedding
        is_b = "lora_B" in param_name or "lora_embedding_B" in param_name
        return self.ratio_b if self.ratio_b != 1.0 and is_b else 1.0

    def inactive_parameters(self, step: int) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped at optimizer step `step` (0-based)."""
        active = self.plan.active(step)
        if active is None:
            return []
        if active != self._current:
            trained = sum(p.numel() for m in active for p in self._by_method.get(m, []))
            self.log(f"step {step}: training {'+'.join(sorted(active))} ({trained:,} params)")
            self._current = active
        return [p for method, params in self._by_method.items() if method not in active for p in params]
