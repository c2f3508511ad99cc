"""The run directory: what every training stage does before and after `loop.train`.

A run directory (`output_dir`) holds one training run: config.yaml (the resolved config,
written by `start_run`), .lock (`LOCK_FILE`), checkpoints/step-N/ (`checkpoint.py`; each
keeps the run's fingerprint in its loop state), metrics.jsonl (`metrics.py`), the trackers'
files (train.report_to), and at the end final/ (the model, Hugging Face format) and
summary.json (`finish_run`). Its rules, each kept here once:

- One writer: `start_run` locks the directory (`_lock_run_dir`) until `finish_run`, or until the
  run fails (`released_on_failure`, `release_run_dir`); a second training run is refused.
- Not over its own models: an output_dir that is, or holds, a model the run reads (model.path,
  reward.models, ppo.value_model_path) is refused before anything is written
  (`_check_not_over_its_models`).
- Resume identity: train.resume names the checkpoint to continue (`_resume_path`); a checkpoint
  written under other settings, another starting model or other data files
  (`run_fingerprint`) is refused, naming what changed (`_check_same_run`).
- Fresh start: an earlier run's checkpoints and results (`EARLIER_RESULTS`) are removed when the
  new run's loop opens, before its first step but after its checks (`_clear_earlier_run`); until
  then the earlier run keeps its own config.yaml (`_record_config`), so a fresh run refused
  before its loop leaves the earlier run whole, and one stopped later leaves nothing of it beside
  its own config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from pathlib import Path
from typing import Any

from posttrain.errors import ConfigError
from posttrain.files import file_identity, short_digest
from posttrain.train import checkpoint
from posttrain.train.metrics import strict_json, through_bar


def start_run(cfg) -> tuple[Path, Any, bool, Any]:
    """What every stage does first: (run_dir, accelerator, is_main_process, log). Refuses an
    output_dir over a model the run reads (`_check_not_over_its_models`) and one another training
    run is writing (`_lock_run_dir`: the lock is held until `finish_run`, or until the run fails:
    each stage releases it, `released_on_failure`, when it fails between start_run and train);
    writes the resolved config to run_dir/config.yaml (a fresh start over an earlier run's results
    holds it until they are removed, `_record_config`), starts the trackers of train.report_to
    and seeds everything; `log` prints (flushed) on the main process only, through the progress
    bar while one is open (`metrics.through_bar`: unfreezing, EWC and the adapter schedule speak
    inside the loop)."""
    import functools

    import yaml
    from accelerate.utils import set_seed

    from posttrain.models.loading import run_final_model

    run_dir = _checked_run_dir(cfg.output_dir)
    _check_input_files(cfg)  # before minutes of model loading, not after
    _check_not_over_its_models(cfg, run_dir)
    accelerator = make_accelerator(cfg.train, run_dir)
    main = accelerator.is_main_process
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way (output_dir=a/file/run), no permission, ...
            raise ConfigError(f"output_dir {run_dir}: cannot create the run directory "
                              f"({exc.strerror or type(exc).__name__})") from None
        _lock_run_dir(run_dir)  # held until finish_run, or until the run fails
    try:
        # a resume from a checkpoint of other settings is refused before anything of the new run is
        # written over the existing run's (its config.yaml) or loaded (train() checks it again)
        resume_from = _resume_path(cfg.train.resume, run_dir / "checkpoints")
        if resume_from is not None:
            _check_same_run(resume_from, run_fingerprint(cfg))
        # flushed at once: a script's stdout in a log file is block-buffered (the command line makes it
        # line-buffered; run_sft called from a script does not touch the caller's stdout)
        log = through_bar(functools.partial(print, flush=True)) if main else (lambda *_: None)
        recorded = cfg.to_dict()
        model_path = getattr(getattr(cfg, "model", None), "path", None)
        final = run_final_model(model_path) if isinstance(model_path, str) else None
        if final is not None:  # a run directory: its final model, as generate and merge take it
            recorded["model"]["path"] = str(final)
            log(f"model.path {model_path} is a run directory: starting from its final model {final}")
        if main:
            _record_config(run_dir, yaml.safe_dump(recorded, sort_keys=False), fresh=resume_from is None)
        if cfg.train.report_to:
            _start_trackers(accelerator, run_dir, recorded, resume_from)
        set_seed(cfg.train.seed)
    except BaseException:
        release_run_dir(run_dir)
        raise
    return run_dir, accelerator, main, log


def _check_not_over_its_models(cfg, run_dir: Path) -> None:
    """A run's output_dir must not be, or hold, a model the run reads (model.path, a run directory's
    as its final model; reward.models; ppo.value_model_path): a fresh start removes the run
    directory's final/ and checkpoints/, and the run writes its own final/ there, over the model it
    starts from (a DPO run's reference, too); a model directory would take the run's files beside
    its own. Refused before anything is written, as `posttrain merge` refuses the adapter's own base
    as its OUT_DIR. An output_dir inside a model directory (/models/m/runs/lora) leaves the model's
    own files alone and is taken. A path not there yet is the loader's to refuse; presets live in
    posttrain's cache."""
    from posttrain.models.loading import run_final_model
    from posttrain.models.presets import is_preset

    target = run_dir.resolve()
    for setting, path in _models_read(cfg):
        if is_preset(path) or not Path(path).expanduser().is_dir():
            continue
        model = (run_final_model(path) or Path(path).expanduser()).resolve()
        if target == model:
            where = f"is the directory of {setting} {path}"
        elif target in model.parents:
            where = f"holds {setting} {path}" + (f" (its final model {model})" if model.name == "final" else "")
        else:
            continue
        raise ConfigError(f"output_dir {run_dir} {where}: the run would write over the model it reads; give "
                          "another output_dir")


def _models_read(cfg) -> list[tuple[str, str]]:
    """(setting, path) of each model a run reads from disk: model.path, each of reward.models (a
    'NAME=DIR' as its DIR), ppo.value_model_path; those set."""
    from posttrain.rewards import model_component

    models = getattr(getattr(cfg, "reward", None), "models", None) or []
    found = [("model.path", getattr(getattr(cfg, "model", None), "path", None))]
    found += [("reward.models", model_component(i, item, len(models))[1]) for i, item in enumerate(models)
              if isinstance(item, str)]
    found.append(("ppo.value_model_path", getattr(getattr(cfg, "ppo", None), "value_model_path", None)))
    return [(setting, path) for setting, path in found if isinstance(path, str) and path]


# The run directories this process holds locked (`_lock_run_dir`): resolved path -> (open lock file,
# the thread whose run holds it). Guarded by _HELD_LOCK (runs in threads: a notebook's, a test's).
_HELD: dict[Path, tuple[Any, threading.Thread]] = {}
_HELD_LOCK = threading.Lock()
LOCK_FILE = ".lock"


def _lock_run_dir(run_dir: Path) -> None:
    """Lock run_dir against a second training run (main process; `files.lock_exclusively` on
    run_dir/.lock): a job relaunched while its first copy still runs would resume from the live
    run's checkpoint, and both would write metrics.jsonl, checkpoints/ and final/. Refused, naming
    the directory. Released by finish_run, or when the run fails (train, start_run, and each stage
    between the two); a lock this thread's earlier run left, or a finished thread's, is released
    here first. Without flock (not POSIX), no lock."""
    from posttrain.files import lock_exclusively

    key = run_dir.resolve()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and (held[1] is threading.current_thread() or not held[1].is_alive()):
            _HELD.pop(key)[0].close()
        try:
            file = open(run_dir / LOCK_FILE, "a", encoding="utf-8")
        except OSError:  # a directory this process cannot write: writing the run says so, naming the file
            return
        if lock_exclusively(file, f"{run_dir} is being written by another training run; wait for it to finish, "
                                  "or use another output_dir"):
            _HELD[key] = (file, threading.current_thread())
        else:
            file.close()


@contextlib.contextmanager
def released_on_failure(run_dir: Path):
    """Run the body holding run_dir's lock (`_lock_run_dir`); if it raises (the model fails to load,
    a reward function is missing, Ctrl-C), release the lock and re-raise. Each stage wraps what it
    does between start_run and finish_run (which releases it on success) in this."""
    try:
        yield
    except BaseException:
        release_run_dir(run_dir)
        raise


def release_run_dir(run_dir: Path) -> None:
    """Release `_lock_run_dir`'s lock on run_dir, if this thread's run holds it (the lock file stays).
    Every stage calls it when it fails after start_run (the model fails to load, say), besides
    train and finish_run: a second call does nothing, and never frees another thread's run that
    took the directory meanwhile."""
    key = Path(run_dir).resolve()
    with _HELD_LOCK:
        fresh = _FRESH.get(key)
        if fresh is not None and fresh.thread is threading.current_thread():
            del _FRESH[key]  # a fresh start that failed before its first step: the earlier run stays whole
        held = _HELD.get(key)
        if held is None or held[1] is not threading.current_thread():
            return
        del _HELD[key]
    held[0].close()


def _start_trackers(accelerator, run_dir: Path, recorded: dict, resume_from: Path | None) -> None:
    """Start train.report_to's trackers (main process; `finish_run` ends them): project `run_dir`'s
    name, the resolved config as their hyperparameters (the scalar settings, keys dotted:
    "train.lr"; lists and unset values left out, as trackers take scalars only). TensorBoard hides
    its events from the step this run logs first on (purge_step): a resumed run's steps after its
    checkpoint, or all of an earlier run a fresh start replaces, as metrics.jsonl drops them."""
    import json

    from posttrain.config.schema import flatten

    scalars = {key: value for key, value in flatten(recorded).items() if isinstance(value, (bool, int, float, str))}
    first_step = 0 if resume_from is None else \
        json.loads((resume_from / checkpoint.LOOP_STATE).read_text(encoding="utf-8"))["step"] + 1
    accelerator.init_trackers(run_dir.name, config=scalars,
                              init_kwargs={"tensorboard": {"purge_step": first_step}})


def _check_input_files(cfg) -> None:
    """Every data file a config lists (a key ending in `files`: data.train_files, data.eval_files,
    forgetting.retain_files, ...) must exist, be of a type a reader takes, and (data.format auto)
    open with rows in a format the stage reads: said before minutes of model loading, not after.
    'synthetic' is the bundled generator."""
    import dataclasses
    import os

    from posttrain.data.formats import check_readable
    from posttrain.data.readers import missing_hint
    from posttrain.errors import DataError

    def walk(node, prefix: str = ""):
        for name in (f.name for f in dataclasses.fields(node)):
            value = getattr(node, name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{name}.")
            elif name.endswith("files") and isinstance(value, list):
                yield from ((prefix + name, node, path) for path in value)

    for key, section, path in walk(cfg):
        if not isinstance(path, str) or path == "synthetic":
            continue
        if not os.path.exists(os.path.expanduser(path)):
            parts = [p.strip() for p in path.split(",")]
            hint = (f"; for several files write {key}=[{','.join(parts)}]"
                    if len(parts) > 1 and all(os.path.exists(os.path.expanduser(p)) for p in parts if p)
                    else missing_hint(path))
            raise DataError(f"{key}: {path}: no such file or directory{hint}")
        detect, fmt = _row_formats(key, section)
        try:
            check_readable(os.path.expanduser(path), detect, fmt)
        except DataError as exc:
            raise DataError(f"{key}: {exc}") from None


def _row_formats(key: str, section) -> tuple[Any, str]:
    """(the format detector, the format set) of the reader that takes the files under `key`."""
    from posttrain.config.preference import PreferenceDataConfig
    from posttrain.config.rl import PromptDataConfig
    from posttrain.data.formats import detect_format
    from posttrain.data.preferences import detect_preference_format
    from posttrain.data.prompts import detect_prompt_format

    fmt = getattr(section, "format", "auto")
    if key.endswith("retain_files"):  # rows in sft's formats, in every stage
        return detect_format, "auto"
    if isinstance(section, PreferenceDataConfig):
        return detect_preference_format, fmt
    if isinstance(section, PromptDataConfig) or key.endswith("prompt_files"):
        return detect_prompt_format, fmt
    return detect_format, fmt


def _checked_run_dir(output_dir: str) -> Path:
    """output_dir as a Path (~ is the home directory); an empty one (the current directory) or one
    that is a file is refused."""
    from posttrain.config.schema import user_path

    if not str(output_dir).strip():
        raise ConfigError("output_dir is empty (it would write the run into the current directory); name a directory")
    run_dir = user_path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a directory; name a directory for the run")
    return run_dir


def finish_run(run_dir: Path, accelerator, main: bool, model, tokenizer, summary: dict, save=None) -> Path:
    """What every stage does last: the final model in run_dir/final (replaced whole; `save(model,
    tokenizer, directory)`, by default `loading.save_model`; transformers' progress bar hidden
    meanwhile) and summary.json, which begins with the posttrain version (main process); then wait
    for every process and close the trackers. A full disk is said naming the file or directory that
    did not fit (`errors.NoRoom`). The run directory's lock (`start_run`) is released, whatever
    happens."""
    import json

    from posttrain import __version__
    from posttrain.errors import NoRoom
    from posttrain.models.loading import save_model
    from posttrain.models.presets import quiet_progress_bars

    try:
        if main:
            if _held(run_dir) is not None:  # a fresh start that never reached the loop (`_clear_earlier_run`)
                _clear_earlier_run(run_dir)
            save = save or save_model
            with quiet_progress_bars():  # transformers' shard-writing bar, in a script's or notebook's output
                checkpoint.write_whole(run_dir / "final", lambda final: save(model, tokenizer, final))
            summary = {"posttrain_version": __version__} | summary
            path = run_dir / "summary.json"
            try:
                path.write_text(json.dumps(strict_json(summary), indent=1, allow_nan=False), encoding="utf-8")
            except OSError as exc:
                raise (NoRoom.of(exc, path) or exc) from exc
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        release_run_dir(run_dir)  # start_run's lock
    return run_dir


def make_accelerator(cfg, run_dir: Path):
    """An Accelerator for this run: mixed precision and trackers from `cfg` (a TrainConfig)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_cuda_available

    for tracker in cfg.report_to:
        try:
            __import__(tracker)
        except ImportError:
            raise ConfigError(f"train.report_to: {tracker} is not installed (pip install 'posttrain[{tracker}]')") from None
    # accelerate keeps its settings in a process-wide singleton; a second run in the same
    # process (notebooks, tests) may ask for different mixed precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # cpu=True on CPU-only hosts: without it accelerate ignores torchrun's WORLD_SIZE
        # and every process trains alone.
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=cfg.report_to or None,
                                  project_dir=str(run_dir), cpu=not is_cuda_available())
    except ValueError as exc:  # e.g. fp16 on a CPU, in older accelerate
        raise ConfigError(f"train.mixed_precision={cfg.mixed_precision}: {exc}") from None
    if cfg.mixed_precision != "no" and not accelerator.native_amp:
        # accelerate ≥ 1.x accepts fp16 on a CPU and then runs in float32, without a word
        raise ConfigError(f"train.mixed_precision={cfg.mixed_precision} is not available on "
                          f"{accelerator.device.type} (accelerate would run in float32); use bf16 or no")
    return accelerator


def run_fingerprint(cfg) -> dict[str, Any]:
    """The settings that decide what a checkpoint holds, flat ({"data.max_length": 64, ...}): model,
    data, adapters, the stage's own loss sections; of `train`, those that decide the data and the
    weights trained (`_TRAIN_FINGERPRINTED`); and the identity of the starting model
    (`models.loading.model_identity`: a model retrained in place is another model) and of the data
    files (`file_identity`: rows edited under the same name are other data).
    Kept in every checkpoint; a resume under other values is refused, naming them. Left out: what
    a resume may change (the rest of `train` — the README lets a resumed run take a new lr, steps,
    cadences —, `eval`, `output_dir`, and `_RESUME_MAY_CHANGE`)."""
    import json

    from posttrain.models.loading import model_identity, resolve_model_path

    knobs = {section for section, _ in _RESUME_MAY_CHANGE}
    settings: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if section in ("eval", "output_dir"):
            continue
        if not isinstance(values, dict):
            settings[section] = values
            continue
        for key, value in values.items():
            if section == "train" and key not in _TRAIN_FINGERPRINTED:
                continue
            if section in knobs and ((section, key) in _RESUME_MAY_CHANGE or key.startswith("vllm_")):
                continue  # how, not what: memory and speed knobs, the rollout engine
            settings[f"{section}.{key}"] = value
    path = getattr(getattr(cfg, "model", None), "path", None)
    if isinstance(path, str) and path:
        resolve_model_path(path)  # a path training cannot start from is refused here, naming why
        settings[MODEL_FILES] = model_identity(path)
    data_files = {name: file_identity(name) for key, value in settings.items()
                  if key.endswith("files") and isinstance(value, list) for name in value
                  if isinstance(name, str) and name != "synthetic"}
    if data_files:  # rows edited under the same name are other data: the position counts the old file's batches
        settings[DATA_FILES] = data_files
    return json.loads(json.dumps(settings, default=str))  # as a checkpoint's JSON reads back (tuples as lists)


# seed: the synthetic rows, the held-out split and the data order; batch_size: what the data
# position counts (micro-batches); freeze: which weights (and moments) the checkpoint holds
_TRAIN_FINGERPRINTED = ("seed", "batch_size", "freeze")
MODEL_FILES = "model.files"  # the fingerprint's key for the starting model's `model_identity`
DATA_FILES = "data.file_identities"  # the fingerprint's key for the data files' `file_identity`, by name

_RESUME_MAY_CHANGE = (("model", "gradient_checkpointing"), ("model", "lean_activations"), ("model", "padding_free"),
                      ("dpo", "share_prompt"), ("reward", "share_prompt"), ("rollout", "engine"),
                      ("rollout", "batch_size"), ("forgetting", "max_retain_increase"),
                      ("forgetting", "retain_exact_match"))


def _legacy_digest(settings: dict[str, Any]) -> str:
    """The fingerprint a checkpoint held before it kept the settings themselves: a digest of the
    sections, without `train` and the model's files."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if section == "train" or key in (MODEL_FILES, DATA_FILES):
            continue
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[section] = value
    return short_digest(nested)


def _check_same_run(resume_from: Path, fingerprint: dict[str, Any] | None) -> None:
    """Refuse a resume from a checkpoint whose fingerprint (`run_fingerprint`) differs from this
    run's, naming the settings changed (`_change`). A value an older version recorded otherwise for
    the same training (`config.preference.same_as_recorded_earlier`: cdpo's ε recorded null; the
    starting model's identity under an earlier rule, `models.loading.identified_earlier`) is no
    change."""
    import json

    from posttrain.config.preference import same_as_recorded_earlier
    from posttrain.models.loading import identified_earlier

    def earlier_model(key: str, then) -> bool:
        return key == MODEL_FILES and isinstance(model := fingerprint.get("model.path"), str) and \
            identified_earlier(then, model)

    saved = json.loads((resume_from / checkpoint.LOOP_STATE).read_text(encoding="utf-8")).get("fingerprint")
    if fingerprint is None or saved is None:
        return
    if isinstance(saved, str):  # an older checkpoint: the digest alone, which cannot say what changed
        changed = [] if saved == _legacy_digest(fingerprint) else ["model, data, adapter, loss or forgetting"]
    else:
        changed = [said for key in sorted(saved.keys() | fingerprint.keys())
                   if (then := saved.get(key, _UNSET)) != (now := fingerprint.get(key, _UNSET))
                   and not same_as_recorded_earlier(key, then, now) and not earlier_model(key, then)
                   and (said := _change(key, saved, fingerprint))]
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(f"{resume_from} was written by a run with other settings ({shown}); resuming would mix "
                          "the two. Set train.resume=never to start afresh, or another output_dir")


_UNSET = "(unset)"  # a setting one side lacks (a section added since the checkpoint was written)


def _change(key: str, saved: dict, now: dict) -> str:
    """A setting that differs between the checkpoint's fingerprint and this run's, as the refusal
    names it; "" when there is nothing to say (data files a checkpoint written before they were
    kept lacks, or files only added or removed: the list of files names them). Lists show the items
    removed and added (`-"a.jsonl" +"b.jsonl"`); other values cut to 60 characters after their
    common beginning, so two long values show where they differ. Values are JSON with their
    characters as written (数据.jsonl, not \\u escapes a cut could land inside)."""
    import json
    import os

    if key == MODEL_FILES:
        return f"the model at model.path {now.get('model.path', '')} changed since the checkpoint (its files)"
    before, after = saved.get(key, _UNSET), now.get(key, _UNSET)
    if key == DATA_FILES:
        if not isinstance(before, dict) or not isinstance(after, dict):
            return ""
        return "; ".join(f"the file {name} changed since the checkpoint ({_file_change(before[name], after[name])})"
                         for name in sorted(before.keys() & after.keys()) if before[name] != after[name])
    if isinstance(before, list) and isinstance(after, list):
        removed, added = [x for x in before if x not in after], [x for x in after if x not in before]
        if removed or added:
            items = [f"-{json.dumps(x, ensure_ascii=False)}" for x in removed] + \
                [f"+{json.dumps(x, ensure_ascii=False)}" for x in added]
            return f"{key}: " + " ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
    texts = [value if value is _UNSET else json.dumps(value, ensure_ascii=False) for value in (before, after)]
    common = len(os.path.commonprefix(texts))
    if max(map(len, texts)) > 60 and common > 20:  # keep a little of the common part for context
        texts = ["…" + text[common - 10:] for text in texts]
    shown = [text if len(text) <= 60 else text[:57] + "..." for text in texts]
    return f"{key}: {shown[0]} → {shown[1]}"


def _file_change(before, after) -> str:
    """How a data file's `file_identity` changed, in words."""
    if isinstance(before, list) and isinstance(after, list) and before[0] != after[0]:
        return f"{before[0]} → {after[0]} bytes"
    if isinstance(before, list) and isinstance(after, list):
        return "the same size, other contents"
    return "gone" if after is None else "its files"


# What a run leaves in its directory besides its checkpoints, as results of the run: removed by a
# fresh start (`_clear_earlier_run`), whatever stage wrote them. final/ and summary.json:
# `finish_run`; metrics.jsonl: `metrics.RunLogger`; samples.jsonl: GRPO's and PPO's samples
# (`rollouts`); value_model.safetensors: PPO's value model; merged/: the pipeline's merge of the
# run's adapters. A stage that writes a new result file names it here.
EARLIER_RESULTS = ("final", "summary.json", "metrics.jsonl", "samples.jsonl", "value_model.safetensors", "merged")
# The reports a run writes before its loop (its parameters; its data, and the rows it rejected,
# per split): an earlier run's that this run has not written again by the time its loop opens
# (a split it does not read, rejects-eval.jsonl with no eval_files) are removed then too.
_REPORTS = ("params.json", "data_report.json", "rejects-*.jsonl")


@dataclasses.dataclass
class _FreshStart:
    """A fresh start over an earlier run, from `start_run` to its loop (`_clear_earlier_run`):
    config.yaml's text, held while the earlier run's results are there (None: written at once), and
    the earlier run's reports as they were at start_run (name → `_identity`)."""

    thread: threading.Thread
    config: str | None
    reports: dict[str, tuple]


_FRESH: dict[Path, _FreshStart] = {}  # resolved run directory → its fresh start (main process; under _HELD_LOCK)


def _record_config(run_dir: Path, config: str, fresh: bool) -> None:
    """run_dir/config.yaml (main process), written now: a resume, or a fresh start with no earlier
    results there. A fresh start over an earlier run's results (`EARLIER_RESULTS`, checkpoints)
    holds its text until `_clear_earlier_run` removes them: a run refused before its loop (a check
    made once the model loads) leaves the earlier run whole, its own config.yaml beside its own
    model. A fresh start also notes the earlier run's reports (`_REPORTS`) as they are now."""
    from posttrain.files import write_atomically

    reports = {path.name: _identity(path) for pattern in _REPORTS for path in run_dir.glob(pattern)
               if path.is_file()} if fresh else {}
    results = fresh and (any((run_dir / name).exists() for name in EARLIER_RESULTS) or
                         ((run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())))
    with _HELD_LOCK:
        _FRESH.pop(run_dir.resolve(), None)  # what an earlier start here left held (its thread gone unreleased)
        if results or reports:
            _FRESH[run_dir.resolve()] = _FreshStart(threading.current_thread(), config if results else None, reports)
    if not results:
        write_atomically(run_dir / "config.yaml", config)


def _held(run_dir: Path) -> _FreshStart | None:
    with _HELD_LOCK:
        return _FRESH.get(Path(run_dir).resolve())


def _identity(path: Path) -> tuple:
    """A file as `_clear_earlier_run` tells whether this run wrote it since start_run: a rewrite
    replaces it (a new inode) or changes its modification time."""
    stat = path.stat()
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _clear_earlier_run(run_dir: Path, damaged: int = 0) -> str:
    """A fresh start as its loop opens (main process; `loop._open`, before the stage's `begin` and
    its first step): an earlier run's checkpoints and results
    (`EARLIER_RESULTS`) removed, and its reports this run has not written again (`_FreshStart`),
    then this run's config.yaml put in place (`_record_config`): a run that stops from here on
    leaves nothing of the earlier one beside its own config.yaml. Returns the line that says what
    went, or "". damaged: how many of the checkpoints are incomplete."""
    import shutil

    from posttrain.files import write_atomically

    with _HELD_LOCK:
        fresh = _FRESH.pop(run_dir.resolve(), None)
    cleared = checkpoint.clear(run_dir / "checkpoints")
    removed = [f"{cleared} checkpoint(s)" + (f" ({damaged} incomplete)" if damaged else "")] if cleared else []
    stale = [name for name, then in fresh.reports.items() if _unchanged(run_dir / name, then)] if fresh else []
    for path in [run_dir / name for name in EARLIER_RESULTS] + [run_dir / name for name in stale]:
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(f"{path.name}/")
        elif path.exists():
            path.unlink()
            removed.append(path.name)
    if fresh is not None and fresh.config is not None:  # after the removals: never beside the earlier results
        write_atomically(run_dir / "config.yaml", fresh.config)
    return f"fresh start: removed {', '.join(removed)} of an earlier run from {run_dir}" if removed else ""


def _unchanged(path: Path, then: tuple) -> bool:
    try:
        return _identity(path) == then
    except OSError:  # gone (removed by this run: rejects a split no longer has)
        return False


def _resume_path(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint train.resume names: none (never), the newest complete one in `ckpt_root` (auto;
    none there is a fresh start, but damaged ones alone are refused, naming each and what is wrong:
    a fresh start would remove what may be a long run's only checkpoint), or the path given, which
    must be a complete checkpoint (refused naming the file cut short or missing)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint.latest_complete(ckpt_root)
        damaged = checkpoint.incomplete(ckpt_root) if found is None else {}
        if damaged:  # a fresh start would remove them: a preempted job's whole progress, maybe one copy away
            named = "; ".join(f"{path.name}: {', '.join(said)}" for path, said in damaged.items())
            raise ConfigError(f"train.resume=auto: {ckpt_root} holds no complete checkpoint, only damaged ones "
                              f"({named}); a fresh start would remove them. Restore the files named to resume, "
                              "or set train.resume=never to start afresh")
        return found
    path = Path(resume)
    found = checkpoint.problems(path)
    if found:
        raise ConfigError(f"train.resume={resume}: not a complete checkpoint directory ({'; '.join(found)})")
    return path
