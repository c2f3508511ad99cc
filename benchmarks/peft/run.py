"""Parameter-efficient fine-tuning methods side by side: one tiny model, one task, one table.

    .venv/bin/python benchmarks/peft/run.py [--steps 300] [--out benchmarks/results]
                                            [--methods lora,ia3,...] [--seed 0] [--lr METHOD=LR ...]

1. Base model (built once, reused while its config is unchanged): full SFT of the `tiny`
   preset on the synthetic tasks copy + smallest. It has never seen the task `largest`.
2. Every method then trains that base on `largest` for --steps steps, each in a fresh
   child process (this file with --child), so peak RSS is per method.
3. Writes OUT/peft_cpu.md (table) and OUT/peft_cpu.json (every number, per-run configs).

Run directories (base model, one per method) live in --work (default benchmarks/.cache/peft,
gitignored), never in the results folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent

BASE_CONFIG = {
    "model": {"path": "tiny"},
    "data": {"train_files": ["synthetic"], "synthetic_tasks": ["copy", "smallest"], "synthetic_size": 8000,
             "max_length": 64, "eval_fraction": 0.02},
    "train": {"max_steps": 500, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
              "progress_bar": False, "log_every": 50, "resume": "never", "seed": 0},
}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
WARMUP_STEPS = 10  # steps left out of the tokens/s median (allocator and thread-pool warm-up)


def methods(steps: int) -> dict[str, tuple[dict, float]]:
    """name -> (adapter section, learning rate). LRs chosen by a 3-point sweep (see benchmarks/README.md)."""
    a, b = steps // 3, 2 * steps // 3
    return {
        "full": ({"method": ["full"]}, 3e-3),
        "freeze": ({"method": ["freeze"], "freeze": {"top_layers": 1}}, 3e-3),
        "lora": ({"method": ["lora"], "lora": {"r": 8}}, 3e-3),
        "lora+rslora": ({"method": ["lora"], "lora": {"r": 8, "rslora": True}}, 3e-3),
        "lora+": ({"method": ["lora"], "lora": {"r": 8, "lr_ratio_b": 16}}, 1e-3),
        "dora": ({"method": ["dora"], "lora": {"r": 8}}, 3e-3),
        "qlora": ({"method": ["qlora"], "lora": {"r": 8}}, 3e-3),
        "ia3": ({"method": ["ia3"]}, 3e-2),
        "prompt": ({"method": ["prompt"], "virtual_tokens": {"num_virtual_tokens": 16}}, 1e-1),
        "prefix": ({"method": ["prefix"], "virtual_tokens": {"num_virtual_tokens": 16}}, 3e-2),
        "bottleneck": ({"method": ["bottleneck"], "bottleneck": {"size": 32, "where": ["attention", "ffn"]}}, 3e-3),
        "mixed": ({"method": ["lora", "bottleneck", "prompt"], "lora": {"r": 8, "target_modules": ATTN},
                   "bottleneck": {"size": 32, "where": ["ffn"]}, "virtual_tokens": {"num_virtual_tokens": 16},
                   "schedule": ["0:prompt", f"{a}:prompt+lora", f"{b}:all"]}, 1e-3),
    }


def method_config(run_dir: Path, base: Path, adapter: dict, lr: float, steps: int, seed: int) -> dict:
    return {
        "output_dir": str(run_dir), "model": {"path": str(base)}, "adapter": adapter,
        "data": {"train_files": ["synthetic"], "synthetic_tasks": ["largest"], "synthetic_size": 4000,
                 "max_length": 64, "eval_fraction": 0.05},
        "train": {"max_steps": steps, "batch_size": 32, "lr": lr, "warmup_steps": 10, "progress_bar": False,
                  "log_every": 1, "resume": "never", "seed": seed},
        "eval": {"exact_match_prompts": 200},
    }


def child(spec_path: Path) -> None:
    """In a fresh process: run_sft(spec['config']), then write spec['result'] with this process's peak RSS."""
    spec = json.loads(spec_path.read_text())
    started = time.perf_counter()
    if spec.get("threads"):
        import torch
        torch.set_num_threads(spec["threads"])
    from posttrain import SFTConfig, run_sft
    run_dir = run_sft(SFTConfig.from_dict(spec["config"]))
    wall = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    Path(spec["result"]).write_text(json.dumps({"run_dir": str(run_dir), "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime,
                                                "peak_rss_mib": usage.ru_maxrss / 1024}))  # ru_maxrss: KiB on Linux


