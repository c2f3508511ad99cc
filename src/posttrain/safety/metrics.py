"""Rates with 95% intervals for `posttrain redteam`: attack success and over-refusal.

The interval is the Wilson score interval (Wilson 1927, "Probable Inference, the Law of
Succession, and Statistical Inference", JASA 22): unlike the normal ("Wald") interval it stays
inside [0, 1] and does not collapse to a point at 0 of n or n of n, which red-team rates often
are (Brown, Cai & DasGupta 2001, "Interval Estimation for a Binomial Proportion").

A record with an "error" (the target or the judge failed) is neither a success nor a failure:
it is counted apart and left out of n, as PyRIT's scorers count errors apart from successes and
failures. A rate over no records is 0.0 with the interval [0, 1], which says "unknown".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for `successes` of `n` (z = 1.96: 95%); (0.0, 1.0) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    denominator = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denominator
    # at 0 of n (n of n) the end is exactly 0 (1); centre - half would leave a rounding residue
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def rates(records: list[dict], *, success: Callable[[dict], bool], by: str | None = None) -> dict:
    """{"n", "successes", "rate", "ci95": [low, high], "errors"} over `records`, or with `by`
    ("attack", "category", ...) a dict of those per value of record[by], sorted by value.

    `success` is called only on records without an "error". Every record needs the key `by`.
    """
    if by is None:
        return _summary(records, success)
    groups: dict[Any, list[dict]] = {}
    for record in records:
        if by not in record:
            raise ValueError(f"rates(by={by!r}): a record has no {by!r}: {sorted(record)}")
        groups.setdefault(record[by], []).append(record)
    return {value: _summary(groups[value], success) for value in sorted(groups, key=str)}


def _summary(records: list[dict], success: Callable[[dict], bool]) -> dict:
    errors = sum(1 for r in records if r.get("error"))
    answered = [r for r in records if not r.get("error")]
    successes = sum(1 for r in answered if success(r))
    n = len(answered)
    low, high = wilson_interval(successes, n)
    return {"n": n, "successes": successes, "rate": successes / n if n else 0.0, "ci95": [low, high],
            "errors": errors}
