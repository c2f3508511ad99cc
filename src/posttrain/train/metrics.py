"""Run logging: metrics.jsonl (always), progress with ETA, optional accelerate trackers.

Progress is a tqdm bar on a terminal (and in a notebook); where stderr is not one (a batch job's
log file) it is a plain line at most every 10 s (console.Progress, as the data commands write
theirs): a bar's redraws would fill the log with carriage returns. Its rate and ETA count from the
first step (`RunLogger.start_clock`), not from the stage's one-off start before it. What a stage
says while the bar is open goes through it (`through_bar`), never onto the bar's own line.

With train.log_every = N, a training line holds the mean of each per-step figure (loss, grad
norm, the stage's metrics, tokens and step time) over the steps since the previous line, as
HF Trainer averages its loss over logging_steps; `steps_averaged` says how many. tokens_per_s
is the interval's tokens over its time. What describes a moment rather than a step — step,
epoch, lr, the running totals and peaks (`AT_STEP`, and a stage's `metrics_at_step`) — is the
line's own step's. A non-finite (skipped) step is never averaged: it is logged at once with its
own values, after a line for the steps before it.

Every line is strict JSON (jq, JSON.parse): a non-finite figure (NaN, ±inf; Python's json would
write a bare NaN / Infinity) is written as null, and the line's "nonfinite" names each such figure
with its value ({"loss": "nan"}), so a skipped step still says why.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from posttrain.files import write_atomically


def peak_memory_mb() -> float:
    """Peak accelerator memory if on GPU (since `reset_peak_memory`, which a run's RunLogger
    calls), else the process's peak resident set size so far (ru_maxrss: an earlier run in the
    same process counts in; it cannot be reset)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def reset_peak_memory() -> None:
    """Start the accelerator's peak afresh: a run logs its own peak, not that of an earlier stage
    in the same process (a pipeline, tests)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def strict_json(record: dict) -> dict:
    """`record` as strict JSON holds it: each non-finite float (nested ones too, keys dotted)
    becomes None and is named with its value under "nonfinite"; `record` itself is unchanged."""
    found: dict[str, str] = {}

    def clean(value, path: str):
        if isinstance(value, float) and not math.isfinite(value):
            found[path] = repr(value)  # 'nan', 'inf', '-inf'
            return None
        if isinstance(value, dict):
            return {k: clean(v, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    cleaned = clean(record, "")
    return cleaned | {"nonfinite": found} if found else cleaned


AT_STEP = frozenset({"step", "epoch", "lr", "skipped_steps", "peak_mem_mb", "world_size"})


def add_to_interval(interval: dict, record: dict, at_step: frozenset = AT_STEP) -> None:
    """Add a finite step's record to `interval`: plain sums and counts, kept in the loop state so
    that a checkpoint holds them and a resumed run logs the lines an uninterrupted one does."""
    sums = interval.setdefault("sums", {})
    for key, value in record.items():
        if key not in at_step and isinstance(value, (int, float)):
            total, count = sums.get(key, (0.0, 0))
            sums[key] = (total + value, count + 1)
    interval["steps"] = interval.get("steps", 0) + 1
    interval["last"] = record


RATES = {"tokens_per_s": ("tokens", "step_time_s")}  # every stage's; a stage may add its own (Stage.rates)


def close_interval(interval: dict, rates: dict[str, tuple[str, str]] = RATES) -> dict:
    """The line for the steps in `interval` (its last step's record with the per-step figures
    replaced by their means, then the figures only earlier steps had, each the mean over the
    steps that had it), which is emptied. One step's line is its record as it was. Each
    of `rates` (name -> (count, seconds)) is the steps' summed count over their summed seconds:
    a mean of per-step rates overweights the fast steps."""
    sums, last, steps = interval.pop("sums"), interval.pop("last"), interval.pop("steps")
    if steps == 1:
        return last | {"steps_averaged": 1}
    line = {key: sums[key][0] / sums[key][1] if key in sums else value for key, value in last.items()}
    # a figure some steps lack (KTO's per-class ones, in a step without that class; an RL rollout's
    # generation cost, on the step that generated it only): the mean over the steps that have it
    line |= {key: total / count for key, (total, count) in sums.items() if key not in line}
    for rate, (count, seconds) in rates.items():
        if rate in line and count in sums and sums.get(seconds, (0.0,))[0] > 0:
            line[rate] = sums[count][0] / sums[seconds][0]
    return line | {"steps_averaged": steps}


_open_bars: list = []  # the open RunLoggers' tqdm bars (one, in practice), for `through_bar`


def through_bar(say: Callable[[str], None]) -> Callable[[str], None]:
    """`say` (a run's message function: a flushed print on the main process) made safe for what a
    stage says from inside the loop (its hooks: gradual unfreezing's and the adapter schedule's
    `step N: ...`, EWC's Fisher at step 0): while a progress bar is open the message goes through
    it (tqdm.write: the bar cleared, the message written, the bar drawn again), as the loop's own
    do (`RunLogger.message`); a plain print would land on the bar's line. Otherwise `say` itself."""
    def said(text: str) -> None:
        if _open_bars:
            _open_bars[-1].write(text)
        else:
            say(text)

    return said


def _interactive(stream) -> bool:
    """A terminal, or a notebook (whose tqdm is a widget, not carriage returns in a file)."""
    return bool(getattr(stream, "isatty", lambda: False)()) or "ipykernel" in sys.modules


class RunLogger:
    """Writes one JSON object per line; only the main process writes."""

    def __init__(self, run_dir: Path, *, enabled: bool, accelerator=None, trackers: list[str] = (),
                 total_steps: int = 0, initial_step: int = 0, progress_bar: bool = True):
        self.enabled = enabled
        self.accelerator = accelerator if trackers else None
        self.path = run_dir / "metrics.jsonl"
        self.bar = self.lines = None
        reset_peak_memory()  # on every process: each logs (or reports) its own device's peak
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
        if enabled and progress_bar and _interactive(sys.stderr):
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)
            _open_bars.append(self.bar)
        elif enabled and progress_bar:
            from posttrain.console import Progress

            self.lines = Progress(total_steps, "train: step", sys.stderr, unit="steps", initial=initial_step)

    def start_clock(self) -> None:
        """Start the progress rate's (and ETA's) clock now, just before the first step: the work
        between the log's opening and the first step (the stage's `begin`: EWC's Fisher over
        forgetting.fisher_examples rows, distillation targets, the step-0 retain loss) is no step's
        time, and counted in the rate it would read as one (seen: an ETA of 6 s for two 0.1 s steps)."""
        if self.bar is not None:
            self.bar.unpause()  # tqdm's clock restarted from now (nothing has advanced it yet)
        elif self.lines is not None:
            self.lines.start_clock()

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
        if self.accelerator is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=record.get("step"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps that the restored checkpoint had not reached."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line torn by a crash mid-write
            if isinstance(record, dict) and record.get("step", 0) <= step:
                kept.append(line)
        write_atomically(self.path, "".join(line + "\n" for line in kept))  # an interrupt loses nothing

    def advance(self, record: dict) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", refresh=False)
        elif self.lines is not None:
            self.lines.update(record["step"], extra=f"loss {record['loss']:.4f}, lr {record['lr']:.2e}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            _open_bars[:] = [bar for bar in _open_bars if bar is not self.bar]
            self.bar = None