def launch(name: str, config: dict, work: Path, threads: int = 0) -> dict:
    """Run one config in a child process; return its result, or {'error': ...} with the log's tail."""
    work.mkdir(parents=True, exist_ok=True)
    spec, result, log = work / f"{name}.spec.json", work / f"{name}.result.json", work / f"{name}.log"
    result.unlink(missing_ok=True)
    spec.write_text(json.dumps({"config": config, "result": str(result), "threads": threads}, indent=1))
    load_before = os.getloadavg()[0]
    with log.open("w") as fh:
        proc = subprocess.run([sys.executable, __file__, "--child", str(spec)], stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not result.exists():
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
        return {"error": f"exit {proc.returncode}: " + (lines[-1] if lines else "no output"), "log": str(log)}
    return {**json.loads(result.read_text()), "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0]}


def ensure_base(work: Path, threads: int) -> Path:
    """Build the base model unless work/base/final exists from the same config."""
    base_dir, stamp = work / "base", work / "base.config.json"
    config = {**BASE_CONFIG, "output_dir": str(base_dir)}
    if (base_dir / "final" / "model.safetensors").exists() and stamp.exists() and json.loads(stamp.read_text()) == config:
        print(f"[base] reusing {base_dir / 'final'}", flush=True)
        return base_dir / "final"
    print("[base] full SFT of 'tiny' on copy+smallest, 500 steps ...", flush=True)
    shutil.rmtree(base_dir, ignore_errors=True)
    res = launch("base", config, work, threads)
    if "error" in res:
        raise SystemExit(f"base model failed: {res['error']} (log {res['log']})")
    stamp.write_text(json.dumps(config))
    print(f"[base] done in {res['wall_s']:.0f} s", flush=True)
    return base_dir / "final"


def measure(run_dir: Path, res: dict) -> dict:
    """Read the run's params.json, summary.json and metrics.jsonl into one row."""
    params = json.loads((run_dir / "params.json").read_text())
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "tokens_per_s" in r]
    timed = [r for r in steps if r["step"] > WARMUP_STEPS] or steps
    return {
        "trainable": params["trainable"], "total": params["total"], "percent": params["percent"],
        "trainable_by_method": {k: v["trainable"] for k, v in params.get("by_method", {}).items() if v["trainable"]},
        "state_mib": params.get("memory_mib", {}).get("total"),
        "peak_rss_mib": res["peak_rss_mib"], "loop_peak_mem_mb": max(r["peak_mem_mb"] for r in steps),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
        "step_time_s": statistics.median(r["step_time_s"] for r in timed), "timed_records": len(timed),
        "exact_match_before": summary.get("exact_match_before"), "exact_match_after": summary.get("exact_match_after"),
        "eval_loss": summary.get("eval_loss"), "wall_s": res["wall_s"], "cpu_s": res["cpu_s"],
        "loadavg": (res["loadavg_before"] + res["loadavg_after"]) / 2,
    }


def fmt(v, spec: str, empty: str = "–") -> str:
    return empty if v is None else format(v, spec)


def write_report(out: Path, rows: list[dict], meta: dict) -> str:
    lines = [
        "| method | lr | trainable params | % of total | peak RSS MiB | weights+grads+Adam MiB (est.) "
        "| tokens/s (median) | exact match after | eval loss | run s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['method']} | {fmt(r.get('lr'), 'g')} | {r.get('skipped') or 'FAILED: ' + r['error']} |"
                         " | | | | | | | |")
            continue
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {r['percent']:.2f} | {r['peak_rss_mib']:,.0f} "
                     f"| {fmt(r['state_mib'], '.1f')} | {r['tokens_per_s']:,.0f} | {100 * r['exact_match_after']:.1f}% "
                     f"| {fmt(r['eval_loss'], '.3f')} | {r['wall_s']:.0f} | {r['loadavg']:.1f} |")
    table = "\n".join(lines)
    md = f"""# PEFT methods on CPU: one tiny model, one task, {meta['steps']} steps each

Generated by `{meta['command']}` (`{meta['argv']}`) on {meta['date']} in {meta['total_wall_s'] / 60:.1f} min (seed {meta['seed']}).

Machine: {meta['machine']}.

Setup: base = `tiny` preset after 500 steps of full SFT on synthetic copy+smallest; each method then
trains it on synthetic `largest` (4,000 examples, 5% held out, max_length 64), batch 32, {meta['steps']} steps,
10 warmup steps, cosine schedule, the lr in the table (picked by a 3-point sweep per method, see
benchmarks/README.md). Every method runs in a fresh process.

{table}

- exact match after: held-out `largest` prompts (200), generated and compared exactly; the base model scores
  {meta['base_exact_match']} on them before any method trains (it never saw the task).
- peak RSS: `getrusage(RUSAGE_SELF).ru_maxrss` of the method's child process at its end: imports, model load,
  data preparation, training, both exact-match evaluations and the final save. With a ~1M-parameter model this is
  almost all libraries and allocator state, so differences between methods are small and partly noise.
- weights+grads+Adam: posttrain's own estimate from params.json (activations not included).
- tokens/s: median of the per-step `tokens_per_s` in metrics.jsonl (tokens of the batch / step wall time;
  forward, backward, optimizer), the first {WARMUP_STEPS} steps left out; the mixed row's median runs over its three
  stages. Wall-clock: other load on the machine lowers it. load avg is the 1-minute load average before/after
  each run, which includes the run's own torch threads ({meta['threads']}); much above that, the machine was shared.
- mixed: adapter.method [lora, bottleneck, prompt], lora on q/k/v/o_proj, bottleneck after the FFN,
  schedule {meta['mixed_schedule']}; its trainable count is the union over all stages as params.json gives it
  ({meta['mixed_breakdown']}); earlier stages train fewer.
"""
    (out / "peft_cpu.md").write_text(md)
    (out / "peft_cpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per method (default 300)")
    p.add_argument("--out", type=Path, default=BENCH / "results", help="folder for peft_cpu.md / peft_cpu.json")
    p.add_argument("--work", type=Path, default=BENCH / ".cache" / "peft", help="run directories (base model, per method)")
    p.add_argument("--methods", default="", help="comma-separated subset (default: all), e.g. lora,ia3")
    p.add_argument("--seed", type=int, default=0, help="train.seed of the method runs (the base model always uses 0)")
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override one method's lr")
    p.add_argument("--threads", type=int, default=0, help="torch threads per run (default 0: torch's own default)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child)

    started = time.time()
    table = methods(args.steps)
    chosen = [m.strip() for m in args.methods.split(",") if m.strip()] or list(table)
    unknown = [m for m in chosen if m not in table]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(table)}")
    lrs = {m: lr for m, (_, lr) in table.items()}
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in table:
            raise SystemExit(f"--lr {item}: unknown method {name!r}")
        lrs[name] = float(value)

    import torch
    cuda = torch.cuda.is_available()
    base = ensure_base(args.work, args.threads)
    rows = []
    for name in chosen:
        adapter, lr = table[name][0], lrs[name]
        if name == "qlora" and not cuda:
            rows.append({"method": name, "lr": lr, "skipped": "needs CUDA (bitsandbytes 4-bit); not run on CPU"})
            print(f"[{name}] skipped: needs CUDA", flush=True)
            continue
        run_dir = args.work / "runs" / name
        shutil.rmtree(run_dir, ignore_errors=True)  # fresh dir: with resume=never an old final checkpoint makes the save fail
        res = launch(name, method_config(run_dir, base, adapter, lr, args.steps, args.seed), args.work / "runs",
                     args.threads)
        row = {"method": name, "lr": lr, "adapter": adapter, **(res if "error" in res else measure(run_dir, res))}
        rows.append(row)
        if "error" in row:
            print(f"[{name}] FAILED {row['error']} (log {row['log']})", flush=True)
        else:
            print(f"[{name}] {row['trainable']:,} trainable, {row['tokens_per_s']:,.0f} tok/s, "
                  f"exact match {100 * row['exact_match_after']:.1f}% ({row['wall_s']:.0f} s)", flush=True)

    befores = sorted({r["exact_match_before"] for r in rows if r.get("exact_match_before") is not None})
    argv = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    env = " ".join(f"{k}={os.environ[k]}" for k in ("BENCH_STEPS", "BENCH_SEED") if k in os.environ)
    cmd = (env + " " if env else "") + os.environ["PEFT_BENCH_CMD"] if "PEFT_BENCH_CMD" in os.environ else argv
    meta = {
        "steps": args.steps, "seed": args.seed, "command": cmd, "argv": argv, "cuda": cuda,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "total_wall_s": time.time() - started,
        "threads": args.threads or torch.get_num_threads(),
        "machine": f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__} with "
                   f"{args.threads or torch.get_num_threads()} threads, Python "
                   f"{platform.python_version()}, load average at end {os.getloadavg()[0]:.1f}",
        "base_exact_match": ", ".join(f"{100 * b:.1f}%" for b in befores) or "n/a",
        "mixed_schedule": table["mixed"][0]["schedule"],
        "mixed_breakdown": ", ".join(f"{k} {v:,}" for r in rows if r["method"] == "mixed"
                                     for k, v in r.get("trainable_by_method", {}).items()) or "not run", "lrs": {m: lrs[m] for m in chosen},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    print("\n" + write_report(args.out, rows, meta))
    print(f"\n[done] {meta['total_wall_s']:.0f} s; see {args.out / 'peft_cpu.md'}")


if __name__ == "__main__":
    main()
