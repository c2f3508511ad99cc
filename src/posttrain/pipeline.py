"""`posttrain pipeline PIPELINE.yaml`: several stages in order, each starting from an earlier
stage's output (SFT → reward model → PPO, SFT → DPO, quality → SFT → DPO → evaluate, ...),
resumable stage by stage.

    output_dir: runs/rlhf                  # stage NAME runs in runs/rlhf/NAME (relative to the cwd)
    overrides: [train.progress_bar=false]  # optional: every stage that has the setting
    stages:
      - {name: clean, kind: quality, config: quality.yaml}
      - {name: sft, kind: sft, config: sft_full.yaml, inputs: {data.train_files: clean}}  # <- clean/kept.jsonl
      - {name: rm, kind: rm, overrides: {train.max_steps: 100}}
      - {name: ppo, kind: ppo, inputs: {reward.models: [rm]}}   # <- runs/rlhf/rm/final
      - {name: report, kind: evaluate, inputs: {reference: sft}}  # policy <- ppo

Kinds. The training stages (sft, rm, dpo, kto, orpo, grpo, rloo, ppo) write a model; the data
stages write rows (quality: kept.jsonl; rlaif: preferences.jsonl; constitutional / cai: sft.jsonl
and preferences.jsonl; self-instruct: sft.jsonl) or a report (evaluate, redteam). Data stages
run on one process.

Wiring. `inputs` maps config keys to earlier stages (a list key takes a list; "LABEL=stage"
keeps a reward component's name). A model setting gets a training stage's final/; a rows setting
a data stage's file: the one a stage of this kind trains on (sft.jsonl for sft, preferences.jsonl
for rm and dpo), or the one named as NAME/FILE (cai/preferences.jsonl); redteam's compare_to an
earlier redteam stage's directory. Before the first stage runs (and under --dry-run), every data
file a stage lists that no earlier stage writes must be there; before a stage runs, each
data-stage file it reads must exist and hold a row. Unless a stage's inputs
or own overrides set its model (model.path; a data stage's policy.model, generator.model,
target.model or policy), it starts from the latest earlier stage that produces a policy (a
training stage other than rm) - an rm stage too, as InstructGPT starts its reward model from the
SFT model - so a config file's model only matters to the first stage. A model given to a data
stage's client (policy.model, judge.model, ...) is loaded in-process (its kind becomes local). A
LoRA/IA3 policy is merged into NAME/merged for the stages that train from it. Command-line
overrides: NAME.key=value (one stage), key=value (every stage that has the setting; one that no
stage has is an error).

Resume. Each stage's resolved config is recorded in output_dir/pipeline_state.json. A stage is
skipped when it finished (final/ and summary.json; a data stage's last file), its config is
unchanged and the runs it read are those it was trained on. An interrupted stage reruns with
train.resume=auto (a data stage from its log; also one whose items partly failed). A stage whose
config changed, or that reads the output of a stage that runs again, reruns from scratch
(train.resume=never; a data stage's directory is emptied first, unless only settings its command
resumes across changed: Producer.resumable); stages that do not read it are left alone. Edits inside data files
are not detected: use --from NAME.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import itertools
import json
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from posttrain.config.schema import flatten, user_path
from posttrain.env import first_process, launched_processes
from posttrain.errors import ConfigError, DataError, UserError
from posttrain.files import write_atomically

STATE_FILE = "pipeline_state.json"
REWARD_MODEL_KINDS = {"rm"}  # every other training kind produces a policy
UNFINGERPRINTED = {"train.resume", "train.progress_bar"}  # set by the pipeline, or change no result
MERGEABLE_METHODS = {"lora", "dora", "qlora", "ia3"}
_RESERVED_NAMES = {"model", "adapter", "data", "train", "eval"}  # config sections every stage has
_TOP_KEYS, _STAGE_KEYS = ("output_dir", "overrides", "stages"), ("name", "kind", "config", "overrides", "inputs")


@dataclasses.dataclass(frozen=True)
class Producer:
    """A kind that writes rows or a report instead of training a model."""

    outputs: dict[str, str]  # output name -> its file in the run directory, for later stages' inputs
    done: str  # written last: the stage is complete when it is there
    model_key: str | None  # the setting a model goes in (by default the latest policy stage's)
    failed: tuple[str, ...] = ()  # where the count of items that failed this run is: (file, key, key...)
    resumable: frozenset[str] = frozenset()  # settings whose change the command resumes across, from its log


# Settings of any client section that change no answer (rlaif.py's result_settings leaves them out too).
_TRANSPORT = ("timeout_s", "max_retries", "backoff_s", "requests_per_second", "base_url", "api_key_env")
_CAI = Producer({"sft": "sft.jsonl", "pairs": "preferences.jsonl"}, "summary.json", "policy.model", ("summary.json", "failed"),
                frozenset({"data.limit", "constitutional.concurrency"}))
DATA_KINDS = {
    "quality": Producer({"rows": "kept.jsonl"}, "report.md", None),
    "rlaif": Producer({"pairs": "preferences.jsonl"}, "summary.json", "policy.model", ("summary.json", "run", "failed"),
                      frozenset({"data.limit", "rlaif.concurrency"})),
    "constitutional": _CAI, "cai": _CAI,
    "self-instruct": Producer({"sft": "sft.jsonl"}, "summary.json", "generator.model", (),
                              frozenset({"self_instruct.max_rounds", "self_instruct.num_tasks",
                                         "self_instruct.concurrency"})),
    "redteam": Producer({}, "report.md", "target.model", ("report.json", "failed"),
                        frozenset({"probes.limit", "concurrency"})),
    "evaluate": Producer({}, "report.md", "policy", ("report.json", "failed")),  # its red team's failed requests
}
# Which output of a data stage a stage reads when its input names the data stage alone.
_WANTED_OUTPUT = {"sft": "sft", "rm": "pairs", "dpo": "pairs", "kto": "pairs", "orpo": "pairs"}
# Settings that take an earlier run's output directory of the same kind (redteam's rates beside these).
_RUN_DIR_KEYS = {"compare_to"}
# Settings that take a model directory (besides a client's NAME.model and reward.models).
_MODEL_KEYS = {"model.path", "policy", "reference", "ppo.value_model_path", "tokens.tokenizer"}


def _is_model_key(key: str) -> bool:
    return key in _MODEL_KEYS or key == "reward.models" or key.endswith(".model")


@dataclasses.dataclass
class Stage:
    """One resolved stage: its validated config and where its inputs come from."""

    name: str
    kind: str
    cfg: Any  # the stage's typed config, output_dir and wiring applied
    run: Any  # run_X(cfg) -> run_dir
    deps: list[str]  # earlier stages whose outputs this one reads
    wiring: dict[str, Any]  # config key -> the path(s) it was given
    merge: bool = False  # a later stage starts from this one's adapters: write merged/
    fingerprint: str = ""
    flat: dict[str, Any] = dataclasses.field(default_factory=dict)
    unread: dict[str, str] = dataclasses.field(default_factory=dict)  # pipeline-wide items left out -> why

    @property
    def run_dir(self) -> Path:
        return user_path(self.cfg.output_dir)

    @property
    def producer(self) -> Producer | None:
        return DATA_KINDS.get(self.kind)

    @property
    def makes_policy(self) -> bool:
        return self.producer is None and self.kind not in REWARD_MODEL_KINDS

    def complete(self) -> bool:
        if self.producer is not None:
            return (self.run_dir / self.producer.done).is_file()
        return is_complete(self.run_dir)


# --------------------------------------------------------------------------- loading and validation


def _registry() -> dict:
    from posttrain.cli import _DATA_COMMANDS, _STAGES  # data-driven: a kind added there works here

    return {**_STAGES, **{kind: _DATA_COMMANDS[kind] for kind in DATA_KINDS}}


def _alias_overrides(kind: str, items: list[str]) -> list[str]:
    """kto, orpo, rloo: another stage with a setting fixed, appended after `items`; an item that
    contradicts it (a kto stage with dpo.loss=ipo) is refused, as `posttrain kto dpo.loss=ipo` is."""
    from posttrain.cli import ALIAS_OVERRIDES, check_alias

    check_alias(kind, items)
    return ALIAS_OVERRIDES.get(kind, [])


def _override_list(value: Any, where: str) -> list[str]:
    """`key=value` strings from a list of them or a (possibly nested) mapping."""
    if value is None:
        return []
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: overrides must be a list of key=value strings or a mapping of keys to values")
    out = []
    for key, item in value.items():
        if isinstance(item, dict):
            out += [f"{key}.{inner}" for inner in _override_list(item, where)]
        else:
            out.append(f"{key}={json.dumps(item)}")  # JSON is YAML, read back by apply_override
    return out


def _keys(overrides: list[str]) -> set[str]:
    return {item.split("=", 1)[0].strip() for item in overrides}


def _check_keys(data: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(allowed)}"
            raise ConfigError(f"{where}: unknown key {key!r}; {hint}")


def _split_cli(overrides: list[str], names: set[str]) -> tuple[str | None, list[str], dict[str, list[str]]]:
    """Command-line overrides: output_dir=DIR, NAME.key=value for one stage, key=value for every stage."""
    output_dir, common, per_stage = None, [], {}
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like NAME.section.key=value or section.key=value")
        if key == "output_dir":
            output_dir = item.split("=", 1)[1]
        elif key.split(".")[0] in names:
            name, rest = key.split(".", 1) if "." in key else (key, "")
            if not rest:
                raise ConfigError(f"override {item!r} names stage {name!r} and no key; write {name}.KEY=value")
            per_stage.setdefault(name, []).append(item.split(".", 1)[1])  # a top-level key: checked at load
        else:
            common.append(item)
    return output_dir, common, per_stage


def load_pipeline(path: str | Path, overrides: list[str] = ()) -> tuple[Path, list[Stage]]:
    """(output_dir, stages) of a pipeline file, every stage's config loaded and validated. Raises ConfigError."""
    from posttrain.config import read_yaml

    path = Path(path)
    data = read_yaml(path)
    _check_keys(data, _TOP_KEYS, str(path))
    specs = data.get("stages")
    if not isinstance(specs, list) or not specs or not all(isinstance(s, dict) for s in specs):
        raise ConfigError(f"{path}: stages must be a non-empty list of mappings with name, kind, config, ...")
    names = [str(s.get("name", s.get("kind", ""))) for s in specs]
    cli_dir, cli_common, cli_stage = _split_cli(list(overrides), set(names))
    output_dir = user_path(cli_dir or data.get("output_dir") or f"runs/{path.stem}")
    common = _override_list(data.get("overrides"), f"{path}: overrides")
    if "output_dir" in _keys(common):
        raise ConfigError(f"{path}: overrides: output_dir is the pipeline's own key (each stage runs in "
                          "OUTPUT_DIR/NAME); set it at the top of the file")
    cli_stage[None] = cli_common  # precedence: file (every stage, then the stage's), then command line (same)
    stages: list[Stage] = []
    for index, spec in enumerate(specs):
        where = f"{path}: stage {names[index] or index + 1!r}"
        try:
            stages.append(_load_stage(spec, names[index], stages, path, output_dir, common, cli_stage, where))
        except UserError as exc:  # name the stage: one pipeline file holds many configs
            raise type(exc)(f"{where}: {exc}" if not str(exc).startswith(where) else str(exc)) from None
    for item, where in [*((i, f"{path}: overrides") for i in common), *((i, "overrides") for i in cli_common)]:
        if not any(_fits(type(stage.cfg), item) for stage in stages):  # a typo: the closest key of any stage
            from posttrain.config.schema import check_override_key

            errors = []
            for config_cls in dict.fromkeys(type(stage.cfg) for stage in stages):
                try:
                    check_override_key(config_cls, item, where=where)
                except ConfigError as exc:
                    errors.append(exc)
            raise next((e for e in errors if "did you mean" in str(e)), errors[0])
        takers = [stage for stage in stages if _fits(type(stage.cfg), item)]
        if all(item in stage.unread for stage in takers):  # (an adapter setting): no stage's method reads it
            raise ConfigError(f"{where}: {item} is read by no stage: " + "; ".join(
                f"stage {stage.name!r}: {stage.unread[item]}" for stage in takers))
    return output_dir, stages


