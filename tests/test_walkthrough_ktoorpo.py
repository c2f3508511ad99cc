"""A KTO / ORPO walk: posttrain's KTO, ORPO, cDPO, hinge and RPO read against their papers and TRL.

Walked: `losses/preference.py` and `train/preference.py` (the stage, `kto_items`, `estimate_kl`,
`_say_kto_balance`), README's preference section and the `dpo.*` help, against KTO (Ethayarajh et
al. 2024: z₀ = max(0, the mismatched-pair KL estimate), detached; λ_D(1 − σ(β(r − z₀))) and
λ_U(1 − σ(β(z₀ − r))); λ_D·n_D / (λ_U·n_U) in [1, 4/3]), ORPO (Hong et al. 2024: odds from
length-averaged log-probs, L_SFT − λ log σ(log odds ratio), its gradient δ(d)·h(d)), cDPO (label
flips with probability ε), hinge (SLiC-HF's max(0, 1 − β·margin), β the reciprocal margin, as TRL)
and RPO (the chosen answer's NLL per token), with a batch of one KTO item, a batch of only desirable
rows, gradient accumulation, and the logged metrics; plus a 2-step `posttrain kto examples/kto.yaml`.

Right: every formula above, on float64 random inputs against plain computations here; z₀ detached,
clamped at 0, the mean over the mismatched rows of the whole optimizer step (every micro-batch and
process: batch 8 and 1 × 8 take the same step, README and `estimate_kl` say so); a KTO item always
carries its own mismatched row (its prompt, another prompt's response, built once), so a batch of one
has a real KL estimate, where TRL's in-batch shift needs two; the class balance is said when it
leaves [1, 4/3], with the weights that bring it in; a response of probability 0 gives finite ORPO,
KTO and hinge losses and gradients. Most of this already had tests (test_preference_formulas,
test_losses_preference, test_walkthrough_hparams, test_metrics_accumulation,
test_accumulation_equivalence_edges); the ones here are what had none.

No defect was pinned on this walk. The tests named for a failure would pin a defect found on that
walk (each a strict xfail until its fix, stop 34: each asserts the right behaviour); the others pin
behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import math
import types

import pytest
import torch

from posttrain.losses.preference import dpo_loss, kto_loss, orpo_loss


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x)) if x >= 0 else math.exp(x) / (1 + math.exp(x))


def _uniform(n: int, low: float, high: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


# =========================================================================== right, untested


@pytest.mark.parametrize("lam", [0.1, 0.25, 1.0])
def test_orpo_gradient_is_the_papers_delta_times_h(lam):
    """Hong et al. 2024 (§4, the gradient of L_OR): ∇L_OR = δ(d)·h(d), δ(d) = σ(−log odds ratio),
    h(d) = ∇log P(y_w|x) / (1 − P(y_w|x)) − ∇log P(y_l|x) / (1 − P(y_l|x)), P the length-averaged
    probability. With L_SFT = −ā_w on top, ∂L/∂ā_w = −1 − λ·σ(−R)/(1 − e^{ā_w}) and
    ∂L/∂ā_l = +λ·σ(−R)/(1 − e^{ā_l}): the rejected answer's pull grows as its probability nears 1."""
    chosen = _uniform(16, -3.0, -0.01, seed=1).requires_grad_(True)
    rejected = _uniform(16, -3.0, -0.01, seed=2).requires_grad_(True)
    losses, ratio = orpo_loss(chosen, rejected, -chosen, lam)
    losses.sum().backward()
    for i in range(16):
        aw, al = chosen[i].item(), rejected[i].item()
        odds = (aw - math.log(-math.expm1(aw))) - (al - math.log(-math.expm1(al)))
        delta = _sig(-odds)
        assert ratio[i].item() == pytest.approx(odds, rel=1e-12, abs=1e-12)
        assert losses[i].item() == pytest.approx(-aw - lam * math.log(_sig(odds)), rel=1e-12)
        assert chosen.grad[i].item() == pytest.approx(-1 - lam * delta / -math.expm1(aw), rel=1e-10)
        assert rejected.grad[i].item() == pytest.approx(lam * delta / -math.expm1(al), rel=1e-10)


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3, 0.49])
def test_cdpo_is_dpo_expected_over_label_flips_with_probability_epsilon(epsilon):
    """cDPO (Mitchell 2023): each pair's label is flipped with probability ε, so the loss is DPO's
    expected over the flip: (1 − ε)·DPO(y_w ≻ y_l) + ε·DPO(y_l ≻ y_w), the latter DPO with the sides
    swapped; its gradient in βh vanishes where σ(βh) = 1 − ε, not at infinity (ε > 0)."""
    pw, pl, rw, rl = (_uniform(12, -30.0, -1.0, seed=s) for s in range(10, 14))
    beta = 0.3
    got = dpo_loss(pw, pl, rw, rl, beta, label_smoothing=epsilon)[0]
    kept = dpo_loss(pw, pl, rw, rl, beta)[0]
    flipped = dpo_loss(pl, pw, rl, rw, beta)[0]
    torch.testing.assert_close(got, (1 - epsilon) * kept + epsilon * flipped, rtol=1e-12, atol=1e-12)
    if epsilon:
        h = torch.tensor([math.log((1 - epsilon) / epsilon) / beta], dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        dpo_loss(h, zero, zero, zero, beta, label_smoothing=epsilon)[0].sum().backward()
        assert abs(h.grad.item()) < 1e-12, f"cDPO's gradient at its optimum βh = log((1−ε)/ε): {h.grad.item()}"


def test_hinge_is_slic_with_beta_the_reciprocal_margin_and_rpo_adds_the_per_token_nll():
    """SLiC-HF's hinge max(0, δ − h) with margin δ = 1/β (TRL: "beta is the reciprocal of the margin"),
    times β, is posttrain's max(0, 1 − βh): zero, with zero gradient, once h ≥ 1/β, and slope −β in
    log π(y_w) below; its logged margin is βh. RPO's term (`dpo.nll_weight`) reads each chosen
    answer's NLL per token, −log π(y_w)/|y_w| (`chosen_nll` of the per-token averages)."""
    from posttrain.losses.preference import hinge_loss
    from posttrain.train.preference import chosen_nll

    pw = _uniform(20, -20.0, -1.0, seed=20).requires_grad_(True)
    pl, rw, rl = (_uniform(20, -20.0, -1.0, seed=s) for s in (21, 22, 23))
    beta = 0.25
    losses, chosen, rejected = hinge_loss(pw, pl, rw, rl, beta)
    losses.sum().backward()
    for i in range(20):
        h = (pw[i].item() - rw[i].item()) - (pl[i].item() - rl[i].item())
        assert losses[i].item() == pytest.approx(beta * max(0.0, 1 / beta - h), rel=1e-12, abs=1e-15)
        assert pw.grad[i].item() == (0.0 if beta * h > 1 else pytest.approx(-beta, rel=1e-12))
    torch.testing.assert_close(chosen - rejected, beta * ((pw - rw) - (pl - rl)).detach(), rtol=1e-12, atol=0)
    sums, counts = _uniform(5, -40.0, -2.0, seed=24), torch.tensor([1, 3, 7, 12, 40], dtype=torch.float64)
    torch.testing.assert_close(chosen_nll(sums / counts), -sums / counts, rtol=0, atol=0)


@pytest.fixture(scope="module")
def tiny():
    from posttrain.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model("tiny").eval()


def _sum_logp(model, example) -> float:
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([example.input_ids])).logits[0].double().log_softmax(-1)
    return sum(float(logprobs[i - 1, tok]) for i, tok in enumerate(example.labels) if tok != -100)


