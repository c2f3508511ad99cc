"""Penalties that hold trained weights near where they started (catastrophic-forgetting control).

Both are one quadratic, anchored at the weights θ₀ the run starts from:

    L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks", Eq. 3 without its term on new layers):
        Ω(θ) = α/2 · Σ_i (θ_i − θ₀_i)²
    EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", Eq. 3):
        Ω(θ) = λ/2 · Σ_i F_i (θ_i − θ₀_i)²,   F = the diagonal of the Fisher information on old data

so L2-SP is EWC with F = 1. The gradient is closed-form, ∂Ω/∂θ_i = strength · F_i · (θ_i − θ₀_i):
the loop adds it to the data gradient once per optimizer step instead of building a graph
through every weight (`train.forgetting` calls this on each step's trained parameters).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def anchored_penalty(params: list[torch.Tensor], anchors: list[torch.Tensor], strength: float,
                     importance: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Ω = strength/2 · Σ_i w_i (θ_i − θ₀_i)² and its gradient strength · w · (θ − θ₀), per tensor.

    params, anchors (θ₀) and importance (w; None = 1, which is L2-SP) are parallel lists of
    same-shaped tensors. Returns (Ω as a float64 0-dim tensor, [∂Ω/∂θ per tensor, in θ's dtype]).
    """
    total = torch.zeros((), dtype=torch.float64, device=params[0].device if params else "cpu")
    grads = []
    for i, (theta, theta0) in enumerate(zip(params, anchors, strict=True)):
        delta = theta.detach() - theta0  # (θ − θ₀)
        weighted = delta if importance is None else importance[i] * delta  # w · (θ − θ₀)
        total += (weighted.double() * delta.double()).sum().to(total.device)
        grads.append((strength * weighted).to(theta.dtype))
    return 0.5 * strength * total, grads
