"""The DPO / reward-model benchmark on a CUDA GPU: posttrain vs TRL, one table.

    python benchmarks/dpo/gpu.py --cache benchmarks/.cache/dpo_gpu --results benchmarks/results

The same child runs as the CPU benchmark (`bench.py`, one fresh process per row), with
`--device cuda`: fp32 weights under bf16 autocast in both tools, the GPU synchronised at
every step boundary, and the peak GPU memory of the whole process
(`torch.cuda.max_memory_allocated`). The assets are the GPU profile of `make_assets.py`
(0.22B-parameter Llama, 32k vocabulary, ~650-token rows). Each row runs once, so a row's
steps are its only repeats: the page gives each row's mean step time with its median and
slowest step beside it, warns when the mean is above 1.15× the median (a few slow steps
among fast ones), and judges the time target by mean and by median alike. Parity, per case:
the tools' step-0 losses must agree to 1e-3 under bf16 autocast, and every run must see the
same first batch and the same tokens at every step. Writes RESULTS/dpo_gpu.json and
RESULTS/dpo_gpu.md; a parity failure fails the run after the page is written.

    python benchmarks/dpo/gpu.py --from-json benchmarks/results/dpo_gpu.json

rewrites a stored result's summaries, verdicts, parity and page from its raw runs (no new
measurement).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from common import git_describe, save_report, versions, warning_lines  # noqa: E402  (a sibling script)
from report import (  # noqa: E402  (a sibling script, not a package)
    CASES, NOTES, PACKAGES, SPREAD_WARNING, TARGET, child, exit_on_parity_failure, parity_ok, parity_warnings,
    step0_agreement)

RUNS = [f"{case}:{tv}" for case in ("dpo_full", "dpo_lora")
        for tv in ("trl:default", "trl:gc_off", "trl:gc_off+precompute", "posttrain:precompute", "posttrain:live",
                   "posttrain:precompute+gc", "posttrain:precompute+not_lean")]
RUNS += ["dpo_full:posttrain:precompute+padded"]  # what model.padding_free saves on the GPU
RUNS += ["rm:trl:default", "rm:trl:gc_off", "rm:posttrain:default", "rm:posttrain:gc"]
DEFAULT_ROW = {"dpo_full": "precompute", "dpo_lora": "precompute", "rm": "default"}
# bf16 autocast: the tools' step-0 losses agree to a few 1e-4 (results/dpo_gpu.md's reward model: 3.2e-4),
# where another starting model, other data or another loss differs by far more
LOSS_TOLERANCE = 1e-3


def row_summary(r: dict, warmup: int, steps: int) -> dict:
    """One run's figures. `step_ms` is the mean of the timed steps (those after `warmup`),
    `step_ms_median` and `step_ms_max` their median and slowest; the `_with_precompute` figures
    add the reference pass spread over the run's `steps`."""
    timed = r["step_times_s"][warmup:]
    step_ms, median_ms = 1000 * statistics.fmean(timed), 1000 * statistics.median(timed)
    pre = r.get("precompute_s")
    pre_ms = 1000 * pre / steps if pre else 0.0
    return {"step_ms": step_ms, "step_ms_median": median_ms, "step_ms_max": 1000 * max(timed), "precompute_s": pre,
            "step_ms_with_precompute": step_ms + pre_ms, "step_ms_median_with_precompute": median_ms + pre_ms,
            # on a CPU smoke run (--device cpu) the process's peak RSS stands in
            "peak_cuda_mib": r.get("peak_cuda_mib", r["peak_rss_mib"]), "tokens_per_step": statistics.fmean(r.get("tokens_processed", r["tokens"])),
            "step0_loss": r["losses"][0], "loss_after_one_update": r["losses"][1] if len(r["losses"]) > 1 else None}


def parity(case: str, rows: list[dict]) -> dict:
    """The case's runs compared: posttrain's and TRL's step-0 losses (to LOSS_TOLERANCE, the
    CPU driver's rule), and, where the runs record them, the first batch's token ids and the
    tokens of every step (None where a run does not)."""
    runs = [r for r in rows if r["case"] == case]

    def first(tool):
        return [r["run"]["losses"][0] for r in runs if r["tool"] == tool and r["run"]["losses"]]

    pt, trl = first("posttrain"), first("trl")
    diff, agree = step0_agreement(pt, trl, LOSS_TOLERANCE)
    digests = [r["run"].get("first_batch_digest") for r in runs]
    tokens = [r["run"].get("tokens") for r in runs]
    recorded = None not in tokens
    differ = steps_that_differ(tokens) if recorded else []
    return {"case": case, "posttrain_step0": pt, "trl_step0": trl, "max_abs_diff": diff, "tolerance": LOSS_TOLERANCE,
            # a run with no losses cannot agree
            "agree": agree and len(pt) + len(trl) == len(runs),
            "same_first_batch_ids": None if None in digests else len(set(digests)) == 1,
            "same_tokens_every_step": not differ if recorded else None, "tokens_differ_at_steps": differ}


