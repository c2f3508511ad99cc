"""Fresh adapters from the `adapter:` config: full, freeze tuning, or an `AdaptedModel`.

LoRA (Hu et al. 2021, Eq. 3): h = W0 x + (alpha / r) · B A x; A random, B zero, so the
adapted model starts equal to the base. rsLoRA scales by alpha / sqrt(r); DoRA splits W
into magnitude and direction and applies LoRA to the direction. IA3 (Liu et al. 2022)
rescales activations by trained vectors initialised to one. Prompt tuning (Lester et al.
2021) trains n input embeddings; prefix tuning (Li & Liang 2021) trains n keys and values
per layer. All of these come from peft; bottleneck adapters are ours (`bottleneck.py`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
import warnings
from typing import Any

from torch import nn

from posttrain.errors import ConfigError
from posttrain.models.adapters.bottleneck import BottleneckSet, bottleneck_targets
from posttrain.models.adapters.model import AdaptedModel
from posttrain.models.adapters.spec import AdapterPlan, plan_adapters


def apply_adapters(lm: nn.Module, adapter_cfg: Any = None, *, plan: AdapterPlan | None = None) -> nn.Module:
    """Make `lm` trainable per `adapter_cfg` (a `posttrain.config.AdapterConfig`).

    full → `lm` unchanged; freeze → `lm` with all but the chosen layers frozen;
    anything else → an `AdaptedModel` whose adapters train and whose base is frozen.
    """
    from posttrain.config import AdapterConfig

    adapter_cfg = adapter_cfg or AdapterConfig()
    plan = plan or plan_adapters(adapter_cfg)
    if plan.methods == ("full",):
        return lm
    if plan.methods == ("freeze",):
        apply_freeze_tuning(lm, adapter_cfg.freeze.top_layers, adapter_cfg.freeze.modules)
        return lm
    weight_peft = virtual_peft = bottlenecks = None
    if plan.quantized:
        from peft import prepare_model_for_kbit_training

        lm = prepare_model_for_kbit_training(lm, use_gradient_checkpointing=_checkpointing(lm))
    if "lora" in plan.methods:
        weight_peft = inject(lm, _lora_config(adapter_cfg.lora, plan.dora), "adapter.lora.target_modules",
                             adapter_cfg.lora.target_modules)
    elif "ia3" in plan.methods:
        weight_peft = inject(lm, _ia3_config(adapter_cfg.ia3, lm), "adapter.ia3.target_modules",
                             adapter_cfg.ia3.target_modules)
    virtual = [m for m in plan.methods if m in ("prompt", "prefix")]
    if virtual:
        virtual_peft = _virtual_tokens(lm, virtual[0], adapter_cfg.virtual_tokens)
    if "bottleneck" in plan.methods:
        bottlenecks = _bottlenecks(lm, adapter_cfg.bottleneck)
    model = AdaptedModel(lm, plan.methods, weight_peft=weight_peft, virtual_peft=virtual_peft, bottlenecks=bottlenecks)
    model.mark_trainable()
    if _checkpointing(lm):
        # frozen embeddings: checkpointed blocks would otherwise see inputs without grad
        lm.enable_input_require_grads()
    return model


def _checkpointing(lm) -> bool:
    flag = getattr(lm, "is_activation_checkpointing", None)  # transformers 5 name
    return bool(flag if flag is not None else getattr(lm, "is_gradient_checkpointing", False))


def peft_targets(names: list[str], key: str = "target_modules") -> Any:
    """peft's target_modules: 'all-linear', a regex string ('re:...'), or a list of names. Each of
    all-linear and a regex stands alone: in a list peft would read it as a layer name and adapt
    only the other entries."""
    names = list(names)
    if names == ["all-linear"]:
        return "all-linear"
    if len(names) == 1 and names[0].startswith("re:"):
        try:
            re.compile(names[0][3:])
        except re.error as exc:
            raise ConfigError(f"{key}: {names[0]} is not a valid regular expression ({exc})") from None
        return names[0][3:]
    if "all-linear" in names:
        raise ConfigError(f"{key}: all-linear must be the only entry (it is every linear layer but the output head); "
                          f"to add {', '.join(n for n in names if n != 'all-linear')}, list the layers by name")
    if any(n.startswith("re:") for n in names):
        raise ConfigError(f"{key}: a 're:<regex>' target must be the only entry (fold the names into the regex)")
    return names


def _lora_config(lora: Any, dora: bool):
    from peft import LoraConfig

    return LoraConfig(r=lora.r, lora_alpha=float(lora.alpha), lora_dropout=float(lora.dropout),
                      target_modules=peft_targets(lora.target_modules, "adapter.lora.target_modules"), use_rslora=bool(lora.rslora),
                      use_dora=dora, task_type="CAUSAL_LM")


def _ia3_config(ia3: Any, lm: nn.Module):
    from peft import IA3Config

    kwargs: dict[str, Any] = {}
    if ia3.target_modules:
        kwargs["target_modules"] = peft_targets(ia3.target_modules, "adapter.ia3.target_modules")
        kwargs["feedforward_modules"] = list(ia3.feedforward_modules) or _ia3_feedforward(lm, kwargs["target_modules"])
        outside = [m for m in ia3.feedforward_modules if m not in ia3.target_modules]
        if outside and not isinstance(kwargs["target_modules"], str):  # (a regex or all-linear: peft checks)
            raise ConfigError(f"adapter.ia3.feedforward_modules: {outside[0]!r} is not in adapter.ia3.target_modules; "
                              "feedforward modules are a subset of the targets")
    elif ia3.feedforward_modules:
        raise ConfigError("adapter.ia3.feedforward_modules needs adapter.ia3.target_modules too")
    elif _model_type(lm) not in _peft_ia3_defaults()[0]:
        kwargs["target_modules"], kwargs["feedforward_modules"] = _ia3_targets_by_name(lm)
    return IA3Config(task_type="CAUSAL_LM", **kwargs)


# IA3 (Liu et al. 2022) rescales keys, values and the FFN's inner activations (the input of its down
# projection). Where peft has no default for a model type, the layers are found by name: k_proj and
# v_proj (or key / value), else a fused q/k/v projection (which then scales the queries too), and
# the first FFN down projection of the list that the model has.
_KEYS_VALUES = (("k_proj", "v_proj"), ("key", "value"))
_FUSED_QKV = ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "W_pack")
_FFN_DOWN = ("down_proj", "fc2", "fc_out", "dense_4h_to_h", "w2", "mlp.c_proj")


def _model_type(lm: nn.Module) -> str | None:
    return getattr(getattr(lm, "config", None), "model_type", None)


def _peft_ia3_defaults() -> tuple[dict, dict]:
    from peft.utils import (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
                            TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING)

    return TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING, TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING


def _linear_names(lm: nn.Module) -> list[str]:
    return [name for name, module in lm.named_modules()
            if isinstance(module, nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit", "Linear8bitLt")]


def _has_layer(names: list[str], target: str) -> bool:
    """peft's rule for a listed target: some module path is it, or ends in "." + it."""
    return any(name == target or name.endswith("." + target) for name in names)


