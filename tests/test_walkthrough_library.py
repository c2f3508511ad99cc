"""A library user's walk: the Python API in one notebook session or script, never the CLI (README,
"Using it": "The Python API mirrors the CLI — a config in, a run directory out", and
`posttrain/__init__.py`).

They build configs with `XConfig.from_dict` / `XConfig.load(path, overrides)`, or by hand and by
assigning attributes; call run_sft, run_rm, run_dpo, run_grpo, run_ppo, run_quality, run_evaluate,
run_pipeline several times in one process; chain one stage's returned run directory into the next;
press Ctrl-C; load the results back with transformers / peft; and ask `help()` and tab completion
what there is. A run must behave in the session as in a fresh process and leave the process as it
found it (grad mode, default dtype, threads, environment, cwd, signal handlers, logging handlers,
warnings filters, open files, worker threads, no model kept alive); a mistake must be a posttrain
exception with its message, never an exit or a stray AttributeError / TypeError from deep inside.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix,
stop 30: each asserts the right behaviour); the others pin behaviour that was right but had no test through the
Python API. Every run is one to three steps on the tiny preset."""

from __future__ import annotations

import gc
import json
import logging
import os
import pydoc
import re
import signal
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import posttrain as P
from posttrain.errors import ConfigError, DataError, Stopped, UserError

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress_bar": False}


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


def sft_dict(out, **train) -> dict:
    return {"output_dir": str(out), "model": {"path": "tiny"},
            "data": {"train_files": ["synthetic"], "synthetic_size": 32, "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 4, **QUIET, **train}, "eval": {"exact_match_prompts": 2,
                                                                                 "max_new_tokens": 2}}


def dpo_dict(out) -> dict:
    return {"output_dir": str(out), "model": {"path": "tiny"},
            "data": {"train_files": ["synthetic"], "synthetic_size": 32, "max_length": 64},
            "train": {"max_steps": 2, "batch_size": 4, **QUIET}, "eval": {"exact_match_prompts": 2, "max_new_tokens": 2}}


def rl_dict(out, generations: int) -> dict:
    return {"output_dir": str(out), "model": {"path": "tiny"},
            "data": {"train_files": ["synthetic"], "synthetic_size": 32},
            "rollout": {"num_generations": generations, "max_new_tokens": 4},
            "reward": {"functions": ["exact_match=posttrain.rewards:exact_match"]},
            "train": {"max_steps": 1, "batch_size": 8, **QUIET}, "eval": {"prompts": 0}}


def weights(final: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(final / "model.safetensors"))


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """A full fine-tune of the tiny preset, 2 steps: the session's first run (it also pays the imports)."""
    return P.run_sft(P.SFTConfig.from_dict(sft_dict(tmp_path_factory.mktemp("lib") / "sft")))


# --------------------------------------------------------------------------- defects


def _path_output_dir(tmp_path, sft_run):
    return P.SFTConfig.from_dict({**sft_dict(tmp_path / "x"), "output_dir": tmp_path / "run"})


def _path_model_from_a_run(tmp_path, sft_run):
    return P.DPOConfig.from_dict({**dpo_dict(tmp_path / "run"), "model": {"path": sft_run / "final"}})


def _path_train_files(tmp_path, sft_run):
    d = sft_dict(tmp_path / "run")
    return P.SFTConfig.from_dict({**d, "data": {**d["data"], "train_files": [ROOT / "examples/data/alpaca.jsonl"]}})


def _path_assigned(tmp_path, sft_run):
    cfg = P.SFTConfig.from_dict(sft_dict(tmp_path / "x"))
    cfg.output_dir = tmp_path / "run"  # today: yaml's RepresenterError ('cannot represent an object', PosixPath(...))
    return cfg


@pytest.mark.parametrize("build", [_path_output_dir, _path_model_from_a_run, _path_train_files, _path_assigned],
                         ids=["output_dir", "model.path=run_sft()/final", "data.train_files", "assigned"])
