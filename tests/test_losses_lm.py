"""Tests for posttrain.losses.language_modeling (chunked head + cross-entropy)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from posttrain.data.records import IGNORE_INDEX
from posttrain.losses.language_modeling import (
    chunked_linear_cross_entropy,
    cross_entropy_sum,
    shift_for_causal_lm,
)


def _inputs(n=37, h=16, v=50, dtype=torch.float32, ignored=(3, 10, 11), seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(v, h, generator=gen, dtype=torch.float64) * 0.5).to(dtype)
    bias = torch.randn(v, generator=gen, dtype=torch.float64).to(dtype)
    targets = torch.randint(0, v, (n,), generator=gen)
    for i in ignored:
        if i < n:
            targets[i] = -100
    return hidden, weight, bias, targets


def _reference(hidden, weight, bias, targets, dtype):
    """The formula written out plainly with materialised logits, in `dtype`."""
    h = hidden.detach().to(dtype).requires_grad_()
    w = weight.detach().to(dtype).requires_grad_()
    b = bias.detach().to(dtype).requires_grad_()
    loss = F.cross_entropy(h @ w.T + b, targets, reduction="sum", ignore_index=-100)
    loss.backward()
    return loss.detach(), h.grad, w.grad, b.grad


def _ours(hidden, weight, bias, targets, chunk_size, scale=1.0):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach().clone().requires_grad_()
    b = bias.detach().clone().requires_grad_()
    loss = chunked_linear_cross_entropy(h, w, targets, bias=b, chunk_size=chunk_size)
    (loss * scale).backward()
    return loss.detach(), h.grad, w.grad, b.grad


@pytest.mark.parametrize("chunk_size", [1, 5, 8, 37, 1000])
@pytest.mark.parametrize("ref_dtype", [torch.float32, torch.float64])
def test_matches_materialised_cross_entropy(chunk_size, ref_dtype):
    hidden, weight, bias, targets = _inputs()
    ref = _reference(hidden, weight, bias, targets, ref_dtype)
    ours = _ours(hidden, weight, bias, targets, chunk_size)
    assert ours[0].dtype == torch.float32
    for got, want in zip(ours, ref):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-5, rtol=1e-5)


def test_grad_output_scaling():
    """backward(c) must scale every stored gradient by c (as `loss / n_tokens` does)."""
    hidden, weight, bias, targets = _inputs()
    ref = _reference(hidden, weight, bias, targets, torch.float64)
    ours = _ours(hidden, weight, bias, targets, chunk_size=7, scale=0.25)
    for got, want in zip(ours[1:], ref[1:]):
        torch.testing.assert_close(got.double(), 0.25 * want, atol=1e-6, rtol=1e-5)


def test_hand_derived_example():
    """V=2, H=2, W = I, b = 0, so the logits are the hidden vectors themselves.

    row 1: z = (0, 0),    y = 0: logsumexp = ln 2,         loss = ln 2 - 0 = ln 2
    row 2: z = (ln 3, 0), y = 1: logsumexp = ln(3 + 1) = ln 4, loss = ln 4 - 0 = ln 4
    row 3: z = (5, -5),   y = -100 (ignored): contributes nothing
    L = ln 2 + ln 4 = 3 ln 2.

    dL/dz = softmax(z) - onehot(y):
      row 1: (1/2, 1/2) - (1, 0) = (-1/2, 1/2)
      row 2: (3/4, 1/4) - (0, 1) = (3/4, -3/4)
      row 3: (0, 0)
    grad_hidden = dL/dz @ W = dL/dz.
    grad_W[v] = Σ_i dz_i[v] h_i; row 1 has h = 0, so grad_W = [[3/4 ln 3, 0], [-3/4 ln 3, 0]].
    grad_b = Σ_i dz_i = (-1/2 + 3/4, 1/2 - 3/4) = (1/4, -1/4).
    """
    ln3 = math.log(3.0)
    hidden = torch.tensor([[0.0, 0.0], [ln3, 0.0], [5.0, -5.0]], requires_grad=True)
    weight = torch.eye(2, requires_grad=True)
    bias = torch.zeros(2, requires_grad=True)
    targets = torch.tensor([0, 1, -100])
    loss = chunked_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=2)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(3 * math.log(2.0)))
    torch.testing.assert_close(hidden.grad, torch.tensor([[-0.5, 0.5], [0.75, -0.75], [0.0, 0.0]]))
    torch.testing.assert_close(weight.grad, torch.tensor([[0.75 * ln3, 0.0], [-0.75 * ln3, 0.0]]))
    torch.testing.assert_close(bias.grad, torch.tensor([0.25, -0.25]))


def test_all_ignored_and_empty():
    for n in (0, 6):
        hidden, weight, bias, _ = _inputs(n=n)
        targets = torch.full((n,), -100, dtype=torch.long)
        loss, gh, gw, gb = _ours(hidden, weight, bias, targets, chunk_size=4)
        assert loss.item() == 0.0
        for g in (gh, gw, gb):
            assert torch.isfinite(g).all() and (g == 0).all()
        assert gh.shape == hidden.shape and gw.shape == weight.shape


def test_garbage_in_ignored_rows_does_not_leak():
    """Pad positions can hold NaN/inf hidden states; ignored rows must contribute exact zeros."""
    hidden, weight, bias, targets = _inputs()
    hidden[3] = float("nan")  # targets[3] is ignored
    hidden[10] = float("inf")  # targets[10] is ignored
    keep = targets != -100
    ref = _reference(hidden[keep], weight, bias, targets[keep], torch.float64)
    loss, gh, gw, gb = _ours(hidden, weight, bias, targets, chunk_size=4)
    torch.testing.assert_close(loss.double(), ref[0], atol=1e-5, rtol=1e-5)
    assert (gh[~keep] == 0).all()
    torch.testing.assert_close(gh[keep].double(), ref[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), ref[2], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb.double(), ref[3], atol=1e-5, rtol=1e-5)


def test_no_bias_and_no_grad_path():
    hidden, weight, _, targets = _inputs()
    want = F.cross_entropy(hidden.double() @ weight.double().T, targets, reduction="sum")
    with torch.no_grad():
        got = chunked_linear_cross_entropy(hidden.requires_grad_(), weight, targets, chunk_size=9)
    assert not got.requires_grad
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


class _RecordOps(TorchDispatchMode):
    """Records every aten op and the largest tensor any op produced."""

    def __init__(self):
        super().__init__()
        self.ops: set = set()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.add(func)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_frozen_weight_skips_weight_gradient():
    hidden, weight, _, targets = _inputs()
    h = hidden.clone().requires_grad_()
    with _RecordOps() as rec:
        loss = chunked_linear_cross_entropy(h, weight, targets, chunk_size=8)  # weight frozen
        loss.backward()
    assert weight.grad is None
    assert torch.ops.aten.addmm_.default not in rec.ops  # the grad_weight accumulation never ran
    want = _reference(hidden, weight, torch.zeros(weight.shape[0]), targets, torch.float64)
    torch.testing.assert_close(h.grad.double(), want[1], atol=1e-5, rtol=1e-5)


def test_never_materialises_full_logits():
    """Structural memory check: no op in forward or backward creates an (N, V)-sized tensor."""
    n, h, v, chunk = 4096, 16, 8192, 512
    hidden, weight, _, targets = _inputs(n=n, h=h, v=v, ignored=())
    hidden.requires_grad_()
    weight.requires_grad_()
    with _RecordOps() as rec:
        chunked_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk).backward()
    assert rec.max_numel < n * v / 2
    assert rec.max_numel == chunk * v  # the (chunk, V) logits block is the largest
    # The recorder does see an (N, V) tensor when one exists (guards against a blind probe).
    with torch.no_grad(), _RecordOps() as plain:
        cross_entropy_sum(hidden @ weight.T, targets)
    assert plain.max_numel >= n * v


def test_bf16_close_to_fp32_reference():
    hidden, weight, bias, targets = _inputs(dtype=torch.bfloat16)
    ref = _reference(hidden, weight, bias, targets, torch.float64)  # same bf16 values, exact math
    loss, gh, gw, gb = _ours(hidden, weight, bias, targets, chunk_size=6)
    assert loss.dtype == torch.float32  # computed in float32, not bf16
    assert (gh.dtype, gw.dtype, gb.dtype) == (torch.bfloat16,) * 3
    torch.testing.assert_close(loss.double(), ref[0], atol=1e-4, rtol=1e-5)
    for got, want in zip((gh, gw, gb), ref[1:]):
        torch.testing.assert_close(got.double(), want, atol=1e-2, rtol=1e-2)


def test_gradcheck_float64():
    hidden, weight, bias, targets = _inputs(n=5, h=3, v=4, dtype=torch.float64, ignored=(2,))
    for t in (hidden, weight, bias):
        t.requires_grad_()

    def fn(h, w, b):
        return chunked_linear_cross_entropy(h, w, targets, bias=b, chunk_size=2)

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_cross_entropy_sum_and_shift():
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 3, 4], [-100, -100, 6, 0]])
    want = sum(
        -torch.log_softmax(logits[b, t], -1)[labels[b, t]] for b in range(2) for t in range(4) if labels[b, t] >= 0
    )
    torch.testing.assert_close(cross_entropy_sum(logits, labels), want)

    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    sel, targets = shift_for_causal_lm(hidden, labels)
    # shifted labels: row 0 -> [-100, 3, 4], row 1 -> [-100, 6, 0]; kept (b, t): (0,1) (0,2) (1,1) (1,2)
    assert targets.tolist() == [3, 4, 6, 0]
    torch.testing.assert_close(sel, torch.stack([hidden[0, 1], hidden[0, 2], hidden[1, 1], hidden[1, 2]]))


def test_matches_transformers_llama_loss_and_grads():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    model = transformers.LlamaForCausalLM(config).float()
    input_ids = torch.randint(0, 300, (3, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # right padding
    labels = input_ids.clone()
    labels[:, :4] = -100  # prompt tokens
    labels[attention_mask == 0] = -100

    out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    hf_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    hidden_sel, targets = shift_for_causal_lm(hidden, labels)
    assert targets.numel() == int((labels[:, 1:] != -100).sum())
    loss = chunked_linear_cross_entropy(hidden_sel, model.lm_head.weight, targets, chunk_size=5) / targets.numel()
    loss.backward()

    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_grads[name], atol=1e-5, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------- per-sequence log-probs


def _reference_logps(hidden, weight, labels):
    logp = torch.log_softmax(hidden[:, :-1] @ weight.T, dim=-1)  # the full [B, T, V] the chunked path avoids
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    picked = logp.gather(2, targets.clamp(min=0)[..., None]).squeeze(-1)
    return (picked * mask).sum(1), mask.sum(1)


def test_sequence_logps_match_the_full_log_softmax_in_values_and_gradients():
    from posttrain.losses.language_modeling import sequence_logps

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (3, 9), generator=g)
    labels[0, :4] = IGNORE_INDEX  # prompt
    labels[2, 6:] = IGNORE_INDEX  # padding
    upstream = torch.randn(3, generator=g, dtype=torch.float64)  # per-sequence gradients, as DPO produces
    logps, counts = sequence_logps(hidden, weight, labels, chunk_size=5)
    expected, expected_counts = _reference_logps(hidden, weight, labels)
    torch.testing.assert_close(logps, expected, rtol=1e-12, atol=1e-12)
    assert counts.tolist() == expected_counts.tolist() == [5, 8, 5]  # tokens 4..8, 1..8, 1..5
    grads = torch.autograd.grad((logps * upstream).sum(), (hidden, weight))
    expected_grads = torch.autograd.grad((expected * upstream).sum(), (hidden, weight))
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_sequence_logps_are_the_same_with_left_or_right_padding():
    from posttrain.losses.language_modeling import sequence_logps
    from posttrain.models.loading import final_hidden_and_head, load_model

    model = load_model("tiny-2l").eval()
    short, long = [5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15]
    pad = 3

    def logps(side):
        rows, masks = [], []
        for ids in (short, long):
            fill = [pad] * (len(long) - len(ids))
            rows.append(fill + ids if side == "left" else ids + fill)
            masks.append([0] * len(fill) + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * len(fill))
        input_ids, mask = torch.tensor(rows), torch.tensor(masks)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        # padding and the first real token (the "prompt": nothing before it to predict it from) carry no label
        labels = input_ids.masked_fill((mask == 0) | (positions == 0), IGNORE_INDEX)
        with torch.no_grad():
            hidden, weight, bias = final_hidden_and_head(model, input_ids=input_ids, attention_mask=mask,
                                                         position_ids=positions)
            return sequence_logps(hidden, weight, labels, bias)[0]

    torch.testing.assert_close(logps("left"), logps("right"), rtol=0, atol=1e-5)


def test_sequence_logps_never_materialise_more_than_one_chunk_of_logits():
    from posttrain.losses.language_modeling import sequence_logps

    batch, length, vocab, chunk = 4, 64, 1000, 16
    hidden = torch.randn(batch, length, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, length))
    with _RecordOps() as rec:
        logps, _ = sequence_logps(hidden, weight, labels, chunk_size=chunk)
        logps.sum().backward()
    assert rec.max_numel <= chunk * vocab < batch * (length - 1) * vocab // 10


@pytest.mark.parametrize("chunk_size", [1, 10, 64])
def test_logps_with_a_value_only_entropy_match_a_float64_log_softmax(chunk_size):
    """token_logps_with_entropy_value: log-probs and their gradients (hidden, weight, bias) as
    autograd gives them through a plain float64 log_softmax; entropies equal, without gradient."""
    from posttrain.losses.language_modeling import token_logps_and_entropy, token_logps_with_entropy_value

    g = torch.Generator().manual_seed(0)
    n, h, v = 37, 8, 50
    hidden = torch.randn(n, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)

    logps, entropy = token_logps_with_entropy_value(hidden, weight, targets, bias, chunk_size)
    assert not entropy.requires_grad
    (logps * upstream).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias)]
    for t in (hidden, weight, bias):
        t.grad = None
    log_probs = (hidden @ weight.T + bias).log_softmax(-1)
    reference = log_probs.gather(1, targets[:, None])[:, 0]
    (reference * upstream).sum().backward()
    torch.testing.assert_close(logps, reference.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(entropy, -(log_probs.exp() * log_probs).sum(-1).detach(), rtol=0, atol=1e-12)
    for mine, t in zip(ours, (hidden, weight, bias)):
        torch.testing.assert_close(mine, t.grad, rtol=0, atol=1e-12)
    # the same log-prob values as the checkpointed function GRPO used before (bitwise, float32)
    h32, w32 = hidden.detach().float(), weight.detach().float()
    assert torch.equal(token_logps_with_entropy_value(h32, w32, targets, None, chunk_size)[0],
                       token_logps_and_entropy(h32, w32, targets, None, chunk_size)[0])
    # no grad anywhere: the same values, no graph
    with torch.no_grad():
        values = token_logps_with_entropy_value(hidden, weight, targets, bias, chunk_size)
    assert torch.equal(values[0], logps.detach()) and not values[0].requires_grad
