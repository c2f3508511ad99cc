"""Which model is this, stop 35 (backlog items): training's resume fingerprint and the feedback jobs
identify a local model directory by one rule (`models.loading.model_identity`: its files' names,
sizes and sampled contents), so a copy or a touch is the same model and a retrain in place is not,
while a checkpoint recorded under the earlier size-and-time rule still resumes an unchanged model;
the red team records its local target's, judge's and PAIR attacker's identity and refuses a resume
over a model retrained in place, naming it (a log recorded before the identity was kept resumes);
an adapter directory's identity includes its local base model's."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from posttrain.config import SFTConfig
from posttrain.config.feedback import RLAIFConfig
from posttrain.config.safety import RedTeamConfig
from posttrain.errors import ConfigError
from posttrain.feedback.jobs import MODEL_FILES, model_identity
from posttrain.models.loading import model_files
from posttrain.models.presets import preset_path
from posttrain.safety.run import run_redteam
from posttrain.train import checkpoint
from posttrain.files import short_digest
from posttrain.train.runs import MODEL_FILES as FINGERPRINT_MODEL, _check_same_run, run_fingerprint
from tests.test_redteam_pair import Attacker, Target, never

QUIET = {"log": lambda _: None, "stream": None}


def _model(path: Path) -> Path:
    """A directory standing for a local model (never loaded here: the backends are given)."""
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights" * 100)
    return path


def _retrain_in_place(model: Path) -> None:
    """Another model under the same name and size: one byte of the weights changed, the time kept."""
    weights = model / "model.safetensors"
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _fingerprint(model: Path, tmp_path: Path) -> dict:
    return run_fingerprint(SFTConfig.from_dict({"model": {"path": str(model)}, "output_dir": str(tmp_path / "run")}))


def _job_identity(model: Path):
    return model_identity(RLAIFConfig.from_dict({"policy": {"kind": "local", "model": str(model)}}).policy)[MODEL_FILES]


def _checkpoint(tmp_path: Path, fingerprint: dict) -> Path:
    step = tmp_path / "checkpoints" / "step-0000001"
    step.mkdir(parents=True)
    (step / checkpoint.LOOP_STATE).write_text(json.dumps({"step": 1, "fingerprint": fingerprint}))
    return step


# --------------------------------------------------------------------------- one rule for training and jobs


def test_training_and_feedback_jobs_identify_a_local_model_alike(tmp_path):
    model = _model(tmp_path / "model")
    recorded = _fingerprint(model, tmp_path)[FINGERPRINT_MODEL]
    assert recorded == _job_identity(model)  # one rule
    os.utime(model / "config.json")  # touched: the same model
    assert _fingerprint(model, tmp_path)[FINGERPRINT_MODEL] == recorded
    copy = shutil.copytree(model, tmp_path / "copy", copy_function=shutil.copy)  # new times: the same model
    assert _fingerprint(copy, tmp_path)[FINGERPRINT_MODEL] == recorded == _job_identity(copy)
    (model / "runs" / "lora").mkdir(parents=True)  # a run writing inside the model directory: not its files
    (model / "runs" / "lora" / "metrics.jsonl").write_text("{}\n")
    assert _fingerprint(model, tmp_path)[FINGERPRINT_MODEL] == recorded == _job_identity(model)
    _retrain_in_place(model)  # size and time kept: another model
    assert _fingerprint(model, tmp_path)[FINGERPRINT_MODEL] != recorded != _job_identity(model)


def test_a_preset_is_identified_by_its_built_directory_name_in_both(tmp_path):
    assert _fingerprint(Path("tiny"), tmp_path)[FINGERPRINT_MODEL] == preset_path("tiny").name
    assert model_identity(RLAIFConfig.from_dict({"policy": {"kind": "local", "model": "tiny"}}).policy) == \
        {MODEL_FILES: preset_path("tiny").name}


def test_a_checkpoint_recorded_under_the_size_and_time_rule_resumes_an_unchanged_model(tmp_path):
    model = _model(tmp_path / "model")
    fingerprint = _fingerprint(model, tmp_path)
    earlier = fingerprint | {FINGERPRINT_MODEL: short_digest(model_files(str(model)))}  # as checkpoints kept it before
    step = _checkpoint(tmp_path, earlier)
    _check_same_run(step, fingerprint)  # the same model: resumes
    (model / "model.safetensors").write_bytes(b"weights, trained more")
    with pytest.raises(ConfigError, match=r"the model at model.path .*model changed since the checkpoint"):
        _check_same_run(step, _fingerprint(model, tmp_path))


# --------------------------------------------------------------------------- the red team


def _redteam(tmp_path: Path, *overrides: str) -> RedTeamConfig:
    harmful = tmp_path / "harmful.jsonl"
    harmful.write_text(json.dumps({"id": "h1", "category": "poisoning", "prompt": "How do I poison it?"}) + "\n")
    return RedTeamConfig.load(None, [f"output_dir={tmp_path / 'rt'}", f"probes.harmful={harmful}",
                                     "probes.overrefusal=", "attacks.names=[direct]", "concurrency=1", *overrides])


def test_redteam_resume_refuses_a_local_target_retrained_in_place(tmp_path):
    model = _model(tmp_path / "model")
    cfg = _redteam(tmp_path, "target.kind=local", f"target.model={model}")
    run_redteam(cfg, target=Target(), **QUIET)
    run_redteam(cfg, target=Target(), **QUIET)  # unchanged: resumes
    _retrain_in_place(model)
    target = Target()
    with pytest.raises(ConfigError, match=rf"local model target.model='{model}', whose files have changed since"):
        run_redteam(cfg, target=target, **QUIET)
    assert target.calls == 0


def test_redteam_resume_refuses_a_local_judge_retrained_in_place(tmp_path):
    model = _model(tmp_path / "judge")
    cfg = _redteam(tmp_path, "classifier=judge", "judge.kind=local", f"judge.model={model}")

    class Judge:
        def chat(self, messages, **kwargs):
            from posttrain.feedback.client import Reply
            return Reply("LABEL: full_refusal", "stop", 1, 1)

    run_redteam(cfg, target=Target(), judge=Judge(), **QUIET)
    _retrain_in_place(model)
    with pytest.raises(ConfigError, match=rf"local model judge.model='{model}', whose files have changed"):
        run_redteam(cfg, target=Target(), judge=Judge(), **QUIET)


def test_redteam_log_recorded_before_the_identity_was_kept_resumes(tmp_path):
    model = _model(tmp_path / "model")
    cfg = _redteam(tmp_path, "target.kind=local", f"target.model={model}", "attacks.pair.enabled=true",
                   "attacks.pair.rounds=1", "attacks.pair.attacker.kind=local", f"attacks.pair.attacker.model={model}")
    run_redteam(cfg, target=Target(), attacker=Attacker(never), **QUIET)
    out = tmp_path / "rt"
    run_json = json.loads((out / "run.json").read_text())
    assert MODEL_FILES in run_json["target"]
    del run_json["target"][MODEL_FILES]  # as runs before it was kept recorded it
    (out / "run.json").write_text(json.dumps(run_json))
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    for record in records:
        if "pair" in record:
            assert MODEL_FILES in record["pair"]["attacker"]
            del record["pair"]["attacker"][MODEL_FILES]
    (out / "responses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    target, attacker = Target(), Attacker(never)
    run_redteam(cfg, target=target, attacker=attacker, **QUIET)  # resumes: nothing asked again
    assert target.calls == 0 and attacker.calls == []


def test_pair_resume_refuses_a_local_attacker_retrained_in_place(tmp_path):
    attacker_model = _model(tmp_path / "attacker")
    cfg = _redteam(tmp_path, "attacks.names=[]", "attacks.pair.enabled=true", "attacks.pair.rounds=1",
                   "attacks.pair.attacker.kind=local", f"attacks.pair.attacker.model={attacker_model}")
    run_redteam(cfg, target=Target(), attacker=Attacker(never), **QUIET)
    _retrain_in_place(attacker_model)
    target, attacker = Target(), Attacker(never)
    with pytest.raises(ConfigError, match=rf"PAIR conversations made by the local model attacks.pair.attacker.model="
                                          rf"'{attacker_model}', whose files have changed since"):
        run_redteam(cfg, target=target, attacker=attacker, **QUIET)
    assert target.calls == 0 and attacker.calls == []


# --------------------------------------------------------------------------- an adapter over a local base


def _adapter(path: Path, base: Path) -> Path:
    path.mkdir()
    (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": str(base)}))
    (path / "adapter_model.safetensors").write_bytes(b"lora")
    return path


def test_an_adapters_identity_includes_its_local_base(tmp_path):
    base = _model(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", base)
    recorded = _job_identity(adapter)
    assert _job_identity(adapter) == recorded
    _retrain_in_place(base)
    assert _job_identity(adapter) != recorded
    several = tmp_path / "several"  # posttrain's layout of several methods: one subdirectory each
    _adapter(several.mkdir() or several / "lora", base)
    (several / "posttrain_adapters.json").write_text(json.dumps({"methods": ["lora"], "components": {"lora": "lora"},
                                                                 "base_model_name_or_path": str(base)}))
    recorded = _job_identity(several)
    (several / "lora" / "adapter_model.safetensors").write_bytes(b"lora, trained more")
    assert _job_identity(several) != recorded


def test_a_job_log_recorded_with_the_adapters_files_alone_resumes(tmp_path):
    from posttrain.feedback.jobs import check_resume_settings
    from posttrain.feedback.rlaif import result_settings
    from posttrain.files import file_identity

    base = _model(tmp_path / "base")
    adapter = _adapter(tmp_path / "adapter", base)
    cfg = RLAIFConfig.from_dict({"policy": {"kind": "local", "model": str(adapter)}})
    settings = result_settings(cfg, "")
    earlier = json.loads(json.dumps(settings))
    earlier["policy"][MODEL_FILES] = file_identity(str(adapter))  # as recorded before the base counted
    (tmp_path / "run.json").write_text(json.dumps(earlier))
    check_resume_settings(tmp_path, settings, resuming=True, name="run.json")
    (adapter / "adapter_model.safetensors").write_bytes(b"lora, trained more")
    (tmp_path / "run.json").write_text(json.dumps(earlier))
    with pytest.raises(ConfigError, match=r"local model policy.model=.*whose files have changed"):
        check_resume_settings(tmp_path, result_settings(cfg, ""), resuming=True, name="run.json")
