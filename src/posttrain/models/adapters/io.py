"""Save, load, merge and combine adapters.

Directory layout written by `save_adapted`:

    one peft method (lora, dora, ia3, prompt, prefix) → a plain peft adapter directory
        (adapter_config.json + adapter_model.safetensors): `peft.PeftModel.from_pretrained`
        loads it as it is
    several methods, or a bottleneck → one subdirectory per method (lora/, prompt/,
        bottleneck/); the peft ones are each a plain peft directory

plus `posttrain_adapters.json` naming the methods, their subdirectories and the base model.
`load_adapted` reads both layouts and also plain peft directories that peft itself wrote.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import UserError
from posttrain.models.adapters.bottleneck import BottleneckSet
from posttrain.models.adapters.build import quiet_peft
from posttrain.models.adapters.model import AdaptedModel
from posttrain.models.adapters.spec import MERGEABLE

MANIFEST = "posttrain_adapters.json"
_BOTTLENECK_CONFIG = "bottleneck_config.json"
_BOTTLENECK_WEIGHTS = "bottleneck.safetensors"
_PEFT_KINDS = {"PROMPT_TUNING": "prompt", "PREFIX_TUNING": "prefix", "LORA": "lora", "IA3": "ia3"}


def is_adapter_dir(path: str | Path) -> bool:
    path = Path(path)
    return (path / MANIFEST).is_file() or (path / "adapter_config.json").is_file()


def _components(model: AdaptedModel) -> dict[str, Any]:
    parts: dict[str, Any] = {}
    if model.weight_peft is not None:
        parts[next(m for m in model.methods if m in ("lora", "ia3"))] = model.weight_peft
    if model.virtual_peft is not None:
        parts[next(m for m in model.methods if m in ("prompt", "prefix"))] = model.virtual_peft
    if model.bottlenecks is not None:
        parts["bottleneck"] = model.bottlenecks
    return parts


def save_adapted(model: AdaptedModel, out_dir: str | Path, base_model_path: str) -> Path:
    """Write every adapter of `model` under `out_dir`; `base_model_path` is recorded for loading."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts = _components(model)
    flat = len(parts) == 1 and "bottleneck" not in parts
    layout = {}
    for name, part in parts.items():
        sub = out if flat else out / name
        layout[name] = "." if flat else name
        if isinstance(part, BottleneckSet):
            sub.mkdir(parents=True, exist_ok=True)
            (sub / _BOTTLENECK_CONFIG).write_text(json.dumps(
                {"method": "bottleneck", "targets": part.targets, **part.settings,
                 "base_model_name_or_path": base_model_path}, indent=1), encoding="utf-8")
            save_file(part.state(), str(sub / _BOTTLENECK_WEIGHTS))
            continue
        for peft_config in part.peft_config.values():
            peft_config.base_model_name_or_path = base_model_path
        part.save_pretrained(sub)
        sort_module_sets(sub / "adapter_config.json")
    (out / MANIFEST).write_text(json.dumps(
        {"methods": list(model.methods), "components": layout, "base_model_name_or_path": base_model_path}, indent=1),
        encoding="utf-8")
    return out


def sort_module_sets(config_file: Path) -> None:
    """peft keeps target_modules (and IA3's feedforward_modules) as sets and writes them in set
    order, which moves with PYTHONHASHSEED: sorted, the same run writes the same file."""
    config = json.loads(config_file.read_text(encoding="utf-8"))
    for key in ("target_modules", "feedforward_modules", "modules_to_save", "exclude_modules"):
        if isinstance(config.get(key), list) and all(isinstance(m, str) for m in config[key]):
            config[key] = sorted(config[key])
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_layout(path: str | Path) -> tuple[str, dict[str, Path]]:
    """(base model path, {method: directory}) of an adapter directory."""
    path = Path(path)
    from posttrain.models.loading import check_adapter_weights

    if (path / MANIFEST).is_file():
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        parts = {name: (path / sub).resolve() for name, sub in manifest["components"].items()}
        for part in parts.values():
            check_adapter_weights(part)
        return manifest["base_model_name_or_path"], parts
    config_file = path / "adapter_config.json"
    if not path.exists():
        raise UserError(f"adapter {path} does not exist")
    if not config_file.is_file():
        raise UserError(f"{path} is not an adapter directory (no {MANIFEST} or adapter_config.json)")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{config_file}: no base_model_name_or_path; cannot find the base model")
    check_adapter_weights(path)
    return base, {_peft_kind(config): path}


def _peft_kind(config: dict) -> str:
    """The method of a plain peft adapter_config.json (other in-place peft tuners load as weights)."""
    return _PEFT_KINDS.get(str(config.get("peft_type", "")).upper(), "lora")