def _fits(config_cls: type, item: str) -> bool:
    """Whether a pipeline-wide override names a setting of this stage's config (a quality stage has
    no train section: train.lr=... is for the stages that train)."""
    from posttrain.config.schema import _leaf_keys, check_override_key

    try:
        check_override_key(config_cls, item)
    except ConfigError:
        return False
    key, _, value = item.partition("=")
    if key.strip() in _leaf_keys(config_cls):
        return True
    import yaml  # a section (rlaif's `policy`, evaluate's `policy` is a setting): only a mapping fits it

    try:
        return isinstance(yaml.safe_load(value), dict)
    except yaml.YAMLError:
        return False


def check_stage_item(config_cls: type, stage: str, item: str) -> None:
    """A command line's `STAGE.KEY=value` is stage STAGE's `KEY=value` (`_split_cli`). Where KEY starts
    with none of the stage's sections or keys and STAGE.KEY is a setting of the stage (`dpo.beta=0.2`
    with a stage called dpo: DPO's dpo.beta), it is refused, naming what to write: STAGE.STAGE.KEY=value.
    Any other unknown KEY is left to the config's own check, which names the closest key.
    (`posttrain pipeline` and `posttrain demo` both read their overrides so.) Raises ConfigError."""
    key = item.split("=", 1)[0].strip()
    own = {f.name for f in dataclasses.fields(config_cls)}
    if key.split(".")[0] not in own and _fits(config_cls, f"{stage}.{item}"):
        raise ConfigError(f"override {stage + '.' + item!r} reads as stage {stage!r}, key {key!r}, which the "
                          f"{stage} stage does not have; for its {stage}.{key}, write {stage}.{stage}.{item}")


