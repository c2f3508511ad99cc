"""The preference losses and preference data, written as a review.

Every formula is written out independently in float64. Tests marked "BUG" describe defects the
review found; each failed on the code before its fix and guards it since (the comment above
each says what was wrong). Everything else is coverage the other tests lacked (stage inputs of
every pair loss, KTO's z0, extreme β, gradients, data edge cases).
"""

from __future__ import annotations

import copy
import json
import math
import types

import pytest
import torch

from posttrain.data.preferences import (
    PreferenceRecord,
    encode_preference,
    fit_preference_length,
    load_preference_records,
    prepare_preference_data,
    to_preference_record,
)
from posttrain.data.templates import CHATML
from posttrain.errors import DataError
from posttrain.losses.preference import (
    bradley_terry_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    ranking_loss,
    simpo_loss,
)

t = lambda *values: torch.tensor(values, dtype=torch.float64)


def _logsig(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


def _sig(x: float) -> float:
    return math.exp(_logsig(x))


def _random(n: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g, dtype=torch.float64) * 20) for _ in range(4)]


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def model():
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    return load_model("tiny").eval()


# =========================================================================== losses: BUGS


# BUG: log_odds(x) = x − log(−expm1(x)) is +inf at x = 0 (p = 1), so ORPO's loss gets a NaN
# gradient when a chosen response's average log-prob is exactly 0, and a NaN loss when both
# are 0 (inf − inf). In float32 that is reachable: log_softmax returns exactly 0.0 once the
# target's logit leads the rest by ~17 + log V nats (checked below), and ORPO's own NLL term
# pushes the chosen answer there. One NaN gradient poisons the whole optimizer step.
def test_orpo_is_finite_with_gradients_when_an_average_logp_is_exactly_zero():
    peaked = torch.zeros(1000, dtype=torch.float32)
    peaked[0] = 30.0
    assert peaked.log_softmax(-1)[0].item() == 0.0  # reachable in float32
    problems = []
    for c, r in ((0.0, -0.5), (-0.5, 0.0), (0.0, 0.0), (-1e-12, -0.5)):
        chosen, rejected = t(c).requires_grad_(True), t(r).requires_grad_(True)
        losses, _ = orpo_loss(chosen, rejected, -chosen, lam=0.1)
        losses.sum().backward()
        if not (torch.isfinite(losses).all() and torch.isfinite(chosen.grad).all()
                and torch.isfinite(rejected.grad).all()):
            problems.append(f"avg logps ({c}, {r}): loss {losses.item()}, grads {chosen.grad.item()}, "
                            f"{rejected.grad.item()}")
    assert not problems, "; ".join(problems)


# =========================================================================== losses: coverage


def test_kto_matches_the_paper_with_unequal_weights_and_a_positive_z0():
    pol, ref, kl_pol, kl_ref = _random(seed=4)
    desirable = torch.arange(12) % 3 != 0
    beta, lam_d, lam_u = 0.3, 1.3, 0.7
    z0 = float((kl_pol - kl_ref).mean().clamp(min=0))
    for kl in (kl_pol - kl_ref).mean(), t(-2.0)[0]:  # positive z0, then one clamped to 0
        z = max(float(kl), 0.0)
        losses, rewards = kto_loss(pol, ref, desirable, kl, beta, lam_d, lam_u)
        for i in range(12):
            r = pol[i].item() - ref[i].item()
            expected = lam_d * (1 - _sig(beta * (r - z))) if desirable[i] else lam_u * (1 - _sig(beta * (z - r)))
            assert losses[i].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
            assert rewards[i].item() == pytest.approx(beta * r, rel=1e-12)
    assert z0 >= 0
    # z0 is detached: no gradient reaches the KL estimate
    kl = (kl_pol - kl_ref).mean().clone().requires_grad_(True)
    policy = pol.clone().requires_grad_(True)
    kto_loss(policy, ref, desirable, kl, beta)[0].sum().backward()
    assert kl.grad is None and policy.grad is not None


def test_kto_desirable_and_undesirable_mirror_around_z0():
    pol, ref, _, _ = _random(seed=5)
    z0, beta = t(0.8)[0], 0.5
    mirrored = 2 * z0 + ref - (pol - ref)  # r → 2 z0 − r (policy side), same ref
    good = kto_loss(pol, ref, torch.ones(12, dtype=torch.bool), z0, beta)[0]
    bad = kto_loss(mirrored, ref, torch.zeros(12, dtype=torch.bool), z0, beta)[0]
    torch.testing.assert_close(good, bad)


