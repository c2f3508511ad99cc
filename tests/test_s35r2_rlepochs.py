"""How an online-RL epoch reads its prompts (`rollouts.EPOCH_PLAN`): ⌈N / P⌉ rollouts, the last topped
up from the start of the same epoch's order, so every prompt is read each epoch; said in the log and
data_report.json; rollout seeds one per rollout of the run; a checkpoint written before the plan was
kept (plan 1: ⌊N / P⌋ rollouts, N mod P prompts unread) resumes by its own plan, bitwise."""

from __future__ import annotations

import json
import shutil
import types

import pytest
import torch

from posttrain.config import GRPOConfig, PPOConfig
from posttrain.errors import ConfigError


class _Engine:
    is_policy = True


def _stage(kind: str, n: int, *overrides):
    """A GRPO (4 prompts a rollout) or PPO (4 a rollout) stage on n prompts, nothing sampled."""
    from posttrain.train.grpo import GRPOStage
    from posttrain.train.ppo import PPOStage

    if kind == "grpo":
        cfg, cls = GRPOConfig.load(None, ["train.batch_size=8", "rollout.num_generations=2", *overrides]), GRPOStage
    else:
        cfg, cls = PPOConfig.load(None, ["train.batch_size=4", "ppo.epochs=1", *overrides]), PPOStage
    return cls(types.SimpleNamespace(model=None), [[i] for i in range(n)], list(range(n)), cfg, None, None, None,
               engine=_Engine())


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_the_last_rollout_is_topped_up_from_the_epochs_start(kind):
    """95 prompts at 4 a rollout: 24 rollouts, the first 23 the epoch's order in fours, the last its
    3 left over and its first prompt again; every prompt read each epoch, one twice."""
    stage = _stage(kind, 95)
    assert stage.prompts_per_rollout == 4 and stage.rollouts_per_epoch() == 24
    for epoch in range(2):
        rollouts = [stage.rollout_prompts(epoch, i) for i in range(24)]
        order = [p for r in rollouts[:23] for p in r] + rollouts[23][:3]
        assert sorted(order) == list(range(95))
        assert rollouts[23][3] == rollouts[0][0]
    assert stage.epoch_figures() == {"prompts": 95, "prompts_per_rollout": 4, "rollouts": 24, "topped_up": 1,
                                     "unread": 0}
    assert stage.micro_batches_per_epoch() == 24 * stage.batches_per_update


def test_a_prompt_set_smaller_than_a_rollout_goes_round_again():
    stage = _stage("grpo", 3, "train.batch_size=16")  # 8 a rollout
    (chosen,) = [stage.rollout_prompts(0, i) for i in range(stage.rollouts_per_epoch())]
    assert len(chosen) == 8 and set(chosen) == {0, 1, 2} and chosen[:3] == chosen[3:6]


def test_rollout_seeds_are_one_per_rollout_of_the_run():
    """Plan 2 numbers the run's rollouts (epoch × rollouts an epoch + index): epoch 0's rollout
    10,007 and epoch 1's rollout 0, which plan 1's seed·1,000,003 + epoch·10,007 + index gave one
    seed, get two; plan 1 (a checkpoint written before) keeps its seeds."""
    stage = _stage("grpo", 4 * 10_008)
    seeds = {stage.rollout_seed(e, i) for e in range(2) for i in (0, 1, 10_006, 10_007)}
    assert len(seeds) == 8
    stage.epoch_plan = 1
    assert stage.rollout_seed(0, 10_007) == stage.rollout_seed(1, 0) == 10_007


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_a_checkpoint_of_another_plan_is_refused_by_a_stage_left_on_its_own(kind):
    """The stage alone (outside `RLRun`, which takes the checkpoint's plan): a checkpoint that keeps no
    plan (plan 1) is refused, naming both plans."""
    stage = _stage(kind, 95)
    plain, tensors = stage.state_dict()
    plain.pop("epoch_plan")
    with pytest.raises(ConfigError, match="plan 1 .* plan 2"):
        stage.load_state_dict(plain, tensors)


def _prompts_file(tmp_path, n: int):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i} xyz", "answer": "x"}) + "\n" for i in range(n)))
    return path


