"""Training numerics (s30): per-token figures summed as the loss, rewards within float32's range."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from posttrain.losses.policy_gradient import clipped_policy_loss, clipped_value_loss, masked_mean
from posttrain.train.rollouts import summed_figure

ROOT = Path(__file__).resolve().parents[1]
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_per_token_figures_agree_with_the_token_means_and_are_zero_on_padding():
    g = torch.Generator().manual_seed(0)
    logps, old = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    _, metrics = clipped_policy_loss(logps, old, torch.randn(2, 1, generator=g), MASK, 0.2)
    assert float(masked_mean(metrics["clipped_tokens"], MASK)) == pytest.approx(float(metrics["clip_fraction"]))
    assert float(masked_mean(metrics["approx_kl_tokens"], MASK)) == pytest.approx(float(metrics["approx_kl"]))
    _, value_metrics = clipped_value_loss(logps, old, torch.randn(2, 4, generator=g), MASK, 0.1)
    assert float(masked_mean(value_metrics["value_clipped_tokens"], MASK)) == pytest.approx(
        float(value_metrics["value_clip_fraction"]))
    for per_token in (metrics["clipped_tokens"], metrics["approx_kl_tokens"], value_metrics["value_clipped_tokens"]):
        assert torch.equal(per_token * (1 - MASK), torch.zeros(2, 4))


def test_summed_figure_weighs_tokens_or_responses_as_the_loss_does():
    values = torch.tensor([[1.0, 0.0, 1.0, 5.0], [1.0, 7.0, 7.0, 7.0]]) * MASK
    mean = masked_mean(values, MASK)
    assert float(summed_figure(values, mean, MASK, "token")) == pytest.approx(3.0)  # Σ over the 4 tokens
    assert float(summed_figure(values, mean, MASK, "sequence")) == pytest.approx(2 / 3 + 1)  # Σ of response means


def test_a_weighted_total_beyond_float32_range_is_refused_before_a_step(tmp_path, monkeypatch):
    """Each component is within range; its weighted total is not: refused with the response named."""
    from posttrain.config import GRPOConfig
    from posttrain.errors import DataError
    from posttrain.train.grpo import run_grpo

    monkeypatch.chdir(ROOT)
    (tmp_path / "s30_trainnum_reward.py").write_text("def big(prompt, response):\n    return 1e30\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = GRPOConfig.load(None, [
        f"output_dir={tmp_path / 'run'}", "model.path=tiny-2l", "data.synthetic_size=40", "rollout.max_new_tokens=4",
        "train.batch_size=8", "rollout.num_generations=4", "train.max_steps=2", "train.resume=never",
        "train.progress_bar=false", "eval.prompts=0", "reward.functions=[big=s30_trainnum_reward:big]",
        "reward.weights=[big=1e10]"])
    with pytest.raises(DataError, match="beyond float32's range: lower reward.weights"):
        run_grpo(cfg)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or not (tmp_path / "run" / "metrics.jsonl").read_text()
