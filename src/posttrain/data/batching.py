"""Examples → tensors: dynamic padding, packing, and the per-epoch batch plan.

Packing relies on transformers (>= 4.56) building a block-diagonal causal mask by
itself when it is given `position_ids` and no `attention_mask`: it starts a new
sequence wherever the position ids do not go up by exactly one
(`find_packed_sequence_indices` in transformers/masking_utils.py), for the sdpa, eager
and flex attention paths, and flash-attention reads the same position ids. So a packed
row carries position ids that restart at 0 for every sequence, and no attention mask.

The model must be called with `use_cache=False`: transformers skips that detection
whenever a cache exists, and with `config.use_cache=True` (the default) the model makes
one even in training, so the sequences of a row would silently attend to each other
(tests/test_batching.py checks both sides). Training never needs a cache anyway.
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Iterable, Iterator

import torch

from posttrain.data.records import IGNORE_INDEX, Example


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """True when every row is ones then zeros (padding only at the end). Causal attention then
    already hides the padding from every real token, so callers can drop the mask and let
    attention take its causal-only path."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each token's position among its row's real tokens (padding gets 0, masked anyway): what
    left-padded rows pass as `position_ids`, so that absolute-position models (GPT-2) and RoPE
    alike see the positions an unpadded row would have."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def padded_inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
    """Model inputs for a padded batch: right-padded rows drop the mask (causality already hides
    the tail, and attention keeps its causal-only path); other rows keep it and count positions
    over real tokens only (`real_positions`)."""
    if attention_mask is None or is_right_padded(attention_mask):
        return {"input_ids": input_ids, "attention_mask": None}
    return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": real_positions(attention_mask)}


