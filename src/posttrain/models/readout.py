"""The last decoder layer, computed only where its output is read.

A loss reads the final hidden states at a few positions: a reward model at each response's
last token, DPO and online RL at the tokens that predict a trained token. Every layer below the
last runs on every token, since the last layer's keys and values come from all of them. But the
last layer's query projection, attention output, output projection and MLP matter only at the
positions read. A padding-free batch (`models.attention`) can therefore ask the model for those
positions alone: `read_at` (M,), sorted indices into the batch's N tokens. The last layer then
computes keys and values for all N tokens and the rest for the M read, and the model returns
(1, M, H).

The saving is (1 − M/N) of one layer's query / output projections and MLP: a large share of a
4-layer model's work, a few percent of a 32-layer one's. The result equals the full layer's
at those positions (tested to 1e-12 in float64).

`padding_free` installs it (`trim_last_layer`) on the same model types; consumers go through
`reading`, which falls back to reading the full output where the model does not trim.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable

import torch

# Decoder layers of these modules compute, formula for formula, what `_layer_at` does.
_LAYER_MODULES = frozenset(f"transformers.models.{kind}.modeling_{kind}" for kind in ("llama", "mistral", "qwen2", "qwen3"))


def _decoder_layers(model) -> torch.nn.ModuleList | None:
    """The decoder's layer list (the first `layers` ModuleList met from the top)."""
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers):
            return layers
    return None


def trim_last_layer(model, enabled: bool = True) -> bool:
    """Give the model's last decoder layer the `read_at` forward (or, enabled=False, take it
    away); returns whether the model now trims. Only for Llama, Mistral, Qwen2 and Qwen3 layers
    whose forward has not been replaced already (an accelerate hook, say)."""
    layers = _decoder_layers(model)
    if layers is None:
        return False
    layer = layers[-1]
    installed = _installed(layer)
    if not enabled:
        if installed:
            del layer.forward
        return False
    if installed:
        return True
    if type(layer).__module__ not in _LAYER_MODULES or "forward" in layer.__dict__:
        return False
    # bound with a partial, not a bound method: deepcopy and pickle both rebind it to the copy
    # (a pickled bound method is looked up by name on the layer, which has no `_forward`)
    layer.forward = functools.partial(_forward, layer)
    return True


def _installed(layer) -> bool:
    forward = layer.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _forward


def trims_last_layer(model) -> bool:
    layers = _decoder_layers(model)
    return layers is not None and _installed(layers[-1])


def reading(model, inputs: dict, at: torch.Tensor) -> tuple[dict, Callable[[torch.Tensor], torch.Tensor]]:
    """(inputs, pick) to read the final hidden states at flat positions `at` (any order, repeats
    allowed) of the batch `inputs`: pick(the model's last hidden states) → (len(at), H). A
    padding-free batch for a model that trims asks for those positions only (`read_at`); with no
    positions at all, the whole last layer runs and none of it is read."""
    if "packed_slots" not in inputs or not at.numel() or not trims_last_layer(model):
        return inputs, lambda hidden: hidden.flatten(0, 1)[at]
    unique, inverse = torch.unique(at, return_inverse=True)
    return {**inputs, "read_at": unique}, lambda hidden: hidden[0][inverse]


def _forward(self, hidden_states, *args, read_at=None, **kwargs):
    """The layer's own forward, or with `read_at` its output at those tokens only. Under gradient
    checkpointing (transformers puts it on the class's forward, which `_layer_at` bypasses) the
    trimmed layer is checkpointed as the whole one would be: its input kept, the rest recomputed."""
    if read_at is None:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    if getattr(self, "gradient_checkpointing", False) and self.training and torch.is_grad_enabled():
        return self._gradient_checkpointing_func(functools.partial(_layer_at, self, read_at=read_at, **kwargs),
                                                 hidden_states)
    return _layer_at(self, hidden_states, read_at, **kwargs)


def _layer_at(layer, hidden_states, read_at, attention_mask, position_embeddings, packed_slots, packed_blocks=None,
              **_):
    """A pre-norm decoder layer (RMSNorm, attention with RoPE, optional q/k norms, MLP) of a
    padding-free batch (1, N, H), computed at tokens `read_at` (M,) only: (1, M, H)."""
    attn = layer.self_attn
    residual = hidden_states[:, read_at]
    normed = layer.input_layernorm(hidden_states)
    def heads(states):  # (1, L, heads · d) → (1, L, heads, d)
        return states.view(*states.shape[:-1], -1, attn.head_dim)

    query = heads(attn.q_proj(normed[:, read_at]))
    key = heads(attn.k_proj(normed))
    value = heads(attn.v_proj(normed)).transpose(1, 2)
    if hasattr(attn, "q_norm"):  # Qwen3
        query, key = attn.q_norm(query), attn.k_norm(key)
    query, key = query.transpose(1, 2), key.transpose(1, 2)
    rotary = sys.modules[type(attn).__module__].apply_rotary_pos_emb
    cos, sin = position_embeddings
    query, _ = rotary(query, query, cos[:, read_at], sin[:, read_at])
    _, key = rotary(key, key, cos, sin)
    output = _attention_at(attn, query, key, value, attention_mask, packed_slots, packed_blocks, read_at)
    hidden = residual + attn.o_proj(output)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _attention_at(attn, query, key, value, attention_mask, packed_slots, packed_blocks, read_at):
    """Attention of M queries (1, heads, M, d) over the N keys and values of a padding-free
    batch, as `models.attention` does it: block by block where it does (on the CPU), else on the
    padded grid: keys and values in their (B, T) slots, the queries in (B, Q) slots (Q: the most
    read in a row), each query's mask row that of its token. Returns (1, M, heads·d)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from posttrain.models.attention import _to_grid, attend_at_by_blocks, by_blocks

    dropout = attn.attention_dropout if attn.training else 0.0
    if by_blocks(packed_blocks, query):
        output = attend_at_by_blocks(ALL_ATTENTION_FUNCTIONS["sdpa"], attn, query, key, value, packed_blocks, read_at,
                                     dropout=dropout, scaling=attn.scaling)  # (1, M, heads, d)
        return output.reshape(1, len(read_at), -1)
    rows, width = attention_mask.shape[0], attention_mask.shape[-1]
    slots = packed_slots[read_at]  # increasing: read_at is sorted, packed_slots too
    row, col = slots // width, slots % width
    per_row = torch.bincount(row, minlength=rows)
    queries = int(per_row.max())
    first = per_row.cumsum(0) - per_row
    query_slots = row * queries + torch.arange(len(slots), device=slots.device) - first[row]
    if attention_mask.shape[-2] == 1:  # right-padded rows: causal attention is exact
        visible = torch.arange(width, device=slots.device)[None] <= col[:, None]
    else:
        visible = attention_mask[row, 0, col]
    mask = torch.zeros(rows * queries, width, dtype=torch.bool, device=slots.device)
    mask[:, 0] = True  # grid slots without a query see one key, so no softmax row is empty
    mask = mask.index_copy(0, query_slots, visible).view(rows, 1, queries, width)
    grid_query = _to_grid(query, query_slots, rows, queries)
    grid_key, grid_value = (_to_grid(x, packed_slots, rows, width) for x in (key, value))
    output, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](
        attn, grid_query, grid_key, grid_value, mask, dropout=dropout, scaling=attn.scaling)  # (B, Q, heads, d)
    return output.reshape(rows * queries, -1).index_select(0, query_slots)[None]
