"""Model paths that are not a model: a LoRA reward model's run as PPO's critic (loaded, merged into its
base: the critic trains in full) and a training checkpoint given as a model path (refused, naming the
run's final/)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import posttrain as P
from posttrain.errors import UserError
from posttrain.models.loading import load_tokenizer, resolve_model_path
from posttrain.models.reward_model import load_reward_model, score
from posttrain.train.ppo import build_value_model

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"progress_bar": False}


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _data(**extra):
    return {"train_files": ["synthetic"], "synthetic_size": 42, **extra}


def _ppo(out, value_model_path: str) -> P.PPOConfig:
    return P.PPOConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"}, "data": {"train_files": ["synthetic"], "synthetic_size": 32},
        "rollout": {"num_generations": 1, "max_new_tokens": 4},
        "reward": {"functions": ["exact_match=posttrain.rewards:exact_match"]},
        "ppo": {"value_model": "separate", "value_model_path": value_model_path},
        "train": {"max_steps": 1, "batch_size": 8, "lr": 1e-3, **QUIET}, "eval": {"prompts": 0}})


def test_a_lora_reward_model_run_is_the_critic_merged_and_scoring_as_the_reward_model(tmp_path):
    rm = P.run_rm(P.RMConfig.from_dict({
        "output_dir": str(tmp_path / "rm"), "model": {"path": "tiny"}, "adapter": {"method": "lora"},
        "data": _data(max_length=64), "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, **QUIET}}))
    tokenizer = load_tokenizer("tiny")
    said: list[str] = []
    for path in (rm, rm / "final"):
        _, critic = build_value_model(_ppo(tmp_path / "ppo", str(path)), None, tokenizer, said.append)
        classifier = critic.classifier
        assert type(classifier).__name__.endswith("ForSequenceClassification")  # merged: no peft wrapper
        assert all(p.requires_grad for p in classifier.parameters())  # trained in full
        assert any("merged into its base" in line for line in said), said
        reward_model = load_reward_model(rm / "final", "float32", pad_token_id=tokenizer.pad_token_id).eval()
        ids = torch.tensor([[5, 9, 13, 21, 8], [7, 3, 11, 2, 30]])
        mask = torch.ones_like(ids)
        with torch.no_grad():
            assert torch.allclose(score(classifier.eval(), ids, mask), score(reward_model, ids, mask), atol=1e-5)
    run = P.run_ppo(_ppo(tmp_path / "ppo_run", str(rm)))
    critic_counts = json.loads((run / "params.json").read_text())["by_method"]["critic"]
    assert critic_counts["trainable"] == critic_counts["total"] > 0, critic_counts


def test_a_policy_adapter_as_the_critic_is_refused_naming_value_model_path(tmp_path):
    run = P.run_sft(P.SFTConfig.from_dict({
        "output_dir": str(tmp_path / "sft"), "model": {"path": "tiny"}, "adapter": {"method": "lora"},
        "data": _data(max_length=64), "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3, **QUIET}}))
    with pytest.raises(UserError) as info:
        build_value_model(_ppo(tmp_path / "ppo", str(run)), None, load_tokenizer("tiny"), lambda line: None)
    assert "ppo.value_model_path" in str(info.value) and "model.path" not in str(info.value).replace(
        "ppo.value_model_path", ""), str(info.value)


def test_an_adapter_directory_message_names_the_setting_it_came_from(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "posttrain_adapters.json").write_text("{}")
    with pytest.raises(UserError) as info:
        resolve_model_path(adapter, "ppo.value_model_path")
    assert "set ppo.value_model_path=OUT_DIR" in str(info.value), str(info.value)
    with pytest.raises(UserError) as info:
        resolve_model_path(adapter)
    assert "set model.path=OUT_DIR" in str(info.value), str(info.value)


def _checkpoint(directory: Path) -> Path:
    directory.mkdir(parents=True)
    for name in ("trainable.safetensors", "loop_state.json", "optimizer.safetensors", "manifest.json"):
        (directory / name).write_text("{}")
    return directory


def test_a_checkpoint_directory_is_refused_naming_its_runs_final(tmp_path, monkeypatch):
    run = tmp_path / "run"
    checkpoint = _checkpoint(run / "checkpoints" / "step-0000002")
    with pytest.raises(UserError) as info:
        resolve_model_path(checkpoint)
    message = str(info.value)
    assert f"training checkpoint of {run}" in message and f"start from {run / 'final'}" in message, message
    monkeypatch.chdir(checkpoint)  # "." still names the run
    with pytest.raises(UserError) as info:
        resolve_model_path(".")
    assert f"start from {run / 'final'}" in str(info.value), str(info.value)


def test_a_checkpoint_outside_a_run_is_refused_as_a_checkpoint(tmp_path):
    checkpoint = _checkpoint(tmp_path / "copied")
    with pytest.raises(UserError) as info:
        resolve_model_path(checkpoint)
    assert "training checkpoint" in str(info.value) and "its run's final/" in str(info.value), str(info.value)
