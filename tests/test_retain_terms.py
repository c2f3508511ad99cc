"""Forgetting control's per-step retain terms (train/retain_terms.py, train/forgetting.py):
`forgetting.lm_coef`, `distill` (LwF on the starting model's top-k) and `project` (A-GEM), in
every stage, and `unfreeze_every` beside an adapter's staged schedule.

The pure functions (losses/regularization.py, losses/language_modeling.py) against formulas
written out plainly here on float64 random inputs; `RetainTerms.apply` against a plain
full-logits computation on the same rows; then sft / dpo / grpo / ppo runs on the tiny-2l preset
for a few steps: the figures logged, resume == uninterrupted bitwise, batch 8 x 1 == batch 2 x 4,
a GradScaler's loss scale, bf16 autocast, PPO's value head, and config checks."""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math

import pytest
import torch

from posttrain.config import ForgettingConfig, ModelConfig, validate_sft
from posttrain.config.preference import DPOConfig, validate_dpo
from posttrain.config.rl import GRPOConfig, PPOConfig, validate_grpo, validate_ppo
from posttrain.data.records import IGNORE_INDEX, Example
from posttrain.errors import ConfigError
from posttrain.losses.language_modeling import token_logps_at, top_k_logps
from posttrain.losses.regularization import agem_project, topk_distillation_kl
from posttrain.train import forgetting as fg
from posttrain.train.retain_terms import RetainTerms
from posttrain.train.sft import run_sft
from tests.test_forgetting import _Acc
from tests.test_forgetting_edges import _cfg as _sft_cfg
from tests.test_forgetting_edges import _final, _lines, _rows, _stage_state, _write

ALL_TERMS = {"lm_coef": 0.5, "distill": 1.0, "project": True, "distill_top_k": 8, "retain_batch_size": 4}
RETAIN_FIGURES = ("retain_lm_loss", "distill_kl", "agem_projected")


class _Accelerator(_Acc):
    """One process on the CPU, no autocast: what RetainTerms reads of an accelerator."""

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


def _steps(run_dir) -> list[dict]:
    return [line for line in _lines(run_dir) if "loss" in line]


def _retain_figures(run_dir) -> list[tuple]:
    return [tuple(line.get(k) for k in ("step",) + RETAIN_FIGURES) for line in _steps(run_dir)]


def _same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name


# --------------------------------------------------------------------------- topk_distillation_kl


def _full_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """KL(q ‖ p) over the whole vocabulary, written out: Σ_v q_v (log q_v − log p_v)."""
    q, p = teacher_logits.log_softmax(-1), student_logits.log_softmax(-1)
    return (q.exp() * (q - p)).sum(-1)


def _bucket_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, k: int) -> torch.Tensor:
    """KL over the teacher's top-k tokens and one bucket for the rest, each bucket's mass summed
    from the full distributions (no 1 − Σ): the k + 1-outcome KL the docstring defines."""
    q, p = teacher_logits.softmax(-1), student_logits.softmax(-1)
    top = q.topk(k, dim=-1).indices
    rest = torch.ones_like(q, dtype=torch.bool).scatter(1, top, False)
    q_b = torch.cat([q.gather(1, top), (q * rest).sum(-1, keepdim=True)], 1)
    p_b = torch.cat([p.gather(1, top), (p * rest).sum(-1, keepdim=True)], 1)
    terms = torch.where(q_b > 0, q_b * (q_b.log() - p_b.log()), torch.zeros_like(q_b))
    return terms.sum(-1)


def _topk_inputs(teacher_logits, student_logits, k):
    """(student log-probs, teacher log-probs) at the teacher's top-k tokens: (N, k) each."""
    top = teacher_logits.topk(k, dim=-1).indices
    return student_logits.log_softmax(-1).gather(1, top), teacher_logits.log_softmax(-1).gather(1, top)


def _logits(seed, n=6, v=13, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(n, v, generator=g, dtype=torch.float64),
            scale * torch.randn(n, v, generator=g, dtype=torch.float64))


def test_topk_kl_over_every_token_is_the_full_vocabulary_kl():
    teacher, student = _logits(0)
    got = topk_distillation_kl(*_topk_inputs(teacher, student, teacher.shape[1]))
    torch.testing.assert_close(got, _full_kl(teacher, student), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed, scale", [(1, 1.0), (2, 3.0), (3, 0.3)])
def test_topk_kl_is_the_bucketed_kl_never_above_the_full_one_and_never_negative(seed, scale):
    teacher, student = _logits(seed, scale=scale)
    full = _full_kl(teacher, student)
    for k in range(1, teacher.shape[1]):
        got = topk_distillation_kl(*_topk_inputs(teacher, student, k))
        torch.testing.assert_close(got, _bucket_kl(teacher, student, k), rtol=1e-10, atol=1e-12)
        assert bool((got >= 0).all()) and bool((got <= full + 1e-12).all()), k
    # merging outcomes loses information: a larger k never counts less
    values = [topk_distillation_kl(*_topk_inputs(teacher, student, k)) for k in range(1, teacher.shape[1] + 1)]
    assert all(bool((b >= a - 1e-12).all()) for a, b in itertools.pairwise(values))


def test_topk_kl_docstring_example():
    """q = (0.5, 0.3 | R 0.2), p = (0.4, 0.4 | R 0.2): 0.5 ln(5/4) + 0.3 ln(3/4) + 0 = 0.02527 nats."""
    got = topk_distillation_kl(torch.tensor([[0.4, 0.4]], dtype=torch.float64).log(),
                               torch.tensor([[0.5, 0.3]], dtype=torch.float64).log())
    assert float(got) == pytest.approx(0.5 * math.log(5 / 4) + 0.3 * math.log(3 / 4), rel=1e-12)
    assert float(got) == pytest.approx(0.02527, abs=5e-6)
    # the teacher's whole mass in its top-k (q_R = 0) and the student the same: 0 exactly
    same = torch.tensor([[0.6, 0.4]], dtype=torch.float64).log()
    assert float(topk_distillation_kl(same, same)) == 0.0


@pytest.mark.parametrize("dtype, rest", [(torch.float64, 1e-12), (torch.float64, 0.0), (torch.float32, 1e-7),
                                         (torch.float32, 0.0)])
def test_topk_kl_gradient_is_finite_when_the_students_top_k_holds_almost_all_its_mass(dtype, rest):
    """p_R = 1 − Σ_S p_v near 0 (or rounding to ≤ 0): the log's clamp keeps value and gradient finite."""
    mass = torch.tensor([[0.7, 0.3 - rest], [0.5, 0.5 - rest]], dtype=torch.float64)
    student = mass.log().to(dtype).requires_grad_(True)
    teacher = torch.tensor([[0.5, 0.3], [0.4, 0.4]], dtype=torch.float64).log().to(dtype)  # q_R = 0.2
    value = topk_distillation_kl(student, teacher).sum()
    (grad,) = torch.autograd.grad(value, student)
    assert math.isfinite(float(value.detach())) and float(value.detach()) > 0
    assert bool(grad.isfinite().all())


def test_topk_kl_gradient_against_autograd_of_the_plain_formula():
    """A well-conditioned case in float64: the gradient w.r.t. the student's logits is that of
    the k + 1-bucket KL written out."""
    teacher, student = _logits(4, n=4, v=9)
    student.requires_grad_(True)
    k = 4
    top = teacher.topk(k, dim=-1).indices
    got = topk_distillation_kl(student.log_softmax(-1).gather(1, top), teacher.log_softmax(-1).gather(1, top))
    (g_got,) = torch.autograd.grad(got.sum(), student)
    (g_want,) = torch.autograd.grad(_bucket_kl(teacher, student, k).sum(), student)
    torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-12)


