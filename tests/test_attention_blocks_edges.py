"""Adversarial edges of padding-free attention block by block (`models.attention.Blocks`, the
CPU's path): each compared in float64, values and gradients, with an independent reference: the
same weights in a model that was never switched, fed every sequence alone (no padding, no
mask) or the padded batch, and with the grid path (`BLOCK_DEVICES` emptied)."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch

from posttrain.data.records import Example
from posttrain.models import attention
from posttrain.models.attention import (
    Blocks,
    _by_blocks,
    attend_at_by_blocks,
    pack_rows,
    padding_free,
)
from posttrain.train.grouped import Item, collate_items, collate_shared_prompt
from posttrain.train.preference import batch_logps, policy_logps

VOCAB, PAD = 64, 0

# (prompt, responses): a 1-token prompt, six responses, identical responses, 1-token responses,
# a single 1-token response (a plain causal block), a long response next to a 1-token one
EDGE_ITEMS = [
    ([5], [[7, 8, 9], [10, 11]]),
    ([3, 4, 5, 6], [[12], [13, 14], [15, 16, 17], [18], [19, 20, 21, 22], [23, 24]]),
    ([9, 9, 8], [[30, 31], [30, 31], [30, 31]]),
    ([2, 3, 4, 5, 6, 7, 8], [[40], [41]]),
    ([1, 2], [[50]]),
    ([6, 7, 8, 9, 10], [[1, 2, 3, 4, 5, 6, 7, 8], [9]]),
]


@pytest.fixture(autouse=True)
def blocks_of_any_length(monkeypatch):
    """The block path for these tests' short blocks too (by default a batch's blocks must hold
    `BLOCK_MIN_TOKENS` on average, below which the grid is faster)."""
    monkeypatch.setattr(attention, "BLOCK_MIN_TOKENS", 0)


def _items(rows=EDGE_ITEMS) -> list[Item]:
    items = []
    for prompt, responses in rows:
        sequences = [Example(prompt + r, [-100] * len(prompt) + r) for r in responses]
        items.append(Item(sequences, ranks=list(range(len(responses)))))
    return items


def _lm(kind: str = "llama", layers: int = 2, **config):
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": layers,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    if kind == "qwen3":
        settings["head_dim"] = 8
    settings.update(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(kind, **settings), attn_implementation="sdpa").double()


def _grads(model):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters() if p.requires_grad]


def _weights(n, dtype=torch.float64):
    return torch.linspace(1, 2, n, dtype=dtype)


def _alone(model, items):
    """Each sequence alone through a model that was never switched: (logps (S,), grads of Σ w·logps)."""
    model.zero_grad()
    sequences = [s for item in items for s in item.sequences]
    weights = _weights(len(sequences))
    logps = []
    for w, seq in zip(weights, sequences):
        lp, _ = policy_logps(model, torch.tensor([seq.input_ids]), torch.tensor([seq.labels]), None, chunk_size=5)
        if lp.requires_grad:
            (w * lp[0]).backward()
        logps.append(lp[0].detach())
    return torch.stack(logps), _grads(model)


def _packed_run(model, batch):
    model.zero_grad()
    logps, _ = batch_logps(model, batch, chunk_size=5)
    (logps * _weights(len(logps), logps.dtype)).sum().backward()
    return logps.detach(), _grads(model)


def _close_alone(got, want, atol=1e-11):
    """Against each sequence alone: values to rounding; gradients to float32's rounding, as the
    models' RMSNorm runs in float32 and a shared prompt sums its responses' gradients before
    that norm's backward, where the sequences alone sum them after it (a relative norm error of
    ~1e-7; a wrong mask or a wrong block gives errors of order 1)."""
    assert torch.allclose(got[0], want[0], rtol=0, atol=atol), (got[0], want[0])
    assert len(got[1]) == len(want[1])
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert float((a - b).norm()) <= 1e-6 * float(b.norm()) + 1e-12, (i, float((a - b).norm() / b.norm()))


def _close(got, want, atol=1e-11, grad_rtol=1e-9, grad_atol=1e-12):
    assert torch.allclose(got[0], want[0], rtol=0, atol=atol), (got[0], want[0])
    assert len(got[1]) == len(want[1])
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert torch.allclose(a, b, rtol=grad_rtol, atol=grad_atol), (i, (a - b).abs().max())


class _Spy:
    """Counts calls of the block path and of the grid path."""

    def __init__(self, monkeypatch):
        self.blocks = self.at_blocks = self.grid = 0
        by_blocks, at_blocks, to_grid = attention._by_blocks, attention.attend_at_by_blocks, attention._to_grid

        def spy_blocks(*a, **k):
            self.blocks += 1
            return by_blocks(*a, **k)

        def spy_at(*a, **k):
            self.at_blocks += 1
            return at_blocks(*a, **k)

        def spy_grid(*a, **k):
            self.grid += 1
            return to_grid(*a, **k)

        monkeypatch.setattr(attention, "_by_blocks", spy_blocks)
        monkeypatch.setattr(attention, "attend_at_by_blocks", spy_at)
        monkeypatch.setattr(attention, "_to_grid", spy_grid)


def _grid(monkeypatch):
    monkeypatch.setattr(attention, "BLOCK_DEVICES", frozenset())


# --------------------------------------------------------------------------- Blocks alone


def _dense(blocks: Blocks) -> torch.Tensor:
    """(N, N) mask from first principles: within a block, key ≤ query and the key in the prefix
    or in the query's own response."""
    n = sum(blocks.sizes)
    out = torch.zeros(n, n, dtype=torch.bool)
    start = 0
    for span in blocks.spans:
        segment = [k for k, length in enumerate(span) for _ in range(length)]
        for i in range(len(segment)):
            for j in range(i + 1):
                out[start + i, start + j] = segment[j] == 0 or segment[j] == segment[i]
        start += sum(span)
    return out


