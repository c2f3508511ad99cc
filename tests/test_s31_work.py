"""Stop 31, work left out (tests/test_walkthrough_work.py): the same figures as before, for fewer passes.

- `RetainTerms.apply` with project and lm_coef but no distill takes the retain batch's gradient
  once and adds lm_coef × A-GEM's reference: the update is the two-backward one's (bitwise with a
  power-of-two lm_coef, to float rounding otherwise).
- A live reference's log-probs of the held-out set are computed once, before training; every
  evaluation's figures are the live pass's.
- DPO's evaluation before training reads the policy's held-out log-probs from the reference's
  (π = π_ref there): the figures of every loss are exactly the forwards'.
- The reference cache's fingerprint holds what draws a prompt / prefix tuned starting policy.
"""

from __future__ import annotations

import collections
import copy
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from posttrain import cli
from posttrain.config import DPOConfig, ForgettingConfig, ModelConfig
from posttrain.losses.regularization import agem_project
from posttrain.train import preference
from posttrain.train import retain_terms as rt
from tests.test_retain_terms import _Accelerator, _pool

ROOT = Path(__file__).resolve().parents[1]
DPO = ["examples/dpo.yaml", "data.synthetic_size=200", "train.batch_size=4", "eval.exact_match_prompts=0",
       "train.progress_bar=false", "train.resume=never"]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


# --------------------------------------------------------------------------- RetainTerms: one backward


@pytest.fixture(scope="module")
def tiny32():
    from posttrain.models.loading import load_model

    torch.manual_seed(0)
    return load_model(ModelConfig(path="tiny-2l"))


def _two_backward_apply(terms, params, grad_scale, accelerator, step):
    """`RetainTerms.apply` as it was: ∇ of the NLL kept for A-GEM's reference (retain_graph), then ∇
    of γ·NLL + λ·KL taken again for the added gradient."""
    live = [p for p in params if p.grad is not None]
    indices = terms.batch_at(step)
    total = sum(terms.pool[i].num_label_tokens for i in indices)
    added = [torch.zeros_like(p, dtype=torch.float32) for p in live]
    reference = [torch.zeros_like(p, dtype=torch.float32) for p in live]
    for start in range(0, len(indices), terms.micro_batch_size):
        nll, kl = terms._losses(indices[start : start + terms.micro_batch_size], accelerator.device, accelerator)
        rt._accumulate(reference, nll / total, live, keep=True)
        rt._accumulate(added, (terms.cfg.lm_coef * nll + terms.cfg.distill * kl) / total, live)
    projected = float(agem_project([p.grad for p in live], reference) < 0)
    for p, g in zip(live, added):
        p.grad.add_(g.to(p.grad.dtype), alpha=grad_scale)
    return projected


@pytest.mark.parametrize("lm_coef", [0.5, 0.7])
@pytest.mark.parametrize("conflict", [True, False])
def test_project_with_lm_coef_takes_one_backward_for_the_two_backward_update(tiny32, monkeypatch, lm_coef, conflict):
    model = copy.deepcopy(tiny32)
    params = [p for p in model.parameters() if p.requires_grad]
    terms = rt.RetainTerms(ForgettingConfig(retain_files=["retain.jsonl"], lm_coef=lm_coef, project=True,
                                            retain_batch_size=6), _pool(n=12, seed=2), model, pad_id=3,
                           batch_size=2, seed=11, chunk_size=4)  # 3 micro-batches of retain rows
    step, scale = 3, 2.5
    reference = [torch.zeros_like(p) for p in params]
    rt._accumulate(reference, terms._losses(terms.batch_at(step), "cpu", _Accelerator())[0], params)
    gen = torch.Generator().manual_seed(5)
    for p, r in zip(params, reference):  # against the retain gradient, or along it
        p.grad = (-1.0 if conflict else 1.0) * r + 0.3 * r.abs().mean() * torch.randn(p.shape, generator=gen)
    start = [p.grad.clone() for p in params]
    projected = _two_backward_apply(terms, params, scale, _Accelerator(), step)
    want = [p.grad.clone() for p in params]
    for p, g in zip(params, start):
        p.grad = g.clone()
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(k.get("retain_graph")) or real(*a, **k))

    figures = terms.apply(params, scale, _Accelerator(), step)

    assert calls == [False] * 3  # one backward per micro-batch, no graph kept
    assert figures["agem_projected"] == projected == float(conflict)
    for p, w in zip(params, want):
        if lm_coef == 0.5:  # a power of two: γ·∇ and ∇(γ·) round alike
            assert torch.equal(p.grad, w)
        else:
            torch.testing.assert_close(p.grad, w, rtol=1e-6, atol=1e-6 * float(w.abs().max()))