def _given(items: list[str]) -> dict:
    """The settings the pipeline sets for a stage (its overrides, not its config file's), as a nested dict."""
    from posttrain.config.schema import apply_override

    given: dict = {}
    for item in items:
        apply_override(given, item)
    return given


def _load_stage(spec: dict, name: str, earlier: list[Stage], path: Path, output_dir: Path, common: list[str],
                cli_stage: dict[str | None, list[str]], where: str) -> Stage:
    _check_keys(spec, _STAGE_KEYS, where)
    kind = str(spec.get("kind", ""))
    registry = _registry()
    if kind not in registry:
        close = difflib.get_close_matches(kind, list(registry), n=1)
        raise ConfigError(f"kind {kind!r} is not a stage" + (f"; did you mean {close[0]}?" if close else "")
                          + f" (stages: {', '.join(registry)})")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", name) or name in _RESERVED_NAMES:
        raise ConfigError(f"name {name!r}: use letters, digits, _ or - (it names the run directory), and not one of "
                          f"{', '.join(sorted(_RESERVED_NAMES))} (NAME.key=value overrides would be ambiguous)")
    if any(s.name == name for s in earlier):
        raise ConfigError(f"two stages are called {name!r}; give each a unique name")
    own_file, own_cli = _override_list(spec.get("overrides"), f"{where}: overrides"), cli_stage.get(name, [])
    own = own_file + own_cli
    config_cls, run = registry[kind]()
    for item in own_cli:
        check_stage_item(config_cls, name, item)
    if "output_dir" in _keys(own):
        raise ConfigError("output_dir is the pipeline's (each stage runs in OUTPUT_DIR/NAME); set it at the top")
    config_file = path.parent / user_path(spec["config"]) if spec.get("config") else None  # ~ is home
    wide = ([i for i in common if _fits(config_cls, i)], [i for i in cli_stage[None] if _fits(config_cls, i)])
    items = [*wide[0], *own_file, *wide[1], *own_cli]
    wiring, deps = _wire(spec.get("inputs") or {}, earlier, own, kind, config_cls, _given(items))
    tail = [f"{k}={json.dumps(v)}" for k, v in wiring.items()]
    tail += _alias_overrides(kind, items + tail) + [f"output_dir={json.dumps(str(output_dir / name))}"]
    cfg = config_cls.load(config_file, items + tail)
    unread = _unread_adapter_items(cfg, [*wide[0], *wide[1]])
    if unread:  # a pipeline-wide adapter setting for the stages whose methods read it, left out here
        kept = [[i for i in part if i not in unread] for part in wide]
        cfg = config_cls.load(config_file, [*kept[0], *own_file, *kept[1], *own_cli, *tail])
    validate = _validator(config_cls, run)
    if validate is not None:
        validate(cfg)
    stage = Stage(name, kind, cfg, run, deps, wiring, unread=unread)
    stage.flat = {k: v for k, v in flatten(cfg.to_dict()).items() if k not in UNFINGERPRINTED}
    stage.fingerprint = hashlib.sha256(json.dumps([kind, stage.flat], sort_keys=True).encode()).hexdigest()[:16]
    stage.deps += [s.name for s in earlier if s.name not in stage.deps and _reads(stage.flat, s.run_dir)]
    return stage


