"""Writing a file whole: a crash or a kill leaves the old file or the new one, never half of one."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(path: Path, text: str) -> None:
    """Write `text` beside `path` (PATH.partial), flush it to disk, then rename it over `path`."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)


def write_config(out: Path, cfg) -> None:
    """out/config.yaml: the command's whole resolved config (its seeds among it), so a run says how
    to make it again. A config dataclass holds the names of secrets' variables, never their values."""
    import dataclasses

    import yaml

    write_atomically(Path(out) / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def lock_exclusively(file, refusal: str) -> bool:
    """Take an exclusive flock on the open `file` without waiting, held until the file is closed:
    a second writer (another process, or another open of the file in this one) is refused. Returns
    True once held; False where there is no flock to take (not POSIX, or a file system without
    locks): no protection then. A lock held elsewhere closes `file` and raises UserError(refusal)."""
    import errno

    from posttrain.errors import UserError

    try:
        import fcntl
    except ImportError:  # not POSIX
        return False
    try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False  # no locks on this file system (ENOLCK, EOPNOTSUPP): nothing to refuse on
        file.close()
        raise UserError(refusal) from None
    return True
