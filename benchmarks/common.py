"""Helpers every benchmark script shares: process clocks and memory, the step clock and the
hooks that read it, the driver's child runs, warnings and report files, the measured commit
and versions, number formatting. Standard library only at import time (it runs in any venv;
the few helpers that need transformers or posttrain import them when called); nothing here
is imported by posttrain."""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from importlib import metadata
from itertools import pairwise
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def read_rows(path: str | Path) -> list[dict]:
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


# --------------------------------------------------------------------------- child runs (bench.py)


def import_modules(names: list[str]) -> float:
    """Import a tool's whole run-time module set; returns the RSS afterwards (MiB)."""
    import importlib

    for name in names:
        importlib.import_module(name)
    return current_rss_mib()


class StepClock:
    """Wall and CPU clock read once at the end of every optimizer step. `sync`, when given,
    runs before each reading (torch.cuda.synchronize: GPU work is asynchronous, the step ends
    when its kernels have); `on_start` / `on_tick`, when given, run when the clock starts / after
    each reading."""

    def __init__(self, sync=None, on_start=None, on_tick=None):
        self.sync, self.on_start, self.on_tick = sync, on_start, on_tick
        self.begin = self.cpu_begin = None
        self.ends: list[float] = []
        self.cpu_ends: list[float] = []

    def start(self):
        if self.on_start is not None:
            self.on_start()
        self.begin, self.cpu_begin = time.perf_counter(), cpu_seconds()

    def tick(self):
        if self.sync is not None:
            self.sync()
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(cpu_seconds())
        if self.on_tick is not None:
            self.on_tick()

    def step_times(self) -> tuple[list[float], list[float]]:
        walls, cpus = [self.begin, *self.ends], [self.cpu_begin, *self.cpu_ends]
        return [b - a for a, b in pairwise(walls)], [b - a for a, b in pairwise(cpus)]


class TensorMemory:
    """The bytes of live CPU tensors, tracked from `start()` on: torch's profiler with
    `profile_memory=True` reports every allocation and free of torch's CPU allocator (the
    allocator of every CPU tensor: weights, gradients, optimizer state, activations, logits,
    a reference copy), and `result()` replays them in time order. The CPU analogue of
    `torch.cuda.max_memory_allocated`: it counts tensors only, so the libraries, the Python
    heap and the allocator's own slack that dominate peak RSS on a small model are left out.
    Deterministic for a given run, unlike RSS and timings. The profiler slows the run, so a
    run that tracks this is not a timed run. `mark(name)` records a named moment whose live
    bytes `result()` reports too; the marks `train_begin` and `step_end` (each optimizer step's
    end) split the peak into the set-up (model loading, any reference pass) and the steps, and
    leave out what follows the last step (a final save: its copies are CPU tensors that a GPU
    run would not count either)."""

    MARK = "bench-mark:"

    def __init__(self):
        self.profiler = None

    def start(self):
        from torch.profiler import ProfilerActivity, profile

        # Started before any tensor the run keeps exists: a block allocated before profiling
        # starts would never be counted, and its free would be dropped.
        self.profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self.profiler.__enter__()

    def mark(self, name: str):
        if self.profiler is not None:
            from torch.profiler import record_function

            with record_function(self.MARK + name):
                pass

    def result(self) -> dict:
        """MiB of live tensors: `peak_tensor_mib` (from the start to the end of the last step),
        `peak_setup_tensor_mib` (before training begins), `peak_steps_tensor_mib` (during the
        steps), `peak_process_tensor_mib` (to the end, a final save included), `end_tensor_mib`;
        `tensor_mib_at` {mark: live MiB at its last occurrence}; `allocations` (a count)."""
        self.profiler.__exit__(None, None, None)
        events = self.profiler.profiler.kineto_results.events()
        # by time only: events of one nanosecond keep the order they were recorded in
        timeline = sorted(((e.start_ns(), e.name(), e.nbytes() if e.name() == "[memory]" else 0)
                           for e in events if e.name() == "[memory]" or e.name().startswith(self.MARK)),
                          key=lambda item: item[0])
        live = allocations = 0
        peak = {"setup": 0, "steps": 0, "after": 0}
        phase, at = "setup", {}
        for _, name, nbytes in timeline:
            if name == "[memory]":
                live += nbytes
                allocations += nbytes > 0
                peak[phase] = max(peak[phase], live)
                continue
            mark = name[len(self.MARK):]
            at[mark] = live / 2**20
            if mark == "train_begin":
                phase = "steps"
            elif mark == "step_end":
                # what follows a step belongs to the steps only if another step ends after it
                peak["steps"], peak["after"] = max(peak["steps"], peak["after"]), 0
                phase = "after"
        mib = {key: value / 2**20 for key, value in peak.items()}
        return {"peak_tensor_mib": max(mib["setup"], mib["steps"]), "peak_setup_tensor_mib": mib["setup"],
                "peak_steps_tensor_mib": mib["steps"], "peak_process_tensor_mib": max(mib.values()),
                "end_tensor_mib": live / 2**20, "tensor_mib_at": at, "allocations": allocations}


