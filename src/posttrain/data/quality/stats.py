"""Descriptive statistics of a set of rows, and the category cap that balances them.

Diversity is measured three ways, each cheap and each a number a reader can check:
distinct-n (Li et al. 2016: unique n-grams / all n-grams over the responses), the
distribution of the prompts' first words (Self-Instruct, Wang et al. 2023, reads its
instruction diversity off the leading verbs), and the Shannon entropy H = -Σ p log2 p of
a category column, with H / log2(k) as its evenness (1 = every value equally common).

A statistic over nothing (no rows kept, no response of two words for distinct-2) is None
("n/a" in report.md), never 0: 0 would read as "no diversity" or "empty responses".
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence

from posttrain.data.quality.text import words

_TOP = 10  # values listed per distribution


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    """min / p50 / p90 / p99 / max / mean (nearest-rank percentiles); each None when empty."""
    if not values:
        return dict.fromkeys(("min", "p50", "p90", "p99", "max", "mean"))
    ordered = sorted(values)
    return {"min": ordered[0], "p50": nearest_rank(ordered, 0.5), "p90": nearest_rank(ordered, 0.9),
            "p99": nearest_rank(ordered, 0.99), "max": ordered[-1], "mean": round(sum(ordered) / len(ordered), 2)}


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted, non-empty values by the nearest-rank rule: the ⌈q·n⌉-th smallest."""
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def entropy(counts: Counter) -> dict[str, float | None]:
    """Entropy in bits of a distribution given by counts, and its evenness H / log2(k); both None
    for no counts."""
    total = sum(counts.values())
    if not total:
        return {"entropy_bits": None, "evenness": None}
    h = -sum(c / total * math.log2(c / total) for c in counts.values() if c)
    k = sum(1 for c in counts.values() if c)
    return {"entropy_bits": round(h, 4), "evenness": round(h / math.log2(k), 4) if k > 1 else 1.0}


def distinct_n(texts: Sequence[str], n: int) -> float | None:
    """Unique n-grams / all n-grams over every text (None when there are none)."""
    total, unique = 0, set()
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return round(len(unique) / total, 4) if total else None


def distribution(values: Sequence[str]) -> dict:
    """The most common values with their counts, how many distinct there are, and the entropy."""
    counts = Counter(values)
    return {"distinct": len(counts), "top": counts.most_common(_TOP), **entropy(counts)}


def describe(prompts: Sequence[str], responses: Sequence[str], turns: Sequence[int],
             categories: Sequence[str | None] | None = None) -> dict:
    """The statistics of one set of rows (the input, or the kept rows)."""
    first_words = [w[0] for w in (words(p) for p in prompts) if w]
    stats = {
        "rows": len(responses),
        "prompt_words": percentiles([len(words(p)) for p in prompts]),
        "response_words": percentiles([len(words(r)) for r in responses]),
        "turns": percentiles(list(turns)),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "prompt_first_word": distribution(first_words),
    }
    if categories is not None:
        stats["category"] = distribution([str(c) if c is not None else "<missing>" for c in categories])
    return stats


def cap_per_value(values: Sequence[str | None], max_per_value: int, seed: int) -> set[int]:
    """Indices to drop so that no value keeps more than `max_per_value` rows: for each value over
    the cap, a seeded random choice of which rows stay (the rows' order is kept). Rows without the
    field (None) are never dropped."""
    by_value: dict[str, list[int]] = {}
    for index, value in enumerate(values):
        if value is not None:
            by_value.setdefault(value, []).append(index)
    rng = random.Random(seed)
    dropped: set[int] = set()
    for value in sorted(by_value):  # sorted: the seed's choices do not depend on the rows' order of values
        indices = by_value[value]
        if len(indices) > max_per_value:
            dropped.update(rng.sample(indices, len(indices) - max_per_value))
    return dropped