def test_cdpo_with_zero_smoothing_is_dpo_and_its_optimum_is_finite():
    pc, pr, rc, rr = _random(seed=6)
    torch.testing.assert_close(dpo_loss(pc, pr, rc, rr, 0.2, 0.0)[0], dpo_loss(pc, pr, rc, rr, 0.2)[0])
    # cDPO's stationary point: σ(βh) = 1 − ε, i.e. βh = log((1 − ε)/ε); DPO has none
    eps, beta = 0.2, 0.5
    h = torch.tensor([math.log((1 - eps) / eps) / beta], dtype=torch.float64, requires_grad=True)
    zero = torch.zeros(1, dtype=torch.float64)
    dpo_loss(h, zero, zero, zero, beta, eps)[0].sum().backward()
    assert abs(h.grad.item()) < 1e-12


def test_equal_chosen_and_rejected_give_log2_for_every_smoothing_and_constant_targets_otherwise():
    x = t(-3.0, -7.5)
    for eps in (0.0, 0.1, 0.49, 0.5):
        assert dpo_loss(x, x, x - 1, x - 1, 0.1, eps)[0].tolist() == pytest.approx([math.log(2)] * 2)
    assert ipo_loss(x, x, x, x, 0.25)[0].tolist() == pytest.approx([4.0, 4.0])  # (0 − 1/(2·0.25))²
    assert hinge_loss(x, x, x, x, 0.25)[0].tolist() == pytest.approx([1.0, 1.0])
    assert simpo_loss(x / 10, x / 10, 2.0, 0.5)[0].tolist() == pytest.approx([-_logsig(-0.5)] * 2)
    assert bradley_terry_loss(x, x).tolist() == pytest.approx([math.log(2)] * 2)


@pytest.mark.parametrize("beta", [1e3, 1e6])
def test_large_beta_stays_finite_and_has_the_right_limit(beta):
    pc, pr, rc, rr = (v.requires_grad_(True) for v in _random(seed=7))
    h = ((pc - rc) - (pr - rr)).detach()
    losses = dpo_loss(pc, pr, rc, rr, beta)[0]
    # −log σ(βh) → max(0, −βh) for large |βh|
    torch.testing.assert_close(losses.detach(), torch.relu(-beta * h), rtol=1e-9, atol=1e-9)
    total = (losses.sum() + dpo_loss(pc, pr, rc, rr, beta, 0.3)[0].sum() + ipo_loss(pc, pr, rc, rr, beta)[0].sum()
             + hinge_loss(pc, pr, rc, rr, beta)[0].sum() + simpo_loss(pc / 20, pr / 20, beta, 1.0)[0].sum()
             + kto_loss(pc, rc, torch.arange(12) % 2 == 0, t(0.3)[0], beta)[0].sum())
    total.backward()
    assert all(torch.isfinite(v.grad).all() for v in (pc, pr))
    torch.testing.assert_close(ipo_loss(pc, pr, rc, rr, beta)[0].detach(), (h - 1 / (2 * beta)) ** 2)


def test_empty_batches_give_empty_losses_and_zero_sums():
    e = torch.zeros(0, dtype=torch.float64)
    for losses in (dpo_loss(e, e, e, e, 0.1, 0.1)[0], ipo_loss(e, e, e, e, 0.1)[0], hinge_loss(e, e, e, e, 0.1)[0],
                   simpo_loss(e, e, 2.0, 0.5)[0], orpo_loss(e, e, e, 0.1)[0], bradley_terry_loss(e, e, 0.0, 0.1),
                   kto_loss(e, e, torch.zeros(0, dtype=torch.bool), t(0.0)[0], 0.1)[0],
                   ranking_loss(torch.zeros(0, 3, dtype=torch.float64), torch.zeros(0, 3, dtype=torch.long))):
        assert losses.shape == (0,) and float(losses.sum()) == 0.0