def steps_that_differ(per_run: list[list[int]]) -> list[int]:
    """The 1-based steps at which the runs' per-step counts differ, a step some run lacks included."""
    steps = max(map(len, per_run), default=0)
    return [k + 1 for k in range(steps) if len({tuple(counts[k:k + 1]) for counts in per_run}) > 1]


def parities(rows: list[dict]) -> list[dict]:
    return [parity(case, rows) for case in CASES if any(r["case"] == case for r in rows)]


def unsteady_warnings(rows: list[dict]) -> list[str]:
    """Rows whose mean step is more than SPREAD_WARNING × their median (the CPU pages' limit for
    repeats): a few slow steps among fast ones, so the mean is no typical step."""
    out = []
    for r in rows:
        m = r["summary"]
        if m["step_ms"] > SPREAD_WARNING * m["step_ms_median"]:
            out.append(f"{r['case']} {r['tool']}:{r['variant']}: unsteady steps — mean {m['step_ms']:,.0f} ms is "
                       f"{m['step_ms'] / m['step_ms_median']:.2f}× the median {m['step_ms_median']:,.0f} ms (slowest "
                       f"step {m['step_ms_max']:,.0f} ms); the median is the typical step, the verdict uses both")
    return out


def verdicts(rows: list[dict]) -> list[dict]:
    out = []
    for case in CASES:
        ours = sorted((r for r in rows if r["case"] == case and r["tool"] == "posttrain"),
                      key=lambda r: r["variant"] != DEFAULT_ROW[case])  # the default row first
        theirs = [r for r in rows if r["case"] == case and r["tool"] == "trl"]
        if theirs:
            ok = parity_ok(parity(case, rows))
            out += [_verdict(case, mine, theirs, ok) for mine in ours]
    return out


def _verdict(case: str, mine: dict, theirs: list[dict], parity_holds: bool = True) -> dict:
    """posttrain's row against TRL's fastest row (by the mean, and again by the median: the two
    may name different rows) and TRL's smallest row. The time target is met only if it is met
    by both statistics, and no target is met where the case's parity failed."""
    fastest = min(theirs, key=lambda r: r["summary"]["step_ms_with_precompute"])
    fastest_median = min(theirs, key=lambda r: r["summary"]["step_ms_median_with_precompute"])
    smallest = min(theirs, key=lambda r: r["summary"]["peak_cuda_mib"])
    default = next((r for r in theirs if r["variant"] == "default"), None)
    m = mine["summary"]
    v = {"case": case, "posttrain_row": mine["variant"], "trl_fastest": fastest["variant"],
         "time_ratio_vs_fastest": m["step_ms_with_precompute"] / fastest["summary"]["step_ms_with_precompute"],
         "trl_fastest_by_median": fastest_median["variant"],
         "time_ratio_vs_fastest_median": (m["step_ms_median_with_precompute"]
                                          / fastest_median["summary"]["step_ms_median_with_precompute"]),
         "trl_smallest": smallest["variant"],
         "memory_ratio_vs_smallest": m["peak_cuda_mib"] / smallest["summary"]["peak_cuda_mib"]}
    if default is not None:
        v["vs_default"] = {"time": m["step_ms_with_precompute"] / default["summary"]["step_ms_with_precompute"],
                           "memory": m["peak_cuda_mib"] / default["summary"]["peak_cuda_mib"]}
    v["time_met"] = max(v["time_ratio_vs_fastest"], v["time_ratio_vs_fastest_median"]) <= TARGET
    v["memory_met"] = v["memory_ratio_vs_smallest"] <= TARGET
    v["parity_ok"] = parity_holds
    v["met"] = v["time_met"] and v["memory_met"] and parity_holds
    return v