def trainer_hooks(clock: StepClock, logged: list[dict]):
    """A transformers TrainerCallback: starts `clock` when training begins, ticks it at the end
    of every optimizer step, and appends every log record that carries a training loss to
    `logged` (with its global step)."""
    from transformers import TrainerCallback

    class Hooks(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock.start()

        def on_step_end(self, *a, **k):
            clock.tick()

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                logged.append({"step": state.global_step, **logs})

    return Hooks()


def clock_posttrain_steps(clock: StepClock) -> dict:
    """The same clock on the posttrain side: ticked at the end of every optimizer step
    (RunLogger.advance runs once per step, after the step's metrics are logged); started when
    the loop's train() begins, the moment TRL's on_train_begin fires. Patches posttrain's
    modules in this process (the run_* entry points import train from the loop module at call
    time). Returns a dict that receives the RSS and peak RSS at that moment
    (`rss_before_train`, `peak_before_train`)."""
    from posttrain.train import loop
    from posttrain.train import metrics as pt_metrics

    original_advance = pt_metrics.RunLogger.advance
    original_train = loop.train
    state: dict = {}

    def timed_advance(self, record):
        clock.tick()
        return original_advance(self, record)

    def timed_train(*a, **k):
        state["rss_before_train"], state["peak_before_train"] = current_rss_mib(), peak_rss_mib()
        clock.start()
        return original_train(*a, **k)

    pt_metrics.RunLogger.advance = timed_advance
    loop.train = timed_train
    return state


def posttrain_step_records(run_dir: Path) -> list[dict]:
    """posttrain's own per-step records (metrics.jsonl lines with a loss and a step time)."""
    return [r for r in read_rows(Path(run_dir) / "metrics.jsonl") if "loss" in r and "step_time_s" in r]


def process_facts(load_before: float, process_start: float) -> dict:
    """What every child records about its process once training is done, in this order."""
    import torch

    return {"loadavg_1min_before": load_before, "loadavg_1min_after": os.getloadavg()[0],
            "peak_rss_mib": peak_rss_mib(), "torch_threads": torch.get_num_threads(),
            "process_wall_s": time.perf_counter() - process_start, "python": sys.version.split()[0]}


def write_result(path: str | Path, result: dict) -> None:
    """The child's JSON for the driver, and its scalar fields on stdout (the log)."""
    Path(path).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (list, dict))}))


# --------------------------------------------------------------------------- drivers (report.py)

CHILD_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false"}


def driver_arguments(parser, *, cache: str, runs: str, runs_help: str, steps: int, warmup: int) -> None:
    """The knobs every CPU driver shares: BENCH_RUNS, BENCH_ROUNDS and BENCH_STEPS from the
    environment, the asset cache under benchmarks/.cache/CACHE, the results folder."""
    parser.add_argument("--cache", type=Path, default=BENCH / ".cache" / cache)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--runs", default=os.environ.get("BENCH_RUNS", runs), help=runs_help)
    parser.add_argument("--rounds", type=int, default=int(os.environ.get("BENCH_ROUNDS", "2")))
    parser.add_argument("--steps", type=int, default=int(os.environ.get("BENCH_STEPS", str(steps))))
    parser.add_argument("--warmup", type=int, default=warmup)


def run_child(cmd: list[str], label: str, out: Path, log: Path, env: dict, tail: int = 20) -> dict:
    """Run one child (stdout and stderr to `log`), read the JSON it wrote to `out` and add its
    wall time as seen from here (`child_wall_s`). A failed child ends the driver with the
    log's last `tail` lines."""
    started = time.time()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, check=False, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **env})
    if proc.returncode != 0:
        lines = log.read_text().splitlines()[-tail:]
        raise SystemExit(f"{label} failed (exit {proc.returncode}); log {log}:\n" + "\n".join(lines))
    result = json.loads(out.read_text())
    result["child_wall_s"] = time.time() - started
    return result


def mean_loadavg(run: dict) -> float:
    """A child's 1-min load average: the mean of the readings before and after its training."""
    return (run["loadavg_1min_before"] + run["loadavg_1min_after"]) / 2


