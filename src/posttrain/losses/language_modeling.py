"""Language-modelling losses: the fused chunked head + cross-entropy, and plain references.

The LM head's logits are the largest tensor in post-training: N tokens x V vocabulary
(e.g. 16k tokens x 128k vocab x 4 bytes = 8 GiB in float32, plus the same again for
their gradient). `chunked_linear_cross_entropy` never builds them: it walks the tokens
in chunks and, while each chunk's logits are alive, computes both the loss and the
gradients, so peak extra memory is one (chunk, V) block.

A head in another dtype than the float32 chunk (bfloat16 weights) is never upcast whole: each
chunk's logits are formed a block of the head's rows at a time, each block no larger than the
chunk's logits (`_head_logits`), so the extra memory stays O(chunk × V), not O(V × H) (a float32
copy of a Llama-3-8B head alone is 2 GiB).

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
    # The chunks of hidden, and blocks of the head, are upcast one at a time: neither bf16
    # activations nor a bf16 head are ever upcast in full.
    compute = _compute_dtype(hidden, weight)
    bias32 = None if bias is None else bias.to(compute)
    loss = torch.zeros((), dtype=compute, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
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

        logits = _head_logits(hidden_chunk, weight)  # (C, V) in the compute dtype
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
            grad_hidden[start:end] = _head_grad_input(grad_logits, weight)  # (C, H), cast to hidden dtype
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
    only in backward, so gradients cannot be formed in forward. Instead forward keeps one
    chunk's logits at a time and backward recomputes them (`_HeadLogProbs`), which costs one
    extra head matmul per chunk.
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

    Chunks of `chunk_size` rows, recomputed in backward (see `sequence_logps`)."""
    return token_logps_at(selected, weight, targets[:, None], bias, chunk_size)[:, 0]


