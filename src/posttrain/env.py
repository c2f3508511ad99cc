"""`posttrain env`: what a bug report needs — versions, device, threads; and where this process
stands among a launcher's (torchrun / accelerate launch set WORLD_SIZE, RANK, LOCAL_RANK)."""

from __future__ import annotations

import os
import platform
import sys


def launched_processes() -> int:
    """How many processes torchrun / accelerate launch started for this command (1 without them)."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def first_process(of_machine: bool = False) -> bool:
    """Whether this is the launcher's first process (of this machine, `of_machine`): under torchrun
    each process runs the same command line, and a line they would all print alike is printed once."""
    return os.environ.get("LOCAL_RANK" if of_machine else "RANK", "0") == "0"


def describe() -> str:
    import torch

    lines = [f"posttrain   {_version('posttrain')}", f"python      {sys.version.split()[0]} ({platform.platform()})"]
    for name in ("torch", "transformers", "peft", "accelerate", "datasets", "safetensors", "tokenizers"):
        lines.append(f"{name:<11} {_version(name)}")
    for name in ("bitsandbytes", "vllm"):
        lines.append(f"{name:<11} {_version(name)}")
    if torch.cuda.is_available():
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        lines.append(f"device      cuda × {torch.cuda.device_count()} ({names}), bf16={torch.cuda.is_bf16_supported()}")
    else:
        lines.append("device      cpu (no CUDA device visible)")
    lines.append(f"threads     torch {torch.get_num_threads()}, cpu count {os.cpu_count()}")
    return "\n".join(lines)


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"
