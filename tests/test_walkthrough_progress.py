"""A progress walk: what a training run tells the person watching it, while it runs and when it ends.

Walked on the tiny preset, 2-4 steps a stage (`posttrain sft`, `dpo`, `rm`, `grpo`, `ppo`, SFT with
forgetting control), with stdout and stderr redirected to files (a batch job's log) and under a
pseudo-terminal (`script`, for tqdm's bar), with `train.grad_accum=2`, `train.log_every=2`,
`train.eval_every=2`, `train.epochs`, `grpo.updates_per_rollout=2` and `ppo.epochs=2`, and a run
resumed with more steps and rerun once finished. Read: the bar and the plain `train: step N/M (...)`
line with their rate and ETA, the console's eval and end-of-run lines, metrics.jsonl's `tokens`,
`tokens_per_s`, `step_time_s`, `epoch` and the RL `rollout/*` split, and summary.json's
`wall_seconds` across a resume.

Right, and seen right: the bar and the plain line count optimizer steps (`step 2/2` under
grad_accum 2), a resumed run's rate counts only its own steps, the plain line's loss and lr are the
last step's as metrics.jsonl holds them, and its ETA is the steps left over that rate (the README's
example line to the character); `tokens` are real tokens of the whole step (padding out; tested
elsewhere), `tokens_per_s` of a line over several steps is their tokens over their time; `epoch`
reads 1.0 at the end of an epoch under accumulation (3 steps of 2 micro-batches over 6); the
console's eval lines and the end-of-run figures are the last evaluation's, as summary.json's;
`wall_seconds` sums a resumed run's segments.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 35:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from test_loop import ToyStage, _cfg, _run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PLAIN_LINE = re.compile(r"^train: step (\d+)/(\d+) \(([\d.]+) steps/s, ETA (\S+), loss (\S+), lr (\S+)\)$")


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _quiet(run, cfg) -> Path:
    with contextlib.redirect_stdout(io.StringIO()):
        return Path(run(cfg))


# --------------------------------------------------------------------------- defects


class _SlowStart(ToyStage):
    """A stage whose `begin` (the loop's step-0 hook: forgetting's EWC Fisher, its distillation
    targets and retain loss) takes a second before the first step."""

    def begin(self, module, accelerator):
        time.sleep(1.0)
        return {}


def test_the_progress_rate_leaves_out_the_one_off_work_before_the_first_step(tmp_path, capsys):
    """README: "a progress bar with ETA ... (`train: step 120/1000 (2.10 steps/s, ETA 6m59s, ...`)".
    The rate is started when the log opens, before the stage's step-0 work (`Stage.begin`:
    forgetting's Fisher over `fisher_examples` rows, its distillation targets, the step-0 retain
    loss), so that work reads as step time. Seen on a terminal with `forgetting.ewc` and 200 Fisher
    rows: `1/3 [00:03<00:06, 3.12s/step]`, an ETA of 6 s for two steps that then took 0.2 s; off
    a terminal the plain line's rate is the mean since the log opened, so the error lasts the run.
    Here a 1 s start before 4 toy steps of a few ms."""
    stage = _SlowStart(batch_size=8)
    _run(stage, _cfg(max_steps=4, warmup_steps=0, progress_bar=True), tmp_path)
    lines = [m for m in map(PLAIN_LINE.match, capsys.readouterr().err.splitlines()) if m]
    assert lines and lines[-1].group(1, 2) == ("4", "4"), lines
    shown = float(lines[-1].group(3))
    steps_rate = 4 / sum(r["step_time_s"] for r in _records(tmp_path))
    assert shown >= 0.5 * steps_rate, (
        f"the line says {shown} steps/s; the 4 steps took {4 / steps_rate:.3f} s ({steps_rate:.0f} steps/s): "
        f"the 1 s before step 1 is in the rate")


def _rl_run(kind: str, tmp_path: Path) -> Path:
    """4 optimizer steps on 2 rollouts: PPO with ppo.epochs=2, or GRPO with updates_per_rollout=2."""
    from posttrain import GRPOConfig, PPOConfig, run_grpo, run_ppo

    common = [f"output_dir={tmp_path / kind}", "train.max_steps=4", "train.log_every=1", "train.eval_every=0",
              "train.progress_bar=false", "eval.prompts=2", "data.synthetic_size=60"]
    if kind == "ppo":
        return _quiet(run_ppo, PPOConfig.load("examples/ppo.yaml", common + ["train.batch_size=4", "ppo.epochs=2"]))
    return _quiet(run_grpo, GRPOConfig.load("examples/grpo.yaml", common + [
        "train.batch_size=8", "rollout.num_generations=4", "grpo.updates_per_rollout=2"]))


@pytest.mark.parametrize("kind", ["ppo", "grpo"])
def test_only_the_step_that_generated_a_rollout_reports_generation_time(kind, tmp_path):
    """README: "`rollout/rollout_s` and `rollout/reward_s` (the generation / scoring / update split),
    the tokens generated (`rollout/rollout_tokens`)". PPO takes `ppo.epochs` (default 4) optimizer
    steps on each rollout and GRPO `grpo.updates_per_rollout`; every one of those steps' lines
    repeats the rollout's `rollout_s`, `reward_s` and `rollout_tokens`, though only the first
    generated anything (measured, PPO: 4 lines each with rollout_s ~0.025 s for 2 rollouts; step 2's
    step_time_s 0.034 s holds no generation). Summing the lines (a dashboard's total generation time
    or tokens generated) gives ppo.epochs times the truth, and a reusing step's split reads more
    generation than its whole step under a slower engine."""
    run_dir = _rl_run(kind, tmp_path)
    rollouts = json.loads((run_dir / "summary.json").read_text())["rollouts"]
    lines = [r for r in _records(run_dir) if "loss" in r]
    generating = [r["step"] for r in lines if r.get("rollout/rollout_s")]
    assert len(lines) == 4 and rollouts == 2
    assert len(generating) == rollouts, (
        f"{rollouts} rollouts, but steps {generating} each report generation: "
        + "; ".join(f"step {r['step']}: rollout_s {r.get('rollout/rollout_s', 0):.4f}, "
                    f"rollout_tokens {r.get('rollout/rollout_tokens')}, step_time_s {r['step_time_s']:.4f}"
                    for r in lines))


def test_messages_said_during_training_do_not_land_on_the_progress_bars_line(tmp_path, monkeypatch):
    """On a terminal the loop's own messages go through the bar (`tqdm.write`: the bar is cleared,
    the message written, the bar drawn again), but those a stage says from its hooks inside the loop
    are plain prints: gradual unfreezing's `step N: gradual unfreezing trains ...` (each time a
    group joins), EWC's `EWC: the Fisher on N of the M pool rows` (at step 0). Seen under `script`:
    `train:   0%|   | 0/3 [00:00<?, ?step/s]EWC: the Fisher on 200 of the 240 pool rows`. Here
    the terminal is one buffer for stdout and stderr, as a terminal shows both, with the loop told
    stderr is a terminal."""
    from posttrain import SFTConfig, run_sft
    from posttrain.train import metrics

    monkeypatch.setattr(metrics, "_interactive", lambda stream: True)
    screen = io.StringIO()
    with contextlib.redirect_stdout(screen), contextlib.redirect_stderr(screen):
        run_sft(SFTConfig.load("examples/sft_full.yaml", [
            f"output_dir={tmp_path / 'sft'}", "train.max_steps=2", "train.batch_size=4", "train.eval_every=0",
            "data.synthetic_size=40", "eval.exact_match_prompts=0", "forgetting.unfreeze_every=1"]))
    shown = screen.getvalue()
    said = [m.start() for m in re.finditer(r"step \d+: gradual unfreezing trains", shown)]
    assert said, shown[-800:]
    glued = [re.split(r"[\r\n]", shown[:at])[-1] + shown[at:].split("\n")[0] for at in said
             if re.split(r"[\r\n]", shown[:at])[-1]]
    assert not glued, f"a message shares the bar's line: {glued}"


# --------------------------------------------------------------------------- right, untested


def test_the_plain_progress_line_of_a_resumed_run_is_the_readmes(monkeypatch):
    """Off a terminal the loop's progress is `console.Progress`: nothing before 10 s, then
    `train: step 120/1000 (2.10 steps/s, ETA 6m59s, loss 1.2345, lr 1.00e-04)`, the README's line
    to the character, for a run resumed at step 99 that ran 21 steps in 10 s: the rate counts this
    process's steps only (not the 99 the checkpoint holds) and the ETA is the 880 left over it."""
    from posttrain import console

    now = [0.0]
    monkeypatch.setattr(console, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    stream = io.StringIO()
    progress = console.Progress(1000, "train: step", stream, unit="steps", initial=99)
    now[0] = 9.0
    progress.update(110, extra="loss 1.0000, lr 1.00e-04")
    assert stream.getvalue() == ""  # at most a line every 10 s in a log file
    now[0] = 10.0
    progress.update(120, extra="loss 1.2345, lr 1.00e-04")
    assert stream.getvalue() == "train: step 120/1000 (2.10 steps/s, ETA 6m59s, loss 1.2345, lr 1.00e-04)\n"


def test_the_plain_line_counts_optimizer_steps_and_shows_the_last_steps_logged_figures(tmp_path, capsys):
    """SFT, batch 4 x grad_accum 2, 2 steps, stderr a log file: the last plain line is `step 2/2`
    (optimizer steps, not the 4 micro-batches), and its loss and lr are metrics.jsonl's step-2
    figures at 4 decimals and 3 significant digits; `epoch` counts micro-batches read."""
    from posttrain import SFTConfig, run_sft

    run_dir = Path(run_sft(SFTConfig.load("examples/sft_full.yaml", [
        f"output_dir={tmp_path / 'sft'}", "train.max_steps=2", "train.batch_size=4", "train.grad_accum=2",
        "train.log_every=1", "train.eval_every=0", "data.synthetic_size=40", "eval.exact_match_prompts=0"])))
    captured = capsys.readouterr()
    lines = [m for m in map(PLAIN_LINE.match, captured.err.splitlines()) if m]
    last = [r for r in _records(run_dir) if "loss" in r][-1]
    assert lines, "no plain progress line on stderr"
    assert lines[-1].group(1, 2, 4) == ("2", "2", "0s")
    assert lines[-1].group(5, 6) == (f"{last['loss']:.4f}", f"{last['lr']:.2e}")
    rows = int(re.search(r"^train: \d+ of (\d+) examples", captured.out, re.M).group(1))
    per_epoch = -(-rows // 4)  # the training rows (40 less the held-out ones) in micro-batches of 4
    assert last["step"] == 2 and last["epoch"] == pytest.approx(round(4 / per_epoch, 4)), last