def test_topk_kl_stays_below_the_full_kl_in_float32_for_a_confident_student():
    teacher, student = _logits(0, n=3, v=64, scale=1.0)
    top = teacher.topk(8, dim=-1).indices
    student = student.scatter(1, top[:, :1], 25.0)  # the student puts 1 − 1.3e-9 on the teacher's top token
    s, t = (x.log_softmax(-1).gather(1, top).float() for x in (student, teacher))  # correctly rounded inputs
    # the rest bucket's log-mass from the logits, as the retain terms pass it (token_logps_at(rest_from=...))
    log_rest = (torch.logsumexp(student.scatter(1, top, float("-inf")), -1) - torch.logsumexp(student, -1)).float()
    got = topk_distillation_kl(s, t, log_rest).double()
    full = _full_kl(teacher, student)
    assert bool((got <= full + 1e-3).all()) and bool((got >= 0.95 * full).all()), (got, full)
    # formed from 1 − Σ p (no log_rest given) it rounds to 0 and is clamped: the reason log_rest exists
    assert bool((topk_distillation_kl(s, t).double() > 2 * full).all())


def test_token_logps_at_gives_the_log_mass_outside_the_listed_tokens():
    from posttrain.losses.language_modeling import token_logps_at

    gen = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randn(11, 5, generator=gen, dtype=torch.float64)
    indices = torch.stack([torch.randperm(11, generator=gen)[:4] for _ in range(7)])
    out = token_logps_at(hidden, weight, indices, chunk_size=3, rest_from=1)
    full = (hidden @ weight.T).log_softmax(-1)
    torch.testing.assert_close(out[:, :4], full.gather(1, indices))
    outside = full.exp().scatter(1, indices[:, 1:], 0.0).sum(-1).log()  # column 0 is not excluded
    torch.testing.assert_close(out[:, 4], outside)


# --------------------------------------------------------------------------- agem_project


def test_agem_by_hand():
    """g = (1, −2), g_ref = (1, 1): gᵀg_ref = −1 < 0, so g ← g − (−1/2)·(1, 1) = (1.5, −1.5), orthogonal to g_ref."""
    g, ref = torch.tensor([1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert agem_project([g], [ref]) == -1.0
    assert g.tolist() == [1.5, -1.5] and float(g @ ref) == 0.0
    assert ref.tolist() == [1.0, 1.0]  # the reference is left as it is


@pytest.mark.parametrize("g", [[2.0, 1.0], [1.0, -1.0], [0.0, 0.0]], ids=["positive", "zero", "zero-gradient"])
def test_agem_leaves_a_gradient_that_does_not_conflict_alone(g):
    grad = torch.tensor(g, dtype=torch.float64)
    dot = agem_project([grad], [torch.tensor([1.0, 1.0], dtype=torch.float64)])
    assert dot == g[0] + g[1] and grad.tolist() == g


def test_agem_over_several_tensors_is_the_projection_of_the_concatenated_gradient():
    gen = torch.Generator().manual_seed(7)
    shapes = [(3, 4), (5,), (2, 3, 2)]
    ref = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    grads = [torch.randn(s, generator=gen, dtype=torch.float64) - 2.0 * r for s, r in zip(shapes, ref)]
    flat_g, flat_r = torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in ref])
    before = float(flat_g @ flat_r)
    assert before < 0
    want = flat_g - (before / float(flat_r @ flat_r)) * flat_r
    assert agem_project(grads, ref) == pytest.approx(before, rel=1e-12)
    torch.testing.assert_close(torch.cat([g.flatten() for g in grads]), want, rtol=1e-12, atol=1e-12)
    assert abs(sum(float((g * r).sum()) for g, r in zip(grads, ref))) < 1e-10
    # projecting again changes nothing (to rounding): the conflict is gone
    again = [g.clone() for g in grads]
    agem_project(again, ref)
    for a, g in zip(again, grads):
        torch.testing.assert_close(a, g, rtol=1e-12, atol=1e-12)