def _ia3_targets_by_name(lm: nn.Module) -> tuple[list[str], list[str]]:
    """(target_modules, feedforward_modules) for a model type peft knows no IA3 default for."""
    names = _linear_names(lm)
    attention = next((list(pair) for pair in _KEYS_VALUES if all(_has_layer(names, n) for n in pair)), None) \
        or next(([fused] for fused in _FUSED_QKV if _has_layer(names, fused)), None)
    down = next((name for name in _FFN_DOWN if _has_layer(names, name)), None)
    if attention is None or down is None:
        raise ConfigError(f"adapter.ia3.target_modules is empty and peft has no IA3 default for model type "
                          f"{_model_type(lm)!r}: name the key, value and FFN down-projection layers in "
                          "adapter.ia3.target_modules (and the FFN one in adapter.ia3.feedforward_modules); "
                          f"its linear layers are: {', '.join(linear_module_names(lm))}")
    return attention + [down], [down]


def _ia3_feedforward(lm: nn.Module, targets: Any) -> list[str] | None:
    """feedforward_modules when the user named targets but not these: peft's default for the model
    type (None), else those of the targets that are an FFN down projection by name."""
    if _model_type(lm) in _peft_ia3_defaults()[1]:
        return None
    if isinstance(targets, str):  # a regex or all-linear: no name to pick from
        return []
    return [t for t in targets if t.rsplit(".", 1)[-1] in {d.rsplit(".", 1)[-1] for d in _FFN_DOWN}]