def _json_object(file: Path) -> dict:
    """A JSON file's object; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def adapter_kinds(path: str | Path) -> list[str]:
    """The methods an adapter directory holds (lora, ia3, prompt, prefix, bottleneck), read from its
    posttrain_adapters.json or a plain peft directory's peft_type, without loading or checking
    anything; [] when its files do not say. For messages: `read_layout` is the loader's."""
    path = Path(path)
    components = _json_object(path / MANIFEST).get("components")
    if isinstance(components, dict):
        return list(components)
    config = _json_object(path / "adapter_config.json")
    return [_peft_kind(config)] if config else []


def method_names(parts: dict[str, Path]) -> list[str]:
    """The methods of `read_layout`'s parts as adapter.method spells them: a LoRA saved with
    use_dora is dora (AdaptedModel.methods says lora for both)."""
    return ["dora" if name == "lora" and _json_object(Path(part) / "adapter_config.json").get("use_dora") else name
            for name, part in parts.items()]


def peft_task(path: str | Path) -> str | None:
    """The task_type of a plain peft adapter directory (SEQ_CLS: a LoRA reward model from posttrain
    rm, its score head in modules_to_save; CAUSAL_LM: a policy's); None when it names none."""
    task = _json_object(Path(path) / "adapter_config.json").get("task_type")
    return str(task) if task else None


def cannot_start_from(methods) -> str:
    """The one clause for adapters no merge folds into a model that a stage could start from
    (prompt, prefix, bottleneck: they add tokens or layers), after "trains" or "holds": the
    pipeline's check of a stage's model.path, an adapter directory given as a model to start from."""
    return (f"{', '.join(sorted(methods))} adapters, which cannot be merged into a model to start from; train it "
            "with lora, ia3 or full")


def unmergeable(methods) -> list[str]:
    """The methods of `methods` that no merge folds into the base weights."""
    return [m for m in methods if m not in MERGEABLE]


def _check_loadable_together(layouts: dict[str, tuple[str, dict[str, Path]]], named: dict) -> None:
    """What load_adapted refuses before it loads the base: a LoRA reward model (its score head
    would be dropped and the backbone generate as a causal LM), and several adapters on one base
    that peft cannot hold together (virtual tokens or bottlenecks; LoRA beside IA3)."""
    from posttrain.models.loading import reward_model_message

    for name, (_, parts) in layouts.items():
        if any(peft_task(part) == "SEQ_CLS" for part in parts.values()):
            raise UserError(reward_model_message(named[name], "LoRA on a sequence-classification model, peft task "
                                                              "SEQ_CLS"))
    if len(layouts) < 2:
        return
    for name, (_, parts) in layouts.items():
        if set(parts) - {"lora", "ia3"}:
            raise UserError(f"adapter {name!r} has {', '.join(parts)}: only LoRA / IA3 adapters can share a base "
                            "and be switched by name")
    kinds = {name: next(iter(parts)) for name, (_, parts) in layouts.items()}
    if len(set(kinds.values())) > 1:
        each = ", ".join(f"{name} ({named[name]}) is {kind}" for name, kind in kinds.items())
        raise UserError(f"the adapters are of different kinds: {each}; peft holds one kind per model, so load "
                        "LoRA adapters together or IA3 adapters together")


def load_adapted(adapters: str | Path | dict[str, str | Path], *, dtype: str = "float32", trust_remote_code: bool = False,
                 base: str | None = None, is_trainable: bool = False):
    """Load the base model and attach saved adapters; returns an `AdaptedModel`.

    `adapters`: one directory, or {name: directory} for several LoRA / IA3 adapters on one
    base (switch with `model.use_adapter(name)`; the first is active).
    `is_trainable`: the adapters train and the base stays frozen, as after `apply_adapters`; a
    prefix trained with projection comes back as its projected keys and values (peft saves no
    MLP), which then train directly.
    """
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model

    named = {"default": adapters} if isinstance(adapters, (str, Path)) else dict(adapters)
    layouts = {name: read_layout(path) for name, path in named.items()}
    bases = {b for b, _ in layouts.values()}
    if base is None and len(bases) > 1:
        raise UserError(f"the adapters were trained on different base models: {sorted(bases)}")
    _check_loadable_together(layouts, named)
    lm = load_model(ModelConfig(path=base or bases.pop(), dtype=dtype, trust_remote_code=trust_remote_code))
    _fit_vocabulary(lm, [part for _, other in layouts.values() for part in other.values()])
    first_name, (_, parts) = next(iter(layouts.items()))
    weight_peft = virtual_peft = bottlenecks = None
    weight = [m for m in parts if m in ("lora", "ia3")]
    if weight:
        from peft import PeftModel

        with quiet_peft():
            weight_peft = PeftModel.from_pretrained(lm, str(parts[weight[0]]), adapter_name=first_name,
                                                    is_trainable=is_trainable)
        for name, (_, other) in list(layouts.items())[1:]:
            weight_peft.load_adapter(str(next(iter(other.values()))), adapter_name=name, is_trainable=is_trainable)
        weight_peft.set_adapter(first_name)
    virtual = [m for m in parts if m in ("prompt", "prefix")]
    if virtual:
        from peft import PeftModel

        # peft refuses to load virtual tokens as trainable; mark_trainable below unfreezes them
        with quiet_peft():
            virtual_peft = PeftModel.from_pretrained(lm, str(parts[virtual[0]]))
    if "bottleneck" in parts:
        bottlenecks = _load_bottlenecks(lm, parts["bottleneck"])
    model = AdaptedModel(lm, tuple(parts), weight_peft=weight_peft, virtual_peft=virtual_peft, bottlenecks=bottlenecks)
    if is_trainable:
        model.mark_trainable()
    return model