def test_swapping_sides_for_hinge_ipo_and_ranking():
    pc, pr, rc, rr = _random(seed=8)
    beta = 0.3
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(hinge_loss(pr, pc, rr, rc, beta)[0], torch.relu(1 + beta * h))
    torch.testing.assert_close(ipo_loss(pr, pc, rr, rc, beta)[0], (-h - 1 / (2 * beta)) ** 2)
    # a 2-way ranking is Bradley-Terry, whichever slot holds the better response, centering included
    rewards = torch.stack([pc, pr], dim=1)
    torch.testing.assert_close(ranking_loss(rewards, torch.tensor([[1, 0]] * 12), centering=0.05),
                               bradley_terry_loss(pr, pc, 0.0, 0.05))


def test_ranking_centering_over_valid_responses_and_padding_is_ignored():
    rewards = t(1.0, -0.5, 0.25, 123.0)[None]
    ranks = torch.tensor([[0, 1, 1, 0]])
    valid = torch.tensor([[True, True, True, False]])
    pairs = [(1.0, -0.5), (1.0, 0.25)]  # the tie (1, 2) makes no pair; the padded slot none
    expected = sum(-_logsig(a - b) for a, b in pairs) / 2 + 0.1 * (2 * (1.0 - 0.5 + 0.25) / 3) ** 2
    assert ranking_loss(rewards, ranks, valid, centering=0.1).item() == pytest.approx(expected, rel=1e-12)
    # a tie-only prompt: only the centering term (documented)
    assert ranking_loss(rewards[:, :2], torch.tensor([[0, 0]]), centering=0.1).item() == pytest.approx(
        0.1 * (1.0 - 0.5) ** 2)


@pytest.mark.parametrize("name", ["hinge", "cdpo", "kto-weighted", "ranking-centering", "bt-margin-tensor"])
def test_more_gradients_match_finite_differences(name):
    pc, pr, rc, rr = (x[:4].clone().requires_grad_(True) for x in _random(seed=9))
    desirable = torch.tensor([True, False, False, True])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    margin = t(0.1, 0.5, -0.2, 0.0)
    functions = {
        "hinge": lambda: hinge_loss(pc, pr, rc, rr, 0.01)[0],  # |βh| < 1: away from the kink
        "cdpo": lambda: dpo_loss(pc, pr, rc, rr, 0.2, 0.3)[0],
        "kto-weighted": lambda: kto_loss(pc, pr, desirable, t(0.4)[0], 0.3, 1.5, 0.5)[0],
        "ranking-centering": lambda: ranking_loss(torch.stack([pc, pr]), torch.tensor([[0, 1, 1, 2], [2, 0, 1, 0]]),
                                                  valid, centering=0.05),
        "bt-margin-tensor": lambda: bradley_terry_loss(pc, pr, margin, 0.02),
    }
    assert torch.autograd.gradcheck(lambda *_: functions[name](), (pc, pr))


# =========================================================================== stage inputs (tiny model)


def _items(tokenizer, rows):
    from posttrain.train.grouped import items_from_examples

    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(k),
                                source=f"t:{i}") for i, (p, r, k) in enumerate(rows)]
    return items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])


ROWS = [("Smallest letter: q m t", ("m", "t"), (0, 1)), ("Copy: a b", ("a b", "b a b a"), (0, 1)),
        ("Count letters: a b c", ("3", "4", "2", "5 5"), (0, 1, 1, 2))]  # a ranking with a tie