@pytest.mark.parametrize("shift", [0.6, -0.6], ids=["z0-positive", "z0-clamped"])
def test_kto_batch_of_one_item_has_a_real_kl_estimate_from_another_prompts_response(tiny, shift):
    """TRL builds KTO's mismatched pairs by shifting completions within a batch, so it refuses a batch
    of one (the KL term would be the item's own reward). posttrain gives every item its own mismatched
    row once (`kto_items`: its prompt + another prompt's response), so a micro-batch of one item, and a
    step of one (batch 1, no accumulation, `estimate_kl`), estimate z₀ from that row: max(0, its
    log π/π_ref), never the item's own log-ratio; the loss is λ_D(1 − σ(β(r − z₀)))."""
    from posttrain.config import DPOLossConfig
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import CHATML
    from posttrain.train.grouped import collate_items, first_label, items_from_examples
    from posttrain.train.preference import PreferenceLoss, kto_extras, kto_items

    tokenizer, model = tiny
    rows = [("Copy: a b", "a b", True), ("Reverse: x y z", "z y x", False)]
    records = [PreferenceRecord([{"role": "user", "content": p}], [c], desirable=d, source=f"k:{i}")
               for i, (p, c, d) in enumerate(rows)]
    examples = [encode_preference(r, tokenizer, CHATML) for r in records]
    items = kto_items(items_from_examples(examples), 512, lambda *_: None)
    own, mismatched = items[0].sequences
    other = examples[1].sequences[0]
    cut, start = first_label(own), first_label(other)
    assert mismatched.input_ids == own.input_ids[:cut] + other.input_ids[start:]  # own prompt, other's answer
    assert mismatched.input_ids != own.input_ids

    r = 0.3
    item = items[0]
    item.reference_logps = [_sum_logp(model, own) - r, _sum_logp(model, mismatched) - shift]
    cfg = DPOLossConfig(loss="kto", beta=0.5, kto_desirable_weight=1.2, kto_undesirable_weight=0.8)
    batch = collate_items([item], tokenizer.pad_token_id) | kto_extras([item])
    z0 = max(shift, 0.0)
    expected = 1.2 * (1 - _sig(0.5 * (r - z0)))
    module = PreferenceLoss(model, cfg)
    with torch.no_grad():
        alone, metrics = module(**batch)  # the micro-batch's own estimate
        accelerator = types.SimpleNamespace(device=torch.device("cpu"), autocast=contextlib.nullcontext,
                                            reduce=lambda tensor, op: tensor)
        with module.estimate_kl([batch], accelerator):  # a step of this one micro-batch
            assert module.z0.item() == pytest.approx(shift, abs=1e-5)  # raw; the loss clamps it
            stepped, _ = module(**batch)
    assert float(alone) == pytest.approx(expected, abs=1e-5)
    assert float(stepped) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["kl"]) == pytest.approx(z0, abs=1e-5)
    assert float(metrics["rewards/signed"]) == pytest.approx(0.5 * r, abs=1e-5)