def test_blocks_visible_at_any_offsets_and_query_pieces_with_empty_blocks():
    blocks = Blocks([(0,), (3, 1, 2, 2), (0,), (1,), (2, 5), (1, 1, 1, 1, 1, 1, 1), (0,)])
    assert blocks.sizes == [0, 8, 0, 1, 7, 7, 0]
    assert blocks.query_pieces() == [3, 5, 1, 7, 1, 6]
    dense, start = _dense(blocks), 0
    torch.manual_seed(3)
    for b, size in enumerate(blocks.sizes):
        offsets = torch.randint(0, max(size, 1), (11,)) if size else torch.zeros(0, dtype=torch.long)
        got = blocks.visible(b, offsets)
        assert got.shape == (len(offsets), size) and got.dtype == torch.bool
        assert torch.equal(got, dense[start + offsets][:, start:start + size])
        if blocks.causal_part(b) < size:
            mask = blocks.response_mask(b, torch.device("cpu"))
            assert torch.equal(mask[0, 0], dense[start + blocks.causal_part(b):start + size, start:start + size])
        else:  # the causal part is plain causal attention
            part = dense[start:start + size, start:start + size]
            assert torch.equal(part, torch.ones(size, size, dtype=torch.bool).tril())
        start += size


def test_blocks_mask_cache_is_per_device_and_survives_pickling_and_inference_mode():
    blocks = Blocks([(2, 2, 3), (1, 1, 1, 1)])
    with torch.inference_mode():  # a first use under inference mode must not poison later autograd use
        first = blocks.response_mask(0, torch.device("cpu"))
    other = blocks.response_mask(1, torch.device("cpu"))  # a mask per block, not one for all
    assert first.shape == (1, 1, 5, 7) and other.shape == (1, 1, 3, 4)
    assert set(blocks._masks) == {(0, "cpu"), (1, "cpu")} and blocks.response_mask(0, "cpu") is first
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = _qkv(11)
    out, _ = _by_blocks(sdpa_attention_forward, module, q, k, v, blocks, dropout=0.0, scaling=None)
    want, _ = sdpa_attention_forward(module, q, k, v, _dense(blocks)[None, None], dropout=0.0)
    assert torch.allclose(out, want, rtol=0, atol=1e-13)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    for copied in (pickle.loads(pickle.dumps(blocks)), copy.deepcopy(blocks)):
        assert copied.spans == blocks.spans and copied.query_pieces() == blocks.query_pieces()
        assert torch.equal(copied.response_mask(0, torch.device("cpu")), blocks.response_mask(0, torch.device("cpu")))


