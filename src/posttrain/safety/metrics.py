"""Rates with 95% intervals for `posttrain redteam`: attack success and over-refusal.

The interval is the Wilson score interval (Wilson 1927, "Probable Inference, the Law of
Succession, and Statistical Inference", JASA 22): unlike the normal ("Wald") interval it stays
inside [0, 1] and does not collapse to a point at 0 of n or n of n, which red-team rates often
are (Brown, Cai & DasGupta 2001, "Interval Estimation for a Binomial Proportion").

A record with an "error" (the target or the judge failed) is neither a success nor a failure:
it is counted apart and left out of n, as PyRIT's scorers count errors apart from successes and
failures. A rate over no records is no figure: its rate is None (null in report.json; "n/a (0/0)"
in report.md), with the interval [0, 1], which says "unknown", and no change is computed against it.

A pooled rate over clustered records (`rates(..., cluster="probe")`: one harmful request under
several attacks) is not a rate over independent draws: a request that gets through under one
attack tends to get through under the others. Its interval is Wilson's at the effective n =
n / deff, where deff is Kish's design effect (Kish 1965, "Survey Sampling") of a proportion from
clusters of unequal size, estimated as a ratio (Cochran 1977, "Sampling Techniques", ch. 3,
cluster sampling for proportions; without its k / (k − 1), which Wilson's binomial variance has no
counterpart of):

    deff = Σ_i (y_i − p m_i)² / (n p (1 − p)),   never below 1,

y_i the successes and m_i the answered records of cluster i, n = Σ m_i, p = Σ y_i / n. It is the
variance of p over clusters divided by the binomial variance p(1 − p)/n that Wilson assumes.
Records independent within a cluster give deff ≈ 1; a request that gets through under all of its
m attacks or none gives deff = m, so the interval is that of the requests alone (Wilson over k =
n/m draws). Below 1 (attacks that disagree more than chance) it is taken as 1: the interval is
never narrower than the independent one. At p = 0 or 1 the clusters show no variance, and the
data cannot tell m attacks that agree by chance from one answer per request: deff = n / k (k
clusters), the interval of the k requests alone, Wilson(0, k) or Wilson(k, k).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def wilson_interval(successes: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for `successes` of `n` (z = 1.96: 95%); (0.0, 1.0) when n is 0.
    Effective counts (`design_effect`) may be fractional."""
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


def proportion(successes: int, n: int) -> dict:
    """{"n", "successes", "rate", "ci95": [low, high]}: a share with its Wilson interval (rate None
    and [0, 1] over nothing: no figure)."""
    low, high = wilson_interval(successes, n)
    return {"n": n, "successes": successes, "rate": successes / n if n else None, "ci95": [low, high]}


def design_effect(clusters: list[tuple[int, int]]) -> float:
    """deff = Σ_i (y_i − p m_i)² / (n p (1 − p)), at least 1, of (y_i successes, m_i records)
    per cluster (module docstring); n / k when p is 0 or 1; 1.0 over nothing."""
    clusters = [(y, m) for y, m in clusters if m]
    n = sum(m for _, m in clusters)
    successes = sum(y for y, _ in clusters)
    if n == 0:
        return 1.0
    if successes in (0, n):
        return n / len(clusters)
    p = successes / n
    return max(1.0, sum((y - p * m) ** 2 for y, m in clusters) / (n * p * (1 - p)))


def rates(records: list[dict], *, success: Callable[[dict], bool], by: str | None = None,
          cluster: str | None = None) -> dict:
    """{"n", "successes", "rate", "ci95": [low, high], "errors"} over `records`, or with `by`
    ("attack", "category", ...) a dict of those per value of record[by], sorted by value.

    With `cluster` (a key such as "probe": the records sharing its value are one cluster), each
    rate also gives "clusters" (how many, among the answered records) and "design_effect", and
    its interval is Wilson's at n / design_effect (module docstring).

    `success` is called only on records without an "error". Every record needs the key `by`,
    and with `cluster` every answered record that key.
    """
    if by is None:
        return _summary(records, success, cluster)
    groups: dict[Any, list[dict]] = {}
    for record in records:
        if by not in record:
            raise ValueError(f"rates(by={by!r}): a record has no {by!r}: {sorted(record)}")
        groups.setdefault(record[by], []).append(record)
    return {value: _summary(groups[value], success, cluster) for value in sorted(groups, key=str)}


def _summary(records: list[dict], success: Callable[[dict], bool], cluster: str | None = None) -> dict:
    errors = sum(1 for r in records if r.get("error"))
    answered = [r for r in records if not r.get("error")]
    hits = [bool(success(r)) for r in answered]
    out = proportion(sum(hits), len(answered))
    if cluster is not None:
        counts: dict[Any, list[int]] = {}
        for record, hit in zip(answered, hits):
            counts.setdefault(record[cluster], [0, 0])
            counts[record[cluster]][0] += hit
            counts[record[cluster]][1] += 1
        deff = design_effect([(y, m) for y, m in counts.values()])
        if out["n"]:  # over nothing: [0, 1] as it is
            n_eff = out["n"] / deff
            out["ci95"] = list(wilson_interval(out["rate"] * n_eff, n_eff))
        out |= {"clusters": len(counts), "design_effect": deff}
    return out | {"errors": errors}
