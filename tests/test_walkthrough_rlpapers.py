"""An RL-papers walk: the online-RL algorithms read against the papers they cite.

Walked: README's "Online RL: GRPO and RLOO" and "Online RL: PPO" sections and the config reference
for grpo / rloo / ppo, `losses/policy_gradient.py`, `train/grpo.py`, `train/rollouts.py`,
`train/ppo.py` and `config/rl.py`, as an RL researcher checks them: GRPO (Shao et al. 2024: group
z-score advantages, the per-token clipped surrogate, the KL penalty to the reference with β, the
1/|o_i| normalisation of `grpo.aggregation=sequence`), the variants README names (Dr. GRPO without
the std, DAPO's token-level normalisation), RLOO (Ahmadian et al. 2024: r_i minus the mean of the
other G − 1), and PPO (Ziegler et al. 2019 / Ouyang et al. 2022: the per-token KL penalty in the
reward, GAE with γ and λ, whitening, the clipped surrogate and value loss, the entropy bonus and the
adaptive KL controller), with the defaults against the papers and TRL, and the logged figures
(kl, clip_fraction, entropy, approx_kl) against their names.

What was right (most of it already pinned by test_losses_policy_gradient.py, test_rl_edges.py,
test_grpo*.py and test_ppo*.py, so not repeated here): the group z-score (population std, + 1e-4,
in float64) and Dr. GRPO's plain centring; the leave-one-out baseline; the clipped surrogate, its
clip fraction (the tokens whose gradient the clip cuts) and approx_kl (k3 of KL(π_old‖π) under
π_old's samples); the shaped rewards, GAE and returns; the ppo2 value loss; the controller inside
its range; the defaults (clip 0.2, value clip 0.2, vf 0.1, γ 1, λ 0.95, β 0.05, target 6, horizon
10,000: TRL's). New here: what each `grpo.kl_estimator` does to the policy, not only what it
reads. A KL penalty in a loss acts through its gradient; under the policy's own samples the
expected gradient of β·k2 per token is exactly β∇KL(π‖π_ref), that of β·k3 (GRPO's) is
β∇KL(π_ref‖π), which also pulls towards the reference, and that of β·k1 is zero: a k1 penalty
estimates the KL's value but regularises nothing. And the adaptive controller, β·(1 + e·n/H), is
negative past its range (more than 5·H responses in a rollout) where nothing bounds it.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 33: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import pytest
import torch

D = torch.float64
V = 6  # a next-token distribution small enough to take expectations exactly


# --------------------------------------------------------------------------- GRPO's KL penalty, by its gradient


def _expected_penalty_gradient(monkeypatch, estimator: str, beta: float, z: torch.Tensor,
                               z_ref: torch.Tensor) -> torch.Tensor:
    """E_{a~π}[∇_z loss(a)] of `GroupPolicyLoss` on one-token completions a, advantage 0 (so only
    the β·KL term is left), the policy's logits z and the reference's z_ref. The model forward is
    replaced by log_softmax(z)[a]: what is measured is how the loss turns the estimator into a
    gradient, taken exactly over the V tokens."""
    import posttrain.train.grpo as grpo
    from posttrain.config.rl import GRPOLossConfig

    current: dict = {}

    def forward(model, batch, chunk_size=256, value_head=None, entropy_grad=True, temperature=1.0, entropy=True):
        return {"logps": current["logps"], "entropy": torch.zeros_like(current["logps"])}

    monkeypatch.setattr(grpo, "completion_forward", forward)
    loss = grpo.GroupPolicyLoss(None, GRPOLossConfig(beta=beta, kl_estimator=estimator, aggregation="sequence"))
    pi = z.detach().softmax(-1)
    ref = z_ref.log_softmax(-1)
    total = torch.zeros_like(z)
    for a in range(V):
        current["logps"] = z.log_softmax(-1)[a].view(1, 1)
        value, _ = loss(advantages=torch.zeros(1, dtype=D), ref_logps=ref[a].view(1, 1),
                        response_mask=torch.ones(1, 1, dtype=D))
        (grad,) = torch.autograd.grad(value, z)
        total += pi[a] * grad
    return total


def _kl_gradient(z: torch.Tensor, z_ref: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """∇_z KL(π_z‖π_ref) (or KL(π_ref‖π_z) with `reverse`), float64 by autograd on the closed form."""
    logp, logref = z.log_softmax(-1), z_ref.log_softmax(-1)
    if reverse:
        kl = (logref.exp() * (logref - logp)).sum()
    else:
        kl = (logp.exp() * (logp - logref)).sum()
    (grad,) = torch.autograd.grad(kl, z)
    return grad


def _logits(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(V, generator=g, dtype=D).requires_grad_(True)
    return z, torch.randn(V, generator=g, dtype=D)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_k2_penalty_has_the_gradient_of_beta_times_kl_policy_to_reference(monkeypatch, seed):
    """k2 = ½(log π − log π_ref)²: its gradient (log π − log π_ref)∇log π averages, under π, to
    ∇KL(π‖π_ref) exactly — the penalty README writes, β · KL(π‖π_ref) per token."""
    z, z_ref = _logits(seed)
    beta = 0.3
    got = _expected_penalty_gradient(monkeypatch, "k2", beta, z, z_ref)
    want = beta * _kl_gradient(z, z_ref)
    assert want.norm() > 1e-2
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (got.tolist(), want.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_k3_penalty_pulls_towards_the_reference_with_the_gradient_of_the_reverse_kl(monkeypatch, seed):
    """k3, GRPO's estimator (Shao et al. 2024, Eq. 4): its gradient (1 − π_ref/π)∇log π averages,
    under π, to ∇KL(π_ref‖π) — not the gradient of the KL(π‖π_ref) it estimates, but one that also
    vanishes at π = π_ref and descends towards it (as in the paper and TRL)."""
    z, z_ref = _logits(seed)
    beta = 0.3
    got = _expected_penalty_gradient(monkeypatch, "k3", beta, z, z_ref)
    assert torch.allclose(got, beta * _kl_gradient(z, z_ref, reverse=True), rtol=1e-5, atol=1e-7)
    forward = _kl_gradient(z, z_ref)
    assert float(got @ forward) > 0  # a step along −got lowers KL(π‖π_ref) to first order


def test_grpo_k1_penalty_pulls_the_policy_towards_the_reference(monkeypatch):
    """README: the step minimises the surrogate "plus β · KL(π‖π_ref) per token when grpo.beta > 0
    (k1, k2 or k3)". k1 = log π − log π_ref is an unbiased estimate of the KL's value, but as a
    loss its gradient is ∇log π(a), whose mean under π is Σ_a ∇π(a) = 0: whatever β, the penalty
    moves the policy nowhere in expectation (only adds noise). Right: the k1 penalty has the
    gradient of the KL, as the reward-side k1 (REINFORCE with sg(log π − log π_ref)) has; or
    `grpo.kl_estimator=k1` with β > 0 is refused up front."""
    from posttrain.config import GRPOConfig, validate_grpo
    from posttrain.errors import ConfigError

    try:
        validate_grpo(GRPOConfig.load(None, ["grpo.beta=0.04", "grpo.kl_estimator=k1"]))
    except ConfigError:
        return  # refused, with its reason: a right fix too
    z, z_ref = _logits(0)
    beta = 0.3
    got = _expected_penalty_gradient(monkeypatch, "k1", beta, z, z_ref)
    want = beta * _kl_gradient(z, z_ref)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-7), (
        f"expected gradient of the β·k1 term has norm {float(got.norm()):.2e}; β∇KL(π‖π_ref) has "
        f"{float(want.norm()):.3f}")


# --------------------------------------------------------------------------- PPO's adaptive KL controller


def _stage_after_one_rollout(overrides: list[str], observed_kl: float, responses: int):
    """A PPOStage's `_finish_rollout` (where β is adapted) on one rollout of `responses` one-token
    completions whose KL to the reference per response is `observed_kl`; returns the stage."""
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import PPOStage

    cfg = PPOConfig.load(None, overrides)
    stage = PPOStage.__new__(PPOStage)  # the controller's state only: no model, no rollout engine
    stage.cfg, stage.kl_coef, stage.uses_reference, stage.rollout_metrics = cfg, cfg.ppo.kl_coef, True, {}
    g = torch.Generator().manual_seed(0)
    batch = {"response_mask": torch.ones(responses, 1), "advantages": torch.randn(responses, 1, generator=g),
             "old_values": torch.randn(responses, 1, generator=g), "returns": torch.randn(responses, 1, generator=g)}
    stage._finish_rollout([batch], torch.full((responses,), observed_kl, dtype=D))
    return stage


def test_adaptive_beta_stays_positive_when_a_rollout_outnumbers_the_horizon():
    """β ← β·(1 + e·n/H) with e ≥ −0.2 is negative once n/H > 5: 64 responses a rollout and
    ppo.kl_horizon=10 (both accepted; README: "at most 20% per kl_horizon responses") give
    β·(1 − 1.28) after one rollout under the target, a reward for moving away from the reference,
    and n/H = 5 exactly leaves β at 0 for good. Right: β stays positive (compounded,
    β·(1 + e)^(n/H), or the step capped), or such a horizon is refused up front."""
    from posttrain.config import PPOConfig, validate_ppo
    from posttrain.errors import ConfigError

    over = ["ppo.kl_control=adaptive", "ppo.kl_coef=0.05", "ppo.kl_target=6", "ppo.kl_horizon=10",
            "train.batch_size=64"]
    try:
        validate_ppo(PPOConfig.load(None, over))
    except ConfigError:
        return  # refused, with its reason: a right fix too
    stage = _stage_after_one_rollout(over, observed_kl=0.0, responses=64)
    assert 0 < stage.kl_coef < 0.05, f"β after one rollout under the target: {stage.kl_coef:.4f} (from 0.05)"