def _qkv(n, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    return [torch.randn(1, h, n, 8, dtype=dtype, requires_grad=True) for h in (4, 2, 2)]


_FUZZ_SPANS = [
    [(3,), (0,), (2, 1, 1)],
    [(1, 1, 1, 1)],
    [(0,), (4, 2, 2), (0,)],
    [(1,)],
    [(1,), (1,), (1, 1, 1)],
    [(5, 1, 1, 1, 1, 1, 1), (2, 9), (7,), (0,), (1, 3)],
    [(4, 0, 2)],  # an empty response between two
]


@pytest.mark.parametrize("spans", _FUZZ_SPANS, ids=[str(i) for i in range(len(_FUZZ_SPANS))])
def test_by_blocks_and_attend_at_by_blocks_equal_one_dense_masked_call(spans):
    """Attention block by block, and at any sorted subset of queries, against one sdpa call with
    the (N, N) mask built from first principles (grouped-query attention), values and gradients."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = Blocks(spans)
    n = sum(blocks.sizes)
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    q, k, v = _qkv(n)
    cotangent = torch.randn(1, n, 4, 8, dtype=torch.float64)
    got, _ = _by_blocks(sdpa_attention_forward, module, q, k, v, blocks, dropout=0.0, scaling=0.3)
    want, _ = sdpa_attention_forward(module, q, k, v, _dense(blocks)[None, None], dropout=0.0, scaling=0.3)
    assert got.shape == want.shape == (1, n, 4, 8)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)
    g = torch.autograd.grad((got * cotangent).sum(), (q, k, v))
    w = torch.autograd.grad((want * cotangent).sum(), (q, k, v), retain_graph=True)
    for a, b in zip(g, w):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    # at a sorted subset: each block's first and last token, the last block left out when there are several
    filled = [b for b, size in enumerate(blocks.sizes) if size]
    at = sorted({i for b in (filled[:-1] if len(filled) > 1 else filled)
                 for i in (sum(blocks.sizes[:b]), sum(blocks.sizes[:b]) + blocks.sizes[b] - 1)})
    read_at = torch.tensor(at, dtype=torch.long)
    got_at = attend_at_by_blocks(sdpa_attention_forward, module, q[:, :, read_at], k, v, blocks, read_at,
                                 dropout=0.0, scaling=0.3)
    assert torch.allclose(got_at, want[:, read_at], rtol=0, atol=1e-13)
    g = torch.autograd.grad(got_at.sum(), (q, k, v))
    w = torch.autograd.grad(want[:, read_at].sum(), (q, k, v))
    for a, b in zip(g, w):
        assert torch.allclose(a, b, rtol=0, atol=1e-12)


def test_a_block_with_an_empty_prefix_and_several_responses():
    """Its first response is the causal part (a review found a 0-query call here)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    blocks = Blocks([(2,), (0, 2, 3)])
    module = types.SimpleNamespace(num_key_value_groups=2, is_causal=True)
    q, k, v = _qkv(7)
    want, _ = sdpa_attention_forward(module, q, k, v, _dense(blocks)[None, None], dropout=0.0)
    got, _ = _by_blocks(sdpa_attention_forward, module, q, k, v, blocks, dropout=0.0)
    assert torch.allclose(got, want, rtol=0, atol=1e-13)


# --------------------------------------------------------------------------- shared-prompt items


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("row_width", [0, 14, 1000], ids=["row_per_item", "some_share_a_row", "one_row"])
def test_edge_items_equal_each_sequence_alone(kind, row_width, monkeypatch):
    """1-token prompt, 6 responses, identical responses, 1-token responses, K = 1: log-probs and
    every gradient by blocks equal each sequence alone through a model never switched, and the
    grid's; the blocks lie in the N in an order other than the items'."""
    reference = _lm(kind)
    model = copy.deepcopy(reference)
    items = _items()
    want = _alone(reference, items)
    padded = _packed_run(reference, collate_shared_prompt(items, PAD, row_width))  # the padded layout, never switched
    assert padding_free(model)
    batch = collate_shared_prompt(items, PAD, row_width, padding_free=True)
    spans = [(len(p), *map(len, r)) for p, r in EDGE_ITEMS]
    assert list(batch["packed_blocks"].spans) != spans and sorted(batch["packed_blocks"].spans) == sorted(spans)
    spy = _Spy(monkeypatch)
    got = _packed_run(model, batch)
    assert spy.blocks and spy.at_blocks and not spy.grid
    _close_alone(got, want)
    _close(got, padded)
    _grid(monkeypatch)
    on_grid = _packed_run(model, batch)
    assert spy.grid
    _close(got, on_grid, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-13)


def test_items_whose_blocks_interleave_rows_equal_the_padded_batch(monkeypatch):
    """Many small items with row_width so blocks of different items share rows in an order
    unrelated to the items'; against the padded shared-prompt batch of a model never switched."""
    rows = [([i + 1] * (1 + i % 3), [[10 + i] * (1 + (i * 5) % 4), [20 + i]] + ([[30 + i, 31]] if i % 2 else []))
            for i in range(9)]
    items = _items(rows)
    reference = _lm("qwen2")
    model = copy.deepcopy(reference)
    want = _packed_run(reference, collate_shared_prompt(items, PAD, 11))
    assert padding_free(model)
    batch = collate_shared_prompt(items, PAD, 11, padding_free=True)
    assert batch["attention_mask"].shape[0] < len(items)  # several blocks a row
    _close(_packed_run(model, batch), want)


# --------------------------------------------------------------------------- plain rows


def _rows_with(lengths, side, width=8, seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), width))
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for r, length in enumerate(lengths):
        if side == "right":
            mask[r, :length] = 1
        else:
            mask[r, width - length:] = 1
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :2] = -100  # a short "prompt" where a row is long enough
    return ids, labels, mask


