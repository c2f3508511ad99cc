"""Language-modelling losses: the fused chunked head + cross-entropy, and plain references.

The LM head's logits are the largest tensor in post-training: N tokens x V vocabulary
(e.g. 16k tokens x 128k vocab x 4 bytes = 8 GiB in float32, plus the same again for
their gradient). `chunked_linear_cross_entropy` never builds them: it walks the tokens
in chunks and, while each chunk's logits are alive, computes both the loss and the
gradients, so peak extra memory is one (chunk, V) block.

All losses here return SUMS over labelled tokens. The caller divides by the token
count it chooses (e.g. labelled tokens in the whole accumulated batch), which is what
makes gradient accumulation exact rather than a mean of means.
"""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def shift_for_causal_lm(
    hidden: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[Tensor, Tensor]:
    """Apply the causal shift and keep only labelled positions.

    Position t predicts token t+1 (the Hugging Face convention: `labels` are aligned
    with `input_ids`, the shift happens here):

        hidden_sel = hidden[:, :-1][mask],  targets = labels[:, 1:][mask],
        mask = labels[:, 1:] != ignore_index

    Padding and prompt positions are dropped *before* the LM head, so they cost no
    head matmul at all (in SFT most tokens are often prompt or padding).

    hidden: (B, T, H), labels: (B, T) -> hidden_sel: (M, H), targets: (M,)
    """
    targets = labels[:, 1:]
    keep = targets != ignore_index  # (B, T-1)
    return hidden[:, :-1][keep], targets[keep]


def cross_entropy_sum(logits: Tensor, targets: Tensor, ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Plain summed cross-entropy from materialised logits (the `plain` loss option).

    L = Σ_{i: y_i != ignore} [logsumexp_v(z_i) - z_{i, y_i}]

    logits: (..., V), targets: (...) -> 0-dim float32 (float64 for float64 logits).
    bf16/fp16 logits are upcast so the softmax does not lose the tail.
    """
    vocab = logits.shape[-1]
    logits = logits.reshape(-1, vocab).to(torch.promote_types(logits.dtype, torch.float32))
    return torch.nn.functional.cross_entropy(
        logits, targets.reshape(-1), reduction="sum", ignore_index=ignore_index
    )


def chunked_linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Summed cross-entropy of a linear head, without materialising the (N, V) logits.

    z_i = W h_i + b
    L   = Σ_{i: y_i != ignore} [logsumexp_v(z_i) - z_{i, y_i}]

    hidden: (N, H), weight: (V, H), targets: (N,) long, bias: (V,) or None
    -> 0-dim float32 tensor (float64 for float64 inputs); the SUM, divide by your
    token count.

    Gradients are computed during the forward pass, chunk by chunk, in float32
    (dL/dz_i = softmax(z_i) - onehot(y_i), zero for ignored rows), and returned
    scaled by grad_output in backward. Peak extra memory is O(chunk_size * V).
    Work for a gradient is skipped when its input does not require grad (a frozen
    LoRA head needs no grad_weight). Ignored targets contribute exactly zero loss
    and gradient; all-ignored or N == 0 gives a loss of 0.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden (N, H) and weight (V, H), got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be (N,) = {tuple(hidden.shape[:1])}, got {tuple(targets.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    needs = (
        grad_on and hidden.requires_grad,
        grad_on and weight.requires_grad,
        grad_on and bias is not None and bias.requires_grad,
    )
    if not any(needs):
        # Inference / evaluation: no graph, no saved gradients.
        loss, _, _, _ = _loss_and_grads(hidden, weight, bias, targets, chunk_size, ignore_index, needs)
        return loss
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk_size, ignore_index, needs)


class _LinearCrossEntropy(torch.autograd.Function):
    """Autograd wrapper: gradients are produced in forward; backward only rescales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, ignore_index, needs):
        loss, grad_hidden, grad_weight, grad_bias = _loss_and_grads(
            hidden, weight, bias, targets, chunk_size, ignore_index, needs
        )
        # save_for_backward (not a ctx attribute) so autograd frees them after backward
        # even while the caller still holds the loss tensor.
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grads = ctx.saved_tensors
        # grad_output is 1 for `loss.backward()` and for `(loss / n).backward()` it is
        # 1/n: scale only when needed so the common case costs no extra (N, H) copy.
        if bool(grad_output == 1):
            return grads[0], grads[1], grads[2], None, None, None, None
        scaled = [None if g is None else g * grad_output.to(g.dtype) for g in grads]
        return scaled[0], scaled[1], scaled[2], None, None, None, None


def _loss_and_grads(hidden, weight, bias, targets, chunk_size, ignore_index, needs):
    """Chunked loop shared by the autograd and the no-grad paths (see the public docstring).

    Autocast is switched off inside: the chunks are upcast explicitly, and under a bf16
    autocast the matmuls would otherwise run in bf16 and clash with the float32 buffers.
    """
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return _loss_and_grads_fp32(hidden, weight, bias, targets, chunk_size, ignore_index, needs)


def _loss_and_grads_fp32(hidden, weight, bias, targets, chunk_size, ignore_index, needs):
    need_hidden, need_weight, need_bias = needs
    num_tokens = hidden.shape[0]
    # At least float32 (bf16/fp16 are upcast; float64 stays float64, which gradcheck needs).
    compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
    # One upcast copy of the head (a no-op when it already has the compute dtype); the
    # chunks of hidden are upcast one at a time so bf16 activations are never upcast in full.
    weight32 = weight.to(compute)
    bias32 = None if bias is None else bias.to(compute)
    loss = torch.zeros((), dtype=compute, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros_like(weight32) if need_weight else None
    grad_bias = torch.zeros_like(bias32) if need_bias else None
    any_grad = need_hidden or need_weight or need_bias

    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        hidden_chunk = hidden[start:end].to(compute)  # (C, H)
        target_chunk = targets[start:end]  # (C,)
        # No `if not labelled.any(): continue` shortcut: it would force a device sync per
        # chunk, and the masked arithmetic below already gives exact zeros.
        labelled = target_chunk != ignore_index  # (C,)
        safe_targets = torch.where(labelled, target_chunk, 0)
        # Ignored rows may hold garbage (NaN at fully masked pad positions in some attention
        # kernels); zero them so 0 * NaN cannot reach grad_weight.
        hidden_chunk = hidden_chunk.masked_fill(~labelled[:, None], 0.0)

        logits = hidden_chunk @ weight32.T  # (C, V) in the compute dtype
        if bias32 is not None:
            logits += bias32
        log_norm = torch.logsumexp(logits, dim=-1)  # (C,)
        target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)  # (C,)
        loss += torch.where(labelled, log_norm - target_logits, 0.0).sum()
        if not any_grad:
            continue

        # dL/dz = softmax(z) - onehot(y), zeroed on ignored rows; reuse the logits buffer.
        grad_logits = logits.sub_(log_norm[:, None]).exp_()
        grad_logits[torch.arange(end - start, device=logits.device), safe_targets] -= 1.0
        grad_logits.masked_fill_(~labelled[:, None], 0.0)
        if need_hidden:
            grad_hidden[start:end] = grad_logits @ weight32  # (C, H), cast to hidden dtype
        if need_weight:
            grad_weight.addmm_(grad_logits.T, hidden_chunk)  # (V, H) += (V, C) @ (C, H)
        if need_bias:
            grad_bias += grad_logits.sum(0)

    if grad_weight is not None:
        grad_weight = grad_weight.to(weight.dtype)
    if grad_bias is not None:
        grad_bias = grad_bias.to(bias.dtype)
    return loss, grad_hidden, grad_weight, grad_bias


def sequence_logps(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None = None,
                   chunk_size: int = 256, ignore_index: int = IGNORE_INDEX) -> tuple[Tensor, Tensor]:
    """Per-sequence summed log-probabilities of the labelled tokens, never holding [B, T, V].

    log π(y|x) = Σ_{t: labels_t != ignore} log softmax(W h_{t−1} + b)[labels_t]

    hidden (B, T, H) final hidden states, weight (V, H) the output head, labels (B, T) in the
    Hugging Face convention (position t is predicted from t−1; the shift happens here).
    Returns (logps (B,), token counts (B,)); average log-probs are logps / counts.

    Unlike the SFT loss, preference losses weight every token's log-prob by a gradient known
    only in backward, so gradients cannot be formed in forward. Instead each chunk of
    positions is activation-checkpointed: forward keeps one chunk's logits at a time and
    backward recomputes them, which costs one extra head matmul per chunk.
    """
    batch = hidden.shape[0]
    selected, targets = shift_for_causal_lm(hidden, labels, ignore_index)  # (N, H), (N,)
    mask = labels[:, 1:] != ignore_index
    rows = torch.arange(batch, device=hidden.device)[:, None].expand_as(mask)[mask]  # (N,) sequence of each token
    per_token = token_logps(selected, weight, targets, bias, chunk_size)
    logps = per_token.new_zeros(batch).index_add(0, rows, per_token)
    return logps, mask.sum(dim=1)


def tempered(hidden: Tensor, bias: Tensor | None, temperature: float) -> tuple[Tensor, Tensor | None]:
    """(hidden, bias) whose head gives logits / temperature: (hidden / T) · Wᵀ + b / T — the
    distribution sampling at temperature T draws from, without forming the logits."""
    if temperature == 1.0:
        return hidden, bias
    return hidden / temperature, None if bias is None else bias / temperature


def token_logps(selected: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                chunk_size: int = 256) -> Tensor:
    """log softmax(W h + b)[y] for N (hidden state, target) pairs: selected (N, H), targets (N,).

    Chunks of `chunk_size` rows are activation-checkpointed (see `sequence_logps`)."""
    return token_logps_at(selected, weight, targets[:, None], bias, chunk_size)[:, 0]


def token_logps_at(selected: Tensor, weight: Tensor, indices: Tensor, bias: Tensor | None = None,
                   chunk_size: int = 256, rest_from: int | None = None) -> Tensor:
    """log softmax(W h + b)[v] at M tokens v per position: selected (N, H), indices (N, M) → (N, M).

    `token_logps` with several targets per position (a label and a teacher's top-k tokens, for
    distillation); chunked and activation-checkpointed the same way. With `rest_from = j` one more
    column holds log Σ_{v ∉ indices[:, j:]} p_v, the mass outside those tokens, from the logits:
    logsumexp over the other tokens − logsumexp over all (precise where 1 − Σ p_v would round)."""
    from torch.utils.checkpoint import checkpoint

    out = []
    for start in range(0, selected.shape[0], chunk_size):
        end = start + chunk_size
        args = (selected[start:end], weight, bias, indices[start:end], rest_from)
        if torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad):
            out.append(checkpoint(_logps_at, *args, use_reentrant=False))
        else:
            out.append(_logps_at(*args))
    width = indices.shape[1] + (rest_from is not None)
    return torch.cat(out) if out else selected.new_zeros(0, width, dtype=torch.float32)


