"""Parameter-efficient fine-tuning: LoRA through `peft`, merge/export, parameter counts.

LoRA (Hu et al. 2021, Eq. 3): h = W0 x + (alpha / r) · B A x, with A (r × d_in) random,
B (d_out × r) zero at init, so the adapted model starts identical to the base.
"""

from __future__ import annotations

from typing import Any

from posttrain.errors import ConfigError


def _lora_args(lora_cfg: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    from posttrain.config import LoraConfig, section_values

    args = section_values(LoraConfig, lora_cfg, overrides, caller="apply_lora")
    args.pop("enabled")
    if not isinstance(args["r"], int) or args["r"] < 1:
        raise ConfigError(f"lora.r must be a positive integer, got {args['r']!r}")
    if not 0.0 <= float(args["dropout"]) < 1.0:
        raise ConfigError(f"lora.dropout must be in [0, 1), got {args['dropout']!r}")
    targets = args["target_modules"]
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise ConfigError("lora.target_modules is empty; use [all-linear] or module names such as [q_proj, v_proj]")
    # peft wants the string "all-linear", not a list holding it
    args["target_modules"] = "all-linear" if list(targets) == ["all-linear"] else list(targets)
    return args


def _linear_module_names(model) -> list[str]:
    import torch.nn as nn

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)})


def apply_lora(model, lora_cfg: Any = None, **overrides: Any):
    """Wrap `model` in a `peft.PeftModel` with fresh LoRA adapters; base weights are frozen.

    lora_cfg: a `posttrain.config.LoraConfig` (or anything with r, alpha, dropout,
    target_modules) or None; keyword overrides take precedence. target_modules
    ["all-linear"] adapts every linear layer except the output head.
    """
    from peft import LoraConfig, get_peft_model

    args = _lora_args(lora_cfg, overrides)
    peft_config = LoraConfig(
        r=args["r"],
        lora_alpha=float(args["alpha"]),
        lora_dropout=float(args["dropout"]),
        target_modules=args["target_modules"],
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as exc:
        if "not found" not in str(exc) and "Target module" not in str(exc):
            raise
        names = ", ".join(_linear_module_names(model))
        raise ConfigError(
            f"lora.target_modules {args['target_modules']!r} matches no layer of {type(model).__name__}; its linear layers are: {names}"
        ) from None
    checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers 5 name
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    if checkpointing:
        # with frozen embeddings the checkpointed blocks would otherwise see inputs without grad
        peft_model.enable_input_require_grads()
    return peft_model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    trainable = total = 0
    for param in model.parameters():  # parameters() already de-duplicates shared tensors
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
    return trainable, total


def trainable_summary(model) -> str:
    """E.g. "trainable 12,288 / 1,034,752 params (1.19%)"."""
    trainable, total = count_parameters(model)
    percent = 100.0 * trainable / total if total else 0.0
    return f"trainable {trainable:,} / {total:,} params ({percent:.2f}%)"


def merge_lora(model):
    """Fold LoRA weights into the base weights and return the plain transformers model.

    A model that is not a PeftModel is returned unchanged.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        return model
    return model.merge_and_unload()