_LAYOUTS = {"empty_first": [0, 5, 1, 8], "empty_middle": [6, 0, 1, 8, 3], "empty_last": [8, 1, 4, 0],
            "single_token_rows": [1, 1, 8, 1], "all_full": [8, 8]}


@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_policy_logps_on_edge_plain_rows_equal_each_row_alone(side, layout, monkeypatch):
    reference = _lm("llama")
    model = copy.deepcopy(reference)
    ids, labels, mask = _rows_with(_LAYOUTS[layout], side)

    def alone():
        reference.zero_grad()
        weights, out = _weights(len(ids)), []
        for r in range(len(ids)):
            keep = mask[r].bool()
            if not keep.any():
                out.append(torch.zeros((), dtype=torch.float64))
                continue
            lp, _ = policy_logps(reference, ids[r][keep][None], labels[r][keep][None], None)
            if lp.requires_grad:
                (weights[r] * lp[0]).backward()
            out.append(lp[0].detach())
        return torch.stack(out), _grads(reference)

    def run():
        model.zero_grad()
        lp, _ = policy_logps(model, ids, labels, mask, chunk_size=5)
        (lp * _weights(len(lp))).sum().backward()
        return lp.detach(), _grads(model)

    want = alone()
    assert padding_free(model)
    spy = _Spy(monkeypatch)
    got = run()
    assert spy.blocks and not spy.grid
    _close(got, want)
    _grid(monkeypatch)
    _close(run(), got, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-13)


