"""The config machinery every stage's config shares: fields with their help text, loading
YAML with dotted overrides on top, strict checking of keys (with the closest valid key) and
types, --help lines and the README's reference tables."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from posttrain.errors import ConfigError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with a default and its one-line description."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


class _HelpDoc:
    """A stage config's docstring: its own text, then every setting with its help (the lines of
    --help), so that help(SFTConfig) in a notebook says what --help says. A descriptor, because
    the fields exist only once the dataclass decorator has run (the class's `__doc__` is read
    through it: `type.__doc__` calls a descriptor stored there)."""

    def __init__(self, own: str | None):
        self.own = own

    def __get__(self, obj: Any, owner: type) -> str:
        name = owner.__name__
        head = self.own or f"The settings of one run: {name}.load(path, overrides) or {name}.from_dict(dict)."
        return f"{head}\n\nSettings (YAML sections or dotted overrides):\n" + "\n".join(owner.help_lines())


class _StageConfig:
    """Shared loading, validation and help for all stage configs.

    `unread_in_help`: sections or keys a stage accepts (its config shares the section with other
    stages: a pipeline-wide override, an earlier run's config.yaml) but never reads; --help and
    the docstring leave them out, so that they list what the command takes."""

    unread_in_help: typing.ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.__doc__ = _HelpDoc(cls.__dict__.get("__doc__"))

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> "_StageConfig":
        """The config from nested dicts as a YAML file holds them ({"train": {"lr": 1e-4}}): unknown
        keys and wrong types raise ConfigError naming `source` and the key; missing keys keep their
        defaults."""
        return _build(cls, data or {}, prefix="", source=source, root=cls)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "_StageConfig":
        """The config of a YAML file (None: the defaults) with dotted overrides on top, as the
        command line takes them: ["train.lr=1e-4", "data.train_files=[a.jsonl]"]."""
        check_override_list(overrides, f"{cls.__name__}.load")
        data: dict[str, Any] = {}
        source = "overrides"
        if path is not None:
            data = read_yaml(path)
            source = str(path)
        for item in overrides:
            check_override_key(cls, item)  # named as the command line's, not the file's
            apply_override(data, item)
        return cls.from_dict(data, source=source)

    @classmethod
    def for_run(cls, cfg: Any, runner: str) -> "_StageConfig":
        """What `runner` (run_sft, ...) works on: `cfg` checked again as from_dict checks a file,
        since settings assigned in Python (cfg.train.lr = "3e-4", a typo cfg.train.max_step = 1)
        skipped those checks; a checked copy, so the caller's object is left as it was."""
        if not isinstance(cfg, cls):
            name = cls.__name__
            raise TypeError(f"{runner} takes {_article(name)} {name} ({name}.from_dict / {name}.load), "
                            f"got {type(cfg).__name__}")
        return checked(cfg)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help_lines(cls) -> list[str]:
        return list(_help_lines(cls, "", cls.unread_in_help))


def checked(cfg: _StageConfig) -> _StageConfig:
    """`cfg` checked again as from_dict checks a file (every setting's type, a float's finiteness, no
    unknown attribute), for settings assigned in Python (cfg.dpo.beta = float("nan")): a checked
    copy, the caller's object left as it was. Every validate_* starts here. Raises ConfigError."""
    _check_attributes(cfg, type(cfg), type(cfg).__name__)
    return type(cfg).from_dict(cfg.to_dict(), source=type(cfg).__name__)


def _article(name: str) -> str:
    """'an' before SFTConfig and EvaluateConfig, 'a' before DPOConfig and RedTeamConfig (an
    initialism is read letter by letter)."""
    initialism = name[:2].isupper()
    return "an" if name[0] in ("AEFHILMNORSX" if initialism else "AEIOU") else "a"


def _check_attributes(obj: Any, root: type, source: str, prefix: str = "") -> None:
    """An attribute assigned in Python that is no setting (cfg.train.max_step = 1) is refused as a
    file's unknown key is: dataclasses.asdict would silently leave it out."""
    fields = [f.name for f in dataclasses.fields(obj)]
    for name, value in vars(obj).items():
        if name not in fields:
            hint = _unknown_key_hint(prefix + name, root, [prefix + f for f in fields])
            raise ConfigError(f"{source}: unknown key {prefix}{name}{hint}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            _check_attributes(value, root, source, prefix + name + ".")


def check_override_list(overrides: Any, caller: str) -> None:
    """Overrides are a list of strings: one string would be read character by character."""
    if isinstance(overrides, str):
        raise TypeError(f'{caller}: overrides are a list of "section.key=value" strings, got one string '
                        f"{overrides!r}; pass [{overrides!r}]")


# --------------------------------------------------------------------------- YAML and overrides


@functools.cache
def _text_loader():
    """A yaml SafeLoader whose strings are text: a JSON-style escape pair ("\\ud83d\\ude00", how JSON
    writes U+1F600), which PyYAML reads as two lone surrogates, is joined into its character as json.loads
    and YAML 1.2 join it; a lone surrogate left over (no tokenizer or UTF-8 writer takes one) raises
    _LoneSurrogate with its node's line. Keys are strings too."""
    import yaml

    class TextLoader(yaml.SafeLoader):
        def construct_yaml_str(self, node):
            value = super().construct_yaml_str(node)
            try:
                return _whole_characters(value)
            except _LoneSurrogate as exc:
                exc.mark = node.start_mark
                raise

    TextLoader.add_constructor("tag:yaml.org,2002:str", TextLoader.construct_yaml_str)
    return TextLoader


def _whole_characters(text: str) -> str:
    """`text` with every surrogate pair joined into its character; raises _LoneSurrogate for a
    half without its other half (the readers' rule: `readers.lone_surrogate_at`)."""
    from posttrain.data.readers import lone_surrogate_at

    if lone_surrogate_at(text) is None:
        return text
    joined = text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "surrogatepass")
    if lone_surrogate_at(joined) is not None:
        raise _LoneSurrogate(next(c for c in joined if "\ud800" <= c <= "\udfff"))
    return joined


class _LoneSurrogate(Exception):
    def __init__(self, half: str):
        super().__init__(half)
        self.mark: Any = None  # where its string starts in the YAML text, when read from one

    def __str__(self) -> str:
        return (f"a lone surrogate (\\u{ord(self.args[0]):04x}), which is not text; write the character itself, "
                "or both halves of a JSON-style escape pair (\\ud83d\\ude00 is U+1F600)")


@functools.cache
def _unique_keys_loader():
    """A yaml SafeLoader that refuses a mapping key given twice (plain YAML keeps the last one
    silently: a second `train:` section would drop every setting of the first), and reads a key
    YAML 1.1 takes for a boolean as the word written (quality's `dedup: {on: prompt}` names the
    setting `on`, not True: keys are names, never booleans). Strings are read by _text_loader."""
    import yaml

    class UniqueKeyLoader(_text_loader()):
        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, Any] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` keys may be set again: only the mapping's own keys count
                    if key_node.tag == "tag:yaml.org,2002:bool" and isinstance(key_node, yaml.ScalarNode):
                        key_node.tag = "tag:yaml.org,2002:str"  # on / off / yes / no as written
                    key = self.construct_object(key_node, deep=deep)
                    try:
                        first = seen.setdefault(key, key_node)
                    except TypeError:
                        continue  # an unhashable key: the base constructor says so
                    if first is not key_node:
                        raise _DuplicateKey(key, first.start_mark, key_node.start_mark)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: Any, again: Any):
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


def _unshared(data: Any) -> Any:
    """`data` with every mapping and list its own: YAML gives an alias (`judge: *server`) and the
    values a merge key (`<<: *base`) copies as the same object as their anchor, so an edit of one
    (an override) would change the other."""
    if isinstance(data, dict):
        return {key: _unshared(value) for key, value in data.items()}
    if isinstance(data, list):
        return [_unshared(value) for value in data]
    return data


def load_yaml(text: str, source: str | Path, error: type[Exception] = ConfigError, *, with_node: bool = False) -> Any:
    """The document of a YAML file's `text` (None when empty) as every YAML file a user writes is
    read: a key given twice refused, a key like `on` read as written, no object shared between two
    places, a JSON-style escape pair ("\\ud83d\\ude00") read as its character and a lone surrogate
    refused. Errors are `error` naming `source` and the line. `with_node`: (data, the document's
    YAML node, for the lines of its entries; None when empty)."""
    import yaml

    loader = _unique_keys_loader()(text)
    try:
        node = loader.get_single_node()
        data = _unshared(loader.construct_document(node)) if node is not None else None
    except _DuplicateKey as exc:
        raise error(f"{source}:{exc.again.line + 1}: {exc.key} is given twice (first on line {exc.first.line + 1}); "
                    "YAML would keep only the last one: merge them into one") from None
    except _LoneSurrogate as exc:
        raise error(f"{source}:{exc.mark.line + 1}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else str(source)
        raise error(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()
    return (data, node) if with_node else data


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file's sections (an empty file: {}), read by load_yaml. Raises ConfigError."""
    path = Path(path)
    if path.is_dir():  # a run directory given for its config: name the file it holds
        inside = path / "config.yaml"
        held = f" (a run directory? its config is {inside})" if inside.is_file() else ""
        raise ConfigError(f"config file {path} is a directory, not a YAML file{held}")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); save the file as UTF-8") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    data = load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def user_path(path: str | Path) -> Path:
    """A path setting as the user means it: a leading ~ is their home directory (output_dir:
    ~/runs/sft), as it is for model.path and the data files."""
    return Path(os.path.expanduser(path))


@dataclasses.dataclass(frozen=True)
class _Typed:
    """An override's scalar as YAML reads it, and as typed: a text setting takes the text
    (output_dir=010 is "010", not 8; "#" does not start a comment), any other the value. A quoted
    or null value has no text of its own (`text` is the value itself). Its lists and mappings are
    `_OverrideList` / `_OverrideDict`: every value an override gives is named as the command line's.
    A list or mapping not typed in [...] or {...} (`system=Note: be kind`, which YAML reads as
    {"Note": "be kind"}) is text to any setting but a section (`_coerce`): a text setting takes
    what was typed, any other names it in its refusal."""

    value: Any
    text: Any
    not_yaml: str = ""  # why YAML could not read the text (the value is then the text)

    def __str__(self) -> str:
        return str(self.text)


class _OverrideList(list):
    """An override's list value (train.freeze=[a, b]): a plain list, marked as the command line's;
    `text` as typed."""

    text = ""


class _OverrideDict(dict):
    """An override's mapping value (adapter.lora={r: 4}): a plain dict, marked as the command line's;
    `text` as typed."""

    text = ""


def _from_override(value: Any) -> bool:
    return isinstance(value, (_Typed, _OverrideList, _OverrideDict))


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so 1e-5, true, [a, b] work)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    not_yaml = ""
    try:
        value = yaml.load(raw, Loader=_text_loader()) if raw != "" else ""  # safe_load, escape pairs joined
    except _LoneSurrogate as exc:
        raise ConfigError(f"override {item!r}: {exc}") from None
    except yaml.YAMLError as exc:
        value, not_yaml = raw, str(getattr(exc, "problem", None) or exc)
    text = raw.strip()
    if isinstance(value, (list, dict)):
        value = (_OverrideList if isinstance(value, list) else _OverrideDict)(value)  # named as an override's
        value.text = text
    elif value is None or text.startswith(("'", '"')):
        value = _Typed(value, value)  # quoted text is YAML's to read, null is null: no text to take
    else:
        value = _Typed(value, text, not_yaml)  # a bad value is named as an override's
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


_ABSENT = object()


def dotted_value(data: dict, key: str, default: Any = _ABSENT) -> Any:
    """data["a"]["b"]["c"] for key "a.b.c" (as apply_override nests it); `default` when a part is
    missing (a KeyError without one)."""
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            if default is _ABSENT:
                raise KeyError(key)
            return default
        node = node[part]
    return node


def check_override_key(root: type, item: str, where: str = "overrides") -> None:
    """An override's key must name a setting or a section of `root` (errors name `where` the key
    was typed — the command line's overrides, a pipeline stage's inputs — not the config file)."""
    if "=" not in item:
        return  # apply_override says what an override looks like
    key = item.split("=", 1)[0].strip()
    cls, prefix, parts = root, "", key.split(".")
    for i, part in enumerate(parts):
        if cls is None:
            raise ConfigError(f"{where}: {prefix.rstrip('.')} is a setting, not a section ({key})")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:  # judged by the whole rest, as a file's unknown section is by its first key
            unknown = prefix + ".".join(parts[i:])
            hint = _unknown_key_hint(unknown, root, [prefix + n for n in fields])
            raise ConfigError(f"{where}: unknown key {unknown}{hint}")
        hint = typing.get_type_hints(cls)[part]
        cls, prefix = (hint if dataclasses.is_dataclass(hint) else None), prefix + part + "."


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, type hint, default, help) for every leaf field, and
    (section key, None, None, help) before each section's fields."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, help_text = hints[f.name], f.metadata.get("help", "")
        if dataclasses.is_dataclass(hint):
            yield prefix + f.name, None, None, help_text
            yield from _walk(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield prefix + f.name, hint, default, help_text


def _leaf_keys(cls: type) -> list[str]:
    return [key for key, hint, _, _ in _walk(cls) if hint is not None]


# Argument names users bring from transformers / TRL / LLaMA-Factory configs → the posttrain
# settings that mean the same, in order: a command's hint is the first one it has. Where the
# meaning is not one to one, the note after the key says how they differ. Names posttrain
# shares (beta, warmup_ratio, temperature, ...) are found by their last part.
_FAMILIAR_NAMES: dict[str, tuple[str, ...]] = {
    # transformers' TrainingArguments
    "learning_rate": ("train.lr",),
    "per_device_train_batch_size": ("train.batch_size",), "train_batch_size": ("train.batch_size",),
    "gradient_accumulation_steps": ("train.grad_accum",), "num_train_epochs": ("train.epochs",),
    "lr_scheduler_type": ("train.schedule",), "optim": ("train.optimizer",),
    "adam_beta1": ("train.adam_betas",), "adam_beta2": ("train.adam_betas",), "adam_epsilon": ("train.adam_eps",),
    "bf16": ("train.mixed_precision",), "fp16": ("train.mixed_precision",),
    "eval_steps": ("train.eval_every",),
    "eval_strategy": ("train.eval_every (posttrain evaluates every N steps, and always at the end)",),
    "evaluation_strategy": ("train.eval_every (posttrain evaluates every N steps, and always at the end)",),
    "save_steps": ("train.save_every",), "save_strategy": ("train.save_every (posttrain saves every N steps)",),
    "logging_steps": ("train.log_every",), "logging_strategy": ("train.log_every (posttrain logs every N steps)",),
    "save_total_limit": ("train.keep_last",), "resume_from_checkpoint": ("train.resume",),
    "model_name_or_path": ("model.path",), "sft_model_path": ("model.path",), "torch_dtype": ("model.dtype",),
    "dataset_name": ("data.train_files (posttrain reads local files: save a Hub dataset with save_to_disk "
                     "and list its directory)",),
    "max_seq_length": ("data.max_length",), "cutoff_len": ("data.max_length",),
    "max_prompt_length": ("data.max_prompt_length", "data.max_length"),
    "max_completion_length": ("rollout.max_new_tokens", "data.max_length", "generation.max_new_tokens"),
    "response_length": ("rollout.max_new_tokens",),
    # PEFT / LLaMA-Factory
    "use_peft": ("adapter.method",), "peft_type": ("adapter.method",), "finetuning_type": ("adapter.method",),
    "enabled": ("adapter.method",), "lora_r": ("adapter.lora.r",), "lora_alpha": ("adapter.lora.alpha",),
    "lora_dropout": ("adapter.lora.dropout",), "lora_target": ("adapter.lora.target_modules",),
    "lora_target_modules": ("adapter.lora.target_modules",), "use_dora": ("adapter.lora.dora",),
    "use_rslora": ("adapter.lora.rslora",), "freeze_trainable_layers": ("adapter.freeze.top_layers",),
    # TRL's DPOConfig, KTOConfig, RewardConfig
    "loss_type": ("dpo.loss", "grpo.aggregation (TRL's loss_type grpo is sequence; bnpo and dapo are token; "
                              "dr_grpo is constant with grpo.scale_rewards=false)"),
    "rpo_alpha": ("dpo.nll_weight",),
    "precompute_ref_log_probs": ("dpo.reference (precompute, the default, or live)",),
    "desirable_weight": ("dpo.kto_desirable_weight",), "undesirable_weight": ("dpo.kto_undesirable_weight",),
    "center_rewards_coefficient": ("reward.centering",),
    # TRL's GRPOConfig, RLOOConfig, PPOConfig
    "num_iterations": ("grpo.updates_per_rollout", "ppo.epochs"),
    "num_ppo_epochs": ("ppo.epochs",), "num_mini_batches": ("ppo.minibatches",),
    "epsilon": ("grpo.clip_eps", "ppo.clip_eps"), "cliprange": ("ppo.clip_eps", "grpo.clip_eps"),
    "epsilon_high": ("grpo.clip_eps (posttrain clips the ratio with one ε on both sides)",),
    "cliprange_value": ("ppo.value_clip",),
    "beta": ("dpo.beta", "grpo.beta", "ppo.kl_coef"),
    "use_vllm": ("rollout.engine (rollout.engine=vllm)",),
    "reward_funcs": ("reward.functions",), "reward_weights": ("reward.weights",),
    "reward_model_path": ("reward.models",), "missing_eos_penalty": ("reward.no_eos_penalty",),
    "whiten_rewards": ("reward.normalize",),
}


# Values of a choice setting that TRL / transformers spell differently → posttrain's, by setting
# (a note after the value as in _FAMILIAR_NAMES).
_FAMILIAR_VALUES: dict[str, dict[str, str]] = {
    "dpo.loss": {"sigmoid": "dpo (TRL's sigmoid; with label_smoothing it is cdpo)"},
    "train.optimizer": {"adamw_torch": "adamw", "adamw_hf": "adamw", "adamw_torch_fused": "adamw_fused",
                        "adamw_bnb_8bit": "adamw_8bit"},
    "train.schedule": {"constant_with_warmup": "constant (warmup is train.warmup_steps)",
                       "cosine_with_min_lr": "cosine (with train.min_lr_ratio)"},
    "train.mixed_precision": {"True": "bf16 (or fp16)", "bfloat16": "bf16", "float16": "fp16"},
    "model.dtype": {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"},
    "grpo.aggregation": {"grpo": "sequence", "bnpo": "token", "dapo": "token",
                         "dr_grpo": "constant (Dr. GRPO also sets grpo.scale_rewards=false)"},
}


def suggest_setting(key: str, root: type) -> tuple[str, str] | None:
    """(the setting of `root` that `key` — a mistyped dotted key, a TRL / transformers argument
    name — most likely means, a note on how they differ or ""), or None: a familiar name's
    counterpart, a key with the same last part, then a close spelling. A familiar name never gets
    a spelling guess: a name that reads alike is another setting (rpo_alpha is not lora.alpha)."""
    keys = _leaf_keys(root)
    last = key.rsplit(".", 1)[-1]
    for meant in _FAMILIAR_NAMES.get(last, ()):
        setting, _, note = meant.partition(" ")
        if setting in keys:
            return setting, note
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if same_name:
        return same_name[0], ""
    if last in _FAMILIAR_NAMES:
        return None
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:  # a misspelt last part in the wrong section: it must read nearly alike
        by_last = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_last[c] for c in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.75)]
    return (close[0], "") if close else None


def _unknown_key_hint(unknown: str, root: type, valid: list[str]) -> str:
    """What follows 'unknown key X': the command that has X, else the setting X likely means, else
    the valid keys where X was given."""
    elsewhere = _elsewhere(unknown, root)
    if elsewhere:
        return elsewhere
    found = suggest_setting(unknown, root)
    if found is None:
        return f"; valid keys here: {', '.join(valid)}"
    return _did_you_mean(*found)


def _did_you_mean(meant: str, note: str = "") -> str:
    return f"; did you mean {meant}?" + (f" {note}" if note else "")


def _elsewhere(key: str, root: type) -> str | None:
    """'; ppo.kl_coef is a setting of posttrain ppo' when another command's config has the key
    (a PPO setting in a GRPO config is no typo: a nearest-spelling guess would mislead)."""
    try:
        from posttrain.cli import _DATA_COMMANDS, _STAGES
    except ImportError:  # pragma: no cover - a partial install
        return None
    owners = [command for command, config_cls, keys in _command_configs(tuple({**_STAGES, **_DATA_COMMANDS}.items()))
              if config_cls is not root and key in keys]
    return f"; {key} is a setting of posttrain {' / '.join(owners)}" if owners else None


@functools.lru_cache(maxsize=1)
def _command_configs(registry: tuple) -> list[tuple[str, type, frozenset[str]]]:
    """(command, config class, its setting keys) once per class (kto and orpo are dpo's): built
    once, since a pipeline's load asks about every pipeline-wide override in every stage."""
    seen: dict[type, str] = {}
    for command, loader in registry:
        seen.setdefault(loader()[0], command)
    return [(command, config_cls, frozenset(_leaf_keys(config_cls))) for config_cls, command in seen.items()]


def _build(cls: type, data: dict[str, Any], prefix: str, source: str, root: type) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    if prefix == "":  # `x-common: &common {...}` (docker-compose's extension fields): anchors to merge, no setting
        data = {key: value for key, value in data.items() if not (isinstance(key, str) and key.startswith("x-"))}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            value = data[key]
            if isinstance(value, dict) and value:  # an unknown section: judge it by its first key
                key = f"{key}.{next(iter(value))}"
            hint = _unknown_key_hint(prefix + str(key), root, [prefix + name for name in fields])
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source, root)
        if prefix == "" and name == "output_dir" and not kwargs[name].strip():  # every stage's run directory
            where = "overrides" if _from_override(value) else source
            raise ConfigError(f"{where}: output_dir is empty (it would write the run into the current directory); "
                              f"name a directory, e.g. output_dir={fields[name].default}")
    return cls(**kwargs)


def _takes_list(hint: Any) -> bool:
    origin = get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_takes_list(a) for a in get_args(hint))
    return origin is list


def _takes_text(hint: Any, text: str) -> bool:
    """Whether a setting of type `hint` reads an override's text as typed."""
    origin = get_origin(hint)
    if origin in (Union, types.UnionType, list):
        return any(_takes_text(a, text) for a in get_args(hint) if a is not type(None))
    if origin is Literal:
        return text in get_args(hint)
    return hint is str


def _unreadable_list(key: str, value: _Typed) -> ConfigError:
    """train.freeze=[*x*]: YAML reads a list item's leading * as an alias (& an anchor, ! a tag),
    fails, and the whole text would be one item: say so, with the items quoted."""
    import json

    items = [item.strip() for item in value.text[1:].rstrip("]").split(",") if item.strip()]
    quoted = "[" + ", ".join(item if item[:1] in "'\"" else json.dumps(item) for item in items) + "]"
    why = ("; YAML reads an item starting with * as an alias, & as an anchor, ! as a tag"
           if any(item[:1] in "*&!" for item in items) else "")
    return ConfigError(f"overrides: {key}={value.text} is not a list YAML can read ({value.not_yaml}){why}; quote "
                       f"the items, and the whole override for the shell: {key}='{quoted}'")


def _coerce(hint: Any, value: Any, key: str, source: str, root: type) -> Any:
    if isinstance(value, (_OverrideList, _OverrideDict)) and not value.text.startswith(("[", "{")):
        # `system=Note: be kind`: YAML's mapping, not typed as one: text to any setting but a section
        value = _Typed(value if dataclasses.is_dataclass(hint) else value.text, value.text)
    if isinstance(value, _Typed):
        if value.not_yaml and str(value.text).startswith("[") and _takes_list(hint):
            raise _unreadable_list(key, value)
        text = value.text
        value, source = (text if isinstance(text, str) and _takes_text(hint, text) else value.value), "overrides"
    elif isinstance(value, (_OverrideList, _OverrideDict)):
        value, source = (list(value) if isinstance(value, list) else dict(value)), "overrides"
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):  # `train:` with every key commented out (null): the section's defaults
        return _build(hint, {} if value is None else value, key + ".", source, root)
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, bool) and not any(isinstance(c, bool) for c in choices):
            # YAML 1.1 reads a file's `mixed_precision: no` as false: back to the word it was
            words = ("yes", "on", "true") if value else ("no", "off", "false")
            value = next((w for w in words if w in choices), value)
        # by type too: 0 == False and 1 == True, but model.lean_activations=0 is not `false`
        if not any(type(value) is type(choice) and value == choice for choice in choices):
            familiar = _FAMILIAR_VALUES.get(key, {}).get(str(value))
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_txt = (_did_you_mean(*familiar.split(" ", 1)) if familiar else
                        _did_you_mean(close[0]) if close else "")
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(map(str, choices))}{hint_txt}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, source, root)
    if origin is list:
        (item_type,) = get_args(hint)
        if value == "" or value is None:
            return []  # train.freeze= , or a file's `eval_files:` left empty (null): nothing
        if isinstance(value, (str, os.PathLike, numbers.Real)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(item_type, v, key, source, root) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        whole = _whole_number(value)
        if whole is None:
            raise ConfigError(f"{source}: {key} must be an integer, got {value!r} (a whole number: 1000, 1e3 "
                              f"or '1000')")
        return whole
    if hint is float:
        number = None
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
        if not math.isfinite(number):  # no option means anything by nan or inf; each says what 0 means
            raise ConfigError(f"{source}: {key} must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, os.PathLike) and isinstance(os.fspath(value), str):
            return os.fspath(value)  # a pathlib.Path: run_sft(...) / "final" as the next stage's model.path
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _whole_number(value: Any) -> int | None:
    """An int setting's value, or None: an integer (numpy's too: a sweep over np.arange), or a float
    or text that is one exactly — YAML 1.1 reads `max_steps: 1e3` as the text '1e3', and `'100'` is
    text too, as `lr: '1e-4'` is for a float setting. 1.5, '1e-3', nan and true are none."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)  # exact, however long
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                return None
    if isinstance(value, numbers.Real) and math.isfinite(value) and float(value).is_integer():
        return int(value)
    return None


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "|".join(map(str, get_args(hint)))
    if origin is list:
        return f"list[{_type_name(get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))


def _help_lines(cls: type, prefix: str = "", hidden: tuple[str, ...] = ()):
    for key, hint, default, help_text in _walk(cls, prefix):
        if any(key == h or key.startswith(h + ".") for h in hidden):
            continue
        if hint is None:
            yield f"{key}:  ({help_text})"
        else:
            yield f"  {key} ({_type_name(hint)}, default {default!r}): {help_text}"


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """A nested dict's leaves under dotted keys ({"train": {"lr": 1e-5}} -> {"train.lr": 1e-5}),
    each key after `prefix`."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def section_values(section_cls: type, config: Any = None, overrides: dict[str, Any] | None = None,
                   caller: str = "") -> dict[str, Any]:
    """A section's fields as a dict: `config`'s values (defaults when None), then keyword overrides.

    Lets library functions take a config section or plain keywords without restating defaults.
    """
    defaults = dataclasses.asdict(section_cls())
    values = {name: getattr(config, name, default) for name, default in defaults.items()}
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise TypeError(f"{caller} got unexpected arguments: {sorted(unknown)}")
    values.update(overrides or {})
    return values


def markdown_reference(cls: type, sections: tuple[str, ...] = ()) -> str:
    """The config reference table for the README (kept in sync by a test); `sections`
    limits it to keys under those sections."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, hint, default, help_text in _walk(cls):
        if hint is not None and (not sections or key.split(".")[0] in sections):
            type_name = _type_name(hint).replace("|", "\\|")
            rows.append(f"| `{key}` | {type_name} | `{default!r}` | {help_text} |")
    return "\n".join(rows)