@torch.no_grad()
def top_k_logps(selected: Tensor, weight: Tensor, k: int, bias: Tensor | None = None,
                chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """The k most likely tokens of softmax(W h + b) per position and their log-probs, chunk by
    chunk without gradient: selected (N, H) → (log-probs (N, k) float32, token ids (N, k) int64)."""
    logps, ids = [], []
    for start in range(0, selected.shape[0], chunk_size):
        with torch.autocast(device_type=selected.device.type, enabled=False):
            logits = _chunk_logits(selected[start : start + chunk_size], weight, bias)
            top = (logits - torch.logsumexp(logits, dim=-1, keepdim=True)).topk(min(k, logits.shape[-1]), dim=-1)
        logps.append(top.values.float())
        ids.append(top.indices)
    if not logps:
        return selected.new_zeros(0, k, dtype=torch.float32), torch.zeros(0, k, dtype=torch.long, device=selected.device)
    return torch.cat(logps), torch.cat(ids)


def token_logps_and_entropy(selected: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                            chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """(log softmax(z)[y], H(softmax(z))) for N (hidden state, target) pairs, z = W h + b:

        H = −Σ_v p_v log p_v = logsumexp(z) − Σ_v p_v z_v

    Chunked and activation-checkpointed like `token_logps`; the entropy costs one more pass
    over each chunk's logits. Both outputs carry gradients (an entropy bonus needs them)."""
    from torch.utils.checkpoint import checkpoint

    out = []
    for start in range(0, selected.shape[0], chunk_size):
        end = start + chunk_size
        args = (selected[start:end], weight, bias, targets[start:end])
        if torch.is_grad_enabled() and (selected.requires_grad or weight.requires_grad):
            out.append(checkpoint(_token_logps_entropy, *args, use_reentrant=False))
        else:
            out.append(_token_logps_entropy(*args))
    both = torch.cat(out, dim=1) if out else selected.new_zeros(2, 0, dtype=torch.float32)
    return both[0], both[1]


def token_logps_with_entropy_value(selected: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                   chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """`token_logps_and_entropy` for when the entropy is only reported (GRPO, PPO without an
    entropy bonus): the log-probs carry gradients, the entropies (N,) carry none.

    Forward keeps no logits. Backward recomputes each chunk's logits z = W h + b once and uses

        d log softmax(z)[y] / dz = onehot(y) − softmax(z)

    so neither the entropy nor a second pass through autograd's log-softmax is recomputed,
    which the checkpointed `token_logps_and_entropy` has to do."""
    if not torch.is_grad_enabled() or not (selected.requires_grad or weight.requires_grad
                                           or (bias is not None and bias.requires_grad)):
        with torch.no_grad():
            return _LogpsEntropyValue.compute(selected, weight, bias, targets, chunk_size)
    return _LogpsEntropyValue.apply(selected, weight, bias, targets, chunk_size)


class _LogpsEntropyValue(torch.autograd.Function):
    """(log-probs with gradients, entropies without), chunk by chunk (see the public function)."""

    @staticmethod
    def compute(hidden, weight, bias, targets, chunk_size):
        logps, entropies = [], []
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                z = _chunk_logits(hidden[start:start + chunk_size], weight, bias)
                log_norm = torch.logsumexp(z, dim=-1)
                logps.append(z.gather(1, targets[start:start + chunk_size, None]).squeeze(1) - log_norm)
                entropies.append(log_norm - (torch.softmax(z, dim=-1) * z).sum(-1))
        if not logps:
            empty = hidden.new_zeros(0, dtype=torch.promote_types(hidden.dtype, torch.float32))
            return empty, empty.clone()
        return torch.cat(logps), torch.cat(entropies)

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        logps, entropies = _LogpsEntropyValue.compute(hidden, weight, bias, targets, chunk_size)
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk_size = chunk_size
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropies):
        hidden, weight, bias, targets = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        compute = torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_bias else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            w = weight.to(compute)
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                h = hidden[start:end].to(compute)
                g = grad_logps[start:end].to(compute)
                grad_z = torch.softmax(_chunk_logits(h, w, bias), dim=-1).mul_(-g[:, None])  # (C, V)
                grad_z[torch.arange(len(g), device=g.device), targets[start:end]] += g
                if need_hidden:
                    grad_hidden[start:end] = (grad_z @ w).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(grad_z.T, h)
                if need_bias:
                    grad_bias += grad_z.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None)


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """W h + b for one chunk, in at least float32."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = hidden.to(dtype) @ weight.to(dtype).T
    return logits if bias is None else logits + bias.to(dtype)


def _token_logps_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """(2, C): the chunk's target log-probs and entropies, in at least float32."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = _chunk_logits(hidden, weight, bias)  # (C, V)
        log_norm = torch.logsumexp(logits, dim=-1)
        entropy = log_norm - (logits.softmax(-1) * logits).sum(-1)
        return torch.stack([logits.gather(1, targets[:, None]).squeeze(1) - log_norm, entropy])


def _logps_at(hidden: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor,
              rest_from: int | None = None) -> Tensor:
    """log softmax(W h + b) at (C, M) token ids for one chunk (and the log-mass outside
    indices[:, rest_from:] as one more column), in at least float32."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        logits = _chunk_logits(hidden, weight, bias)  # (C, V)
        log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
        out = logits.gather(1, indices) - log_norm
        if rest_from is None:
            return out
        others = logits.scatter(1, indices[:, rest_from:], float("-inf"))
        return torch.cat([out, torch.logsumexp(others, dim=-1, keepdim=True) - log_norm], dim=1)