@pytest.mark.parametrize("trimmed", [False, True], ids=["whole_last_layer", "last_layer_read_at"])
def test_random_plain_layouts_with_holes_and_empty_rows_equal_the_padded_batch(trimmed, monkeypatch):
    """`pack_rows` of random 2-D masks (padding anywhere, a row with no token), hidden states at
    every real token (or at a random half of them, read by the trimmed last layer) and gradients
    against the padded batch of a model never switched, and against the grid."""
    from posttrain.data.batching import padded_inputs
    from posttrain.models.readout import reading, trim_last_layer

    reference = _lm("qwen2")
    model = copy.deepcopy(reference)
    assert padding_free(model)
    trim_last_layer(model, enabled=trimmed)
    generator = torch.Generator().manual_seed(0)
    for trial in range(4):
        mask = (torch.rand(4, 9, generator=generator) < 0.7).long()
        mask[trial % 4] = 0
        ids = torch.randint(1, VOCAB, (4, 9), generator=generator)
        packed = pack_rows(ids, mask)
        slots = packed["packed_slots"]
        at = torch.randperm(len(slots), generator=generator)[: len(slots) // 2] if trimmed else torch.arange(len(slots))
        cotangent = torch.randn(len(at), 32, generator=generator, dtype=torch.float64)
        reference.zero_grad()
        hidden = reference.model(**padded_inputs(ids, mask)).last_hidden_state.flatten(0, 1)[slots[at]]
        (hidden * cotangent).sum().backward()
        want = hidden.detach(), _grads(reference)
        results = []
        for grid in (False, True):
            monkeypatch.setattr(attention, "BLOCK_DEVICES", frozenset() if grid else frozenset({"cpu"}))
            model.zero_grad()
            sent, pick = reading(model, packed, at)
            assert ("read_at" in sent) == trimmed
            got = pick(model.model(**sent, use_cache=False).last_hidden_state)
            (got * cotangent).sum().backward()
            results.append((got.detach(), _grads(model)))
        _close(results[0], want, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-12)
        _close(results[0], results[1], atol=1e-12, grad_rtol=1e-10, grad_atol=1e-13)


def test_reward_score_on_rows_without_an_empty_row_equals_each_row_alone():
    """`models.reward_model.score`, padding-free by blocks: each row scores as it does alone."""
    from posttrain.models.reward_model import load_reward_model, score

    torch.manual_seed(0)
    reference = load_reward_model("tiny", pad_token_id=PAD).double()
    model = copy.deepcopy(reference)
    lengths = [5, 1, 8, 2]
    ids, _, mask = _rows_with(lengths, "left")
    want = [score(reference, ids[r][mask[r].bool()][None], torch.ones(1, lengths[r], dtype=torch.long))
            for r in range(len(ids))]
    assert padding_free(model)
    assert torch.allclose(score(model, ids, mask), torch.cat(want), rtol=0, atol=1e-6)


@pytest.mark.parametrize("empty", ["first", "middle", "last"])
@pytest.mark.parametrize("layout", ["padding_free", "padded"])
def test_reward_score_refuses_a_row_with_no_token(empty, layout):
    """An empty row has no last token: scoring it read padding (padded), another row's score
    (padding-free, empty row first or in the middle) or past the end (last); a review found it."""
    from posttrain.models.reward_model import load_reward_model, score

    model = load_reward_model("tiny", pad_token_id=PAD).double()
    if layout == "padding_free":
        assert padding_free(model)
    lengths = {"first": [0, 5, 1, 8], "middle": [5, 0, 8, 1], "last": [5, 1, 8, 0]}[empty]
    ids, _, mask = _rows_with(lengths, "left")
    with pytest.raises(ValueError, match="no real token"):
        score(model, ids, mask)


# --------------------------------------------------------------------------- the trimmed last layer


def _padded_hidden(model, batch, flat):
    """Final hidden states of a padded shared-prompt batch at flat (B·T) positions."""
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], use_cache=False).last_hidden_state.flatten(0, 1)[flat]


