"""Gradual unfreezing (`forgetting.unfreeze_every`): ULMFiT, Howard & Ruder 2018, §3.3.

The trained parameters are grouped by depth as `optim.param_groups` groups them: 0 for the
input embeddings, i + 1 for transformer layer i, num_layers + 1 for everything above the layers
(final norm, LM head, the virtual tokens of prompt tuning) — "the head" below. Only the policy's
parameters are grouped: PPO's value head or critic is new and trains from step 0.
Ordered from the top down, the first 1 + step // N groups train at optimizer step `step`
(0-based): the top group from step 0, one more below every N steps, the embeddings last. The
top is the highest depth that holds a trained parameter, so LoRA on the layers alone starts
with its top layer rather than spending N steps training nothing. A tied LM head is the
embedding matrix and joins with the embeddings.

As with the adapter schedule (`models/adapters/schedule.py`), every trained parameter is in
the optimizer from the start and the loop drops the gradients of those not yet unfrozen before
each optimizer step, so AdamW leaves them and their moments untouched. Dropping gradients
rather than toggling requires_grad keeps DDP's gradient buckets and the checkpoint contents
fixed for the whole run, and the schedule is a pure function of the step, so resume needs no state.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from posttrain.train.optim import count_layers, input_embedding_parameters, layer_depth


class GradualUnfreezing:
    """The trained parameters in depth groups, top down (`depths`, `groups`), one more trained every `every` steps."""

    def __init__(self, model: nn.Module, every: int, log: Callable[[str], None] = print):
        if every < 1:
            raise ValueError(f"gradual unfreezing needs every >= 1, got {every}")
        self.every = every
        self.log = log
        self.num_layers = count_layers(model)
        embedding = input_embedding_parameters(model)
        by_depth: dict[int, list[nn.Parameter]] = {}
        for name, param in model.named_parameters():
            if param.requires_grad:
                depth = 0 if id(param) in embedding else layer_depth(name, self.num_layers)
                by_depth.setdefault(depth, []).append(param)
        self.depths = sorted(by_depth, reverse=True)  # top down: the order they join in
        self.groups = [by_depth[d] for d in self.depths]
        self._current: int | None = None
        if self.groups:
            self.log(f"gradual unfreezing: {len(self.groups)} depth groups, one more every {every} steps "
                     f"from the top; everything trains from step {self.all_trained_at()}")

    def all_trained_at(self) -> int:
        """The first step at which every group trains."""
        return max(0, len(self.groups) - 1) * self.every

    def trained_groups(self, step: int) -> int:
        return min(len(self.groups), 1 + step // self.every)

    def inactive_parameters(self, step: int) -> list[nn.Parameter]:
        """Parameters whose gradients are dropped at optimizer step `step` (0-based)."""
        trained = self.trained_groups(step)
        if trained != self._current and self.groups:
            count = sum(p.numel() for group in self.groups[:trained] for p in group)
            what = self.describe(self.depths[:trained])
            self.log(f"step {step}: gradual unfreezing trains {what} ({count:,} params)")
            self._current = trained
        return [p for group in self.groups[trained:] for p in group]

    def describe(self, depths: list[int]) -> str:
        """e.g. "the embeddings, layers 0–1, 3 and the head" (layers by their index in the model)."""
        layers = sorted(d - 1 for d in depths if 0 < d <= self.num_layers)
        runs: list[list[int]] = []
        for index in layers:
            if runs and runs[-1][-1] == index - 1:
                runs[-1].append(index)
            else:
                runs.append([index])
        spans = ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)
        parts = (["the embeddings"] if 0 in depths else []) + \
                ([f"layer{'s' if len(layers) > 1 else ''} {spans}"] if layers else []) + \
                (["the head"] if self.num_layers + 1 in depths else [])
        return ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else "".join(parts)
