"""Stop 32, online RL (backlog items): an RL run writes data_report.json (rows read, prompts kept,
dropped by reason with file:line) as SFT and DPO do; a separate PPO critic and the forgetting
retain rows are checked against the position table up front; the held-out KL before training is
0 without a reference forward; PPO's rollout-time pass computes no entropy it would discard; GRPO
with one update per rollout checkpoints no rollout batches (they are never read back)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from posttrain.config import GRPOConfig, PPOConfig
from posttrain.errors import ConfigError

QUICK = ["train.max_steps=1", "train.batch_size=4", "rollout.num_generations=2", "rollout.max_new_tokens=3",
         "train.progress_bar=false", "model.path=tiny-2l", "reward.functions=[short=tests.rewards_fixture:short]"]


def _small_table(tmp_path, positions: int):
    """tiny-2l saved with a position table of `positions` (rotary: the weights load as they are)."""
    from posttrain.models.presets import preset_path

    out = tmp_path / f"tiny-2l-{positions}"
    shutil.copytree(preset_path("tiny-2l"), out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps(config | {"max_position_embeddings": positions}))
    return out


# --------------------------------------------------------------------------- one GRPO run, three items


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """One 1-step GRPO run (β > 0, μ = 1, two held-out prompts) on a prompt file with a malformed
    row and an over-long prompt, counting the held-out KL passes (`rollouts._sequence_kl`)."""
    from posttrain.train import grpo, rollouts

    tmp = tmp_path_factory.mktemp("s32-grpo")
    rows = [{"prompt": "abc", "answer": "a"}, {"prompt": "long " * 120, "answer": "b"}, {"bad": 1}]
    rows += [{"prompt": f"q{i} xyz", "answer": "x"} for i in range(7)]
    (tmp / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    calls = []
    real = rollouts._sequence_kl
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rollouts, "_sequence_kl", lambda *a, **k: calls.append(1) or real(*a, **k))
        run = grpo.run_grpo(GRPOConfig.load(None, [
            f"output_dir={tmp / 'run'}", *QUICK, f"data.train_files=[{tmp / 'p.jsonl'}]", "data.bad_rows=skip",
            "data.max_bad_fraction=0.5", "data.eval_fraction=0.2", "data.max_prompt_length=64", "eval.prompts=2",
            "eval.samples=2", "grpo.beta=0.04", "train.save_every=1"]))
    return tmp, run, calls


def test_an_rl_run_writes_its_data_report_with_the_dropped_prompts_by_reason(grpo_run):
    """data_report.json as SFT's and DPO's: the rows read (the malformed one by file:line), and of
    the prompts, how many were kept and which were dropped for being longer than
    data.max_prompt_length, by file:line; summary.json's "data" is the same report."""
    tmp, run, _ = grpo_run
    report = json.loads((run / "data_report.json").read_text())
    assert report["train_read"]["rows"] == 10 and report["train_read"]["bad_rows"] == 1
    assert report["train_read"]["first_bad"][0]["location"] == f"{tmp / 'p.jsonl'}:3"
    both = report["train_length"], report["eval_length"]
    assert sum(r["prompts"] for r in both) == 9 and sum(r["dropped_too_long"] for r in both) == 1
    assert [s for r in both for s in r["too_long_sources"]] == [f"{tmp / 'p.jsonl'}:2"]
    assert report["train_prompts"] == report["train_length"]["kept"] and report["train_prompts"] > 0
    assert report["eval_prompts"] == report["eval_length"]["kept"]
    assert report["train_prompts"] + report["eval_prompts"] == 8
    assert json.loads((run / "summary.json").read_text())["data"] == report


def test_the_held_out_kl_before_training_is_zero_without_a_reference_pass(grpo_run):
    """Before any step the policy is its reference (the reference is the starting policy): the
    held-out KL is 0.0 exactly with no forward; the one KL pass is the one after training."""
    _, run, calls = grpo_run
    summary = json.loads((run / "summary.json").read_text())
    assert summary["held_out_before"]["kl_to_reference"] == 0.0
    assert summary["held_out_after"]["kl_to_reference"] is not None
    assert len(calls) == 1  # after training only


def test_grpo_with_one_update_per_rollout_checkpoints_no_rollout_batches(grpo_run):
    """μ = 1: a checkpoint falls between rollouts, and resume samples the next rollout afresh, so
    the rollout's batches are not written (resume stays bitwise: tests/test_grpo.py)."""
    from safetensors.torch import load_file

    _, run, _ = grpo_run
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert load_file(str(checkpoint / "stage_state.safetensors")) == {}
    assert json.loads((checkpoint / "stage_state.json").read_text())["micro_batches"] == 0


