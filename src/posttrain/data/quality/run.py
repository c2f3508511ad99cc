"""`posttrain quality`: one pass over training rows, every decision written down.

    read ─▶ filters ─▶ decontaminate ─▶ PII ─▶ exact dedup ─▶ near dedup ─▶ balance ─▶ kept.jsonl
      │        └────────────┴─────────────┴──────────┴─────────────┴───────────┴──▶ dropped.jsonl
      └──▶ rejects.jsonl (malformed, file:line)                      token checks ─▶ report.json / .md

A row leaves at the first step that drops it, and dropped.jsonl holds it with its file:line,
the step's reason and a detail (the duplicate's file:line and Jaccard, the evaluation row it
leaked from, the rule it broke), so every decision can be audited (as datatrove keeps its
exclusions). Kept rows are written as read, except that PII redaction rewrites their strings.
Nothing is dropped unannounced: rows in = kept + dropped + malformed, checked before writing.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.data.quality import filters, stats
from posttrain.data.quality.rows import Row, load_rows, reconvert
from posttrain.errors import DataError


class _Pass:
    """The rows, which of them are still in, and why each of the others left."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.dropped: dict[int, tuple[str, str]] = {}  # index -> (reason, detail)

    def alive(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i not in self.dropped]

    def drop(self, index: int, reason: str, detail: str) -> None:
        self.dropped.setdefault(index, (reason, detail))


def run_quality(cfg, *, log: Callable[[str], Any] = print) -> Path:
    """Run every configured check over `cfg.data.files`; write the outputs into cfg.output_dir."""
    from posttrain.config.quality import validate_quality

    validate_quality(cfg)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    d = cfg.data
    rows, read = load_rows(d.files, fmt=d.format, bad_rows=d.bad_rows, max_bad_fraction=d.max_bad_fraction,
                           rejects_path=str(out / "rejects.jsonl"), log=log)
    work = _Pass(rows)
    report: dict[str, Any] = {"read": read.to_dict(), "input": _describe(rows, cfg.balance.field)}
    _filter(work, cfg.filters)
    report["decontaminate"] = _decontaminate(work, cfg.decontaminate, log)
    report["pii"] = _pii(work, cfg.pii)
    report["dedup"] = _dedup(work, cfg.dedup)
    report["balance"] = _balance(work, cfg.balance)
    kept = [work.rows[i] for i in work.alive()]
    if cfg.tokens.tokenizer:
        report["tokens"] = _tokens(kept, cfg.tokens)
    report["kept_stats"] = _describe(kept, cfg.balance.field)
    report["summary"] = _summary(work, read)
    _write(out, work, kept, report)
    log(_summary_line(report["summary"], out))
    if report["summary"]["removed_fraction"] > cfg.max_drop_fraction:
        raise DataError(f"{report['summary']['removed_fraction']:.2%} of the rows were dropped or malformed, more "
                        f"than max_drop_fraction={cfg.max_drop_fraction}; see {out / 'report.md'}")
    return out


def _describe(rows: list[Row], field: str) -> dict:
    categories = [_field(row, field) for row in rows] if field else None
    return stats.describe([r.prompt for r in rows], [r.response for r in rows], [r.turns for r in rows], categories)


def _field(row: Row, field: str) -> str | None:
    value = row.raw.get(field) if isinstance(row.raw, dict) else None
    return None if value is None else str(value)


def _filter(work: _Pass, cfg) -> None:
    for i in work.alive():
        row = work.rows[i]
        if not row.response:  # an undesirable KTO row trains nothing to produce: no rule applies
            continue
        broken = filters.check(row.prompt, row.response, cfg)
        if broken:
            work.drop(i, *broken)


def _decontaminate(work: _Pass, cfg, log) -> dict:
    from posttrain.data.prompts import load_prompt_records
    from posttrain.data.quality.contamination import ContaminationIndex

    if not cfg.files:
        return {"eval_rows": 0}
    records, _ = load_prompt_records(cfg.files, bad_rows="skip", max_bad_fraction=1.0, log=log)
    texts = ["\n".join(t["content"] for t in r.prompt) + (f"\n{r.answer}" if cfg.on == "full" and r.answer else "")
             for r in records]
    index = ContaminationIndex(texts, [r.source for r in records], cfg.ngram)
    hits: Counter = Counter()
    for i in work.alive():
        found = index.find(work.rows[i].full)
        if found:
            hits[found[0]] += 1
            work.drop(i, "contaminated", f"shares {found[1]!r} with {found[0]}")
    return {"eval_rows": len(records), "ngram": cfg.ngram, "on": cfg.on, "contaminated_rows": sum(hits.values()),
            "eval_rows_leaked": len(hits), "most_leaked": hits.most_common(5)}