def test_agem_on_float32_gradients_with_a_float32_reference():
    gen = torch.Generator().manual_seed(8)
    ref = [torch.randn(50, generator=gen), torch.randn(7, 3, generator=gen)]
    grads = [torch.randn_like(r) - 3.0 * r for r in ref]
    agem_project(grads, ref)
    assert all(g.dtype == torch.float32 for g in grads)
    dot = sum(float((g.double() * r.double()).sum()) for g, r in zip(grads, ref))
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads) * sum(float(r.double().pow(2).sum()) for r in ref))
    assert abs(dot) < 1e-6 * norm


# --------------------------------------------------------------------------- token_logps_at / top_k_logps


def _head(n=37, h=6, v=19, seed=0, bias=True):
    gen = torch.Generator().manual_seed(seed)
    selected = torch.randn(n, h, generator=gen, dtype=torch.float64)
    weight = torch.randn(v, h, generator=gen, dtype=torch.float64)
    b = torch.randn(v, generator=gen, dtype=torch.float64) if bias else None
    return selected, weight, b


@pytest.mark.parametrize("chunk", [5, 8, 37, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_token_logps_at_is_log_softmax_gathered(chunk, bias):
    selected, weight, b = _head(bias=bias)
    gen = torch.Generator().manual_seed(1)
    indices = torch.randint(0, weight.shape[0], (selected.shape[0], 4), generator=gen)
    plain = lambda s, w, bb: torch.log_softmax(s @ w.T + (0 if bb is None else bb), -1).gather(1, indices)
    with torch.no_grad():
        torch.testing.assert_close(token_logps_at(selected, weight, indices, b, chunk), plain(selected, weight, b),
                                   rtol=1e-12, atol=1e-12)
    # with gradients (the activation-checkpointed path): the same values and the same gradients
    leaves = [t.clone().requires_grad_(True) for t in (selected, weight) + ((b,) if bias else ())]
    got = token_logps_at(leaves[0], leaves[1], indices, leaves[2] if bias else None, chunk)
    want = plain(leaves[0], leaves[1], leaves[2] if bias else None)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    upstream = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    for a, c in zip(torch.autograd.grad((got * upstream).sum(), leaves),
                    torch.autograd.grad((want * upstream).sum(), leaves)):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_token_logps_at_with_no_positions():
    selected, weight, b = _head(n=0)
    assert token_logps_at(selected, weight, torch.zeros(0, 3, dtype=torch.long), b, 4).shape == (0, 3)


@pytest.mark.parametrize("chunk", [5, 8, 100])
@pytest.mark.parametrize("bias", [True, False])
def test_top_k_logps_is_the_top_k_of_log_softmax(chunk, bias):
    selected, weight, b = _head(bias=bias, seed=2)
    full = torch.log_softmax(selected @ weight.T + (0 if b is None else b), -1)
    values, ids = top_k_logps(selected, weight, 5, b, chunk)
    want = full.topk(5, dim=-1)
    assert values.dtype == torch.float32 and ids.dtype == torch.int64
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(values, want.values.float(), rtol=0, atol=0)  # float64 math, rounded once
    # k beyond the vocabulary: the whole distribution, sorted
    values, ids = top_k_logps(selected, weight, 50, b, chunk)
    assert ids.shape == (selected.shape[0], weight.shape[0])
    torch.testing.assert_close(values.double().exp().sum(-1), torch.ones(selected.shape[0], dtype=torch.float64))


# --------------------------------------------------------------------------- RetainTerms.apply


def _pool(n=10, seed=0, vocab=1024, pad=3):
    """n retain examples of 5–12 tokens, a prompt of 2–4 tokens unlabelled."""
    gen = torch.Generator().manual_seed(seed)
    pool = []
    for _ in range(n):
        length = int(torch.randint(5, 13, (1,), generator=gen))
        prompt = int(torch.randint(2, 5, (1,), generator=gen))
        ids = torch.randint(pad + 1, vocab, (length,), generator=gen).tolist()
        pool.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return pool


@pytest.fixture(scope="module")
def tiny64():
    """tiny-2l in float64, so the comparisons below are tight."""
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    return load_model(ModelConfig(path="tiny-2l")).double()


def _plain_losses(model, teacher, rows: list[Example], k: int):
    """(token-mean CE, token-mean top-k KL) over `rows`, one row at a time with full logits:
    the teacher's top-k log-probs rounded to float32 as they are stored; each bucket's mass, the
    rest included, summed from the full distributions."""
    ce = kl = 0.0
    total = sum(r.num_label_tokens for r in rows)
    for row in rows:
        ids = torch.tensor([row.input_ids])
        targets = torch.tensor(row.labels[1:])
        kept = targets != IGNORE_INDEX
        logp = model(input_ids=ids).logits[0, :-1][kept].log_softmax(-1)  # (n, V)
        ce = ce - logp.gather(1, targets[kept][:, None]).sum()
        with torch.no_grad():
            t_full = teacher(input_ids=ids).logits[0, :-1][kept].log_softmax(-1)
        top = t_full.topk(k, dim=-1)
        q = top.values.float().double().exp()
        rest = torch.ones_like(logp, dtype=torch.bool).scatter(1, top.indices, False)
        q_r = (1.0 - q.sum(-1)).clamp(min=0)
        p_s = logp.gather(1, top.indices)
        log_p_r = logp.masked_fill(~rest, float("-inf")).logsumexp(-1)
        kl = kl + (q * (q.log() - p_s)).sum() + torch.where(q_r > 0, q_r * (q_r.log() - log_p_r), 0.0).sum()
    return ce / total, kl / total


def _terms(model, pool, **cfg):
    return RetainTerms(ForgettingConfig(retain_files=["retain.jsonl"], **cfg), pool, model, pad_id=3, batch_size=99,
                       seed=11, chunk_size=4)  # a chunk of 4 divides no row's label count here


def _set_grads(params, seed, none=lambda i: False):
    gen = torch.Generator().manual_seed(seed)
    for i, p in enumerate(params):
        p.grad = None if none(i) else torch.randn(p.shape, generator=gen, dtype=p.dtype)


@pytest.mark.parametrize("lm_coef, distill", [(0.7, 1.3), (0.7, 0.0), (0.0, 2.0)])
def test_apply_adds_the_lm_and_distillation_gradients_of_the_steps_batch(tiny64, lm_coef, distill):
    """grad += s·(γ ∇ mean CE + λ ∇ mean KL) on the step's retain rows (batch_at(step)), the teacher
    being the model when the targets were computed; parameters without a gradient keep none."""
    model = copy.deepcopy(tiny64)
    teacher = copy.deepcopy(model)
    pool, k, step, scale = _pool(), 5, 5, 2.5
    terms = _terms(model, pool, lm_coef=lm_coef, distill=distill, distill_top_k=k, retain_batch_size=3)
    if distill:
        terms.compute_teacher(_Accelerator())
        assert all(t[0].shape == (e.num_label_tokens, k) for t, e in zip(terms.teacher, pool))
    with torch.no_grad():  # the student moves away from the teacher
        gen = torch.Generator().manual_seed(3)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    _set_grads(params, 4, none=lambda i: ".layers.0." in names[i])  # layer 0 inactive this step
    before = [None if p.grad is None else p.grad.clone() for p in params]
    live = [p for p in params if p.grad is not None]
    rows = [pool[i] for i in terms.batch_at(step)]
    ce, kl = _plain_losses(model, teacher, rows, k)
    want = torch.autograd.grad(lm_coef * ce + distill * kl, live)

    figures = terms.apply(params, scale, _Accelerator(), step)

    assert figures["retain_lm_loss"] == pytest.approx(float(ce.detach()), rel=1e-9)
    if distill:
        kl = float(kl.detach())
        assert figures["distill_kl"] == pytest.approx(kl, rel=1e-5) and kl > 1e-3  # float32 targets
    else:
        assert "distill_kl" not in figures
    assert "agem_projected" not in figures
    w = iter(want)
    for name, p, b in zip(names, params, before):
        if b is None:
            assert p.grad is None, name
        else:
            # RetainTerms takes ∂/∂θ in float32 (its _gradient), whatever the parameters' dtype
            want_p = next(w)
            torch.testing.assert_close((p.grad - b) / scale, want_p, rtol=1e-6, atol=1e-6 * float(want_p.abs().max()),
                                       msg=name)


@pytest.mark.parametrize("conflict", [True, False])
@pytest.mark.parametrize("lm_coef", [0.0, 0.4])
def test_apply_projects_the_data_gradient_then_adds_the_lm_gradient(tiny64, conflict, lm_coef):
    """A-GEM on the step's gradient g against r = ∇ mean CE of the retain batch: g − (gᵀr/rᵀr) r
    when gᵀr < 0, else g; then + s·γ·r."""
    model = copy.deepcopy(tiny64)
    pool, step, scale = _pool(seed=1), 2, 4.0
    terms = _terms(model, pool, project=True, lm_coef=lm_coef, retain_batch_size=4)
    params = [p for p in model.parameters() if p.requires_grad]
    ce, _ = _plain_losses(model, model, [pool[i] for i in terms.batch_at(step)], 1)
    r = torch.autograd.grad(ce, params)
    gen = torch.Generator().manual_seed(5)
    sign = -1.0 if conflict else 1.0
    for p, rr in zip(params, r):
        p.grad = sign * rr + 0.3 * rr.abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype)
    g = [p.grad.clone() for p in params]
    dot = sum(float((a * b).sum()) for a, b in zip(g, r))
    assert (dot < 0) == conflict
    norm = sum(float((b * b).sum()) for b in r)
    projected = [a - (dot / norm) * b for a, b in zip(g, r)] if conflict else g

    figures = terms.apply(params, scale, _Accelerator(), step)

    assert figures["agem_projected"] == float(conflict)
    for p, a, b in zip(params, projected, r):  # r in float32 inside (see above): tolerances of its rounding
        torch.testing.assert_close(p.grad, a + scale * lm_coef * b, rtol=1e-6,
                                   atol=1e-6 * float(max(a.abs().max(), b.abs().max())))
    if conflict and lm_coef == 0:
        assert abs(sum(float((p.grad * b).sum()) for p, b in zip(params, r))) < 1e-8 * math.sqrt(norm) * max(
            math.sqrt(sum(float((p.grad ** 2).sum()) for p in params)), 1.0)


def test_apply_without_any_gradient_does_nothing(tiny64):
    model = copy.deepcopy(tiny64)
    terms = _terms(model, _pool(), lm_coef=1.0, project=True)
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    assert terms.apply(params, 1.0, _Accelerator(), 0) == {}
    assert all(p.grad is None for p in params)


def test_batch_at_is_a_pure_function_of_the_step_covering_the_pool_each_pass():
    pool = list(range(12))  # batch_at reads only the pool's length
    terms = RetainTerms(ForgettingConfig(retain_batch_size=4), pool, None, 3, 8, seed=2)
    batches = [terms.batch_at(step) for step in range(9)]
    assert [terms.batch_at(step) for step in reversed(range(9))] == batches[::-1]  # any order of calls
    fresh = RetainTerms(ForgettingConfig(retain_batch_size=4), pool, None, 3, 8, seed=2)
    assert fresh.batch_at(7) == batches[7]
    passes = [list(itertools.chain(*batches[i : i + 3])) for i in (0, 3, 6)]
    assert all(len(b) == 4 for b in batches)
    assert all(sorted(p) == pool for p in passes)  # each pass: every row once
    assert passes[0] != passes[1] != passes[2]  # a new order each pass
    other_seed = RetainTerms(ForgettingConfig(retain_batch_size=4), pool, None, 3, 8, seed=3)
    assert [other_seed.batch_at(s) for s in range(3)] != batches[:3]


def test_batch_at_with_a_pool_not_a_multiple_of_the_batch_and_a_batch_beyond_the_pool():
    pool = list(range(10))
    terms = RetainTerms(ForgettingConfig(retain_batch_size=4), pool, None, 3, 8, seed=0)
    for first in (0, 2, 4):  # two batches a pass: 8 distinct rows of the 10
        rows = terms.batch_at(first) + terms.batch_at(first + 1)
        assert len(rows) == len(set(rows)) == 8
    assert set(itertools.chain.from_iterable(terms.batch_at(s) for s in range(40))) == set(pool)  # over passes, every row
    assert RetainTerms(ForgettingConfig(), pool, None, 3, 8, seed=0).batch_size == 8  # 0 = the step batch given, else batch_size
    big = RetainTerms(ForgettingConfig(retain_batch_size=64), pool, None, 3, 8, seed=0)
    assert big.batch_size == 10 and sorted(big.batch_at(0)) == pool and sorted(big.batch_at(1)) == pool


def test_teacher_targets_round_trip_through_a_checkpoints_tensors(tiny64):
    model = copy.deepcopy(tiny64)
    pool = _pool(n=6)
    terms = _terms(model, pool, distill=1.0, distill_top_k=3)
    terms.compute_teacher(_Accelerator())
    tensors = terms.teacher_tensors()
    again = _terms(model, pool, distill=1.0, distill_top_k=3)
    again.load_teacher(tensors)
    for (a_logps, a_ids), (b_logps, b_ids) in zip(terms.teacher, again.teacher):
        assert torch.equal(a_logps, b_logps) and torch.equal(a_ids, b_ids) and b_ids.dtype == torch.int32  # 4 bytes a token
    with pytest.raises(ConfigError, match="do not match the retain pool"):
        _terms(model, pool[:5], distill=1.0).load_teacher(tensors)
    with pytest.raises(ConfigError, match="no distillation targets"):
        _terms(model, pool, distill=1.0).load_teacher({})
    _terms(model, pool, lm_coef=1.0).load_teacher({})  # without distill there is nothing to load


# --------------------------------------------------------------------------- the stages, end to end


def _retain(tmp_path):
    path = tmp_path / "retain.jsonl"
    return path if path.exists() else _write(path, _rows(24))


def _dpo_cfg(tmp_path, name="dpo", *, retain=True, train=None, data=None, **forgetting) -> DPOConfig:
    files = {"retain_files": [str(_retain(tmp_path))]} if retain else {}
    return DPOConfig.from_dict({
        "output_dir": str(tmp_path / name), "model": {"path": "tiny-2l"},
        "data": {"synthetic_size": 32, "max_length": 64} | (data or {}),
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0} | (train or {}),
        "forgetting": files | forgetting})


