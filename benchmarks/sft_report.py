"""Drive the SFT benchmark: fixed-batch parity check, interleaved child runs, results table.

    python benchmarks/sft_report.py --cache benchmarks/.cache/sft_cpu --results benchmarks/results

Every measured run is a fresh child process (`sft_bench.py train ...`), so imports, model
load and allocator state never carry over between tools. Runs are interleaved round by
round (trl, posttrain, trl-variant, ..., then again) so slow drift of the machine hits
every tool alike. Writes RESULTS/sft_cpu.json (every raw number) and RESULTS/sft_cpu.md.
Standard library only; it runs in the benchmark venv only to read package versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402  (a sibling script, not a package)
    busy_load, driver_arguments, fmt, mean_loadavg, report_header, run_child, save_report, versions, warning_lines)

SFT_PACKAGES = ("torch", "transformers", "trl", "accelerate", "datasets", "tokenizers", "posttrain")
DEFAULT_RUNS = "trl:default,posttrain:default,trl:group_by_length,posttrain:group_by_length,trl:gc_off+group_by_length"

VARIANT_NOTES = {
    ("trl", "default"): "TRL defaults: random sampler, gradient checkpointing on, fused AdamW",
    ("trl", "group_by_length"): "train_sampling_strategy=group_by_length, gradient checkpointing on",
    ("trl", "gc_off+group_by_length"): "group_by_length and gradient_checkpointing=False (closest to posttrain with grouping)",
    ("trl", "gc_off"): "gradient_checkpointing=False, random sampler",
    ("posttrain", "default"): "posttrain defaults: random sampler, chunked loss (train.loss=auto), no checkpointing",
    ("posttrain", "group_by_length"): "data.group_by_length=true, chunked loss, no checkpointing",
}


def child(mode: str, tool: str, variant: str, args, out: Path, log: Path) -> dict:
    cmd = [sys.executable, str(HERE / "sft_bench.py"), mode, "--tool", tool, "--variant", variant,
           "--model", str(args.cache / "model"), "--data", str(args.cache / "train.jsonl"),
           "--workdir", str(args.work / f"{tool}-{variant}-{out.stem}"), "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length)]
    return run_child(cmd, f"{mode} {tool}:{variant}", out, log, {"HF_HUB_OFFLINE": "1"}, tail=15)


def summarize(runs: list[dict], warmup: int) -> dict:
    """Per run: timed steps are those after `warmup`; tokens/s = Σ tokens / Σ step time."""
    per_run = []
    for r in runs:
        times = r["step_times_s"][warmup:]
        tokens = r["tokens"][warmup:]
        cpu = [c for c in r.get("step_cpu_s", [])[warmup:]]
        per_run.append({
            "s_per_step_median": statistics.median(times),
            "tokens_per_s": sum(tokens) / sum(times),
            "tokens_per_cpu_s": sum(tokens) / sum(cpu) if cpu else None,
            "tokens_per_step_mean": sum(tokens) / len(tokens),
            "peak_rss_mib": r["peak_rss_mib"],
            "step0_loss": r["losses"][0],
            "loadavg": mean_loadavg(r),
        })
    med = lambda key: statistics.median(p[key] for p in per_run if p[key] is not None)  # noqa: E731
    summary = {"repeats": len(per_run), "per_run": per_run,
               **{key: med(key) for key in per_run[0] if key not in ("step0_loss",)},
               "step0_losses": [p["step0_loss"] for p in per_run]}
    # Throughput pooled over every timed step of every repeat (steadier than a median of two).
    all_tokens = sum(sum(r["tokens"][warmup:]) for r in runs)
    summary["tokens_per_s"] = all_tokens / sum(sum(r["step_times_s"][warmup:]) for r in runs)
    cpu_total = sum(sum(r.get("step_cpu_s", [])[warmup:]) for r in runs)
    summary["tokens_per_cpu_s"] = all_tokens / cpu_total if cpu_total else None
    summary["tokens_per_step_mean"] = all_tokens / sum(len(r["tokens"][warmup:]) for r in runs)
    return summary


def write_markdown(report: dict, path: Path) -> None:
    rows, fixed = report["rows"], report["fixed_batch"]
    lines = report_header("SFT on CPU: posttrain vs TRL SFTTrainer", "benchmarks/run_sft_bench.sh", report,
                          ("torch", "transformers", "trl", "accelerate", "datasets")) + [
        f"Setup: tiny Llama ({report['assets'].get('params', 0) / 1e6:.1f}M params: hidden 256, 4 layers, vocab 32000), "
        f"float32; {report['assets'].get('rows')} text rows (median {report['assets'].get('tokens_median')} tokens, "
        f"max {report['assets'].get('tokens_max')}); batch {report['settings']['batch_size']}, max_length "
        f"{report['settings']['max_length']}, AdamW lr 1e-4 constant, clip 1.0, {report['settings']['steps']} steps "
        f"per run (first {report['settings']['warmup']} not timed), {report['settings']['rounds']} interleaved repeats; "
        "every run a fresh process. s/step: median over repeats of each run's median; tokens/s and tokens/CPU-s: "
        "pooled over all timed steps of all repeats; peak RSS: median over repeats.",
        "",
        "| tool | configuration | s/step (median) | real tokens/s (per run) | real tokens / CPU-s | real tokens/step | peak RSS MiB | step-0 loss (own first batch) | load avg |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        s = row["summary"]
        losses = ", ".join(f"{x:.4f}" for x in s["step0_losses"])
        spread = " / ".join(fmt(p["tokens_per_s"], 0) for p in s["per_run"])
        lines.append(f"| {row['tool']} | {row['note']} | {fmt(s['s_per_step_median'], 2)} | "
                     f"{fmt(s['tokens_per_s'])} ({spread}) | "
                     f"{fmt(s['tokens_per_cpu_s'])} | {fmt(s['tokens_per_step_mean'], 0)} | {fmt(s['peak_rss_mib'], 0)} | "
                     f"{losses} | {fmt(s['loadavg'], 1)} |")
    lines += ["", "Ratios, posttrain row / TRL row (targets: tokens/s ≥ 2×, peak RSS ≤ 0.4×):", "",
              "| posttrain row | TRL row | tokens/s ratio | tokens/CPU-s ratio | peak RSS ratio |", "|---|---|---|---|---|"]
    for ratio in report["ratios"]:
        lines.append(f"| {ratio['ours']} | {ratio['vs']} | {fmt(ratio['tokens_per_s'], 2)}× | {fmt(ratio['tokens_per_cpu_s'], 2)}× | "
                     f"{fmt(ratio['peak_rss'], 2)}× |")
    lines += ["", "Step-0 loss on one fixed batch (the first 8 rows of the data, each tool's own tokenisation, "
              "collator and training loss code, before any update):", "",
              "| tool | loss | float64 reference on the same ids | real tokens | padded shape | token ids sha256 |",
              "|---|---|---|---|---|---|"]
    for f in fixed["runs"]:
        lines.append(f"| {f['tool']} | {f['loss']:.6f} | {f['reference_loss']:.6f} | {f['real_tokens']} | "
                     f"{'×'.join(map(str, f['padded_shape']))} | `{f['ids_sha256'][:16]}…` |")
    lines += ["", f"Identical token ids: {fixed['same_ids']}; relative difference posttrain vs TRL: "
              f"{fixed['rel_diff']:.2e} ({'OK' if fixed['agree'] else 'MISMATCH'}, tolerance 1e-3).", ""]
    lines += warning_lines(report)
    lines += ["How it is measured: see `benchmarks/README.md`. Raw numbers: `sft_cpu.json`.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    driver_arguments(parser, cache="sft_cpu", runs=DEFAULT_RUNS, steps=6, warmup=1,
                     runs_help="comma-separated tool:variant, run in this order each round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    args = parser.parse_args()
    args.work = args.cache.parent / "work"  # scratch, gitignored; results/ keeps only the report
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    plan = [tuple(item.split(":", 1)) for item in args.runs.split(",") if item]

    fixed_runs = []
    for tool in ("trl", "posttrain"):
        print(f"[fixed batch] {tool}", flush=True)
        fixed_runs.append(child("fixed", tool, "default", args, args.work / f"fixed-{tool}.json",
                                args.work / f"fixed-{tool}.log"))
    a, b = fixed_runs
    rel = abs(a["loss"] - b["loss"]) / abs(a["reference_loss"])
    fixed = {"runs": fixed_runs, "same_ids": a["ids_sha256"] == b["ids_sha256"], "rel_diff": rel,
             "agree": rel < 1e-3 and a["ids_sha256"] == b["ids_sha256"]}
    print(f"[fixed batch] trl {a['loss']:.6f} posttrain {b['loss']:.6f} ref {a['reference_loss']:.6f} "
          f"same ids {fixed['same_ids']}", flush=True)

    results: dict[tuple[str, str], list[dict]] = {key: [] for key in plan}
    for round_index in range(args.rounds):
        for tool, variant in plan:
            name = f"train-{tool}-{variant}-r{round_index}"
            print(f"[round {round_index + 1}/{args.rounds}] {tool}:{variant} ...", end=" ", flush=True)
            r = child("train", tool, variant, args, args.work / f"{name}.json", args.work / f"{name}.log")
            timed = r["step_times_s"][args.warmup:]
            print(f"{statistics.median(timed):.2f} s/step, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"load {r['loadavg_1min_before']:.1f} ({r['child_wall_s']:.0f} s)", flush=True)
            results[(tool, variant)].append(r)

    rows = [{"tool": tool, "variant": variant, "note": VARIANT_NOTES.get((tool, variant), variant),
             "summary": summarize(runs, args.warmup), "runs": runs} for (tool, variant), runs in results.items()]
    ratios = []
    for mine in (row for row in rows if row["tool"] == "posttrain"):
        ours = mine["summary"]
        for row in (row for row in rows if row["tool"] == "trl"):
            s = row["summary"]
            ratios.append({"ours": f"posttrain {mine['variant']}", "vs": f"trl {row['variant']}",
                           "tokens_per_s": ours["tokens_per_s"] / s["tokens_per_s"],
                           "tokens_per_cpu_s": (ours["tokens_per_cpu_s"] / s["tokens_per_cpu_s"]
                                                if ours["tokens_per_cpu_s"] and s["tokens_per_cpu_s"] else None),
                           "peak_rss": ours["peak_rss_mib"] / s["peak_rss_mib"]})
    warnings = []
    load = busy_load(rows)
    if load is not None:
        warnings.append(f"the machine was busy during the runs (1-min load average up to {load:.1f} on "
                        f"{os.cpu_count()} CPUs): wall-clock numbers are inflated by other processes; the "
                        "interleaving spreads that over both tools, and tokens per CPU-second is less sensitive to it")
    for row in rows:
        for run in row["runs"]:
            reported = run.get("tokens_tool_reported")
            if reported is not None and reported[: len(run["tokens"])] != run["tokens"]:
                warnings.append(f"{row['tool']}:{row['variant']}: collator token counts differ from the tool's own "
                                f"count ({run['tokens']} vs {reported})")
    if not fixed["agree"]:
        warnings.append("the fixed-batch step-0 losses do not agree; see the table above")
    assets_path = args.cache / "assets.json"
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "total_wall_s": time.time() - t0,
        "versions": versions(SFT_PACKAGES),
        "assets": json.loads(assets_path.read_text()) if assets_path.is_file() else {},
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch_size": args.batch_size,
                     "max_length": args.max_length, "lr": 1e-4, "schedule": "constant", "max_grad_norm": 1.0,
                     "order": args.runs},
        "fixed_batch": fixed,
        "rows": rows,
        "ratios": ratios,
        "warnings": warnings,
    }
    save_report(report, args.results, "sft_cpu", write_markdown)


if __name__ == "__main__":
    main()
