"""Example holds its token ids as int32 arrays and still reads as lists (tests/test_walkthrough_scale.py
pins the bytes held per token)."""

from __future__ import annotations

import copy
import pickle
import random

import torch

from posttrain.data.batching import collate, collate_packed, pack
from posttrain.data.records import IGNORE_INDEX, Example


def _examples(n: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [rng.randrange(200_000) for _ in range(rng.randint(1, 40))]
        out.append(Example(ids, [t if rng.random() < 0.7 else IGNORE_INDEX for t in ids], f"f:{i}"))
    return out


def test_example_stores_int32_and_reads_as_lists():
    example = Example((5, 70_000, 9), [IGNORE_INDEX, 70_000, 9], "f:1")
    ids, labels, positions = example.compact()
    assert (ids.typecode, ids.itemsize, labels.typecode, positions) == ("i", 4, "i", None)
    assert example.input_ids == [5, 70_000, 9] and type(example.labels) is list and example.position_ids is None
    assert len(example) == 3 and example.num_label_tokens == 2
    assert repr(example) == "Example(input_ids=[5, 70000, 9], labels=[-100, 70000, 9], source='f:1', position_ids=None)"


def test_reads_are_copies_and_assignment_changes_the_example():
    example = Example([1, 2, 3], [1, 2, 3])
    example.input_ids.append(4)  # a copy: no effect
    assert example.input_ids == [1, 2, 3]
    example.input_ids, example.labels = example.input_ids + [4], example.labels + [IGNORE_INDEX]
    example.position_ids = range(4)
    assert (example.input_ids, example.labels, example.position_ids) == ([1, 2, 3, 4], [1, 2, 3, -100], [0, 1, 2, 3])


def test_equality_pickle_and_copies():
    example = Example([1, 2], [IGNORE_INDEX, 2], "f:3", position_ids=[0, 1])
    for other in (pickle.loads(pickle.dumps(example)), copy.copy(example), copy.deepcopy(example)):
        assert other == example and other.compact()[0] is not example.compact()[0]
    assert example != Example([1, 2], [IGNORE_INDEX, 2], "f:4", position_ids=[0, 1])
    assert example != Example([1, 2], [IGNORE_INDEX, 2], "f:3")


def test_num_label_tokens_skips_the_first_position():
    assert Example([], []).num_label_tokens == 0
    assert Example([7], [7]).num_label_tokens == 0
    assert Example([7, 8, 9], [7, IGNORE_INDEX, 9]).num_label_tokens == 1
    assert Example([7, 8, 9], [IGNORE_INDEX, 8, 9]).num_label_tokens == 2


def _reference_collate(examples, pad_id):
    width = max(len(e) for e in examples)
    ids = torch.tensor([e.input_ids + [pad_id] * (width - len(e)) for e in examples])
    labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e)) for e in examples])
    return ids, labels


def test_collate_and_packing_read_the_arrays_exactly():
    examples = _examples(60) + [Example([], [])]
    batch = collate(examples, pad_id=3)
    ids, labels = _reference_collate(examples, 3)
    assert batch["input_ids"].dtype == torch.long and torch.equal(batch["input_ids"], ids)
    assert torch.equal(batch["labels"], labels)
    assert batch["attention_mask"].sum(1).tolist() == [len(e) for e in examples]

    rows = pack(examples, max_length=64)
    assert sum(len(r) for r in rows) == sum(len(e) for e in examples)
    for row in rows:
        assert len(row.labels) == len(row) == len(row.position_ids)
        starts = [i for i, p in enumerate(row.position_ids) if p == 0]
        assert all(row.labels[i] == IGNORE_INDEX for i in starts)
    packed = collate_packed(rows, pad_id=3)
    ids, labels = _reference_collate(rows, 3)
    assert torch.equal(packed["input_ids"], ids) and torch.equal(packed["labels"], labels)
    assert packed["position_ids"][0, : len(rows[0])].tolist() == rows[0].position_ids