def _unread_adapter_items(cfg: Any, wide: list[str]) -> dict[str, str]:
    """Of the overrides every stage gets (`wide`), those that set only adapter settings this stage's
    adapter.method does not read (adapter.lora.r=16 at the top, a stage with method full), each
    with why: a stage refuses such a setting of its own (`unread_adapter_settings`), but one set
    for the whole pipeline is for the stages whose methods read it."""
    adapter = getattr(cfg, "adapter", None)
    if adapter is None or not wide:
        return {}
    from posttrain.models.adapters.spec import plan_adapters, unread_adapter_settings

    try:
        unread = unread_adapter_settings(adapter, plan_adapters(adapter))
    except ConfigError:  # the stage's validation says what is wrong with its adapter.method
        return {}
    out = {}
    for item in wide:
        leaves = flatten(_given([item]))
        if leaves and all(key in unread for key in leaves):
            out[item] = unread[next(iter(leaves))]
    return out


def _wire(inputs: Any, earlier: list[Stage], own: list[str], kind: str, config_cls: type,
          given: dict) -> tuple[dict[str, Any], list[str]]:
    """Config key -> path(s) of earlier stages' outputs, with the default model; and the stages used.

    An input names a stage (NAME, or LABEL=NAME for a reward component) or one file of a data
    stage (NAME/FILE). A model setting gets a training stage's final/ (merged/ for a policy with
    adapters that a stage trains from); a rows setting gets a data stage's output file."""
    from posttrain.config.schema import _leaf_keys, check_override_key, dotted_value

    if not isinstance(inputs, dict):
        raise ConfigError("inputs must map config keys to earlier stage names, e.g. {reward.models: [rm]}")
    for key in inputs:  # else a misspelt key surfaces as one of the stage's overrides
        check_override_key(config_cls, f"{key}=", where="inputs")
    by_name = {s.name: s for s in earlier}
    clash = sorted(set(inputs) & _keys(own))
    if clash:
        raise ConfigError(f"{clash[0]} is set both in inputs and in overrides; keep one")
    wiring, deps = {}, []

    def output_of(ref: Any, key: str) -> str:
        label, _, target = str(ref).rpartition("=")
        if label and key != "reward.models":
            raise ConfigError(f"inputs.{key}: {ref!r}: only reward.models takes a LABEL=stage reference (a reward "
                              f"component's name); write {target}")
        stage_name, _, file = target.partition("/")
        if stage_name not in by_name:
            later = "is not an earlier stage (a stage reads only what ran before it)"
            raise ConfigError(f"inputs.{key}: {stage_name!r} {later}; earlier stages: {', '.join(by_name) or 'none'}")
        source = by_name[stage_name]
        path = _data_output(source, key, kind, file) if source.producer is not None else _model_output(source, key,
                                                                                                       kind, file)
        deps.append(stage_name)
        return (f"{label}=" if label else "") + str(path)

    leaves = set(_leaf_keys(config_cls))
    for key, ref in inputs.items():
        wiring[key] = [output_of(r, key) for r in ref] if isinstance(ref, list) else output_of(ref, key)
        if isinstance(wiring[key], str) and _is_list(config_cls, key):
            wiring[key] = [wiring[key]]
        client = key.removesuffix(".model") + ".kind"
        if key.endswith(".model") and client in leaves:  # a directory: the client must load it, not ask a server
            if str(dotted_value(given, client, "local")) != "local":
                raise ConfigError(f"inputs.{key}: a stage's output is a directory, which {client}="
                                  f"{dotted_value(given, client)} would send to a server as a model name; set "
                                  f"{client}: local")
            wiring[client] = "local"
    model_key = DATA_KINDS[kind].model_key if kind in DATA_KINDS else "model.path"
    policies = [s for s in earlier if s.makes_policy]
    client = (model_key or "").removesuffix(".model") + ".kind"
    served = client in leaves and str(dotted_value(given, client, "local")) != "local"  # a server's model name
    untouched = model_key is not None and model_key not in wiring and dotted_value(given, model_key, None) is None \
        and not served
    if untouched and policies:
        wiring[model_key] = output_of(policies[-1].name, model_key)
        if client in leaves:
            wiring[client] = "local"
    return wiring, list(dict.fromkeys(deps))