def _run(kind: str, tmp_path, name: str, *extra):
    """A 1-epoch run of 7 prompts at 2 a rollout (a step a rollout), a checkpoint every step."""
    from posttrain.train.grpo import run_grpo
    from posttrain.train.ppo import run_ppo

    common = [f"output_dir={tmp_path / name}", f"data.train_files=[{_prompts_file(tmp_path, 7)}]",
              "data.eval_fraction=0", "eval.prompts=0", "model.path=tiny-2l", "rollout.max_new_tokens=3",
              "train.epochs=1", "train.schedule=linear", "train.lr=1e-3", "train.save_every=1",
              "train.keep_last=5", "train.progress_bar=false", "reward.functions=[short=tests.rewards_fixture:short]", *extra]
    if kind == "grpo":
        return run_grpo(GRPOConfig.load(None, [*common, "train.batch_size=4", "rollout.num_generations=2"]))
    return run_ppo(PPOConfig.load(None, [*common, "train.batch_size=2", "ppo.epochs=1", "ppo.minibatches=1"]))


def _weights(run_dir):
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def _steps(run_dir):
    return [(row["step"], row["epoch"]) for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "epoch" in row]


def _resumed_from_step(whole, parts, step: int):
    """`parts`: `whole`'s directory as it stood at `step` (its later checkpoints gone)."""
    shutil.copytree(whole, parts)
    for later in sorted((parts / "checkpoints").glob("step-*"))[step:]:
        shutil.rmtree(later)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_a_topped_up_epoch_is_said_reported_and_resumed_bitwise(kind, tmp_path, capsys):
    """7 prompts at 2 a rollout, train.epochs=1: 4 steps (the fourth rollout one prompt left over
    and one from the epoch's start), `epoch` 1.0 at the last, said in one line and in
    data_report.json; stopped after step 2 and resumed, the same weights."""
    whole = _run(kind, tmp_path, "whole")
    assert "train: 7 prompts, 2 a rollout: 4 rollouts an epoch, the last topped up with 1 prompt" \
        in capsys.readouterr().out
    assert _steps(whole) == [(1, 0.25), (2, 0.5), (3, 0.75), (4, 1.0)]
    assert json.loads((whole / "summary.json").read_text())["stop_reason"] == "epochs"
    assert json.loads((whole / "data_report.json").read_text())["rl_epoch"] == {
        "prompts": 7, "prompts_per_rollout": 2, "rollouts": 4, "topped_up": 1, "unread": 0}
    _resumed_from_step(whole, tmp_path / "parts", 2)
    parts = _run(kind, tmp_path, "parts")
    a, b = _weights(whole), _weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert _steps(parts) == _steps(whole)


@pytest.mark.parametrize("kind", ["grpo", "ppo"])
def test_a_checkpoint_from_before_the_top_up_resumes_by_its_own_plan(kind, tmp_path, capsys, monkeypatch):
    """A run under plan 1 (3 rollouts an epoch of 7 prompts at 2, one prompt unread) whose checkpoints
    keep no plan (as those written before it was kept), resumed from step 1: the resume keeps plan 1,
    says so, and ends as the uninterrupted plan-1 run did (3 steps, the same weights and schedule),
    where plan 2 would have added a step to a linear schedule part-way through."""
    from posttrain.train.rollouts import RolloutStage

    with monkeypatch.context() as patch:
        patch.setattr(RolloutStage, "epoch_plan", 1)
        patch.setattr(RolloutStage, "plan_state", lambda stage: {"prompts_per_rollout": stage.prompts_per_rollout})
        whole = _run(kind, tmp_path, "whole")
    assert _steps(whole) == [(1, 0.3333), (2, 0.6667), (3, 1.0)]
    assert "epoch_plan" not in json.loads((whole / "checkpoints" / "step-0000001" / "stage_state.json").read_text())
    _resumed_from_step(whole, tmp_path / "parts", 1)
    capsys.readouterr()
    parts = _run(kind, tmp_path, "parts")
    assert "3 rollouts an epoch, 1 prompt at the end of each epoch's order unread: the plan of the checkpoint" \
        in capsys.readouterr().out
    a, b = _weights(whole), _weights(parts)
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [json.loads(line).get("lr") for line in (parts / "metrics.jsonl").read_text().splitlines()]
    assert lrs == [json.loads(line).get("lr") for line in (whole / "metrics.jsonl").read_text().splitlines()]
    # its checkpoints keep plan 1, and the run finished there resumes with nothing left to train
    assert json.loads((parts / "checkpoints" / "step-0000003" / "stage_state.json").read_text())["epoch_plan"] == 1
    _run(kind, tmp_path, "parts")
    assert _steps(parts)[-1] == (3, 1.0)
