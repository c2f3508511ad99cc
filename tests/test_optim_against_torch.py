"""posttrain.train.optim against torch.optim.AdamW / clip_grad_norm_, written as a review.

Each test runs our code and torch's on identical copies and compares bit for bit where optim.py
claims bit-for-bit equality. Tests marked BUG describe defects the review found; each failed on
the code before its fix and guards it since.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.errors import ConfigError
from posttrain.train.checkpoint import _join_optimizer_state, _split_optimizer_state, load_optimizer_state
from posttrain.train.optim import (
    AdamW, clip_grad_norm, lr_factor, make_optimizer, param_groups, set_lr, sparse_embedding_gradients)

V, H = 48, 5  # an odd width: rows do not line up with vector lanes


class Net(torch.nn.Module):
    """model.embed_tokens / model.layers.{0,1} / model.norm / lm_head: the names param_groups reads."""

    def __init__(self, vocab: int = V, width: int = H):
        super().__init__()
        torch.manual_seed(0)
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(vocab, width)
        self.model.layers = torch.nn.ModuleList([torch.nn.Linear(width, width) for _ in range(2)])
        self.model.norm = torch.nn.LayerNorm(width)
        self.lm_head = torch.nn.Linear(width, 3, bias=False)

    def forward(self, ids):
        x = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            x = torch.tanh(layer(x))
        return self.lm_head(self.model.norm(x)).pow(2).sum()

    @property
    def emb(self) -> torch.nn.Parameter:
        return self.model.embed_tokens.weight


def _pair(wd=0.1, layer_lr_decay=0.5, **kwargs):
    """(ours, torch) over param_groups with layer-wise decay: each group its own lr."""
    a, b = Net(), Net()
    opt_a = AdamW(param_groups(a, 1e-2, wd, layer_lr_decay), row_sparse=[a.emb], **kwargs)
    opt_b = torch.optim.AdamW(param_groups(b, 1e-2, wd, layer_lr_decay), **kwargs)
    return a, opt_a, b, opt_b


def _step(model, opt, ids, sparse_ref: bool, clip: float | None = None, set_to_none: bool = True):
    """One step. ids None: the embedding is not used (its grad stays None)."""
    if ids is None:
        model.lm_head(model.model.norm(torch.ones(2, model.emb.shape[1]))).pow(2).sum().backward()
    else:
        model(ids).backward()
    if clip is not None:
        clip_grad_norm([p for p in model.parameters()], clip)
    if sparse_ref and model.emb.grad is not None and model.emb.grad.is_sparse:
        model.emb.grad = model.emb.grad.coalesce().to_dense()  # torch's AdamW takes dense only
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)


def _assert_equal(a: torch.nn.Module, b: torch.nn.Module):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name


# --------------------------------------------------------------------------------------- bugs


def test_amsgrad_is_refused_or_equals_torch():
    """BUG: amsgrad=True is accepted, but the reached-rows update hard-codes amsgrad=False (so the
    embedding drifts from torch's AdamW) and creates no max_exp_avg_sq, so torch's step raises
    KeyError once the matrix is handed back past half the rows."""
    try:
        a, opt_a, b, opt_b = _pair(amsgrad=True)
    except (ConfigError, ValueError, NotImplementedError, TypeError) as refused:  # a clear refusal is fine
        assert "amsgrad" in str(refused)
        return
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 6 + 4 * s, (3, 4), generator=g) for s in range(4)]
    batches += [torch.arange(0, 30).view(5, 6), torch.arange(10, 40).view(5, 6)]  # > half: handed back
    for ids in batches:
        _step(a, opt_a, ids, False)
        _step(b, opt_b, ids, False)
        _assert_equal(a, b)


def test_grad_scaler_inf_step_after_unscale_leaves_the_embedding_alone():
    """BUG: with a GradScaler and fused=True, scaler.unscale_(opt) (needed to clip) makes the
    scaler set grad_scale=None and found_inf=1 on an overflow. AdamW.step then takes the
    reached-rows path, which never reads found_inf: torch's fused step skips every parameter,
    but the embedding rows are still updated."""
    a, opt_a, b, opt_b = _pair(fused=True)
    for model, opt in ((a, opt_a), (b, opt_b)):
        scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
        for s in range(3):
            scaler.scale(model(torch.arange(4 * s, 4 * s + 8).view(2, 4))).backward()
            if s == 1:
                model.lm_head.weight.grad[0, 0] = float("inf")  # an overflow: the step must be skipped
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1e9)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad()
    _assert_equal(a, b)


def test_step_hooks_run_once_per_step():
    """BUG: AdamW.step calls super().step(); once any plain torch.optim.AdamW has been built in the
    process, torch.optim.AdamW.step is itself wrapped by Optimizer's hook/profiler wrapper, so every
    step pre/post hook registered on our optimizer (an EMA update, say) runs twice per step."""
    torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))])  # what every process with a reference does
    model = Net()
    opt = AdamW(model.parameters(), row_sparse=[model.emb], lr=1e-2)
    pre, post = [], []
    opt.register_step_pre_hook(lambda *args: pre.append(1))
    opt.register_step_post_hook(lambda *args: post.append(1))
    model(torch.tensor([[1, 2]])).backward()
    opt.step()
    assert (len(pre), len(post)) == (1, 1)


def test_loop_fp16_skipped_step_keeps_the_grad_scaler_usable(tmp_path):
    """BUG (loop, GradScaler path): a non-finite step skips optimizer.step(), so accelerate's
    scaler.step/update never run: the scale is not lowered, and the next step's clipping calls
    scaler.unscale_ again before an update(), which raises RuntimeError. With fp16 on a GPU an
    overflow at the initial scale is routine. CPU has no accelerate GradScaler, so one is attached
    by hand (the same object accelerate builds for fp16 on CUDA)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from test_loop import ToyStage, _cfg

    from posttrain.train.loop import train
    from posttrain.train.runs import make_accelerator

    # fp16 is refused on a CPU (accelerate would run float32): build without it, then attach the scaler
    accelerator = make_accelerator(_cfg(max_steps=3, warmup_steps=0, optimizer="adamw_fused"), tmp_path)
    cfg = _cfg(max_steps=3, warmup_steps=0, mixed_precision="fp16", optimizer="adamw_fused")
    accelerator.scaler, accelerator.native_amp = torch.amp.GradScaler("cpu"), True
    stage = ToyStage(8)
    stage.module.nan_at_calls = {1}  # step 1 overflows
    result = train(stage, cfg, tmp_path, accelerator)
    assert result.step == 3 and result.skipped_steps == 1


def test_resumed_lr_follows_the_config_the_loop_logs():
    """BUG (minor): the loop logs lr = cfg.lr * factor and applies base_lr * factor, but base_lr
    comes back from the checkpoint's param_groups: a run resumed with a changed train.lr keeps
    training at the old rate while its metrics report the new one."""
    old = make_optimizer(Net(), TrainConfig(lr=0.1))
    model = Net()
    new = make_optimizer(model, TrainConfig(lr=0.01))
    model(torch.tensor([[1, 2]])).backward()
    load_optimizer_state(new, old.state_dict())
    set_lr(new, 0.5)
    assert {g["lr"] for g in new.param_groups} == {0.01 * 0.5}


# ------------------------------------------------------------------------ coverage (passing)


@pytest.mark.parametrize("kwargs", [{}, {"fused": True}, {"foreach": True}, {"maximize": True},
                                    {"maximize": True, "fused": True}],
                         ids=["loop", "fused", "foreach", "maximize", "maximize_fused"])
def test_schedule_per_group_lr_and_idle_steps_equal_torch(kwargs):
    """lr changed every step (set_lr over layer-decayed groups), rows reached once and never
    again (momentum keeps moving them), steps without an embedding gradient, zero_grad to zeros,
    30 steps of decay on never-reached rows, odd width."""
    a, opt_a, b, opt_b = _pair(**kwargs)
    start = a.emb.detach().clone()
    for s in range(30):
        ids = torch.arange(2 * s, 2 * s + 4).view(1, 4) % 20 if s < 8 else (None if s % 3 else torch.tensor([[1, 1]]))
        for model, opt in ((a, opt_a), (b, opt_b)):
            set_lr(opt, lr_factor(s, 30, "cosine", 3, 0.1))
            _step(model, opt, ids, False, set_to_none=s % 2 == 0)
    _assert_equal(a, b)
    assert opt_a._row_sparse == [a.emb]  # the row path ran throughout (20 of 48 rows reached)
    assert not torch.equal(a.emb[2:4], start[2:4]) and not torch.equal(a.emb[40], start[40])


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
def test_sparse_accumulation_with_duplicates_equals_torch_on_the_same_gradient(fused):
    """Sparse + sparse accumulation over micro-batches, duplicate ids inside and across them
    (an uncoalesced sum), clipped (active), then stepped; torch gets the same gradient dense."""
    a, opt_a, b, opt_b = _pair(fused=fused)
    g = torch.Generator().manual_seed(2)
    with sparse_embedding_gradients(a), sparse_embedding_gradients(b):
        for s in range(6):
            micro = [torch.randint(0, 8 + 2 * s, (2, 5), generator=g) for _ in range(3)]
            micro[1][0, :3] = micro[0][0, 0]  # repeated ids
            for model in (a, b):
                for ids in micro:
                    model(ids).backward()
                assert model.emb.grad.is_sparse and not model.emb.grad.is_coalesced()
                norm = clip_grad_norm(list(model.parameters()), 0.05)
                assert norm > 0.05
                if model is b:
                    model.emb.grad = model.emb.grad.to_dense()
            opt_a.step(), opt_b.step()
            opt_a.zero_grad(), opt_b.zero_grad()
    assert opt_a._row_sparse == [a.emb]  # every step took the reached-rows path
    _assert_equal(a, b)


def test_sparse_plus_dense_gradient_on_a_shared_matrix_equals_torch():
    """Two nn.Embedding modules sharing one matrix: only one is switched to sparse, so the
    accumulated gradient is sparse + dense (dense). The row path must still equal torch."""

    class TwoLookups(Net):
        def __init__(self):
            super().__init__()
            self.second = torch.nn.Embedding(V, H)
            self.second.weight = self.model.embed_tokens.weight

        def forward(self, ids):
            return super().forward(ids) + self.second(ids + 3).sum()

    a, b = TwoLookups(), TwoLookups()
    opt_a = AdamW(a.parameters(), row_sparse=[a.emb], lr=1e-2, weight_decay=0.1)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2, weight_decay=0.1)
    with sparse_embedding_gradients(a) as switched:
        assert len(switched) == 1
        for s in range(4):
            ids = torch.arange(s, s + 6).view(2, 3)
            _step(a, opt_a, ids, False)
            _step(b, opt_b, ids, False)
    _assert_equal(a, b)


