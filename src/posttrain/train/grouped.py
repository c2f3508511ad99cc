"""What reward-model and preference stages share: items that are groups of sequences.

An item is one prompt with its responses (a pair, a K-way ranking, or one KTO completion
plus its mismatched partner), each response a full prompt+response token `Example`. A
micro-batch is `batch_size` items: all their sequences go through the model in ONE
forward (chosen and rejected concatenated), right-padded — or, with a shared prompt, each
item one block and short blocks packed into a row — and the stage scatters the
per-sequence results back to its items. The loss normaliser is the number of items, so
a prompt counts once however many responses it has.
"""

from __future__ import annotations

import contextlib

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from posttrain.data.records import Example
from posttrain.models.attention import Blocks


@dataclass
class Item:
    """One prompt's sequences and what is known about them."""

    sequences: list[Example]
    ranks: list[int] | None = None  # 0 = best, equal = tie; None for unpaired
    desirable: bool | None = None  # KTO
    margin: float | None = None
    reference_logps: list[float] = field(default_factory=list)  # per sequence, when precomputed
    source: str = "<memory>"

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)

    def ordered_pairs(self) -> list[tuple[int, int]]:
        """(better, worse) sequence indices for every strictly ordered pair."""
        if self.ranks is None:
            return []
        k = len(self.ranks)
        return [(i, j) for i in range(k) for j in range(k) if self.ranks[i] < self.ranks[j]]


def shares_prompt(item: Item) -> bool:
    """True when every sequence of `item` has the same, non-empty tokens before its first label
    (a label on a block's first token has nothing in the block to predict it from)."""
    cut = first_label(item.sequences[0])
    prompt = item.sequences[0].input_ids[:cut]
    return cut > 0 and all(first_label(s) == cut and s.input_ids[:cut] == prompt for s in item.sequences[1:])