def test_kto_loss_gradient_in_the_reward_is_the_weighted_sigmoid_slope_on_each_side():
    """KTO's value v is λ·σ(±β(r − z₀)), so ∂L/∂r = ∓λ·β·σ(β(r − z₀))·σ(−β(r − z₀)): desirable rows
    always pull r up, undesirable ones down, each most strongly at r = z₀ and fading away from it
    (the saturation the paper credits for KTO's robustness to noisy labels), on float64 random
    inputs with unequal λ's and a positive z₀."""
    policy = _uniform(24, -30.0, -2.0, seed=30).requires_grad_(True)
    ref = _uniform(24, -30.0, -2.0, seed=31)
    desirable = torch.arange(24) % 3 != 1
    z0, beta, lam_d, lam_u = torch.tensor(0.7, dtype=torch.float64), 0.2, 1.3, 0.75
    losses, _ = kto_loss(policy, ref, desirable, z0, beta, lam_d, lam_u)
    losses.sum().backward()
    for i in range(24):
        x = beta * (policy[i].item() - ref[i].item() - 0.7)
        slope = beta * _sig(x) * _sig(-x)
        expected = -lam_d * slope if desirable[i] else lam_u * slope
        assert policy.grad[i].item() == pytest.approx(expected, rel=1e-10, abs=1e-300)
    assert (policy.grad[desirable] < 0).all() and (policy.grad[~desirable] > 0).all()
