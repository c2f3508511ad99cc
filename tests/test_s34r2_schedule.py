"""Schedule and run bookkeeping (stop 34): a train.epochs resume with another group plans from its data
position (fractional epochs too, and says so), a resume through settings an older version recorded otherwise
for the same training, and the run directory's lock freed by a stage that fails before the loop."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import posttrain as P
from posttrain.errors import ConfigError, UserError
from posttrain.train import runs
from posttrain.train.loop import plan_total_steps, train
from posttrain.train.runs import _check_same_run, make_accelerator, run_fingerprint
from tests.test_walkthrough_schedule import _records, _Stage  # 16 rows in file order, micro-batches of 2
from tests.test_walkthrough_schedule import _train_cfg as _cfg

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the plan of a train.epochs resume


def test_a_fractional_epochs_run_resumed_with_another_grad_accum_reads_the_rest_once_and_says_so(tmp_path, capsys):
    """train.epochs=1.5 over 8 micro-batches at grad_accum 1 plans 12 steps; a checkpoint at step 4 (half the
    first epoch), then grad_accum 2: the rest of the first epoch is 2 steps, half the second 2 more, so the
    run ends at step 8, having read rows 8..15 and then 0..7, at epoch 1.5; a line names the new plan."""
    cfg = _cfg(epochs=1.5, grad_accum=1, save_every=4, resume="never")
    with pytest.raises(RuntimeError, match="killed"):
        train(_Stage(16, 2, crash_at=5), cfg, tmp_path, make_accelerator(cfg, tmp_path))
    capsys.readouterr()
    resumed = _Stage(16, 2)
    cfg = _cfg(epochs=1.5, grad_accum=2, save_every=4, resume="auto")
    result = train(resumed, cfg, tmp_path, make_accelerator(cfg, tmp_path))
    assert result.step == 8 and resumed.module.seen == list(range(8, 16)) + list(range(8))
    assert _records(tmp_path)[-1]["epoch"] == 1.5
    out = capsys.readouterr().out
    assert ("train.epochs=1.5 at 2 micro-batch(es) a step (the checkpoint's run: train.epochs=1.5 at 1, 12 steps "
            "planned): 4 more step(s) from the checkpoint's data position, to step 8") in out


def test_a_resume_under_the_same_plan_keeps_the_planned_steps_and_another_epochs_plans_from_the_position():
    """The same group, epochs and epoch length: the checkpoint's own count (an uninterrupted run's), even
    where the step is behind the data position (an epoch the stage cut short). train.epochs raised from 1 to 2
    at the same group: the position's step + the rest, what a fresh plan of 2 epochs counts."""
    stage, cfg = _Stage(16, 2), _cfg(epochs=1.0)
    assert plan_total_steps(stage, cfg, 1) == 8
    cut = {"step": 3, "epoch": 1, "micro_in_epoch": 0, "planned": [1, 1.0, 8, 8]}
    assert plan_total_steps(stage, cfg, 1, cut) == 8
    assert plan_total_steps(stage, _cfg(epochs=2.0), 1, {"step": 5, "epoch": 0, "micro_in_epoch": 5,
                                                       "planned": [1, 1.0, 8, 8]}) == 16
    # a checkpoint written before the plan was kept: the rule from the position, the same count at one group
    assert plan_total_steps(stage, _cfg(epochs=3.0), 2, {"step": 6, "epoch": 1, "micro_in_epoch": 4}) == 12


# --------------------------------------------------------------------------- settings recorded otherwise earlier


def _checkpoint(tmp_path: Path, fingerprint: dict) -> Path:
    directory = tmp_path / "step-0000001"
    directory.mkdir(exist_ok=True)
    (directory / "loop_state.json").write_text(json.dumps({"step": 1, "fingerprint": fingerprint}))
    return directory


def _dpo_fingerprint(**dpo) -> dict:
    return run_fingerprint(P.DPOConfig.from_dict({"output_dir": "x", "model": {"path": "tiny"}, "dpo": dpo}))


def test_a_cdpo_checkpoint_that_recorded_its_label_smoothing_unset_resumes(tmp_path):
    """Before ε was resolved a cdpo run recorded dpo.label_smoothing null and trained with 0.1, which it now
    records: the same training, resumed. ε = 0.2 against a null is another training: refused, naming it."""
    now = _dpo_fingerprint(loss="cdpo")
    assert now["dpo.label_smoothing"] == 0.1
    _check_same_run(_checkpoint(tmp_path, now | {"dpo.label_smoothing": None}), now)  # no error
    other = _dpo_fingerprint(loss="cdpo", label_smoothing=0.2)
    with pytest.raises(ConfigError, match="dpo.label_smoothing: null → 0.2"):
        _check_same_run(_checkpoint(tmp_path, other | {"dpo.label_smoothing": None}), other)


