"""posttrain's AdamW: torch's update, with an untied embedding updated on the rows a gradient has
reached. It must equal torch.optim.AdamW bit for bit, with either kernel, with weight decay, across
a resume, and when the reached rows grow past half the matrix."""

from __future__ import annotations

import pytest
import torch

from posttrain.config import TrainConfig
from posttrain.train.optim import (
    AdamW, clip_grad_norm, make_optimizer, sparse_embedding_gradients, untied_embedding_weights)

V, H = 2048, 32


class TinyLM(torch.nn.Module):
    def __init__(self, tied: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(V, H)
        self.mix = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, V, bias=False)
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _batches(steps: int, widen: int = 40):
    """Token ids from a vocabulary prefix that widens every step: new rows keep being reached
    while earlier ones keep decaying, and a few rows are never reached."""
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 200 + widen * s, (4, 6), generator=g) for s in range(steps)]


def _loss(model: TinyLM, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.roll(1, dims=1).flatten())


def _train(optimizer: torch.optim.Optimizer, model: TinyLM, batches) -> None:
    for ids in batches:
        _loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()


def _groups(model: TinyLM, wd: float) -> list[dict]:
    return [{"params": [model.embed.weight, model.mix.weight, model.head.weight], "weight_decay": wd},
            {"params": [model.mix.bias], "weight_decay": 0.0}]


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_reached_rows_update_equals_torch_adamw_bitwise(fused, wd):
    batches = _batches(8)
    ours, theirs = TinyLM(), TinyLM()
    opt = AdamW(_groups(ours, wd), row_sparse=[ours.embed.weight], lr=1e-2, fused=fused)
    _train(opt, ours, batches)
    _train(torch.optim.AdamW(_groups(theirs, wd), lr=1e-2, fused=fused), theirs, batches)
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert torch.equal(a, b), name
    seen = torch.unique(torch.cat([b.flatten() for b in batches]))
    state = opt.state[ours.embed.weight]
    assert torch.equal(state["reached"], seen) and len(seen) < V / 2  # the rows it updated
    assert state["exp_avg_reached"].shape == state["exp_avg_sq_reached"].shape == (len(seen), H)  # all it holds
    assert opt._row_sparse == [ours.embed.weight]
    if wd:  # a row never reached only decays, as in AdamW
        never = sorted(set(range(V)) - set(seen.tolist()))[0]
        assert not torch.equal(ours.embed.weight[never], TinyLM().embed.weight[never])


def test_past_half_the_rows_it_hands_the_matrix_back_to_torch():
    batches = [torch.arange(400 * s, 400 * s + 400).view(20, 20) for s in range(5)]  # 1,200 rows after 3 steps
    ours, theirs = TinyLM(), TinyLM()
    opt = AdamW(_groups(ours, 0.1), row_sparse=[ours.embed.weight], lr=1e-2)
    _train(opt, ours, batches)
    _train(torch.optim.AdamW(_groups(theirs, 0.1), lr=1e-2), theirs, batches)
    assert opt._row_sparse == []  # reached rows 400, 800, 1,200 > V/2: handed back at step 3
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
def test_resume_rebuilds_the_reached_rows_from_the_moments(fused):
    """The state dict is torch's (no extra entries), so a checkpoint of either optimizer resumes the
    other; after a load the reached rows come back from the moments."""
    batches = _batches(8)
    whole = TinyLM()
    _train(AdamW(_groups(whole, 0.1), row_sparse=[whole.embed.weight], lr=1e-2, fused=fused), whole, batches)

    first = TinyLM()
    torch_opt = torch.optim.AdamW(_groups(first, 0.1), lr=1e-2, fused=fused)
    _train(torch_opt, first, batches[:4])
    resumed = TinyLM()
    resumed.load_state_dict(first.state_dict())
    opt = AdamW(_groups(resumed, 0.1), row_sparse=[resumed.embed.weight], lr=1e-2, fused=fused)
    opt.load_state_dict(torch_opt.state_dict())
    assert "exp_avg" not in opt.state[resumed.embed.weight]  # the loaded moments kept on their reached rows
    _train(opt, resumed, batches[4:])
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
    assert set(opt.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
def test_state_dict_is_torch_adamws_while_only_reached_rows_are_held(fused):
    """The embedding's moments live on its reached rows only (the memory AdamW's zeros would take);
    the state dict spells them out as torch's [vocab, width] matrices, equal to torch's own."""
    batches = _batches(5)
    ours, theirs = TinyLM(), TinyLM()
    opt = AdamW(_groups(ours, 0.1), row_sparse=[ours.embed.weight], lr=1e-2, fused=fused)
    ref = torch.optim.AdamW(_groups(theirs, 0.1), lr=1e-2, fused=fused)
    _train(opt, ours, batches)
    _train(ref, theirs, batches)
    held = opt.state[ours.embed.weight]
    assert held["exp_avg_reached"].numel() * 4 < V * H  # under a quarter of torch's matrix
    mine, torchs = opt.state_dict(), ref.state_dict()
    assert mine["param_groups"] == torchs["param_groups"]
    assert mine["state"].keys() == torchs["state"].keys()
    for index, state in torchs["state"].items():
        assert mine["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert torch.equal(mine["state"][index][key], value), (index, key)
    assert "exp_avg" not in held  # writing the state dict did not expand the held state


def test_only_untied_trainable_embeddings_are_row_sparse():
    untied, tied = TinyLM(), TinyLM(tied=True)
    assert untied_embedding_weights(untied) == [untied.embed.weight]
    assert untied_embedding_weights(tied) == []  # the tied head gives every row a gradient
    untied.embed.weight.requires_grad_(False)
    assert untied_embedding_weights(untied) == []
    opt = make_optimizer(TinyLM(), TrainConfig(lr=1e-3))
    assert isinstance(opt, AdamW) and len(opt._row_sparse) == 1


class _Marked(torch.Tensor):
    """A Tensor subclass, as a sharded (DTensor) gradient is: the row-sparse path leaves it to torch."""


@pytest.mark.parametrize("odd_step", ["closure", "foreign_gradient"])
def test_a_step_torch_takes_in_between_keeps_it_exact(odd_step):
    """At step 2 torch's update of every row runs instead: for a closure (or a GradScaler), or for
    a gradient the row path cannot gather. The reached rows are then rebuilt from the moments, so
    the later row-sparse steps still equal AdamW (the prefix of ids widens: step 2 reaches new rows)."""
    batches = _batches(6)
    ours, theirs = TinyLM(), TinyLM()
    opt = AdamW(_groups(ours, 0.1), row_sparse=[ours.embed.weight], lr=1e-2)
    ref = torch.optim.AdamW(_groups(theirs, 0.1), lr=1e-2)
    for i, ids in enumerate(batches):
        for model, optimizer in ((ours, opt), (theirs, ref)):
            def closure(model=model, ids=ids):
                loss = _loss(model, ids)
                loss.backward()
                return loss
            if i == 2 and odd_step == "closure":
                optimizer.step(closure)
            else:
                closure()
                if i == 2 and optimizer is opt:
                    model.embed.weight.grad = model.embed.weight.grad.as_subclass(_Marked)
                optimizer.step()
            optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters()))