def _grpo_cfg(tmp_path, name="grpo", *, train=None, **forgetting) -> GRPOConfig:
    return GRPOConfig.from_dict({
        "output_dir": str(tmp_path / name), "model": {"path": "tiny-2l"}, "data": {"synthetic_size": 64},
        "rollout": {"num_generations": 4, "max_new_tokens": 3},
        "grpo": {"updates_per_rollout": 2, "beta": 0.05},
        "reward": {"functions": ["short=tests.rewards_fixture:short"]},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "schedule": "constant", "progress_bar": False,
                  "resume": "never", "seed": 0} | (train or {}),
        "eval": {"prompts": 0},
        "forgetting": {"retain_files": [str(_retain(tmp_path))]} | forgetting})


def _ppo_cfg(tmp_path, name="ppo", **forgetting) -> PPOConfig:
    return PPOConfig.from_dict({
        "output_dir": str(tmp_path / name), "model": {"path": "tiny-2l"}, "data": {"synthetic_size": 32},
        "rollout": {"max_new_tokens": 4}, "reward": {"functions": ["short=tests.rewards_fixture:short"]},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-3, "progress_bar": False, "resume": "never", "seed": 0},
        "eval": {"prompts": 0},
        "forgetting": {"retain_files": [str(_retain(tmp_path))]} | forgetting})