def test_project_with_distill_still_takes_the_reference_apart(tiny32, monkeypatch):
    """With λ > 0 the added gradient is no multiple of the reference: two backwards, the first
    keeping the graph."""
    model = copy.deepcopy(tiny32)
    terms = rt.RetainTerms(ForgettingConfig(retain_files=["retain.jsonl"], lm_coef=0.5, distill=1.0, project=True,
                                            distill_top_k=4, retain_batch_size=4), _pool(), model, pad_id=3,
                           batch_size=4, seed=11, chunk_size=4)
    terms.compute_teacher(_Accelerator())
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    calls = []
    real = torch.autograd.grad
    monkeypatch.setattr(torch.autograd, "grad", lambda *a, **k: calls.append(k.get("retain_graph")) or real(*a, **k))
    terms.apply(params, 1.0, _Accelerator(), 0)
    assert calls == [True, False]


# --------------------------------------------------------------------------- DPO's held-out reference


def _run(tmp_path, *extra) -> dict:
    assert cli.main(["dpo", *DPO, f"output_dir={tmp_path}", *[str(e) for e in extra]]) == 0
    return json.loads((tmp_path / "summary.json").read_text())


def _figures(run_dir: Path) -> list[dict]:
    """Every row of metrics.jsonl less its timings and memory."""
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [{k: v for k, v in row.items() if not k.endswith(("_s", "_mb"))} for row in rows]


@pytest.fixture
def nograd_forwards(monkeypatch):
    """How many forwards of the tiny preset's trunk ran without gradient."""
    from transformers.models.llama import modeling_llama

    seen = collections.Counter()
    real = modeling_llama.LlamaModel.forward

    @functools.wraps(real)  # the callers inspect its signature
    def counted(self, *args, **kwargs):
        seen["nograd" if not torch.is_grad_enabled() else "grad"] += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", counted)
    return seen


LOSSES = {
    "dpo": [],
    "dpo-rpo": ["dpo.nll_weight=0.5"],  # token counts enter the figures (the chosen answers' mean NLL)
    "dpo-rpo-plain-rows": ["dpo.nll_weight=0.5", "dpo.share_prompt=false"],
    "cdpo": ["dpo.loss=cdpo"],
    "ipo": ["dpo.loss=ipo"],
    "hinge": ["dpo.loss=hinge"],
    "kto": ["dpo.loss=kto"],
    "dpo-lora-live": ["adapter.method=lora", "dpo.reference=live"],
    "kto-full-live": ["dpo.loss=kto", "dpo.reference=live"],
}


@pytest.mark.parametrize("extra", LOSSES.values(), ids=LOSSES.keys())
def test_evaluation_before_training_is_the_forwards_figures_without_them(tmp_path, monkeypatch, nograd_forwards, extra):
    """The held-out loss and every figure of the evaluation before training, read from the
    precomputed reference, equal bitwise those of the policy's forwards (the old path); no forward
    runs for them."""
    from posttrain.train import loop

    outputs = []
    real = loop.evaluate

    def both(module, stage, accelerator, batches=None):
        if outputs:  # after training: as it is
            return real(module, stage, accelerator, batches)
        before = nograd_forwards["nograd"]
        read = real(module, stage, accelerator)
        outputs.append(nograd_forwards["nograd"] - before)
        module._policy_is_reference = False  # the forwards, within run_dpo's policy_is_reference
        before = nograd_forwards["nograd"]
        outputs.append(real(module, stage, accelerator))
        outputs.append(nograd_forwards["nograd"] - before)
        module._policy_is_reference = True
        return read

    monkeypatch.setattr(loop, "evaluate", both)
    summary = _run(tmp_path / "run", "train.max_steps=1", *extra)
    read, forwards, computed, computed_forwards = summary["eval_before"], *outputs
    assert forwards == 0 and computed_forwards >= 3  # 3 held-out batches
    assert read == computed[1]  # every figure, exactly
    loss, metrics = computed
    if "kto" not in str(extra):
        assert metrics["rewards/accuracy"] == 0.5 and metrics["rewards/margins"] == 0.0
        if not any("loss=" in e or "nll_weight" in e for e in extra):
            assert loss == float(torch.tensor(math.log(2)))  # log 2 in float32
    else:
        assert metrics["kl"] == 0.0 and metrics["rewards/signed"] == 0.0


