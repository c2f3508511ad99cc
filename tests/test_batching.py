"""Dynamic padding, packing (packed loss == unpacked loss), batch plans and sharding."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from posttrain.data.batching import collate, collate_packed, pack, packed_real_tokens, plan_batches
from posttrain.data.records import IGNORE_INDEX, Example

PAD_ID = 0
VOCAB = 97


def _random_examples(lengths: list[int], seed: int = 0) -> list[Example]:
    """Prompt-then-answer examples of random tokens; the first ~third of each is unlabelled."""
    rng = random.Random(seed)
    examples = []
    for n, length in enumerate(lengths):
        ids = [rng.randrange(1, VOCAB) for _ in range(length)]
        prompt = length // 3
        examples.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:], source=f"ex:{n}"))
    return examples


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
        initializer_range=0.2,  # sharper attention than the 0.02 default: leaks show up clearly
    )
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).float().eval()


def _per_token_ce(model, batch, use_cache=False) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy (B, T-1), Hugging Face shift: logits at i predict labels[i+1]."""
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        logits = model(**inputs, use_cache=use_cache).logits.double()
    targets = labels[:, 1:]
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    return ce, targets != IGNORE_INDEX


def _mean_ce(model, batch, use_cache=False) -> float:
    ce, mask = _per_token_ce(model, batch, use_cache)
    return (ce[mask].sum() / mask.sum()).item()


def test_collate_pads_right_and_masks_pads():
    examples = _random_examples([3, 5])
    batch = collate(examples, PAD_ID, pad_to_multiple_of=4)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == examples[0].input_ids + [PAD_ID] * 5
    assert batch["labels"][0].tolist() == examples[0].labels + [IGNORE_INDEX] * 5
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]


def test_pack_fills_rows_and_restarts_positions():
    examples = _random_examples([7, 2, 5, 3, 6, 1, 4])
    rows = pack(examples, max_length=8)
    assert all(len(row) <= 8 for row in rows)
    assert len(rows) == 4  # 28 tokens in rows of 8: best-fit decreasing packs them in the minimum
    assert sorted(t for row in rows for t in row.input_ids) == sorted(t for e in examples for t in e.input_ids)
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[s] == IGNORE_INDEX for s in starts)  # no training across a boundary
        for s, e in zip(starts, starts[1:] + [len(row)]):
            assert row.position_ids[s:e] == list(range(e - s))
    assert pack(examples, 8) == rows  # deterministic
    with pytest.raises(ValueError, match="fit_length"):
        pack(examples, max_length=6)


def test_collate_packed_has_no_attention_mask_and_a_separate_pad_segment():
    rows = pack(_random_examples([5, 3, 2]), max_length=8)
    batch = collate_packed(rows, PAD_ID)
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["position_ids"][1].tolist() == [0, 1, 0, 1, 2, 3, 4, 5]  # [3, 2] row then a 3-token pad tail
    assert batch["labels"][1, 5:].tolist() == [IGNORE_INDEX] * 3


def test_packed_loss_equals_unpacked_loss(model):
    examples = _random_examples([17, 5, 30, 9, 12, 24, 3, 40, 11, 8], seed=1)
    unpacked = collate(examples, PAD_ID)
    packed_rows = pack(examples, max_length=48)
    assert len(packed_rows) < len(examples)
    packed = collate_packed(packed_rows, PAD_ID)
    assert packed["input_ids"].shape[1] == 48 or len(packed_rows) > 1
    assert abs(_mean_ce(model, unpacked) - _mean_ce(model, packed)) < 1e-5


def test_each_packed_sequence_sees_only_itself(model):
    """Every sequence inside a pack gets the same logits (hence losses) as alone, which
    holds only if transformers built a block-diagonal mask from position_ids."""
    examples = _random_examples([6, 9, 4, 12], seed=2)
    rows = pack(examples, max_length=32)
    assert len(rows) == 1
    packed_batch = collate_packed(rows, PAD_ID)
    unpacked_batch = collate(examples, PAD_ID)
    with torch.no_grad():
        packed = model(**{k: v for k, v in packed_batch.items() if k != "labels"}, use_cache=False).logits[0]
        alone = model(**{k: v for k, v in unpacked_batch.items() if k != "labels"}, use_cache=False).logits
    row_of = {tuple(e.input_ids): n for n, e in enumerate(examples)}
    starts = [i for i, p in enumerate(rows[0].position_ids) if p == 0] + [len(rows[0])]
    assert len(starts) == len(examples) + 1
    for start, end in zip(starts, starts[1:]):
        n = row_of[tuple(rows[0].input_ids[start:end])]
        assert torch.allclose(packed[start:end], alone[n, : end - start], atol=1e-5)


