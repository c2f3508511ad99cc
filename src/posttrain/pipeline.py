"""`posttrain pipeline PIPELINE.yaml`: several stages in order, each starting from an earlier
stage's output (SFT → reward model → PPO, SFT → DPO, SFT → GRPO, ...), resumable stage by stage.

    output_dir: runs/rlhf                  # stage NAME runs in runs/rlhf/NAME (relative to the cwd)
    overrides: [train.progress_bar=false]  # optional: every stage
    stages:
      - {name: sft, kind: sft, config: sft_full.yaml}     # config: relative to this file
      - {name: rm, kind: rm, overrides: {train.max_steps: 100}}
      - {name: ppo, kind: ppo, inputs: {reward.models: [rm]}}   # <- runs/rlhf/rm/final

Wiring. `inputs` maps config keys to earlier stages (a list key takes a list; "LABEL=stage"
keeps a reward component's name). Unless a stage's inputs or own overrides set model.path, it
starts from the latest earlier stage that produces a policy (every kind but rm) - an rm stage
too, as InstructGPT starts its reward model from the SFT model - so a config file's model.path
only matters to the first stage. A LoRA/IA3 policy is merged into NAME/merged for the stages
that start from it. Command-line overrides: NAME.key=value (one stage), key=value (every stage).

Resume. Each stage's resolved config is recorded in output_dir/pipeline_state.json. A stage is
skipped when it finished (final/ and summary.json), its config is unchanged and the runs it read
are those it was trained on. An interrupted stage reruns with train.resume=auto. A stage whose
config changed, or that reads the output of a stage that runs again, reruns from scratch
(train.resume=never); stages that do not read it are left alone. Edits inside data files are
not detected: use --from NAME.
"""

from __future__ import annotations

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

from posttrain.errors import ConfigError, UserError
from posttrain.files import write_atomically

STATE_FILE = "pipeline_state.json"
REWARD_MODEL_KINDS = {"rm"}  # every other kind produces a policy
UNFINGERPRINTED = {"train.resume", "train.progress_bar"}  # set by the pipeline, or change no result
MERGEABLE_METHODS = {"lora", "dora", "qlora", "ia3"}
_RESERVED_NAMES = {"model", "adapter", "data", "train", "eval"}  # config sections every stage has
_TOP_KEYS, _STAGE_KEYS = ("output_dir", "overrides", "stages"), ("name", "kind", "config", "overrides", "inputs")


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

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.output_dir)


# --------------------------------------------------------------------------- loading and validation


def _registry() -> dict:
    from posttrain.cli import _STAGES  # data-driven: a kind added there works here

    return _STAGES


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
            if "." not in rest:  # every stage key is section.key: `dpo.beta` with a stage called dpo
                raise ConfigError(f"override {item!r} reads as stage {name!r}, key {rest!r}, which is not a key; "
                                  f"for that stage's {key}, write {name}.{item}")
            per_stage.setdefault(name, []).append(item.split(".", 1)[1])
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
    output_dir = Path(cli_dir or data.get("output_dir") or f"runs/{path.stem}")
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
    return output_dir, stages


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
    if "output_dir" in _keys(own):
        raise ConfigError("output_dir is the pipeline's (each stage runs in OUTPUT_DIR/NAME); set it at the top")
    config_cls, run = registry[kind]()
    wiring, deps = _wire(spec.get("inputs") or {}, earlier, own, kind, config_cls)
    config_file = path.parent / spec["config"] if spec.get("config") else None
    items = [*common, *own_file, *cli_stage[None], *own_cli] + [f"{k}={json.dumps(v)}" for k, v in wiring.items()]
    items += _alias_overrides(kind, items) + [f"output_dir={json.dumps(str(output_dir / name))}"]
    cfg = config_cls.load(config_file, items)
    validate = _validator(config_cls, run)
    if validate is not None:
        validate(cfg)
    stage = Stage(name, kind, cfg, run, deps, wiring)
    stage.flat = {k: v for k, v in _flatten(cfg.to_dict()).items() if k not in UNFINGERPRINTED}
    stage.fingerprint = hashlib.sha256(json.dumps([kind, stage.flat], sort_keys=True).encode()).hexdigest()[:16]
    stage.deps += [s.name for s in earlier if s.name not in stage.deps and _reads(stage.flat, s.run_dir)]
    return stage