def _fit_vocabulary(lm, directories: list[Path]) -> None:
    """Resize `lm`'s token embeddings (and its head) to the rows an adapter saved them with, when
    that is more than the base has: peft's recipe for added tokens (add them to the tokenizer,
    `resize_token_embeddings`, train the embedding and head whole through `modules_to_save`, save
    the tokenizer beside the adapter) loads only into a base resized first, else every saved row
    is a size mismatch. The rows are read from the shapes in adapter_model.safetensors of the
    embedding's and head's whole weights (peft saves them whenever the vocabulary was resized);
    their values come from the adapter as it loads."""
    from safetensors import safe_open

    modules = {id(lm.get_input_embeddings()), id(lm.get_output_embeddings())}
    names = [name for name, module in lm.named_modules() if id(module) in modules and name]
    rows = 0
    for directory in directories:
        weights = Path(directory) / "adapter_model.safetensors"
        if not weights.is_file():
            continue
        with safe_open(str(weights), "pt") as saved:
            for key in saved.keys():
                for name in names:
                    _, found, rest = f".{key}".partition(f".{name}.")
                    if found and rest.endswith("weight") and "lora_" not in rest:  # a whole weight, not LoRA's A or B
                        shape = saved.get_slice(key).get_shape()
                        if len(shape) == 2:
                            rows = max(rows, shape[0])
    if rows > lm.get_input_embeddings().weight.shape[0]:
        lm.resize_token_embeddings(rows, mean_resizing=False)  # the new rows are the adapter's to fill


def _load_bottlenecks(lm, directory: Path) -> BottleneckSet:
    from safetensors.torch import load_file

    settings = json.loads((directory / _BOTTLENECK_CONFIG).read_text(encoding="utf-8"))
    adapters = BottleneckSet(settings["hidden"], settings["targets"], settings["size"], settings["activation"],
                             settings["init_std"])
    known = {name for name, _ in lm.named_modules()}
    missing = [t for t in adapters.targets if t not in known]
    if missing:
        raise UserError(f"{directory}: the base model has no module {missing[0]}; was it trained on another base?")
    adapters.load_state(load_file(str(directory / _BOTTLENECK_WEIGHTS)))
    adapters.to(next(lm.parameters()).device)
    adapters.attach(lm)
    return adapters


def merge_adapted(model):
    """Fold LoRA / DoRA / IA3 into the base weights; return the plain transformers model.

    Bottleneck adapters and virtual tokens add computation that no weight of the base
    can express, so a model holding them is refused with UserError. A model without
    adapters passes through unchanged.
    """
    if not isinstance(model, AdaptedModel):
        return model
    check_mergeable(model.methods)
    _untie_adapted_embeddings(model)
    return model.weight_peft.merge_and_unload()


def _untie_adapted_embeddings(model: AdaptedModel) -> None:
    """Give the output layer its own copy of a tied embedding when an adapter sits on either:
    merging folds the update into the one shared tensor, which would move the other layer too
    (LoRA on lm_head would change the input embedding, and the saved model would stay tied)."""
    lm = model.lm
    inputs, outputs = lm.get_input_embeddings(), lm.get_output_embeddings()
    if inputs is None or outputs is None or not getattr(lm.config, "tie_word_embeddings", False):
        return
    adapted = {id(m) for m in lm.modules() if hasattr(m, "base_layer")}
    if id(inputs) not in adapted and id(outputs) not in adapted:
        return
    base_in = getattr(inputs, "base_layer", inputs)
    base_out = getattr(outputs, "base_layer", outputs)
    if base_in.weight is base_out.weight:
        base_out.weight = torch.nn.Parameter(base_in.weight.detach().clone(), requires_grad=False)
    lm.config.tie_word_embeddings = False
    text_config = getattr(lm.config, "get_text_config", lambda: None)()
    if text_config is not None and text_config is not lm.config:
        text_config.tie_word_embeddings = False