def _sft(tmp_path, name, train=None, **forgetting):
    return _sft_cfg(tmp_path, name, model={"path": "tiny-2l"}, train=train, **forgetting)


def _check_figures(run_dir) -> None:
    """Every step logs the three figures; at step 1 the policy is the teacher (KL ~0), by the last
    step it has moved away from it."""
    steps = _steps(run_dir)
    assert steps and all(all(k in line for k in RETAIN_FIGURES) for line in steps), steps[0].keys()
    assert all(line["agem_projected"] in (0.0, 1.0) for line in steps)
    assert all(math.isfinite(line["retain_lm_loss"]) and line["retain_lm_loss"] > 0 for line in steps)
    assert abs(steps[0]["distill_kl"]) < 1e-6
    assert steps[-1]["distill_kl"] > 1e-6


def _teacher_in_checkpoint(run_dir, prefix="") -> None:
    _, tensors = _stage_state(run_dir)
    logps, ids = tensors[f"{prefix}teacher.logps"], tensors[f"{prefix}teacher.ids"]
    assert logps.shape == ids.shape and logps.shape[1] == ALL_TERMS["distill_top_k"]
    assert int(tensors[f"{prefix}teacher.counts"].sum()) == logps.shape[0]
    assert bool((logps <= 0).all()) and bool((logps.exp().sum(-1) <= 1 + 1e-5).all())


def test_sft_resumed_with_every_retain_term_equals_an_uninterrupted_run_bitwise(tmp_path):
    straight = run_sft(_sft(tmp_path, "straight", train={"max_steps": 6, "save_every": 3}, **ALL_TERMS))
    run_sft(_sft(tmp_path, "cut", train={"max_steps": 3}, **ALL_TERMS))
    resumed = run_sft(_sft(tmp_path, "cut", train={"max_steps": 6, "resume": "auto"}, **ALL_TERMS))
    _same_weights(_final(straight), _final(resumed))
    assert _retain_figures(resumed) == _retain_figures(straight)
    _check_figures(straight)
    _teacher_in_checkpoint(resumed)