def test_a_pathlib_path_is_taken_where_a_config_takes_a_path(tmp_path, sft_run, build):
    """run_sft returns a Path, and `run_dir / "final"` as the next stage's model.path is how a script
    chains SFT into DPO; `tmp_path / "run"` as output_dir is how a notebook names a run; `load()`
    itself takes `str | Path`. Each is refused or crashes today."""
    cfg = build(tmp_path, sft_run)
    cfg.train.max_steps = 1
    run = {P.SFTConfig: P.run_sft, P.DPOConfig: P.run_dpo}[type(cfg)]
    assert run(cfg) == tmp_path / "run"
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
    assert type(cfg).load(tmp_path / "run" / "config.yaml").output_dir == str(tmp_path / "run")  # recorded as text


def test_a_numpy_integer_is_taken_as_an_integer():
    import numpy as np

    cfg = P.SFTConfig.from_dict({"train": {"max_steps": np.int64(3), "lr": np.float64(1e-4)}})
    assert (cfg.train.max_steps, cfg.train.lr) == (3, 1e-4)


def _typo(cfg):
    cfg.train.max_step = 1  # no such setting: max_steps
    return "max_step"


def _text_lr(cfg):
    cfg.train.lr = "3e-4"  # from_dict takes this text (YAML reads 3e-4 as one); run_sft: TypeError '>' str/int
    return "train.lr"


def _not_a_choice(cfg):
    cfg.train.optimizer = "adam"  # told it "needs a CUDA GPU (bitsandbytes' ...)"; adam is just not a choice
    return "adamw_fused"


@pytest.mark.parametrize("assign", [_typo, _text_lr, _not_a_choice], ids=["typo", "text-lr", "not-a-choice"])
def test_a_setting_assigned_in_python_is_checked_like_one_from_a_file(tmp_path, sft_run, assign):
    """README, Config: "Unknown or mistyped keys stop the run before any work, with one line naming
    the key". `cfg.train.max_steps = 50` is how a notebook edits a config; the same checks must hold
    (a typo refused, a value coerced or refused as from_dict does, a choice listed)."""
    cfg = P.SFTConfig.from_dict(sft_dict(tmp_path / "run", max_steps=1))
    try:
        named = assign(cfg)
        P.run_sft(cfg)
    except (ConfigError, AttributeError) as exc:  # refused at the assignment or before any work
        assert named in str(exc) and "CUDA" not in str(exc)
        assert not (tmp_path / "run" / "final").exists()
        return
    assert named == "train.lr", f"{named}: the run went ahead"
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["train"]["lr"] == 3e-4  # taken as from_dict would


@pytest.mark.parametrize("run, cfg, wanted", [
    ("run_sft", lambda out: P.DPOConfig.from_dict(dpo_dict(out)), "SFTConfig"),
    ("run_dpo", lambda out: P.SFTConfig.from_dict(sft_dict(out)), "DPOConfig"),
    ("run_sft", lambda out: sft_dict(out), "SFTConfig"),
], ids=["dpo-config-to-run_sft", "sft-config-to-run_dpo", "dict-to-run_sft"])
def test_a_run_function_given_the_wrong_config_names_the_one_it_takes(tmp_path, run, cfg, wanted):
    """The module docstring's own example is `run_sft(SFTConfig.from_dict({...}))`; passing the dict
    itself, or the DPO config to run_sft, is the first slip a notebook makes. It should be taken
    (a dict as from_dict takes it) or refused naming the config class, before any work."""
    given = cfg(tmp_path / "run")
    try:
        getattr(P, run)(given)
    except (TypeError, UserError) as exc:
        assert wanted in str(exc)
        return
    assert isinstance(given, dict), "another stage's config ran"