def check_mergeable(methods, fix: str = "use the adapter directory with posttrain generate/chat instead") -> None:
    """A UserError when `methods` (an adapter's, as `read_layout` or AdaptedModel.methods name them)
    hold one no merge folds into the base weights."""
    rest = unmergeable(methods)
    if rest:
        raise UserError(f"{', '.join(rest)} adapters cannot be merged into the base weights (they add layers or tokens "
                        f"the base has no weights for); {fix}")


def merged_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every weight `merge_adapted(model)` would hold, named as in the plain
    transformers model (the checkpoint's names), without changing `model`.

    An adapted layer is merged by peft, its merged weights copied, then unmerged and its base
    weights restored from a copy taken before, bit for bit (unmerging alone subtracts the update
    again, which is not exact in low precision). Every other weight is the model's own tensor,
    detached, not a copy; a tied weight comes once, under its first name, as save_pretrained
    writes it. Layer by layer, so at most one layer's merged copy exists at a time when the
    caller consumes the generator as it goes. Refuses what `merge_adapted` refuses.
    """
    from peft.tuners.tuners_utils import BaseTunerLayer

    lm = model
    if isinstance(model, AdaptedModel):
        check_mergeable(model.methods, "train with lora, dora or ia3 to use the merged weights")
        lm = model.lm
    inside_adapted, seen = set(), set()
    for name, module in lm.named_modules():
        if id(module) in inside_adapted:
            continue
        prefix = f"{name}." if name else ""
        if isinstance(module, BaseTunerLayer):
            inside_adapted.update(id(sub) for sub in module.modules())
            for param_name, tensor in _merged_layer(module).items():
                yield prefix + param_name, tensor
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if id(param) not in seen:
                seen.add(id(param))
                yield prefix + param_name, param.detach()


def _merged_layer(layer) -> dict[str, torch.Tensor]:
    """Copies of `layer`'s base parameters with its active adapters merged in; the layer is left
    exactly as it was."""
    base = layer.get_base_layer()
    if layer.merged:  # already merged by someone else: its weights are the merged ones
        return {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
    original = {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
    layer.merge()
    try:
        return {n: p.detach().clone() for n, p in base.named_parameters(recurse=False)}
    finally:
        with warnings.catch_warnings():  # peft warns that unmerging IA3 is inexact; the copy below makes it exact
            warnings.simplefilter("ignore", UserWarning)
            layer.unmerge()
        with torch.no_grad():
            for n, p in base.named_parameters(recurse=False):
                p.copy_(original[n])


def combine_adapters(model: AdaptedModel, weights: dict[str, float], name: str) -> None:
    """Add adapter `name` = weighted combination of loaded LoRA / IA3 adapters; switch to it.

    Uses peft's `add_weighted_adapter`; LoRA adapters with its 'cat' rule, which concatenates
    A and B, so the update is exactly Σ wᵢ·ΔWᵢ whatever the ranks (its 'linear' rule, for equal
    ranks, would mix the A of one adapter with the B of another: cross terms)."""
    missing = [n for n in weights if n not in model.adapter_names()]
    if missing:
        raise UserError(f"cannot combine: no adapter named {missing[0]!r}; loaded: {', '.join(model.adapter_names())}")
    peft_model = model.weight_peft
    configs = [peft_model.peft_config[n] for n in weights]
    dora = [n for n, c in zip(weights, configs) if getattr(c, "use_dora", False)]
    if dora:  # the magnitude vector of a sum is not a sum of magnitudes: peft would keep a fresh one
        raise UserError(f"cannot combine DoRA adapters ({', '.join(dora)}): a weighted mix is exact for LoRA and IA3 only")
    kwargs: dict[str, Any] = {}
    lora = configs[0].peft_type.value == "LORA"
    if lora:
        kwargs["combination_type"] = "cat"
    peft_model.add_weighted_adapter(list(weights), list(weights.values()), adapter_name=name, **kwargs)
    if lora:
        # 'cat' folds each adapter's scaling into its A and gives the mix alpha = r (scaling 1), but
        # keeps the first config's use_rslora, whose alpha / sqrt(r) would scale the sum by sqrt(r)
        peft_model.peft_config[name].use_rslora = False
        for module in peft_model.modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict) and name in scaling:
                scaling[name] = 1.0
    peft_model.set_adapter(name)
