"""An observer's walk: watching a long run, as an operator does while a job runs and after it ends.

Walked on the tiny preset, 2-3 steps a stage with `train.log_every=1`, `train.eval_every=2` and
`train.save_every=2`: `posttrain sft`, `dpo`, `rm` and `grpo` with stdout and stderr redirected to files
(a batch job's or CI's log), and the same stages through the Python API. Read: the console's lines
(the messages on stdout, the plain progress line on stderr), `metrics.jsonl` (each stage's metric
names against the README's lists; `lr` as the step's, `grad_norm` before clipping, `tokens_per_s` as
the step's tokens over its time, `step_time_s` covering the rollout of an RL step), `summary.json`,
`data_report.json`, the checkpoints' step numbers, `train.report_to` through accelerate's trackers
(tensorboard is not installed in this venv: the tracker here is a stand-in registered under its name),
and how `log_every`, `eval_every`, `save_every` and early stopping interleave.

Right, and seen right: no carriage return or bar redraw in a log file (the CLI turns transformers'
bars off); the logged lr is the one applied at that step (warmup 2: 1.5e-3 then 3e-3); grad_norm is
the norm before clipping (8.2 logged with max_grad_norm 1); the step numbers agree between the
console's `step N: eval loss`, metrics.jsonl, the checkpoints' directories and their loop state; the
eval lines come at the eval_every steps and at the end; every stage's README metric names are logged.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 32:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import ToyStage, _cfg, _run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _quiet_run(run, cfg) -> tuple[Path, str]:
    """run(cfg) with its stdout captured: (run directory, what it printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run_dir = run(cfg)
    return Path(run_dir), out.getvalue()


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory) -> tuple[Path, str]:
    """`posttrain grpo examples/grpo.yaml`, 2 steps of one rollout each (4 prompts x 4 samples,
    accumulated over 2 micro-batches), train.eval_every=1."""
    from posttrain.config import GRPOConfig
    from posttrain.train.grpo import run_grpo

    out = tmp_path_factory.mktemp("grpo") / "run"
    return _quiet_run(run_grpo, GRPOConfig.load("examples/grpo.yaml", [
        f"output_dir={out}", "train.max_steps=2", "train.log_every=1", "train.eval_every=1", "train.batch_size=8",
        "train.grad_accum=2", "train.progress_bar=false", "rollout.num_generations=4", "data.synthetic_size=60",
        "eval.prompts=2"]))


# --------------------------------------------------------------------------- defects


_KILLED_AT_TRAINING = """
import os, signal, sys
import posttrain.train.loop as loop
def killed(*args, **kwargs):  # the job is killed (the OOM killer, scancel's SIGKILL) as training begins
    os.kill(os.getpid(), signal.SIGKILL)
loop.train = killed
from posttrain.console import run
sys.argv = ["posttrain", *sys.argv[1:]]
raise SystemExit(run())
"""


def test_messages_on_stdout_reach_a_log_file_before_the_job_is_killed(tmp_path):
    """README: "stdout holds the messages". A batch job's stdout is a file: what posttrain printed before
    training (the trainable parameters, the data's length report, the exact match before training,
    which takes minutes on a real model) is in `tail -f job.out` as it is said, and survives the job
    being killed. RunLogger.message prints with flush=True; the `log` start_run hands the stages is a
    bare print, so those lines sit in the buffer: with eval_every=0 stdout shows nothing for the whole
    run, and a SIGKILL at the first step leaves the file empty."""
    script = tmp_path / "killed.py"
    script.write_text(_KILLED_AT_TRAINING)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONUNBUFFERED", None)
    out, err = tmp_path / "job.out", tmp_path / "job.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        rc = subprocess.run([sys.executable, str(script), "sft", "examples/sft_full.yaml",
                             f"output_dir={tmp_path / 'run'}", "train.max_steps=3", "data.synthetic_size=100",
                             "eval.exact_match_prompts=2"], stdout=o, stderr=e, stdin=subprocess.DEVNULL,
                            cwd=ROOT, env=env, timeout=300).returncode
    assert rc == -9, err.read_text()[-2000:]
    text = out.read_text()
    assert "trainable" in text and "exact match before training" in text, \
        f"the job's stdout after a kill at the first step holds {len(text)} bytes: {text[:300]!r}"


