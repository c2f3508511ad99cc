"""Run logging: metrics.jsonl (always), a progress bar with ETA, optional accelerate trackers."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from posttrain.files import write_atomically


def peak_memory_mb() -> float:
    """Peak accelerator memory if on GPU, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class RunLogger:
    """Writes one JSON object per line; only the main process writes."""

    def __init__(self, run_dir: Path, *, enabled: bool, accelerator=None, trackers: list[str] = (),
                 total_steps: int = 0, initial_step: int = 0, progress_bar: bool = True):
        self.enabled = enabled
        self.accelerator = accelerator if trackers else None
        self.path = run_dir / "metrics.jsonl"
        self.bar = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
        if enabled and progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True,
                            mininterval=1.0)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.accelerator is not None:
            numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
            self.accelerator.log(numbers, step=record.get("step"))

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps that the restored checkpoint had not reached."""
        if not self.enabled or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
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
            self.bar = None