def test_a_rollout_that_needs_its_batches_still_checkpoints_them(tmp_path):
    """GRPOStage.state_dict with μ = 2 part way through a rollout keeps its batches."""
    from posttrain.train.grpo import GRPOStage

    stage = GRPOStage.__new__(GRPOStage)
    stage.cfg = GRPOConfig.load(None, ["grpo.updates_per_rollout=2"])
    stage.position, stage.rollouts_done, stage.prompts_per_rollout, stage.rollout_metrics = (0, 0), 1, 2, {}
    stage.batches = [{"advantages": torch.ones(2)}]
    plain, tensors = stage.state_dict()
    assert plain["micro_batches"] == 1 and set(tensors) == {"0.advantages"}


# --------------------------------------------------------------------------- positions of the other models


def test_a_critic_with_fewer_positions_than_a_rollout_row_is_refused_up_front(tmp_path):
    """ppo.value_model=separate from a model whose position table is shorter than the longest
    prompt + rollout.max_new_tokens: a ConfigError naming the critic's setting, before training."""
    from posttrain.train.ppo import run_ppo

    critic = _small_table(tmp_path, 16)
    with pytest.raises(ConfigError, match=r"ppo\.value_model_path.*16 positions"):
        run_ppo(PPOConfig.load(None, [f"output_dir={tmp_path / 'run'}", *QUICK, "data.synthetic_size=64",
                                      "eval.prompts=0", "ppo.value_model=separate", f"ppo.value_model_path={critic}"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_retain_rows_longer_than_the_policys_positions_are_refused_up_front(tmp_path):
    """forgetting.retain_files rows are cut at data.max_prompt_length + rollout.max_new_tokens,
    which the prompts kept need not reach: a retain row past the policy's positions is a
    ConfigError naming forgetting.retain_files, before the retain loss is measured."""
    from posttrain.train.grpo import run_grpo

    policy = _small_table(tmp_path, 64)
    # distinct prompts: rows with one prompt go to one side of the retain split (pool or held out)
    rows = [{"messages": [{"role": "user", "content": "word " * 60 + f"n{i}"}, {"role": "assistant", "content": "ok"}]}
            for i in range(4)]
    (tmp_path / "retain.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ConfigError, match=r"forgetting\.retain_files.*64 positions"):
        run_grpo(GRPOConfig.load(None, [f"output_dir={tmp_path / 'run'}", *QUICK, f"model.path={policy}",
                                        "data.synthetic_size=64", "eval.prompts=0",
                                        f"forgetting.retain_files=[{tmp_path / 'retain.jsonl'}]"]))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# --------------------------------------------------------------------------- PPO's entropies


def test_ppos_rollout_pass_computes_no_entropy(monkeypatch):
    """The rollout-time pass (old log-probs and values) discards the entropy: it is not computed
    there; the training forward still logs it."""
    from posttrain.losses import language_modeling as lm
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.config import ModelConfig
    from posttrain.data.prompts import PromptRecord
    from posttrain.train.ppo import PPOLoss, PPOStage, ValueHead
    from posttrain.train.rollouts import Rollout, RolloutStats

    torch.manual_seed(0)
    tokenizer, model = load_tokenizer("tiny-2l"), load_model(ModelConfig(path="tiny-2l"))
    cfg = PPOConfig.load(None, ["train.batch_size=2", "eval.sample_every=0", "ppo.kl_coef=0"])
    module = PPOLoss(model, cfg.ppo, value_head=ValueHead(model.config.hidden_size))
    prompts, completions = [[1, 5, 9, 2], [1, 7], [1, 4, 4, 4, 3]], [[11, 12, 2], [13], [14, 15, 16, 17]]
    records = [PromptRecord([{"role": "user", "content": "x"}], "y", source="test:1")] * 3
    stage = PPOStage(module, prompts, records, cfg, tokenizer, score=None, run_dir=None)
    entropies = []
    for name in ("token_logps_and_entropy", "token_logps_with_entropy_value"):
        real = getattr(lm, name)
        monkeypatch.setattr(lm, name, lambda *a, _real=real, **k: entropies.append(1) or _real(*a, **k))
    batches = stage._batches(Rollout(prompts, completions, ["a", "b", "c"], records, torch.ones(3),
                                     RolloutStats(*[0.0] * 8)))
    assert entropies == []
    loss, metrics = module(**batches[0])
    assert len(entropies) == 1 and float(metrics["entropy"]) > 0
