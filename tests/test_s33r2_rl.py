"""Stop 33 (RL papers walk): GRPO's KL penalty by its gradient, the compounded adaptive β, and
grpo.scale_rewards refused where RLOO never reads it."""

from __future__ import annotations

import pytest
import torch

from posttrain.losses import policy_gradient as pg

D = torch.float64


def _logps(seed: int, shape=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(shape, generator=g, dtype=D) * 3).requires_grad_(True)
    return logps, -torch.rand(shape, generator=g, dtype=D) * 3


@pytest.mark.parametrize("estimator", ["k2", "k3"])
def test_kl_penalty_is_the_estimator_itself_for_k2_and_k3(estimator):
    """Bit for bit: value and gradient of k2 / k3 as the loss used them before."""
    logps, ref = _logps(0)
    new = pg.kl_penalty(logps, ref, estimator)
    old = pg.KL_ESTIMATORS[estimator](logps, ref)
    assert torch.equal(new, old)
    (g_new,) = torch.autograd.grad(new.sum(), logps)
    (g_old,) = torch.autograd.grad(old.sum(), logps)
    assert torch.equal(g_new, g_old)


def test_k1_penalty_keeps_k1s_value_and_takes_the_score_function_gradient():
    """Value: k1 exactly. Gradient per token: sg(k1)·∇log π, which is k2's gradient exactly."""
    logps, ref = _logps(1)
    penalty = pg.kl_penalty(logps, ref, "k1")
    assert torch.equal(penalty, pg.kl_k1(logps, ref))
    (grad,) = torch.autograd.grad(penalty.sum(), logps)
    assert torch.equal(grad, (logps - ref).detach())
    (k2_grad,) = torch.autograd.grad(pg.kl_k2(logps, ref).sum(), logps)
    assert torch.allclose(grad, k2_grad, rtol=0, atol=1e-15)


def test_grpo_loss_with_k1_pulls_towards_the_reference_in_expectation():
    """Over a 6-token distribution, E_{a~π}[∇ β·penalty(a)] = β ∇KL(π‖π_ref) for k1 (was 0)."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, generator=g, dtype=D).requires_grad_(True)
    z_ref = torch.randn(6, generator=g, dtype=D)
    logp, logref = z.log_softmax(-1), z_ref.log_softmax(-1)
    expected = sum(logp[a].exp().detach() * pg.kl_penalty(logp[a], logref[a], "k1") for a in range(6))
    (got,) = torch.autograd.grad(expected, z, retain_graph=True)
    (want,) = torch.autograd.grad((logp.exp() * (logp - logref)).sum(), z)
    assert float(want.norm()) > 1e-2
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_adaptive_beta_compounds_and_stays_positive():
    # every horizon's worth of responses moves β by exactly the clipped factor 1 + e
    assert pg.adaptive_kl_coef(0.1, 12.0, 6.0, 1_000, 1_000) == pytest.approx(0.12, rel=1e-12)
    assert pg.adaptive_kl_coef(0.1, 0.0, 6.0, 1_000, 2_000) == pytest.approx(0.1 * 0.8 ** 2, rel=1e-12)
    assert pg.adaptive_kl_coef(0.1, 5.4, 6.0, 1_000, 100) == pytest.approx(0.1 * 0.9 ** 0.1, rel=1e-12)
    assert pg.adaptive_kl_coef(0.1, 6.0, 6.0, 1_000, 100) == 0.1  # on target: unchanged
    # the linear step gave 0 at n = 5H and a negative β beyond; the compounded one stays positive
    for n in (50, 64, 1_000):
        beta = pg.adaptive_kl_coef(0.05, 0.0, 6.0, 10, n)
        assert 0 < beta < 0.05, (n, beta)
    # to first order in the error, the paper's linear step (n ≪ H)
    small = pg.adaptive_kl_coef(0.1, 6.06, 6.0, 10_000, 256)  # e = 0.01
    assert small == pytest.approx(0.1 * (1 + 0.01 * 256 / 10_000), rel=1e-5)


def test_scale_rewards_false_is_refused_under_rloo_and_accepted_under_grpo():
    from posttrain.config import GRPOConfig, validate_grpo
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match="grpo.scale_rewards=False does nothing with grpo.advantage=rloo"):
        validate_grpo(GRPOConfig.load(None, ["grpo.advantage=rloo", "grpo.scale_rewards=false"]))
    validate_grpo(GRPOConfig.load(None, ["grpo.advantage=rloo", "grpo.scale_rewards=true"]))  # the default
    validate_grpo(GRPOConfig.load(None, ["grpo.advantage=grpo", "grpo.scale_rewards=false"]))  # Dr. GRPO
