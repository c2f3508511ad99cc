"""Drive the DPO / reward-model benchmark: interleaved child runs, parity checks, results table.

    python benchmarks/dpo/report.py --cache benchmarks/.cache/dpo_cpu --results benchmarks/results

Every measured run is a fresh child process (`bench.py`), so imports, model load and
allocator state never carry over between tools or cases. Runs are interleaved round by
round (every case and tool once, then again) so slow drift of the machine hits every row
alike. Writes RESULTS/dpo_cpu.json (every raw number) and RESULTS/dpo_cpu.md.
Standard library only; it runs in the benchmark venv only to read package versions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402  (a sibling script, not a package)
    CHILD_ENV, checks_hold, driver_arguments, fmt, fmt_e, mean_loadavg, ratio_rows, repeat_spread, report_header,
    run_child, save_report, timing_warnings, versions, warning_lines)
from common import exit_on_parity_failure as common_exit_on_parity_failure  # noqa: E402

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "posttrain")
CASES = {
    "dpo_full": "DPO, full fine-tuning (sigmoid loss, β 0.1)",
    "dpo_lora": "DPO, LoRA (r 8, α 16, all linear layers)",
    "rm": "Reward model, full fine-tuning (Bradley-Terry)",
}
SHORT = {"dpo_full": "DPO full", "dpo_lora": "DPO LoRA", "rm": "reward model"}
DEFAULT_RUNS = ",".join([
    *(f"{case}:{tv}" for case in ("dpo_full", "dpo_lora")
      for tv in ("trl:default", "posttrain:precompute", "trl:gc_off", "posttrain:live", "trl:gc_off+precompute",
                 "posttrain:precompute+separate_rows")),
    "dpo_full:posttrain:precompute+padded", "dpo_lora:posttrain:precompute+padded",
    "dpo_full:posttrain:precompute+whole_last_layer", "dpo_lora:posttrain:precompute+whole_last_layer",
    "rm:trl:default", "rm:posttrain:default", "rm:trl:gc_off", "rm:posttrain:separate_rows", "rm:posttrain:fused",
    "rm:posttrain:padded", "rm:posttrain:whole_last_layer",
])
NOTES = {
    ("rm", "trl", "default"): "TRL defaults: gradient checkpointing on",
    ("rm", "trl", "gc_off"): "gradient_checkpointing=False",
    ("trl", "default"): "TRL defaults: gradient checkpointing on, live reference",
    ("trl", "gc_off"): "gradient_checkpointing=False, live reference",
    ("trl", "gc_off+precompute"): "gradient_checkpointing=False, precompute_ref_log_probs=True",
    ("posttrain", "precompute"): "posttrain default: dpo.reference=precompute",
    ("posttrain", "live"): "dpo.reference=live",
    ("posttrain", "precompute+separate_rows"): "dpo.reference=precompute, dpo.share_prompt=false (a row per response)",
    ("posttrain", "default"): "posttrain defaults (reward.share_prompt: one row per prompt)",
    ("rm", "posttrain", "separate_rows"): "reward.share_prompt=false (a row per response)",
    ("rm", "posttrain", "fused"): "train.optimizer=adamw_fused (torch's fused AdamW, as TRL uses by default)",
    ("rm", "posttrain", "gc"): "model.gradient_checkpointing=true (as TRL's default)",
    ("posttrain", "precompute+gc"): "dpo.reference=precompute, model.gradient_checkpointing=true (as TRL's default)",
    ("posttrain", "precompute+not_lean"): "dpo.reference=precompute, model.lean_activations=false (stock layers)",
    ("rm", "posttrain", "not_lean"): "model.lean_activations=false (stock transformers layers)",
    ("posttrain", "precompute+lean"): "dpo.reference=precompute, model.lean_activations=true (lean layers on CPU too)",
    ("rm", "posttrain", "lean"): "model.lean_activations=true (lean layers on CPU too)",
    ("posttrain", "precompute+padded"): "dpo.reference=precompute, model.padding_free=false (batches keep their padding)",
    ("rm", "posttrain", "padded"): "model.padding_free=false (batches keep their padding)",
    ("posttrain", "precompute+separate_rows+padded"): "dpo.reference=precompute, dpo.share_prompt=false, "
                                                      "model.padding_free=false",
    ("rm", "posttrain", "separate_rows+padded"): "reward.share_prompt=false, model.padding_free=false",
    ("posttrain", "precompute+whole_last_layer"): "dpo.reference=precompute, last layer at every token "
                                                  "(models/readout.py off by the harness)",
    ("rm", "posttrain", "whole_last_layer"): "last layer at every token (models/readout.py off by the harness)",
}
DEFAULT_ROW = {"trl": "default", "posttrain": {"dpo_full": "precompute", "dpo_lora": "precompute", "rm": "default"}}
SPREAD_WARNING = 1.15  # repeats of one row whose mean step times differ more than this are reported as disturbed
TARGET = 0.5  # the target: posttrain ≤ 0.5× TRL's step time and ≤ 0.5× its peak memory
LOSS_TOLERANCE = 1e-5  # float32 on CPU: the tools' step-0 losses must agree to this (absolute)


def child(case: str, tool: str, variant: str, args, out: Path, log: Path, extra: tuple[str, ...] = ()) -> dict:
    cmd = [sys.executable, str(HERE / "bench.py"), "--tool", tool, "--case", case, "--variant", variant,
           "--model", str(args.cache / "model"), "--rm-model", str(args.cache / "rm_init"),
           "--data", str(args.cache / "prefs.jsonl"), "--workdir", str(args.work / out.stem), "--out", str(out),
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
           "--lr", str(args.lr), "--seed", "0", "--device", getattr(args, "device", "cpu"), *extra]
    return run_child(cmd, f"{case} {tool}:{variant}", out, log, CHILD_ENV)


def summarize(runs: list[dict], warmup: int, steps: int, tensors: dict | None = None) -> dict:
    """Timed steps are those after `warmup`. Means pool every timed step of every repeat.
    `tensors`: the row's --tensor-memory run (untimed), if there was one."""
    per_run = []
    for r in runs:
        times, cpu = r["step_times_s"][warmup:], r["step_cpu_s"][warmup:]
        per_run.append({
            "step_ms_mean": 1000 * statistics.fmean(times),
            "step_ms_median": 1000 * statistics.median(times),
            "step_cpu_ms_mean": 1000 * statistics.fmean(cpu),
            "precompute_s": r.get("precompute_s"),
            "peak_rss_mib": r["peak_rss_mib"],
            "peak_rss_before_train_mib": r.get("peak_rss_before_train_mib"),
            "rss_after_import_mib": r.get("rss_after_import_mib"),
            "step0_loss": r["losses"][0],
            "loadavg": mean_loadavg(r),
            "child_wall_s": r["child_wall_s"],
        })
    all_times = [t for r in runs for t in r["step_times_s"][warmup:]]
    all_cpu = [t for r in runs for t in r["step_cpu_s"][warmup:]]
    pre = [p["precompute_s"] for p in per_run if p["precompute_s"] is not None]
    step_ms = 1000 * statistics.fmean(all_times)
    precompute_s = statistics.median(pre) if pre else None
    return {
        "repeats": len(runs), "per_run": per_run,
        "step_ms_mean": step_ms,
        "step_ms_median": 1000 * statistics.median(all_times),
        "step_cpu_ms_mean": 1000 * statistics.fmean(all_cpu),
        "precompute_s": precompute_s,
        # the reference pass spread over the run's steps (one epoch here): the whole cost per step
        "step_ms_with_precompute": step_ms + (1000 * precompute_s / steps if precompute_s else 0.0),
        "peak_rss_mib": statistics.median(p["peak_rss_mib"] for p in per_run),
        "peak_rss_before_train_mib": statistics.median(p["peak_rss_before_train_mib"] or 0 for p in per_run),
        "rss_after_import_mib": statistics.median(p["rss_after_import_mib"] or 0 for p in per_run),
        "step0_losses": [p["step0_loss"] for p in per_run],
        "tokens_per_step_mean": statistics.fmean(t for r in runs for t in r["tokens"]),
        "tokens_processed_per_step_mean": statistics.fmean(t for r in runs for t in r.get("tokens_processed", r["tokens"])),
        "repeat_spread": repeat_spread(per_run, "step_ms_mean"),
        "loadavg": max(p["loadavg"] for p in per_run),
        "peak_tensor_mib": tensors and tensors["peak_tensor_mib"],
        "peak_process_tensor_mib": tensors and tensors["peak_process_tensor_mib"],
        "tensor_mib_train_begin": tensors and tensors["tensor_mib_at"].get("train_begin"),
        # the tracked run computes what the timed runs did: its losses must be theirs, every one of them
        "tensor_run_losses_match": tensors and same_losses(tensors["losses"], runs[0]["losses"]),
    }


