"""Policy-gradient losses: hand-derived numbers, direct loop computations on float64 random
inputs, and the invariants each estimator promises (unbiasedness, sign, zero gradient where
PPO clips)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.policy_gradient import (
    adaptive_kl_coef,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    explained_variance,
    gae,
    group_advantages,
    kl_k1,
    kl_k2,
    kl_k3,
    masked_mean,
    rloo_advantages,
    shaped_rewards,
    whiten,
)

t = lambda *values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float64)


def _random(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --------------------------------------------------------------------------- reductions


def test_token_and_sequence_aggregation_by_hand():
    losses = t([1.0, 2.0, 3.0], [4.0, 0.0, 0.0])
    mask = t([1, 1, 1], [1, 0, 0])
    assert float(aggregate(losses, mask, "token")) == pytest.approx(10 / 4)  # (1+2+3+4) / 4 tokens
    assert float(aggregate(losses, mask, "sequence")) == pytest.approx((2 + 4) / 2)  # mean of per-sequence means
    with pytest.raises(ValueError):
        aggregate(losses, mask, "batch")


def test_whiten_gives_zero_mean_unit_variance_on_the_masked_entries():
    out = whiten(_random((3, 4)) * 5 + 3, MASK)
    assert float(masked_mean(out, MASK)) == pytest.approx(0.0, abs=1e-12)
    assert float(masked_mean(out**2, MASK)) == pytest.approx(1.0, abs=1e-6)
    assert bool((out[MASK == 0] == 0).all())


# --------------------------------------------------------------------------- KL


def test_kl_estimators_by_hand():
    logp, ref = t(math.log(0.5)), t(math.log(0.25))
    assert float(kl_k1(logp, ref)) == pytest.approx(math.log(2))  # log 0.5 − log 0.25
    assert float(kl_k2(logp, ref)) == pytest.approx(0.5 * math.log(0.5) ** 2)  # ½ (log(0.25/0.5))²
    assert float(kl_k3(logp, ref)) == pytest.approx((0.5 - 1) - math.log(0.5))  # ratio 0.5: −0.5 + 0.6931


def test_k1_and_k3_are_unbiased_for_the_true_kl_and_k2_k3_are_never_negative():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(8, generator=g, dtype=torch.float64)
    p = torch.softmax(logits, 0)
    q = torch.softmax(logits + 0.3 * torch.randn(8, generator=g, dtype=torch.float64), 0)  # a policy near its reference
    exact = float((p * (p / q).log()).sum())  # KL(π‖π_ref)
    a = torch.multinomial(p, 400_000, replacement=True, generator=g)  # a ~ π
    logp, ref = p.log()[a], q.log()[a]
    assert float(kl_k1(logp, ref).mean()) == pytest.approx(exact, abs=0.002)
    assert float(kl_k3(logp, ref).mean()) == pytest.approx(exact, abs=0.002)
    assert bool((kl_k2(logp, ref) >= 0).all()) and bool((kl_k3(logp, ref) >= -1e-15).all())
    # the point of k3: far less variance than k1 while π stays near π_ref (Schulman 2020; not so when they are far apart)
    assert float(kl_k3(logp, ref).var()) < 0.2 * float(kl_k1(logp, ref).var())


def test_adaptive_kl_controller_by_hand():
    # observed twice the target: the error is clipped to +0.2; 256 steps of a 10,000 horizon, compounded
    assert adaptive_kl_coef(0.1, 12.0, 6.0, 10_000, 256) == pytest.approx(0.1 * (1 + 0.2) ** (256 / 10_000))
    # 10% under target: β shrinks by a factor (1 − 0.1) compounded over n / horizon
    assert adaptive_kl_coef(0.1, 5.4, 6.0, 1_000, 100) == pytest.approx(0.1 * (1 - 0.1) ** (100 / 1_000))
    assert adaptive_kl_coef(0.1, 6.0, 6.0, 1_000, 100) == pytest.approx(0.1)  # on target: unchanged


# --------------------------------------------------------------------------- advantages


def test_shaped_rewards_put_the_score_on_each_last_token():
    kl = torch.ones(3, 4, dtype=torch.float64)
    out = shaped_rewards(t(1.0, 2.0, 3.0), kl, MASK, kl_coef=0.1)
    expected = torch.tensor([[-0.1, -0.1, 0.9, 0.0], [-0.1, 1.9, 0.0, 0.0], [-0.1, -0.1, -0.1, 2.9]],
                            dtype=torch.float64)
    assert torch.allclose(out, expected)


def test_gae_by_hand():
    # one sequence of 2 tokens, γ = 0.9, λ = 0.5: δ_1 = 1 + 0 − 0.5 = 0.5; δ_0 = 0 + 0.9·0.5 − 0.2 = 0.25;
    # A_1 = 0.5; A_0 = 0.25 + 0.45·0.5 = 0.475; returns = A + V = (0.675, 1.0)
    adv, ret = gae(t([0.0, 1.0]), t([0.2, 0.5]), t([1, 1]), gamma=0.9, lam=0.5)
    assert torch.allclose(adv, t([0.475, 0.5])) and torch.allclose(ret, t([0.675, 1.0]))


def test_gae_equals_the_sum_of_discounted_deltas_per_sequence():
    rewards, values = _random((3, 4), 1), _random((3, 4), 2)
    gamma, lam = 0.95, 0.8
    adv, ret = gae(rewards, values, MASK, gamma, lam)
    for b in range(3):
        n = int(MASK[b].sum())
        v = [float(values[b, i]) for i in range(n)] + [0.0]  # V = 0 after the last token
        deltas = [float(rewards[b, i]) + gamma * v[i + 1] - v[i] for i in range(n)]
        for i in range(n):
            expected = sum((gamma * lam) ** k * deltas[i + k] for k in range(n - i))
            assert float(adv[b, i]) == pytest.approx(expected, abs=1e-12)
            assert float(ret[b, i]) == pytest.approx(expected + v[i], abs=1e-12)
        assert bool((adv[b, n:] == 0).all()) and bool((ret[b, n:] == 0).all())
    # γ = λ = 1: the advantage is the Monte-Carlo return minus the value
    adv, _ = gae(rewards, values, MASK, 1.0, 1.0)
    mc = (rewards * MASK).flip(1).cumsum(1).flip(1)
    assert torch.allclose(adv * MASK, (mc - values) * MASK)


def test_group_advantages_against_direct_statistics():
    rewards = _random((12,), 3)
    out = group_advantages(rewards, group_size=4)
    for g in range(3):
        r = rewards[4 * g : 4 * g + 4].tolist()
        mean = sum(r) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in r) / 4)
        for i in range(4):
            assert float(out[4 * g + i]) == pytest.approx((r[i] - mean) / (std + 1e-4), abs=1e-12)
    unscaled = group_advantages(rewards, group_size=4, scale_by_std=False)
    assert float(unscaled.view(3, 4).sum(1).abs().max()) < 1e-12  # centred per prompt
    same = group_advantages(t(1.0, 1.0, 1.0, 1.0), group_size=4)
    assert bool((same == 0).all())  # a prompt every sample solves (or none) teaches nothing


def test_rloo_is_leave_one_out_by_loop():
    rewards = _random((8,), 4)
    out = rloo_advantages(rewards, group_size=4)
    for g in range(2):
        r = rewards[4 * g : 4 * g + 4].tolist()
        for i in range(4):
            baseline = (sum(r) - r[i]) / 3
            assert float(out[4 * g + i]) == pytest.approx(r[i] - baseline, abs=1e-12)
    assert torch.allclose(out, 4 / 3 * group_advantages(rewards, 4, scale_by_std=False))
    with pytest.raises(ValueError):
        rloo_advantages(rewards, group_size=1)


# --------------------------------------------------------------------------- clipped objectives


def test_clipped_policy_loss_by_hand_and_no_gradient_where_clipped():
    old = torch.zeros(1, 4, dtype=torch.float64)
    logps = t(math.log(1.5), math.log(0.5), math.log(0.5), math.log(1.1))[None].requires_grad_(True)
    adv = t(1.0, 1.0, -1.0, 1.0)[None]
    losses, metrics = clipped_policy_loss(logps, old, adv, torch.ones(1, 4), clip_eps=0.2)
    # ρ=1.5, A=1 → −min(1.5, 1.2) = −1.2 (clipped); ρ=0.5, A=1 → −0.5; ρ=0.5, A=−1 → −min(−0.5, −0.8) = 0.8 (clipped);
    # ρ=1.1, A=1 → −1.1 (inside the range)
    assert torch.allclose(losses, t(-1.2, -0.5, 0.8, -1.1)[None])
    assert float(metrics["clip_fraction"]) == pytest.approx(0.5)
    losses.sum().backward()
    grad = logps.grad[0]
    assert grad[0] == 0 and grad[2] == 0  # clipped: no push further
    assert float(grad[1]) == pytest.approx(-0.5) and float(grad[3]) == pytest.approx(-1.1)  # −ρ·A


def test_clipped_policy_loss_against_the_formula_and_per_sequence_advantages():
    logps, old = _random((3, 4), 5) * 0.3, _random((3, 4), 6) * 0.3
    adv = _random((3, 1), 7)  # one advantage per sequence broadcasts over its tokens
    losses, metrics = clipped_policy_loss(logps, old, adv, MASK, clip_eps=0.2)
    for b in range(3):
        for i in range(4):
            ratio = math.exp(float(logps[b, i] - old[b, i]))
            a = float(adv[b, 0])
            expected = -min(ratio * a, min(max(ratio, 0.8), 1.2) * a) * float(MASK[b, i])
            assert float(losses[b, i]) == pytest.approx(expected, abs=1e-12)
    log_ratio = logps - old
    # k3 of KL(π_old‖π) from tokens π_old sampled: ρ − 1 − log ρ
    assert float(metrics["approx_kl"]) == pytest.approx(float(masked_mean(torch.exp(log_ratio) - 1 - log_ratio, MASK)))
    same, metrics = clipped_policy_loss(old, old, adv, MASK, clip_eps=0.2)
    assert float(metrics["approx_kl"]) == 0 and float(metrics["clip_fraction"]) == 0
    assert torch.allclose(same, -adv.expand(3, 4) * MASK)  # ρ = 1: the plain policy-gradient surrogate


def test_clipped_value_loss_by_hand():
    values, old, returns = t(1.5, 0.1, 2.0)[None], t(1.0, 0.0, 1.9)[None], t(1.0, 1.0, 2.0)[None]
    losses, metrics = clipped_value_loss(values, old, returns, torch.ones(1, 3), clip_range=0.2)
    # V=1.5 (old 1.0, clipped to 1.2): max(0.25, 0.04) → 0.125; V=0.1 (old 0 → inside): ½·0.81 = 0.405;
    # V=2.0 (old 1.9, inside): 0
    assert torch.allclose(losses, t(0.125, 0.405, 0.0)[None])
    assert float(metrics["value_clip_fraction"]) == pytest.approx(0.0)
    losses, metrics = clipped_value_loss(t(1.5)[None], t(2.0)[None], t(1.0)[None], torch.ones(1, 1), clip_range=0.2)
    # V moved 2.0 → 1.5 towards the return: the clipped value 1.8 is further away, so it wins: ½·0.64 = 0.32
    assert float(losses) == pytest.approx(0.32) and float(metrics["value_clip_fraction"]) == 1.0


def test_explained_variance():
    returns = _random((3, 4), 8)
    assert explained_variance(returns, returns, MASK) == pytest.approx(1.0)
    mean = masked_mean(returns, MASK)
    assert explained_variance(torch.full_like(returns, float(mean)), returns, MASK) == pytest.approx(0.0, abs=1e-12)
