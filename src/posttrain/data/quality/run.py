"""`posttrain quality`: one pass over training rows, every decision written down.

    read ─▶ PII ─▶ filters ─▶ decontaminate ─▶ perplexity ─▶ exact dedup ─▶ near dedup ─▶ balance ─▶ kept.jsonl
      │      └────────┴────────────┴──────────────┴─────────────┴──────────────┴────────────┴──▶ dropped.jsonl
      └──▶ rejects.jsonl (malformed, file:line)                               token checks ─▶ report.json / .md

A row leaves at the first step that drops it, and dropped.jsonl holds it with its file:line,
the step's reason and a detail (the duplicate's file:line and Jaccard, the evaluation row it
leaked from, the rule it broke), so every decision can be audited (as datatrove keeps its
exclusions). PII comes first so that, under redaction, no later output holds a value it found:
kept and dropped rows are the redacted ones (a row dropped for PII is kept as read, as the
evidence). Kept rows are otherwise written as read. Nothing is dropped unannounced: rows in =
kept + dropped + malformed, checked before the outputs are written.

Perplexity (off unless perplexity.model is set) is the one step that runs a model, so it comes
after the cheap rules and scores only the rows they left; it precedes dedup so that its
fractions are of every row that passed the rules (perplexity.py).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from posttrain.config.schema import user_path
from posttrain.data.quality import filters, stats
from posttrain.data.preferences import _decoded
from posttrain.data.quality.rows import ALL_FORMATS, Row, load_rows, reconvert
from posttrain.errors import ConfigError, DataError
from posttrain.files import write_config


class _Pass:
    """The rows, which of them are still in, and why each of the others left."""

    def __init__(self, rows: list[Row]):
        self.rows = rows
        self.dropped: dict[int, tuple[str, str]] = {}  # index -> (reason, detail)
        self.scores: list[dict] | None = None  # perplexity.jsonl, when the step ran

    def alive(self) -> list[int]:
        return [i for i in range(len(self.rows)) if i not in self.dropped]

    def drop(self, index: int, reason: str, detail: str) -> None:
        self.dropped.setdefault(index, (reason, detail))


def run_quality(cfg, *, log: Callable[[str], Any] = print) -> Path:
    """Run every configured check over `cfg.data.files`; write the outputs into cfg.output_dir."""
    from posttrain.config.quality import QualityConfig, validate_quality

    cfg = QualityConfig.for_run(cfg, "run_quality")
    validate_quality(cfg)
    if cfg.perplexity.model:  # a wrong path is said before any row is read, not after the cheap steps
        from posttrain.inference import check_model_dir

        check_model_dir(cfg.perplexity.model, "perplexity.model")
    out = user_path(cfg.output_dir)
    _check_inputs_are_not_outputs(cfg, out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in _outputs(out):  # an earlier run's files never pass for this run's, nor linger half-written
        stale.unlink(missing_ok=True)
        _partial(stale).unlink(missing_ok=True)
    write_config(out, cfg)  # dedup's and balance's seeds among it
    d = cfg.data
    rows, read = load_rows(d.files, fmt=d.format, bad_rows=d.bad_rows, max_bad_fraction=d.max_bad_fraction,
                           rejects_path=str(out / "rejects.jsonl"), log=log)
    work = _Pass(rows)
    report: dict[str, Any] = {"read": read.to_dict(), "input": _describe(rows, cfg.balance.field)}
    report["pii"] = _pii(work, cfg.pii)
    _filter(work, cfg.filters)
    report["decontaminate"] = _decontaminate(work, cfg.decontaminate, log)
    if cfg.perplexity.model:
        report["perplexity"] = _perplexity(work, cfg.perplexity, log)
    report["dedup"] = _dedup(work, cfg.dedup)
    report["balance"] = _balance(work, cfg.balance)
    kept = [work.rows[i] for i in work.alive()]
    if cfg.tokens.tokenizer:
        report["tokens"] = _tokens(kept, cfg.tokens)
    report["kept_stats"] = _describe(kept, cfg.balance.field)
    report["summary"] = _summary(work, read)
    report["kept_files"] = _write(out, work, kept, report)
    log(_summary_line(report["summary"], out, report["kept_files"]))
    if report["summary"]["removed_fraction"] > cfg.max_drop_fraction:
        raise DataError(f"{report['summary']['removed_fraction']:.2%} of the rows were dropped or malformed, more "
                        f"than max_drop_fraction={cfg.max_drop_fraction}; see {out / 'report.md'}")
    return out


_OUTPUTS = ("dropped.jsonl", "rejects.jsonl", "report.json", "report.md", "perplexity.jsonl")


def _kept_file(fmt: str | None = None) -> str:
    """The kept rows' file: kept.jsonl, or kept-FORMAT.jsonl when the rows mix formats."""
    return "kept.jsonl" if fmt is None else f"kept-{fmt}.jsonl"