def write_markdown(report: dict, path: Path) -> None:
    v, s, a = report["versions"], report["settings"], report["assets"]
    machine = f"; {v['machine']}" if v.get("machine") else ""
    lines = ["# DPO and reward models on a GPU: posttrain vs TRL DPOTrainer / RewardTrainer", ""]
    if report.get("context"):  # what the run was, in words, where the command alone does not say
        lines += [report["context"], ""]
    lines += [f"Generated by `{report['command']}` on {report['date']} in {report['total_wall_s'] / 60:.1f} min on "
              f"{report['gpu']}.", ""]
    if report.get("regenerated"):
        g = report["regenerated"]
        lines += [f"This page and the JSON's summaries, verdicts, parity and warnings were rewritten from the stored "
                  f"runs on {g['date']} by `{g['command']}` at {g['posttrain_commit']}: no new measurement.", ""]
    lines += [f"Versions: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}, peft {v['peft']}, "
              f"accelerate {v['accelerate']}, posttrain {v['posttrain_commit']}, Python {v['python']}{machine}.", "",
              f"Setup: Llama {a['params'] / 1e9:.2f}B parameters (hidden 1024, 12 layers, vocab 32,768, untied), fp32 "
              f"weights with bf16 autocast in both tools; {a['rows']} preference pairs cut from the bundled corpus "
              f"({a['sequence_tokens_min']}–{a['sequence_tokens_max']} tokens per prompt + response, median "
              f"{a['sequence_tokens_median']}); batch {s['batch_size']} pairs, max_length {s['max_length']}, lr "
              f"{s['lr']:g} constant, AdamW, clip 1.0, {s['steps']} steps (one epoch); first {s['warmup']} steps not "
              "timed; one fresh process per row, run once, so a row's steps are its only repeats: ms/step is the "
              "mean of the timed steps, and their median (the typical step) and slowest step follow the memory. "
              "Peak GPU memory: torch.cuda.max_memory_allocated over the whole process (weights, optimizer state, "
              "reference model or pass, activations).", ""]
    by_case = {p["case"]: p for p in parities(report["rows"])}
    for case, title in CASES.items():
        rows = [r for r in report["rows"] if r["case"] == case]
        if not rows:
            continue
        lines += [f"## {title}", "", "| tool | configuration | tokens through the model / step | ms/step (mean) | "
                  "reference pass s | ms/step incl. reference pass (mean) | peak GPU memory MiB | ms/step: median "
                  "(slowest) | incl. reference pass: median | step-0 loss | loss after one update |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            m = r["summary"]
            pre = "—" if m["precompute_s"] is None else f"{m['precompute_s']:.2f}"
            after = "—" if m["loss_after_one_update"] is None else f"{m['loss_after_one_update']:.6f}"
            lines.append(f"| {r['tool']} | {r['note']} | {m['tokens_per_step']:,.0f} | {m['step_ms']:,.0f} | {pre} | "
                         f"{m['step_ms_with_precompute']:,.0f} | {m['peak_cuda_mib']:,.0f} | "
                         f"{m['step_ms_median']:,.0f} ({m['step_ms_max']:,.0f}) | "
                         f"{m['step_ms_median_with_precompute']:,.0f} | {m['step0_loss']:.6f} | {after} |")
        lines += ["", _parity_line(by_case[case]), ""]
    lines += [f"## Verdict against the target (≤ {TARGET}× TRL's step time and ≤ {TARGET}× its peak memory)", "",
              "Each posttrain row (its default first) against TRL's fastest row (step time including any reference "
              "pass) and TRL's smallest row (peak GPU memory); against TRL's own default in brackets. The step time "
              "is compared by the mean and again by the median (TRL's fastest row by the median, named where it "
              "differs); the time target counts as met only if both meet it, and no target where the case's parity "
              "failed.", "",
              "| case | posttrain row | step time vs TRL fastest: mean; median | peak memory vs TRL smallest | met? |",
              "|---|---|---|---|---|"]

    def vs_default(ratio):
        return "TRL's default not run" if ratio is None else f"default {ratio:.2f}×"

    for vd in report["verdicts"]:
        d = vd.get("vs_default", {})
        other = "" if vd["trl_fastest_by_median"] == vd["trl_fastest"] else f" ({vd['trl_fastest_by_median']})"
        missed = [name for name, ok in (("time", vd["time_met"]), ("memory", vd["memory_met"])) if not ok]
        met = ("parity failed" if not vd["parity_ok"] else "yes" if not missed else f"no ({', '.join(missed)})")
        lines.append(f"| {vd['case']} | {vd['posttrain_row']} | {vd['time_ratio_vs_fastest']:.2f}× ({vd['trl_fastest']}; "
                     f"{vs_default(d.get('time'))}); median {vd['time_ratio_vs_fastest_median']:.2f}×{other} | "
                     f"{vd['memory_ratio_vs_smallest']:.2f}× ({vd['trl_smallest']}; {vs_default(d.get('memory'))}) | "
                     f"{met} |")
    lines.append("")
    if report["failed"]:
        lines += ["Rows that failed to run:", ""] + [f"- {f}" for f in report["failed"]] + [""]
    lines += warning_lines(report)
    lines += ["How it is measured and what differs between the tools: `benchmarks/README.md`. Raw numbers: "
              f"`{path.with_suffix('.json').name}`.", ""]
    path.write_text("\n".join(lines))


def _parity_line(p: dict) -> str:
    def losses(xs):
        return ", ".join(f"{x:.6f}" for x in xs) or "no rows"

    diff = "—" if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.1e}"
    tolerance = f"{p['tolerance']:.0e}".replace("e-0", "e-")
    line = (f"Parity: {'OK' if parity_ok(p) else 'MISMATCH'}. Step-0 loss posttrain {losses(p['posttrain_step0'])}; "
            f"TRL {losses(p['trl_step0'])}; max |difference| {diff} ({'within' if p['agree'] else 'NOT within'} the "
            f"tolerance {tolerance} under bf16 autocast).")
    known = [f"{label}: {p[key]}" for key, label in (("same_first_batch_ids", "same first-batch token ids in every run"),
                                                      ("same_tokens_every_step", "same prompt+response tokens at every step"))
             if p[key] is not None]  # None: the runs do not record it
    if p.get("tokens_differ_at_steps"):
        steps = p["tokens_differ_at_steps"]
        known[-1] += f" (they differ at step{'s' if len(steps) > 1 else ''} {', '.join(map(str, steps))})"
    known = "; ".join(known)
    return line + (f" {known[0].upper()}{known[1:]}." if known else "")