def _naive(model, example) -> tuple[float, int]:
    """(Σ log-probs of the labelled tokens, their count) from full logits, in float64."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([example.input_ids])).logits[0].double().log_softmax(-1)
    labelled = [(i, tok) for i, tok in enumerate(example.labels) if tok != -100]
    return sum(float(logprobs[i - 1, tok]) for i, tok in labelled), len(labelled)


def _log_odds(a: float) -> float:
    return a - math.log(-math.expm1(a))


def _pair_formula(cfg, h: float, aw: float, al: float, h_avg: float) -> float:
    b = cfg.beta
    if cfg.loss == "dpo":
        return -_logsig(b * h)
    if cfg.loss == "cdpo":
        return -(1 - cfg.label_smoothing) * _logsig(b * h) - cfg.label_smoothing * _logsig(-b * h)
    if cfg.loss == "ipo":  # h from per-token averages, as its authors advised and TRL computes it
        return (h_avg - 1 / (2 * b)) ** 2
    if cfg.loss == "hinge":
        return max(0.0, 1 - b * h)
    if cfg.loss == "simpo":
        return -_logsig(b * aw - b * al - cfg.simpo_gamma)
    assert cfg.loss == "orpo"  # its L_SFT term is the stage's NLL term, on the best response (below)
    return -cfg.orpo_lambda * _logsig(_log_odds(aw) - _log_odds(al))


@pytest.mark.parametrize("loss, knobs", [
    ("dpo", {"beta": 0.3}), ("cdpo", {"beta": 0.3, "label_smoothing": 0.2}), ("ipo", {"beta": 0.4}),
    ("hinge", {"beta": 0.05}), ("simpo", {"beta": 2.0, "simpo_gamma": 0.5}), ("orpo", {"orpo_lambda": 0.3}),
    ("dpo", {"beta": 0.3, "nll_weight": 0.7}),
], ids=["dpo", "cdpo", "ipo-averages", "hinge", "simpo-averages", "orpo", "rpo"])
def test_every_pair_loss_in_the_stage_equals_its_formula_on_naive_logps(tokenizer, model, loss, knobs):
    """The stage feeds summed log-probs to dpo/cdpo/hinge and per-token averages to ipo (policy
    and reference), simpo and orpo; K-way rankings become every strictly ordered pair, each weighted 1/#pairs. The NLL
    term (ORPO's L_SFT, RPO's dpo.nll_weight) is the mean token NLL of the prompt's best response
    (those of the best rank, averaged), once per prompt: never of a lower-ranked answer that beats
    a worse one (stop 32)."""
    from posttrain.config import DPOLossConfig
    from posttrain.train.grouped import collate_items
    from posttrain.train.preference import PreferenceLoss, pair_extras

    items = _items(tokenizer, ROWS)
    g = torch.Generator().manual_seed(1)
    for item in items:
        item.reference_logps = (-torch.rand(len(item.sequences), generator=g) * 10).tolist()
    cfg = DPOLossConfig(loss=loss, **knobs)
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    with torch.no_grad():
        got, _ = PreferenceLoss(model, cfg)(**batch)
    expected = 0.0
    for item in items:
        naive = [_naive(model, s) for s in item.sequences]
        pairs = item.ordered_pairs()
        for w, l in pairs:
            (sw, nw), (sl, nl) = naive[w], naive[l]
            aw, al = sw / nw, sl / nl
            h = (sw - item.reference_logps[w]) - (sl - item.reference_logps[l])
            h_avg = (aw - item.reference_logps[w] / nw) - (al - item.reference_logps[l] / nl)
            expected += _pair_formula(cfg, h, aw, al, h_avg) / len(pairs)
        best = [k for k, rank in enumerate(item.ranks) if rank == min(item.ranks)]
        nll_weight = 1.0 if loss == "orpo" else cfg.nll_weight
        expected += nll_weight * sum(-naive[k][0] / naive[k][1] for k in best) / len(best)
    assert sum(len(item.ordered_pairs()) for item in items) == 1 + 1 + 5  # the tie makes no pair
    assert float(got) == pytest.approx(expected, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("labels", [[True, True, True], [False, False, False], [True, False, True]],
                         ids=["all-desirable", "all-undesirable", "mixed"])
@pytest.mark.parametrize("shift", [0.5, -0.5], ids=["z0-positive", "z0-clamped"])
def test_kto_stage_z0_is_the_detached_clamped_mean_over_the_mismatched_rows(tokenizer, model, labels, shift):
    from posttrain.config import DPOLossConfig
    from posttrain.train.grouped import collate_items, items_from_examples
    from posttrain.train.preference import (
        PreferenceLoss,
        kto_extras,
        kto_items,
        policy_logps,
    )

    prompts = [("Copy: a b", "a b"), ("Reverse: x y", "y x"), ("Smallest letter: q m", "m")]
    records = [PreferenceRecord([{"role": "user", "content": p}], [c], desirable=d, source=f"k:{i}")
               for i, ((p, c), d) in enumerate(zip(prompts, labels))]
    items = kto_items(items_from_examples([encode_preference(r, tokenizer, CHATML) for r in records]), 512)
    naive = [[_naive(model, s)[0] for s in item.sequences] for item in items]
    for item, (own, mismatched) in zip(items, naive):
        item.reference_logps = [own - 0.25, mismatched - shift]  # r = 0.25 for each, z0 = max(shift, 0)
    cfg = DPOLossConfig(loss="kto", beta=0.7, kto_desirable_weight=1.4, kto_undesirable_weight=0.6)
    batch = collate_items(items, tokenizer.pad_token_id) | kto_extras(items)
    trainable = [p for p in model.parameters() if p.requires_grad]
    loss, metrics = PreferenceLoss(model, cfg)(**batch)
    z0 = max(shift, 0.0)
    expected = sum((1.4 * (1 - _sig(0.7 * (0.25 - z0)))) if d else (0.6 * (1 - _sig(0.7 * (z0 - 0.25))))
                   for d in labels)
    assert float(loss.detach()) == pytest.approx(expected, abs=1e-5)
    assert float(metrics["kl"]) == pytest.approx(z0 * 3, abs=1e-5)
    grads = torch.autograd.grad(loss, trainable, allow_unused=True)
    # the same loss with z0 a plain constant: identical gradients (z0 carries none)
    rows = batch["completion_row"]
    logps = policy_logps(model, batch["input_ids"][rows], batch["labels"][rows], batch["attention_mask"][rows])[0]
    manual = kto_loss(logps, batch["reference_logps"][rows], batch["desirable"], torch.tensor(z0), 0.7, 1.4, 0.6)[0]
    manual_grads = torch.autograd.grad(manual.sum(), trainable, allow_unused=True)
    for a, b in zip(grads, manual_grads):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


# BUG: kto_items pairs each single item with "the next item's response", in dataset order,
# after pairs/rankings were split into their responses. The next item is then usually the
# SAME prompt's other response, so the "mismatched" KL row is a matched (x, y) sequence:
# for pairs, every chosen item's KL row is prompt + its own rejected (identical tokens to the
# next item's completion); for K-way rankings (K−1)/K of them. Unpaired files with several
# completions per prompt on adjacent lines hit the same. z0 is then biased toward the matched
# log-ratio, not the paper's E over mismatched (x, y') pairs (README: "from mismatched pairs").
@pytest.mark.parametrize("source", ["pairs", "unpaired-adjacent-same-prompt"])
def test_kto_mismatched_rows_pair_a_prompt_with_another_prompts_response(tokenizer, source):
    from posttrain.train.grouped import first_label, items_from_examples
    from posttrain.train.preference import kto_items

    if source == "pairs":
        items = _items(tokenizer, ROWS[:2] + [("Reverse: x y z", ("z y x", "x y z"), (0, 1))])
    else:
        records = [PreferenceRecord([{"role": "user", "content": p}], [c], desirable=d, source=f"u:{i}")
                   for i, (p, c, d) in enumerate([("Copy: a b", "a b", True), ("Copy: a b", "b a", False),
                                                  ("Reverse: x y", "y x", True), ("Reverse: x y", "x y", False)])]
        items = items_from_examples([encode_preference(r, tokenizer, CHATML) for r in records])
    single = kto_items(items, 512)
    own_prompts = {tuple(i.sequences[0].input_ids[:first_label(i.sequences[0])]) for i in single}
    assert len(own_prompts) >= 2  # a mismatched partner exists for every item
    matched = {tuple(i.sequences[0].input_ids) for i in single}
    same_prompt = []
    for n, item in enumerate(single):
        mismatched = item.sequences[1]
        if tuple(mismatched.input_ids) in matched:  # prompt + one of its own responses
            same_prompt.append(n)
    assert not same_prompt, (f"{len(same_prompt)} of {len(single)} KL rows are a prompt with its own response "
                             f"(items {same_prompt})")


def test_reward_model_mixed_batch_keeps_the_pairs_margins(tokenizer):
    """A pair in a batch with a K-way ranking keeps its margin (−log σ(r_w − r_l − m)); the
    ranking's prompts use the ranking loss."""
    from posttrain.models.reward_model import load_reward_model, score
    from posttrain.train.grouped import collate_items
    from posttrain.train.reward import RewardModelLoss, reward_extras

    torch.manual_seed(0)
    rm = load_reward_model("tiny", pad_token_id=tokenizer.pad_token_id).eval()
    items = _items(tokenizer, ROWS)
    items[0].margin = 2.0
    batch = collate_items(items, tokenizer.pad_token_id) | reward_extras(items)
    with torch.no_grad():
        loss, _ = RewardModelLoss(rm, centering=0.01)(**batch)
        r = score(rm, batch["input_ids"], batch["attention_mask"]).double().tolist()
    per_item, offset = [], 0
    for item in items:
        rewards = r[offset:offset + len(item.sequences)]
        offset += len(item.sequences)
        pairs = item.ordered_pairs()
        mean = sum(rewards) / len(rewards)
        margin = (item.margin or 0.0) if len(rewards) == 2 else 0.0
        per_item.append(sum(-_logsig(rewards[i] - rewards[j] - margin) for i, j in pairs) / len(pairs)
                        + 0.01 * (2 * mean) ** 2)
    assert len(items[0].sequences) == 2 and any(len(item.sequences) > 2 for item in items)
    assert float(loss) == pytest.approx(sum(per_item), rel=1e-5)


