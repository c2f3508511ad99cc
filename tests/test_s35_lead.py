"""Stop 35, the lead's own fixes: a run whose passes over the data end short of its planned steps
(PPO's KL early stop under train.epochs) logs the steps after its last line."""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_run_ending_its_passes_short_of_the_plan_logs_its_last_steps(tmp_path, monkeypatch):
    """6 of 12 planned steps (3 rollouts a pass, early_stop_kl cutting each to 2 of its 4 updates),
    log_every 4: the line for step 6 was never written (measured: a line at step 4 only)."""
    from posttrain.config import PPOConfig
    from posttrain.train.ppo import run_ppo

    monkeypatch.chdir(ROOT)  # tests.rewards_fixture is imported from the repository root
    run = run_ppo(PPOConfig.load(None, [
        f"output_dir={tmp_path / 'ppo'}", "data.synthetic_size=12", "rollout.max_new_tokens=3", "train.batch_size=4",
        "ppo.minibatches=1", "ppo.epochs=4", "ppo.early_stop_kl=1e-9", "train.max_steps=0", "train.epochs=1",
        "train.log_every=4", "train.progress_bar=false", "eval.prompts=0",
        "reward.functions=[short=tests.rewards_fixture:short]"]))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["step"], r["steps_averaged"]) for r in lines if "loss" in r]
    assert logged == [(4, 4), (6, 2)], logged


def test_sigterm_stops_a_data_command_as_ctrl_c_does_with_143(tmp_path):
    """A feedback job, quality or a training run's data preparation died silently on SIGTERM
    (Python's default: no message); now it says what the same command does and exits 143, and the
    handler before is put back."""
    import signal
    import sys
    import subprocess

    code = ("import os, signal, sys\n"
            "from posttrain import cli\n"
            "def fake_run(args):\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    raise AssertionError('not stopped')\n"
            "cli._run = fake_run\n"
            "before = signal.getsignal(signal.SIGTERM)\n"
            "code = cli.main(['rlaif', 'x.yaml'])\n"
            "assert signal.getsignal(signal.SIGTERM) is before\n"
            "sys.exit(code)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 128 + signal.SIGTERM, done.stderr
    assert "terminated; the same command resumes from what its log holds" in done.stderr


def test_a_temperature_that_samples_greedily_is_refused_where_samples_are_needed():
    """Sampling is greedy below 1e-5 (rollout.is_greedy, vLLM's cut-off): a GRPO run at 1e-6 would
    draw one completion a group, every advantage 0; it passed the old `> 0` check."""
    import pytest

    from posttrain.config import GRPOConfig
    from posttrain.config.rl import validate_grpo
    from posttrain.errors import ConfigError
    from posttrain.rollout import is_greedy

    assert is_greedy(0) and is_greedy(1e-6) and not is_greedy(1e-5)
    with pytest.raises(ConfigError, match="rollout.temperature must be at least 1e-05"):
        validate_grpo(GRPOConfig.load(None, ["rollout.temperature=1e-6"]))
    validate_grpo(GRPOConfig.load(None, ["rollout.temperature=0.7"]))
