"""Preference losses: reward models and direct preference optimisation. Pure tensor functions.

Inputs are per-example scalars the stage has already computed: reward-model scores, or
sequence log-probabilities log π(y|x) (summed over the response tokens, or averaged where
the method says so). Each function returns per-example losses (B,) — the caller sums or
averages — and, where useful, detached per-example quantities for metrics.

Notation: h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)),
the difference of the implicit rewards of the chosen (w) and rejected (l) response, per β.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# --------------------------------------------------------------------------- reward models


def bradley_terry_loss(chosen_rewards: Tensor, rejected_rewards: Tensor, margin: Tensor | float = 0.0,
                       centering: float = 0.0) -> Tensor:
    """Reward-model loss for pairs (Bradley & Terry 1952; InstructGPT, Ouyang et al. 2022, Eq. 1).

    L = −log σ(r_w − r_l − m) + c · (r_w + r_l)²
    m: optional per-pair margin (Llama 2 uses one for "significantly better" pairs);
    c: reward-centering coefficient (Eisenstein et al. 2023), which keeps rewards near zero
    since the pairwise term is blind to a shared offset. Shapes: (B,) → (B,).
    """
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - margin)
    if centering:
        losses = losses + centering * (chosen_rewards + rejected_rewards) ** 2
    return losses


def ranking_loss(rewards: Tensor, ranks: Tensor, valid: Tensor | None = None, centering: float = 0.0,
                 margins: Tensor | None = None) -> Tensor:
    """K-way ranking loss, every prompt weighted equally (InstructGPT, Ouyang et al. 2022, Eq. 1).

    rewards (P, K): scores of the K responses to each of P prompts; ranks (P, K): 0 = best,
    equal ranks are ties (no pair); valid (P, K) bool masks responses that are absent when
    prompts have fewer than K. For each prompt, over all pairs (i, j) with rank_i < rank_j:

        L_prompt = −1/|pairs| · Σ log σ(r_i − r_j)

    so a prompt with 9 responses (36 pairs) weighs as much as one with 2 (1 pair).
    centering c adds c · (2/K' · Σ_k r_k)² over the K' valid responses, which is
    Bradley-Terry's c · (r_w + r_l)² when K' = 2. margins (P,): a pair's margin m, as in
    Bradley-Terry (−log σ(r_w − r_l − m)), for prompts with K' = 2 (ignored for rankings), so
    pairs keep their margins in a batch that also holds rankings. Returns (P,); a prompt
    without any ordered pair (all tied) gets only the centering term.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (P, K, K): i beats j
    differences = rewards[:, :, None] - rewards[:, None, :]
    if margins is not None:
        differences = differences - torch.where(valid.sum(dim=1) == 2, margins, 0.0).to(differences.dtype)[:, None, None]
    pair_losses = -F.logsigmoid(differences)
    counts = better.sum(dim=(1, 2))
    total = torch.where(better, pair_losses, torch.zeros_like(pair_losses)).sum(dim=(1, 2))
    losses = total / counts.clamp(min=1)
    if centering:
        present = valid.to(rewards.dtype)
        mean = (rewards * present).sum(dim=1) / present.sum(dim=1).clamp(min=1)
        losses = losses + centering * (2 * mean) ** 2
    return losses


# --------------------------------------------------------------------------- direct preference methods


def _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta):
    chosen = beta * (policy_chosen_logps - ref_chosen_logps)
    rejected = beta * (policy_rejected_logps - ref_rejected_logps)
    return chosen, rejected


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
             ref_rejected_logps: Tensor, beta: float, label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, Eq. 7); conservative DPO with ε > 0.

    L = −(1 − ε) log σ(β h) − ε log σ(−β h)
    ε = label_smoothing: the probability that a pair's label is flipped (cDPO, Mitchell 2023);
    ε = 0 is DPO. Returns (losses, chosen_rewards, rejected_rewards), rewards = β·log-ratio, detached.
    The ε term is added only when ε > 0: a rejected response of probability 0 (log-prob −inf,
    from a model that masks tokens) gives βh = +inf, where DPO's loss is 0 but 0 · log σ(−βh) is NaN.
    """
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta)
    logits = chosen - rejected  # β h
    losses = -(1 - label_smoothing) * F.logsigmoid(logits)
    if label_smoothing:
        losses = losses - label_smoothing * F.logsigmoid(-logits)
    return losses, chosen.detach(), rejected.detach()


def ipo_loss(policy_chosen_avg_logps: Tensor, policy_rejected_avg_logps: Tensor, ref_chosen_avg_logps: Tensor,
             ref_rejected_avg_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Identity Preference Optimisation (Azar et al. 2023, Eq. 17), on per-token average log-probs.

    L = (h − 1/(2β))²,  h = (ā(y_w) − ā_ref(y_w)) − (ā(y_l) − ā_ref(y_l))   (h not multiplied by β)
    ā(y) = log π(y|x) / |y|: a response's log-prob averaged over its tokens, for the policy and
    the reference alike. Regresses h to a fixed target instead of pushing it to infinity; β is
    the paper's τ. Eq. 17 is written on whole-sequence log-probs; its authors later advised
    averaging them per token, as TRL's DPOTrainer does for loss_type="ipo", and so does this: on
    sums the target 1/(2β) is a total over the response (β = 0.1 asks a 100-token answer for
    5 nats in all, 0.05 a token), so one β means less the longer the answers, and a β tuned in
    TRL would not carry over. Returns (losses, chosen_rewards, rejected_rewards), rewards =
    β · average log-ratio, detached.
    """
    chosen, rejected = _implicit_rewards(policy_chosen_avg_logps, policy_rejected_avg_logps, ref_chosen_avg_logps,
                                         ref_rejected_avg_logps, beta)
    h = (policy_chosen_avg_logps - ref_chosen_avg_logps) - (policy_rejected_avg_logps - ref_rejected_avg_logps)
    return (h - 1 / (2 * beta)) ** 2, chosen.detach(), rejected.detach()


