"""Attention-kernel choice for rows with a 4-D mask (shared-prompt rows, `train.grouped`)."""

from __future__ import annotations

import contextlib

import torch


def masked_attention_kernels(device: torch.device):
    """On CUDA, keep attention with a 4-D mask off cuDNN's kernel.

    cuDNN builds an execution plan per input shape. Shared-prompt rows change width every
    batch, so each step paid a new plan: on an H200 (0.22B model, ~1,000-token rows) the
    step took 666 ms against 413 ms for the same data as plain rows, whose causal-only
    attention runs the flash kernel. The memory-efficient kernel takes any mask and needs no
    plan. The choice holds for the backward too (it follows the forward's kernel).
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


@contextlib.contextmanager
def training_attention_kernels(device: torch.device):
    """A training run's attention on CUDA: cuDNN's sdpa kernel off for the whole run, so that
    a layer's gradient-checkpointing recompute, which runs in the backward outside any forward's
    `masked_attention_kernels`, picks the kernel its forward picked. Otherwise the recompute of
    a masked layer took cuDNN's kernel where the forward had taken the memory-efficient one,
    and torch's checkpoint refused the differently shaped saved tensors (a reward model with
    `model.gradient_checkpointing` on an H200). cuDNN's kernel is also the one that plans per
    batch width (above). The setting is restored on exit."""
    if device.type != "cuda":
        yield
        return
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


# --------------------------------------------------------------------------- padding-free rows
#
# A batch of rows of unequal length is padded to its widest row, and every linear, norm and
# MLP of every layer runs on the padding too. Only attention needs the (row, position) layout;
# everything else in a decoder layer works token by token. So a padding-free batch hands the
# model its real tokens as one row (1, N) — input_ids, position_ids — with the attention
# layout beside it: the (B, 1, T, T) mask (or, for right-padded rows, a (B, 1, 1, T) one that
# says causal attention suffices) and `packed_slots` (N,), where each token sits in the
# flattened (B·T) grid. On CUDA, attention scatters q, k, v into that grid, runs transformers'
# sdpa attention function with the mask (one kernel call for the batch), and gathers the output
# back (`_packed`). The batch also carries `packed_blocks` (`Blocks`): where each independent
# block of tokens lies in the N. On the CPU, when the blocks average 64 tokens or more, attention
# runs block by block on views of q, k, v, with no grid and no (B, 1, T, T) mask (`_by_blocks`,
# below).
# Results equal the padded batch's (tested); the padding's share of the work is saved.

# Model types whose decoder mixes positions only inside attention, through transformers'
# attention interface, and places them by position_ids (RoPE).
PACKED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
_NAME = "posttrain_padding_free_sdpa"  # the attention implementation padding_free() installs


def _packed(original):
    """An attention-interface function: `original` on the padded grid, or block by block
    (`by_blocks`), when the model is handed `packed_slots`; else `original` itself."""

    def attention(module, query, key, value, attention_mask, packed_slots=None, packed_blocks=None, read_at=None,
                  **kwargs):
        # read_at is the last layer's (`models.readout`); the layers below see it go by
        if packed_slots is None:
            return original(module, query, key, value, attention_mask, **kwargs)
        if by_blocks(packed_blocks, query):
            return _by_blocks(original, module, query, key, value, packed_blocks, **kwargs)
        rows, width = attention_mask.shape[0], attention_mask.shape[-1]
        grid = [_to_grid(x, packed_slots, rows, width) for x in (query, key, value)]
        # a (B, 1, 1, T) mask marks right-padded rows: causal attention alone is exact for their real tokens
        mask = None if attention_mask.shape[-2] == 1 else attention_mask
        output, _ = original(module, *grid, mask, **kwargs)  # (B, T, heads, head_dim)
        return output.reshape(rows * width, *output.shape[2:]).index_select(0, packed_slots)[None], None

    return attention


def _to_grid(states: torch.Tensor, slots: torch.Tensor, rows: int, width: int) -> torch.Tensor:
    """(1, heads, N, head_dim) → (B, heads, T, head_dim), zeros where the grid has padding."""
    flat = states[0].transpose(0, 1)  # (N, heads, head_dim)
    grid = flat.new_zeros(rows * width, *flat.shape[1:]).index_copy(0, slots, flat)
    return grid.view(rows, width, *flat.shape[1:]).transpose(1, 2)


# --------------------------------------------------------------------------- attention by blocks
#
# On the CPU the grid costs more than it saves. sdpa turns the boolean (B, 1, T, T) mask into a
# float one, 4 B a cell, and keeps it for the backward, beside q, k, v scattered into the grid with
# their padding: at the cpulong benchmark's rows (8 × ~950) that was 30 + 23 MiB a layer. A
# padding-free batch's tokens fall into blocks that attend only within themselves: a plain row,
# or a shared-prompt item (its prompt, then responses that each see the prompt and their own
# earlier tokens). Attention block by block needs no grid: a block's keys and values are a view
# of the N, its prompt (or a plain row, or a prompt with a single response) is plain causal
# attention with no mask, and its responses take one call with a mask of their queries × the
# block's keys. Each call has a fixed cost, so short blocks stay on the grid, where their mask is
# small anyway: forward + backward of the cpu32k model on 16 shared-prompt items (c86cfbd), blocks
# against grid, 70 vs 58 ms at 30 tokens a block, 94 vs 84 at 46, 126 vs 132 at 64, 367 vs 394 at
# 391, 1,415 vs 1,799 at 1,215. On CUDA one masked kernel call over the grid is kept: the block
# path's many small calls have not been measured there.

BLOCK_DEVICES = frozenset({"cpu"})  # device types whose padding-free attention runs by blocks
BLOCK_MIN_TOKENS = 64  # ... when the batch's blocks hold at least this many tokens on average


class Blocks:
    """The attention blocks of a padding-free batch, in the order of its N tokens: a block
    attends within itself only; it is a causal prefix (a shared prompt, or a whole plain row)
    followed by responses, each of which sees the prefix and its own earlier tokens.
    `spans`: per block, (prefix length, response lengths...). Not a tensor, so a batch's move
    to the device leaves it as it is; masks are built on first use and kept."""

    def __init__(self, spans):
        self.spans = tuple(tuple(int(n) for n in span) for span in spans)
        self.sizes = [sum(span) for span in self.spans]
        self._masks: dict[tuple[int, str], torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"Blocks({len(self.spans)} blocks, {sum(self.sizes)} tokens)"

    def to(self, *_, **__) -> "Blocks":
        """Itself: code that moves every value of a batch (accelerate's `send_to_device`, a
        `{k: v.to(device)}`) may move this one too; its masks are made on the device of use."""
        return self

    def causal_part(self, block: int) -> int:
        """How many of the block's first tokens plain causal attention serves: all of it when it
        holds at most one response (prefix + response is one causal sequence), else the prefix
        (or, with none, the first response)."""
        span = self.spans[block]
        if len(span) <= 2:
            return self.sizes[block]
        return span[0] or span[1]  # no prefix: the first response alone

    def query_pieces(self) -> list[int]:
        """The lengths the N queries split into: per block its causal part, then its other responses."""
        pieces = []
        for block, size in enumerate(self.sizes):
            causal = self.causal_part(block)
            pieces += [] if size == 0 else [causal] if causal == size else [causal, size - causal]
        return pieces

    def visible(self, block: int, offsets: torch.Tensor) -> torch.Tensor:
        """(len(offsets), block size) bool: the keys each query at `offsets` in the block sees."""
        span = self.spans[block]
        device = offsets.device
        segment = torch.repeat_interleave(torch.arange(len(span), device=device), torch.tensor(span, device=device))
        keys = torch.arange(self.sizes[block], device=device)
        own = segment[offsets][:, None]
        return (keys[None] <= offsets[:, None]) & ((segment[None] == 0) | (segment[None] == own))

    def response_mask(self, block: int, device: torch.device) -> torch.Tensor:
        """(1, 1, responses' tokens, block size): `visible` for the queries after the causal part."""
        key = (block, str(device))
        if key not in self._masks:
            offsets = torch.arange(self.causal_part(block), self.sizes[block], device=device)
            self._masks[key] = self.visible(block, offsets)[None, None]
        return self._masks[key]


def by_blocks(blocks: Blocks | None, query: torch.Tensor) -> bool:
    """Whether attention over `query` runs block by block (else on the grid)."""
    return (blocks is not None and query.device.type in BLOCK_DEVICES
            and sum(blocks.sizes) >= BLOCK_MIN_TOKENS * len(blocks.sizes))


def _by_blocks(original, module, query, key, value, blocks: Blocks, **kwargs):
    """`original` (transformers' sdpa attention) block by block over a padding-free batch's
    q, k, v (1, heads, N, d): causal calls without a mask, and one masked call for a block's
    responses. Returns ((1, N, heads, d), None) as `original` does."""
    queries = iter(query.split(blocks.query_pieces(), dim=2))
    outputs = []
    for block, (k, v) in enumerate(zip(key.split(blocks.sizes, dim=2), value.split(blocks.sizes, dim=2))):
        size, causal = blocks.sizes[block], blocks.causal_part(block)
        if size == 0:  # a row with no real token (pack_rows)
            continue
        prefix_k, prefix_v = (k, v) if causal == size else (k[:, :, :causal], v[:, :, :causal])
        outputs.append(original(module, next(queries), prefix_k, prefix_v, None, **kwargs)[0])
        if causal < size:
            outputs.append(original(module, next(queries), k, v, blocks.response_mask(block, query.device),
                                    **kwargs)[0])
    return torch.cat(outputs, dim=1), None


def attend_at_by_blocks(attention, module, query, key, value, blocks: Blocks, read_at: torch.Tensor, **kwargs):
    """Attention of M queries (1, heads, M, d), those of the tokens `read_at` (sorted indices into
    the N), over a padding-free batch's keys and values (1, heads, N, d), block by block: one
    masked call per block that holds a query. Returns (1, M, heads, d)."""
    ends = torch.tensor(blocks.sizes).cumsum(0)
    counts = torch.bincount(torch.searchsorted(ends, read_at.cpu(), right=True), minlength=len(blocks.sizes)).tolist()
    starts = (ends - torch.tensor(blocks.sizes)).tolist()
    outputs = []
    for block, (q, at, k, v) in enumerate(zip(query.split(counts, dim=2), read_at.split(counts),
                                              key.split(blocks.sizes, dim=2), value.split(blocks.sizes, dim=2))):
        if counts[block]:
            mask = blocks.visible(block, at - starts[block])[None, None]
            outputs.append(attention(module, q, k, v, mask, **kwargs)[0])
    return torch.cat(outputs, dim=1)


def attention_window(model) -> int | None:
    """The model's sliding attention window in tokens (Mistral's `sliding_window`, Qwen2 with
    `use_sliding_window`, the local layers of Gemma 2 / 3), or None when every layer attends to
    the whole sequence. A query at position p then sees keys at positions p - window + 1 .. p."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    window = getattr(config, "sliding_window", None)
    kinds = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False or (
            kinds is not None and "sliding_attention" not in kinds):
        return None
    return int(window)


def window_allows(model, longest: int, option: str, log=None) -> bool:
    """Whether sequences of up to `longest` tokens fit the model's attention window, so that a
    layout which brings its own attention — shared-prompt rows' 4-D mask, padding-free
    attention — equals the model's own masked attention; both attend causally over the whole
    sequence and know nothing of a window. When they do not fit, `log` hears that `option` is
    off and why."""
    window = attention_window(model)
    if window is None or longest <= window:
        return True
    if log is not None:
        log(f"note: {option} is off: the model attends within a {window}-token window and sequences may hold "
            f"{longest} tokens; batches use the model's own masks")
    return False


def block_masks_allowed(model, option: str, log=None) -> bool:
    """Whether `model`'s attention reads a boolean 4-D mask as one (True = may attend):
    shared-prompt rows hand it one (`train.grouped.collate_shared_prompt`), and transformers
    passes a 4-D mask through unchanged. sdpa (and the padding-free attention built on it)
    does; eager attention adds the mask to the scores, so True / False would become +1 / +0
    and every block would see every other; flash attention drops it. Other implementations
    turn `option` off, and so do ALiBi models (`uses_alibi`): their position biases are built
    from a 2-D mask (Falcon's `build_alibi_tensor` refuses a 4-D one) and would place a second
    response after the first, not after the prompt. `log` hears why."""
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    if attention not in ("sdpa", _NAME):
        why = f"the model runs {attention} attention, which does not read a block mask"
    elif uses_alibi(config):
        why = "the model's ALiBi position biases are built from a 2-D padding mask, not a block mask"
    else:
        return True
    if log is not None:
        log(f"note: {option} is off: {why}; each response gets its own row")
    return False


def uses_alibi(config) -> bool:
    """Whether the model places tokens by ALiBi biases computed from the 2-D attention mask:
    Bloom always, Falcon-RW (`alibi`), MPT (`attn_config.alibi`)."""
    if config is None:
        return False
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return (getattr(config, "model_type", None) == "bloom" or getattr(config, "alibi", False) is True
            or getattr(getattr(config, "attn_config", None), "alibi", False) is True)


def padding_free(model, enabled: bool = True, log=None, longest: int | None = None,
                 option: str = "model.padding_free") -> bool:
    """Let `model` take padding-free batches (see above), or with enabled=False no longer;
    returns whether it now does.

    Only for PACKED_MODEL_TYPES with sdpa attention (transformers' default) and no virtual
    tokens (prefix or prompt tuning put theirs in front of every row), and only when sequences
    of up to `longest` tokens (if given) fit the model's sliding attention window, if it has one
    (`window_allows`). The model keeps working on ordinary padded batches: without
    `packed_slots` its attention is the original one. The change is the config's
    `_attn_implementation` (shared by every layer, kept by deepcopy, not saved in config.json),
    so it holds under gradient checkpointing's recompute as well. `log` hears why a model that
    was asked cannot, in a note naming `option`.
    """
    config = getattr(model, "config", None)
    if config is None:
        return False
    from posttrain.models.readout import trim_last_layer

    if not enabled or (longest is not None and not window_allows(model, longest, option, log)):
        if config._attn_implementation == _NAME:
            config._attn_implementation = "sdpa"
        trim_last_layer(model, enabled=False)
        return False
    if config._attn_implementation == _NAME:
        trim_last_layer(model)
        return True
    kind, attention = getattr(config, "model_type", None), config._attn_implementation
    if kind not in PACKED_MODEL_TYPES or attention != "sdpa" or getattr(model, "virtual_peft", None) is not None:
        if log is not None:
            why = "virtual tokens" if getattr(model, "virtual_peft", None) is not None else f"{kind}, {attention} attention"
            log(f"note: {option} does not apply to this model ({why}); batches keep their padding")
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if _NAME not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(_NAME, _packed(ALL_ATTENTION_FUNCTIONS["sdpa"]))
        AttentionMaskInterface.register(_NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # the same masks
    config._attn_implementation = _NAME
    trim_last_layer(model)  # and the last layer computed only where its output is read
    return True


def takes_padding_free(model) -> bool:
    config = getattr(model, "config", None)
    return config is not None and config._attn_implementation == _NAME


def pack_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Padded rows (B, T) with their 2-D mask (either padding side) → the inputs of a padding-free
    batch: the real tokens as one row, their positions within their own row, `packed_slots`,
    `packed_blocks` (each row one causal block) and the attention layout. Right-padded rows need
    only causal attention on the grid, which the (B, 1, 1, T) mask passed for them says (no T × T
    mask is built, and sdpa keeps its causal kernel); other rows get the causal (B, 1, T, T) mask
    over their real tokens.
    `unpack_hidden` puts the model's output back in the (B, T) grid."""
    from posttrain.data.batching import is_right_padded, real_positions

    real = attention_mask.bool()
    slots = real.flatten().nonzero().squeeze(1)
    positions = real_positions(real)
    width = real.shape[1]
    blocks = Blocks([(length,) for length in real.sum(1).tolist()])  # each row: one causal block
    if is_right_padded(real):
        mask = real[:, None, None, :]
    else:
        causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
        mask = causal & real[:, None, :]
        mask |= torch.eye(width, dtype=torch.bool, device=real.device) & ~real[:, :, None]  # padding sees itself
        mask = mask[:, None]
    return {"input_ids": input_ids.flatten()[slots][None], "position_ids": positions.flatten()[slots][None],
            "attention_mask": mask, "packed_slots": slots, "packed_blocks": blocks}


def pack_for(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict | None:
    """`pack_rows` of the batch when `model` takes padding-free batches and the rows hold padding,
    or hold none but the model computes its last layer only where it is read
    (`models.readout`; a padding-free batch is what carries those positions); None when the rows
    go as they are."""
    from posttrain.models.readout import trims_last_layer

    if attention_mask is None or not takes_padding_free(model):
        return None
    if bool(attention_mask.all()) and not trims_last_layer(model):
        return None
    return pack_rows(input_ids, attention_mask)


def unpack_hidden(hidden: torch.Tensor, packed_slots: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """(1, N, H) → (B, T, H), zeros at the padding."""
    flat = hidden[0]
    return flat.new_zeros(shape[0] * shape[1], flat.shape[-1]).index_copy(0, packed_slots, flat).view(*shape, -1)