def _outputs(out: Path) -> list[Path]:
    """Every file a run writes into `out` (the kept files of every format included), and nothing
    else: a run removes an earlier run's before it starts, never a file of the user's beside them
    (kept-v1.jsonl, a copy of a first pass's rows)."""
    names = [_kept_file(), *(_kept_file(fmt) for fmt in ALL_FORMATS), *_OUTPUTS]
    return [out / name for name in names]


def _partial(path: Path) -> Path:
    """Where `write_atomically` writes `path` before it renames it into place (PATH.partial): left
    behind by a run stopped while writing its outputs, and by no later run that does not write
    `path` (perplexity.jsonl once perplexity is off, kept-FORMAT.jsonl once the rows share a format)."""
    return path.with_name(path.name + ".partial")


def _check_inputs_are_not_outputs(cfg, out: Path) -> None:
    """Refuse a data file (data.files, decontaminate.files) that is one of this run's outputs
    (`_outputs`, or its `_partial`): an earlier pass's kept.jsonl read again in the same output_dir
    would be removed with the earlier run's outputs before it is read, and that pass's dropped rows
    and report with it. Said up front, naming the file: the second pass writes elsewhere, or reads
    a copy."""
    outputs = {file.resolve() for path in _outputs(out) for file in (path, _partial(path))}
    for setting, files in (("data.files", cfg.data.files), ("decontaminate.files", cfg.decontaminate.files)):
        for name in files:
            if isinstance(name, str) and user_path(name).resolve() in outputs:
                raise ConfigError(f"{setting}: {name} is one of the outputs in output_dir {out}, which a run "
                                  "removes before it reads its data (an earlier pass's results would go with it); "
                                  "write this pass to another output_dir, or read a copy kept elsewhere")


def _clean(text: str) -> str:
    """Redaction for the texts statistics quote (the prompts' first words), whatever pii.action
    does to the rows (off included): the report never holds a value the scan finds."""
    from posttrain.data.quality.pii import find_pii, redact

    return redact(text, find_pii(text))


def _describe(rows: list[Row], field: str) -> dict:
    categories = [_field(row, field) for row in rows] if field else None
    return stats.describe([_clean(r.instruction) for r in rows], [r.response for r in rows], [r.turns for r in rows],
                          categories)


def _field(row: Row, field: str) -> str | None:
    """The row's value of a column as text; absent, null or blank (CSV's absent) is None."""
    value = row.raw.get(field) if isinstance(row.raw, dict) else None
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return str(value)


def _filter(work: _Pass, cfg) -> None:
    for i in work.alive():
        row = work.rows[i]
        if not row.response:  # an undesirable KTO row trains nothing to produce: no rule applies
            continue
        broken = filters.check(row.prompt, row.response, cfg)
        if broken:
            work.drop(i, *broken)


def _decontaminate(work: _Pass, cfg, log) -> dict:
    from posttrain.data.quality.contamination import ContaminationIndex
    from posttrain.data.quality.rows import eval_text, load_eval_items

    if not cfg.files:
        return {"eval_rows": 0}
    texts, sources, malformed = [], [], 0
    for path in cfg.files:
        items, read = load_eval_items(path, log)
        texts += [eval_text(item, cfg.on) for item in items]
        sources += [item.source for item in items]
        malformed += read.bad
    index = ContaminationIndex(texts, sources, cfg.ngram, cfg.max_shared)
    if index.shared:
        log(f"decontaminate: {index.shared} n-grams found in more than {cfg.max_shared} evaluation rows are a "
            "template the rows share, not searched for (decontaminate.max_shared)")
    hits: Counter = Counter()
    for i in work.alive():
        found = index.find(work.rows[i].full)
        if found:
            hits[found[0]] += 1
            work.drop(i, "contaminated", f"shares {found[1]!r} with {found[0]}")
    return {"eval_rows": len(texts), "eval_rows_malformed": malformed, "ngram": cfg.ngram, "on": cfg.on,
            "max_shared": cfg.max_shared, "shared_ngrams_left_out": index.shared,
            "contaminated_rows": sum(hits.values()), "eval_rows_leaked": len(hits), "most_leaked": hits.most_common(5)}