class _StandInTracker:
    """Made a GeneralTracker below: what accelerate hands to a tracker, recorded."""

    name = "tensorboard"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, run_name, logging_dir=None, **kwargs):
        super().__init__()
        self.calls = type(self).calls
        self.calls.append(("start", None, {}))

    @property
    def tracker(self):
        return self

    def store_init_configuration(self, values):
        pass

    def log(self, values, step=None, **kwargs):
        self.calls.append(("log", step, dict(values)))

    def finish(self):
        self.calls.append(("finish", None, {}))


def test_report_to_tensorboard_sends_each_logged_line_to_the_tracker_at_its_step(tmp_path, monkeypatch):
    """README: "train.report_to: [tensorboard] or [wandb] through accelerate's trackers". make_accelerator
    passes log_with=..., and RunLogger calls accelerator.log(numbers, step=...); but accelerate only
    creates (and logs to) its trackers in `init_trackers(project_name)`, which posttrain never calls:
    `accelerator.trackers` stays empty and a run with tensorboard installed writes no event file. The
    stand-in is registered as accelerate's "tensorboard" (the package itself is not installed here)."""
    import accelerate.tracking as tracking
    from accelerate.tracking import GeneralTracker
    from accelerate.utils import LoggerType

    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    stand_in = type("StandInTensorBoard", (_StandInTracker, GeneralTracker), {"calls": []})
    monkeypatch.setitem(sys.modules, "tensorboard", sys.modules.get("tensorboard") or types.ModuleType("tensorboard"))
    monkeypatch.setitem(tracking.LOGGER_TYPE_TO_CLASS, "tensorboard", stand_in)
    monkeypatch.setattr(tracking, "_available_trackers", [*tracking._available_trackers, LoggerType.TENSORBOARD])
    run_dir, _ = _quiet_run(run_sft, SFTConfig.load("examples/sft_full.yaml", [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.eval_every=1", "train.report_to=[tensorboard]",
        "train.progress_bar=false", "data.synthetic_size=100", "eval.exact_match_prompts=0"]))
    logged = [(step, values) for kind, step, values in stand_in.calls if kind == "log"]
    assert [step for step, values in logged if "loss" in values] == [1, 2], \
        f"the tracker got {len(stand_in.calls)} calls ({[c[0] for c in stand_in.calls]}) for a 2-step run"
    assert [step for step, values in logged if "eval_loss" in values] == [1, 2]
    by_step = {r["step"]: r for r in _records(run_dir) if "loss" in r}
    for step, values in logged:
        if "loss" in values:
            assert values["loss"] == by_step[step]["loss"] and values["lr"] == by_step[step]["lr"]


class _StoppedByMonitor(ToyStage):
    """A stage whose monitor (as forgetting.max_retain_increase's) stops the run at its first evaluation."""

    monitor_stop = "monitor"

    def monitor(self, module, accelerator):
        return {"probe": 1.0}, "the probe says stop"


def test_a_run_stopped_early_logs_the_steps_since_its_last_line(tmp_path):
    """log_every=4, eval_every=2, stopped by its monitor at step 2: metrics.jsonl holds the eval and the
    monitor's lines at step 2 and no training line at all. A run that reaches its last step logs it
    whatever log_every is (loop.py: `or state["step"] == total_steps`); one that stops early keeps the
    interval's sums in its final checkpoint and never writes them (the same with early stopping:
    patience 1, log_every 4, stopped at step 6: the last training line is step 4's)."""
    result = _run(_StoppedByMonitor(4, n_eval=4), _cfg(max_steps=8, log_every=4, eval_every=2), tmp_path)
    assert result.step == 2 and result.stop_reason == "monitor"
    lines = [r for r in _records(tmp_path) if "loss" in r]
    assert [(r["step"], r["steps_averaged"]) for r in lines] == [(2, 2)], \
        f"training lines of a run that stopped at step 2: {[(r['step'], r['steps_averaged']) for r in lines]}"


