"""Adversarial review of posttrain.train.optim.AdamW's reached-rows moments (the row_sparse state).

Every expectation comes from torch.optim.AdamW run side by side on identical copies (bitwise; for
bfloat16 weights, on float32 copies rounded to bfloat16 after each step, `_Float32Moments`), or
from plain torch (which rows a gradient touched, tensor sizes). Tests marked
xfail(strict=True, reason="DEFECT: ...") describe defects and flip when they are fixed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from posttrain.train import checkpoint
from posttrain.train.optim import AdamW

V, H = 64, 5  # an odd width: rows do not line up with vector lanes


def _params(dtype=torch.float32, shapes=((V, H), (H,)), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g).to(dtype)) for s in shapes]


def _twins(dtype=torch.float32, shapes=((V, H), (H,)), seed=0):
    ours = _params(dtype, shapes, seed)
    return ours, [torch.nn.Parameter(p.detach().clone()) for p in ours]


def _row_grad(shape, rows, g, dtype=torch.float32):
    grad = torch.zeros(shape, dtype=dtype)
    grad[rows] = torch.randn(len(rows), shape[1], generator=g).to(dtype)
    return grad


def _feed(ours, theirs, grads, sparse=False):
    """The same gradients to both (None: no gradient); `sparse` (True: the first parameter, or a
    tuple of indices): ours gets those gradients in nn.Embedding's sparse form."""
    sparse = (0,) if sparse is True else (sparse or ())
    for i, (p, q, grad) in enumerate(zip(ours, theirs, grads)):
        if grad is None:
            p.grad = q.grad = None
            continue
        q.grad = grad.clone()
        p.grad = grad.clone().to_sparse(1) if i in sparse else grad.clone()


def _assert_params_equal(ours, theirs, where=""):
    for i, (p, q) in enumerate(zip(ours, theirs)):
        assert torch.equal(p, q), (where, i, (p != q).nonzero()[:4].tolist())


def _assert_state_dicts_equal(mine: dict, torchs: dict):
    """torch's format: same indices, keys, values, dtypes (devices: both CPU here), same groups."""
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for index, state in torchs["state"].items():
        assert mine["state"][index].keys() == state.keys(), index
        for key, value in state.items():
            got = mine["state"][index][key]
            assert got.dtype == value.dtype and got.shape == value.shape and got.device == value.device, (index, key)
            assert torch.equal(got, value), (index, key, (got != value).nonzero()[:4].tolist())


class _Float32Moments:
    """The reference for bfloat16 weights, whose moments optim.AdamW keeps in float32: torch's AdamW
    on float32 copies of `params`, each step's result rounded once onto the bfloat16 weights."""

    def __init__(self, params, **kwargs):
        self.params = params
        self.masters = [torch.nn.Parameter(p.detach().float()) for p in params]
        self.optimizer = torch.optim.AdamW(self.masters, **kwargs)

    def step(self):
        for p, master in zip(self.params, self.masters):
            master.grad = None if p.grad is None else p.grad.float()
        self.optimizer.step()
        with torch.no_grad():
            for p, master in zip(self.params, self.masters):
                p.copy_(master)
                master.copy_(p)  # the weight as stored

    def state_dict(self):
        return self.optimizer.state_dict()


def _held_numel(optimizer, p) -> int:
    return sum(t.numel() for t in optimizer.state[p].values() if torch.is_tensor(t))


# ---------------------------------------------------------------------------------------- defects


def test_fused_row_path_equals_torch_fused_to_rounding():
    """Same reached rows every step (5 rows x 5 = 25 elements: a scalar tail in the compacted copy,
    vector lanes in torch's [64, 5] matrix). The CPU fused kernel rounds an element by where it sits,
    so the rows equal torch fused's to rounding, not bit for bit (as optim.AdamW's docstring says)."""
    for seed, (rows, width) in enumerate([((0, 7, 14, 21, 28), 5), ((0, 7, 14, 21, 28), 3), ((3, 17, 40), 4)]):
        ours, theirs = _twins(shapes=((V, width),), seed=seed)
        opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1, fused=True)
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
        g = torch.Generator().manual_seed(100 + seed)
        for s in range(20):
            _feed(ours, theirs, [_row_grad((V, width), list(rows), g)])
            opt.step()
            ref.step()
            assert opt._row_sparse == [ours[0]]  # the row path ran
            mine, torchs = opt.state_dict()["state"][0], ref.state_dict()["state"][0]
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(mine[key], torchs[key], rtol=1e-6, atol=0)
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)