def _pii(work: _Pass, cfg) -> dict:
    from posttrain.data.formats import BadRowError

    if cfg.action == "off":
        return {"action": "off"}
    kinds: Counter = Counter()
    located: list[dict] = []
    unusable = 0
    for i in work.alive():
        found: list[str] = []
        raw = _map_strings(work.rows[i].raw, lambda s, found=found: _redacted(s, cfg.kinds, found))
        if not found:
            continue
        kinds.update(found)
        located.append({"location": work.rows[i].source, "kinds": sorted(set(found))})
        if cfg.action == "drop":
            work.drop(i, "pii", "contains " + ", ".join(sorted(set(found))))
        elif cfg.action == "redact":
            try:
                work.rows[i] = reconvert(work.rows[i], raw)
            except BadRowError as exc:  # e.g. chosen and rejected differed only in an email
                unusable += 1
                work.drop(i, "pii", f"redaction left the row unusable: {exc.reason}")
    # the values themselves are never written to the report: it would copy what redaction removes
    return {"action": cfg.action, "rows_with_pii": len(located), "matches": dict(kinds),
            "unusable_after_redaction": unusable, "first": located[:20]}


def _redacted(text: str, kinds, found: list[str]) -> str:
    from posttrain.data.quality.pii import find_pii, redact

    matches = find_pii(text, kinds)
    found.extend(m.kind for m in matches)
    return redact(text, matches) if matches else text


# Keys whose string value may be a JSON-encoded list (turns, responses, tool calls, tool definitions) in a CSV
# or Parquet cell, decoded as the preference reader decodes them.
_TURN_KEYS = ("messages", "conversations", "prompt", "chosen", "rejected", "responses", "completion", "tool_calls",
              "tools")