def test_sft_batch_8_by_1_equals_batch_2_by_4_with_the_retain_terms_once_per_step(tmp_path, monkeypatch):
    calls = []
    apply = RetainTerms.apply
    monkeypatch.setattr(RetainTerms, "apply", lambda self, params, scale, acc, step:
                        calls.append(step) or apply(self, params, scale, acc, step))
    runs = []
    for batch, accum in ((8, 1), (2, 4)):
        runs.append(run_sft(_sft(tmp_path, f"b{batch}", train={"max_steps": 3, "batch_size": batch, "grad_accum": accum},
                                 lm_coef=0.5, distill=1.0, distill_top_k=8, retain_batch_size=4)))
    assert calls == [0, 1, 2, 0, 1, 2]
    a, b = (_final(r) for r in runs)
    for name in a:  # Adam divides by √v: float32 rounding of a near-zero gradient moves its weight ~1e-5
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)
    fa, fb = (_steps(r) for r in runs)
    for la, lb in zip(fa, fb):
        assert lb["retain_lm_loss"] == pytest.approx(la["retain_lm_loss"], rel=1e-4)
        assert lb["distill_kl"] == pytest.approx(la["distill_kl"], rel=1e-2, abs=1e-7)


def test_sft_batch_8_by_1_equals_batch_2_by_4_with_the_default_retain_batch_size(tmp_path):
    runs = [run_sft(_sft(tmp_path, f"b{batch}", train={"max_steps": 3, "batch_size": batch, "grad_accum": accum},
                         lm_coef=0.5)) for batch, accum in ((8, 1), (2, 4))]
    a, b = (_final(r) for r in runs)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4)


def test_dpo_logs_the_retain_terms_from_a_kl_of_zero(tmp_path):
    from posttrain.train.preference import run_dpo

    run_dir = run_dpo(_dpo_cfg(tmp_path, **ALL_TERMS))
    _check_figures(run_dir)
    assert _steps(run_dir)[0]["agem_projected"] == 1.0  # DPO's first gradient conflicts with the retain rows'
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["retain_loss_before"] > 0 and "retain_loss_after" in summary


def test_grpo_resumed_mid_rollout_with_every_retain_term_equals_an_uninterrupted_run_bitwise(tmp_path):
    """GRPO's own checkpoint state (the rollout's remaining batches, μ = 2) composed with
    forgetting's (the start loss, the teacher, θ₀ for l2sp): cut at step 3, inside a rollout."""
    from posttrain.train.grpo import run_grpo

    terms = ALL_TERMS | {"l2sp": 0.1}
    straight = run_grpo(_grpo_cfg(tmp_path, "straight", train={"max_steps": 6, "save_every": 3}, **terms))
    run_grpo(_grpo_cfg(tmp_path, "cut", train={"max_steps": 3}, **terms))
    resumed = run_grpo(_grpo_cfg(tmp_path, "cut", train={"max_steps": 6, "resume": "auto"}, **terms))
    _same_weights(_final(straight), _final(resumed))
    assert _retain_figures(resumed) == _retain_figures(straight)
    assert [x["l2sp_penalty"] for x in _steps(resumed)] == [x["l2sp_penalty"] for x in _steps(straight)]
    _check_figures(straight)
    assert any(line["agem_projected"] for line in _steps(straight))  # the projection acted, and resumed alike
    plain, _ = _stage_state(resumed)
    assert "forgetting" in plain and "position" in plain  # both states in the one checkpoint
    _teacher_in_checkpoint(resumed, "forgetting.")


def test_ppo_anchors_the_policy_only_not_its_value_head(tmp_path, monkeypatch):
    from posttrain.train.ppo import run_ppo

    seen = {}
    begin = fg.ForgettingControl.begin

    def spy(self, module, accelerator):
        inner = accelerator.unwrap_model(module)
        seen.update(control=self, policy=[p for p in inner.model.parameters() if p.requires_grad],
                    head={id(p): p.detach().clone() for p in inner.value_head.parameters()},
                    head_params=list(inner.value_head.parameters()))
        return begin(self, module, accelerator)

    monkeypatch.setattr(fg.ForgettingControl, "begin", spy)
    run_dir = run_ppo(_ppo_cfg(tmp_path, l2sp=1.0, lm_coef=0.5, project=True))
    control = seen["control"]
    assert [id(p) for p in control.params] == [id(p) for p in seen["policy"]]
    assert not {id(p) for p in seen["head_params"]} & {id(p) for p in control.params}
    plain, _ = _stage_state(run_dir)
    assert plain["forgetting"]["anchors"] == len(seen["policy"])
    assert any(not torch.equal(p, seen["head"][id(p)]) for p in seen["head_params"])  # the value head trains
    steps = _steps(run_dir)
    assert all("retain_lm_loss" in x and "l2sp_penalty" in x for x in steps) and steps[-1]["l2sp_penalty"] > 0


def test_a_grad_scalers_loss_scale_changes_no_update_with_the_retain_terms(tmp_path, monkeypatch):
    """The data gradient arrives ×scale (fp16's GradScaler, here torch's CPU one on float32); the
    LM and KL gradients must too, and A-GEM's projection does not depend on it: a power-of-two
    scale leaves the weights bitwise those of the run without a scaler."""
    from posttrain.train import runs

    train = {"max_steps": 3, "lr": 1e-2, "max_grad_norm": 0.0}
    reference = _final(run_sft(_sft(tmp_path, "plain", train=train, **ALL_TERMS)))
    make = runs.make_accelerator

    def with_scaler(cfg, run_dir):
        accelerator = make(cfg, run_dir)
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
        return accelerator

    monkeypatch.setattr(runs, "make_accelerator", with_scaler)
    scaled = run_sft(_sft(tmp_path, "scaled", train=train, **ALL_TERMS))
    _same_weights(_final(scaled), reference)