def _wire(inputs: Any, earlier: list[Stage], own: list[str], kind: str,
          config_cls: type) -> tuple[dict[str, Any], list[str]]:
    """Config key -> path(s) of earlier stages' outputs, with the default model.path; and the stages used."""
    from posttrain.config.schema import check_override_key

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
        label, _, stage_name = str(ref).rpartition("=")
        if stage_name not in by_name:
            later = "is not an earlier stage (a stage reads only what ran before it)"
            raise ConfigError(f"inputs.{key}: {stage_name!r} {later}; earlier stages: {', '.join(by_name) or 'none'}")
        source = by_name[stage_name].kind
        if key == "reward.models" and source not in REWARD_MODEL_KINDS:
            raise ConfigError(f"inputs.{key}: {stage_name!r} is a {source} stage, not a reward model "
                              "(its directory would score with a freshly drawn head); name an rm stage")
        if key == "model.path" and source in REWARD_MODEL_KINDS and kind not in REWARD_MODEL_KINDS:
            raise ConfigError(f"inputs.{key}: {stage_name!r} is a reward model (a score head, no language-model "
                              f"head); a {kind} stage starts from a policy stage")
        deps.append(stage_name)
        return (f"{label}=" if label else "") + str(_output_path(by_name[stage_name], key))

    for key, ref in inputs.items():
        wiring[key] = [output_of(r, key) for r in ref] if isinstance(ref, list) else output_of(ref, key)
    policies = [s for s in earlier if s.kind not in REWARD_MODEL_KINDS]
    if "model.path" not in wiring and "model.path" not in _keys(own) and policies:
        wiring["model.path"] = output_of(policies[-1].name, "model.path")
    return wiring, list(dict.fromkeys(deps))


def _output_path(source: Stage, key: str) -> Path:
    """Where `key` reads `source`'s result: its final/, or merged/ when a policy's adapters must be folded in."""
    methods = set(getattr(getattr(source.cfg, "adapter", None), "method", None) or ["full"]) - {"full", "freeze"}
    if key != "model.path" or source.kind in REWARD_MODEL_KINDS or not methods:
        return source.run_dir / "final"
    if methods - MERGEABLE_METHODS:
        raise ConfigError(f"model.path: stage {source.name!r} trains {', '.join(sorted(methods))} adapters, which "
                          "cannot be merged into a model to start from; train it with lora, ia3 or full")
    source.merge = True
    return source.run_dir / "merged"


def _validator(config_cls: type, run: Any):
    """The stage's cross-field checks, validate_<sft|rm|dpo|grpo|ppo>, from config.py or the stage's module."""
    import sys

    from posttrain import config

    name = "validate_" + config_cls.__name__.removesuffix("Config").lower()
    return getattr(config, name, None) or getattr(sys.modules.get(run.__module__), name, None)


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _reads(flat: dict[str, Any], run_dir: Path) -> bool:
    """Whether any path in a config (also NAME=PATH items) lies inside `run_dir` (compared as
    absolute paths: a relative output_dir and an absolute path into it are the same place)."""
    root = os.path.abspath(run_dir)
    values = [v for value in flat.values() for v in (value if isinstance(value, list) else [value])]
    for value in values:
        if isinstance(value, str) and value:
            candidate = os.path.abspath(os.path.expanduser(value.rpartition("=")[2]))
            if candidate == root or candidate.startswith(root + os.sep):
                return True
    return False


# --------------------------------------------------------------------------- deciding what runs


def read_state(output_dir: Path) -> dict[str, dict]:
    file = output_dir / STATE_FILE
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())["stages"]
    except (ValueError, KeyError):
        raise ConfigError(f"{file} is not a pipeline state file; move it away to start the pipeline afresh") from None