def _map_strings(value: Any, fn: Callable[[str], str], key: str = "") -> Any:
    """`value` with `fn` applied to every string in it. A turn's role ("role" / ShareGPT "from")
    is left alone; a cell holding JSON-encoded turns is decoded, mapped and encoded again, so
    redaction reaches the turns' text and never breaks the JSON. A tool call's `arguments` given
    as JSON text are decoded too, so a value is read as the tool reads it (its escaped line breaks
    are line breaks, as a PEM block needs); the text is written again (`json.dumps`) only where a
    string in it changed, and stays as written otherwise."""
    if isinstance(value, str):
        decoded = _decoded(value, any_list=True) if key in _TURN_KEYS else _arguments(value) if key == "arguments" \
            else value
        if isinstance(decoded, str):
            return fn(value)
        mapped = _map_strings(decoded, fn)
        return value if mapped == decoded else json.dumps(mapped, ensure_ascii=False)
    if isinstance(value, dict):
        is_turn = "content" in value or "value" in value
        return {k: v if is_turn and k in ("role", "from") else _map_strings(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_map_strings(v, fn, key) for v in value]
    return value


def _arguments(text: str) -> Any:
    """A tool call's arguments (JSON text) decoded; the text itself when it is not JSON, or decodes
    to a lone surrogate (no UTF-8 file could hold it written out again)."""
    from posttrain.data.readers import lone_surrogate_at

    try:
        decoded = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return text if lone_surrogate_at(decoded) is not None else decoded


def _perplexity(work: _Pass, cfg, log) -> dict:
    from posttrain.data.quality import perplexity

    alive = work.alive()
    scores, template, max_length = perplexity.score_rows([work.rows[i] for i in alive], cfg, log)
    scored = [(i, s) for i, s in zip(alive, scores) if s.perplexity is not None]
    values = [s.perplexity for _, s in scored]
    drops, cutoffs = perplexity.threshold_drops(values, cfg.max_perplexity, cfg.drop_top_fraction,
                                                cfg.drop_bottom_fraction)
    for position, (reason, detail) in sorted(drops.items()):
        work.drop(scored[position][0], reason, detail)
    work.scores = [{"location": work.rows[i].source, "perplexity": round(s.perplexity, 4), "tokens": s.tokens}
                   for i, s in scored]
    not_scored = Counter(s.not_scored for s in scores if s.perplexity is None)
    first = {why: [work.rows[i].source for i, s in zip(alive, scores) if s.not_scored == why][:5] for why in not_scored}
    ranked = sorted(range(len(scored)), key=lambda k: (values[k], k))
    configured = {} if max_length == cfg.max_length else {"max_length_configured": cfg.max_length}
    return {"model": cfg.model, "template": template, "max_length": max_length, **configured, "rows": len(alive),
            "scored": len(scored), "truncated": sum(s.truncated for s in scores),
            "not_scored": dict(not_scored), "first_not_scored": first,
            "perplexity": perplexity.distribution(values),
            "thresholds": {"max_perplexity": cfg.max_perplexity, "drop_top_fraction": cfg.drop_top_fraction,
                           "drop_bottom_fraction": cfg.drop_bottom_fraction, **cutoffs},
            "dropped": {reason: sum(r == reason for r, _ in drops.values())
                        for reason in ("perplexity_high", "perplexity_low")},
            "highest": [work.scores[k] for k in reversed(ranked[-5:])], "lowest": [work.scores[k] for k in ranked[:5]]}


def _dedup(work: _Pass, cfg) -> dict:
    from posttrain.data.quality.dedup import exact_duplicates, near_duplicates

    report: dict[str, Any] = {"on": cfg.on}
    for kind, enabled in (("exact", cfg.exact), ("near", cfg.near)):
        if not enabled:
            continue
        alive = work.alive()
        # a text row has no prompt: compared whole, or every text row would repeat the first's ""
        texts = [(work.rows[i].prompt or work.rows[i].full) if cfg.on == "prompt" else work.rows[i].full
                 for i in alive]
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


def _write(out: Path, work: _Pass, kept: list[Row], report: dict) -> list[str]:
    """The outputs; returns the kept files' names. Rows of one format go to kept.jsonl; with
    several formats, kept-FORMAT.jsonl each, since a training file is read in one format."""
    from posttrain.data.quality.report import markdown
    from posttrain.files import write_atomically

    def jsonl(items) -> str:
        return _writable("".join(json.dumps(item, ensure_ascii=False, default=str) + "\n" for item in items))

    by_format: dict[str, list[Row]] = {}
    for row in kept:
        by_format.setdefault(row.format, []).append(row)
    names = {fmt: _kept_file() if len(by_format) <= 1 else _kept_file(fmt) for fmt in by_format}
    for fmt, rows in by_format.items():
        write_atomically(out / names[fmt], jsonl(row.raw for row in rows))
    if not by_format:
        write_atomically(out / _kept_file(), "")
    write_atomically(out / "dropped.jsonl", jsonl(
        {"location": work.rows[i].source, "reason": reason, "detail": detail, "row": work.rows[i].raw}
        for i, (reason, detail) in sorted(work.dropped.items())))
    if work.scores is not None:
        write_atomically(out / "perplexity.jsonl", jsonl(work.scores))
    files = sorted(names.values()) or [_kept_file()]
    report["kept_files"] = files
    write_atomically(out / "report.json", _writable(json.dumps(report, indent=1, ensure_ascii=False, default=str)))
    write_atomically(out / "report.md", _writable(markdown(report)))
    return files


def _writable(text: str) -> str:
    """`text` as UTF-8 can hold it: a lone surrogate (a bad row as read, in report.json's first_bad;
    a file name the file system gave in bytes that are not UTF-8) as its escape, \\udXXX, which a
    JSON string reads back as the same character; the rest as it is."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _summary_line(summary: dict, out: Path, kept_files: list[str]) -> str:
    reasons = ", ".join(f"{name} {count}" for name, count in summary["dropped_by_reason"].items()) or "none"
    return (f"{summary['rows']} rows: {summary['kept']} kept ({', '.join(str(out / f) for f in kept_files)}), "
            f"{summary['dropped']} dropped ({reasons}), {summary['malformed']} malformed; report: {out / 'report.md'}")