def summarise(report: dict) -> dict:
    """The report's figures from its raw runs: each row's summary, the verdicts, parity and
    warnings (a parity failure, an unsteady row). Used by a run and by --from-json alike."""
    s = report["settings"]
    for r in report["rows"]:
        r["summary"] = row_summary(r["run"], s["warmup"], s["steps"])
    report["verdicts"] = verdicts(report["rows"])
    report["parity"] = parities(report["rows"])
    report["warnings"] = unsteady_warnings(report["rows"]) + parity_warnings(report["parity"])
    return report


def from_json(path: Path) -> None:
    """Rewrite a stored result (PATH.json and PATH.md) from its raw runs: no new measurement."""
    report = json.loads(path.read_text())
    report["regenerated"] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
                             "command": f"python benchmarks/dpo/gpu.py --from-json {path.name}",
                             "posttrain_commit": git_describe()}
    save_report(summarise(report), path.parent, path.stem, write_markdown)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=HERE.parent / ".cache" / "dpo_gpu")
    parser.add_argument("--results", type=Path, default=HERE.parent / "results")
    parser.add_argument("--runs", default=",".join(RUNS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of this script (memory = peak RSS)")
    parser.add_argument("--from-json", type=Path, help="rewrite this stored result's figures and page from its runs")
    args = parser.parse_args()
    if args.from_json:
        return from_json(args.from_json)
    args.work = args.cache.parent / "dpo_gpu_work"
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    rows, failed, gpu = [], [], "?"
    for item in args.runs.split(","):
        case, tool, variant = item.split(":", 2)
        name = f"{case}-{tool}-{variant}"
        print(f"[gpu] {case} {tool}:{variant} ...", end=" ", flush=True)
        try:
            r = child(case, tool, variant, args, args.work / f"{name}.json", args.work / f"{name}.log")
        except SystemExit as exc:  # one broken row must not lose the others
            print(f"FAILED\n{exc}", flush=True)
            failed.append(f"{item}: {str(exc).splitlines()[-1] if str(exc) else 'failed'}")
            continue
        gpu = r.get("gpu", gpu)
        summary = row_summary(r, args.warmup, args.steps)
        print(f"{summary['step_ms']:.0f} ms/step (median {summary['step_ms_median']:.0f}), peak "
              f"{summary['peak_cuda_mib']:.0f} MiB, step-0 loss {summary['step0_loss']:.6f} "
              f"({r['child_wall_s']:.0f} s)", flush=True)
        rows.append({"case": case, "tool": tool, "variant": variant,
                     "note": NOTES.get((case, tool, variant), NOTES.get((tool, variant), variant)), "run": r})
    report = {"command": "bash benchmarks/run_dpo_bench_gpu.sh", "date": time.strftime("%Y-%m-%d %H:%M %Z"),
              "total_wall_s": time.time() - t0, "gpu": gpu, "versions": versions(PACKAGES),
              "assets": json.loads((args.cache / "assets.json").read_text()),
              "settings": {"steps": args.steps, "warmup": args.warmup, "batch_size": args.batch_size,
                           "max_length": args.max_length, "lr": args.lr},
              "rows": rows, "failed": failed}
    save_report(summarise(report), args.results, "dpo_gpu", write_markdown)
    exit_on_parity_failure(report["parity"])


if __name__ == "__main__":
    main()
