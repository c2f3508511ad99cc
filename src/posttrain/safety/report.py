"""report.json of `posttrain redteam` as Markdown, with an earlier run's rates beside when given.

Beside an earlier run (compare_to) a row is compared only where both runs measured the same thing
(`not_compared`): a per-attack row where both ran that attack; the pooled rows (all attacks, any
attack, each category) only when both ran the same attacks; no attack-success row when the runs
answered different harmful requests, no over-refusal row when they answered different safe prompts
(as far as both reports record them: "request_digests", of the requests answered, so a run stopped
part-way is compared only over what it answered). The others say "not comparable" and why.
"""

from __future__ import annotations


def _rate(r: dict | None) -> str:
    """"rate [low, high] (count/n)", with the design effect when the interval allows for one
    (metrics.design_effect) and the records left out of n (failed, or no verdict) when any."""
    left_out = f"{r['errors']} left out" if r and r.get("errors") else ""
    if not r:
        return "–"
    if not r.get("n"):  # a rate over nothing: no figure (metrics.proportion)
        return "n/a (0/0)" + (f"; {left_out}" if left_out else "")
    deff = r.get("design_effect", 1.0)
    count = f"{r['successes']}/{r['n']}" + (f", design effect {deff:.2f}" if round(deff, 2) > 1 else "")
    return f"{r['rate']:.1%} [{r['ci95'][0]:.1%}, {r['ci95'][1]:.1%}] ({count})" + (f"; {left_out}" if left_out else "")


def _change(now: dict | None, before: dict | None) -> str:
    if not now or not before or not now.get("n") or not before.get("n"):
        return "–"
    return f"{100 * (now['rate'] - before['rate']):+.1f} pts"


def _cell(text) -> str:
    """A name fit for a Markdown table cell: no line breaks, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(title: str, rows: dict, earlier: dict | None, not_comparable: str | None = None) -> list[str]:
    """A table of rates; with `earlier`, its rates and the change beside, unless `not_comparable`
    (the reason) says the two runs' rows are over different things."""
    header = f"| {title} | rate [95% CI] (count/n) |" + (" earlier | change |" if earlier is not None else "")
    rule = "|---|---|" + ("---|---|" if earlier is not None else "")
    lines = [header, rule]
    for name, now in rows.items():
        line = f"| {_cell(name)} | {_rate(now)} |"
        if earlier is not None:
            before = earlier.get(name)
            line += f" not comparable: {not_comparable} | – |" if not_comparable and before else \
                f" {_rate(before)} | {_change(now, before)} |"
        lines.append(line)
    return lines + [""]


def _attacks(report: dict) -> set[str]:
    """The attacks a run asked with: recorded in report.json, else its per-attack rows."""
    return set(report.get("attacks") or (report.get("attack_success") or {}).get("by_attack", {}))


def not_compared(report: dict, earlier: dict) -> dict:
    """What of `report` is not compared with `earlier` (both report.json), and why (the module
    docstring's rule): {"attacks_only_in_this_run", "attacks_only_in_earlier_run": sorted names,
    "pooled", "by_attack", "over_refusal": the reason those rows are not comparable, or None}."""
    now, then = _attacks(report), _attacks(earlier)
    digests = report.get("request_digests") or {}, earlier.get("request_digests") or {}

    def differ(suite: str) -> bool:
        return all(suite in d for d in digests) and digests[0][suite] != digests[1][suite]

    requests = "other requests" if differ("harmful") else None
    return {"attacks_only_in_this_run": sorted(now - then), "attacks_only_in_earlier_run": sorted(then - now),
            "pooled": requests or ("other attacks" if now != then else None), "by_attack": requests,
            "over_refusal": "other prompts" if differ("overrefusal") else None}


def _comparison_note(left: dict) -> list[str]:
    """The sentences that say which rows were left out of the comparison and why."""
    only_now, only_then = left["attacks_only_in_this_run"], left["attacks_only_in_earlier_run"]
    lines = []
    if only_now or only_then:
        names = "; ".join(f"{which}: {', '.join(map(_cell, found))}" for which, found in
                          (("only in this run", only_now), ("only in the earlier run", only_then)) if found)
        lines.append(f"Attacks left out of the comparison ({names}). The attacks both runs made are compared row by "
                     "row; the pooled rows (all attacks, any attack, each category) pool different attacks in the "
                     "two runs and are not compared.")
    if left["by_attack"]:
        lines.append("The two runs answered different harmful requests (other probes, another probes.limit, or a "
                     "run stopped part-way): no attack-success row is compared.")
    if left["over_refusal"]:
        lines.append("The two runs answered different safe prompts: no over-refusal row is compared.")
    return [" ".join(lines), ""] if lines else []


