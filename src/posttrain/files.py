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


# What a resume checks a file or directory by (`train.runs.run_fingerprint`,
# `models.loading.model_identity`): its contents, not its modification time.
def file_identity(name: str) -> list | str | None:
    """A file as a resume knows it: [size, digest of its contents (`content_digest`)];
    a directory (a datasets save_to_disk) a digest of its files' names, sizes and contents; None
    when it is not there. Contents, not modification times: a copy of the same rows (to a node's
    scratch disk after a preemption, or written again by a script) is the same data."""
    path = Path(os.path.expanduser(name))
    try:
        if path.is_dir():
            return short_digest([[str(f.relative_to(path)), (size := f.stat().st_size), content_digest(f, size)]
                            for f in sorted(path.rglob("*")) if f.is_file()])
        size = path.stat().st_size
        return [size, content_digest(path, size)]
    except OSError:
        return None


_WHOLE_FILE_BYTES = 64 << 20  # files up to this size are digested whole; larger ones by BLOCKS spread evenly
_BLOCKS, _BLOCK_BYTES = 64, 256 << 10


def content_digest(path: Path, size: int) -> str:
    """A digest of a file's bytes: all of them up to _WHOLE_FILE_BYTES (about 0.1 s at 64 MiB),
    else _BLOCKS blocks of _BLOCK_BYTES from its start to its end (a resume of a 100 GB file
    reads 16 MiB; an edit that keeps the size and misses every block goes unseen)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            for k in range(_BLOCKS):
                f.seek((size - _BLOCK_BYTES) * k // (_BLOCKS - 1))
                digest.update(f.read(_BLOCK_BYTES))
    return digest.hexdigest()


def short_digest(value) -> str:
    """The first 16 hex digits of the sha256 of `value`'s JSON (keys sorted): how run fingerprints
    and model identities name a list of figures."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]