def test_bf16_autocast_with_the_retain_terms_on_cpu(tmp_path):
    fp32 = run_sft(_sft(tmp_path, "fp32", train={"max_steps": 3}, **ALL_TERMS))
    bf16 = run_sft(_sft(tmp_path, "bf16", train={"max_steps": 3, "mixed_precision": "bf16"}, **ALL_TERMS))
    a, b = _steps(fp32)[0], _steps(bf16)[0]
    assert b["retain_lm_loss"] == pytest.approx(a["retain_lm_loss"], abs=2e-3)  # the same rows and weights
    assert b["retain_lm_loss"] != a["retain_lm_loss"]  # bf16 really in play
    assert abs(b["distill_kl"]) < 1e-6  # teacher and student alike under autocast
    assert all(math.isfinite(x[k]) for x in _steps(bf16) for k in RETAIN_FIGURES)


def test_gradient_checkpointing_gives_the_retain_terms_the_same_gradients(tmp_path):
    """The retain terms take ∂/∂θ with torch.autograd.grad, through the model's (non-reentrant)
    activation checkpointing when it is on: the same run, to float rounding."""
    plain = run_sft(_sft(tmp_path, "plain", train={"max_steps": 3}, **ALL_TERMS))
    cfg = _sft(tmp_path, "checkpointed", train={"max_steps": 3}, **ALL_TERMS)
    cfg.model.gradient_checkpointing = True
    checkpointed = run_sft(cfg)
    a, b = _final(plain), _final(checkpointed)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    for la, lb in zip(_steps(plain), _steps(checkpointed)):
        assert lb["distill_kl"] == pytest.approx(la["distill_kl"], rel=1e-3, abs=1e-9)


