"""Errors meant for people: one line naming what is wrong, where, and how to fix it.

The CLI prints a `UserError` as `error: <message>` and exits with code 2, with no
traceback. Anything else that escapes is a bug in posttrain and keeps its traceback.
"""

from __future__ import annotations

import errno
import os
import re


class UserError(Exception):
    """A problem with the user's config, data or environment (exit code 2)."""

    exit_code = 2


class ConfigError(UserError):
    """An unknown, mistyped or out-of-range config value."""


class DataError(UserError):
    """Malformed or unusable training data."""


class NoRoom(UserError):
    """Outputs that did not fit: a full disk (ENOSPC), a disk quota (EDQUOT) or a file-size
    limit (EFBIG, `ulimit -f`). The commonest environment failure of a long job, said in one
    line naming the path, not as a traceback."""

    ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)})  # no EDQUOT on Windows

    @classmethod
    def of(cls, exc: BaseException, path=None) -> "NoRoom | None":
        """`exc` as a NoRoom naming `path` (else the file the error names), or None when it is
        another failure. Takes an OSError, or safetensors' SafetensorError, which carries the
        OS error in its text only ("I/O error: File too large (os error 27)")."""
        if isinstance(exc, NoRoom):
            return exc
        if isinstance(exc, OSError):
            code, reason, where = exc.errno, exc.strerror, path or exc.filename
        elif type(exc).__name__ == "SafetensorError" and (found := re.search(r"\(os error (\d+)\)", str(exc))):
            code = int(found.group(1))
            reason, where = os.strerror(code), path
        else:
            return None
        if code not in cls.ERRNOS:
            return None
        return cls(f"cannot write {where or 'an output file'}: {reason or os.strerror(code)}; free some space (or "
                   "raise the quota / file-size limit) and run the same command again")


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
