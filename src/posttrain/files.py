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