def _sparse_train(optimizer, model: TinyLM, batches, densify: bool) -> list[torch.Tensor]:
    """Steps with a sparse embedding gradient, clipped by clip_grad_norm; `densify` hands the
    optimizer that gradient made dense (torch's AdamW takes no other). Returns the norms."""
    norms = []
    for ids in batches:
        _loss(model, ids).backward()
        norms.append(clip_grad_norm(list(model.parameters()), 0.5))
        if densify:
            model.embed.weight.grad = model.embed.weight.grad.to_dense()
        optimizer.step()
        optimizer.zero_grad()
    return norms


@pytest.mark.parametrize("fused", [None, True], ids=["loop", "fused"])
@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("handed_back", [False, True], ids=["row_sparse", "handed_back"])
def test_sparse_embedding_gradient_steps_equal_torch_adamw_on_the_dense_gradient(fused, wd, handed_back):
    """Given the same sparse gradient, the reached-rows update equals torch's AdamW on its dense
    form bit for bit. With handed_back the reached rows pass half the matrix at step 3 and torch's
    step takes over, still fed sparse gradients."""
    _check_sparse_steps(fused, wd, handed_back, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sparse_embedding_gradient_steps_on_cuda():
    for fused in (None, True):
        for handed_back in (False, True):
            _check_sparse_steps(fused, 0.1, handed_back, "cuda")


def _check_sparse_steps(fused, wd: float, handed_back: bool, device: str) -> None:
    batches = [torch.arange(400 * s, 400 * s + 400).view(20, 20) for s in range(5)] if handed_back else _batches(8)
    batches = [ids.to(device) for ids in batches]
    ours, theirs = TinyLM().to(device), TinyLM().to(device)
    with sparse_embedding_gradients(ours) as switched, sparse_embedding_gradients(theirs):
        assert switched == [ours.embed] and ours.embed.sparse
        opt = AdamW(_groups(ours, wd), row_sparse=[ours.embed.weight], lr=1e-2, fused=fused)
        ours_norms = _sparse_train(opt, ours, batches, densify=False)
        theirs_norms = _sparse_train(torch.optim.AdamW(_groups(theirs, wd), lr=1e-2, fused=fused), theirs, batches,
                                     densify=True)
    assert not ours.embed.sparse  # switched back on exit
    if fused and device == "cuda":
        # CUDA's fused kernel rounds the decay of the rows never reached differently, in the last bit,
        # from the row path's p·(1 − lr·wd) (see AdamW; measured on an H200: at most 4e-6 apart), so
        # the embedding, and the clipping norms and updates after it, agree to rounding. The default
        # (foreach) kernel is bitwise on CUDA too.
        torch.testing.assert_close(torch.stack(ours_norms), torch.stack(theirs_norms), rtol=1e-4, atol=0)
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5, msg=name)
    else:
        assert ours_norms == theirs_norms
        for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert torch.equal(a, b), name
    assert opt._row_sparse == ([] if handed_back else [ours.embed.weight])


def test_clip_grad_norm_over_a_sparse_gradient_equals_torch_on_the_dense_one():
    model = TinyLM()
    ids = _batches(1)[0]
    _loss(model, ids).backward()
    dense = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with sparse_embedding_gradients(model):
        _loss(model, ids).backward()
    assert model.embed.weight.grad.is_sparse
    norm = clip_grad_norm(list(model.parameters()), 0.5)
    reference = TinyLM()
    for name, p in reference.named_parameters():
        p.grad = dense[name]
    expected = torch.nn.utils.clip_grad_norm_(list(reference.parameters()), 0.5)
    assert expected > 0.5  # so the clipping scaled
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=0)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad.to_dense(), q.grad, rtol=1e-6, atol=1e-9, msg=name)
