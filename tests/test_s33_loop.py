"""Stop 33, the loop's backlog: what a run stopped by a signal logs (the steps since the last line
reach metrics.jsonl as it stops, and the resumed run logs none of them twice), and that a rate
logged over several steps is their total over their total time (rollout tokens/s)."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from posttrain.errors import Stopped
from posttrain.train.loop import train
from posttrain.train.runs import make_accelerator
from posttrain.train.metrics import RunLogger
from tests.test_crash_safety import ToyStage, _cfg


def _lines(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _signal_at(monkeypatch, step: int, signum=signal.SIGINT):
    advance = RunLogger.advance

    def advance_then_signal(self, record):
        advance(self, record)
        if record["step"] == step:
            os.kill(os.getpid(), signum)  # the handler runs at once: the loop sees it at the step's end

    monkeypatch.setattr(RunLogger, "advance", advance_then_signal)
    return advance


def test_a_ctrl_c_logs_the_steps_since_the_last_line_and_the_resume_logs_none_of_them_twice(
        tmp_path, monkeypatch, capsys):
    """log_every 4, Ctrl-C at step 3 of 8: steps 1-3 are in metrics.jsonl as the run stops (they
    reached it only on resume, averaged into the line of step 4), and the console says their loss.
    The resumed run starts its next line afresh: its line at step 4 is step 4's alone, and every step
    is averaged into exactly one line."""
    run_dir = tmp_path / "run"
    cfg = _cfg(log_every=4, save_every=0, eval_every=0)
    advance = _signal_at(monkeypatch, 3)
    with pytest.raises(Stopped):
        train(ToyStage(), cfg, run_dir, make_accelerator(cfg, run_dir))
    out = capsys.readouterr().out
    lines = _lines(run_dir)
    assert [(r["step"], r["steps_averaged"]) for r in lines] == [(3, 3)]
    assert "interrupted: checkpoint saved at step 3 of 8; the same command" in out
    assert f"loss {lines[0]['loss']:.4f}" in out
    monkeypatch.setattr(RunLogger, "advance", advance)
    resumed = _cfg(log_every=4, save_every=0, eval_every=0, resume="auto")
    train(ToyStage(), resumed, run_dir, make_accelerator(resumed, run_dir))
    lines = [r for r in _lines(run_dir) if "loss" in r]
    assert [(r["step"], r["steps_averaged"]) for r in lines] == [(3, 3), (4, 1), (8, 4)]
    assert sum(r["steps_averaged"] for r in lines) == 8


def test_an_interrupt_on_a_logged_step_adds_no_line(tmp_path, monkeypatch):
    """Stopped on a step whose line was just written (log_every 2, step 2): nothing is left to log."""
    run_dir = tmp_path / "run"
    cfg = _cfg(log_every=2, save_every=0, eval_every=0)
    _signal_at(monkeypatch, 2, signal.SIGTERM)
    with pytest.raises(Stopped):
        train(ToyStage(), cfg, run_dir, make_accelerator(cfg, run_dir))
    assert [(r["step"], r["steps_averaged"]) for r in _lines(run_dir)] == [(2, 2)]


def test_rollout_tokens_per_s_over_several_steps_is_their_tokens_over_their_generation_time(tmp_path):
    """GRPO, one rollout a step, log_every 2: the line's rollout/rollout_tokens_per_s is the two
    rollouts' tokens over their generation seconds, not the mean of each rollout's rate (which
    weights a fast rollout's rate as much as a slow one's: higher than the real throughput)."""
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    run_dir = tmp_path / "run"
    run_grpo(GRPOConfig.load("examples/grpo.yaml", [
        f"output_dir={run_dir}", "train.max_steps=2", "train.log_every=2", "train.eval_every=0",
        "train.batch_size=8", "train.progress_bar=false", "rollout.num_generations=4", "data.synthetic_size=60",
        "eval.prompts=0", "rollout.max_new_tokens=8"]))
    [line] = [r for r in _lines(run_dir) if "loss" in r]
    assert line["steps_averaged"] == 2
    completions = 8  # a rollout: train.batch_size completions
    tokens = line["rollout/response_tokens_mean"] * completions  # the mean rollout's tokens
    assert line["rollout/rollout_tokens_per_s"] == pytest.approx(tokens / line["rollout/rollout_s"], rel=1e-9)


class _ManyMetrics(torch.nn.Module):
    """The toy's loss, and six metrics (DPO has six or seven): names out of order on purpose."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x, y):
        loss = self.inner(x, y)
        one = torch.ones((), dtype=loss.dtype) * len(y)
        names = ("rewards/margins", "logps/chosen", "rewards/accuracy", "logps/rejected", "rewards/chosen", "nll")
        return loss, {name: one * (i + 1) for i, name in enumerate(names)}


