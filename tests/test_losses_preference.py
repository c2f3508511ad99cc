"""Preference losses: hand-derived numbers, the formulas written out plainly on float64
random inputs, swap invariants, and gradients (gradcheck)."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.losses.preference import (
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    log_odds,
    orpo_loss,
    ranking_loss,
    simpo_loss,
)

t = lambda *values: torch.tensor(values, dtype=torch.float64)  # noqa: E731
LOG1P_E_MINUS_1 = math.log(1 + math.exp(-1))  # −log σ(1) = 0.3132617
LOG1P_E_MINUS_2 = math.log(1 + math.exp(-2))  # −log σ(2) = 0.1269280


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _random(n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20) for _ in range(4)]  # log-probs < 0


# --------------------------------------------------------------------------- hand-derived


def test_bradley_terry_by_hand():
    # r_w = 2, r_l = 0: −log σ(2); margin 1: −log σ(1); centering 0.1: + 0.1 · (2 + 0)² = 0.4
    assert bradley_terry_loss(t(2.0), t(0.0)).item() == pytest.approx(LOG1P_E_MINUS_2)
    assert bradley_terry_loss(t(2.0), t(0.0), margin=1.0).item() == pytest.approx(LOG1P_E_MINUS_1)
    assert bradley_terry_loss(t(2.0), t(0.0), centering=0.1).item() == pytest.approx(LOG1P_E_MINUS_2 + 0.4)


def test_ranking_loss_by_hand():
    # rewards 2 > 1 > 0, ranked 0, 1, 2: pairs (2−1), (2−0), (1−0) → (0.3133 + 0.1269 + 0.3133) / 3
    rewards = t(2.0, 1.0, 0.0)[None]
    assert ranking_loss(rewards, torch.tensor([[0, 1, 2]])).item() == pytest.approx(
        (2 * LOG1P_E_MINUS_1 + LOG1P_E_MINUS_2) / 3)
    # first two tied: only pairs (2−0) and (1−0)
    assert ranking_loss(rewards, torch.tensor([[0, 0, 1]])).item() == pytest.approx(
        (LOG1P_E_MINUS_2 + LOG1P_E_MINUS_1) / 2)
    # a prompt with only 2 valid responses is one pair, weighted like the 3-response prompt
    batch = torch.cat([rewards, t(1.0, 0.0, 99.0)[None]])
    ranks, valid = torch.tensor([[0, 1, 2], [0, 1, 0]]), torch.tensor([[True] * 3, [True, True, False]])
    losses = ranking_loss(batch, ranks, valid)
    assert losses[1].item() == pytest.approx(LOG1P_E_MINUS_1)
    assert ranking_loss(rewards, torch.tensor([[0, 0, 0]])).item() == 0.0  # all tied: nothing to learn


def test_dpo_family_by_hand():
    # π: chosen −1, rejected −3; ref: −2, −2 → h = 1 − (−1) = 2; β = 0.5 → βh = 1
    args = (t(-1.0), t(-3.0), t(-2.0), t(-2.0))
    losses, chosen, rejected = dpo_loss(*args, beta=0.5)
    assert losses.item() == pytest.approx(LOG1P_E_MINUS_1)
    assert (chosen.item(), rejected.item()) == (0.5, -0.5)
    # cDPO ε = 0.1: 0.9 · (−log σ(1)) + 0.1 · (−log σ(−1)) = 0.9 · 0.31326 + 0.1 · 1.31326
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0].item() == pytest.approx(
        0.9 * LOG1P_E_MINUS_1 + 0.1 * (1 + LOG1P_E_MINUS_1))
    assert ipo_loss(*args, beta=0.5)[0].item() == pytest.approx((2 - 1) ** 2)  # (h − 1/(2β))²
    assert ipo_loss(*args, beta=0.25)[0].item() == pytest.approx(0.0)
    assert hinge_loss(*args, beta=0.5)[0].item() == pytest.approx(0.0)  # max(0, 1 − 1)
    assert hinge_loss(*args, beta=0.25)[0].item() == pytest.approx(0.5)  # max(0, 1 − 0.5)


def test_simpo_orpo_kto_by_hand():
    # SimPO: β = 2, γ = 1, averages −0.5 / −1.5 → 2(−0.5) − 2(−1.5) − 1 = 1
    assert simpo_loss(t(-0.5), t(-1.5), beta=2.0, gamma=1.0)[0].item() == pytest.approx(LOG1P_E_MINUS_1)
    # ORPO: P_w = 0.5 → odds 1 → log 0; P_l = 0.2 → odds 0.25; ratio = log 4; −log σ(log 4) = log(1.25)
    losses, ratio = orpo_loss(t(math.log(0.5)), t(math.log(0.2)), chosen_nll=t(1.0), lam=0.1)
    assert ratio.item() == pytest.approx(math.log(4))
    assert losses.item() == pytest.approx(1.0 + 0.1 * math.log(1.25))
    # KTO: r = −1 − (−2) = 1, z₀ = 0, β = 1: desirable 1 − σ(1); undesirable 1 − σ(−1)
    losses, rewards = kto_loss(t(-1.0, -1.0), t(-2.0, -2.0), torch.tensor([True, False]), t(-0.5), beta=1.0)
    sig1 = 1 / (1 + math.exp(-1))
    assert losses.tolist() == pytest.approx([1 - sig1, sig1])  # z₀ = −0.5 is clamped to 0
    assert rewards.tolist() == [1.0, 1.0]


# --------------------------------------------------------------------------- against the formulas, float64


def test_every_loss_matches_its_formula_written_out():
    pc, pr, rc, rr = _random()
    beta, eps, gamma, lam = 0.3, 0.15, 0.7, 0.2
    for i in range(len(pc)):
        a, b, c, d = pc[i].item(), pr[i].item(), rc[i].item(), rr[i].item()
        h = (a - c) - (b - d)
        assert dpo_loss(pc, pr, rc, rr, beta, eps)[0][i].item() == pytest.approx(
            -(1 - eps) * _logsig(beta * h) - eps * _logsig(-beta * h), rel=1e-12)
        assert ipo_loss(pc, pr, rc, rr, beta)[0][i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert hinge_loss(pc, pr, rc, rr, beta)[0][i].item() == pytest.approx(max(0.0, 1 - beta * h), abs=1e-12)
        assert bradley_terry_loss(pc, pr, 0.5, 0.01)[i].item() == pytest.approx(
            -_logsig(a - b - 0.5) + 0.01 * (a + b) ** 2, rel=1e-12)
        avg_w, avg_l = a / 20, b / 20  # averages stay in (−1, 0): probabilities below 1
        assert simpo_loss(pc / 20, pr / 20, beta, gamma)[0][i].item() == pytest.approx(
            -_logsig(beta * avg_w - beta * avg_l - gamma), rel=1e-12)
        odds = lambda x: math.exp(x) / (1 - math.exp(x))  # noqa: E731
        assert orpo_loss(pc / 20, pr / 20, pc.abs(), lam)[0][i].item() == pytest.approx(
            abs(a) - lam * _logsig(math.log(odds(avg_w) / odds(avg_l))), rel=1e-10)


def test_ranking_loss_matches_an_explicit_pair_loop():
    g = torch.Generator().manual_seed(3)
    rewards = torch.randn(5, 6, generator=g, dtype=torch.float64)
    ranks = torch.randint(0, 4, (5, 6), generator=g)  # ties included
    valid = torch.rand(5, 6, generator=g) > 0.2
    losses = ranking_loss(rewards, ranks, valid)
    for p in range(5):
        pairs = [(i, j) for i in range(6) for j in range(6)
                 if valid[p, i] and valid[p, j] and ranks[p, i] < ranks[p, j]]
        expected = sum(-_logsig((rewards[p, i] - rewards[p, j]).item()) for i, j in pairs) / max(len(pairs), 1)
        assert losses[p].item() == pytest.approx(expected, rel=1e-12)


# --------------------------------------------------------------------------- invariants and gradients


def test_swapping_chosen_and_rejected_flips_the_margin():
    pc, pr, rc, rr = _random(seed=1)
    beta = 0.4
    losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta)
    swapped, s_chosen, s_rejected = dpo_loss(pr, pc, rr, rc, beta)
    torch.testing.assert_close(s_chosen - s_rejected, -(chosen - rejected))
    torch.testing.assert_close(swapped - losses, chosen - rejected)  # −log σ(−x) + log σ(x) = x
    torch.testing.assert_close(bradley_terry_loss(pr, pc) - bradley_terry_loss(pc, pr), pc - pr)
    torch.testing.assert_close(simpo_loss(pr / 20, pc / 20, beta, 0.0)[0] - simpo_loss(pc / 20, pr / 20, beta, 0.0)[0],
                               beta * (pc - pr) / 20)
    torch.testing.assert_close(orpo_loss(pr / 20, pc / 20, 0 * pc, 1.0)[1], -orpo_loss(pc / 20, pr / 20, 0 * pc, 1.0)[1])


def test_log_odds_is_stable_near_zero_and_very_negative():
    values = log_odds(t(-1e-9, -50.0))
    assert torch.isfinite(values).all()
    assert values[1].item() == pytest.approx(-50.0, abs=1e-9)  # p tiny: log odds ≈ log p


@pytest.mark.parametrize("name", ["bt", "dpo", "ipo", "simpo", "orpo", "kto", "ranking"])
def test_gradients_match_finite_differences(name):
    pc, pr, rc, rr = (x[:4].clone().requires_grad_(True) for x in _random(seed=2))
    desirable = torch.tensor([True, False, True, False])
    functions = {
        "bt": lambda: bradley_terry_loss(pc, pr, 0.3, 0.05),
        "dpo": lambda: dpo_loss(pc, pr, rc, rr, 0.1, 0.1)[0],
        "ipo": lambda: ipo_loss(pc, pr, rc, rr, 0.5)[0],
        "simpo": lambda: simpo_loss(pc / 20, pr / 20, 2.0, 0.5)[0],
        "orpo": lambda: orpo_loss(pc / 20, pr / 20, -pc / 20, 0.1)[0],
        "kto": lambda: kto_loss(pc, pr, desirable, t(0.2), 0.1)[0],
        "ranking": lambda: ranking_loss(torch.stack([pc, pr]), torch.tensor([[0, 1, 2, 2], [1, 0, 0, 3]])),
    }
    assert torch.autograd.gradcheck(lambda *_: functions[name](), (pc, pr))
