"""Errors meant for people: one line naming what is wrong, where, and how to fix it.

The CLI prints a `UserError` as `error: <message>` and exits with code 2, with no
traceback. Anything else that escapes is a bug in posttrain and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's config, data or environment (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An unknown, mistyped or out-of-range config value."""


class DataError(UserError):
    """Malformed or unusable training data."""


class TrainingAborted(UserError):
    """The run stopped on purpose (too many non-finite steps, empty label mask, ...)."""

    exit_code = 3


class Stopped(KeyboardInterrupt):
    """Training stopped by a signal after saving a checkpoint where it stopped: Ctrl-C (SIGINT),
    or SIGTERM (what `kill`, `docker stop`, Kubernetes and SLURM's scancel / preemption send).
    The CLI exits 128 + the signal's number (130, 143), as a shell reports a process the signal
    ended."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