@pytest.mark.parametrize("case", ["prompts_and_boundaries", "one_block_unread", "one_position"])
def test_readout_at_edge_positions_equals_the_padded_batch(case, monkeypatch):
    """`reading` on a shared-prompt batch with several blocks a row: positions in prompts and
    responses, each block's first and last token, repeated, out of order, a block never read."""
    from posttrain.models.readout import reading, trims_last_layer

    items = _items()
    reference = _lm("qwen3")
    model = copy.deepcopy(reference)
    padded = collate_shared_prompt(items, PAD, 1000)
    packed = collate_shared_prompt(items, PAD, 1000, padding_free=True)
    blocks, slots = packed["packed_blocks"], packed["packed_slots"]
    starts = torch.tensor([0, *blocks.sizes]).cumsum(0)
    if case == "prompts_and_boundaries":
        count = len(blocks.sizes)
        at = [int(starts[b]) for b in range(count)] + [int(starts[b + 1]) - 1 for b in range(count)]
        at += [int(starts[b]) + blocks.spans[b][0] - 1 for b in range(count)]  # each prompt's last token
        at += [at[3], at[0], 2]
    elif case == "one_block_unread":
        at = [i for i in range(int(starts[-1])) if not int(starts[2]) <= i < int(starts[3])][::-1]
    else:
        at = [int(starts[4]) + 1]
    at = torch.tensor(at)
    torch.manual_seed(5)
    weights = torch.randn(len(at), 32, dtype=torch.float64)

    reference.zero_grad()
    want = _padded_hidden(reference, padded, slots[at])
    (want * weights).sum().backward()
    want_grads = _grads(reference)

    assert padding_free(model) and trims_last_layer(model)
    spy = _Spy(monkeypatch)

    def run():
        model.zero_grad()
        inputs = {k: packed[k] for k in ("input_ids", "attention_mask", "position_ids", "packed_slots",
                                         "packed_blocks")}
        sent, pick = reading(model, inputs, at)
        assert "read_at" in sent
        hidden = pick(model.model(**sent, use_cache=False).last_hidden_state)
        (hidden * weights).sum().backward()
        return hidden.detach(), _grads(model)

    got = run()
    assert spy.at_blocks == 1 and not spy.grid
    _close((got[0], got[1]), (want.detach(), want_grads))
    _grid(monkeypatch)
    _close(run(), got, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-13)


# --------------------------------------------------------------------------- training settings


def test_attention_dropout_in_eval_equals_the_grid_and_each_sequence_alone(monkeypatch):
    reference = _lm("llama", attention_dropout=0.4).eval()
    model = copy.deepcopy(reference)
    items = _items()
    want = _alone(reference, items)
    assert padding_free(model)
    batch = collate_shared_prompt(items, PAD, 1000, padding_free=True)
    got = _packed_run(model, batch)
    _close_alone(got, want)
    model.train()  # and in training the dropout is applied on the block path
    torch.manual_seed(0)
    trained = batch_logps(model, batch)[0].detach()
    assert not torch.allclose(trained, got[0], atol=1e-6)
    model.eval()
    _grid(monkeypatch)
    _close(_packed_run(model, batch), got, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-13)


@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_gradient_checkpointing_recomputes_by_blocks(reentrant, monkeypatch):
    reference = _lm("mistral", layers=3)
    model = copy.deepcopy(reference)
    items = _items()
    want = _alone(reference, items)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.train()
    assert padding_free(model)
    batch = collate_shared_prompt(items, PAD, 14, padding_free=True)
    spy = _Spy(monkeypatch)
    got = _packed_run(model, batch)
    # two layers by blocks and the trimmed last one, each once in the forward and once recomputed
    assert (spy.blocks, spy.at_blocks, spy.grid) == (4, 2, 0)
    _close_alone(got, want)


def test_peft_lora_by_blocks_equals_each_sequence_alone():
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                        init_lora_weights=False)
    reference = get_peft_model(_lm("llama"), config)
    model = copy.deepcopy(reference)
    items = _items()
    want = _alone(reference, items)
    assert padding_free(model)
    got = _packed_run(model, collate_shared_prompt(items, PAD, 14, padding_free=True))
    _close_alone(got, want)