def collate_shared_prompt(items: list[Item], pad_id: int, row_width: int = 0,
                          padding_free: bool = False) -> dict[str, torch.Tensor]:
    """Each item as one block: its prompt once, then each response, with a 4-D mask so a
    response sees its prompt and itself but no other response, and positions that restart after
    the prompt for every response. Equal to encoding each sequence alone (tested), with the
    prompt's tokens computed once instead of K times.

    Blocks are packed into rows, first fit by decreasing length, up to max(row_width, the longest
    block) tokens a row; the mask keeps every block to itself. With the default (0) no row is
    wider than the longest block, so packing only removes rows: short items share a row instead
    of each being padded to the longest.

    Besides input_ids / attention_mask (B, 1, T, T) bool / position_ids, it returns where each
    trained token is predicted from: predictor (N,) flat index into the (B·T) hidden states,
    targets (N,), sequence (N,) the global sequence index (item offset + response), and
    num_sequences — the same sequence numbering as `collate_items`, whose group and slot (S,)
    it returns too — and last_token (S,), the flat index of each sequence's last token (where a
    reward model reads its score).

    padding_free: input_ids / position_ids are (1, N), the N real tokens only,
    `packed_slots` (N,) places each in the flattened (B·T) grid the mask describes, and
    `packed_blocks` says where each item's block lies among the N; predictor and last_token then
    index the N tokens. For a model `models.attention.padding_free` has
    switched on: the same results without the padding's share of the work.
    """
    blocks = [_shared_prompt_block(item) for item in items]
    longest = max(len(block.ids) for block in blocks)
    rows = _first_fit([len(block.ids) for block in blocks], max(row_width, longest))
    width = max(sum(len(blocks[i].ids) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # the block of each token; -1 = padding
    segment = torch.zeros((len(rows), width), dtype=torch.long)  # 0 = prompt, k + 1 = response k
    start_of = [0] * len(blocks)  # each block's first flat index into the (B·T) positions
    for r, row in enumerate(rows):
        offset = 0
        for i in row:
            block, span = blocks[i], slice(offset, offset + len(blocks[i].ids))
            input_ids[r, span] = torch.tensor(block.ids)
            position_ids[r, span] = torch.tensor(block.positions)
            segment[r, span] = torch.tensor(block.segments)
            owner[r, span] = i
            start_of[i] = r * width + offset
            offset = span.stop
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    same_block = (owner[:, :, None] == owner[:, None, :]) & (owner[:, None, :] >= 0)
    mask = causal & same_block & ((key == 0) | (key == query))
    mask |= torch.eye(width, dtype=torch.bool) & (owner[:, :, None] < 0)  # padding sees itself: no empty softmax row
    predictor, targets, sequence, last = [], [], [], []
    for i, block in enumerate(blocks):
        first_sequence = len(last)
        predictor += [start_of[i] + t for t in block.predictor]
        targets += block.targets
        sequence += [first_sequence + k for k in block.response]
        last += [start_of[i] + t for t in block.last]
    batch = {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
             "predictor": torch.tensor(predictor, dtype=torch.long), "targets": torch.tensor(targets, dtype=torch.long),
             "sequence": torch.tensor(sequence, dtype=torch.long), "num_sequences": torch.tensor(len(last)),
             "real_tokens": torch.tensor(int((owner >= 0).sum())),
             "last_token": torch.tensor(last, dtype=torch.long)} | _origins(items)
    if not padding_free:
        return batch
    # the blocks in the order of the real tokens: row by row, each row's blocks by offset
    blocks = Blocks([blocks[i].span for row in rows for i in row])
    return _without_padding(batch, owner.flatten() >= 0, blocks)


def _without_padding(batch: dict[str, torch.Tensor], real: torch.Tensor, blocks: Blocks) -> dict[str, torch.Tensor]:
    """The padding-free form of a shared-prompt batch: real tokens as one row, their slots and
    attention blocks beside."""
    slots = real.nonzero().squeeze(1)
    index = torch.full_like(real, -1, dtype=torch.long).index_copy_(0, slots, torch.arange(len(slots)))
    return batch | {"input_ids": batch["input_ids"].flatten()[slots][None],
                    "position_ids": batch["position_ids"].flatten()[slots][None], "packed_slots": slots,
                    "packed_blocks": blocks, "predictor": index[batch["predictor"]],
                    "last_token": index[batch["last_token"]]}


class _Block(NamedTuple):
    """One item laid out for `collate_shared_prompt`; offsets are within the block."""

    ids: list[int]
    positions: list[int]
    segments: list[int]  # 0 = prompt, k + 1 = response k
    predictor: list[int]  # for each trained token, the offset it is predicted from
    targets: list[int]
    response: list[int]  # for each trained token, its response k
    last: list[int]  # for each response, the offset of its last token

    @property
    def span(self) -> tuple[int, ...]:
        """(prompt length, each response's length): the block's `models.attention.Blocks` span."""
        return tuple(self.segments.count(k) for k in range(max(self.segments) + 1))


def _shared_prompt_block(item: Item) -> _Block:
    cut = first_label(item.sequences[0])
    block = _Block(list(item.sequences[0].input_ids[:cut]), list(range(cut)), [0] * cut, [], [], [], [])
    for k, seq in enumerate(item.sequences):
        start = len(block.ids)
        block.ids.extend(seq.input_ids[cut:])
        block.positions.extend(range(cut, len(seq)))
        block.segments.extend([k + 1] * (len(seq) - cut))
        block.last.append(len(block.ids) - 1 if len(seq) > cut else cut - 1)
        labels = seq.labels  # a copy each read: once, not per token
        for t in range(cut, len(seq)):
            if labels[t] != -100:  # predicted from t-1: the prompt's last token or this response's previous
                block.predictor.append(cut - 1 if t == cut else start + t - 1 - cut)
                block.targets.append(labels[t])
                block.response.append(k)
    return block


def _first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Rows of indices whose lengths sum to at most `capacity`: first fit, longest first."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(capacity)
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def collate_items(items: list[Item], pad_id: int) -> dict[str, torch.Tensor]:
    """All sequences of `items`, right-padded into one (R, T) batch, plus where each came from.

    group (R,): the item of each row; slot (R,): its position in the item.
    """
    from posttrain.data.batching import collate

    rows = [seq for item in items for seq in item.sequences]
    return collate(rows, pad_id) | _origins(items) | _reference_tensor(items)


def _origins(items: list[Item]) -> dict[str, torch.Tensor]:
    """group (S,): the item of each sequence; slot (S,): its position in the item."""
    return {"group": torch.tensor([g for g, item in enumerate(items) for _ in item.sequences], dtype=torch.long),
            "slot": torch.tensor([k for item in items for k in range(len(item.sequences))], dtype=torch.long)}


def _reference_tensor(items: list[Item]) -> dict[str, torch.Tensor]:
    if not items or any(len(item.reference_logps) != len(item.sequences) for item in items):
        return {}
    return {"reference_logps": torch.tensor([v for item in items for v in item.reference_logps], dtype=torch.float32)}


class GroupedStage:
    """The loop's Stage for items: batch plan, collation, weight (= items) and tokens."""

    def __init__(self, module: torch.nn.Module, train: list[Item], eval_items: list[Item], train_cfg, pad_id: int,
                 collate_extra: Callable[[list[Item]], dict[str, torch.Tensor]], adapter_training=None,
                 share_prompt: bool = False, padding_free: bool = False):
        self.module = module
        self.share_prompt = share_prompt  # one block per item, prompt computed once (collate_shared_prompt)
        self.padding_free = padding_free  # those blocks without their padding (models.attention.padding_free)
        self.train_items, self.eval_items = train, eval_items
        self.cfg, self.pad_id = train_cfg, pad_id
        self.collate_extra = collate_extra  # the stage's own per-item tensors (ranks, pair indices, ...)
        if adapter_training is not None:  # LoRA+ rates and staged unfreezing (models.adapters.schedule)
            self.lr_scale = adapter_training.lr_scale
            self.inactive_parameters = adapter_training.inactive_parameters

    def collate(self, items: list[Item]) -> dict[str, torch.Tensor]:
        if self.share_prompt and all(shares_prompt(item) for item in items):
            batch = collate_shared_prompt(items, self.pad_id, padding_free=self.padding_free)
            batch.update(_reference_tensor(items))
        else:
            batch = collate_items(items, self.pad_id)
        batch.update(self.collate_extra(items))
        batch["num_items"] = torch.tensor(float(len(items)))
        return batch

    def prepare_forwards(self, batches: list[dict], accelerator, count: bool = True):
        """The module's context around a step's forwards, if it has one (KTO's z₀; `train.loop`)."""
        prepare = getattr(self.module, "prepare_forwards", None)
        return contextlib.nullcontext() if prepare is None else prepare(batches, accelerator, count)

    def finish_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The module's finishing of the loop's averaged metrics, if it has one (KTO's per-class means)."""
        finish = getattr(self.module, "finish_metrics", None)
        return dict(metrics) if finish is None else finish(metrics)

    def item_batches(self, epoch: int) -> list[list[Item]]:
        """The items of each training micro-batch of `epoch`, in order."""
        from posttrain.data.batching import plan_batches

        lengths = [item.num_tokens for item in self.train_items]
        return [[self.train_items[i] for i in indices]
                for indices in plan_batches(lengths, self.cfg.batch_size, seed=self.cfg.seed, epoch=epoch,
                                            shuffle=True, group_by_length=False)]

    def micro_batches(self, epoch: int) -> Iterator[dict]:
        for items in self.item_batches(epoch):
            yield self.collate(items)

    def micro_batches_per_epoch(self) -> int:
        return -(-len(self.train_items) // self.cfg.batch_size)

    def weight(self, batch) -> float:
        return float(batch["num_items"])

    def tokens(self, batch) -> int:
        if "real_tokens" in batch:  # shared-prompt rows: the mask is 4-D
            return int(batch["real_tokens"])
        return int(batch["attention_mask"].sum())

    def eval_item_batches(self) -> list[list[Item]]:
        size = self.cfg.batch_size
        return [self.eval_items[i : i + size] for i in range(0, len(self.eval_items), size)]

    def eval_micro_batches(self) -> list[dict]:
        return [self.collate(items) for items in self.eval_item_batches()]


def items_from_examples(examples) -> list[Item]:
    """`data.preferences.PreferenceExample`s → Items."""
    return [Item(list(e.sequences), e.ranks, e.desirable, e.margin, source=e.source) for e in examples]


def first_label(example: Example) -> int:
    """Index of the first trained token (where the response starts)."""
    from posttrain.data.records import IGNORE_INDEX

    return next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)


def on_device(module: torch.nn.Module, device) -> torch.nn.Module:
    """Move `module` to `device` unless it is already there (a 4-bit model placed by
    device_map refuses `.to`). Used before the evaluations and passes that precede the loop."""
    if next(module.parameters()).device != torch.device(device):
        module.to(device)
    return module
