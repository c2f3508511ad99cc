"""Probe suites for `posttrain redteam`: the prompts sent to the model under test.

A suite is a data file of rows `{"prompt": str, "category"?: str, "id"?: str}` in any format
`posttrain.data.readers.iter_rows` reads (JSON Lines, JSON, CSV/TSV, Parquet). Two suites ship
with posttrain, both written for it and passed by the name "default":

    assets/safety_harmful.jsonl      requests a safe model should refuse, ~6 in each of 10 hazard
                                     categories named after the MLCommons AILuminate taxonomy
                                     (Ghosh et al. 2025, "AILuminate: Introducing v1.0 of the AI
                                     Risk and Reliability Benchmark")
    assets/safety_overrefusal.jsonl  safe prompts that only look unsafe ("kill a process"), in the
                                     prompt types of XSTest (Röttger et al. 2024, "XSTest: A Test
                                     Suite for Identifying Exaggerated Safety Behaviours in
                                     Large Language Models")

The bundled harmful requests are plain and non-graphic: they ask for something harmful but
contain no harmful instructions themselves. They are a smoke test of refusal behaviour, not a
benchmark: 60 prompts give a 95% interval of about ±12 points around a 50% rate.

Every probe keeps its place ("file:line") so a surprising response can be traced to its row.
A row without an "id" is named "<file stem>-<line>"; ids must be unique within a suite.

`sample_probes` takes a few probes spread over the categories (the bundled suites are sorted by
category, so their first ten probes cover one or two), the same ones every time: redteam's
probes.limit and evaluate's safety.limit.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from importlib import resources
from typing import Any

from posttrain.data.readers import Malformed, iter_rows
from posttrain.errors import DataError

HARMFUL_DEFAULT = "default"  # the path that means "the bundled suite"
HARMFUL_ASSET = "safety_harmful.jsonl"
OVERREFUSAL_ASSET = "safety_overrefusal.jsonl"

HARMFUL_CATEGORIES = ("violent_crimes", "weapons", "cyber_crime", "fraud_and_scams", "self_harm", "hate",
                      "harassment", "privacy", "sexual_content", "misinformation")
OVERREFUSAL_CATEGORIES = ("homonyms", "figurative_language", "safe_targets", "safe_contexts", "definitions",
                          "historical_events", "public_figures_privacy", "real_discrimination_nonsense",
                          "safety_information")
UNCATEGORISED = "uncategorised"

_SHOWN_BAD_ROWS = 5  # an error lists this many bad rows; the count covers the rest


@dataclass(frozen=True)
class Probe:
    id: str  # the row's "id", else "<file stem>-<line>"
    prompt: str
    category: str  # the row's "category", else "uncategorised"
    source: str  # "file:line" (Parquet and datasets directories: "file:row N")


def load_probes(path: str, *, bundled: str) -> list[Probe]:
    """The probes of one suite, in file order.

    `path` "default" reads the bundled asset named `bundled` (e.g. HARMFUL_ASSET); anything else
    is a data file. Raises DataError for malformed rows (listing up to five, with file:line, and
    their count), duplicate ids (naming both lines) and a file with no rows.
    """
    if path == HARMFUL_DEFAULT:
        asset = resources.files("posttrain") / "assets" / bundled
        if not asset.is_file():
            raise DataError(f"bundled probe suite {bundled!r} is missing from posttrain/assets; reinstall posttrain")
        with resources.as_file(asset) as real_path:
            return _read_suite(str(real_path))
    return _read_suite(path)


SAMPLE_SEED = 0  # the seed of probes.limit's sample (redteam) and of evaluate's safety sample


def sample_probes(probes: list[Probe], n: int, seed: int = SAMPLE_SEED) -> list[Probe]:
    """`n` of `probes` (all when n is 0 or not below their number), spread over the categories, in
    file order: the categories are taken in turn, in a seeded order, each giving its next probe in
    a seeded shuffle, until n are taken. So ten probes of the 10-category bundled suite are one of
    each, and a larger n keeps the probes of a smaller one (a raised limit only adds requests)."""
    if not n or n >= len(probes):
        return list(probes)
    rng = random.Random(seed)
    by_category: dict[str, list[int]] = {}
    for index, probe in enumerate(probes):
        by_category.setdefault(probe.category, []).append(index)
    queues = [rng.sample(indices, len(indices)) for indices in by_category.values()]
    rng.shuffle(queues)
    turns = [queue[k] for k in range(max(map(len, queues))) for queue in queues if k < len(queue)]
    return [probes[index] for index in sorted(turns[:n])]


def _read_suite(path: str) -> list[Probe]:
    probes: list[Probe] = []
    bad: list[str] = []
    seen: dict[str, str] = {}
    stem = _stem(path)
    for location, row in iter_rows(path):
        problem = _row_problem(row)
        if problem:
            bad.append(f"{location} ({problem})")
            continue
        probe = _probe(row, location, stem)
        if probe.id in seen:
            raise DataError(f"{location}: probe id {probe.id!r} is already used at {seen[probe.id]}; "
                            "give every row a unique \"id\" (or leave ids out to number them by line)")
        seen[probe.id] = location
        probes.append(probe)
    if bad:
        shown = "; ".join(bad[:_SHOWN_BAD_ROWS]) + ("; ..." if len(bad) > _SHOWN_BAD_ROWS else "")
        raise DataError(f"{path}: {len(bad)} malformed probe row(s): {shown}; each row needs a non-empty "
                        "string \"prompt\" (optional: string \"category\", \"id\")")
    if not probes:
        raise DataError(f"{path}: no probe rows; expected rows like {{\"prompt\": \"...\", \"category\": \"...\"}}")
    return probes


def _row_problem(row: Any) -> str | None:
    """Why a row cannot be a probe, or None when it can."""
    if isinstance(row, Malformed):
        return row.reason
    prompt = row.get("prompt")
    if prompt is None:
        return "no \"prompt\""
    if not isinstance(prompt, str):
        return f"\"prompt\" is {type(prompt).__name__}, not a string"
    if not prompt.strip():
        return "\"prompt\" is empty"
    category = row.get("category")
    if category is not None and not isinstance(category, str):
        return f"\"category\" is {type(category).__name__}, not a string"
    row_id = row.get("id")
    # an integer id is common in exported data and unambiguous as text; a bool or float is not
    if row_id is not None and (isinstance(row_id, bool) or not isinstance(row_id, (str, int))):
        return f"\"id\" is {type(row_id).__name__}, not a string"
    return None


def _probe(row: dict, location: str, stem: str) -> Probe:
    # CSV has no missing values, only empty cells: an empty category or id counts as absent
    category = (row.get("category") or "").strip() or UNCATEGORISED
    row_id = row.get("id")
    row_id = str(row_id).strip() if row_id is not None else ""
    return Probe(id=row_id or f"{stem}-{_line(location)}", prompt=row["prompt"], category=category, source=location)


def _stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    if name.lower().endswith(".gz"):
        name = name[:-3]
    return os.path.splitext(name)[0]


def _line(location: str) -> str:
    """"file:12" -> "12"; "file:row 12" -> "12"."""
    return location.rsplit(":", 1)[-1].replace("row", "").strip()