def test_adapted_model_with_checkpointing_by_blocks_equals_the_grid(monkeypatch):
    """The project's own AdaptedModel (LoRA), gradient checkpointing, in float64."""
    from posttrain.config import DPOConfig
    from posttrain.models.adapters.model import AdaptedModel
    from posttrain.train.sft import build_model

    cfg = DPOConfig.load(None, ["adapter.method=lora", "model.gradient_checkpointing=true"])
    _, model, _ = build_model(cfg, lambda *_: None)
    assert isinstance(model, AdaptedModel)
    model.double().train()
    with torch.no_grad():  # LoRA's B starts at zero; give the adapter a say
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    vocab = model.get_input_embeddings().weight.shape[0]
    assert vocab > VOCAB
    items = _items()
    reference = copy.deepcopy(model)
    want = _alone(reference, items)
    assert padding_free(model)
    spy = _Spy(monkeypatch)
    got = _packed_run(model, collate_shared_prompt(items, PAD, padding_free=True))
    assert spy.blocks and not spy.grid
    _close_alone(got, want)
    ids, labels, mask = _rows_with([0, 5, 1, 8], "left")  # plain rows through AdaptedModel.final_hidden

    def rows():
        model.zero_grad()
        lp, _ = policy_logps(model, ids, labels, mask, chunk_size=5)
        (lp * _weights(len(lp))).sum().backward()
        return lp.detach(), _grads(model)

    plain = rows()
    _grid(monkeypatch)
    _close(_packed_run(model, collate_shared_prompt(items, PAD, padding_free=True)), got, atol=1e-12,
           grad_rtol=1e-10, grad_atol=1e-13)
    _close(rows(), plain, atol=1e-12, grad_rtol=1e-10, grad_atol=1e-13)


def test_reward_model_loss_on_edge_items_equals_rows_and_the_grid(monkeypatch):
    from posttrain.models.reward_model import load_reward_model
    from posttrain.train.reward import RewardModelLoss, reward_extras

    torch.manual_seed(0)
    model = load_reward_model("tiny", pad_token_id=PAD).double()
    loss_module = RewardModelLoss(model, centering=0.01)
    items = _items()
    extras = reward_extras(items)
    extras["margins"] = extras["margins"].double()

    def run(batch):
        model.zero_grad()
        loss, metrics = loss_module(**batch, **extras)
        loss.backward()
        return torch.stack([loss.detach().double(), *[torch.as_tensor(v).double() for v in metrics.values()]]), \
            _grads(model)

    rows = run(collate_items(items, PAD))  # a row per response, padded, model never switched
    padded = run(collate_shared_prompt(items, PAD, 14))  # the shared layout, padded, model never switched
    assert padding_free(model)
    spy = _Spy(monkeypatch)
    got = run(collate_shared_prompt(items, PAD, 14, padding_free=True))
    assert spy.at_blocks and not spy.grid
    _close_alone(got, rows, atol=1e-10)
    _close(got, padded)
    _grid(monkeypatch)
    _close(run(collate_shared_prompt(items, PAD, 14, padding_free=True)), got, atol=1e-12, grad_rtol=1e-10,
           grad_atol=1e-13)


def _relative(a, b):
    return float((a.double() - b).norm() / b.norm())


def test_bf16_weights_by_blocks_are_as_close_to_float64_as_the_grid(monkeypatch):
    reference = _lm("llama")
    model = copy.deepcopy(reference).to(torch.bfloat16)
    items = _items()
    exact = _alone(reference, items)
    assert padding_free(model)
    batch = collate_shared_prompt(items, PAD, 14, padding_free=True)
    by_blocks = _packed_run(model, batch)
    _grid(monkeypatch)
    on_grid = _packed_run(model, batch)
    for got, grid, want in zip([by_blocks[0], *by_blocks[1]], [on_grid[0], *on_grid[1]], [exact[0], *exact[1]]):
        error, grid_error = _relative(got, want), _relative(grid, want)
        assert error < 0.1 and error <= 1.5 * grid_error + 2e-3, (error, grid_error)
