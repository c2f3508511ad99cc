"""What the `adapter:` config section asks for, normalised and checked before any work.

`adapter.method` names one or more methods. Two are spelled as LoRA variants for the
user's convenience and normalised here: `dora` is LoRA with weight decomposition and
`qlora` is LoRA on a 4-bit NF4 base. `full` (every weight) and `freeze` (only the top
layers / named modules) change the base itself and each stand alone.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import ConfigError

METHODS = ("full", "freeze", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "bottleneck")
WEIGHT_METHODS = ("lora", "ia3")  # injected into the model's linear layers through peft
VIRTUAL_METHODS = ("prefix", "prompt")  # trained virtual tokens in front of the input
MERGEABLE = ("lora", "ia3")  # fold into the base weights exactly


@dataclass(frozen=True)
class Stage:
    """From optimizer step `start` on, only the parameters of `methods` are updated."""

    start: int
    methods: frozenset[str]


@dataclass
class AdapterPlan:
    methods: tuple[str, ...]  # normalised: lora (not dora/qlora), ia3, prefix, prompt, bottleneck, freeze, full
    dora: bool = False
    quantized: bool = False
    schedule: list[Stage] = field(default_factory=list)

    @property
    def is_peft(self) -> bool:
        return any(m not in ("full", "freeze") for m in self.methods)

    def active(self, step: int) -> frozenset[str] | None:
        """Methods trained at optimizer step `step`; None = all of them (no schedule)."""
        current = None
        for stage in self.schedule:
            if stage.start <= step:
                current = stage.methods
        return current


def plan_adapters(adapter_cfg: Any) -> AdapterPlan:
    """Normalise and validate `adapter.method` and `adapter.schedule`. Raises ConfigError."""
    raw = [adapter_cfg.method] if isinstance(adapter_cfg.method, str) else list(adapter_cfg.method)
    if not raw:
        raise ConfigError("adapter.method is empty; use full, or one or more of " + ", ".join(METHODS[1:]))
    for name in raw:
        if name not in METHODS:
            import difflib

            close = difflib.get_close_matches(str(name), METHODS, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"adapter.method: unknown method {name!r}; choose from {', '.join(METHODS)}{hint}")
    if len(set(raw)) != len(raw):
        raise ConfigError(f"adapter.method lists a method twice: {raw}")
    dora = "dora" in raw or bool(adapter_cfg.lora.dora)
    quantized = "qlora" in raw
    methods = tuple(dict.fromkeys("lora" if m in ("dora", "qlora") else m for m in raw))
    if len(methods) != len(raw):
        raise ConfigError(f"adapter.method: lora, dora and qlora are one method in three spellings; pick one of {raw}")
    if "full" in methods and len(methods) > 1:
        raise ConfigError("adapter.method: full trains every weight already; it cannot be combined with other methods")
    if "freeze" in methods and len(methods) > 1:
        raise ConfigError("adapter.method: freeze tuning trains base layers and saves a full model; use it alone")
    if sum(m in WEIGHT_METHODS for m in methods) > 1:
        raise ConfigError("adapter.method: lora and ia3 both rewrite the linear layers; use one of them")
    if sum(m in VIRTUAL_METHODS for m in methods) > 1:
        raise ConfigError("adapter.method: prefix and prompt tuning both add virtual tokens; use one of them")
    if quantized and not all(m in ("lora", "prompt", "prefix", "bottleneck") for m in methods):
        raise ConfigError("adapter.method: qlora keeps the base frozen in 4 bits; freeze tuning cannot train it")
    plan = AdapterPlan(methods=methods, dora=dora, quantized=quantized)
    plan.schedule = _parse_schedule(adapter_cfg.schedule, methods)
    return plan


def _parse_schedule(entries: list[str], methods: tuple[str, ...]) -> list[Stage]:
    if not entries:
        return []
    stages = []
    for entry in entries:
        step_text, _, names_text = str(entry).partition(":")
        try:
            start = int(step_text.strip())
        except ValueError:
            raise ConfigError(f"adapter.schedule entry {entry!r} must look like STEP:method+method, e.g. 0:prompt") from None
        names = [n.strip() for n in names_text.split("+") if n.strip()]
        if not names:
            raise ConfigError(f"adapter.schedule entry {entry!r} names no method")
        if names == ["all"]:
            chosen = frozenset(methods)
        else:
            names = ["lora" if n in ("dora", "qlora") else n for n in names]
            unknown = [n for n in names if n not in methods]
            if unknown:
                raise ConfigError(f"adapter.schedule entry {entry!r}: {', '.join(unknown)} is not in adapter.method {list(methods)}")
            chosen = frozenset(names)
        stages.append(Stage(start, chosen))
    starts = [s.start for s in stages]
    if starts[0] != 0:
        raise ConfigError(f"adapter.schedule must start at step 0 (it starts at {starts[0]})")
    if starts != sorted(set(starts)):
        raise ConfigError(f"adapter.schedule steps must increase: {starts}")
    if "full" in methods:
        raise ConfigError("adapter.schedule stages adapter methods; with method full there is nothing to stage")
    return stages


def validate_adapter(adapter_cfg: Any, *, packing: bool = False, gradient_checkpointing: bool = False,
                     optimizer: str = "adamw") -> AdapterPlan:
    """All adapter checks that can run before loading anything."""
    plan = plan_adapters(adapter_cfg)
    lora, vt, bn, fz = adapter_cfg.lora, adapter_cfg.virtual_tokens, adapter_cfg.bottleneck, adapter_cfg.freeze
    checks = [
        (lora.r >= 1, "adapter.lora.r must be at least 1"),
        (lora.alpha > 0, f"adapter.lora.alpha must be > 0 (scale = alpha / r), got {lora.alpha}"),
        (0.0 <= lora.dropout < 1.0, "adapter.lora.dropout must be in [0, 1)"),
        (bool(lora.target_modules), "adapter.lora.target_modules is empty; use [all-linear] or names such as [q_proj, v_proj]"),
        (lora.lr_ratio_b > 0, "adapter.lora.lr_ratio_b must be positive"),
        (vt.num_virtual_tokens >= 1, "adapter.virtual_tokens.num_virtual_tokens must be at least 1"),
        (vt.init != "text" or bool(vt.init_text.strip()), "adapter.virtual_tokens.init=text needs init_text"),
        (vt.projection_hidden >= 1, "adapter.virtual_tokens.projection_hidden must be at least 1"),
        (bn.size >= 1, "adapter.bottleneck.size must be at least 1"),
        (bool(bn.where), "adapter.bottleneck.where is empty; use [attention], [ffn] or both"),
        (bn.init_std > 0, f"adapter.bottleneck.init_std must be > 0, got {bn.init_std}: Houlsby's near-identity init "
                          "draws the down projection at this std and starts the up projection at zero; with both at "
                          "zero neither ever gets a gradient and only the up bias trains"),
        (fz.top_layers >= 0, "adapter.freeze.top_layers must be >= 0"),
        ("freeze" not in plan.methods or fz.top_layers > 0 or bool(fz.modules),
         "adapter.method freeze needs adapter.freeze.top_layers > 0 or adapter.freeze.modules"),
    ] + [(False, why) for why in unread_adapter_settings(adapter_cfg, plan).values()]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    _check_target_syntax(adapter_cfg, plan)
    virtual = [m for m in plan.methods if m in VIRTUAL_METHODS]
    if virtual and packing:
        raise ConfigError(f"adapter.method {virtual[0]} cannot be used with data.packing: the virtual tokens would "
                          "sit in front of the packed row, not of each example; set data.packing=false")
    if "prefix" in plan.methods and gradient_checkpointing:
        raise ConfigError("prefix tuning feeds its prefix through the KV cache, which activation checkpointing "
                          "recomputes; set model.gradient_checkpointing=false")
    if plan.quantized or optimizer not in ("adamw", "adamw_fused"):
        require_cuda_bitsandbytes("adapter.method=qlora" if plan.quantized else f"train.optimizer={optimizer}")
    return plan


# The adapter.method names that read each setting: a section's name alone stands for all its
# settings. dora and qlora are spellings of lora (plan_adapters), and only qlora reads quantization.
_READ_BY = {
    "lora": ("lora", "dora", "qlora"),
    "quantization": ("qlora",),
    "ia3": ("ia3",),
    "bottleneck": ("bottleneck",),
    "freeze": ("freeze",),
    "virtual_tokens.num_virtual_tokens": ("prefix", "prompt"),
    "virtual_tokens.init": ("prompt",),
    "virtual_tokens.init_text": ("prompt",),
    "virtual_tokens.projection": ("prefix",),
    "virtual_tokens.projection_hidden": ("prefix",),
}


def unread_adapter_settings(adapter_cfg: Any, plan: AdapterPlan) -> dict[str, str]:
    """The adapter settings a run with `plan` would silently ignore, each ("adapter.lora.r") with
    the reason: a setting away from its default that no method of adapter.method reads,
    virtual_tokens.init_text without init=text, projection_hidden without projection."""
    chosen = set(plan.methods) | ({"qlora"} if plan.quantized else set())
    written = ", ".join([adapter_cfg.method] if isinstance(adapter_cfg.method, str) else adapter_cfg.method)
    unread: dict[str, str] = {}
    for setting, readers in _READ_BY.items():
        section, _, name = setting.partition(".")
        values, default = getattr(adapter_cfg, section), type(getattr(adapter_cfg, section))()
        if any(m in chosen for m in readers):
            continue
        for field_name in [name] if name else [f.name for f in dataclasses.fields(default)]:
            value = getattr(values, field_name)
            if value != getattr(default, field_name):
                key = f"adapter.{section}.{field_name}"
                either = " or ".join([", ".join(readers[:-1]), readers[-1]] if len(readers) > 1 else readers)
                unread[key] = (f"{key}={value} does nothing with adapter.method {written} (only adapter.method "
                               f"{either} reads it); remove it or change adapter.method")
    vt, default_vt = adapter_cfg.virtual_tokens, type(adapter_cfg.virtual_tokens)()
    if vt.init != "text" and vt.init_text != default_vt.init_text:
        unread.setdefault("adapter.virtual_tokens.init_text", (
            "adapter.virtual_tokens.init_text is read only with adapter.virtual_tokens.init=text (init=random draws "
            "the soft prompt at random); set init=text or remove init_text"))
    if not vt.projection and vt.projection_hidden != default_vt.projection_hidden:
        unread.setdefault("adapter.virtual_tokens.projection_hidden", (
            "adapter.virtual_tokens.projection_hidden is the width of the prefix MLP, read only with "
            "adapter.virtual_tokens.projection=true; set projection=true or remove projection_hidden"))
    return unread


def _check_target_syntax(adapter_cfg: Any, plan: AdapterPlan) -> None:
    """all-linear and a 're:' regex each alone, the regex valid: what needs no model to check."""
    from posttrain.models.adapters.build import peft_targets

    for method in ("lora", "ia3"):
        if method in plan.methods:
            peft_targets(getattr(adapter_cfg, method).target_modules, f"adapter.{method}.target_modules")


def require_cuda_bitsandbytes(what: str) -> None:
    """4-bit / 8-bit kernels of bitsandbytes need a CUDA device; say so up front."""
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{what} needs a CUDA GPU (bitsandbytes' 4-bit and 8-bit kernels); this machine has none. "
                          "Use adapter.method=lora and train.optimizer=adamw here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{what} needs bitsandbytes: pip install 'posttrain[qlora]'")