def test_packing_without_the_mask_would_leak(model):
    """Control: the same packed row with plain positions (one long sequence) scores
    differently, so the equality above is not vacuous."""
    rows = pack(_random_examples([6, 9, 4, 12], seed=2), max_length=32)
    batch = collate_packed(rows, PAD_ID)
    leaky = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    assert abs(_mean_ce(model, batch) - _mean_ce(model, leaky)) > 1e-2


def test_packed_rows_need_use_cache_false(model):
    """transformers only reads sequence boundaries from position_ids when there is no
    cache, and with config.use_cache=True (the default) the model makes one even in
    training; the packed row then silently attends across sequences. The training loop
    must call the model with use_cache=False."""
    examples = _random_examples([17, 5, 30, 9, 12, 24, 3, 40, 11, 8], seed=1)
    packed = collate_packed(pack(examples, max_length=48), PAD_ID)
    assert model.config.use_cache
    assert abs(_mean_ce(model, packed, use_cache=True) - _mean_ce(model, collate(examples, PAD_ID))) > 1e-2


def _lognormal_lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [max(1, min(2048, int(rng.lognormvariate(5.0, 0.9)))) for _ in range(n)]


def _padding_waste(batches, lengths) -> float:
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_plan_is_deterministic_and_covers_every_index_once():
    lengths = _lognormal_lengths(1003)
    for group in (True, False):
        plan = plan_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
        assert plan == plan_batches(lengths, 8, seed=3, epoch=0, group_by_length=group)
        assert sorted(i for b in plan for i in b) == list(range(1003))
        assert sum(len(b) < 8 for b in plan) == 1
        assert plan != plan_batches(lengths, 8, seed=3, epoch=1, group_by_length=group)
        assert plan != plan_batches(lengths, 8, seed=4, epoch=0, group_by_length=group)
        dropped = plan_batches(lengths, 8, seed=3, epoch=0, group_by_length=group, drop_last=True)
        assert len(dropped) == 125 and all(len(b) == 8 for b in dropped)


def test_plan_does_not_touch_the_global_rng():
    random.seed(0)
    torch.manual_seed(0)
    expected = (random.random(), torch.rand(1))
    random.seed(0)
    torch.manual_seed(0)
    plan_batches(_lognormal_lengths(100), 4, seed=0, epoch=0)
    assert (random.random(), torch.rand(1)) == expected


def test_grouping_by_length_cuts_padding():
    lengths = _lognormal_lengths(4000)
    grouped = _padding_waste(plan_batches(lengths, 16, seed=0, epoch=0), lengths)
    plain = _padding_waste(plan_batches(lengths, 16, seed=0, epoch=0, group_by_length=False), lengths)
    print(f"padding waste: grouped {grouped:.1%}, random {plain:.1%}")
    assert grouped < plain / 4  # measured about 3% vs 60%


def test_grouped_plan_puts_longest_first_and_varies_lengths():
    lengths = _lognormal_lengths(4000)
    plan = plan_batches(lengths, 16, seed=0, epoch=0)
    assert max(lengths) in [lengths[i] for i in plan[0]]
    batch_max = [max(lengths[i] for i in b) for b in plan[1:]]
    assert batch_max != sorted(batch_max) and batch_max != sorted(batch_max, reverse=True)


def test_packed_real_tokens_counts_a_real_pad_id_and_a_full_row():
    """Examples ending in the pad id (pad = EOS), one row filled exactly, one with a pad tail, and a
    row of one example: every real token counts, the tail's do not."""
    examples = _random_examples([5, 7, 4, 6, 10], seed=3)
    for example in examples:
        example.input_ids = example.input_ids[:-1] + [PAD_ID]  # each ends in the EOS that is also the pad
        example.labels = example.labels[:-1] + [PAD_ID]
    rows = pack(examples[:4], max_length=12)  # 5 + 7 fill one row exactly; 4 + 6 leave a tail
    rows.append(examples[4])
    batch = collate_packed(rows, PAD_ID)
    assert batch["input_ids"].shape[1] == 12 and (batch["input_ids"] == PAD_ID).sum() > len(examples)
    assert packed_real_tokens(batch, PAD_ID) == sum(len(e) for e in examples) == 32