def _is_list(config_cls: type, key: str) -> bool:
    import typing

    from posttrain.config.schema import _walk

    hint = next((h for k, h, _, _ in _walk(config_cls) if k == key), None)
    return typing.get_origin(hint) is list


def _data_output(source: Stage, key: str, kind: str, file: str) -> Path:
    """The file of data stage `source` that `key` of a `kind` stage reads."""
    outputs = source.producer.outputs
    if key in _RUN_DIR_KEYS:  # an earlier run of the same command, compared with this one
        if source.kind != kind:
            raise ConfigError(f"inputs.{key}: {source.name!r} is a {source.kind} stage; {key} takes an earlier "
                              f"{kind} stage")
        return source.run_dir
    if _is_model_key(key):
        wrote = ", ".join(outputs.values()) or "a report"
        raise ConfigError(f"inputs.{key}: {source.name!r} is a {source.kind} stage; it writes {wrote}, not a model")
    if file:
        return source.run_dir / file
    if not outputs:
        raise ConfigError(f"inputs.{key}: {source.name!r} is a {source.kind} stage; it writes a report, which no "
                          "stage reads")
    wanted = _WANTED_OUTPUT.get(kind)
    if len(outputs) > 1 and wanted not in outputs:
        choices = " or ".join(f"{source.name}/{f}" for f in outputs.values())
        raise ConfigError(f"inputs.{key}: {source.name!r} writes {len(outputs)} files; name one: {choices}")
    return source.run_dir / outputs[wanted if len(outputs) > 1 else next(iter(outputs))]


def _model_output(source: Stage, key: str, kind: str, file: str) -> Path:
    """The directory of training stage `source` that `key` of a `kind` stage reads."""
    if file:
        raise ConfigError(f"inputs.{key}: {source.name}/{file}: only a data stage's files are named this way; "
                          f"{source.name!r} is a {source.kind} stage (write {source.name})")
    if not _is_model_key(key):
        raise ConfigError(f"inputs.{key}: {source.name!r} is a {source.kind} stage; it writes a model, not rows")
    if key == "reward.models" and source.kind not in REWARD_MODEL_KINDS:
        raise ConfigError(f"inputs.{key}: {source.name!r} is a {source.kind} stage, not a reward model "
                          "(its directory would score with a freshly drawn head); name an rm stage")
    needs_lm_head = key in ("model.path", "policy", "reference") or key.endswith(".model")
    if needs_lm_head and source.kind in REWARD_MODEL_KINDS and not (key == "model.path" and kind in REWARD_MODEL_KINDS):
        raise ConfigError(f"inputs.{key}: {source.name!r} is a reward model (a score head, no language-model "
                          f"head); a {kind} stage {'starts from' if key == 'model.path' else 'needs'} a policy stage")
    return _output_path(source, key)


def _output_path(source: Stage, key: str) -> Path:
    """Where `key` reads `source`'s result: its final/, or merged/ when a policy's adapters must be folded in
    (a stage trains from model.path; the inference settings load an adapter directory as it is)."""
    methods = set(getattr(getattr(source.cfg, "adapter", None), "method", None) or ["full"]) - {"full", "freeze"}
    if key != "model.path" or source.kind in REWARD_MODEL_KINDS or not methods:
        return source.run_dir / "final"
    if methods - MERGEABLE_METHODS:
        from posttrain.models.adapters.io import cannot_start_from

        raise ConfigError(f"model.path: stage {source.name!r} trains {cannot_start_from(methods)}")
    source.merge = True
    return source.run_dir / "merged"


def _validator(config_cls: type, run: Any):
    """The stage's cross-field checks, validate_<sft|rm|dpo|...|self_instruct>, from posttrain.config, the
    config class's module or the stage's."""
    import sys

    from posttrain import config

    stem = config_cls.__name__.removesuffix("Config")
    names = ["validate_" + stem.lower(), "validate_" + re.sub(r"(?<=[a-z])(?=[A-Z])", "_", stem).lower()]
    modules = [config, sys.modules.get(config_cls.__module__), sys.modules.get(run.__module__)]
    return next((getattr(m, n) for n in names for m in modules if hasattr(m, n)), None)


def _paths(settings: dict[str, Any]) -> list[str]:
    """The paths a stage's settings (key -> value or list) may name: each string value, and of
    reward.models' items the DIR, as the reward reads it (rewards.model_component: NAME=DIR, or a
    DIR that may hold '=', as sweep directories `lr=0.1` do)."""
    from posttrain.rewards import model_component

    paths = []
    for key, value in settings.items():
        items = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]
        paths += [model_component(0, v, 1)[1] for v in items] if key == "reward.models" else items
    return paths