def test_lora_with_the_retain_terms_acts_on_the_adapter_alone(tmp_path, monkeypatch):
    """With LoRA only the adapter has gradients: the retain terms see and change those alone
    (the frozen base has none, and keeps none), and at step 0 the teacher is the adapted model."""
    seen = []
    apply = RetainTerms.apply

    def spy(self, params, scale, accelerator, step):
        names = {id(p): n for n, p in self.policy.named_parameters()}
        figures = apply(self, params, scale, accelerator, step)
        seen.append(({names[id(p)] for p in params if p.grad is not None},
                     {n for n, p in self.policy.named_parameters() if p.grad is not None}))
        return figures

    monkeypatch.setattr(RetainTerms, "apply", spy)
    run_dir = run_sft(_sft_cfg(tmp_path, "lora", model={"path": "tiny-2l"}, adapter={"method": ["lora"]},
                               train={"max_steps": 3, "lr": 3e-2}, **ALL_TERMS))
    _check_figures(run_dir)
    assert len(seen) == 3
    for live, with_grad in seen:
        assert live and live == with_grad and all("lora_" in n for n in live)
    adapter = _final(run_dir, "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())


# --------------------------------------------------------------------------- bad retain rows in dpo


def test_dpo_skips_a_bad_retain_row_into_its_rejects_file_or_names_it(tmp_path):
    from posttrain.errors import DataError
    from posttrain.train.preference import run_dpo

    lines = [json.dumps(r) for r in _rows(24)]
    lines[4] = '{"instruction": "Copy: a b"'  # truncated JSON on line 5
    _write(tmp_path / "retain.jsonl", lines)
    with pytest.raises(DataError, match=r"retain\.jsonl:5"):
        run_dpo(_dpo_cfg(tmp_path, "error", lm_coef=0.5))
    run_dir = run_dpo(_dpo_cfg(tmp_path, data={"bad_rows": "skip", "max_bad_fraction": 0.1}, lm_coef=0.5))
    rejects = (run_dir / "rejects-retain.jsonl").read_text().splitlines()
    assert len(rejects) == 1 and "retain.jsonl:5" in rejects[0]
    assert all("retain_lm_loss" in x for x in _steps(run_dir))


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("make, validate", [(_dpo_cfg, validate_dpo), (_grpo_cfg, validate_grpo),
                                            (_ppo_cfg, validate_ppo)], ids=["dpo", "grpo", "ppo"])
def test_replay_ratio_outside_sft_is_refused_pointing_at_lm_coef(tmp_path, make, validate):
    with pytest.raises(ConfigError, match=r"replay_ratio.*forgetting\.lm_coef"):
        validate(make(tmp_path, replay_ratio=0.2))
    validate(make(tmp_path, lm_coef=0.2))  # what it points to is accepted


@pytest.mark.parametrize("setting", [{"lm_coef": 0.5}, {"distill": 1.0}, {"project": True}])
@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_retain_terms_without_retain_files_are_refused(tmp_path, setting, stage):
    cfg = _sft(tmp_path, "x", **setting) if stage == "sft" else _dpo_cfg(tmp_path, **setting)
    cfg.forgetting.retain_files = []
    with pytest.raises(ConfigError, match=f"forgetting.{next(iter(setting))} needs forgetting.retain_files"):
        (validate_sft if stage == "sft" else validate_dpo)(cfg)


@pytest.mark.parametrize("setting, message", [
    ({"lm_coef": -0.1}, "must be >= 0"), ({"distill": -1.0}, "must be >= 0"),
    ({"retain_batch_size": -1}, "must be >= 0"), ({"unfreeze_every": -2}, "must be >= 0"),
    ({"distill_top_k": 0}, "distill_top_k must be at least 1"),
])
@pytest.mark.parametrize("stage", ["sft", "grpo"])
def test_negative_settings_are_refused(tmp_path, setting, message, stage):
    cfg = _sft(tmp_path, "x", **setting) if stage == "sft" else _grpo_cfg(tmp_path, **setting)
    with pytest.raises(ConfigError, match=message):
        (validate_sft if stage == "sft" else validate_grpo)(cfg)


def test_l2sp_without_retain_files_is_refused_or_applied(tmp_path):
    cfg = _sft(tmp_path, "x", l2sp=5.0)
    cfg.forgetting.retain_files = []
    try:
        validate_sft(cfg)
    except ConfigError as error:
        assert "l2sp" in str(error)
        return
    assert all("l2sp_penalty" in x for x in _steps(run_sft(cfg)))


# --------------------------------------------------------------------------- gradual unfreezing


def test_unfreeze_every_alone_in_dpo_needs_no_retain_files(tmp_path):
    """tiny-2l's groups from the top: the final norm (the tied head joins with the embeddings),
    layer 1, layer 0, the embeddings; every 2 steps, 3 steps: the norm, then layer 1 too."""
    from safetensors.torch import load_file

    from posttrain.models.presets import preset_path
    from posttrain.train.preference import run_dpo

    cfg = _dpo_cfg(tmp_path, retain=False, unfreeze_every=2)
    validate_dpo(cfg)
    run_dir = run_dpo(cfg)
    start, end = load_file(str(preset_path("tiny-2l") / "model.safetensors")), _final(run_dir)
    moved = {name for name in start if not torch.equal(start[name], end[name])}
    assert "model.norm.weight" in moved and any(n.startswith("model.layers.1.") for n in moved)
    assert not any(n.startswith(("model.layers.0.", "model.embed_tokens")) for n in moved), moved
    assert not (run_dir / "rejects-retain.jsonl").exists()
    assert "retain_loss_before" not in json.loads((run_dir / "summary.json").read_text())


def test_attach_unions_the_stages_inactive_parameters_with_gradual_unfreezings():
    from types import SimpleNamespace

    from posttrain.models.loading import load_model

    model = load_model(ModelConfig(path="tiny-2l"))
    control = fg.ForgettingControl(ForgettingConfig(unfreeze_every=1), None, model, pad_id=3, batch_size=4, seed=0,
                                   log=lambda message: None)
    params = dict(model.named_parameters())
    own = [params["model.norm.weight"], params["model.layers.1.mlp.up_proj.weight"]]
    stage = SimpleNamespace(inactive_parameters=lambda step: own if step < 2 else [])
    attach_gradual = control.unfreezing.inactive_parameters
    fg.attach(stage, control)
    for step in range(4):
        got = [id(p) for p in stage.inactive_parameters(step)]
        gradual = [id(p) for p in attach_gradual(step)]
        mine = [id(p) for p in (own if step < 2 else [])]
        assert len(got) == len(set(got)) and set(got) == set(gradual) | set(mine), step
        assert got[: len(mine)] == mine
    assert not stage.inactive_parameters(3)  # everything trains from step 3 (4 groups)
    bare = SimpleNamespace()
    fg.attach(bare, control)
    assert [id(p) for p in bare.inactive_parameters(1)] == [id(p) for p in attach_gradual(1)]
    assert not hasattr(bare, "regularize") and not hasattr(bare, "state_dict")  # nothing measured, nothing kept


def test_unfreeze_every_with_an_adapters_staged_schedule_trains_only_what_both_allow(tmp_path, monkeypatch):
    """LoRA on tiny-2l's two layers + a prompt (at the head's depth), adapter.schedule keeping the
    prompt inactive, unfreeze_every=1 from the top (the prompt, then layer 1, then layer 0): after
    2 steps only layer 1's LoRA has moved: not the prompt (the schedule), not layer 0 (gradual)."""
    from posttrain.train import unfreezing

    seen = {}
    init = unfreezing.GradualUnfreezing.__init__

    def spy(self, model, every, log=print):
        seen.update(model=model, start={n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
        init(self, model, every, log)

    monkeypatch.setattr(unfreezing.GradualUnfreezing, "__init__", spy)
    cfg = _sft_cfg(tmp_path, "adapters", model={"path": "tiny-2l"}, adapter={"method": ["lora", "prompt"],
                   "schedule": ["0:lora", "100:all"]}, train={"max_steps": 2, "lr": 3e-2}, unfreeze_every=1)
    cfg.forgetting.retain_files = []
    run_sft(cfg)
    now = dict(seen["model"].named_parameters())
    moved = {n for n, before in seen["start"].items() if not torch.equal(now[n], before)}
    assert moved and all("lora_" in n and ".layers.1." in n for n in moved), moved
    assert any(".layers.0." in n for n in seen["start"]) and any("lora_" not in n for n in seen["start"])


def test_retain_exact_match_gets_a_budget_that_fits_the_longest_retain_answer(monkeypatch):
    """An RL stage passes its own task's budget (rollout.max_new_tokens, 4 say): a longer retain
    answer cut short would count as forgotten. The budget is the larger of it and the longest
    held-out retain answer + 1."""
    from types import SimpleNamespace

    from posttrain.train import forgetting, sft

    seen = {}
    monkeypatch.setattr(sft, "exact_match_report", lambda *args, **kw: seen.update(budget=args[5]) or {})
    held = [SimpleNamespace(num_label_tokens=n) for n in (3, 9, 5)]
    control = SimpleNamespace(retain=SimpleNamespace(held_out=held, held_out_records=[]))
    cfg = SimpleNamespace(forgetting=SimpleNamespace(retain_exact_match=4),
                          data=SimpleNamespace(template="chatml", max_prompt_length=8, bad_rows="error",
                                               max_bad_fraction=0.0),
                          rollout=SimpleNamespace(max_new_tokens=4))
    monkeypatch.setattr(forgetting, "retain_data_config", lambda c: SimpleNamespace(template="chatml"))
    forgetting.retain_exact_match(cfg, None, None, control, "before", 4)
    assert seen["budget"] == 10
    forgetting.retain_exact_match(cfg, None, None, control, "before", 32)
    assert seen["budget"] == 32