def test_an_older_checkpoints_simpo_gamma_of_a_dpo_run_resumes(tmp_path):
    now = _dpo_fingerprint(loss="dpo")
    assert now["dpo.simpo_gamma"] is None
    _check_same_run(_checkpoint(tmp_path, now | {"dpo.simpo_gamma": 0.5}), now)  # no error
    with pytest.raises(ConfigError, match="dpo.simpo_gamma: 0.7 → null"):
        _check_same_run(_checkpoint(tmp_path, now | {"dpo.simpo_gamma": 0.7}), now)


# --------------------------------------------------------------------------- the lock of a stage that fails


def _stage_run(stage: str, out: Path):
    quiet = {"max_steps": 1, "batch_size": 4, "progress_bar": False}
    if stage in ("grpo", "ppo"):
        config = P.GRPOConfig if stage == "grpo" else P.PPOConfig
        run = P.run_grpo if stage == "grpo" else P.run_ppo
        return run, config.load(None, [f"output_dir={out}", "data.synthetic_size=12", "rollout.max_new_tokens=3",
                                       "train.batch_size=4", "train.max_steps=1", "train.progress_bar=false",
                                       "eval.prompts=0", "reward.functions=[short=tests.rewards_fixture:short]"]
                                 + (["rollout.num_generations=2"] if stage == "grpo" else []))
    config, run = {"sft": (P.SFTConfig, P.run_sft), "dpo": (P.DPOConfig, P.run_dpo), "rm": (P.RMConfig, P.run_rm)}[stage]
    return run, config.from_dict({"output_dir": str(out), "model": {"path": "tiny"},
                                  "data": {"train_files": ["synthetic"], "synthetic_size": 16, "max_length": 32},
                                  "train": quiet})


def _free(run_dir: Path) -> bool:
    """Not held by this process, and another thread can take it."""
    errors = []

    def other() -> None:
        try:
            runs._lock_run_dir(run_dir)
            runs.release_run_dir(run_dir)
        except UserError as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(30)
    return run_dir.resolve() not in runs._HELD and not errors


@pytest.mark.parametrize("stage", ["sft", "dpo", "rm", "grpo", "ppo"])
def test_a_stage_whose_model_fails_to_load_frees_its_run_directory(stage, tmp_path, monkeypatch):
    """start_run takes run_dir/.lock; a failure before train() (here the model's load) releases it at once,
    not at this thread's next run."""
    import posttrain.train.reward as reward
    import posttrain.train.sft as sft

    monkeypatch.chdir(ROOT)  # tests.rewards_fixture

    def broken(*args, **kwargs):
        raise RuntimeError("the model did not load")

    monkeypatch.setattr(reward if stage == "rm" else sft, "build_reward_model" if stage == "rm" else "build_model",
                        broken)
    run, cfg = _stage_run(stage, tmp_path / "run")
    with pytest.raises(RuntimeError, match="the model did not load"):
        run(cfg)
    assert (tmp_path / "run" / ".lock").is_file() and _free(tmp_path / "run")


def test_ppo_failing_after_its_policy_loaded_frees_its_run_directory(tmp_path, monkeypatch):
    """After start_rl_run returned (the policy loaded): the value model fails to build."""
    import posttrain.train.ppo as ppo

    monkeypatch.chdir(ROOT)

    def broken(*args, **kwargs):
        raise RuntimeError("no critic")

    monkeypatch.setattr(ppo, "build_value_model", broken)
    run, cfg = _stage_run("ppo", tmp_path / "run")
    with pytest.raises(RuntimeError, match="no critic"):
        run(cfg)
    assert _free(tmp_path / "run")


def test_a_release_from_another_thread_leaves_that_threads_run_alone(tmp_path):
    """release_run_dir frees this thread's run only: a stage's second release (after finish_run) cannot free
    a run another thread took meanwhile."""
    run = tmp_path / "run"
    run.mkdir()
    runs._lock_run_dir(run)
    thread = threading.Thread(target=runs.release_run_dir, args=(run,))
    thread.start()
    thread.join(30)
    assert run.resolve() in runs._HELD
    runs.release_run_dir(run)
    assert run.resolve() not in runs._HELD