@pytest.mark.parametrize("call", [
    lambda out: P.SFTConfig.load("examples/sft_full.yaml", f"output_dir={out}").output_dir,
    lambda out: P.run_pipeline("examples/pipeline_sft_dpo.yaml", f"output_dir={out}", dry_run=True),
], ids=["XConfig.load", "run_pipeline"])
def test_overrides_given_as_one_string_are_taken_or_refused_as_a_whole(tmp_path, call):
    """`SFTConfig.load(path, "train.max_steps=50")` (the README shows a list) is taken as one override,
    as a list setting takes a single value, or refused saying overrides are a list."""
    try:
        result = call(tmp_path / "run")
    except (TypeError, UserError) as exc:
        assert "list" in str(exc) or f"output_dir={tmp_path / 'run'}" in str(exc)
        return
    assert str(result) == str(tmp_path / "run")


def test_a_run_started_with_gradients_off_trains_and_leaves_them_off(tmp_path, sft_run):
    """A notebook that evaluated a model under `torch.set_grad_enabled(False)` then trains: the loop
    owns its steps, so it trains as in a fresh process, and the caller's mode is put back."""
    torch.set_grad_enabled(False)
    try:
        run_dir = P.run_sft(P.SFTConfig.from_dict(sft_dict(tmp_path / "run")))
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
    assert same_weights(run_dir / "final", sft_run / "final")


def test_help_on_a_stage_config_says_what_its_settings_mean():
    """DESIGN / config docstring: every field carries a one-line description that feeds `--help` and
    the README's reference. In a notebook `help(SFTConfig)` / `SFTConfig?` is the --help."""
    text = pydoc.render_doc(P.SFTConfig, renderer=pydoc.plaintext)
    for line in ("train.lr", "peak learning rate", "model.path", "data.train_files"):
        assert line in text
    for method in (P.SFTConfig.load, P.SFTConfig.from_dict):
        assert method.__doc__, f"{method.__name__} has no docstring"


def test_dir_of_the_package_lists_the_api_for_tab_completion():
    """PEP 562: a module with a lazy `__getattr__` lists its names with `__dir__`."""
    names = set(dir(P))
    assert set(P.__all__) <= names
    assert "annotations" not in names  # `from __future__ import annotations` is no API


# --------------------------------------------------------------------------- right behaviour, untested


def _snapshot() -> dict:
    fds = {}
    for fd in os.listdir("/proc/self/fd") if os.path.isdir("/proc/self/fd") else []:
        try:
            fds[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return {"grad": torch.is_grad_enabled(), "dtype": torch.get_default_dtype(), "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(), "anomaly": torch.is_anomaly_enabled(),
            "matmul": torch.get_float32_matmul_precision(), "env": dict(os.environ), "cwd": os.getcwd(),
            "sigint": signal.getsignal(signal.SIGINT), "sigterm": signal.getsignal(signal.SIGTERM),
            "root_handlers": list(logging.getLogger().handlers), "logging_disabled": logging.root.manager.disable,
            "warnings": list(warnings.filters), "fds": sorted(v for v in fds.values() if "/tmp" in v or ".jsonl" in v),
            "threads_alive": sorted(t.name for t in threading.enumerate() if t.name != "tqdm_monitor"),
            "stdout": sys.stdout, "stderr": sys.stderr}


def _live_models() -> int:
    from transformers import PreTrainedModel

    gc.collect()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), PreTrainedModel))


