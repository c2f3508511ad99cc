"""Policy-gradient losses for online RL (PPO, GRPO, RLOO). Pure tensor functions.

Shapes: B sequences, T response positions. Per-token tensors are (B, T) and come with a
`mask` (B, T) that is 1 on response tokens and 0 on padding; per-sequence tensors are (B,).
`logps` are log π(a_t | s_t) of the sampled tokens. Functions return per-token (or
per-sequence) values and leave the reduction to `masked_mean` / `aggregate`, so the
normalisation (token-level vs sequence-level) is one explicit choice, not a hidden one.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# --------------------------------------------------------------------------- reductions


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Σ values·mask / Σ mask (over `dim`, or everything); 0 where the mask is empty."""
    mask = mask.to(values.dtype)
    if dim is None:
        return (values * mask).sum() / mask.sum().clamp(min=1)
    return (values * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def aggregate(per_token: Tensor, mask: Tensor, mode: str, max_tokens: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    token     Σ_b Σ_t l_bt / Σ_b T_b: every token weighs the same, so long responses count
              more (DAPO, Yu et al. 2025, §3.3).
    sequence  1/B Σ_b (1/T_b Σ_t l_bt): every response weighs the same, so each token of a
              long response counts less (GRPO as written, Shao et al. 2024, Eq. 3).
    constant  Σ_b Σ_t l_bt / (B · L), L = `max_tokens` (the generation budget): every token
              weighs the same, by a constant that depends on neither the responses' lengths
              nor the batch's token count (Dr. GRPO, Liu et al. 2025, §3.2).
    """
    if mode == "token":
        return masked_mean(per_token, mask)
    if mode == "sequence":
        return masked_mean(per_token, mask, dim=1).mean()
    if mode == "constant":
        if max_tokens is None:
            raise ValueError("constant aggregation divides by max_tokens (the generation budget); pass it")
        return (per_token * mask.to(per_token.dtype)).sum() / (per_token.shape[0] * max_tokens)
    raise ValueError(f"unknown loss aggregation {mode!r}; use 'token', 'sequence' or 'constant'")


def whiten(values: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked entries (mean kept when shift_mean=False); padding → 0."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(values.dtype)


# --------------------------------------------------------------------------- KL to the reference


def kl_k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k1 = log π(a|s) − log π_ref(a|s): unbiased for KL(π‖π_ref) under a ~ π, high variance,
    can be negative per token (Schulman 2020, "Approximating KL Divergence")."""
    return logps - ref_logps


def kl_k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k2 = ½ (log π_ref − log π)²: biased, low variance, ≥ 0 (Schulman 2020)."""
    return 0.5 * (ref_logps - logps) ** 2


def kl_k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """k3 = (π_ref/π − 1) − log(π_ref/π): unbiased, low variance, ≥ 0 (Schulman 2020); the
    per-token penalty of GRPO (Shao et al. 2024, Eq. 4)."""
    log_ratio = ref_logps - logps
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logps: Tensor, ref_logps: Tensor, estimator: str) -> Tensor:
    """The per-token KL term of a loss (GRPO's β·KL), from tokens the policy sampled. Its value
    is the estimator's; what regularises is its gradient, whose mean under a ~ π is

        k1  ∇KL(π‖π_ref), by the score-function form  sg(k1) + sg(k1) · (log π − sg(log π)):
            k1 itself as a loss has gradient ∇log π(a), whose mean Σ_a ∇π(a) is 0 — it would
            estimate the KL's value and pull nowhere. The form's gradient, sg(k1)·∇log π, is
            k2's exactly; its value stays k1's (unbiased, as a user picks k1 for).
        k2  ∇KL(π‖π_ref): ∇k2 = (log π − log π_ref)·∇log π.
        k3  ∇KL(π_ref‖π): ∇k3 = (1 − π_ref/π)·∇log π — the reverse KL's gradient, as in GRPO
            (Shao et al. 2024, Eq. 4) and TRL; it too vanishes at π = π_ref and points towards it.

    With several updates per rollout (μ > 1) the tokens come from π_old, not π, so these hold
    only to the extent that π stays near π_old (as in the paper and TRL, no importance weight)."""
    kl = KL_ESTIMATORS[estimator](logps, ref_logps)
    if estimator != "k1":
        return kl
    value = kl.detach()
    return value + value * (logps - logps.detach())


def adaptive_kl_coef(coef: float, observed_kl: float, target: float, horizon: float, steps: int) -> float:
    """One update of the adaptive KL controller (Ziegler et al. 2019, §2.2), over `steps`
    responses (n) with horizon H:

        e = clip(KL_observed / KL_target − 1, −0.2, 0.2);   β ← β · (1 + e)^(n / H)

    The paper's step, β · (1 + e · n/H), compounded: every H responses move β by the factor
    1 + e ∈ [0.8, 1.2] whatever the rollout size, so β stays positive. The two agree to first
    order in e (for n ≪ H they differ by about (n/H)·e²/2, a tenth of the step at most); the
    linear step turns β negative once a rollout holds more than 5·H responses (e · n/H < −1),
    and leaves it at 0 for good at exactly 5·H. A pure function of the coefficient, so
    resuming needs only β itself."""
    error = min(max(observed_kl / target - 1.0, -0.2), 0.2)
    return coef * (1.0 + error) ** (steps / horizon)


# --------------------------------------------------------------------------- advantages


def shaped_rewards(scores: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token PPO rewards (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022, Eq. 2):

        r_t = −β · KL_t,  plus the sequence score on the response's last token.

    scores (B,), kl (B, T) per-token estimates, mask (B, T) → (B, T)."""
    rewards = -kl_coef * kl * mask
    last = (mask.long().cumsum(1).argmax(1))  # index of the last response token (first max of the running count)
    return rewards.scatter_add(1, last[:, None], scores[:, None].to(rewards.dtype))


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016, Eq. 16), per response token:

        δ_t = r_t + γ V(s_{t+1}) − V(s_t),     A_t = δ_t + γλ A_{t+1}

    with V = 0 after a response's last token (the episode ends there). Returns (advantages,
    returns = advantages + values), both (B, T) and zero on padding; neither carries a
    gradient (they are targets)."""
    rewards, values, mask = rewards.detach(), values.detach(), mask.to(rewards.dtype)
    values = values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]  # padding resets: nothing flows across the end
        advantages[:, t] = running
    return advantages, (advantages + values) * mask


def group_advantages(rewards: Tensor, group_size: int, scale_by_std: bool = True, eps: float = 1e-4) -> Tensor:
    """GRPO's group-relative advantage (Shao et al. 2024, §4.1.2): per prompt's G samples,

        A_i = (r_i − mean(r)) / (std(r) + ε),   or r_i − mean(r) without std scaling
                                                (Dr. GRPO, Liu et al. 2025, drops it: std
                                                scaling favours prompts that are almost
                                                always right or wrong).

    rewards (N·G,) laid out prompt by prompt → (N·G,). std is the population std (ddof 0), as
    the paper's; TRL's GRPOTrainer takes torch.std's (ddof 1), so its advantages are √((G−1)/G)
    times these.
    Computed in float64: a group of equal float32 rewards then has a mean equal to each of
    them and advantage 0, where float32's round-off in the mean and the std, divided by
    that std + ε, gave every sample the same sizeable advantage."""
    grouped = rewards.double().view(-1, group_size)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale_by_std:
        centred = centred / (grouped.std(1, unbiased=False, keepdim=True) + eps)
    return centred.reshape(-1).to(rewards.dtype)


def rloo_advantages(rewards: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out baseline (Kool et al. 2019; Ahmadian et al. 2024, Eq. 6):

        A_i = r_i − 1/(G−1) Σ_{j≠i} r_j  =  G/(G−1) · (r_i − mean(r))

    rewards (N·G,) prompt by prompt → (N·G,). Needs G ≥ 2."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 samples per prompt")
    grouped = rewards.double().view(-1, group_size)  # float64, as group_advantages
    others = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - others).reshape(-1).to(rewards.dtype)


def kl_penalised_rewards(scores: Tensor, logps: Tensor, ref_logps: Tensor, mask: Tensor, beta: float) -> Tensor:
    """RLOO's reward with its KL penalty (Ahmadian et al. 2024, §3, and TRL's RLOOTrainer),

        r'_i = r_i − β · Σ_t (log π_old(y_it) − log π_ref(y_it)),

    the sequence's k1 = log π_old(y_i|x) / π_ref(y_i|x), summed over its response tokens and
    taken from the rollout-time policy's log-probs: part of the reward, so no gradient flows
    through it. The leave-one-out baseline is then taken of r', so the policy-gradient step on
    β·k1 is REINFORCE's estimate of β·∇KL(π‖π_ref). scores (B,), logps / ref_logps / mask (B, T)
    → (B,), in float64."""
    kl = (kl_k1(logps.double(), ref_logps.double()) * mask.double()).sum(1)
    return scores.double() - beta * kl


# --------------------------------------------------------------------------- the clipped objectives


def clipped_policy_loss(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor,
                        clip_eps: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate (Schulman et al. 2017, Eq. 7), per token, as a loss to minimise:

        ρ_t = π(a_t|s_t) / π_old(a_t|s_t),   l_t = −min(ρ_t A_t, clip(ρ_t, 1−ε, 1+ε) A_t)

    advantages broadcast: (B, T) per token, or (B, 1) per sequence (GRPO / RLOO). Returns
    per-token losses (B, T) and detached metrics: clip fraction and the approximate KL
    k3 estimate of KL(π_old‖π) over the masked tokens (PPO's early-stopping signal), and
    both per token (`clipped_tokens`, 1 where clipped, and `approx_kl_tokens`, (B, T), 0 on
    padding), for a caller that reduces them as its loss (sequence aggregation)."""
    log_ratio = logps - old_logps
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    losses = -torch.minimum(unclipped, clipped)
    with torch.no_grad():
        clipped_tokens = (clipped < unclipped).to(logps.dtype)
        # k3 of KL(π_old‖π) from tokens π_old sampled: (ρ − 1) − log ρ, ρ = π/π_old
        kl_tokens = torch.expm1(log_ratio) - log_ratio
        metrics = {"clip_fraction": masked_mean(clipped_tokens, mask), "approx_kl": masked_mean(kl_tokens, mask),
                   "clipped_tokens": clipped_tokens * mask, "approx_kl_tokens": kl_tokens * mask}
    return losses * mask, metrics


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
                       clip_range: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped value loss (as in OpenAI baselines' ppo2), per token:

        l_t = ½ · max((V_t − R_t)², (V_old,t + clip(V_t − V_old,t, −c, c) − R_t)²)

    Returns per-token losses (B, T) and the detached fraction of tokens where the clipped
    term was the larger, also per token (`value_clipped_tokens`, (B, T), 1 where clipped)."""
    clipped_values = old_values + (values - old_values).clamp(-clip_range, clip_range)
    plain, clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    losses = 0.5 * torch.maximum(plain, clipped)
    with torch.no_grad():
        clipped_tokens = (clipped > plain).to(values.dtype)
        metrics = {"value_clip_fraction": masked_mean(clipped_tokens, mask), "value_clipped_tokens": clipped_tokens * mask}
    return losses * mask, metrics


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> float:
    """1 − Var(R − V) / Var(R) over the masked tokens: 1 is a perfect critic, ≤ 0 a useless one."""
    var_returns = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    residual = returns - values
    var_residual = masked_mean((residual - masked_mean(residual, mask)) ** 2, mask)
    return float(1.0 - var_residual / var_returns) if float(var_returns) > 0 else math.nan
