"""A hyperparameter walk: the DPO family's and KTO's settings read as their papers define them.

Walked: README's preference section, `losses/preference.py`, `train/preference.py` and
`config/preference.py`, each setting against its paper — DPO's β (Rafailov et al. 2023), cDPO's ε,
IPO's τ and its 1/(2τ) target (Azar et al. 2023, Eq. 17; per-token averages since stop 33), hinge / SLiC's margin,
SimPO's β and γ on length-normalised log-probs (Meng et al. 2024), ORPO's λ and its odds from
average log-probs (Hong et al. 2024), RPO's α (`dpo.nll_weight`), KTO's λ_D / λ_U and its z₀
(Ethayarajh et al. 2024) — their defaults, meanings, validation ranges, what is logged, and what a
user who types a paper's published values gets (SimPO β=2.5, γ=1.4 on Llama-3-Instruct; KTO on
desirable:undesirable 1:10 data).

Right: every formula and its inputs (sums for DPO / cDPO / hinge, per-token averages for IPO /
SimPO / ORPO, RPO's and ORPO's NLL the best response's mean token NLL), cDPO's ε range [0, 0.5) and
its 0.1 when unset, β > 0, λ_D, λ_U > 0, KTO's z₀ the detached mean over mismatched rows clamped at
0 (and logged clamped), options a loss never reads refused — all already tested elsewhere; SimPO's
γ is a margin in reward units (β · average log-prob), pinned here.

Wrong: SimPO's γ is unchecked below 0, where the paper's target margin is non-negative; KTO never
says when λ_D·n_D / (λ_U·n_U) leaves the paper's recommended [1, 4/3] — 1:10 data, or a 4-way
ranking split 1:3, trains at 0.1 or 1/3 with default weights and not a word.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 32: each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import math
import types

import pytest
import torch

from posttrain.config import DPOConfig, validate_dpo
from posttrain.errors import ConfigError
from posttrain.losses.preference import simpo_loss

t = lambda *values: torch.tensor(values, dtype=torch.float64)  # noqa: E731

PROMPTS = ["Copy: a b", "Reverse: x y", "Smallest letter: q m", "Copy: c d", "Reverse: k l z",
           "Smallest letter: t r", "Copy: e f g", "Reverse: u v", "Smallest letter: w p", "Copy: h i",
           "Reverse: m n o"]


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


def _kto_log(tokenizer, records, overrides) -> list[str]:
    """The lines `train.preference._items` logs while it turns `records` into KTO items."""
    from posttrain.data.preferences import encode_preference
    from posttrain.data.templates import CHATML
    from posttrain.train.preference import _items

    cfg = DPOConfig.load(None, ["dpo.loss=kto"] + overrides)
    validate_dpo(cfg)
    data = types.SimpleNamespace(train=[encode_preference(r, tokenizer, CHATML) for r in records], eval=[])
    lines: list[str] = []
    _items(data, cfg, lines.append)
    return lines


def _unpaired(n_desirable: int, n_undesirable: int):
    from posttrain.data.preferences import PreferenceRecord

    labels = [True] * n_desirable + [False] * n_undesirable
    return [PreferenceRecord([{"role": "user", "content": PROMPTS[i]}], [f"answer {i}"], desirable=d, source=f"u:{i + 1}")
            for i, d in enumerate(labels)]


def _rankings(k: int, n: int, ranks=None):
    from posttrain.data.preferences import PreferenceRecord

    return [PreferenceRecord([{"role": "user", "content": PROMPTS[i]}], [f"reply {j} to {i}" for j in range(k)],
                             ranks=list(ranks or range(k)), source=f"r:{i + 1}") for i in range(n)]


def _names_a_weight(lines: list[str]) -> list[str]:
    return [line for line in lines if "kto_desirable_weight" in line or "kto_undesirable_weight" in line]


# =========================================================================== defects


@pytest.mark.parametrize("gamma", [-0.5, -1.4])
def test_simpo_refuses_a_negative_target_margin_gamma(gamma):
    """SimPO (Meng et al. 2024, Eq. 6) adds a target reward margin γ so that the chosen response's
    reward exceeds the rejected one's by at least γ (γ = 0 is the paper's ablation). With γ < 0 the
    loss is content with a pair ranked the wrong way: at β = 2.5, γ = −1.4, a chosen answer 0.2 nats
    per token *less* likely than the rejected one scores below log 2, the loss of a tie under γ = 0.
    Its siblings (dpo.orpo_lambda, dpo.nll_weight) are checked >= 0; γ is not."""
    wrong_way = float(simpo_loss(t(-1.2), t(-1.0), 2.5, -1.4)[0][0])
    assert wrong_way == pytest.approx(math.log1p(math.exp(-0.9)), rel=1e-12) and wrong_way < math.log(2)
    try:
        validate_dpo(DPOConfig.load(None, ["dpo.loss=simpo", f"dpo.simpo_gamma={gamma}"]))
    except ConfigError as error:
        assert "dpo.simpo_gamma" in str(error), str(error)
    else:
        raise AssertionError(f"dpo.simpo_gamma={gamma} accepted (at β=2.5, γ=-1.4 a chosen answer 0.2 nats/token "
                             f"worse than the rejected one trains at loss {wrong_way:.4f} < log 2)")


@pytest.mark.parametrize("records, overrides, ratio", [
    (lambda: _unpaired(1, 10), [], 0.1),
    (lambda: _rankings(4, 3, [0, 1, 1, 1]), [], 1 / 3),  # KTO takes a ranking's ends: three tied worst
], ids=["unpaired-1-to-10", "rankings-4-way-split-1-to-3"])
def test_kto_says_when_the_class_weighted_ratio_leaves_the_papers_range(tokenizer, records, overrides, ratio):
    """KTO's paper (Ethayarajh et al. 2024, §4) recommends λ_D, λ_U with λ_D·n_D / (λ_U·n_U) in
    [1, 4/3]; with 1:10 feedback that means dpo.kto_desirable_weight 10–13.3 (or λ_U 0.075–0.1). A
    run on 1:10 data with the default weights trains at 0.1, and README's "pairs and rankings also
    work for KTO (best = desirable)" turns a 4-way ranking with three tied worst into 1 : 3 (1/3):
    nothing in the log (nor in data_report.json) counts the classes or names the weights."""
    lines = _kto_log(tokenizer, records(), overrides)
    assert _names_a_weight(lines), (f"λ_D·n_D/(λ_U·n_U) = {ratio:.3g}, outside [1, 4/3], and no logged line names "
                                    f"dpo.kto_desirable_weight / dpo.kto_undesirable_weight; logged: {lines}")
    # where the ratio is in the range, nothing to say
    assert not _names_a_weight(_kto_log(tokenizer, _unpaired(1, 10), ["dpo.kto_desirable_weight=10"]))
    assert not _names_a_weight(_kto_log(tokenizer, _unpaired(5, 5), []))
    assert not _names_a_weight(_kto_log(tokenizer, _rankings(2, 4), []))  # pairs split 1:1


# =========================================================================== right, untested


def test_simpo_gamma_is_a_margin_in_reward_units_so_the_llama3_setting_asks_gamma_over_beta_per_token():
    """The published Llama-3-Instruct setting (β = 2.5, γ = 1.4) validates, and γ is in the units of
    SimPO's reward β · average log-prob: the loss is log 2 exactly when the chosen response's average
    token log-prob leads by γ/β = 0.56 nats, and log(1 + e^1.4) at a tie. (Not γ nats per token: with
    the default β = 0.1, γ = 0.5 asks for 5 nats per token.)"""
    validate_dpo(DPOConfig.load(None, ["dpo.loss=simpo", "dpo.beta=2.5", "dpo.simpo_gamma=1.4"]))
    losses, chosen, rejected = simpo_loss(t(-1.0, -1.0), t(-1.56, -1.0), 2.5, 1.4)
    assert losses[0].item() == pytest.approx(math.log(2), abs=1e-12)
    assert losses[1].item() == pytest.approx(math.log1p(math.exp(1.4)), rel=1e-12)
    assert chosen.tolist() == [-2.5, -2.5]
    assert rejected[0].item() == pytest.approx(-3.9, rel=1e-12)
    at_default = simpo_loss(t(-1.0), t(-6.0), 0.1, 0.5)[0].item()  # a 5-nat lead per token: only now log 2
    assert at_default == pytest.approx(math.log(2), abs=1e-12)


def test_kto_weights_of_the_papers_range_give_both_classes_equal_pull_at_the_start():
    """With λ_D·n_D = λ_U·n_U (1:10 data, λ_D = 10) the policy's start (r = 0, z₀ = 0) gives each
    class the same total loss (10 · 1/2 each) and the same total gradient in r (β/4 per unit of
    weight, opposite signs): the balance the paper's range is about, and what the weights mean."""
    from posttrain.losses.preference import kto_loss

    desirable = torch.tensor([True] + [False] * 10)
    policy = torch.zeros(11, dtype=torch.float64, requires_grad=True)
    losses, _ = kto_loss(policy, torch.zeros(11, dtype=torch.float64), desirable, t(0.0)[0], 0.1, 10.0, 1.0)
    losses.sum().backward()
    assert losses[desirable].sum().item() == pytest.approx(5.0, rel=1e-12)
    assert losses[~desirable].sum().item() == pytest.approx(5.0, rel=1e-12)
    assert policy.grad[desirable].sum().item() == pytest.approx(-10 * 0.1 / 4, rel=1e-12)
    assert policy.grad[~desirable].sum().item() == pytest.approx(10 * 0.1 / 4, rel=1e-12)