# =========================================================================== data: BUGS


# BUG: fit_preference_length truncates each over-long sequence from the end; responses that
# differ only after the cut become token-identical, yet the record is kept with its ranks
# (only "truncated_sequences" counts it). For a pair that is a row with zero gradient and a
# constant log 2 (DPO/BT) diluting the batch; for a ranking it asks r_i > r_j for identical
# inputs. The row-level check (identical sides are a bad row) runs before truncation only.
@pytest.mark.parametrize("kind", ["pair", "ranking"])
def test_truncation_that_makes_differently_ranked_responses_identical_is_not_kept_silently(tokenizer, kind):
    from posttrain.train.grouped import first_label

    if kind == "pair":
        row = {"prompt": "Copy: a b c d e f", "chosen": "a b c d e f g", "rejected": "a b c d e f h"}
    else:
        row = {"prompt": "Copy: a b c d e f", "responses": ["a b c d e f g", "a b c d e f h", "x"]}
    record = to_preference_record(row, "pairs" if kind == "pair" else "ranking", "f:1")
    example = encode_preference(record, tokenizer, CHATML)
    max_length = first_label(example.sequences[0]) + 3  # keeps "a b" of each long response
    kept, report = fit_preference_length([example], max_length)
    assert report["too_long_records"] == 1 and not kept
    assert report["dropped_identical"] == 1 and "f:1" in report["summary"]
    for e in kept:
        for i, a in enumerate(e.sequences):
            for j, b in enumerate(e.sequences):
                assert e.ranks[i] == e.ranks[j] or a.input_ids != b.input_ids, (
                    f"kept {e.source} with responses {i} and {j} identical after truncation but ranked "
                    f"{e.ranks[i]} vs {e.ranks[j]}; report {report['summary']!r}")