def _reads(flat: dict[str, Any], run_dir: Path) -> bool:
    """Whether any path in a config (`_paths`) lies inside `run_dir` (compared as absolute paths:
    a relative output_dir and an absolute path into it are the same place)."""
    root = os.path.abspath(run_dir)
    for path in _paths(flat):
        candidate = os.path.abspath(os.path.expanduser(path))
        if candidate == root or candidate.startswith(root + os.sep):
            return True
    return False


# --------------------------------------------------------------------------- deciding what runs


def read_state(output_dir: Path) -> dict[str, dict]:
    file = output_dir / STATE_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text(encoding="utf-8"))["stages"]
    except (ValueError, KeyError):
        raise ConfigError(f"{file} is not a pipeline state file; move it away to start the pipeline afresh") from None


def _write_state(output_dir: Path, state: dict[str, dict]) -> None:
    if not first_process():  # several processes run the pipeline: the first keeps the record
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(output_dir / STATE_FILE, json.dumps({"version": 1, "stages": state}, indent=1))


def is_complete(run_dir: Path) -> bool:
    final = run_dir / "final"
    return final.is_dir() and any(final.iterdir()) and (run_dir / "summary.json").is_file()


def _changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def plan(stages: list[Stage], state: dict[str, dict], restart: bool = False,
         from_stage: str | None = None) -> list[tuple[str, str]]:
    """(action, reason) per stage; action is skip, resume (train.resume=auto) or fresh (train.resume=never)."""
    rerun: set[str] = set()
    actions, forced = [], False
    for stage in stages:
        forced = forced or stage.name == from_stage
        record = state.get(stage.name)
        action, reason = _decide(stage, record, state, rerun, restart, forced, from_stage)
        if action != "skip":
            rerun.add(stage.name)
        actions.append((action, reason))
    return actions


def _decide(stage: Stage, record: dict | None, state: dict, rerun: set[str], restart: bool, forced: bool,
            from_stage: str | None) -> tuple[str, str]:
    rerun_inputs = [d for d in stage.deps if d in rerun]
    if restart or forced:
        return "fresh", "--restart" if restart else f"--from {from_stage}"
    if record is None:
        return "fresh", "first run"
    if rerun_inputs:
        return "fresh", f"it uses the output of {', '.join(rerun_inputs)}, which runs again"
    if record["fingerprint"] != stage.fingerprint:
        changed = {k for k in set(record["config"]) | set(stage.flat) if record["config"].get(k) != stage.flat.get(k)}
        if stage.producer is not None and changed and all(_resumes_across(stage.producer, k) for k in changed):
            return "resume", (f"its config changed ({_changes(record['config'], stage.flat)}), which "
                              f"{stage.kind} resumes across: from what its log holds")
        return "fresh", f"its config changed ({_changes(record['config'], stage.flat)})"
    inputs = {d: state.get(d, {}).get("run_id") for d in stage.deps}
    if record.get("inputs") != inputs:
        changed = [d for d in inputs if record.get("inputs", {}).get(d) != inputs[d]]
        return "fresh", f"{', '.join(changed)} was retrained since"
    where = "its last checkpoint" if stage.producer is None else "what its log holds"
    if record["status"] != "done":
        return "resume", f"it was interrupted; resuming from {where}"
    if not stage.complete():
        missing = "final/ or summary.json" if stage.producer is None else stage.producer.done
        return "resume", f"its {missing} is missing; resuming from {where}"
    return "skip", "complete, config and inputs unchanged"


def _resumes_across(producer: Producer, key: str) -> bool:
    return key in producer.resumable or key.rsplit(".", 1)[-1] in _TRANSPORT


# --------------------------------------------------------------------------- running


def run_pipeline(path: str | Path, overrides: list[str] = (), restart: bool = False, from_stage: str | None = None,
                 only: str | None = None, dry_run: bool = False) -> Path:
    """Validate every stage, then run those that need it in order; returns the pipeline's output_dir."""
    from posttrain.config.schema import check_override_list

    check_override_list(overrides, "run_pipeline")
    output_dir, stages = load_pipeline(path, overrides)
    names = [s.name for s in stages]
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    state = read_state(output_dir)
    actions = plan(stages, state, restart and only is None, from_stage)
    if only is not None:
        actions = _only(stages, actions, only, restart)
    _check_given_files(stages, actions)
    busy = [s.name for s, (action, _) in zip(stages, actions) if s.producer is not None and action not in
            ("skip", "not selected")]
    if busy and launched_processes() > 1 and not dry_run:
        raise ConfigError(f"stage {busy[0]} ({stages[names.index(busy[0])].kind}) runs on one process, and this "
                          "pipeline runs on several (torchrun): run it without torchrun first (--only "
                          f"{busy[0]}), then the training stages with it")
    _barrier()
    for number, (stage, (action, reason)) in enumerate(zip(stages, actions), start=1):
        _say(f"{number}/{len(stages)} {stage.name} ({stage.kind}): {_VERB[action]}: {reason}")
        for key, value in stage.wiring.items():
            _say(f"    {key} = {value}")
        if dry_run:
            continue
        if action not in ("skip", "not selected"):
            try:
                _check_read_files(stage, {s.name: s for s in stages})
                _run_stage(stage, action, state, output_dir)
            except UserError:  # a cause a rerun alone does not remove (unless it says so: failed items)
                _say(f"stage {stage.name} stopped; the stages before it are kept, and the same command resumes")
                raise
            except BaseException:
                where = "its last checkpoint" if stage.producer is None else "what its log holds"
                _say(f"stage {stage.name} stopped; the same command resumes it from {where}")
                raise
        if stage.merge and state.get(stage.name, {}).get("status") == "done":
            _ensure_merged(stage, state, output_dir)
    last = stages[-1].run_dir / ("final" if stages[-1].producer is None else stages[-1].producer.done)
    _say(f"{'planned' if dry_run else 'done'}: {output_dir} (last stage: {last})")
    return output_dir