def _pii(work: _Pass, cfg) -> dict:
    from posttrain.data.quality.pii import find_pii, redact

    if cfg.action == "off":
        return {"action": "off"}
    kinds: Counter = Counter()
    located: list[dict] = []
    for i in work.alive():
        found: list[str] = []
        raw = _map_strings(work.rows[i].raw, lambda s, found=found: _redacted(s, cfg.kinds, found, find_pii, redact))
        if not found:
            continue
        kinds.update(found)
        located.append({"location": work.rows[i].source, "kinds": sorted(set(found))})
        if cfg.action == "drop":
            work.drop(i, "pii", "contains " + ", ".join(sorted(set(found))))
        elif cfg.action == "redact":
            work.rows[i] = reconvert(work.rows[i], raw)
    # the values themselves are never written to the report: it would copy what redaction removes
    return {"action": cfg.action, "rows_with_pii": len(located), "matches": dict(kinds), "first": located[:20]}


def _redacted(text: str, kinds, found: list[str], find_pii, redact) -> str:
    matches = find_pii(text, kinds)
    found.extend(m.kind for m in matches)
    return redact(text, matches) if matches else text


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    """`value` with `fn` applied to every string in it, keys and turn roles left alone."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, dict):
        return {k: v if k in ("role", "from") else _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn) for v in value]
    return value


def _dedup(work: _Pass, cfg) -> dict:
    from posttrain.data.quality.dedup import exact_duplicates, near_duplicates

    report: dict[str, Any] = {"on": cfg.on}
    for kind, enabled in (("exact", cfg.exact), ("near", cfg.near)):
        if not enabled:
            continue
        alive = work.alive()
        texts = [work.rows[i].prompt if cfg.on == "prompt" else work.rows[i].full for i in alive]
        if kind == "exact":
            found, info = exact_duplicates(texts), {}
        else:
            found, info = near_duplicates(texts, threshold=cfg.threshold, ngram=cfg.ngram, num_perm=cfg.num_perm,
                                          seed=cfg.seed)
        for position, duplicate in enumerate(found):
            if duplicate is not None:
                original = work.rows[alive[duplicate.of]].source
                detail = f"of {original}" + (f" (Jaccard {duplicate.similarity:.2f})" if kind == "near" else "")
                work.drop(alive[position], f"{kind}_duplicate", detail)
        report[kind] = {"duplicates": sum(d is not None for d in found), **info}
    return report


def _balance(work: _Pass, cfg) -> dict:
    if not cfg.field:
        return {}
    alive = work.alive()
    values = [_field(work.rows[i], cfg.field) for i in alive]
    dropped = stats.cap_per_value(values, cfg.max_per_value, cfg.seed) if cfg.max_per_value else set()
    for position in sorted(dropped):
        work.drop(alive[position], "balance", f"{cfg.field}={values[position]!r} over max_per_value={cfg.max_per_value}")
    return {"field": cfg.field, "max_per_value": cfg.max_per_value, "dropped": len(dropped),
            "missing": sum(v is None for v in values)}


def _tokens(rows: list[Row], cfg) -> dict:
    from posttrain.data.quality.tokens import check_tokens
    from posttrain.data.templates import resolve_template
    from posttrain.models.loading import load_tokenizer

    tokenizer = load_tokenizer(cfg.tokenizer, trust_remote_code=cfg.trust_remote_code)
    name = cfg.template
    if name == "auto":
        name += " (the tokenizer's own)" if getattr(tokenizer, "chat_template", None) else " (chatml)"
    report = check_tokens(rows, tokenizer, resolve_template(tokenizer, cfg.template), cfg.max_length)
    return report | {"template": name, "tokenizer": cfg.tokenizer}


def _summary(work: _Pass, read) -> dict:
    reasons = Counter(reason for reason, _ in work.dropped.values())
    kept = len(work.rows) - len(work.dropped)
    if kept + len(work.dropped) + read.bad != read.total:  # the promise: no row lost unannounced
        raise AssertionError(f"{read.total} rows read, {kept} kept + {len(work.dropped)} dropped + {read.bad} malformed")
    removed = len(work.dropped) + read.bad
    return {"rows": read.total, "malformed": read.bad, "kept": kept, "dropped": len(work.dropped),
            "dropped_by_reason": dict(reasons.most_common()),
            "removed_fraction": round(removed / read.total, 6) if read.total else 0.0}


def _write(out: Path, work: _Pass, kept: list[Row], report: dict) -> None:
    from posttrain.data.quality.report import markdown
    from posttrain.files import write_atomically

    def jsonl(items) -> str:
        return "".join(json.dumps(item, ensure_ascii=False, default=str) + "\n" for item in items)

    write_atomically(out / "kept.jsonl", jsonl(row.raw for row in kept))
    write_atomically(out / "dropped.jsonl", jsonl(
        {"location": work.rows[i].source, "reason": reason, "detail": detail, "row": work.rows[i].raw}
        for i, (reason, detail) in sorted(work.dropped.items())))
    write_atomically(out / "report.json", json.dumps(report, indent=1, ensure_ascii=False, default=str))
    write_atomically(out / "report.md", markdown(report))


def _summary_line(summary: dict, out: Path) -> str:
    reasons = ", ".join(f"{name} {count}" for name, count in summary["dropped_by_reason"].items()) or "none"
    return (f"{summary['rows']} rows: {summary['kept']} kept, {summary['dropped']} dropped ({reasons}), "
            f"{summary['malformed']} malformed; report: {out / 'report.md'}")