# BUG: the "chosen and rejected are the same text" check compares the raw strings, not the
# encoded sequences. Under a chat template that trims message content (Llama 3's, Qwen's and
# many others do `content | trim`), "yes" and "yes " render to identical tokens and the row
# is trained on as a preference between two identical sequences, with no report.
def test_sides_identical_after_templating_are_a_reported_bad_row(tmp_path, tokenizer):
    trimming = copy.deepcopy(tokenizer)
    trimming.chat_template = CHATML.replace("message['content']", "(message['content'] | trim)")
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Say yes", "chosen": "yes", "rejected": "yes "},
            {"prompt": "Say no", "chosen": "no", "rejected": "yes"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = types.SimpleNamespace(train_files=[str(path)], eval_files=[], eval_fraction=0.0, format="auto",
                                template="tokenizer", max_length=64, overlength="truncate", bad_rows="skip",
                                max_bad_fraction=0.9, synthetic_tasks=[], synthetic_size=0, synthetic_kind="pairs",
                                synthetic_responses=2)
    try:
        data = prepare_preference_data(cfg, trimming, tmp_path / "run", 0, log=_quiet)
    except DataError as err:  # refusing the row with its location is fine too
        assert f"{path}:1" in str(err)
        return
    identical = [e.source for e in data.train if e.sequences[0].input_ids == e.sequences[1].input_ids]
    assert not identical, f"trained on pairs whose sides encode identically: {identical}"


# =========================================================================== data: coverage


def test_jsonl_with_multi_turn_prompts_rankings_with_ties_and_conversations_as_responses(tmp_path, tokenizer):
    from posttrain.train.grouped import first_label, items_from_examples, shares_prompt
    from posttrain.train.preference import pair_extras

    system = {"role": "system", "content": "Be brief."}
    prompt = [{"role": "user", "content": "Copy: a"}, {"role": "assistant", "content": "a"},
              {"role": "user", "content": "Reverse: a b"}]
    rows = [
        {"prompt": prompt, "system": "Be brief.", "chosen": [*prompt, {"role": "assistant", "content": "b a"}],
         "rejected": [{"role": "assistant", "content": "a b"}]},
        {"prompt": [system, *prompt], "responses": ["b a", [{"role": "assistant", "content": "a b"}], "b", "a"],
         "scores": [3, 1, 2, 1]},
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "rank.jsonl").write_text(json.dumps(rows[1]) + "\n")
    cfg = types.SimpleNamespace(train_files=[str(path), str(tmp_path / "rank.jsonl")], eval_files=[],
                                eval_fraction=0.0, format="auto", template="chatml", max_length=128,
                                overlength="truncate", bad_rows="error", max_bad_fraction=0.0, synthetic_tasks=[],
                                synthetic_size=0, synthetic_kind="pairs", synthetic_responses=2)
    data = prepare_preference_data(cfg, tokenizer, tmp_path / "run", 0, log=_quiet)
    assert [e.ranks for e in data.train] == [[0, 1], [0, 2, 1, 2]]  # scores → dense ranks, ties equal
    items = items_from_examples(data.train)
    assert all(shares_prompt(item) for item in items)
    # both records render the same system + 3-turn prompt; only the final reply is labelled
    cut = first_label(items[0].sequences[0])
    assert items[0].sequences[0].input_ids[:cut] == items[1].sequences[0].input_ids[:cut]
    labelled = tokenizer.decode([x for x in items[1].sequences[0].labels if x != -100])
    assert labelled == "b a<|im_end|>"
    extras = pair_extras(items)  # ranking: 0>1, 0>2, 0>3, 2>1, 2>3 (1 and 3 tied: no pair)
    assert list(zip(extras["chosen_row"].tolist()[1:], extras["rejected_row"].tolist()[1:])) == [
        (2, 3), (2, 4), (2, 5), (4, 3), (4, 5)]
    assert extras["pair_weight"].tolist() == pytest.approx([1.0] + [0.2] * 5)


def test_bad_rows_keep_their_file_line_across_blank_lines_and_broken_json(tmp_path):
    good = {"prompt": "q", "chosen": "a", "rejected": "b"}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps(good) + "\n\n{not json\n" + json.dumps(good) + "\n"
                    + json.dumps(good | {"rejected": "a"}) + "\n")
    with pytest.raises(DataError) as info:
        load_preference_records([str(path)], log=_quiet)
    assert f"{path}:3: invalid JSON" in str(info.value)
    assert f"{path}:5: 'chosen' and 'rejected' are the same text" in str(info.value)
    records, report = load_preference_records([str(path)], bad_rows="skip", max_bad_fraction=0.9,
                                              rejects_path=str(tmp_path / "rejects.jsonl"), log=_quiet)
    assert [r.source for r in records] == [f"{path}:1", f"{path}:4"] and report.bad == 2