def test_reference_free_losses_still_evaluate_with_forwards(tmp_path, nograd_forwards):
    """simpo has no reference log-probs to read: its evaluation before training runs its forwards
    (3 held-out batches before, 3 after; no reference pass)."""
    summary = _run(tmp_path / "run", "train.max_steps=1", "dpo.loss=simpo", "dpo.beta=2.0")
    assert nograd_forwards["nograd"] == 6
    assert summary["eval_before"]["rewards/margins"] != 0.0


def test_live_reference_of_the_held_out_set_gives_the_live_passes_figures(tmp_path, monkeypatch, nograd_forwards):
    """dpo.reference=live with LoRA, an evaluation every step: the held-out reference computed once
    before training (3 batches) rather than at each of the 3 evaluations; the losses trained and
    every figure evaluated are those of live reference passes (adapters off) to float rounding.
    Forwards without gradient: 3 (held-out reference) + 2 (a live reference each step) + 2 × 3
    (the held-out policy after each step; none before) = 11, where there were 2 + 3 × 6 = 20."""
    args = ["train.max_steps=2", "train.eval_every=1", "adapter.method=lora", "dpo.reference=live"]
    once = _run(tmp_path / "once", *args)
    assert nograd_forwards["nograd"] == 11
    monkeypatch.setattr(preference, "precompute_reference", lambda *a, **k: None)  # as before: every pass live
    nograd_forwards.clear()
    live = _run(tmp_path / "live", *args)
    assert nograd_forwards["nograd"] == 20
    for a, b in zip(_figures(tmp_path / "once"), _figures(tmp_path / "live"), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key
    for when in ("eval_before", "eval_after"):
        assert once[when].keys() == live[when].keys()
        for key, value in once[when].items():
            assert value == pytest.approx(live[when][key], rel=1e-5, abs=1e-6), (when, key)


def test_a_live_reference_without_a_held_out_set_computes_nothing_before_training(tmp_path, nograd_forwards):
    _run(tmp_path / "run", "train.max_steps=1", "adapter.method=lora", "dpo.reference=live",
         "data.eval_fraction=0")
    assert nograd_forwards["nograd"] == 1  # the step's live reference alone


# --------------------------------------------------------------------------- the cache's fingerprint


@pytest.mark.parametrize("method,differs", [
    (["adapter.method=prompt"], True),
    (["adapter.method=prefix"], True),
    (["adapter.method=[lora,prompt]"], True),
    (["adapter.method=lora"], False),  # starts as the base whatever the seed
    (["adapter.method=full"], False),
])
def test_the_reference_fingerprint_holds_the_draw_of_the_starting_virtual_tokens(tmp_path, method, differs):
    def fingerprint(*extra):
        cfg = DPOConfig.load(None, [f"output_dir={tmp_path}", *method, *extra])
        return preference._fingerprint(cfg, [])

    plain = fingerprint()
    assert (fingerprint("train.seed=7") != plain) == differs
    assert (fingerprint("adapter.virtual_tokens.num_virtual_tokens=3") != plain) == differs
    assert fingerprint() == plain


def test_token_counts_are_batch_logps_counts_for_either_layout(tmp_path):
    """`token_counts` (no forward) against `batch_logps`' counts, shared-prompt and plain rows,
    left padding included."""
    from posttrain.models.loading import load_model, load_tokenizer, resolve_model_path
    from posttrain.train.grouped import collate_items, collate_shared_prompt
    from tests.test_reference_adapters import PAIRS, _items

    tokenizer = load_tokenizer(str(resolve_model_path("tiny")))
    model = load_model(ModelConfig(path="tiny")).eval()
    items = _items(tokenizer, PAIRS + [("Copy: c", ("c", "c c"), (1, 0))])
    batches = [collate_items(items, tokenizer.pad_token_id), collate_shared_prompt(items, tokenizer.pad_token_id)]
    left = collate_items(items, tokenizer.pad_token_id)  # left-padded, its shortest row labelled from its start
    width = left["attention_mask"].sum(1)
    for name in ("input_ids", "labels", "attention_mask"):
        left[name] = torch.stack([row.roll(int(row.shape[0] - w)) for row, w in zip(left[name], width)])
    short = int(width.argmin())
    first = int(left["attention_mask"][short].argmax())
    left["labels"][short, first] = left["input_ids"][short, first]  # after padding: no position predicts it
    assert first > 0
    for batch in batches + [left]:
        with torch.no_grad():
            _, counts = preference.batch_logps(model, batch)
        assert torch.equal(preference.token_counts(batch), counts)
