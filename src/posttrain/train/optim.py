"""Optimizer parameter groups and learning-rate schedules.

Differential learning rates by layer depth (layer-wise LR decay) and frozen-parameter
selection by name pattern live here; the loop only asks for groups and a factor.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Callable

import torch

from posttrain.errors import ConfigError

# `model.layers.3.` (Llama, Qwen2, Mistral), `transformer.h.3.` (GPT-2)
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "embed_positions")


def freeze_by_pattern(model: torch.nn.Module, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters whose name matches any glob pattern.

    A pattern that matches nothing is almost always a typo, so it is an error.
    Returns the number of parameters frozen.
    """
    frozen = 0
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatch(n, pattern)]
        if not matched:
            example = names[0] if names else "(no parameters)"
            raise ConfigError(f"train.freeze pattern {pattern!r} matches no parameter name (names look like {example!r})")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, p) for p in patterns) and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer layer i, num_layers + 1 for the rest (final norm, head)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in _EMBEDDING_NAMES):
        return 0
    return num_layers + 1


def count_layers(model: torch.nn.Module) -> int:
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))}
    return max(indices) + 1 if indices else 0


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_lr_decay: float,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """AdamW groups: no decay on biases and norms; lr * decay^(depth below the top) per layer,
    times `lr_scale(name)` when given (LoRA+ gives the B matrices a higher rate)."""
    num_layers = count_layers(model)
    groups: dict[tuple[int, bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = layer_depth(name, num_layers)
        scale = layer_lr_decay ** (num_layers + 1 - depth) * (lr_scale(name) if lr_scale else 1.0)
        decay = param.ndim >= 2 and "norm" not in name.lower()
        group = groups.setdefault(
            (depth, decay, scale),
            {"params": [], "names": [], "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0},
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ConfigError("no trainable parameters: check train.freeze and the adapter settings")
    ordered = [groups[key] for key in sorted(groups)]
    for group in ordered:
        group["base_lr"] = group["lr"]
    return ordered


def make_optimizer(model: torch.nn.Module, cfg, lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; cfg.optimizer picks torch's (its per-tensor loop, or its fused
    kernel) or bitsandbytes' (paged) 8-bit one."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay, lr_scale)
    for group in groups:
        del group["names"]  # optimizer state dicts must stay plain
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.adam_betas), "eps": cfg.adam_eps}
    optimizer = getattr(cfg, "optimizer", "adamw")
    if optimizer in ("adamw", "adamw_fused"):
        # The fused kernel updates every tensor of a group in one pass: the same AdamW, 3-5x faster
        # a step on CPU (benchmarks/results/rl_cpu32k.md), but rounded differently in the last bits,
        # so a run's trajectory differs from the per-tensor loop's. Not the default for that reason:
        # the measured outcomes in this repository were made with the loop.
        return torch.optim.AdamW(groups, fused=optimizer == "adamw_fused" or None, **kwargs)
    from posttrain.models.adapters.spec import require_cuda_bitsandbytes

    require_cuda_bitsandbytes(f"train.optimizer={optimizer}")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based): linear warmup, then decay.

    constant: 1; linear: 1 → min_lr_ratio; cosine: min + (1 - min) · ½(1 + cos(π · progress)).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group at its own base rate (layer-wise decay included) times the schedule factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