def test_a_row_whose_prompt_fills_max_length_is_counted_not_silently_dropped(tmp_path, tokenizer):
    """Documented: over-long rows are truncated from the end of the response; a record left
    without response tokens is dropped and counted in data_report.json and the log line."""
    rows = [{"prompt": "Copy: " + " ".join("abcdefghijklmnop"), "chosen": "a", "rejected": "b"},
            {"prompt": "q", "chosen": "a b c d e f g h i j k l", "rejected": "b"}]
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    cfg = types.SimpleNamespace(train_files=[str(path)], eval_files=[], eval_fraction=0.0, format="auto",
                                template="chatml", max_length=20, overlength="truncate", bad_rows="error",
                                max_bad_fraction=0.0, synthetic_tasks=[], synthetic_size=0, synthetic_kind="pairs",
                                synthetic_responses=2)
    data = prepare_preference_data(cfg, tokenizer, tmp_path / "run", 0, log=logged.append)
    assert [e.source for e in data.train] == [f"{path}:2"]
    chosen = data.train[0].sequences[0]
    assert len(chosen) == 20 and chosen.num_label_tokens > 0  # the response's start is kept
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())["train_length"]
    assert (report["dropped_no_labels"], report["truncated_sequences"]) == (1, 1)
    assert "1 dropped with a response left without label tokens" in logged[-1]