def test_the_console_eval_line_shows_every_held_out_metric_in_the_logs_order(tmp_path, capsys):
    """DPO's held-out figures are six or seven; the console's eval line showed the first four (in name
    order: logps/chosen, logps/rejected, nll, rewards/accuracy), never rewards/margins, the figure a DPO
    user watches. Every one is shown now, in the order metrics.jsonl holds them."""
    stage = ToyStage()
    stage.module = _ManyMetrics(stage.module)
    cfg = _cfg(max_steps=1, eval_every=1, save_every=0)
    train(stage, cfg, tmp_path, make_accelerator(cfg, tmp_path))
    [line] = [line for line in capsys.readouterr().out.splitlines() if "eval loss" in line]
    [record] = [r for r in _lines(tmp_path) if "eval_loss" in r]
    names = [key.removeprefix("eval_") for key in record if key.startswith("eval_") and key != "eval_loss"]
    assert len(names) == 6
    assert line == f"step 1: eval loss {record['eval_loss']:.4f}, " + ", ".join(
        f"{name} {record['eval_' + name]:.4g}" for name in names)


def _ppo(run_dir, *extra):
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import run_ppo

    return run_ppo(PPOConfig.load(None, [
        f"output_dir={run_dir}", "model.path=tiny-2l", "data.synthetic_size=60", "rollout.max_new_tokens=3",
        "train.batch_size=2", "ppo.minibatches=1", "ppo.kl_coef=0", "train.progress_bar=false", "eval.prompts=0",
        "train.save_every=1", "train.keep_last=4", "train.eval_every=0",
        "reward.functions=[c=tests.test_readme_claims_b:chars]",
        *extra]))


def _rollout_kept(run_dir, step: int) -> tuple[int, int]:
    """(micro-batches, tensors) of the rollout checkpoint `step` keeps."""
    from posttrain.train.checkpoint import load_stage_state, step_dir

    plain, tensors = load_stage_state(step_dir(run_dir / "checkpoints", step))
    return plain["micro_batches"], len(tensors)


def test_ppo_checkpoints_a_rollout_only_while_updates_on_it_remain(tmp_path):
    """ppo.epochs 2: the checkpoint after the first update keeps the rollout (the resume trains on it
    again), the one after the second keeps none (the resume samples the next). ppo.epochs 1 (one
    update a rollout) kept every rollout it had finished, never read again; a run resumed from such
    a checkpoint ends on the weights of an uninterrupted one."""
    import torch
    from safetensors.torch import load_file

    _ppo(tmp_path / "two", "ppo.epochs=2", "train.max_steps=2")
    assert _rollout_kept(tmp_path / "two", 1)[0] == 1 and _rollout_kept(tmp_path / "two", 2) == (0, 0)
    _ppo(tmp_path / "straight", "ppo.epochs=1", "train.max_steps=2")
    assert _rollout_kept(tmp_path / "straight", 1) == (0, 0)
    _ppo(tmp_path / "cut", "ppo.epochs=1", "train.max_steps=1")
    _ppo(tmp_path / "cut", "ppo.epochs=1", "train.max_steps=2", "train.resume=auto")
    whole, cut = (load_file(str(tmp_path / run / "final" / "model.safetensors")) for run in ("straight", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


@pytest.mark.parametrize("bars", [True, False])
def test_run_sft_from_python_writes_final_without_transformers_shard_bar_and_keeps_the_setting(
        tmp_path, capsys, bars):
    """A script calling run_sft saw transformers' "Writing model shards" bar as final/ was saved. It is
    hidden while final/ is written, and the caller's own setting for transformers' bars is back after."""
    from transformers.utils import logging as hf_logging

    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    before = hf_logging.is_progress_bar_enabled()
    hf_logging.enable_progress_bar() if bars else hf_logging.disable_progress_bar()
    try:
        run_sft(SFTConfig.load("examples/sft_full.yaml", [
            f"output_dir={tmp_path}", "train.max_steps=1", "train.progress_bar=false", "data.synthetic_size=32",
            "train.batch_size=4", "eval.exact_match_prompts=0"]))
        assert "Writing model shards" not in capsys.readouterr().err
        assert hf_logging.is_progress_bar_enabled() is bars
    finally:
        hf_logging.enable_progress_bar() if before else hf_logging.disable_progress_bar()


@pytest.mark.parametrize("grad_accum, expected", [
    (3, [0.5, 1.0, 1.5, 2.0]),  # 6 micro-batches an epoch, 3 a step: epoch 0 ends exactly at step 2
    (4, [0.6667, 1.0, 1.6667, 2.0]),  # 4 a step: step 2 reads the last 2 and tops up from the epoch's start
])
def test_epoch_is_the_fraction_of_epochs_read_whether_an_epoch_ends_exactly_or_is_topped_up(
        tmp_path, grad_accum, expected):
    """`epoch` in metrics.jsonl is the epochs read so far (micro-batches read / micro-batches an
    epoch, 4 decimals), as HF Trainer and TRL log it: 1.0 when the first epoch is done, however the
    last step of it was made. It was the 0-based epoch's index, and the step that ended epoch 0 read
    0 when the epoch ended exactly but 1 when it was topped up."""
    cfg = _cfg(max_steps=4, grad_accum=grad_accum, eval_every=0, save_every=0)
    train(ToyStage(), cfg, tmp_path, make_accelerator(cfg, tmp_path))
    assert [r["epoch"] for r in _lines(tmp_path) if "loss" in r] == expected