def _through_checkpoint(state: dict) -> dict:
    return _join_optimizer_state(*_split_optimizer_state(state))


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
@pytest.mark.parametrize("into", ["ours", "torch"])
@pytest.mark.parametrize("cut", [3, 6], ids=["row_sparse", "handed_back"])
def test_resume_from_our_state_dict_equals_an_uninterrupted_run(fused, into, cut):
    """Our optimizer's state saved mid-run (sparse gradients, through the checkpoint's
    split/join), loaded into a fresh AdamW of ours or torch's, continued: bitwise equal to the
    uninterrupted run. At cut 6 the matrix was handed back to torch's step before the save."""
    batches = [torch.arange(4 * s, 4 * s + 4).view(1, 4) % (V // 2 + 4 * (s // 5)) for s in range(5)]
    batches += [torch.arange(0, 32).view(4, 8)] + [torch.arange(s, s + 4).view(1, 4) for s in range(4)]

    def run(model, opt, part, sparse_ref):
        with sparse_embedding_gradients(model):
            for s in part:
                set_lr(opt, lr_factor(s, len(batches), "linear", 2, 0.0))
                _step(model, opt, batches[s], sparse_ref, clip=0.5)

    whole = Net()
    opt = AdamW(param_groups(whole, 1e-2, 0.1, 0.5), row_sparse=[whole.emb], fused=fused)
    run(whole, opt, range(len(batches)), False)

    first = Net()
    opt = AdamW(param_groups(first, 1e-2, 0.1, 0.5), row_sparse=[first.emb], fused=fused)
    run(first, opt, range(cut), False)
    assert opt._row_sparse == ([first.emb] if cut == 3 else [])
    saved = _through_checkpoint(opt.state_dict())
    resumed = Net()
    resumed.load_state_dict(first.state_dict())
    groups = param_groups(resumed, 1e-2, 0.1, 0.5)
    again = (AdamW(groups, row_sparse=[resumed.emb], fused=fused) if into == "ours"
             else torch.optim.AdamW(groups, fused=fused))
    again.load_state_dict(saved)
    run(resumed, again, range(cut, len(batches)), into == "torch")
    _assert_equal(whole, resumed)


def _clip_pair(grads):
    ours, theirs = [], []
    for grad in grads:
        shape = grad.shape if grad is not None else (2,)
        p = torch.nn.Parameter(torch.zeros(shape, dtype=grad.dtype if grad is not None else torch.float32))
        q = torch.nn.Parameter(p.detach().clone())
        if grad is not None:
            p.grad, q.grad = grad.clone(), grad.clone()
        ours.append(p)
        theirs.append(q)
    return ours, theirs


def _randn(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))


@pytest.mark.parametrize("grads,max_norm", [
    ([_randn(3, 4), _randn(5)], 0.5),                      # clipping active
    ([_randn(3, 4), _randn(5)], 100.0),                    # inactive
    ([_randn(3, 4), _randn(5)], math.inf),                 # the loop's max_grad_norm = 0
    ([torch.zeros(3, 4), torch.zeros(5)], 1.0),            # zero gradients
    ([None, _randn(5)], 0.5),                              # grad None skipped
    ([None, None], 0.5),                                   # nothing to clip
    ([torch.tensor([1.0, math.inf]), _randn(5)], 1.0),     # inf: every gradient scaled by 0 (inf -> nan)
    ([torch.tensor([1.0, math.nan]), _randn(5)], 1.0),     # nan: nan everywhere
    ([torch.tensor([1.0, math.inf]), _randn(5)], math.inf),  # inf / inf: nan scale
    ([_randn(3, 4).bfloat16(), _randn(5)], 0.5),           # mixed dtypes
    ([_randn(3, 4).double(), _randn(5).double()], 0.5),
], ids=["active", "inactive", "no_max", "zero", "none", "all_none", "inf", "nan", "inf_no_max", "bf16_mix", "f64"])
def test_clip_grad_norm_equals_torch_bitwise_on_dense_gradients(grads, max_norm):
    ours, theirs = _clip_pair(grads)
    norm = clip_grad_norm(ours, max_norm)
    expected = torch.nn.utils.clip_grad_norm_(theirs, max_norm)
    torch.testing.assert_close(norm, expected, rtol=0, atol=0, equal_nan=True)
    for p, q in zip(ours, theirs):
        if q.grad is None:
            assert p.grad is None
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, equal_nan=True)