def test_every_stage_in_one_session_leaves_the_process_as_it_found_it(tmp_path, sft_run, capsys):
    """rm, dpo, grpo, ppo, quality and evaluate one after another in one process: no global torch
    setting, environment variable, cwd, signal handler, logging handler, warnings filter, open file
    or worker thread changes, and no model outlives the call that made it."""
    stages = [
        lambda: P.run_rm(P.RMConfig.from_dict({
            "output_dir": str(tmp_path / "rm"), "model": {"path": "tiny"},
            "data": {"train_files": ["examples/data/preferences.jsonl"], "max_length": 64},
            "train": {"max_steps": 1, "batch_size": 4, **QUIET}})),
        lambda: P.run_dpo(P.DPOConfig.from_dict(dpo_dict(tmp_path / "dpo"))),
        lambda: P.run_grpo(P.GRPOConfig.from_dict(rl_dict(tmp_path / "grpo", 4))),
        lambda: P.run_ppo(P.PPOConfig.from_dict(rl_dict(tmp_path / "ppo", 1))),
        lambda: P.run_quality(P.QualityConfig.load("examples/quality.yaml", [f"output_dir={tmp_path / 'quality'}"])),
        lambda: P.run_evaluate(P.EvaluateConfig.load("examples/evaluate.yaml", [
            f"output_dir={tmp_path / 'evaluate'}", "prompts.limit=2", "generation.samples=1",
            "generation.max_new_tokens=4", "safety.limit=1", "safety.max_tokens=4"])),
    ]
    # what an earlier test in this xdist worker left (a thread ending, a model it still holds) is not ours:
    # the stages may let those go, and must add none
    before, models_before = _snapshot(), _live_models()
    for stage in stages:
        assert isinstance(stage(), Path)
        after = _snapshot()
        assert set(after.pop("threads_alive")) <= set(before["threads_alive"])
        assert {k: v for k, v in after.items() if before[k] != v} == {}
    capsys.readouterr()
    assert _live_models() <= models_before


def test_a_second_run_in_the_session_prints_and_trains_as_the_first(tmp_path, sft_run, capsys):
    """Two runs of one config (other output dirs) in one process print the same lines, once each, and
    write the same weights as the session's first run."""
    outs = []
    for name in ("a", "b"):
        capsys.readouterr()
        run_dir = P.run_sft(P.SFTConfig.from_dict(sft_dict(tmp_path / name)))
        out = capsys.readouterr()
        outs.append(out.out.replace(str(run_dir), "RUN"))  # stderr: transformers' bars, with timings
        assert same_weights(run_dir / "final", sft_run / "final")
    assert outs[0] == outs[1]
    assert outs[0].count("step 2: eval loss") == 1


def test_a_run_in_the_session_equals_the_same_run_in_a_fresh_process(tmp_path, sft_run):
    """DPO after other runs in this process and DPO alone in a new one: the same weights and reference
    log-probs, bit for bit (every run seeds what it samples)."""
    here = P.run_dpo(P.DPOConfig.from_dict(dpo_dict(tmp_path / "here")))
    script = ("import json, sys; from posttrain import DPOConfig, run_dpo; "
              "run_dpo(DPOConfig.from_dict(json.loads(sys.argv[1])))")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", script, json.dumps(dpo_dict(tmp_path / "fresh"))], check=False,
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    fresh = tmp_path / "fresh"
    assert same_weights(here / "final", fresh / "final")
    assert (here / "reference_logps.safetensors").read_bytes() == (fresh / "reference_logps.safetensors").read_bytes()


def test_ctrl_c_in_a_session_raises_stopped_after_saving_and_restores_the_handlers(tmp_path, monkeypatch, capsys):
    """Errors module: `Stopped(KeyboardInterrupt)` after saving a checkpoint where it stopped. In a
    notebook that is the KeyboardInterrupt the cell ends with (no exit, no exit code), the handlers
    the session had are back, and calling the same config again resumes and finishes."""
    from posttrain.train.metrics import RunLogger

    advance = RunLogger.advance

    def interrupt_at_step_1(self, record):
        advance(self, record)
        if record["step"] == 1:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(RunLogger, "advance", interrupt_at_step_1)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    cfg = P.SFTConfig.from_dict(sft_dict(tmp_path / "run", max_steps=3))
    with pytest.raises(KeyboardInterrupt) as caught:
        P.run_sft(cfg)
    assert isinstance(caught.value, Stopped) and caught.value.signum == signal.SIGINT
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]
    assert not (tmp_path / "run" / "final").exists()
    del caught
    monkeypatch.setattr(RunLogger, "advance", advance)
    assert P.run_sft(cfg) == tmp_path / "run"
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 3