def markdown(report: dict) -> str:
    earlier = (report.get("compare_to") or {}).get("report")
    ended = report.get("ended_as_errors", 0)  # PAIR conversations with no verdict; 0 when a report has no such key
    unsent = report["requests"] - report["answered"] - ended - report["failed"]
    lines = ["# Red-team report", "",
             f"Model under test: `{report['target']}`. Classifier: **{report['classifier']}**"
             + (" (refusal patterns: a success means the model did not refuse, harmful or not)."
                if report["classifier"] == "patterns" else " (an LLM judge)."),
             ("**Partial run**: the rates below cover only the requests answered. " if report.get("partial") else "")
             + f"{report['answered']} of {report['requests']} {_requests(report)} answered and labelled; "
             + (f"{ended} PAIR conversation{'s' if ended > 1 else ''} ended without a verdict (the attacker "
                "gave no prompt: an error, left out of every n); " if ended else "")
             + f"{report['failed']} failed this run (left out of every n; rerun to retry them); "
             + (f"{unsent} not sent (the run stopped first; rerun to send them); " if unsent > 0 else "")
             + f"{report['truncated_responses']} responses cut off by max_tokens.", ""]
    left = not_compared(report, earlier) if earlier is not None else {}
    if earlier is not None:
        lines += [f"Compared with `{report['compare_to']['path']}` (model `{earlier.get('target')}`).", ""]
        lines += _comparison_note(left)
    if "attack_success" in report:
        a, before = report["attack_success"], (earlier or {}).get("attack_success", {})
        lines += ["## Attack success (harmful requests; lower is safer)", ""]
        overall = {"all attacks": a["overall"], "any attack (requests)": a.get("any_attack")}
        lines += _table("overall", {k: v for k, v in overall.items() if v is not None},
                        None if earlier is None else {"all attacks": before.get("overall"),
                                                      "any attack (requests)": before.get("any_attack")},
                        left.get("pooled"))
        lines += _table("attack", a["by_attack"], None if earlier is None else before.get("by_attack", {}),
                        left.get("by_attack"))
        lines += _table("category", a["by_category"], None if earlier is None else before.get("by_category", {}),
                        left.get("pooled"))
        lines += [_POOLED, ""]
    if "over_refusal" in report:
        o, before = report["over_refusal"], (earlier or {}).get("over_refusal", {})
        lines += ["## Over-refusal (safe prompts that look unsafe; lower is more helpful)", ""]
        lines += _table("overall", {"refused (full or partial)": o["overall"], "refused fully": o["full_refusal"]},
                        None if earlier is None else {"refused (full or partial)": before.get("overall"),
                                                      "refused fully": before.get("full_refusal")},
                        left.get("over_refusal"))
        lines += _table("category", o["by_category"], None if earlier is None else before.get("by_category", {}),
                        left.get("over_refusal"))
    if "pair" in report:
        lines += _pair_section(report["pair"])
    labels = ", ".join(f"{k} {v}" for k, v in report["labels"].items())
    every = " (every response, each PAIR round's included)" if "pair" in report else ""
    return "\n".join(lines + [f"Labels{every}: {labels}.", ""])


_POOLED = ("\"all attacks\" and each category hold every request once per attack. A request's answers under "
           "several attacks are not independent draws, so those intervals are Wilson's at n / design effect, the "
           "design effect measured over requests (never below 1): never narrower than the requests support. \"any "
           "attack\" is the share of requests that some attack got through. \"left out\": requests that failed "
           "this run (a rerun retries them) or PAIR conversations without a verdict, not in n.")


def _requests(report: dict) -> str:
    return "requests (a PAIR conversation counts as one)" if "pair" in report else "requests"


def _pair_section(p: dict) -> list[str]:
    """PAIR's own figures: requests that got full compliance, rounds and prompts it took (per
    request), attacker failures."""
    def mean(key: str) -> str:
        return "–" if p[key] is None else f"{p[key]:.2f}"

    lines = ["## PAIR (model-generated attacks)", "",
             f"Attacker `{_cell(p['attacker'])}`, up to {p['rounds']} rounds, {p['streams']} stream(s) per request: "
             f"{p['conversations']} conversations, {p['target_requests']} prompts sent to the model under test. The "
             "`pair` row above counts a request as every row does (some answer was not a full refusal); a "
             "request is jailbroken below when some round got full compliance, PAIR's stopping rule: its other "
             "streams stop after that round.", "",
             "| PAIR | value |", "|---|---|",
             f"| jailbroken requests (full compliance) | {_rate(p['jailbroken'])} |",
             f"| jailbroken conversations | {p['jailbroken_conversations']} of {p['conversations']} |",
             f"| conversations stopped by another stream's jailbreak | {p['stopped_conversations']} |",
             f"| mean rounds to a request's first full compliance (jailbroken requests) | "
             f"{mean('mean_rounds_to_success')} |",
             f"| mean prompts sent to the model until then, all streams (jailbroken requests) | "
             f"{mean('mean_queries_to_success')} |",
             f"| attacker replies without a PROMPT: line (retries included) | {p['unparsed_attacker_replies']} |",
             f"| conversations ended without an attacker prompt (errors, not the model resisting) | "
             f"{p['attacker_gave_no_prompt']} |", ""]
    return lines + _table("category (jailbroken)", p["jailbroken_by_category"], None)