def hinge_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, ref_chosen_logps: Tensor,
               ref_rejected_logps: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Hinge loss on the implicit-reward margin (SLiC-HF, Zhao et al. 2023, Eq. 1 with the reference).

    L = max(0, 1 − β h)
    """
    chosen, rejected = _implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                                         ref_rejected_logps, beta)
    return torch.relu(1 - (chosen - rejected)), chosen.detach(), rejected.detach()


def simpo_loss(policy_chosen_avg_logps: Tensor, policy_rejected_avg_logps: Tensor, beta: float,
               gamma: float) -> tuple[Tensor, Tensor, Tensor]:
    """SimPO: reference-free, length-normalised (Meng et al. 2024, Eq. 6).

    L = −log σ(β/|y_w| · log π(y_w|x) − β/|y_l| · log π(y_l|x) − γ)
    Inputs are the *average* per-token log-probs; γ is the target reward margin.
    Returns (losses, chosen_rewards, rejected_rewards) with reward = β · average log-prob.
    """
    chosen, rejected = beta * policy_chosen_avg_logps, beta * policy_rejected_avg_logps
    return -F.logsigmoid(chosen - rejected - gamma), chosen.detach(), rejected.detach()


def log_odds(avg_logps: Tensor) -> Tensor:
    """log(p / (1 − p)) for p = exp(avg_logps) < 1, computed stably as x − log(−expm1(x)).

    x is capped at −ε (the dtype's machine epsilon): a float32 log-softmax returns exactly 0 once
    the target's logit leads the rest by ~17 + log V, where p = 1 makes the odds infinite and
    ORPO's ratio inf − inf. Capped, such a sequence's odds saturate (log odds ≈ −log ε, ~16 in
    float32) and pass no gradient, as a probability already at 1 should."""
    x = avg_logps.clamp(max=-torch.finfo(avg_logps.dtype).eps)
    return x - torch.log(-torch.expm1(x))


def orpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, chosen_nll: Tensor,
              lam: float) -> tuple[Tensor, Tensor]:
    """Odds-Ratio Preference Optimization (Hong et al. 2024, Eqs. 6–7): SFT + odds-ratio term, no reference.

    odds(y|x) = P(y|x) / (1 − P(y|x)),  P(y|x) = exp(average token log-prob)
    L = L_SFT − λ · log σ(log odds(y_w|x) − log odds(y_l|x))
    chosen_nll: the SFT loss on the chosen response (mean token NLL). Returns (losses, the
    log-odds ratio, detached) — the ratio is ORPO's own metric.

    A K-way ranking is taken as its ordered pairs, and L_SFT is the paper's SFT loss on the
    *preferred* response: the stage passes each pair its share of the best response's NLL
    (`train.preference.chosen_nll`: the pairs whose y_w is of the best rank split it, the others
    get 0), not the NLL of every y_w that beats another — that would train the 2nd of 4 (the 6th
    of 7) as an answer, in the verifiable synthetic rankings a wrong one. A pair's chosen_nll is
    its own y_w's NLL, unchanged.
    """
    ratio = log_odds(chosen_avg_logps) - log_odds(rejected_avg_logps)
    return chosen_nll - lam * F.logsigmoid(ratio), ratio.detach()


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, kl_estimate: Tensor, beta: float,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """Kahneman–Tversky Optimization for unpaired feedback (Ethayarajh et al. 2024, Eq. 8).

    r = log π(y|x) − log π_ref(y|x);  z₀ = the batch KL estimate (detached, clamped at 0)
    v = λ_D σ(β (r − z₀)) if y is desirable,  λ_U σ(β (z₀ − r)) otherwise
    L = λ_y − v
    desirable: (B,) bool. kl_estimate: a scalar, e.g. the mean of r over mismatched
    (x, y') pairs. Returns (losses, rewards β·r detached).
    """
    z0 = kl_estimate.detach().clamp(min=0)
    r = policy_logps - ref_logps
    weights = torch.where(desirable, torch.full_like(r, desirable_weight), torch.full_like(r, undesirable_weight))
    value = torch.where(desirable, torch.sigmoid(beta * (r - z0)), torch.sigmoid(beta * (z0 - r)))
    return weights - weights * value, (beta * r).detach()
