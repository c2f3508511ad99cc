"""Adapters given where they cannot go, refused from their files before any model loads (stop 32):
`posttrain merge` of virtual tokens or bottlenecks, a LoRA reward model as a policy, a LoRA beside an
IA3 on one base; and the reward-model loader's advice for a policy adapter, per setting it came from."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

import posttrain as P
from posttrain.errors import UserError
from tests.cli_runner import run_cli


def _sft(out: Path, method: str) -> Path:
    cfg = P.SFTConfig.from_dict({
        "output_dir": str(out), "model": {"path": "tiny"}, "adapter": {"method": method},
        "data": {"train_files": ["synthetic"], "synthetic_size": 42, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-2, "progress_bar": False}})
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return P.run_sft(cfg)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """1-step SFT runs, one per method, trained before any test forbids loading a model."""
    root = tmp_path_factory.mktemp("s32r2_matrix")
    trained = {method: _sft(root / method, method) for method in ("lora", "ia3", "prompt", "prefix", "bottleneck")}
    return trained.__getitem__


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any causal LM load fails the test: the refusals below come from the adapter's files."""
    import posttrain.models.loading as loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(loading, "load_model", refuse)


@pytest.mark.parametrize("method", ["prompt", "prefix", "bottleneck"])
def test_merge_of_an_unmergeable_adapter_is_refused_before_the_base_loads(capsys, runs, no_model_loads, method,
                                                                          tmp_path):
    rc, text = run_cli(capsys, "merge", runs(method), tmp_path / "merged")
    assert rc == 2 and f"{method} adapters cannot be merged" in text, text
    assert not (tmp_path / "merged").exists()


def test_a_lora_reward_model_as_a_policy_is_refused_before_the_base_loads(no_model_loads, tmp_path):
    from posttrain.inference import load_for_inference

    rm = P.run_rm(P.RMConfig.from_dict({
        "output_dir": str(tmp_path / "rm"), "model": {"path": "tiny"}, "adapter": {"method": "lora"},
        "data": {"train_files": ["synthetic"], "synthetic_size": 42, "max_length": 64},
        "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-2, "progress_bar": False}}))
    with pytest.raises(UserError, match=r"is a reward model \(LoRA on a sequence-classification model.*a policy "
                                        r"starts from a causal LM"):
        load_for_inference(str(rm))


def test_a_lora_and_an_ia3_adapter_are_named_with_their_kinds_before_the_base_loads(runs, no_model_loads):
    from posttrain.models.adapters.io import load_adapted

    lora, ia3 = runs("lora") / "final", runs("ia3") / "final"
    with pytest.raises(UserError) as refused:
        load_adapted({"a": lora, "b": ia3})
    message = str(refused.value)
    assert f"a ({lora}) is lora" in message and f"b ({ia3}) is ia3" in message, message


@pytest.mark.parametrize("setting, says, not_says", [
    ("model.path", "set model.path=OUT_DIR", "ppo.value_model_path"),
    ("ppo.value_model_path", "set ppo.value_model_path=OUT_DIR", "set model.path"),
    ("reward.models", "train one with posttrain rm", "posttrain merge"),
])
def test_a_lora_policy_given_for_a_reward_model_is_advised_by_the_setting_it_came_from(runs, setting, says,
                                                                                       not_says):
    from posttrain.models.reward_model import load_reward_model

    with pytest.raises(UserError) as refused:
        load_reward_model(runs("lora") / "final", setting=setting)
    message = str(refused.value)
    assert "is a policy (causal LM) adapter, not a reward model" in message and says in message, message
    assert not_says not in message, message


@pytest.mark.parametrize("setting", ["model.path", "ppo.value_model_path"])
def test_a_prompt_tuned_policy_as_a_critic_or_reward_model_start_is_not_sent_to_merge(runs, setting):
    from posttrain.models.reward_model import load_reward_model

    with pytest.raises(UserError) as refused:
        load_reward_model(runs("prompt") / "final", setting=setting)
    message = str(refused.value)
    assert "posttrain merge" not in message and "prompt adapters, which cannot be merged into a model to start " \
                                                 "from" in message, message


def test_a_bottleneck_run_as_model_path_names_its_method(runs):
    from posttrain.models.loading import resolve_model_path

    with pytest.raises(UserError) as refused:
        resolve_model_path(runs("bottleneck"))
    message = str(refused.value)
    assert "posttrain merge" not in message and "bottleneck adapters, which cannot be merged" in message, message