def test_clip_grad_norm_sparse_uncoalesced_and_nonfinite():
    """Duplicate rows are summed before the norm; a sparse inf gives torch's inf norm, scale 0 (its
    rows nan, the rest zero); an empty sparse gradient counts as zero."""
    index = torch.tensor([[0, 2, 0, 1]])
    values = _randn(4, 3)
    dense = torch.zeros(5, 3).index_add_(0, index[0], values)
    ours, theirs = _clip_pair([torch.sparse_coo_tensor(index, values, (5, 3)), _randn(5)])
    theirs[0].grad = dense
    torch.testing.assert_close(clip_grad_norm(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    assert ours[0].grad.is_coalesced()
    torch.testing.assert_close(ours[0].grad.to_dense(), theirs[0].grad)
    torch.testing.assert_close(ours[1].grad, theirs[1].grad, rtol=0, atol=0)

    ours, theirs = _clip_pair([torch.sparse_coo_tensor(index, torch.full((4, 3), math.inf), (5, 3)), _randn(5)])
    theirs[0].grad = torch.zeros(5, 3).index_add_(0, index[0], torch.full((4, 3), math.inf))
    assert clip_grad_norm(ours, 0.5) == torch.nn.utils.clip_grad_norm_(theirs, 0.5) == math.inf  # scale 0
    torch.testing.assert_close(ours[0].grad.to_dense(), theirs[0].grad, equal_nan=True)  # inf * 0: nan rows
    torch.testing.assert_close(ours[1].grad, theirs[1].grad, rtol=0, atol=0)

    empty = torch.sparse_coo_tensor(torch.zeros(1, 0, dtype=torch.long), torch.zeros(0, 3), (5, 3))
    ours, theirs = _clip_pair([empty, _randn(5)])
    theirs[0].grad = torch.zeros(5, 3)
    assert torch.equal(clip_grad_norm(ours, 0.5), torch.nn.utils.clip_grad_norm_(theirs, 0.5))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_lr_factor_boundaries(schedule):
    total = 10
    # warmup over every step: (step + 1) / warmup, the last step at the peak
    assert [lr_factor(s, total, schedule, total, 0.2) for s in range(total)] == [(s + 1) / total for s in range(total)]
    # past the end: the floor (constant: the peak), never above it, never below min_lr_ratio
    end = 1.0 if schedule == "constant" else 0.2
    assert lr_factor(total, total, schedule, 2, 0.2) == pytest.approx(end)
    assert lr_factor(10 * total, total, schedule, 2, 0.2) == pytest.approx(end)
    factors = [lr_factor(s, total, schedule, 2, 0.2) for s in range(2, total)]
    assert factors[0] == 1.0 and all(x >= y for x, y in zip(factors, factors[1:]))
    assert all(0.2 <= f <= 1.0 for f in factors)
    assert lr_factor(0, total, schedule, 0, 0.2) == 1.0  # no warmup: the first step at the peak
    assert lr_factor(5, total, schedule, 0, 1.0) == 1.0  # min_lr_ratio 1: flat


def test_a_step_in_a_fresh_process_before_any_torch_adamw():
    """BUG (introduced by the hook fix, caught by the demo): torch wraps AdamW.step with its hook
    wrapper only once a plain torch AdamW is built; before that, AdamW.step.__wrapped__ is the
    step without its no-grad decorator, and the first step of every run raised "a leaf Variable
    that requires grad is being used in an in-place operation". A fresh interpreter, as a run."""
    import subprocess

    script = (
        "import torch\n"
        "from posttrain.train.optim import AdamW\n"
        "m = torch.nn.Linear(3, 2)\n"
        "opt = AdamW(m.parameters(), lr=0.1, weight_decay=0.1)\n"
        "calls = []\n"
        "opt.register_step_post_hook(lambda *a: calls.append(1))\n"
        "m(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "torch.optim.AdamW(torch.nn.Linear(2, 2).parameters())\n"
        "m(torch.randn(4, 3)).sum().backward(); opt.step()\n"
        "assert len(calls) == 2, calls\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