def same_losses(a: list[float], b: list[float], tolerance: float = 1e-6) -> bool:
    """Two runs' loss lists agree: as many losses (at least one), each within `tolerance`.
    A run that stopped early, or logged nothing, does not match."""
    return len(a) == len(b) > 0 and all(abs(x - y) < tolerance for x, y in zip(a, b))


def step0_agreement(posttrain: list[float], trl: list[float], tolerance: float) -> tuple[float | None, bool]:
    """The largest |difference| between posttrain's and TRL's step-0 losses, and whether it is
    below `tolerance`. Without TRL runs (posttrain against itself, e.g. results/dpo_padding_free.md)
    posttrain's runs must agree with each other. A non-finite loss anywhere is a mismatch, with no
    difference (max() would pass over a NaN that is not first); so are no posttrain runs."""
    finite = all(math.isfinite(x) for x in posttrain + trl)
    diff = max(abs(a - b) for a in posttrain for b in (trl or posttrain)) if posttrain and finite else None
    return diff, diff is not None and diff < tolerance


PARITY_CHECKS = {"agree": "step-0 losses agree", "logps_agree": "step-0 log-probs match the float64 reference",
                 "same_first_batch_ids": "same first batch", "same_tokens_every_step": "same tokens every step"}


def parity_ok(p: dict) -> bool:
    """A case's parity holds: no check of PARITY_CHECKS failed (`common.checks_hold`: a check the run
    could not make is not a failure; the GPU runs have no float64 reference)."""
    return checks_hold(p, PARITY_CHECKS)