def test_foreach_group_equals_torch_foreach_bitwise_in_bfloat16():
    """foreach=True is torch's own default on CUDA; on CPU it has to be asked for."""
    ours, theirs = _twins(torch.bfloat16)
    opt = AdamW(ours, row_sparse=[ours[0]], lr=3e-2, weight_decay=0.1, foreach=True)
    ref = _Float32Moments(theirs, lr=3e-2, weight_decay=0.1, foreach=True)
    g = torch.Generator().manual_seed(1)
    for s in range(4):
        _feed(ours, theirs, [_row_grad((V, H), list(range(s, s + 7)), g, torch.bfloat16),
                             torch.randn(H, generator=g).bfloat16()])
        opt.step()
        ref.step()
        assert opt._row_sparse == [ours[0]]
        _assert_params_equal(ours, theirs, s)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_default_kernel_equals_torch_bitwise_and_fused_to_rounding():
    """make_optimizer's 'adamw' passes fused=None: on CUDA torch then picks its foreach kernel,
    which the row path uses too (bit for bit); the fused kernel is equal to rounding."""
    for kwargs, wd in (({}, 0.0), ({}, 0.1), ({"fused": True}, 0.1)):
        ours, theirs = _twins(shapes=((300, 37),))
        ours = [torch.nn.Parameter(p.detach().cuda()) for p in ours]
        theirs = [torch.nn.Parameter(p.detach().cuda()) for p in theirs]
        opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=wd, **kwargs)
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=wd, **kwargs)
        g = torch.Generator().manual_seed(0)
        for s in range(6):
            grad = _row_grad((300, 37), torch.randperm(100, generator=g)[:11].tolist(), g).cuda()
            ours[0].grad, theirs[0].grad = grad.clone(), grad.clone()
            opt.step()
            ref.step()
            if kwargs:
                torch.testing.assert_close(ours[0], theirs[0], rtol=1e-6, atol=1e-9)
            else:
                assert torch.equal(ours[0], theirs[0]), (kwargs, wd, s)
        assert opt._row_sparse == [ours[0]]  # the row path ran throughout


def test_state_dict_post_hooks_see_torchs_format():
    ours, theirs = _twins()
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2)
    ref = torch.optim.AdamW(theirs, lr=1e-2)
    _feed(ours, theirs, [_row_grad((V, H), [1, 2], torch.Generator().manual_seed(0)), torch.ones(H)])
    opt.step()
    ref.step()
    seen = {}
    for name, optimizer in (("ours", opt), ("torch", ref)):
        optimizer.register_state_dict_post_hook(
            lambda _, sd, name=name: seen.__setitem__(name, {k: set(v) for k, v in sd["state"].items()}))
        optimizer.state_dict()
    assert seen["ours"] == seen["torch"]


def test_load_after_a_hand_back_keeps_only_the_reached_rows():
    ours, _ = _twins()
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2)
    ours[0].grad, ours[1].grad = torch.ones(V, H), torch.ones(H)  # every row: handed back to torch
    opt.step()
    assert opt._row_sparse == []
    few, _ = _twins()
    other = AdamW(few, row_sparse=[few[0]], lr=1e-2)
    few[0].grad, few[1].grad = _row_grad((V, H), [4, 9], torch.Generator().manual_seed(0)), torch.ones(H)
    other.step()
    opt.load_state_dict(other.state_dict())
    assert _held_numel(opt, ours[0]) < V * H  # two rows' moments, not two [64, 5] matrices


