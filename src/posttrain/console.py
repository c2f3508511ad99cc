"""The `posttrain` command's entry point (`cli.main` in a process of its own), and what every
command writes to the console for a person or a log file: progress lines.

Two things differ from calling `cli.main` in-process. A data command (rlaif, constitutional,
self-instruct, redteam, evaluate's probes) runs its items on worker threads; stopped by Ctrl-C,
it returns at once, while a worker may still be inside a local model's generate. An interpreter
that exits around a thread inside torch ends in SIGABRT ("terminate called without an active
exception") instead of exit 130. The logs are written and closed by then, so the process leaves
without that teardown. And stdout piped into a reader that stops (`posttrain score ... | head -1`)
ends the command quietly with exit 141, as `cat` or `grep` do, not with a BrokenPipeError."""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import TextIO

OUTPUT_CLOSED = 141  # 128 + SIGPIPE: what a shell reports for `cmd | head` when the pipe ended cmd


def _workers_alive() -> bool:
    return any(t.is_alive() and t.name.startswith("posttrain-job-") for t in threading.enumerate())


def output_closed() -> int:
    """stdout's reader went away: point stdout at /dev/null (the interpreter's own flush at exit
    would meet the closed pipe again: "Exception ignored ... BrokenPipeError") and return 141."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return OUTPUT_CLOSED


def line_buffered(stream: TextIO) -> None:
    """Flush `stream` at each newline when it is not a terminal (a batch job's log file, a pipe):
    Python buffers such a stream in blocks of 8 KiB, so `tail -f job.out` would show a message
    only once a block filled, and a job killed (SIGKILL: the OOM killer, scancel) would lose what
    it had said. A terminal is line-buffered already; a stream without `reconfigure` (a StringIO,
    a notebook's) is left as it is."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is None or getattr(stream, "isatty", lambda: False)():
        return
    try:
        reconfigure(line_buffering=True)
    except (ValueError, OSError):  # a closed or detached stream
        pass


def run() -> int:
    from posttrain.cli import main

    try:
        rc = main()
        sys.stdout.flush()  # here, where a closed pipe can still be answered, not at the interpreter's exit
    except BrokenPipeError:
        rc = output_closed()
    if _workers_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def duration(seconds: float) -> str:
    """42s, 3m05s, 2h10m."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """One status line on `stream`: done/total, rate, ETA (and `extra`, e.g. the last loss).
    Redrawn in place on a terminal; otherwise (a batch job's log file) a plain line at most every
    10 seconds, and one at the end: no carriage returns or clear-line codes in a log. The data
    commands' items and, off a terminal, the training loop's steps use it."""

    def __init__(self, total: int, desc: str, stream: TextIO | None, *, unit: str = "", initial: int = 0):
        self.total, self.desc, self.stream, self.unit = total, desc, stream, unit
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.initial = initial  # done before this process started (a resumed run): not in the rate
        self.start = self.last = time.monotonic()
        self.text = ""

    def start_clock(self) -> None:
        """Start the rate's clock now: what ran before the first item (a training stage's one-off
        start: EWC's Fisher, distillation targets) is not counted as the items' time."""
        self.start = self.last = time.monotonic()

    def update(self, done: int, failed: int = 0, extra: str = "") -> None:
        now = time.monotonic()
        if self.stream is None or (now - self.last < (0.2 if self.tty else 10.0) and done < self.total):
            return
        self.last = now
        rate = (done - self.initial) / max(now - self.start, 1e-9)
        eta = duration((self.total - done) / rate) if rate > 0 else "?"
        name = f"{self.desc} " if self.desc else ""
        unit = f" {self.unit}" if self.unit else ""
        self.text = (f"{name}{done}/{self.total} ({rate:.2f}{unit}/s, ETA {eta}"
                     + (f", {failed} failed" if failed else "") + (f", {extra}" if extra else "") + ")")
        self.stream.write(("\r" + self.text + "\x1b[K") if self.tty else self.text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.text:
            self.stream.write("\n")
            self.stream.flush()