def linear_module_names(model: nn.Module) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name in _linear_names(model)})


@contextlib.contextmanager
def quiet_peft():
    """Silence two peft warnings that say nothing to our users: a second peft wrapper on one
    model is deliberate here (it only supplies the prompt encoder), and peft still calls
    transformers' deprecated `is_gradient_checkpointing`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*modify a model with PEFT for a second time.*")
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        yield


def inject(lm: nn.Module, peft_config, key: str, written: list[str]):
    """get_peft_model, its targets checked first in the user's words: `written` is `key` as the
    config has it (empty: peft's default or ours, `peft_config.target_modules`). peft matches a name
    as the whole module path or its dotted tail, and a regex as re.fullmatch on the whole path."""
    from peft import get_peft_model

    targets = peft_config.target_modules
    names = [name for name, _ in lm.named_modules() if name]
    shown = ", ".join(written or (sorted(targets) if isinstance(targets, (set, list)) else [str(targets)]))
    if isinstance(targets, str):
        if targets != "all-linear":
            _check_regex(lm, names, targets, key)
    elif targets is not None:  # a list (None: peft's default for the model type); peft stops only when no name
        # matches: check each
        unmatched = [t for t in (written or sorted(targets)) if not _has_layer(names, t)]
        if unmatched:
            raise ConfigError(f"{key}: {unmatched[0]!r} matches no layer of {type(lm).__name__}; "
                              f"its linear layers are: {', '.join(linear_module_names(lm))}")
    try:
        with quiet_peft():
            return get_peft_model(lm, peft_config)
    except ValueError as exc:
        text = str(exc)
        if "not found" not in text and "Target module" not in text and "target_modules" not in text:
            raise
        kind = re.match(r"Target module (\w+)", text)  # peft: "Target module LlamaMLP(...) is not supported"
        if kind and "not supported" in text:
            raise ConfigError(_unsupported_target(lm, targets, kind.group(1), key, shown)) from None
        raise ConfigError(f"{key} [{shown}] matches no layer of {type(lm).__name__}; "
                          f"its linear layers are: {', '.join(linear_module_names(lm))}") from None


def _check_regex(lm: nn.Module, names: list[str], pattern: str, key: str) -> None:
    """A 're:' target is peft's re.fullmatch against whole module paths: refuse one that matches
    none, quoted as written, with a path it would have to match."""
    regex = re.compile(pattern)  # (peft_targets refused one that is no regex)
    if any(regex.fullmatch(name) for name in names):
        return
    linear = _linear_names(lm)
    partial = next((name for name in linear if regex.search(name)), None)
    example = partial or (linear[0] if linear else names[0])
    suffix = f".*({pattern})" if "|" in pattern else f".*{pattern}"
    hint = f"; for every path ending in it, write re:{suffix}" if any(re.fullmatch(suffix, n) for n in linear) else ""
    raise ConfigError(f"{key}: re:{pattern} matches no module of {type(lm).__name__}: a regex must match a whole "
                      f"module path (peft's re.fullmatch), such as {example}{hint}; "
                      f"its linear layers are: {', '.join(linear_module_names(lm))}")


def _unsupported_target(lm: nn.Module, targets: Any, kind: str, key: str, shown: str) -> str:
    """The message for a target that names a module peft cannot adapt (`kind`, e.g. LlamaMLP: a
    block, a norm, or for IA3 an embedding): where it is, and the linear layers inside it."""
    def matched(name: str) -> bool:
        if isinstance(targets, str):  # a regex (all-linear picks linear layers only)
            return re.fullmatch(targets, name) is not None
        return any(_has_layer([name], t) for t in targets or ())

    path = next((name for name, module in lm.named_modules()
                 if name and type(module).__name__ == kind and matched(name)), None)
    inside = sorted({n.rsplit(".", 1)[-1] for n in _linear_names(lm) if path and n.startswith(path + ".")})
    names = ", ".join(inside) if inside else ", ".join(linear_module_names(lm))
    return (f"{key} [{shown}] names a non-linear module, {path or 'one'} of type {kind}, which peft cannot adapt "
            f"here; name the linear layers{' inside it' if inside else ''} instead: {names}")


def _virtual_tokens(lm: nn.Module, kind: str, vt: Any):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

    if kind == "prefix":
        config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=vt.num_virtual_tokens,
                                    prefix_projection=vt.projection, encoder_hidden_size=vt.projection_hidden,
                                    **_prefix_heads(lm.config))
    elif vt.init == "text":
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=vt.num_virtual_tokens,
                                    prompt_tuning_init="TEXT", prompt_tuning_init_text=vt.init_text,
                                    tokenizer_name_or_path=lm.config._name_or_path)
    else:
        config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=vt.num_virtual_tokens)
    with quiet_peft():
        return get_peft_model(lm, config)


def _prefix_heads(config) -> dict[str, int]:
    """The key/value heads (and their total width) a prefix needs where peft would guess them wrong
    from the config: Falcon-7B's multi-query attention caches one key/value head, not
    num_attention_heads (peft reads only `num_key_value_heads`); MPT names its heads `n_heads`,
    which peft does not look for. Empty otherwise: peft's own reading (grouped-query included)."""
    if getattr(config, "model_type", None) == "falcon" and config.multi_query and not config.new_decoder_architecture:
        return {"num_attention_heads": 1, "token_dim": config.hidden_size // config.num_attention_heads}
    names = config.to_dict()
    if not any(k in names for k in ("num_attention_heads", "n_head", "num_heads", "encoder_attention_heads")) \
            and isinstance(getattr(config, "num_attention_heads", None), int):
        return {"num_attention_heads": config.num_attention_heads}
    return {}


def _bottlenecks(lm: nn.Module, bn: Any) -> BottleneckSet:
    # each entry on its own: one that matches nothing must not leave the others to train silently
    for where in bn.where:
        if not bottleneck_targets(lm, [where]):
            found = "attention output projection" if where == "attention" else "MLP block / fc2"
            raise ConfigError(f"adapter.bottleneck.where: {where!r} finds no {found} in {type(lm).__name__} "
                              f"(model type {getattr(lm.config, 'model_type', '?')!r})")
    targets = bottleneck_targets(lm, list(bn.where))
    adapters = BottleneckSet(lm.config.hidden_size, targets, bn.size, bn.activation, bn.init_std)
    adapters.to(next(lm.parameters()).device)  # stays fp32 next to a bf16 base; it casts in forward
    adapters.attach(lm)
    return adapters


def apply_freeze_tuning(model: nn.Module, top_layers: int, modules: list[str]) -> int:
    """Train only the top `top_layers` transformer layers and parameters matching `modules` globs."""
    from posttrain.train.optim import count_layers, layer_depth

    num_layers = count_layers(model)
    if top_layers > num_layers:
        raise ConfigError(f"adapter.freeze.top_layers={top_layers} but the model has {num_layers} layers")
    names = [n for n, _ in model.named_parameters()]
    for pattern in modules:
        if not any(fnmatch.fnmatch(n, pattern) for n in names):
            raise ConfigError(f"adapter.freeze.modules pattern {pattern!r} matches no parameter (names look like {names[0]!r})")
    trained = 0
    for name, param in model.named_parameters():
        depth = layer_depth(name, num_layers)  # layer i -> i + 1
        keep = (0 < depth <= num_layers and depth > num_layers - top_layers) or any(fnmatch.fnmatch(name, p) for p in modules)
        param.requires_grad_(keep)
        trained += param.numel() if keep else 0
    return trained
