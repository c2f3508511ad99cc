"""report.json of `posttrain evaluate` as Markdown: the policy and its reference side by side."""

from __future__ import annotations

from posttrain.safety.report import _rate  # a rate with its Wilson interval, as the red-team report shows it


def _number(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "–" if value is None else f"{value:.1%}"


def _reward(r: dict | None) -> str:
    if not r or r.get("mean") is None:
        return "–"
    return f"{r['mean']:.3f}" + ("" if r.get("se") is None else f" ± {r['se']:.3f}")


def _exact_match(r) -> str:
    """A rate with its interval and count; a bare share from a report written before 2026-12 (no count)."""
    return _pct(r) if r is None or isinstance(r, (int, float)) else _rate(r)


ROWS = [
    ("exact match (greedy)", lambda f: _exact_match(f.get("exact_match"))),
    ("reference-answer NLL / token", lambda f: _number(f.get("answer_nll"))),
    ("reference-answer perplexity", lambda f: _number(f.get("answer_perplexity"), 2)),
    ("reward (greedy; mean ± se)", lambda f: _reward(f.get("reward"))),
    ("response tokens (greedy)", lambda f: _number(f.get("response_tokens"), 1)),
    ("attack success (red team)", lambda f: _rate((f.get("redteam") or {}).get("attack_success"))),
    ("over-refusal (red team)", lambda f: _rate((f.get("redteam") or {}).get("over_refusal"))),
]


def _win(w: dict, judge: bool = False) -> str:
    """The win rate (ties half) and its counts; for the judge, also the rate with its inconsistent
    pairs as ties (MT-bench's rule; alignment.win_rate), in a report that has it."""
    low, high = w["ci95_decisive"]
    kinds = w.get("other_by_kind") or {}
    other = f"other {w['other']}" + (f" ({', '.join(f'{k} {n}' for k, n in kinds.items())})" if kinds else "")
    text = (f"{_pct(w['win_rate'])} (wins {w['wins']}, losses {w['losses']}, ties {w['ties']}, {other}; "
            f"wins of decisive {low:.1%}–{high:.1%})")
    if judge and "win_rate_inconsistent_as_ties" in w:
        k = w["inconsistent"]
        text += (f"; with the {k} inconsistent pair{'' if k == 1 else 's'} (the two orders disagree) as ties, as "
                 f"MT-bench counts them: {_pct(w['win_rate_inconsistent_as_ties'])} (wins {w['wins']}, ties "
                 f"{w['ties'] + k}, losses {w['losses']})")
    return text


def kl_figure(report: dict) -> str:
    """The sampled KL(policy ‖ reference) of report.json as evaluate's report.md and the demo give it:
    the mean of Σ_t log π − log π_ref over the sampled responses (kl_to_reference), ± its standard
    error (kl_se), over kl_responses responses. The mean is an unbiased estimate of a figure that is
    never below 0, so a negative one is said to be within 2 standard errors of 0 (sampling noise) or
    more than 2 below it (unlikely to be noise alone). A report without kl_se gets the mean alone."""
    kl, se, n = report.get("kl_to_reference"), report.get("kl_se"), report.get("kl_responses")
    if kl is None:
        return "not measured (no samples, or the two tokenizers differ)"
    caveat = ""
    if kl < 0 and se is None:
        caveat = "; KL itself is never below 0: raise generation.samples to tell sampling noise from a fault"
    elif kl < 0 and kl >= -2 * se:
        caveat = "; within 2 standard errors of 0: sampling noise, as KL itself is never below 0"
    elif kl < 0:
        caveat = ("; more than 2 standard errors below 0, where KL itself never is: unlikely to be sampling noise "
                  "alone, so the samples may not follow the policy's distribution as scored")
    over = "a sampled estimate" + ("" if n is None else f" over {n} responses")
    return f"{kl:.3f}" + ("" if se is None else f" ± {se:.3f}") + f" nats per response ({over}{caveat})"


def markdown(report: dict) -> str:
    models = report["models"]
    names = list(models)
    lines = ["# Alignment report", "",
             f"Policy `{report['policy']}`" + (f", reference `{report['reference']}`" if report["reference"] else "")
             + f"; {report['prompts']} prompts.", "",
             "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get in ROWS:
        cells = [get(models[name]) for name in names]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    failed = {name: m["redteam"] for name, m in models.items() if (m.get("redteam") or {}).get("failed")}
    for name, red in failed.items():
        lines.append(f"- red team, {name}: {red['failed']} of {red['requests']} requests failed (left out of every "
                     f"n; evaluate exits 2; see redteam_{name}/report.md; a rerun asks every request again)")
    if "kl_to_reference" in report:
        lines.append(f"- KL(policy ‖ reference): {kl_figure(report)}")
    for key, label in (("reward_win_rate", "reward win rate"), ("judge_win_rate", "judge win rate")):
        if key in report:
            lines.append(f"- {label} of the policy over the reference: {_win(report[key], key == 'judge_win_rate')}")
    return "\n".join(lines) + "\n"