def parity_warnings(parities: list[dict]) -> list[str]:
    """One warning per case whose parity failed, naming every check made."""
    return [f"{p['case']}: parity check failed ("
            + ", ".join(f"{label}: {p[key]}" for key, label in PARITY_CHECKS.items() if p.get(key) is not None) + ")"
            for p in parities if not parity_ok(p)]


def logps_check(runs: list[dict], reference: dict) -> list[dict]:
    """Each DPO run's step-0 logps/chosen|rejected (pair means, as logged) against the float64
    reference over the label set that tool uses."""
    labels = {"posttrain": "assistant_turn", "trl": "completion"}
    out = []
    for run in runs:
        logged = run["logs_first_steps"][0]
        for side in ("chosen", "rejected"):
            want = reference[f"logps/{side}[{labels[run['tool']]}]"]
            got = logged.get(f"logps/{side}")
            out.append({"tool": run["tool"], "variant": run["variant"], "side": side, "labels": labels[run["tool"]],
                        "logged": got, "reference": want,
                        "rel_diff": None if got is None else abs(got - want) / abs(want)})
    return out


def parity(case: str, rows: list[dict], reference: dict) -> dict:
    """Step-0 loss, first-batch ids and per-step token counts of every run of a case, compared."""
    runs = [run for row in rows for run in row["runs"]]
    digests = {run["first_batch_digest"] for run in runs}
    token_lists = {json.dumps(run["tokens"]) for run in runs}
    orders = {run["order_sha256"] for run in runs}

    def first(tool):
        return [run["losses"][0] for run in runs if run["tool"] == tool]

    pt, trl = first("posttrain"), first("trl")
    diff, agree = step0_agreement(pt, trl, LOSS_TOLERANCE)
    labels = {tool: sorted({run["first_batch_label_tokens"] for run in runs if run["tool"] == tool}) for tool in
              ("posttrain", "trl")}
    step2 = {tool: sorted({round(run["losses"][1], 6) for run in runs if run["tool"] == tool and len(run["losses"]) > 1})
             for tool in ("posttrain", "trl")}
    checks = logps_check(runs, reference) if case != "rm" else []
    logps_ok = all(c["rel_diff"] is not None and c["rel_diff"] < 1e-5 for c in checks)
    return {"case": case, "posttrain_step0": pt, "trl_step0": trl, "max_abs_diff": diff,
            "logps_checks": checks, "logps_agree": logps_ok,
            "agree": agree, "same_first_batch_ids": len(digests) == 1,
            "same_tokens_every_step": len(token_lists) == 1, "same_order": len(orders) == 1,
            "tokens_per_step": json.loads(next(iter(token_lists))) if len(token_lists) == 1 else None,
            "first_batch_label_tokens": labels, "step2_losses": step2}


