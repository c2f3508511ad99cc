"""The `posttrain` command's entry point: `cli.main` in a process of its own.

One thing differs from calling `cli.main` in-process. A data command (rlaif, constitutional,
self-instruct, redteam, evaluate's probes) runs its items on worker threads; stopped by Ctrl-C,
it returns at once, while a worker may still be inside a local model's generate. An interpreter
that exits around a thread inside torch ends in SIGABRT ("terminate called without an active
exception") instead of exit 130. The logs are written and closed by then, so the process leaves
without that teardown."""

from __future__ import annotations

import os
import sys
import threading


def _workers_alive() -> bool:
    return any(t.is_alive() and t.name.startswith("posttrain-job-") for t in threading.enumerate())


def run() -> int:
    from posttrain.cli import main

    rc = main()
    if _workers_alive():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc
