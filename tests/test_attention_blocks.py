"""Padding-free attention block by block (`models.attention.Blocks`, the CPU's path): the blocks
say what the dense mask says, and attention by blocks gives what attention on the padded grid
gives, in float64, values and gradients, with no mask of the grid's size."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from posttrain.data.preferences import PreferenceRecord, encode_preference
from posttrain.data.templates import CHATML
from posttrain.models import attention
from posttrain.models.attention import Blocks, pack_rows, padding_free
from posttrain.models.loading import load_tokenizer
from posttrain.train.grouped import collate_shared_prompt, first_label, items_from_examples
from posttrain.train.preference import batch_logps
from tests.test_padding_free import _small_lm  # float64, two layers, grouped-query attention

ROWS = [("Smallest letter: q m t", ("m", "t")), ("Copy: a b", ("a b", "b a b a")),
        ("Reverse: x y z w", ("w z y x", "x y z w", "z")), ("Count letters: a b c", ("3",)),
        ("Say hi", ("hi there friend", "hi", "hello", "hey"))]


@pytest.fixture(autouse=True)
def blocks_of_any_length(monkeypatch):
    """The block path for these tests' short blocks too (by default a batch's blocks must hold
    `BLOCK_MIN_TOKENS` on average, below which the grid is faster)."""
    monkeypatch.setattr(attention, "BLOCK_MIN_TOKENS", 0)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def items(tokenizer):
    """One to four responses an item (a single response is a plain causal sequence)."""
    records = [PreferenceRecord(prompt=[{"role": "user", "content": p}], responses=list(r), ranks=list(range(len(r))),
                                source=f"t:{i}") for i, (p, r) in enumerate(ROWS)]
    return items_from_examples([encode_preference(rec, tokenizer, CHATML) for rec in records])


def _packed_mask(batch) -> torch.Tensor:
    """The (N, N) mask among a padding-free batch's real tokens that its dense 4-D mask says."""
    mask, slots = batch["attention_mask"], batch["packed_slots"]
    width = mask.shape[-1]
    row, col = slots // width, slots % width
    if mask.shape[-2] == 1:  # right-padded plain rows: causal within a row
        return (row[:, None] == row[None]) & (col[None] <= col[:, None])
    return (row[:, None] == row[None]) & mask[row[:, None], 0, col[:, None], col[None]]


def _blocks_mask(blocks: Blocks) -> torch.Tensor:
    """The same (N, N) mask from the blocks alone: block-diagonal, each block's `visible`."""
    n = sum(blocks.sizes)
    out = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for block, size in enumerate(blocks.sizes):
        out[start:start + size, start:start + size] = blocks.visible(block, torch.arange(size))
        start += size
    return out


@pytest.mark.parametrize("row_width", [0, 40, 1000], ids=["row_per_item", "some_share_a_row", "one_row"])
def test_the_blocks_say_what_the_dense_mask_says(tokenizer, items, row_width):
    batch = collate_shared_prompt(items, tokenizer.pad_token_id, row_width, padding_free=True)
    blocks = batch["packed_blocks"]
    cuts = [first_label(item.sequences[0]) for item in items]  # each item's prompt length
    spans = [(cut, *[len(s) - cut for s in item.sequences]) for item, cut in zip(items, cuts)]
    assert sorted(blocks.spans) == sorted(spans)
    assert sum(blocks.sizes) == batch["input_ids"].shape[1] == sum(blocks.query_pieces())
    assert torch.equal(_blocks_mask(blocks), _packed_mask(batch))


@pytest.mark.parametrize("side", ["right", "left"])
def test_plain_rows_are_one_causal_block_each_an_empty_row_none(side):
    ids = torch.arange(24).view(3, 8)
    mask = torch.ones(3, 8, dtype=torch.long)
    for row, length in enumerate((8, 0, 3)):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : 8 - length] = 0
    packed = pack_rows(ids, mask)
    blocks = packed["packed_blocks"]
    assert blocks.spans == ((8,), (0,), (3,)) and blocks.query_pieces() == [8, 3]
    assert torch.equal(_blocks_mask(blocks), _packed_mask(packed))


def _logps_and_grads(model, batch):
    model.zero_grad()
    logps, _ = batch_logps(model, batch, chunk_size=7)
    (logps * torch.linspace(1, 2, len(logps), dtype=logps.dtype)).sum().backward()
    return logps.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("row_width", [0, 1000], ids=["row_per_item", "one_row"])
