"""What holds a model near what it could do before (catastrophic-forgetting control).

Two penalties on the weights, a distillation loss on the outputs and a gradient projection.

The penalties are one quadratic, anchored at the weights θ₀ the run starts from:

    L2-SP (Li, Grandvalet & Davoine 2018, "Explicit Inductive Bias for Transfer Learning with
    Convolutional Networks", Eq. 3 without its term on new layers):
        Ω(θ) = α/2 · Σ_i (θ_i − θ₀_i)²
    EWC (Kirkpatrick et al. 2017, "Overcoming catastrophic forgetting in neural networks", Eq. 3):
        Ω(θ) = λ/2 · Σ_i F_i (θ_i − θ₀_i)²,   F = the diagonal of the empirical Fisher on old data
                                             (squared gradients under the rows' own labels)

so L2-SP is EWC with F = 1. The gradient is closed-form, ∂Ω/∂θ_i = strength · F_i · (θ_i − θ₀_i):
the loop adds it to the data gradient once per optimizer step instead of building a graph
through every weight (`train.forgetting` calls this on each step's trained parameters). Under
AdamW that sum is then divided per weight by Adam's √v (a coupled L2 term, not the papers' SGD
setting), so a strength taken from the papers does not carry over.
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


def topk_distillation_kl(student_logps: torch.Tensor, teacher_logps: torch.Tensor,
                         student_log_rest: torch.Tensor | None = None) -> torch.Tensor:
    """KL(q ‖ p) of the teacher q and the student p, each read as k + 1 outcomes: the teacher's
    top-k tokens S and one bucket R for every other token (Learning without Forgetting, Li & Hoiem
    2017, Eq. 2 at temperature 1, with the teacher kept as its top k):

        KL = Σ_{v∈S} q_v (log q_v − log p_v) + q_R (log q_R − log p_R),
        q_R = 1 − Σ_{v∈S} q_v,   p_R = 1 − Σ_{v∈S} p_v

    student_logps, teacher_logps: (N, k) log-probabilities of the same k tokens per position
    (the student's over the whole vocabulary); student_log_rest: (N,) log p_R computed from the
    logits (`losses.language_modeling.token_logps_at(rest_from=...)`): 1 − Σ p_v rounds to 0 in
    float32 once the student puts all but ~1e-8 of its mass on S, and would then be clamped; without
    it, p_R is formed from the sum. Returns (N,). It is the full-vocabulary KL when S
    holds every token (q_R = 0), and never above it: merging outcomes cannot raise a KL
    divergence (the data-processing inequality), so a small k under-counts, never over-counts.
    Storing k instead of V values per position is what makes keeping the teacher affordable.
    Worked example: q = (0.5, 0.3 | R 0.2), p = (0.4, 0.4 | R 0.2) gives
    0.5 ln(5/4) + 0.3 ln(3/4) + 0 = 0.11157 − 0.08630 = 0.02527 nats.
    """
    q = teacher_logps.exp()
    head = (q * (teacher_logps - student_logps)).sum(-1)  # Σ_S q (log q − log p)
    q_rest = (1.0 - q.sum(-1)).clamp(min=0.0)
    if student_log_rest is None:
        student_log_rest = (1.0 - student_logps.exp().sum(-1)).clamp(min=torch.finfo(student_logps.dtype).tiny).log()
    # −inf when S is the whole vocabulary (q_R = 0 there): clamped so the untaken branch's gradient is not NaN
    log_p_rest = student_log_rest.clamp(min=-1e4)
    rest = torch.where(q_rest > 0, q_rest * (q_rest.clamp(min=torch.finfo(q.dtype).tiny).log() - log_p_rest),
                       torch.zeros_like(q_rest))
    return head + rest


@torch.no_grad()
def agem_project(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """A-GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM", Eq. 11), in place:

        g ← g − (gᵀg_ref / g_refᵀg_ref) · g_ref   when gᵀg_ref < 0,   else g unchanged

    g is the step's gradient over all tensors in `grads`, g_ref the gradient of the loss on
    retain data (`reference`, parallel, same shapes). After it gᵀg_ref ≥ 0: a plain gradient step
    no longer raises the retain loss, to first order. An AdamW step is not along g (per-weight
    scaling, momentum), so there it is a weaker guarantee: measured, it lowers forgetting without
    stopping it (benchmarks/results/forgetting_stages.md). Returns gᵀg_ref before the projection."""
    dot = sum(float((g.double() * r.double()).sum()) for g, r in zip(grads, reference, strict=True))
    if dot >= 0:
        return dot
    norm = sum(float(r.double().pow(2).sum()) for r in reference)
    if norm > 0:
        for g, r in zip(grads, reference):
            g.sub_(r.to(g.dtype), alpha=dot / norm)
    return dot
