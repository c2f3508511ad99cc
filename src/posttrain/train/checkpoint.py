"""Crash-safe checkpoints: safetensors + JSON only (no pickle), committed by rename.

A checkpoint is written into `checkpoints/.tmp-step-N/`, completed with `manifest.json`
(listing every file and its size), then renamed to `checkpoints/step-N/`. A directory
without a manifest whose sizes match is incomplete and never resumed from. Old
checkpoints are pruned only after the new one is committed.

Contents: trainable weights, AdamW state, loop state (step, data position, counters)
and every process's RNG states — enough for a resumed run to end bitwise equal to an
uninterrupted one on CPU.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from posttrain.errors import NoRoom

MANIFEST = "manifest.json"
PREFIX = "step-"
TRAINABLE = "trainable.safetensors"  # the trained weights alone (no config.json: not a model to start from)
LOOP_STATE = "loop_state.json"


def is_checkpoint(directory: Path) -> bool:
    """A directory `save` wrote: trained weights with the optimizer and loop state that resume them."""
    return (directory / LOOP_STATE).is_file() and (directory / TRAINABLE).is_file()


# --------------------------------------------------------------------------- state <-> files


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint lacks trainable parameters, e.g. {missing[:3]}")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (to safetensors) and everything else (to JSON), keyed "param/key[/subkey…]".

    Per-parameter states may nest: bitsandbytes' 8-bit optimizers keep their quantisation
    tensors in a sub-dict of each parameter's state."""
    tensors, plain = {}, {"param_groups": state["param_groups"], "scalars": {}}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}/{key}", inner)
        elif torch.is_tensor(value):
            tensors[prefix] = value.detach().contiguous().cpu()
        else:
            plain["scalars"][prefix] = value

    for index, per_param in state["state"].items():
        walk(str(index), per_param)
    return tensors, plain


def _join_optimizer_state(tensors: dict[str, torch.Tensor], plain: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(plain["scalars"].items()):
        index, *path = flat.split("/")
        node = state.setdefault(int(index), {})
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return {"state": state, "param_groups": plain["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda{i}"] = s
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    version, internal, gauss = random.getstate()
    plain = {
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss],
    }
    return tensors, plain


def restore_rng(tensors: dict[str, torch.Tensor], plain: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda"))]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    kind, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))


# --------------------------------------------------------------------------- directories


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:07d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, meta: dict) -> None:
    files = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.name != MANIFEST}
    for name in files:
        with open(directory / name, "rb") as handle:
            os.fsync(handle.fileno())
    with open(directory / MANIFEST, "w", encoding="utf-8") as handle:
        json.dump({"files": files, **meta}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())


def problems(directory: Path) -> list[str]:
    """What keeps `directory` from being a complete checkpoint, one entry per fault ("no
    manifest.json", "rng-rank0.json missing", "optimizer.safetensors: 100 bytes, manifest says
    7393328"); [] when it is complete. A copy interrupted, or a disk that lost a file's tail,
    leaves a valid manifest over files cut short: the fault is then the file, not the manifest."""
    if not directory.is_dir():
        return ["no such directory" if not directory.exists() else "not a directory"]
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        return [f"no {MANIFEST}"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{MANIFEST} unreadable or without its list of files"]
    if not isinstance(files, dict):
        return [f"{MANIFEST} unreadable or without its list of files"]
    found = []
    for name, size in files.items():
        try:
            actual = (directory / name).stat().st_size if (directory / name).is_file() else None
        except OSError:  # removed meanwhile
            actual = None
        if actual is None:
            found.append(f"{name} missing")
        elif actual != size:
            found.append(f"{name}: {actual} bytes, manifest says {size}")
    return found


def is_complete(directory: Path) -> bool:
    return not problems(directory)


def _step_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.glob(f"{PREFIX}*") if p.is_dir()) if root.is_dir() else []


def incomplete(root: Path) -> dict[Path, list[str]]:
    """The committed checkpoints under `root` that are not complete, oldest first, each with its
    `problems`: those `latest_complete` passes over, and `drop_after` or `clear` removes. A save
    that dies leaves only a `.tmp-` directory (not listed): a step directory is damaged afterwards."""
    return {p: found for p in _step_dirs(root) if (found := problems(p))}