def _write_state(output_dir: Path, state: dict[str, dict]) -> None:
    if not _first_process():  # several processes run the pipeline: the first keeps the record
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
    if rerun_inputs:
        return "fresh", f"it uses the output of {', '.join(rerun_inputs)}, which runs again"
    if record is None:
        return "fresh", "first run"
    if record["fingerprint"] != stage.fingerprint:
        return "fresh", f"its config changed ({_changes(record['config'], stage.flat)})"
    inputs = {d: state.get(d, {}).get("run_id") for d in stage.deps}
    if record.get("inputs") != inputs:
        changed = [d for d in inputs if record.get("inputs", {}).get(d) != inputs[d]]
        return "fresh", f"{', '.join(changed)} was retrained since"
    if record["status"] != "done":
        return "resume", "it was interrupted; resuming from its last checkpoint"
    if not is_complete(stage.run_dir):
        return "resume", "its final/ or summary.json is missing; resuming from its last checkpoint"
    return "skip", "complete, config and inputs unchanged"


# --------------------------------------------------------------------------- running


def run_pipeline(path: str | Path, overrides: list[str] = (), restart: bool = False, from_stage: str | None = None,
                 only: str | None = None, dry_run: bool = False) -> Path:
    """Validate every stage, then run those that need it in order; returns the pipeline's output_dir."""
    output_dir, stages = load_pipeline(path, overrides)
    names = [s.name for s in stages]
    for flag, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in names:
            raise ConfigError(f"{flag} {value}: no such stage; stages: {', '.join(names)}")
    state = read_state(output_dir)
    actions = plan(stages, state, restart and only is None, from_stage)
    if only is not None:
        actions = _only(stages, actions, only, restart)
    _barrier()
    for number, (stage, (action, reason)) in enumerate(zip(stages, actions), start=1):
        _say(f"{number}/{len(stages)} {stage.name} ({stage.kind}): {_VERB[action]}: {reason}")
        for key, value in stage.wiring.items():
            _say(f"    {key} = {value}")
        if dry_run:
            continue
        if action not in ("skip", "not selected"):
            try:
                _run_stage(stage, action, state, output_dir)
            except BaseException:
                _say(f"stage {stage.name} stopped; the same command resumes it from its last checkpoint")
                raise
        if stage.merge and state.get(stage.name, {}).get("status") == "done":
            _ensure_merged(stage, state, output_dir)
    _say(f"{'planned' if dry_run else 'done'}: {output_dir} (last stage: {stages[-1].run_dir / 'final'})")
    return output_dir


def _first_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _say(message: str) -> None:
    if _first_process():
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
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
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
    if action == "fresh":  # a previous run's outputs must not survive into (or be mistaken for) this one's
        # checkpoints too, before the state says "running" with the new settings: a fresh rerun
        # interrupted before its loop cleared them would otherwise be resumed from them next time
        for stale in ("final", "merged", "summary.json", "checkpoints", "metrics.jsonl", "samples.jsonl"):
            target = stage.run_dir / stale
            if _first_process() and target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
    stage.cfg.train.resume = "auto" if action == "resume" else "never"
    state[stage.name] = {"kind": stage.kind, "status": "running", "fingerprint": stage.fingerprint,
                         "inputs": {d: state[d]["run_id"] for d in stage.deps}, "config": stage.flat,
                         "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_state(output_dir, state)
    _distributed()
    stage.run(stage.cfg)
    if not is_complete(stage.run_dir):
        raise UserError(f"stage {stage.name} returned without {stage.run_dir}/final and summary.json")
    state[stage.name].update(status="done", run_id=uuid.uuid4().hex[:12], finished=time.strftime("%Y-%m-%dT%H:%M:%S"))
    _write_state(output_dir, state)


def _ensure_merged(stage: Stage, state: dict[str, dict], output_dir: Path) -> None:
    """Fold the stage's adapters into its base once per run of it: run_dir/merged, for the stages starting from it."""
    record = state[stage.name]
    merged = stage.run_dir / "merged"
    if record.get("merged") == record["run_id"] and (merged / "config.json").is_file():
        return
    if _first_process():
        from posttrain.inference import load_for_inference
        from posttrain.models.adapters import merge_adapted

        tmp = stage.run_dir / ".merged.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        model, tokenizer = load_for_inference(str(stage.run_dir / "final"), stage.cfg.model.dtype,
                                              stage.cfg.model.trust_remote_code)
        merge_adapted(model).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
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