def _padded_length(length: int, pad_to_multiple_of: int | None) -> int:
    if pad_to_multiple_of:
        return -(-length // pad_to_multiple_of) * pad_to_multiple_of
    return length


def collate(examples: list[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad unpacked examples to the longest one (rounded up to a multiple if asked).

    Returns input_ids, labels (IGNORE_INDEX at pads) and attention_mask (1 real, 0 pad),
    each (B, T) int64. Every key but `labels` goes straight to `model(**batch)`.
    """
    if any(example.position_ids is not None for example in examples):
        raise ValueError("collate got packed examples; use collate_packed for the output of pack()")
    width, input_ids, labels = _blank_rows(examples, pad_id, pad_to_multiple_of)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids, example_labels, _ = example.compact()
        n = len(ids)
        input_ids[row, :n] = _tensor(ids)
        labels[row, :n] = _tensor(example_labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Pack examples into rows of at most `max_length` tokens (best-fit decreasing: `_pack_plan`).

    Deterministic: the same examples in the same order give the same rows. In each row,
    position ids restart at 0 for every sequence, and the first token of every sequence
    carries no label, so no token is trained to follow the previous sequence's last one.
    Examples must already fit (`templates.fit_length`).
    """
    return [_join([examples[i] for i in row]) for row in _pack_plan(examples, max_length)]


_WINDOW = 4  # micro-batches of tokens the rolling buffer of `pack_stream` packs from


def pack_stream(examples: Iterable[Example], rows: int, max_length: int) -> Iterator[list[Example]]:
    """Micro-batches of `rows` packed rows from a stream of examples (data.streaming with
    data.packing), as many rows a micro-batch as in-memory packing gives (`pack`'s rule).

    A rolling buffer takes examples until they hold more tokens than `_WINDOW` micro-batches of
    rows can, packs them (`_pack_plan`) and yields the first `rows` rows (the first opened:
    best-fit decreasing opens them for the longest examples and fills them first); the examples
    of the other rows stay in the buffer, in stream order, ahead of the next ones read. When the
    stream ends, what is left comes out `rows` rows at a time. Each example comes out once, and
    the same stream gives the same micro-batches, so a resume that skips micro-batches lands where
    the run left off. The window trades a bounded buffer for fill: with 4 the rows hold within a
    few percent of the tokens packing the whole set gives (1 micro-batch: up to 10% fewer)."""
    buffer: list[Example] = []
    tokens, window = 0, _WINDOW * rows * max_length
    for example in examples:
        buffer.append(example)
        tokens += len(example)
        while tokens > window:  # more than the window's rows can hold: the first `rows` rows are full
            batch, buffer = _take_rows(buffer, rows, max_length)
            tokens = sum(len(e) for e in buffer)
            yield batch
    while buffer:
        batch, buffer = _take_rows(buffer, rows, max_length)
        yield batch


def _take_rows(buffer: list[Example], rows: int, max_length: int) -> tuple[list[Example], list[Example]]:
    """(the first `rows` packed rows of `buffer`, the examples of the others in buffer order)."""
    plan = _pack_plan(buffer, max_length)
    left = sorted(i for row in plan[rows:] for i in row)
    return [_join([buffer[i] for i in row]) for row in plan[:rows]], [buffer[i] for i in left]


def _pack_plan(examples: list[Example], max_length: int) -> list[list[int]]:
    """The packing rule: rows of example indices, best-fit decreasing, each row at most
    `max_length` tokens. Longest first (ties in input order), each into the fullest row it fits."""
    too_long = [example.source for example in examples if len(example) > max_length]
    if too_long:
        raise ValueError(f"{len(too_long)} examples exceed max_length={max_length} (first: {too_long[0]}); run fit_length first")
    # Longest first; ties keep input order (sort is stable) so the result is deterministic.
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (tokens left, row index), kept sorted
    for i in order:
        need = len(examples[i])
        slot = bisect.bisect_left(free, (need, -1))  # the fullest row that still fits
        if slot < len(free):
            space, row = free.pop(slot)
        else:
            space, row = max_length, len(rows)
            rows.append([])
        rows[row].append(i)
        bisect.insort(free, (space - need, row))
    return rows


def _tensor(values: array) -> torch.Tensor:
    """An Example's int32 array as a tensor over the same memory, for copying into a batch
    (torch.frombuffer refuses an empty buffer)."""
    return torch.frombuffer(values, dtype=torch.int32) if values else torch.empty(0, dtype=torch.int32)


def _join(parts: list[Example]) -> Example:
    input_ids, labels, position_ids = array("i"), array("i"), array("i")
    for part in parts:
        ids, part_labels, _ = part.compact()
        if not ids:
            continue
        start = len(labels)
        input_ids += ids
        labels += part_labels
        labels[start] = IGNORE_INDEX
        position_ids += array("i", range(len(ids)))
    source = parts[0].source if len(parts) == 1 else f"{parts[0].source} (+{len(parts) - 1} packed)"
    return Example(input_ids=input_ids, labels=labels, source=source, position_ids=position_ids)


def _blank_rows(examples: list[Example], pad_id: int, pad_to_multiple_of: int | None):
    """(width, input_ids full of pad_id, labels full of IGNORE_INDEX), both (B, width)."""
    width = _padded_length(max(len(example) for example in examples), pad_to_multiple_of)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    return width, input_ids, labels


def collate_packed(examples: list[Example], pad_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad packed rows. Returns input_ids, labels and position_ids, (B, T) int64,
    and deliberately no attention_mask: its absence (with use_cache=False, see above) is
    what makes transformers read the sequence boundaries from position_ids.

    The pad tail gets position ids restarting at 0, so it is a segment of its own: it
    comes after every real token, so causality already hides it from them, and its
    labels are ignored.
    """
    width, input_ids, labels = _blank_rows(examples, pad_id, pad_to_multiple_of)
    position_ids = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        ids, example_labels, positions = example.compact()
        n = len(ids)
        input_ids[row, :n] = _tensor(ids)
        labels[row, :n] = _tensor(example_labels)
        position_ids[row, :n] = _tensor(positions) if positions is not None else torch.arange(n)
        position_ids[row, n:] = torch.arange(width - n)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids}


def packed_real_tokens(batch: dict[str, torch.Tensor], pad_id: int) -> int:
    """The real tokens of `collate_packed` rows: each row less its pad tail, the last segment when
    it is what collate_packed writes there (pad ids, ignored labels, positions from 0). Counting
    `input_ids != pad_id` instead drops every real EOS when the pad is the EOS token, the
    fallback for tokenizers without a pad (Llama 3, Mistral, GPT-2)."""
    total = 0
    for ids, labels, positions in zip(batch["input_ids"], batch["labels"], batch["position_ids"]):
        tail = int((positions == 0).nonzero()[-1])  # the last segment's start
        is_pad = tail > 0 and bool((ids[tail:] == pad_id).all()) and bool((labels[tail:] == IGNORE_INDEX).all())
        total += tail if is_pad else len(ids)
    return total


def plan_batches(
    lengths: list[int],
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    group_by_length: bool = True,
    drop_last: bool = False,
) -> list[list[int]]:
    """The micro-batches of example indices for one epoch; a pure function of its
    arguments, so a resumed run recomputes the same plan and skips the steps it has done.

    group_by_length: shuffle, cut into mega-batches of 50 × batch_size, sort each by
    length, split into batches and shuffle the batch order, so padding inside a batch is
    small while lengths still vary from step to step. The batch holding the longest
    example goes first, so a run that will run out of memory does so at step 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    # A private generator seeded by (seed, epoch): the global RNG is never touched.
    # (str seeds are hashed with SHA-512, stable across processes and Python versions.)
    rng = random.Random(f"posttrain-batches:{seed}:{epoch}")
    indices = list(range(len(lengths)))
    if shuffle:
        rng.shuffle(indices)
    if not group_by_length:
        batches = _split(indices, batch_size)
        return batches[:-1] if drop_last and batches and len(batches[-1]) < batch_size else batches

    mega = 50 * batch_size
    batches = []
    for start in range(0, len(indices), mega):
        chunk = sorted(indices[start : start + mega], key=lambda i: -lengths[i])
        batches += _split(chunk, batch_size)
    # Only the last mega-batch can be short, so at most one batch is incomplete.
    if drop_last:
        batches = [batch for batch in batches if len(batch) == batch_size]
    if shuffle:
        rng.shuffle(batches)
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lengths[i] for i in batches[b]))
        batches.insert(0, batches.pop(longest))
    return batches


def _split(indices: list[int], batch_size: int) -> list[list[int]]:
    return [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