def test_grpo_train_eval_every_evaluates_or_says_it_does_not(grpo_run):
    """`train.eval_every`: "evaluate every N steps (0 = only at the end)". A GRPO run has no held-out loss
    (RolloutStage.eval_micro_batches is empty) and no monitor without forgetting.retain_files, so
    eval_every=1 is a silent no-op: no held-out figure at step 1 in metrics.jsonl, and no line says so
    (early_stopping_patience without held-out data gets one: "note: ... cannot stop the run"). The
    held-out reward the README describes (sampled, greedy, KL) is the natural figure to log at each
    evaluation; failing that, the run says eval_every is not used."""
    run_dir, printed = grpo_run
    evaluated = [r for r in _records(run_dir) if r.get("step") == 1 and "loss" not in r]
    assert evaluated or "eval_every" in printed, \
        f"metrics.jsonl at step 1: {[sorted(r) for r in _records(run_dir) if r.get('step') == 1]}; stdout: {printed!r}"


# --------------------------------------------------------------------------- right, untested


def test_grpo_step_time_covers_its_rollout_and_tokens_per_s_is_tokens_over_step_time(grpo_run):
    """An RL step's `step_time_s` is the whole step, the rollout it trains on generated and scored
    inside it (the stage's micro-batches are a generator that samples when asked), and
    `tokens_per_s` is the step's tokens over that time; `rollout/rollout_tokens_per_s` is the
    completions' tokens over the generation alone."""
    run_dir, _ = grpo_run
    lines = [r for r in _records(run_dir) if "loss" in r]
    assert [r["step"] for r in lines] == [1, 2]
    for r in lines:
        assert r["step_time_s"] >= r["rollout/rollout_s"] + r["rollout/reward_s"], r
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-9)
        completions = 16 * r["rollout/response_tokens_mean"]  # 4 prompts x 4 samples
        assert r["rollout/rollout_tokens_per_s"] == pytest.approx(completions / r["rollout/rollout_s"], rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["rollouts"] == 2


DPO_METRICS = {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracy", "logps/chosen",
               "logps/rejected"}


def test_dpo_console_metrics_and_checkpoints_agree_on_step_numbers_and_figures(tmp_path):
    """A 3-step DPO run, log_every=1, eval_every=2, save_every=2: the console's `step N: eval loss X`
    lines, metrics.jsonl's eval lines and the checkpoints are at steps 2 and 3 (eval_every, and the
    end), each checkpoint's loop state at its directory's step; every training line holds the README's
    DPO metrics and each eval line the same names as eval_*, its printed figures those of the line;
    the lr logged at a step is the cosine's for that step (3e-4 x 1, 0.75, 0.25), not the next one's;
    tokens_per_s is the step's tokens over its step time."""
    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    run_dir, printed = _quiet_run(run_dpo, DPOConfig.load("examples/dpo.yaml", [
        f"output_dir={tmp_path / 'run'}", "train.max_steps=3", "train.log_every=1", "train.eval_every=2",
        "train.save_every=2", "train.batch_size=4", "train.grad_accum=2", "train.progress_bar=false",
        "data.synthetic_size=60", "eval.exact_match_prompts=0"]))
    records = _records(run_dir)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == [1, 2, 3]
    assert [r["lr"] for r in train_lines] == pytest.approx([3e-4, 2.25e-4, 0.75e-4], rel=1e-9)
    for r in train_lines:
        assert DPO_METRICS <= set(r), sorted(r)
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["step_time_s"], rel=1e-9)
    printed_evals = re.findall(r"^step (\d+): eval loss ([0-9.]+)", printed, re.M)
    assert [int(step) for step, _ in printed_evals] == [r["step"] for r in eval_lines] == [2, 3]
    for (_, shown), line in zip(printed_evals, eval_lines):
        assert float(shown) == pytest.approx(line["eval_loss"], abs=5e-5)
        assert {f"eval_{name}" for name in DPO_METRICS} <= set(line), sorted(line)
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step-0000002", "step-0000003"]
    for name in checkpoints:
        assert json.loads((run_dir / "checkpoints" / name / "loop_state.json").read_text())["step"] == int(name[5:])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["eval_after"]["rewards/accuracy"] == eval_lines[-1]["eval_rewards/accuracy"]
