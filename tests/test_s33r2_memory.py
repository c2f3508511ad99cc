"""The chunked log-prob functions' shared backward (`_HeadLogProbs`) against autograd through a full
float64 log-softmax, the bfloat16 head upcast a block at a time, and the run's peak-memory reset."""

from __future__ import annotations

import torch

from posttrain.losses import language_modeling as lm


def _problem(n=23, h=6, v=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(n, h, generator=g, dtype=torch.float64), torch.randn(v, h, generator=g, dtype=torch.float64),
              torch.randn(v, generator=g, dtype=torch.float64)]
    return [t.requires_grad_() for t in leaves], g


def _grads(out, leaves, upstream):
    return torch.autograd.grad((out * upstream).sum(), leaves)


def test_several_tokens_and_the_rest_column_match_a_float64_log_softmax_in_values_and_gradients():
    leaves, g = _problem()
    n, v = leaves[0].shape[0], leaves[1].shape[0]
    indices = torch.randint(0, v, (n, 4), generator=g)
    indices[:, 3] = indices[:, 2]  # a token twice: both columns' gradients count
    got = lm.token_logps_at(*leaves[:2], indices, leaves[2], chunk_size=5, rest_from=1)
    log_p = (leaves[0] @ leaves[1].T + leaves[2]).log_softmax(-1)
    rest = torch.logsumexp(log_p.scatter(1, indices[:, 1:], float("-inf")), dim=-1, keepdim=True)
    want = torch.cat([log_p.gather(1, indices), rest], dim=1)
    upstream = torch.randn(want.shape, generator=g, dtype=torch.float64)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    for mine, ref in zip(_grads(got, leaves, upstream), _grads(want, leaves, upstream)):
        torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


def test_an_entropy_bonus_gets_the_entropys_gradient():
    leaves, g = _problem()
    targets = torch.randint(0, leaves[1].shape[0], (leaves[0].shape[0],), generator=g)
    logps, entropy = lm.token_logps_and_entropy(*leaves[:2], targets, leaves[2], chunk_size=4)
    log_p = (leaves[0] @ leaves[1].T + leaves[2]).log_softmax(-1)
    ref_logps, ref_entropy = log_p.gather(1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)
    a, b = torch.randn(2, targets.shape[0], generator=g, dtype=torch.float64)
    for only_entropy in (False, True):
        got = (entropy * b if only_entropy else logps * a + entropy * b).sum()
        want = (ref_entropy * b if only_entropy else ref_logps * a + ref_entropy * b).sum()
        for mine, ref in zip(torch.autograd.grad(got, leaves, retain_graph=True),
                             torch.autograd.grad(want, leaves, retain_graph=True)):
            torch.testing.assert_close(mine, ref, rtol=0, atol=1e-12)


def test_a_rest_column_over_no_token_has_a_zero_gradient_not_nan():
    leaves, _ = _problem(n=3, v=3)
    indices = torch.tensor([[0, 0, 1, 2]] * 3)  # the rest after column 1 holds the whole vocabulary
    out = lm.token_logps_at(*leaves[:2], indices, None, chunk_size=2, rest_from=1)
    assert torch.isneginf(out[:, -1]).all()
    assert all(torch.isfinite(grad).all() for grad in torch.autograd.grad(out[:, :-1].sum(), leaves[:2]))


def test_a_bfloat16_head_is_upcast_a_block_at_a_time_with_the_values_of_a_whole_upcast(monkeypatch):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(8, 16, generator=g).bfloat16()
    weight = torch.randn(100, 16, generator=g).bfloat16()
    upcasts = []
    original = torch.Tensor.to

    def counting(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.dim() == 2 and self.shape[1] == 16 and out.dtype == torch.float32:
            upcasts.append(self.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting)
    logits = lm._chunk_logits(hidden, weight, None)
    monkeypatch.undo()
    assert max(upcasts) < weight.shape[0]  # blocks of the head: 8 × 100 // 16 = 50 rows
    torch.testing.assert_close(logits, hidden.float() @ weight.float().T, rtol=1e-6, atol=1e-5)
    grad = torch.randn(8, 100, generator=g)
    torch.testing.assert_close(lm._head_grad_input(grad, weight), grad @ weight.float(), rtol=1e-6, atol=1e-5)


def test_a_run_logger_starts_the_accelerators_peak_afresh(monkeypatch, tmp_path):
    from posttrain.train import metrics

    resets = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: resets.append(a))
    metrics.RunLogger(tmp_path, enabled=False)
    assert resets == [()]