def repeat_spread(per_run: list[dict], key: str) -> float:
    """Slowest over fastest repeat of one row (1.0 for a single repeat)."""
    return max(p[key] for p in per_run) / min(p[key] for p in per_run) if len(per_run) > 1 else 1.0


def ratio_rows(case: str, rows: list[dict], metrics: dict[str, str]) -> list[dict]:
    """Every posttrain row against every TRL row of one case: for each name in `metrics`, the
    ratio posttrain / TRL of the summary value it names."""
    out = []
    for mine in (row for row in rows if row["tool"] == "posttrain"):
        a = mine["summary"]
        for theirs in (row for row in rows if row["tool"] == "trl"):
            b = theirs["summary"]
            out.append({"case": case, "ours": mine["variant"], "vs": theirs["variant"],
                        **{name: a[key] / b[key] for name, key in metrics.items()}})
    return out


def checks_hold(parity: dict, checks) -> bool:
    """A case's parity holds: none of its `checks` (keys of the parity record) failed. A check the
    run could not make (None or absent: a GPU run has no float64 reference, an older results file
    lacks a newer check) is not a failure."""
    return all(parity.get(key) is not False for key in checks)


def exit_on_parity_failure(failed_cases: list[str]) -> None:
    """After the page is written (it keeps the evidence): a failed parity check fails the run, with
    a non-zero exit, since the page's ratios then compare tools that did not do the same work. Every
    driver's verdict for such a case claims no target met ("parity failed")."""
    if failed_cases:
        raise SystemExit(f"parity check failed for {', '.join(failed_cases)}: the tools did not train the same thing, "
                         "so the page's ratios compare nothing (see its Warnings)")


def busy_load(rows: list[dict]) -> float | None:
    """The highest 1-min load average over every repeat of every row, when it is above what the
    runs' own 2 threads explain on this machine; None otherwise."""
    loads = [p["loadavg"] for row in rows for p in row["summary"]["per_run"]]
    if loads and max(loads) > 1.5 * (os.cpu_count() or 2) / 2 + 0.5:
        return max(loads)
    return None


def timing_warnings(rows: list[dict], spread_limit: float, statistic: str) -> list[str]:
    """A busy machine, and rows whose repeats' `statistic` (mean, median) step times differ by
    more than `spread_limit`."""
    warnings = []
    load = busy_load(rows)
    if load is not None:
        warnings.append(f"the machine was busy during some runs (1-min load average up to {load:.1f} on "
                        f"{os.cpu_count()} CPUs; each run's own 2 threads give ~2): wall-clock numbers of those runs "
                        "are inflated by other processes; compare the per-repeat numbers and CPU-ms/step")
    for row in rows:
        if row["summary"]["repeat_spread"] > spread_limit:
            warnings.append(f"{row['case']} {row['tool']}:{row['variant']}: the repeats' {statistic} step times "
                            f"differ by {row['summary']['repeat_spread']:.2f}× (disturbed timing)")
    return warnings


def report_header(title: str, command: str, report: dict, packages: tuple[str, ...]) -> list[str]:
    """The results page's title, how it was generated, and the versions of `packages` (in that
    order), posttrain with its commit, Python and the machine."""
    v = report["versions"]
    return [f"# {title}", "",
            f"Generated by `{command}` on {report['date']} in {report['total_wall_s'] / 60:.1f} min.", "",
            "Versions: " + ", ".join(f"{name} {v[name]}" for name in packages)
            + f", posttrain {v['posttrain']} ({v['posttrain_commit']}), Python {v['python']}; {v['machine']}.", ""]


def warning_lines(report: dict) -> list[str]:
    """The results page's list of warnings (nothing when there are none)."""
    if not report.get("warnings"):
        return []
    return ["Warnings:", ""] + [f"- {w}" for w in report["warnings"]] + [""]


def save_report(report: dict, results: Path, name: str, write_markdown) -> None:
    """RESULTS/NAME.json (every raw number) and RESULTS/NAME.md; the page is printed too."""
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{name}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, results / f"{name}.md")
    print((results / f"{name}.md").read_text())


def git_describe() -> str:
    """The posttrain commit measured (read-only git calls), with '+dirty' when src/ has local changes."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def versions(packages: tuple[str, ...]) -> dict:
    out = {"python": platform.python_version(), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
           "posttrain_commit": git_describe()}
    for name in packages:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def fmt(x, digits=1):
    return "—" if x is None else f"{x:,.{digits}f}"


def fmt_e(x):
    return "—" if x is None else f"{x:.1e}"
