"""Stop 32, the observer's fixes beyond the pinned walkthrough tests: stdout line-buffered off a
terminal, train.report_to's trackers started with the run's flat config (TensorBoard's events after
a resumed checkpoint hidden), the steps since the last line logged when a run stops early, and the
RL stages' held-out reward at each evaluation (and a note where eval_every has nothing to evaluate)."""

from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import ToyStage, _cfg, _run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------- stdout


def test_line_buffered_turns_a_file_stream_line_buffered_and_leaves_the_rest(tmp_path):
    from posttrain.console import line_buffered

    with open(tmp_path / "job.out", "w") as stream:
        assert not stream.line_buffering
        line_buffered(stream)
        assert stream.line_buffering
        stream.write("said\n")
        assert (tmp_path / "job.out").read_text() == "said\n"  # in the file before any flush or close

    line_buffered(io.StringIO())  # no reconfigure: left as it is

    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True

    tty = Terminal(io.BytesIO())
    line_buffered(tty)
    assert not tty.line_buffering  # a terminal's own buffering is kept


# --------------------------------------------------------------------------- trackers


class _Accelerator:
    def __init__(self):
        self.calls = []

    def init_trackers(self, project_name, config=None, init_kwargs=None):
        self.calls.append((project_name, config, init_kwargs))


def test_trackers_get_the_flat_scalar_config_and_tensorboard_purges_from_the_first_step_logged(tmp_path):
    from posttrain.train import checkpoint
    from posttrain.train.runs import _start_trackers

    recorded = {"output_dir": "runs/x", "train": {"lr": 1e-4, "report_to": ["tensorboard"], "bf16": True},
                "data": {"train_files": ["a.jsonl"], "max_length": 64, "template": None, "sub": {"k": "v"}}}
    accelerator = _Accelerator()
    _start_trackers(accelerator, tmp_path / "my-run", recorded, None)
    name, config, kwargs = accelerator.calls[-1]
    assert name == "my-run"
    assert config == {"output_dir": "runs/x", "train.lr": 1e-4, "train.bf16": True, "data.max_length": 64,
                      "data.sub.k": "v"}
    assert kwargs == {"tensorboard": {"purge_step": 0}}  # a fresh start: an earlier run's events hidden

    saved = tmp_path / "step-0000006"
    saved.mkdir()
    (saved / checkpoint.LOOP_STATE).write_text(json.dumps({"step": 6}))
    _start_trackers(accelerator, tmp_path / "my-run", recorded, saved)
    assert accelerator.calls[-1][2] == {"tensorboard": {"purge_step": 7}}  # steps 1-6 kept, 7 on logged again


# --------------------------------------------------------------------------- early stops


def test_an_early_stop_by_patience_logs_the_steps_since_the_last_line_and_a_resume_goes_on_from_there(tmp_path):
    """log_every 4, eval_every 2, patience 1: stopped at step 6, whose line holds steps 5-6; the
    checkpoint holds no interval, so a resume with patience off logs 7-8 and 9-12, not 5-8."""
    result = _run(ToyStage(4, n_eval=8), _cfg(max_steps=16, log_every=4, eval_every=2, early_stopping_patience=1,
                                              lr=0.5), tmp_path)
    assert (result.step, result.stop_reason) == (6, "patience")
    lines = [(r["step"], r["steps_averaged"]) for r in _records(tmp_path) if "loss" in r]
    assert lines == [(4, 4), (6, 2)]
    _run(ToyStage(4, n_eval=8), _cfg(max_steps=12, log_every=4, eval_every=2, lr=0.5, resume="auto"), tmp_path)
    lines = [(r["step"], r["steps_averaged"]) for r in _records(tmp_path) if "loss" in r]
    assert lines == [(4, 4), (6, 2), (8, 2), (12, 4)]


def test_eval_every_without_held_out_data_says_nothing_is_evaluated(tmp_path, capsys):
    _run(ToyStage(8), _cfg(max_steps=2, eval_every=1), tmp_path / "a")
    assert "note: train.eval_every=1 has no held-out data" in capsys.readouterr().out
    _run(ToyStage(8, n_eval=8), _cfg(max_steps=2, eval_every=1), tmp_path / "b")
    assert "train.eval_every" not in capsys.readouterr().out


# --------------------------------------------------------------------------- RL held-out reward


def test_grpo_logs_its_held_out_reward_at_each_evaluation_and_measures_the_last_once(tmp_path, monkeypatch):
    """eval_every=1, 2 steps: eval_reward, eval_greedy_reward, eval_kl_to_reference and
    eval_response_tokens at steps 1 and 2; summary.json's held_out_after is step 2's figures, not
    measured again (held_out_reward runs 3 times: before, step 1, step 2); the training losses are
    those of a run that evaluates only at the end (the evaluations draw nothing from its RNG)."""
    import posttrain.train.rollouts as rollouts
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    monkeypatch.chdir(ROOT)
    calls = []
    measure = rollouts.held_out_reward
    monkeypatch.setattr(rollouts, "held_out_reward", lambda *a, **k: calls.append(1) or measure(*a, **k))

    def run(eval_every: int, name: str) -> Path:
        out = tmp_path / name
        with contextlib.redirect_stdout(io.StringIO()):
            run_grpo(GRPOConfig.load("examples/grpo.yaml", [
                f"output_dir={out}", "train.max_steps=2", "train.log_every=1", f"train.eval_every={eval_every}",
                "train.batch_size=8", "train.grad_accum=2", "train.progress_bar=false", "rollout.num_generations=4",
                "data.synthetic_size=60", "eval.prompts=2", "reward.format_regex=.*[a-k].*", "train.lr=3e-3"]))
        return out

    every = run(1, "every")
    assert len(calls) == 3
    evals = [r for r in _records(every) if "loss" not in r]
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert {"eval_reward", "eval_greedy_reward", "eval_kl_to_reference", "eval_response_tokens"} <= set(r)
    after = json.loads((every / "summary.json").read_text())["held_out_after"]
    assert after["reward"] == evals[-1]["eval_reward"] and after["kl_to_reference"] == evals[-1]["eval_kl_to_reference"]
    at_end = run(0, "end")
    assert [r["step"] for r in _records(at_end) if "loss" not in r] == [2]
    losses = [[r["loss"] for r in _records(d) if "loss" in r] for d in (every, at_end)]
    assert losses[0] == pytest.approx(losses[1], abs=0, rel=0) and any(losses[0])