RATIOS = {"step_time": "step_ms_mean", "step_cpu": "step_cpu_ms_mean",
          "step_time_with_precompute": "step_ms_with_precompute", "peak_rss": "peak_rss_mib"}  # name: summary key
TENSOR_RATIO = {"peak_tensors": "peak_tensor_mib"}  # with BENCH_TENSOR_MEMORY (the default)


def verdict(case: str, rows: list[dict], rs: list[dict], parity: dict | None = None) -> dict:
    """posttrain's default row against TRL's default row and against TRL's best row per metric.
    With the case's `parity`, `parity_ok` says whether the comparison holds at all: a verdict
    whose parity failed claims no target met."""
    ours = DEFAULT_ROW["posttrain"][case]
    trl_rows = [row for row in rows if row["tool"] == "trl"]
    mine = [r for r in rs if r["ours"] == ours]
    if not mine or not trl_rows:
        return {}
    fastest = min(trl_rows, key=lambda row: row["summary"]["step_ms_with_precompute"])["variant"]
    smallest = min(trl_rows, key=lambda row: row["summary"]["peak_rss_mib"])["variant"]
    vs_default = next((r for r in mine if r["vs"] == "default"), None)
    time_best = next(r for r in mine if r["vs"] == fastest)["step_time_with_precompute"]
    rss_best = next(r for r in mine if r["vs"] == smallest)["peak_rss"]
    out = {"case": case, "posttrain_row": ours,
           "vs_trl_default": vs_default and {key: vs_default.get(key) for key in
                                             ("step_time_with_precompute", "peak_rss", "peak_tensors")},
           "trl_fastest": fastest, "time_ratio_vs_fastest": time_best,
           "trl_smallest": smallest, "rss_ratio_vs_smallest": rss_best,
           "time_target_met": time_best <= TARGET, "rss_target_met": rss_best <= TARGET}
    if parity is not None:
        out["parity_ok"] = parity_ok(parity)
    if all(row["summary"]["peak_tensor_mib"] for row in trl_rows) and "peak_tensors" in mine[0]:
        least = min(trl_rows, key=lambda row: row["summary"]["peak_tensor_mib"])["variant"]
        tensors = next(r for r in mine if r["vs"] == least)["peak_tensors"]
        out.update(trl_least_tensors=least, tensor_ratio_vs_least=tensors, tensor_target_met=tensors <= TARGET)
    return out


