"""report.json as Markdown: what a reader checks before training on the kept rows."""

from __future__ import annotations


def markdown(report: dict) -> str:
    s = report["summary"]
    lines = ["# Data quality report", "",
             f"{s['rows']} rows read: **{s['kept']} kept**, {s['dropped']} dropped, {s['malformed']} malformed "
             f"({s['removed_fraction']:.2%} removed). Every dropped row is in dropped.jsonl with its file:line "
             "and reason; malformed rows are in rejects.jsonl.", ""]
    if s["dropped_by_reason"]:
        lines += ["| reason | rows |", "|---|---|", *(f"| {k} | {v} |" for k, v in s["dropped_by_reason"].items()), ""]
    lines += _pii(report.get("pii", {})) + _dedup(report.get("dedup", {})) + _contamination(report["decontaminate"])
    if "perplexity" in report:  # absent when perplexity.model is empty: the report is as it was without the step
        lines += _perplexity(report["perplexity"])
    lines += _tokens(report.get("tokens")) + _stats(report["input"], report["kept_stats"])
    return "\n".join(lines) + "\n"


def _v(value, spec: str = "") -> str:
    """A statistic as the report shows it: "n/a" for one over nothing (None in report.json)."""
    return "n/a" if value is None else format(value, spec)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _pii(p: dict) -> list[str]:
    if p.get("action", "off") == "off":
        return ["## Personal information", "", "Not scanned (pii.action=off).", ""]
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(p["matches"].items())) or "none"
    return ["## Personal information", "", f"{_n(p['rows_with_pii'], 'row')} with matches ({kinds}); action: "
            f"**{p['action']}**. Values are not copied into this report.", ""]


def _dedup(d: dict) -> list[str]:
    lines = ["## Duplicates", "", f"Compared on: {d.get('on', 'full')} text."]
    if "exact" in d:
        lines.append(f"- exact (normalised text): {d['exact']['duplicates']} dropped")
    if "near" in d:
        n = d["near"]
        lines.append(f"- near (MinHash-LSH, {n['bands']} bands × {n['rows']} rows, exact Jaccard re-check): "
                     f"{n['duplicates']} dropped in {_n(n['clusters'], 'cluster')}; {_n(n['candidate_pairs'], 'candidate pair')}, "
                     f"{n['verified_pairs']} verified")
    return lines + [""]


def _contamination(c: dict) -> list[str]:
    if not c.get("eval_rows"):
        return ["## Evaluation leakage", "", "No evaluation files given (decontaminate.files).", ""]
    said = (f"Dropped {_n(c['contaminated_rows'], 'training row')} sharing a {c['ngram']}-word sequence (or a whole "
            f"shorter prompt) with {c['eval_rows_leaked']} of {_n(c['eval_rows'], 'evaluation row')} ({c['on']} text).")
    if c.get("eval_rows_malformed"):
        bad = c["eval_rows_malformed"]
        said += f" {_n(bad, 'evaluation row')} could not be read (malformed): not searched for."
    if c.get("shared_ngrams_left_out"):
        said += (f" {_n(c['shared_ngrams_left_out'], 'sequence')} found in more than {c['max_shared']} evaluation "
                 "rows: taken for a shared template, not searched for.")
    return ["## Evaluation leakage", "", said, ""]


def _perplexity(p: dict) -> list[str]:
    cut = f"cut to {p['max_length']} tokens"
    if "max_length_configured" in p:  # the model's position table is shorter than the setting
        cut += f", its position table; max_length={p['max_length_configured']}"
    lines = ["## Perplexity", "",
             f"Trained responses scored under {p['model']} (template {p['template']}, {cut}): "
             f"{_n(p['scored'], 'row')} of {p['rows']}."]
    if p["not_scored"]:
        lines[-1] += " Not scored: " + ", ".join(f"{k} {v}" for k, v in sorted(p["not_scored"].items())) + "."
    d, t = p["perplexity"], p["thresholds"]
    if d["count"]:
        lines += ["", "| count | mean | p10 | p50 | p90 | p99 |", "|---|---|---|---|---|---|",
                  f"| {d['count']} | {d['mean']:.2f} | {d['p10']:.2f} | {d['p50']:.2f} | {d['p90']:.2f} | {d['p99']:.2f} |"]
    cuts = []
    if t["max_perplexity"]:
        cuts.append(f"above max_perplexity={t['max_perplexity']:g}")
    for side, word in (("top", "highest"), ("bottom", "lowest")):
        if t[f"drop_{side}_fraction"]:
            cut = "too few rows to drop one" if t[f"{side}_cutoff"] is None else f"cut-off {t[f'{side}_cutoff']:.2f}"
            cuts.append(f"the {word} {t[f'drop_{side}_fraction']:g} ({cut})")
    dropped = p["dropped"]
    lines += ["", f"Dropped: {', '.join(cuts)}: perplexity_high {dropped['perplexity_high']}, perplexity_low "
              f"{dropped['perplexity_low']}." if cuts else "No threshold set: nothing dropped (scores only)."]
    if p["highest"]:
        lines.append("Highest: " + "; ".join(f"{s['location']} {s['perplexity']:.2f}" for s in p["highest"][:3]) + ".")
    return lines + [""]


def _tokens(t: dict | None) -> list[str]:
    if not t:
        return ["## Tokens", "", "Not checked (tokens.tokenizer is empty).", ""]
    lengths = t["sequence_tokens"]
    lines = ["## Tokens", "", f"Template {t['template']}; tokens per sequence p50 {_v(lengths['p50'])}, p99 "
             f"{_v(lengths['p99'])}, max {_v(lengths['max'])}; {_v(t['label_token_share'], '.1%')} of tokens carry "
             "loss.", "",
             "| problem | rows | first |", "|---|---|---|"]
    for name in ("unrenderable", "no_label_tokens", "over_max_length", "labels_past_max_length"):
        first = "; ".join(t["first"].get(name, [])[:3])
        lines.append(f"| {name}{' (' + str(t['max_length']) + ')' if 'max' in name else ''} | {t[name]} | {first} |")
    return lines + [""]


def _stats(before: dict, after: dict) -> list[str]:
    def row(name: str, get) -> str:
        return f"| {name} | {get(before)} | {get(after)} |"

    lines = ["## Statistics", "", "| | input | kept |", "|---|---|---|",
             row("rows", lambda x: x["rows"]),
             row("prompt words p50 / p99", lambda x: f"{_v(x['prompt_words']['p50'])} / {_v(x['prompt_words']['p99'])}"),
             row("response words p50 / p99",
                 lambda x: f"{_v(x['response_words']['p50'])} / {_v(x['response_words']['p99'])}"),
             row("distinct-1 / distinct-2 (responses)", lambda x: f"{_v(x['distinct_1'])} / {_v(x['distinct_2'])}"),
             row("prompt first words: distinct, evenness",
                 lambda x: f"{x['prompt_first_word']['distinct']}, {_v(x['prompt_first_word']['evenness'])}")]
    if "category" in before:
        lines.append(row("category: distinct, evenness",
                         lambda x: f"{x['category']['distinct']}, {_v(x['category']['evenness'])}"))
        top = ", ".join(f"{k} {v}" for k, v in after["category"]["top"])
        lines += ["", f"Kept rows per category: {top}"]
    top_words = ", ".join(f"{k} {v}" for k, v in after["prompt_first_word"]["top"])
    return lines + ["", f"Most common first words of the kept prompts: {top_words or 'none'}"]