def _say(message: str) -> None:
    if first_process():
        print(f"[pipeline] {message}", flush=True)


_VERB = {"skip": "skipped", "resume": "resuming", "fresh": "running", "not selected": "not selected"}


def _only(stages: list[Stage], actions: list[tuple[str, str]], only: str, restart: bool) -> list[tuple[str, str]]:
    index = [s.name for s in stages].index(only)
    by_name = {s.name: action for s, action in zip(stages, actions)}
    for dep in stages[index].deps:
        if by_name[dep][0] != "skip":
            raise ConfigError(f"--only {only}: it uses the output of {dep}, which is not ready ({by_name[dep][1]}); "
                              f"run the pipeline without --only, or with --only {dep} first")
    picked = [("not selected", "--only " + only)] * len(stages)
    picked[index] = ("fresh", "--restart") if restart else actions[index]
    return picked


def _distributed() -> bool:
    """True under torchrun with several processes; makes sure a process group exists.

    A stage's end (accelerate's end_training) destroys the process group. A new one made from the
    same rendezvous store would meet the old one's keys and hang when the processes arrive at
    different times, so each is made under its own key prefix; accelerate then adopts it."""
    if launched_processes() <= 1:
        return False
    import torch
    import torch.distributed as dist
    from accelerate.state import AcceleratorState

    if not dist.is_initialized():
        AcceleratorState._reset_state(reset_partial_state=True)
        store, rank, world = next(dist.rendezvous("env://"))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=rank, world_size=world,
                                store=dist.PrefixStore(f"posttrain-pipeline-{next(_GROUPS)}", store))
    return True


_GROUPS = itertools.count(1)  # numbers the process groups this process makes


def _barrier() -> None:
    """With several processes, none goes on before all have got here (e.g. read the state file)."""
    if _distributed():
        from accelerate import PartialState
        from accelerate.utils import is_cuda_available

        PartialState(cpu=not is_cuda_available()).wait_for_everyone()