def write_markdown(report: dict, path: Path) -> None:
    s, a = report["settings"], report["assets"]
    tensors = s.get("tensor_memory", False)
    lines = report_header("DPO and reward models on CPU: posttrain vs TRL DPOTrainer / RewardTrainer",
                          report["command"], report, PACKAGES[:-1]) + [
        f"Setup: small Llama ({a.get('params', 0) / 1e6:.2f}M params: hidden 256, 4 layers, vocab "
        f"{a.get('vocab_size', 1024):,}, {'tied' if a.get('tied_embeddings', True) else 'untied'} embeddings) over "
        f"the `tiny` preset's tokenizer and ChatML template, float32; {a.get('rows')} "
        + ("preference pairs cut from the bundled corpus (the GPU profile's rows: " if a.get("tasks") == "corpus passages"
           else "synthetic preference pairs (smallest/copy/reverse; ")
        + f"{a.get('sequence_tokens_min')}–{a.get('sequence_tokens_max')} "
        f"tokens per prompt+response); batch {s['batch_size']} pairs, max_length {s['max_length']}, "
        f"lr {s['lr']:g} constant, AdamW, clip 1.0, {s['steps']} steps per run = one epoch, same batches in the same "
        f"order in both tools; first {s['warmup']} steps not timed; {s['rounds']} interleaved repeats, every run a "
        "fresh process. ms/step: mean over the timed steps of all repeats (per-repeat means in brackets); peak RSS: "
        "median over repeats of the process's ru_maxrss."
        + (" Peak tensors: one more, untimed run per row whose process tracks the bytes of live CPU tensors from "
           "before the model loads to its end (torch's profiler reporting every allocation and free of torch's CPU "
           "allocator: weights, gradients, optimizer state, activations, logits, any reference copy; the CPU "
           "analogue of `torch.cuda.max_memory_allocated`, without the libraries and heap that dominate RSS here), "
           "up to the end of the last step (posttrain's final save copies tensors to write them; a GPU run would "
           "not count those); in brackets the bytes live when training begins. Deterministic: it does not depend on the machine's "
           "load." if tensors else ""),
        "",
    ]
    for case, title in CASES.items():
        rows = [row for row in report["rows"] if row["case"] == case]
        if not rows:
            continue
        lines += [f"## {title}", "",
                  "| tool | configuration | reference | tokens through the model / step | ms/step (per repeat) | "
                  "CPU-ms/step | reference pass s | ms/step incl. reference pass | peak RSS MiB (per repeat) | "
                  "RSS after imports | " + ("peak tensors MiB (at training start) | " if tensors else "")
                  + "step-0 loss | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if tensors else "") + "---|---|"]
        for row in rows:
            m = row["summary"]
            reps = " / ".join(fmt(p["step_ms_mean"], 0) for p in m["per_run"])
            rss = " / ".join(fmt(p["peak_rss_mib"], 0) for p in m["per_run"])
            losses = ", ".join(f"{x:.6f}" for x in m["step0_losses"])
            lines.append(f"| {row['tool']} | {row['note']} | {row['runs'][0]['reference']} | "
                         f"{fmt(m['tokens_processed_per_step_mean'], 0)} | {fmt(m['step_ms_mean'], 0)} ({reps}) | {fmt(m['step_cpu_ms_mean'], 0)} | "
                         f"{fmt(m['precompute_s'], 2)} | {fmt(m['step_ms_with_precompute'], 0)} | "
                         f"{fmt(m['peak_rss_mib'], 0)} ({rss}) | {fmt(m['rss_after_import_mib'], 0)} | "
                         + (f"{fmt(m['peak_tensor_mib'], 0)} ({fmt(m['tensor_mib_train_begin'], 0)}) | " if tensors else "")
                         + f"{losses} | {fmt(m['loadavg'], 1)} |")
        lines += ["", "Ratios posttrain / TRL (target ≤ 0.5 for both step time and peak memory):", "",
                  "| posttrain | TRL | step time | CPU time/step | step time incl. reference pass | peak RSS |"
                  + (" peak tensors |" if tensors else ""),
                  "|---|---|---|---|---|---|" + ("---|" if tensors else "")]
        for r in (r for r in report["ratios"] if r["case"] == case):
            lines.append(f"| {r['ours']} | {r['vs']} | {fmt(r['step_time'], 2)}× | {fmt(r['step_cpu'], 2)}× | "
                         f"{fmt(r['step_time_with_precompute'], 2)}× | {fmt(r['peak_rss'], 2)}× |"
                         + (f" {fmt(r['peak_tensors'], 2)}× |" if tensors else ""))
        p = next(p for p in report["parity"] if p["case"] == case)
        diff = "—" if p["max_abs_diff"] is None else f"{p['max_abs_diff']:.1e}"
        lines += ["", f"Parity: step-0 loss posttrain {', '.join(f'{x:.6f}' for x in p['posttrain_step0'])}; "
                  f"TRL {', '.join(f'{x:.6f}' for x in p['trl_step0']) or 'no rows'}; max |difference| {diff} "
                  f"({'OK' if p['agree'] else 'MISMATCH'}, tolerance 1e-5). Same first-batch token ids in every run: "
                  f"{p['same_first_batch_ids']}; same prompt+response tokens at every step: {p['same_tokens_every_step']} "
                  f"({', '.join(map(str, (p['tokens_per_step'] or [])[:6]))}, … per step). Loss after one update: "
                  f"posttrain {p['step2_losses']['posttrain']}, TRL {p['step2_losses']['trl']}.", ""]
        if case != "rm":
            labels = p["first_batch_label_tokens"]
            ref = report["reference_logps_first_batch"]
            worst = {tool: max((c["rel_diff"] for c in p["logps_checks"] if c["tool"] == tool), default=None)
                     for tool in ("posttrain", "trl")}
            lines += [
                "At step 0 the DPO loss is log 2 whatever the log-probs are, so the log-probs themselves are checked "
                f"too: each run's logged step-0 `logps/chosen` and `logps/rejected` (means over the {s['batch_size']} pairs) against "
                "a float64 forward of the same batch with no tool code, summed over the tokens each tool labels. "
                f"posttrain labels the response and `<|im_end|>` ({labels['posttrain'][0] if labels['posttrain'] else '—'} "
                f"label tokens in the first batch; reference {ref['logps/chosen[assistant_turn]']:.4f} / "
                f"{ref['logps/rejected[assistant_turn]']:.4f}); TRL also labels the newline the template writes after "
                f"`<|im_end|>` ({labels['trl'][0] if labels['trl'] else '—'} label tokens, one more per sequence; "
                f"reference {ref['logps/chosen[completion]']:.4f} / {ref['logps/rejected[completion]']:.4f}). Largest "
                f"relative difference to the reference: posttrain {fmt_e(worst['posttrain'])}, TRL "
                f"{fmt_e(worst['trl'])} ({'OK' if p['logps_agree'] else 'MISMATCH'}, tolerance 1e-5).", ""]
    lines += ["## Verdict against the target (≤ 0.5× TRL's step time and ≤ 0.5× its peak memory)", "",
              "posttrain's default row against TRL's fastest row (step time including any reference pass) and "
              "TRL's smallest row (peak RSS" + (", peak tensors" if tensors else "") + "); TRL's own default in "
              "brackets.", "",
              "| case | posttrain row | step time vs TRL fastest | peak RSS vs TRL smallest | "
              + ("peak tensors vs TRL smallest | " if tensors else "") + "met? |",
              "|---|---|---|---|" + ("---|" if tensors else "") + "---|"]
    for vd in report["verdicts"]:
        d = vd.get("vs_trl_default") or {}
        checks = [("time", vd["time_target_met"]), ("RSS", vd["rss_target_met"])]
        if "tensor_target_met" in vd:
            checks.append(("tensors", vd["tensor_target_met"]))
        missed = [name for name, ok in checks if not ok]
        met = ("parity failed" if vd.get("parity_ok") is False else
               "yes" if not missed else f"no ({', '.join(missed)})")
        lines.append(f"| {SHORT[vd['case']]} | "
                     f"{vd['posttrain_row']} | {fmt(vd['time_ratio_vs_fastest'], 2)}× ({vd['trl_fastest']}; vs TRL "
                     f"default {fmt(d.get('step_time_with_precompute'), 2)}×) | {fmt(vd['rss_ratio_vs_smallest'], 2)}× "
                     f"({vd['trl_smallest']}; vs TRL default {fmt(d.get('peak_rss'), 2)}×) | "
                     + (f"{fmt(vd['tensor_ratio_vs_least'], 2)}× ({vd['trl_least_tensors']}; vs TRL default "
                        f"{fmt(d.get('peak_tensors'), 2)}×) | " if "tensor_target_met" in vd else "") + f"{met} |")
    lines.append("")
    lines += warning_lines(report)
    lines += ["How it is measured and what differs between the tools: `benchmarks/README.md`. Raw numbers: "
              f"`{path.with_suffix('.json').name}`.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    driver_arguments(parser, cache="dpo_cpu", runs=DEFAULT_RUNS, steps=20, warmup=2,
                     runs_help="comma-separated case:tool:variant, run in this order each round")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--name", default="dpo_cpu", help="results/NAME.md and NAME.json")
    parser.add_argument("--tensor-memory", type=int, choices=[0, 1],
                        default=int(os.environ.get("BENCH_TENSOR_MEMORY", "1")),
                        help="after the timed rounds, one untimed run per row that tracks live CPU tensor bytes")
    args = parser.parse_args()
    args.work = args.cache.parent / "dpo_work"  # scratch, gitignored; results/ keeps only the report
    args.work.mkdir(parents=True, exist_ok=True)
    assets = json.loads((args.cache / "assets.json").read_text())
    if assets["rows"] != args.steps * args.batch_size:
        print(f"note: {assets['rows']} rows but {args.steps} steps × batch {args.batch_size}: the reference pass "
              "covers the whole file, the steps one epoch only if these agree", flush=True)
    t0 = time.time()
    print("[reference] float64 log-probs of the first batch, no tool code", flush=True)
    reference = child("dpo_full", "reference", "-", args, args.work / "reference.json", args.work / "reference.log")
    plan = [tuple(item.split(":", 2)) for item in args.runs.split(",") if item]
    results: dict[tuple[str, str, str], list[dict]] = {key: [] for key in plan}
    for round_index in range(args.rounds):
        for case, tool, variant in plan:
            name = f"{case}-{tool}-{variant}-r{round_index}"
            print(f"[round {round_index + 1}/{args.rounds}] {case} {tool}:{variant} ...", end=" ", flush=True)
            r = child(case, tool, variant, args, args.work / f"{name}.json", args.work / f"{name}.log")
            timed = r["step_times_s"][args.warmup:]
            pre = f", reference pass {r['precompute_s']:.1f} s" if r.get("precompute_s") else ""
            print(f"{1000 * statistics.fmean(timed):.0f} ms/step{pre}, peak RSS {r['peak_rss_mib']:.0f} MiB, "
                  f"step-0 loss {r['losses'][0]:.6f}, tokens {r['tokens'][:4]}…, load {r['loadavg_1min_before']:.1f} "
                  f"({r['child_wall_s']:.0f} s)", flush=True)
            results[(case, tool, variant)].append(r)
    tracked: dict[tuple[str, str, str], dict] = {}
    for case, tool, variant in plan if args.tensor_memory else []:
        name = f"{case}-{tool}-{variant}-tensors"
        print(f"[tensors] {case} {tool}:{variant} ...", end=" ", flush=True)
        r = child(case, tool, variant, args, args.work / f"{name}.json", args.work / f"{name}.log", ("--tensor-memory",))
        print(f"peak {r['peak_tensor_mib']:.0f} MiB of live tensors (set-up {r['peak_setup_tensor_mib']:.0f}, steps "
              f"{r['peak_steps_tensor_mib']:.0f}, {r['tensor_mib_at'].get('train_begin', 0):.0f} when training begins, "
              f"{r['peak_process_tensor_mib']:.0f} with what follows the last step), step-0 loss {r['losses'][0]:.6f} "
              f"({r['child_wall_s']:.0f} s)", flush=True)
        tracked[(case, tool, variant)] = {key: r[key] for key in (
            "peak_tensor_mib", "peak_setup_tensor_mib", "peak_steps_tensor_mib", "peak_process_tensor_mib",
            "end_tensor_mib", "tensor_mib_at", "allocations", "losses")}

    rows = [{"case": case, "tool": tool, "variant": variant,
             "note": NOTES.get((case, tool, variant), NOTES.get((tool, variant), variant)),
             "summary": summarize(runs, args.warmup, args.steps, tracked.get((case, tool, variant))), "runs": runs,
             "tensor_run": tracked.get((case, tool, variant))}
            for (case, tool, variant), runs in results.items()]
    cases = [c for c in CASES if any(row["case"] == c for row in rows)]
    parities = [parity(c, [row for row in rows if row["case"] == c], reference) for c in cases]
    ratios = {**RATIOS, **(TENSOR_RATIO if args.tensor_memory else {})}
    all_ratios = [r for c in cases for r in ratio_rows(c, [row for row in rows if row["case"] == c], ratios)]
    verdicts = [v for c, p in zip(cases, parities)
                if (v := verdict(c, [row for row in rows if row["case"] == c], [r for r in all_ratios if r["case"] == c],
                                 p))]
    warnings = timing_warnings(rows, SPREAD_WARNING, "mean")
    warnings += [f"{row['case']} {row['tool']}:{row['variant']}: the tensor-tracking run's losses differ from the timed "
                 "runs'" for row in rows if row["summary"]["tensor_run_losses_match"] is False]
    warnings += parity_warnings(parities)
    report = {
        "command": os.environ.get("DPO_BENCH_CMD", "bash benchmarks/run_dpo_bench.sh"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "total_wall_s": time.time() - t0,
        "versions": versions(PACKAGES),
        "assets": assets,
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch_size": args.batch_size,
                     "max_length": args.max_length, "lr": args.lr, "schedule": "constant", "max_grad_norm": 1.0,
                     "beta": 0.1, "order": args.runs, "tensor_memory": bool(args.tensor_memory)},
        "rows": rows,
        "reference_logps_first_batch": reference,
        "ratios": all_ratios,
        "parity": parities,
        "verdicts": verdicts,
        "warnings": warnings,
    }
    save_report(report, args.results, args.name, write_markdown)
    exit_on_parity_failure(parities)


def exit_on_parity_failure(parities: list[dict]) -> None:
    """After the page is written: a case whose parity failed fails the run (`common.exit_on_parity_failure`)."""
    common_exit_on_parity_failure([p["case"] for p in parities if not parity_ok(p)])


if __name__ == "__main__":
    main()
