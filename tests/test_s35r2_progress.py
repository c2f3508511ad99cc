"""Progress and end-of-run lines (stop 35, round 2): the RL held-out KL said with its standard
error and caveat, messages routed through an open bar, the bar's clock started at the first step,
and an RL rollout's generation cost on its generating step's line alone."""

from __future__ import annotations

import io
import types

import pytest


def _said(figures: dict) -> str:
    from posttrain.train.rollouts import log_held_out

    lines: list[str] = []
    log_held_out(figures, "after", lines.append)
    (line,) = lines
    return line


FIGURES = {"reward": 0.5, "greedy_reward": 0.25, "prompts": 4, "samples": 2, "response_tokens": 3.0}


def test_a_negative_held_out_kl_is_said_with_its_standard_error_and_the_caveat():
    """The RL end-of-run line printed `KL to reference -0.105 per response` with no note; KL itself
    is never below 0, so it is said as evaluate's report says it (`report.kl_figure`)."""
    line = _said(FIGURES | {"kl_to_reference": -0.105, "kl_se": 0.08})
    assert ("KL to reference -0.105 ± 0.080 nats per response (a sampled estimate over 8 responses; "
            "within 2 standard errors of 0: sampling noise, as KL itself is never below 0)") in line
    far = _said(FIGURES | {"kl_to_reference": -0.5, "kl_se": 0.01})
    assert "more than 2 standard errors below 0" in far


def test_a_held_out_kl_without_a_standard_error_is_the_mean_alone():
    """Before training the policy is its reference (0, no forward): no standard error, no caveat."""
    assert _said(FIGURES | {"kl_to_reference": 0.0}).endswith("on 4 prompts; KL to reference 0.000 per response")
    assert "KL" not in _said(FIGURES | {"kl_to_reference": None})


def test_through_bar_writes_through_an_open_bar_and_else_says_it(monkeypatch):
    from posttrain.train import metrics

    said: list[str] = []
    message = metrics.through_bar(said.append)
    message("no bar")
    written: list[str] = []
    bar = types.SimpleNamespace(write=written.append)
    monkeypatch.setattr(metrics, "_open_bars", [bar])
    message("a bar")
    assert said == ["no bar"] and written == ["a bar"]


def test_the_bar_is_unregistered_when_its_log_closes(tmp_path, monkeypatch):
    from posttrain.train import metrics

    monkeypatch.setattr(metrics, "_interactive", lambda stream: True)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    logger = metrics.RunLogger(tmp_path, enabled=True, total_steps=3)
    assert metrics._open_bars == [logger.bar]
    started = logger.bar.start_t
    logger.start_clock()
    assert logger.bar.start_t >= started and logger.bar.last_print_t == logger.bar.start_t
    logger.close()
    assert metrics._open_bars == []


def test_the_plain_lines_clock_starts_again_at_start_clock(monkeypatch):
    from posttrain import console

    now = [0.0]
    monkeypatch.setattr(console, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    stream = io.StringIO()
    progress = console.Progress(4, "train: step", stream, unit="steps")
    now[0] = 100.0  # a long one-off start (EWC's Fisher)
    progress.start_clock()
    now[0] = 102.0
    progress.update(4)
    assert stream.getvalue() == "train: step 4/4 (2.00 steps/s, ETA 0s)\n"


def test_a_rollouts_generation_figures_go_to_the_step_that_generated_it_alone():
    """finish_metrics: the first step after `_sample` has the rollout's cost; the steps reusing it
    (and a resumed run's first, on a restored rollout) keep its descriptive figures only."""
    from posttrain.train.rollouts import RolloutStage

    stage = object.__new__(RolloutStage)
    stage.rollout_metrics = {"reward_mean": 0.5, "rollout_s": 0.2, "reward_s": 0.1, "rollout_tokens": 40,
                             "rollout_tokens_per_s": 200.0, "weight_sync_s": 0.01}
    stage.rollout_fresh = True
    first = stage.finish_metrics({"loss": 1.0})
    again = stage.finish_metrics({"loss": 0.9})
    assert first == {"loss": 1.0} | {f"rollout/{k}": v for k, v in stage.rollout_metrics.items()}
    assert again == {"loss": 0.9, "rollout/reward_mean": 0.5}


def test_a_line_over_several_steps_averages_the_generation_figures_over_the_steps_that_have_them():
    from posttrain.train.metrics import RATES, add_to_interval, close_interval

    interval: dict = {}
    rates = RATES | {"rollout/rollout_tokens_per_s": ("rollout/rollout_tokens", "rollout/rollout_s")}
    for step, record in enumerate([{"rollout/rollout_s": 0.2, "rollout/rollout_tokens": 40},
                                   {}, {"rollout/rollout_s": 0.6, "rollout/rollout_tokens": 80}, {}], 1):
        add_to_interval(interval, {"step": step, "loss": 1.0, "tokens": 10, "step_time_s": 1.0,
                                   "rollout/reward_mean": float(step)} | record
                        | ({"rollout/rollout_tokens_per_s": record["rollout/rollout_tokens"]
                            / record["rollout/rollout_s"]} if record else {}))
    line = close_interval(interval, rates)
    assert line["rollout/rollout_s"] == pytest.approx(0.4) and line["rollout/rollout_tokens"] == 60
    assert line["rollout/rollout_tokens_per_s"] == pytest.approx(120 / 0.8)
    assert line["rollout/reward_mean"] == pytest.approx(2.5) and line["steps_averaged"] == 4