@pytest.mark.parametrize("trimmed", [True, False], ids=["last_layer_read_at", "whole_last_layer"])
def test_attention_by_blocks_equals_attention_on_the_grid(tokenizer, items, kind, row_width, trimmed, monkeypatch):
    """Log-probs and every gradient, with grouped-query attention, K = 1..4 responses, blocks
    alone or sharing rows, the last layer read at the predictors or computed whole."""
    from posttrain.models.readout import trim_last_layer

    model = _small_lm(kind, len(tokenizer))
    assert padding_free(model)
    trim_last_layer(model, enabled=trimmed)
    batch = collate_shared_prompt(items, tokenizer.pad_token_id, row_width, padding_free=True)
    by_blocks = _logps_and_grads(model, batch)
    monkeypatch.setattr(attention, "BLOCK_DEVICES", frozenset())
    on_grid = _logps_and_grads(model, batch)
    assert torch.allclose(by_blocks[0], on_grid[0], rtol=0, atol=1e-12)
    for a, b in zip(by_blocks[1], on_grid[1]):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_no_attention_call_gets_a_mask_of_the_grid(tokenizer, items, monkeypatch):
    """The CPU path's point: sdpa sees masks of a block's responses × its keys at most, never the
    (rows, 1, width, width) one, and no call runs on the padded grid."""
    model = _small_lm("llama", len(tokenizer))
    assert padding_free(model)
    batch = collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True)
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        seen.append((query.shape[0], key.shape[2], None if attn_mask is None else tuple(attn_mask.shape)))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    batch_logps(model, batch)[0].sum().backward()
    longest = max(batch["packed_blocks"].sizes)
    assert seen and all(rows == 1 and keys <= longest for rows, keys, _ in seen)
    masks = [shape for _, _, shape in seen if shape is not None]
    assert masks and all(shape[:2] == (1, 1) and shape[-1] <= longest for shape in masks)
    # below the (trimmed) last layer every block's prompt, or a whole item with one response,
    # is a causal call with no mask
    assert sum(shape is None for _, _, shape in seen) == len(batch["packed_blocks"].sizes)


def test_blocks_travel_with_a_batch_unchanged():
    blocks = Blocks([(3, 2, 2), (4,)])
    assert blocks.to("cpu") is blocks and blocks.to(torch.float64) is blocks
    for copied in (copy.deepcopy(blocks), pickle.loads(pickle.dumps(blocks))):
        assert copied.spans == blocks.spans and copied.query_pieces() == blocks.query_pieces() == [3, 4, 4]
    mask = blocks.response_mask(0, torch.device("cpu"))
    assert mask is blocks.response_mask(0, torch.device("cpu"))  # built once, kept for every layer
    assert mask[0, 0].tolist() == [[True, True, True, True, False, False, False],
                                   [True, True, True, True, True, False, False],
                                   [True, True, True, False, False, True, False],
                                   [True, True, True, False, False, True, True]]


def test_short_blocks_stay_on_the_grid(tokenizer, items, monkeypatch):
    """Below `BLOCK_MIN_TOKENS` a block on average, one call over the grid is faster than a call
    per block (measured in models/attention.py): the batch takes the grid, one sdpa call a layer."""
    batch = collate_shared_prompt(items, tokenizer.pad_token_id, padding_free=True)
    blocks, query = batch["packed_blocks"], torch.zeros(1)
    mean = sum(blocks.sizes) / len(blocks.sizes)
    assert mean < 64  # these items are short
    for threshold, expected in ((int(mean), True), (int(mean) + 1, False), (64, False)):  # 64: the default
        monkeypatch.setattr(attention, "BLOCK_MIN_TOKENS", threshold)
        assert attention.by_blocks(blocks, query) is expected
        assert attention.by_blocks(blocks, torch.zeros(1, device="meta")) is False  # not a block device
    assert attention.by_blocks(None, query) is False
    model = _small_lm("llama", len(tokenizer))
    assert padding_free(model)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(a[0].shape) or sdpa(*a, **k))
    with torch.no_grad():
        batch_logps(model, batch)
    assert len(calls) == model.config.num_hidden_layers and all(shape[0] == batch["attention_mask"].shape[0]
                                                               for shape in calls)