@pytest.mark.parametrize("call, error, message", [
    (lambda t: P.SFTConfig.from_dict({"train": {"learning_rate": 1e-4}}), ConfigError, "did you mean train.lr"),
    (lambda t: P.SFTConfig.load("no/such.yaml"), ConfigError, "does not exist"),
    (lambda t: P.SFTConfig.from_dict({"data": {"train_files": [{"instruction": "a", "output": "b"}]}}), ConfigError,
     "data.train_files must be a string"),
    (lambda t: P.run_sft(P.SFTConfig.from_dict({**sft_dict(t), "data": {"train_files": ["no/such.jsonl"]}})), DataError,
     "no/such.jsonl: no such file"),
    (lambda t: P.run_sft(P.SFTConfig.from_dict({**sft_dict(t), "model": {"path": "/no/such/model"}})), UserError,
     "does not exist"),
    (lambda t: P.run_pipeline("no/such.yaml"), ConfigError, "does not exist"),
], ids=["unknown-key", "missing-yaml", "rows-in-memory", "missing-data", "missing-model", "missing-pipeline"])
def test_a_mistake_in_the_api_is_a_posttrain_exception_with_its_message(tmp_path, call, error, message):
    """No SystemExit, no print-and-return: the exception the CLI would print as `error: ...`."""
    with pytest.raises(error, match=re.escape(message)):
        call(tmp_path / "run")
    assert not (tmp_path / "run" / "final").exists()


@pytest.mark.parametrize("cls, example", [
    (P.SFTConfig, "sft_mixed_peft.yaml"), (P.RMConfig, "rm_ranking_lora.yaml"), (P.DPOConfig, "dpo_lora_chat.yaml"),
    (P.GRPOConfig, "grpo_rloo_lora.yaml"), (P.PPOConfig, "ppo.yaml"), (P.QualityConfig, "quality.yaml"),
    (P.EvaluateConfig, "evaluate.yaml"), (P.RedTeamConfig, "redteam.yaml"), (P.RLAIFConfig, "rlaif.yaml"),
    (P.ConstitutionalConfig, "constitutional.yaml"), (P.SelfInstructConfig, "self_instruct.yaml"),
], ids=lambda v: getattr(v, "__name__", v))
def test_a_config_round_trips_through_to_dict_and_a_yaml_file(tmp_path, cls, example):
    cfg = cls.load(ROOT / "examples" / example)
    assert cls.from_dict(cfg.to_dict()) == cfg
    (tmp_path / "saved.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    assert cls.load(tmp_path / "saved.yaml") == cfg


def test_the_run_records_a_config_that_loads_back_equal_and_is_not_changed(tmp_path, sft_run):
    """run_dir/config.yaml loads back equal to the config given, and the run leaves that object as it was."""
    cfg = P.SFTConfig.from_dict(sft_dict(tmp_path / "run"))
    given = P.SFTConfig.from_dict(cfg.to_dict())
    run_dir = P.run_sft(cfg)
    assert cfg == given
    assert P.SFTConfig.load(run_dir / "config.yaml") == cfg


def test_the_final_directories_load_with_transformers_and_peft(tmp_path, sft_run):
    """README: "run_dir/final is a HF model dir (or a PEFT adapter dir)": AutoModelForCausalLM for the
    full run, AutoPeftModelForCausalLM (its recorded base) for a LoRA run, each with its tokenizer."""
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = AutoModelForCausalLM.from_pretrained(sft_run / "final")
    assert all(torch.equal(p, weights(sft_run / "final")[n]) for n, p in full.state_dict().items()
               if n in weights(sft_run / "final"))
    lora = P.run_sft(P.SFTConfig.load("examples/sft_lora.yaml", [f"output_dir={tmp_path / 'lora'}", "train.max_steps=1",
                                                                  "train.progress_bar=false"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        adapted = AutoPeftModelForCausalLM.from_pretrained(lora / "final")
    tokenizer = AutoTokenizer.from_pretrained(lora / "final")
    ids = tokenizer("hello", return_tensors="pt").input_ids
    assert adapted(ids).logits.shape[-1] == full.config.vocab_size