def _run_stage(stage: Stage, action: str, state: dict[str, dict], output_dir: Path) -> None:
    if stage.producer is not None and action == "fresh" and stage.run_dir.exists():
        shutil.rmtree(stage.run_dir)  # the pipeline's own directory: an old log must not be resumed
    elif action == "fresh":  # a previous run's outputs must not survive into (or be mistaken for) this one's
        # checkpoints too, before the state says "running" with the new settings: a fresh rerun
        # interrupted before its loop cleared them would otherwise be resumed from them next time
        for stale in ("final", "merged", "summary.json", "checkpoints", "metrics.jsonl", "samples.jsonl"):
            target = stage.run_dir / stale
            if first_process() and target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    if stage.producer is None:  # a data stage resumes from its log, and the directory is gone when fresh
        stage.cfg.train.resume = "auto" if action == "resume" else "never"
    state[stage.name] = {"kind": stage.kind, "status": "running", "fingerprint": stage.fingerprint,
                         "inputs": {d: state[d]["run_id"] for d in stage.deps}, "config": stage.flat,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_state(output_dir, state)
    _distributed()
    stage.run(stage.cfg)
    if not stage.complete():
        wanted = "final and summary.json" if stage.producer is None else stage.producer.done
        raise UserError(f"stage {stage.name} returned without {stage.run_dir}/{wanted}")
    failed = failed_items(stage.kind, stage.run_dir)
    if failed:  # the outputs hold the others; the stage stays unfinished, so the same command retries them
        raise UserError(f"stage {stage.name}: {failed} item(s) failed this run (see {stage.run_dir}); the same "
                        "command retries them")
    state[stage.name].update(status="done", run_id=uuid.uuid4().hex[:12], finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_state(output_dir, state)


def failed_items(kind: str, run_dir: str | Path) -> int:
    """How many items of a data command's run failed (rlaif, constitutional, redteam and evaluate's
    red team count them): the command alone (cli) and as a stage exits 2 on any, after writing
    outputs from the others."""
    producer = DATA_KINDS.get(kind)
    if producer is None or not producer.failed:
        return 0
    file, *keys = producer.failed
    value: Any = json.loads((Path(run_dir) / file).read_text(encoding="utf-8"))
    for key in keys:
        value = value.get(key, 0) if isinstance(value, dict) else 0
    return int(value or 0)


def _check_read_files(stage: Stage, by_name: dict[str, Stage]) -> None:
    """Before a stage runs: every file of a data stage it reads is there and holds rows. (Wiring is
    fixed at load; what a data stage wrote is known only now: quality writes kept-FORMAT.jsonl for
    rows of several formats, and any data stage may keep no row.)"""
    for dep in (by_name[d] for d in stage.deps if by_name[d].producer is not None):
        for value in _paths(stage.wiring):
            path = Path(value)
            if path.parent != dep.run_dir or path == dep.run_dir:
                continue
            if not path.is_file():
                wrote = sorted(p.name for p in dep.run_dir.glob("*.jsonl"))
                raise UserError(f"stage {stage.name} reads {path}, which stage {dep.name} did not write (it wrote "
                                f"{', '.join(wrote) or 'no .jsonl file'}); wire one of them as {dep.name}/FILE")
            if path.stat().st_size == 0:
                raise UserError(f"stage {stage.name} reads {path}, where stage {dep.name} kept no row (see "
                                f"{dep.run_dir / dep.producer.done}); nothing to train or evaluate on")


def _check_given_files(stages: list[Stage], actions: list[tuple[str, str]]) -> None:
    """Before the first stage runs (and under --dry-run): the data files each stage to run lists
    (keys ending in `files`) are there, the check a stage makes before loading its model
    (runs._check_input_files; a data stage, that they exist), for every stage at once: a typo in
    a later stage's path is found before the earlier stages train, not after. A file inside an
    earlier stage's directory is that stage's to write (_check_read_files, when it has)."""
    from posttrain.data.readers import missing_hint
    from posttrain.train.runs import _check_input_files

    for number, (stage, (action, _)) in enumerate(zip(stages, actions)):
        if action in ("skip", "not selected"):
            continue
        earlier = [s.run_dir for s in stages[:number]]
        cfg = copy.deepcopy(stage.cfg)
        given = []
        for section, name, key in _file_lists(cfg):
            paths = [p for p in getattr(section, name) if not any(_reads({"": p}, run_dir) for run_dir in earlier)]
            setattr(section, name, paths)
            given += [(key, p) for p in paths if isinstance(p, str) and p != "synthetic"]
        try:
            if stage.producer is None:
                _check_input_files(cfg)
            else:  # a data command reads its files in formats of its own: their being there is checked
                for key, path in given:
                    if not os.path.exists(os.path.expanduser(path)):
                        raise DataError(f"{key}: {path}: no such file or directory{missing_hint(path)}")
        except UserError as exc:
            raise DataError(f"stage {stage.name}: {exc}") from None


def _file_lists(node: Any, prefix: str = ""):
    """(section, field name, dotted key) of every list of files in a config (keys ending in `files`)."""
    for field in dataclasses.fields(node):
        value = getattr(node, field.name)
        if dataclasses.is_dataclass(value):
            yield from _file_lists(value, f"{prefix}{field.name}.")
        elif field.name.endswith("files") and isinstance(value, list):
            yield node, field.name, prefix + field.name


def _ensure_merged(stage: Stage, state: dict[str, dict], output_dir: Path) -> None:
    """Fold the stage's adapters into its base once per run of it: run_dir/merged, for the stages starting from it."""
    record = state[stage.name]
    merged = stage.run_dir / "merged"
    if record.get("merged") == record["run_id"] and (merged / "config.json").is_file():
        return
    if first_process():
        from posttrain.inference import load_for_inference
        from posttrain.models.adapters import merge_adapted
        from posttrain.models.loading import save_model

        tmp = stage.run_dir / ".merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model, tokenizer = load_for_inference(str(stage.run_dir / "final"), stage.cfg.model.dtype,
                                              stage.cfg.model.trust_remote_code)
        save_model(merge_adapted(model), tokenizer, tmp)  # with every stop id in generation_config.json
        shutil.rmtree(merged, ignore_errors=True)
        os.replace(tmp, merged)
        _say(f"    merged {stage.name}'s adapters into {merged}")
    _barrier()
    record["merged"] = record["run_id"]
    _write_state(output_dir, state)


# --------------------------------------------------------------------------- command line


def add_parser(sub) -> None:
    import argparse

    help_text = "run several stages in order (sft -> rm -> ppo, sft -> dpo, ...), each from an earlier one's output"
    parser = sub.add_parser("pipeline", help=help_text, description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pipeline", help="pipeline YAML")
    parser.add_argument("overrides", nargs="*",
                        help="NAME.section.key=value (one stage), section.key=value (every stage), output_dir=DIR")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--only", metavar="NAME", help="run just this stage (the stages it reads must be complete)")
    which.add_argument("--from", dest="from_stage", metavar="NAME", help="rerun this stage and every later one afresh")
    parser.add_argument("--restart", action="store_true", help="rerun every (selected) stage afresh")
    parser.add_argument("--dry-run", action="store_true", help="validate every stage and print what would run")


def main(args) -> int:
    from transformers.utils import logging

    logging.disable_progress_bar()
    run_pipeline(args.pipeline, args.overrides, args.restart, args.from_stage, args.only, args.dry_run)
    return 0