def test_a_fully_sparse_coo_gradient_equals_torch_on_its_dense_form():
    ours, theirs = _twins()
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for s in range(3):
        dense = _row_grad((V, H), [s, 10 + s], g)
        ours[0].grad, theirs[0].grad = dense.to_sparse(), dense.clone()  # sparse_dim 2, dense_dim 0
        ours[1].grad = theirs[1].grad = torch.ones(H)
        opt.step()
        ref.step()
    _assert_params_equal(ours, theirs)


def test_a_deepcopy_of_the_optimizer_steps_like_torch():
    ours, theirs = _twins()
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    _feed(ours, theirs, [_row_grad((V, H), [1, 5], g), torch.ones(H)])
    opt.step()
    ref.step()
    opt, ref = copy.deepcopy(opt), copy.deepcopy(ref)  # params copied with them
    ours, theirs = opt.param_groups[0]["params"], ref.param_groups[0]["params"]
    _feed(ours, theirs, [_row_grad((V, H), [5, 8], g), torch.ones(H)])
    opt.step()
    ref.step()
    _assert_params_equal(ours, theirs)
    _assert_state_dicts_equal(opt.state_dict(), ref.state_dict())


# ------------------------------------------------------------------------------ verified (passing)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_two_row_sparse_matrices_in_their_own_groups_with_edited_lr_equal_torch(sparse):
    """Two embeddings, each in its own group (own wd, lr edited every step as a scheduler does),
    a dense parameter in a third; gradients None on some steps, an all-zero gradient on one, a
    gradient row exactly zero. Bitwise equal to torch's loop kernel; state dict equal to torch's;
    `reached` is exactly the rows plain torch saw a nonzero gradient on."""
    shapes = ((V, H), (40, 3), (H,))
    ours, theirs = _twins(shapes=shapes)
    groups = lambda ps: [{"params": [ps[2]], "weight_decay": 0.0},  # noqa: E731
                         {"params": [ps[1]], "weight_decay": 0.3},
                         {"params": [ps[0]], "weight_decay": 0.1}]
    opt = AdamW(groups(ours), row_sparse=[ours[0], ours[1]], lr=1e-2)
    ref = torch.optim.AdamW(groups(theirs), lr=1e-2)
    g = torch.Generator().manual_seed(3)
    nonzero = [set(), set()]
    for s in range(9):
        for optimizer in (opt, ref):
            for i, group in enumerate(optimizer.param_groups):
                group["lr"] = 0.02 * (i + 1) / (s + 1)
        grads = []
        for k, shape in enumerate(shapes[:2]):
            if (s + k) % 4 == 3:
                grads.append(None)
                continue
            grad = _row_grad(shape, torch.randint(0, shape[0] // 3, (3,), generator=g).tolist(), g)
            if s == 5:
                grad = torch.zeros(shape)  # zero_grad(set_to_none=False) and no lookup
            if s == 2:
                grad[0] = 0.0  # a row exactly zero
            nonzero[k] |= set(grad.any(dim=1).nonzero().flatten().tolist())
            grads.append(grad)
        grads.append(torch.randn(H, generator=g))
        _feed(ours, theirs, grads, sparse=(0, 1) if sparse and s != 5 else False)
        opt.step()
        ref.step()
        _assert_params_equal(ours, theirs, s)
    assert opt._row_sparse == [ours[0], ours[1]]
    if not sparse:  # a sparse gradient's listed rows count as reached, zero or not
        for k in range(2):
            assert set(opt.state[ours[k]]["reached"].tolist()) == nonzero[k]
    _assert_state_dicts_equal(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
def test_default_dtype_float64_step_counter_and_update_equal_torch(fused):
    """torch.set_default_dtype(float64): torch's step counter is float64 for the loop kernel (float32
    for fused); ours must create the same, and the state dict must carry it."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours, theirs = _twins(torch.float64, shapes=((V, 16), (16,)))  # width 16: no scalar tail for fused
        opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1, fused=fused)
        ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=fused)
        g = torch.Generator().manual_seed(0)
        for s in range(4):
            _feed(ours, theirs, [_row_grad((V, 16), [s, 20], g, torch.float64), torch.ones(16)], sparse=s % 2 == 1)
            opt.step()
            ref.step()
        assert opt.state[ours[0]]["step"].dtype == ref.state[theirs[0]]["step"].dtype
        assert "reached" in opt.state[ours[0]]
        _assert_params_equal(ours, theirs)
        _assert_state_dicts_equal(opt.state_dict(), ref.state_dict())
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("sparse", [False, True], ids=["dense_grad", "sparse_grad"])
def test_bfloat16_parameters_equal_torch_loop_kernel(sparse):
    ours, theirs = _twins(torch.bfloat16)
    opt = AdamW(ours, row_sparse=[ours[0]], lr=3e-2, weight_decay=0.1)
    ref = _Float32Moments(theirs, lr=3e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for s in range(6):
        _feed(ours, theirs, [_row_grad((V, H), [2 * s, 2 * s + 1, 3], g, torch.bfloat16),
                             torch.randn(H, generator=g).bfloat16()], sparse=sparse)
        opt.step()
        ref.step()
        _assert_params_equal(ours, theirs, s)
    assert opt.state[ours[0]]["exp_avg_reached"].dtype == torch.float32
    _assert_state_dicts_equal(opt.state_dict(), ref.state_dict())


def test_state_dict_mid_run_leaves_the_held_state_alone_and_is_torchs():
    """state_dict() between steps: the same held tensors afterwards (no full moments created), the
    returned moments full-size on the CPU, and the run continues bitwise equal to torch."""
    ours, theirs = _twins()
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for s in range(6):
        _feed(ours, theirs, [_row_grad((V, H), [s, 3 * s], g), torch.randn(H, generator=g)])
        opt.step()
        ref.step()
        held = {k: (v.data_ptr(), v.shape) for k, v in opt.state[ours[0]].items()}
        saved = opt.state_dict()
        assert {k: (v.data_ptr(), v.shape) for k, v in opt.state[ours[0]].items()} == held
        assert saved["state"][0]["exp_avg"].shape == (V, H) and saved["state"][0]["exp_avg"].device.type == "cpu"
        _assert_state_dicts_equal(saved, ref.state_dict())
        saved["state"][0]["exp_avg"].fill_(7.0)  # the caller's copy, not the optimizer's
    _assert_params_equal(ours, theirs)


def test_load_torchs_state_into_an_optimizer_that_already_has_state():
    """Ours has run on other rows; a torch AdamW's state dict replaces it: what is held afterwards is
    the loaded rows' moments only, and both continue bitwise equal."""
    ours, theirs = _twins()
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for s in range(3):  # unrelated history on rows 40..
        ours[0].grad, ours[1].grad = _row_grad((V, H), [40 + s, 50], g), torch.randn(H, generator=g)
        opt.step()
    ref = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1)
    for s in range(3):
        theirs[0].grad, theirs[1].grad = _row_grad((V, H), [s, 7], g), torch.randn(H, generator=g)
        ref.step()
    with torch.no_grad():
        for p, q in zip(ours, theirs):
            p.copy_(q)
    opt.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch's load aliases the step tensors
    assert opt.state[ours[0]]["reached"].tolist() == [0, 1, 2, 7]
    assert _held_numel(opt, ours[0]) == 1 + 4 + 2 * 4 * H  # step, rows, two [4, H] moments
    for s in range(4):
        _feed(ours, theirs, [_row_grad((V, H), [s + 5, 30], g), torch.randn(H, generator=g)], sparse=s % 2 == 0)
        opt.step()
        ref.step()
        _assert_params_equal(ours, theirs, s)
    _assert_state_dicts_equal(opt.state_dict(), ref.state_dict())


def test_bfloat16_checkpoint_round_trip_then_training_equals_an_uninterrupted_torch_run(tmp_path):
    """checkpoint.save/load (safetensors + JSON) of a bf16 row-sparse state into a fresh optimizer of
    ours; the resumed run equals torch's AdamW run straight through (on float32 copies rounded to
    bfloat16 each step: the moments stay float32, in the checkpoint too), bit for bit."""
    model_a = torch.nn.Module()
    model_a.emb, model_a.bias = _params(torch.bfloat16)
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in model_a.parameters()]
    ref = _Float32Moments(theirs, lr=3e-2, weight_decay=0.1)
    opt = AdamW(list(model_a.parameters()), row_sparse=[model_a.emb], lr=3e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    plan = [(_row_grad((V, H), [s, 11, 2 * s + 20], g, torch.bfloat16), torch.randn(H, generator=g).bfloat16())
            for s in range(8)]
    for s, grads in enumerate(plan):
        if s == 4:
            saved = checkpoint.save(tmp_path, s, model=model_a, optimizer=opt, loop_state={"step": s}, rank=0,
                                    world_size=1, barrier=lambda: None, keep_last=1)
            model_a = torch.nn.Module()
            model_a.emb, model_a.bias = _params(torch.bfloat16, seed=9)  # other values: the load must restore
            opt = AdamW(list(model_a.parameters()), row_sparse=[model_a.emb], lr=3e-2, weight_decay=0.1)
            checkpoint.load(saved, model=model_a, optimizer=opt, rank=0)
            held = opt.state[model_a.emb]
            assert "exp_avg" not in held and held["exp_avg_reached"].dtype == torch.float32
            assert opt.state[model_a.bias]["exp_avg_sq"].dtype == torch.float32
        ours = list(model_a.parameters())
        _feed(ours, theirs, list(grads), sparse=s % 2 == 1)
        opt.step()
        ref.step()
        _assert_params_equal(ours, theirs, s)


def test_add_param_group_after_steps_keeps_the_row_path_exact():
    ours, theirs = _twins(shapes=((V, H), (H,), (3, 3)))
    opt = AdamW(ours[:2], row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(theirs[:2], lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for s in range(6):
        if s == 2:
            opt.add_param_group({"params": [ours[2]], "lr": 0.05})
            ref.add_param_group({"params": [theirs[2]], "lr": 0.05})
        grads = [_row_grad((V, H), [s, 9], g), torch.randn(H, generator=g), torch.randn(3, 3, generator=g)]
        _feed(ours[:len(opt.param_groups) + 1], theirs, grads[:len(opt.param_groups) + 1], sparse=s % 2 == 0)
        opt.step()
        ref.step()
        _assert_params_equal(ours, theirs, s)
    assert opt._row_sparse == [ours[0]]
    _assert_state_dicts_equal(opt.state_dict(), ref.state_dict())


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
def test_memory_after_steps_and_after_a_load_is_the_reached_rows_only(fused):
    """The claim: no [vocab, width] moment tensors held for an embedding with few reached rows."""
    ours, _ = _twins(shapes=((1024, 8), (8,)))
    opt = AdamW(ours, row_sparse=[ours[0]], lr=1e-2, weight_decay=0.1, fused=fused)
    g = torch.Generator().manual_seed(0)
    for s in range(5):
        ours[0].grad = _row_grad((1024, 8), [s, 100 + s], g).to_sparse(1) if s % 2 else _row_grad((1024, 8), [s], g)
        ours[1].grad = torch.randn(8, generator=g)
        opt.step()
        assert all(t.numel() < 1024 for t in opt.state[ours[0]].values())
    assert opt.state[ours[0]]["reached"].tolist() == [0, 1, 2, 3, 4, 101, 103]
    fresh, _ = _twins(shapes=((1024, 8), (8,)))
    again = AdamW(fresh, row_sparse=[fresh[0]], lr=1e-2, weight_decay=0.1, fused=fused)
    again.load_state_dict(opt.state_dict())
    assert all(t.numel() < 1024 for t in again.state[fresh[0]].values())
    assert torch.equal(again.state[fresh[0]]["exp_avg_sq_reached"], opt.state[ours[0]]["exp_avg_sq_reached"])