def token_logps_at(selected: Tensor, weight: Tensor, indices: Tensor, bias: Tensor | None = None,
                   chunk_size: int = 256, rest_from: int | None = None) -> Tensor:
    """log softmax(W h + b)[v] at M tokens v per position: selected (N, H), indices (N, M) → (N, M).

    `token_logps` with several targets per position (a label and a teacher's top-k tokens, for
    distillation); chunked the same way (`_HeadLogProbs`). With `rest_from = j` one more
    column holds log Σ_{v ∉ indices[:, j:]} p_v, the mass outside those tokens, from the logits:
    logsumexp over the other tokens − logsumexp over all (precise where 1 − Σ p_v would round)."""
    return _head_log_probs(selected, weight, bias, indices, chunk_size, rest_from)[0]


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

    Chunked like `token_logps`; the entropy costs one more pass over each chunk's logits. Both
    outputs carry gradients (an entropy bonus needs them): dH/dz = −p ⊙ (z − Σ_v p_v z_v)."""
    logps, entropies = _head_log_probs(selected, weight, bias, targets[:, None], chunk_size, entropy="grad")
    return logps[:, 0], entropies


def token_logps_with_entropy_value(selected: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                                   chunk_size: int = 256) -> tuple[Tensor, Tensor]:
    """`token_logps_and_entropy` for when the entropy is only reported (GRPO, PPO without an
    entropy bonus): the log-probs carry gradients, the entropies (N,) carry none, so the
    backward does no work for them (same log-prob values and gradients)."""
    logps, entropies = _head_log_probs(selected, weight, bias, targets[:, None], chunk_size, entropy="value")
    return logps[:, 0], entropies


def _head_log_probs(hidden: Tensor, weight: Tensor, bias: Tensor | None, indices: Tensor, chunk_size: int,
                    rest_from: int | None = None, entropy: str | None = None) -> tuple[Tensor, Tensor]:
    """`_HeadLogProbs` where a gradient is wanted, its plain chunked loop (no graph) elsewhere."""
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _HeadLogProbs.apply(hidden, weight, bias, indices, chunk_size, rest_from, entropy)
    with torch.no_grad():
        return _HeadLogProbs.compute(hidden, weight, bias, indices, chunk_size, rest_from, entropy)


class _HeadLogProbs(torch.autograd.Function):
    """Log-probs of z = W h + b at token ids (N, M), the optional rest column, and the optional
    entropies (N,), a chunk of positions at a time, in at least float32 — the one rule behind
    `token_logps`, `token_logps_at`, `token_logps_and_entropy` and `token_logps_with_entropy_value`.

    Unlike the SFT loss, these log-probs are weighted by a gradient known only in backward, so
    the gradients cannot be formed in forward. Forward keeps no logits; backward recomputes each
    chunk's logits once and applies, for a column of log p_v = z_v − logsumexp(z) and the rest
    column r = logsumexp(z over v ∉ S) − logsumexp(z), with p = softmax(z), q = softmax over v ∉ S:

        d log p_v / dz = onehot(v) − p,   dr / dz = q − p,   dH / dz = −p ⊙ (z − Σ_u p_u z_u)

    and adds each chunk's head gradient into one (V, H) buffer (autograd through a checkpointed
    chunk would build a fresh (V, H) gradient per chunk). `entropy`: None (none computed, an
    empty tensor), "value" (no gradient) or "grad"."""

    @staticmethod
    def compute(hidden, weight, bias, indices, chunk_size, rest_from, entropy):
        columns, entropies = [], []
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], chunk_size):
                z = _chunk_logits(hidden[start:start + chunk_size], weight, bias)  # (C, V)
                log_norm = torch.logsumexp(z, dim=-1, keepdim=True)
                idx = indices[start:start + chunk_size]
                out = z.gather(1, idx) - log_norm
                if rest_from is not None:
                    others = z.scatter(1, idx[:, rest_from:], float("-inf"))
                    out = torch.cat([out, torch.logsumexp(others, dim=-1, keepdim=True) - log_norm], dim=1)
                columns.append(out)
                if entropy is not None:
                    entropies.append(log_norm[:, 0] - (torch.softmax(z, dim=-1) * z).sum(-1))
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        width = indices.shape[1] + (rest_from is not None)
        columns = torch.cat(columns) if columns else hidden.new_zeros(0, width, dtype=dtype)
        entropies = torch.cat(entropies) if entropies else hidden.new_zeros(0, dtype=dtype)
        return columns, entropies

    @staticmethod
    def forward(ctx, hidden, weight, bias, indices, chunk_size, rest_from, entropy):
        columns, entropies = _HeadLogProbs.compute(hidden, weight, bias, indices, chunk_size, rest_from, entropy)
        ctx.save_for_backward(hidden, weight, bias, indices)
        ctx.chunk_size, ctx.rest_from = chunk_size, rest_from
        ctx.set_materialize_grads(False)  # an output the loss does not use gets None: no work for it
        if entropy != "grad":
            ctx.mark_non_differentiable(entropies)
        return columns, entropies

    @staticmethod
    def backward(ctx, grad_columns, grad_entropies):
        hidden, weight, bias, indices = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_columns is None and grad_entropies is None:
            return None, None, None, None, None, None, None
        compute = _compute_dtype(hidden, weight)
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=compute, device=bias.device) if need_bias else None
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            for start in range(0, hidden.shape[0], ctx.chunk_size):
                end = start + ctx.chunk_size
                h = hidden[start:end].to(compute)
                grad_z = _logits_grad(
                    _chunk_logits(h, weight, bias), indices[start:end], ctx.rest_from,
                    None if grad_columns is None else grad_columns[start:end].to(compute),
                    None if grad_entropies is None else grad_entropies[start:end].to(compute))  # (C, V)
                if need_hidden:
                    grad_hidden[start:end] = _head_grad_input(grad_z, weight).to(hidden.dtype)
                if need_weight:
                    grad_weight.addmm_(grad_z.T, h)
                if need_bias:
                    grad_bias += grad_z.sum(0)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None, None)


def _logits_grad(z: Tensor, indices: Tensor, rest_from: int | None, grad_columns: Tensor | None,
                 grad_entropies: Tensor | None) -> Tensor:
    """dL/dz (C, V) for one chunk's logits z from the gradients of its log-prob columns (C, M [+ 1])
    and of its entropies (C,), either None when unused (the rules in `_HeadLogProbs`); z is consumed."""
    p = torch.softmax(z, dim=-1)
    rest = entropy = None
    if grad_columns is not None and rest_from is not None:  # q ⊙ g_rest, before z is overwritten
        others = z.scatter(1, indices[:, rest_from:], float("-inf"))
        # no other token (S holds the whole vocabulary): r = −inf, whose gradient is 0, not NaN
        rest = torch.softmax(others, dim=-1).nan_to_num_(0.0).mul_(grad_columns[:, -1:])
    if grad_entropies is not None:  # −g_H · p ⊙ (z − Σ p z), in z's buffer
        mean_z = (p * z).sum(-1, keepdim=True)
        entropy = z.sub_(mean_z).mul_(p).mul_(-grad_entropies[:, None])
    if grad_columns is None:
        return entropy
    picked = grad_columns[:, :indices.shape[1]]
    # Σ_j g_j (onehot(v_j) − p) + g_rest (q − p): every column's −p term at once
    grad_z = p.mul_(-(grad_columns.sum(1, keepdim=True) if rest_from is not None else picked.sum(1, keepdim=True)))
    grad_z.scatter_add_(1, indices, picked)
    if rest is not None:
        grad_z += rest
    if entropy is not None:
        grad_z += entropy
    return grad_z


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """At least float32 (bf16/fp16 are upcast; float64 stays float64, which gradcheck needs)."""
    return torch.promote_types(torch.promote_types(hidden.dtype, weight.dtype), torch.float32)


def _head_rows(hidden: Tensor, weight: Tensor) -> int:
    """Rows of a head in another dtype upcast at once: a block no larger than the chunk's logits."""
    return max(1, hidden.shape[0] * weight.shape[0] // max(1, weight.shape[1]))


def _head_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden (C, H) @ weight (V, H)ᵀ in hidden's dtype: (C, V). A head in another dtype (bfloat16
    weights, float32 chunks) is upcast `_head_rows` rows at a time, never whole."""
    if weight.dtype == hidden.dtype:
        return hidden @ weight.T
    rows = _head_rows(hidden, weight)
    logits = hidden.new_empty(hidden.shape[0], weight.shape[0])
    for v in range(0, weight.shape[0], rows):
        logits[:, v:v + rows] = hidden @ weight[v:v + rows].to(hidden.dtype).T
    return logits


def _head_grad_input(grad_logits: Tensor, weight: Tensor) -> Tensor:
    """grad_logits (C, V) @ weight (V, H) in grad_logits' dtype: (C, H), the head upcast as in
    `_head_logits`."""
    if weight.dtype == grad_logits.dtype:
        return grad_logits @ weight
    rows = _head_rows(grad_logits, weight)
    out = grad_logits.new_zeros(grad_logits.shape[0], weight.shape[1])
    for v in range(0, weight.shape[0], rows):
        out.addmm_(grad_logits[:, v:v + rows], weight[v:v + rows].to(grad_logits.dtype))
    return out


def _chunk_logits(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """W h + b for one chunk, in at least float32 (the head never upcast whole: `_head_logits`)."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    logits = _head_logits(hidden.to(dtype), weight)
    return logits if bias is None else logits + bias.to(dtype)