def latest_complete(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, passing over incomplete ones (`incomplete`
    names them and what is wrong with each); None when there is none."""
    return next((p for p in reversed(_step_dirs(root)) if is_complete(p)), None)


def prune(root: Path, keep_last: int) -> None:
    steps = [p for p in root.glob(f"{PREFIX}*") if p.is_dir()]
    complete = sorted(p for p in steps if is_complete(p))
    for old in complete[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in [p for p in steps if p not in complete] + list(root.glob(".tmp-*")):  # left by a killed writer
        shutil.rmtree(stale, ignore_errors=True)


def drop_after(root: Path, step: int) -> int:
    """On resume from `step`: remove the checkpoints of later steps (an abandoned continuation)
    and every incomplete one (a damaged checkpoint, newer or older, which the resume passed
    over: `incomplete` names them first). Left there, a later save would meet its own step's
    directory, and pruning would keep the abandoned run's newer steps over the resumed run's.
    Returns how many."""
    dropped = [p for p in _step_dirs(root)
               if (p.name[len(PREFIX):].isdigit() and int(p.name[len(PREFIX):]) > step) or not is_complete(p)]
    for directory in dropped:
        shutil.rmtree(directory, ignore_errors=True)
    return len(dropped)


def write_whole(target: Path, write) -> Path:
    """Fill a directory by `write(directory)` in a temporary sibling, then put it in `target`'s
    place: a run's final/ holds one run's files, never the new model beside an earlier run's
    adapter (a fresh start over another method), and a crash while writing leaves the old one.
    Swapped by two renames: the old directory is moved aside first (rename cannot replace a
    non-empty directory), then removed. A full disk while writing is said naming `target`
    (`errors.NoRoom`), and the partial copy is removed: it would only hold the space."""
    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    for leftover in (tmp, old):  # a writer killed earlier
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        write(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                with open(path, "rb") as handle:
                    os.fsync(handle.fileno())
    except Exception as exc:
        no_room = NoRoom.of(exc, target)
        if no_room is None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        raise no_room from exc
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target


def clear(root: Path) -> int:
    """Remove every checkpoint under `root` (a fresh start must not later resume from, or be
    pruned around, an earlier run's checkpoints); returns how many were removed, complete or not
    (`incomplete` names the damaged ones first)."""
    if not root.is_dir():
        return 0
    removed = len(_step_dirs(root))
    shutil.rmtree(root)
    return removed


# --------------------------------------------------------------------------- save / load


def save(root: Path, step: int, *, model, optimizer, loop_state: dict, rank: int, world_size: int,
         barrier, keep_last: int, stage_state: tuple[dict, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write checkpoint `step` from every rank (rank 0 writes weights and optimizer).

    `stage_state` (plain values, tensors) is what a stage needs beyond the weights to resume
    exactly (PPO: the KL coefficient, the rollout being trained on); rank 0 writes it."""
    tmp = root / f".tmp-{PREFIX}{step:07d}"
    final = step_dir(root, step)
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    try:
        tensors, plain = rng_state()
        save_file(tensors, str(tmp / f"rng-rank{rank}.safetensors"))
        (tmp / f"rng-rank{rank}.json").write_text(json.dumps(plain), encoding="utf-8")
        if rank == 0:
            save_file(trainable_state(model), str(tmp / TRAINABLE))
            opt_tensors, opt_plain = _split_optimizer_state(optimizer.state_dict())
            save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
            (tmp / "optimizer.json").write_text(json.dumps(opt_plain), encoding="utf-8")
            (tmp / LOOP_STATE).write_text(json.dumps(loop_state, indent=1), encoding="utf-8")
            if stage_state is not None:
                (tmp / "stage_state.json").write_text(json.dumps(stage_state[0], indent=1), encoding="utf-8")
                save_file(stage_state[1], str(tmp / "stage_state.safetensors"))
        barrier()
        if rank == 0:
            write_manifest(tmp, {"step": step, "world_size": world_size})
    except Exception as exc:  # a full disk, most often: the partial checkpoint would only hold its space
        shutil.rmtree(tmp, ignore_errors=True)
        no_room = NoRoom.of(exc, final)  # one line naming the checkpoint, not safetensors' traceback
        if no_room is None:
            raise
        raise no_room from exc
    if rank == 0:
        if final.exists():  # a damaged or abandoned checkpoint of this step: os.replace cannot replace a directory
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        prune(root, keep_last)
    barrier()
    return final


def load_optimizer_state(optimizer, state_dict: dict) -> None:
    """The checkpoint's moments and step counts, the run's own hyperparameters: torch's
    load_state_dict also restores each group's lr / base_lr / weight decay / betas from the
    checkpoint, so a run resumed with another `train.lr` would keep the old rate while logging
    the new one. The groups are those the current config built."""
    settings = [{key: value for key, value in group.items() if key != "params"} for group in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, values in zip(optimizer.param_groups, settings):
        group.update(values)


def load(directory: Path, *, model, optimizer, rank: int) -> dict:
    """Restore weights, optimizer and this rank's RNG; return the loop state."""
    load_trainable_state(model, load_file(str(directory / TRAINABLE)))
    opt_plain = json.loads((directory / "optimizer.json").read_text(encoding="utf-8"))
    load_optimizer_state(optimizer, _join_optimizer_state(load_file(str(directory / "optimizer.safetensors")), opt_plain))
    rng_file = directory / f"rng-rank{rank}.safetensors"
    if rng_file.is_file():  # a different world size resumes without this rank's RNG
        states = json.loads((directory / f"rng-rank{rank}.json").read_text(encoding="utf-8"))
        restore_rng(load_file(str(rng_file)), states)
    return json.loads((directory / LOOP_STATE).read_text(encoding="utf-8"))


def load_stage_state(directory: Path) -> tuple[dict, dict[str, torch.Tensor]] | None:
    """The stage's own state saved beside the weights, or None when the stage saved none."""
    if not (directory / "stage_state.json").is_file():
        return None
    plain = json.loads((directory / "stage_state.json").read_text(encoding="utf-8"))
    return plain, load_file(str(directory / "stage_state.safetensors"))
