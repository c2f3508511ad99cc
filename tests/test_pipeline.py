"""`posttrain pipeline`: stages wired output to input, validated before any training, skipped
when complete and unchanged, rerun (only where needed) when a config or an input changed,
resumed from their own checkpoints when interrupted."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.errors import ConfigError
from posttrain.pipeline import STATE_FILE, Stage, load_pipeline, plan, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
FAST = {"train.progress_bar": False, "train.schedule": "constant"}
SFT = {"name": "sft", "kind": "sft", "overrides": {
    "data.synthetic_size": 64, "data.synthetic_tasks": ["smallest"], "data.max_length": 64, "train.max_steps": 3,
    "train.batch_size": 8, "train.lr": 3e-3}}
DPO = {"name": "dpo", "kind": "dpo", "overrides": [
    "data.synthetic_size=32", "data.max_length=64", "train.max_steps=2", "train.batch_size=4", "train.lr=1e-3",
    "train.save_every=1"]}


def write_pipeline(tmp_path: Path, stages: list[dict], name: str = "pipe.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "overrides": FAST, "stages": stages}))
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def mtime(path: Path) -> int:
    return path.stat().st_mtime_ns


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).abs().sum()) for k in a)


def test_sft_then_dpo_runs_skips_reruns_only_what_changed_and_resumes(tmp_path, capsys):
    from posttrain.models.presets import preset_path

    out = tmp_path / "out"
    path = write_pipeline(tmp_path, [SFT, DPO])
    run_pipeline(path)
    sft_final, dpo_final = out / "sft" / "final", out / "dpo" / "final"
    # The DPO stage started from the SFT stage's final weights, not from the preset the SFT stage started from.
    assert yaml.safe_load((out / "dpo" / "config.yaml").read_text())["model"]["path"] == str(sft_final)
    tiny, sft, dpo = weights(preset_path("tiny")), weights(sft_final), weights(dpo_final)
    assert distance(sft, tiny) > 0
    assert distance(dpo, sft) < 0.5 * distance(dpo, tiny)  # measured 1336 vs 5038 summed |Δw|
    stamps = {p: mtime(p / "model.safetensors") for p in (sft_final, dpo_final)}
    capsys.readouterr()

    run_pipeline(path)  # everything complete and unchanged: nothing trains
    printed = capsys.readouterr().out
    assert printed.count("skipped: complete") == 2 and "eval loss" not in printed
    assert {p: mtime(p / "model.safetensors") for p in stamps} == stamps

    run_pipeline(path, ["dpo.dpo.beta=0.2"])  # stage 2's config changed: only stage 2 reruns, afresh
    printed = capsys.readouterr().out
    assert "sft (sft): skipped" in printed and "its config changed (dpo.beta: 0.1 -> 0.2)" in printed
    assert mtime(sft_final / "model.safetensors") == stamps[sft_final]
    assert mtime(dpo_final / "model.safetensors") != stamps[dpo_final]
    assert yaml.safe_load((out / "dpo" / "config.yaml").read_text())["dpo"]["beta"] == 0.2
    assert "resumed from" not in printed  # a changed config never resumes the old run's checkpoints
    rerun = weights(dpo_final)

    shutil.rmtree(dpo_final)  # interrupted between its last checkpoint and its final model
    run_pipeline(path, ["dpo.dpo.beta=0.2"])
    printed = capsys.readouterr().out
    assert "dpo (dpo): resuming" in printed and "resumed from" in printed and "sft (sft): skipped" in printed
    resumed = weights(dpo_final)
    assert all(torch.equal(resumed[k], rerun[k]) for k in rerun)

    shutil.rmtree(sft_final)  # stage 1 reruns, so stage 2, which reads its output, reruns afresh
    run_pipeline(path, ["dpo.dpo.beta=0.2"])
    printed = capsys.readouterr().out
    assert "sft (sft): resuming" in printed and "dpo (dpo): running: it uses the output of sft" in printed
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert state["dpo"]["inputs"] == {"sft": state["sft"]["run_id"]} and state["dpo"]["status"] == "done"

    run_pipeline(path, ["dpo.dpo.beta=0.2"], restart=True, only="dpo", dry_run=True)
    printed = capsys.readouterr().out
    assert "sft (sft): not selected: --only dpo" in printed and "dpo (dpo): running: --restart" in printed


def test_an_interrupted_stage_resumes_from_its_own_checkpoint(tmp_path, capsys, monkeypatch):
    """The process dies after the stage's step-1 checkpoint (of 2): the next invocation resumes at step 1."""
    import copy

    from posttrain import cli
    from posttrain.train.preference import run_dpo

    def dies_after_one_step(cfg):
        short = copy.deepcopy(cfg)
        short.train.max_steps = 1
        run_dpo(short)
        raise KeyboardInterrupt

    from posttrain.config import DPOConfig

    path = write_pipeline(tmp_path, [DPO])
    monkeypatch.setitem(cli._STAGES, "dpo", lambda: (DPOConfig, dies_after_one_step))
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path)
    assert json.loads((tmp_path / "out" / STATE_FILE).read_text())["stages"]["dpo"]["status"] == "running"
    monkeypatch.undo()
    capsys.readouterr()
    run_pipeline(path)
    printed = capsys.readouterr().out
    assert "dpo (dpo): resuming: it was interrupted" in printed and "at step 1" in printed
    steps = [json.loads(line)["step"] for line in (tmp_path / "out" / "dpo" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2]
    assert json.loads((tmp_path / "out" / "dpo" / "summary.json").read_text())["steps"] == 2


def test_sft_rm_grpo_wires_the_reward_model_into_the_rl_stage(tmp_path):
    out = tmp_path / "out"
    rm = {"name": "rm", "kind": "rm",
          "overrides": ["data.synthetic_size=32", "train.max_steps=2", "train.batch_size=4"]}
    grpo = {"name": "grpo", "kind": "grpo", "inputs": {"reward.models": ["helpful=rm"]}, "overrides": {
        "reward.functions": [], "data.synthetic_size": 32, "rollout.max_new_tokens": 3, "rollout.num_generations": 4,
        "train.batch_size": 8, "train.max_steps": 2, "eval.prompts": 0}}
    run_pipeline(write_pipeline(tmp_path, [SFT, rm, grpo]))
    config = lambda name: yaml.safe_load((out / name / "config.yaml").read_text())
    assert config("rm")["model"]["path"] == str(out / "sft" / "final")  # InstructGPT: the RM starts from SFT
    assert config("grpo")["model"]["path"] == str(out / "sft" / "final")  # the latest policy, not the RM
    assert config("grpo")["reward"]["models"] == [f"helpful={out / 'rm' / 'final'}"]
    assert json.loads((out / "grpo" / "summary.json").read_text())["steps"] == 2
    # The rollouts were scored by the rm stage's model: rescoring logged samples with it gives their rewards.
    from posttrain.rewards import build_combined

    rows = [json.loads(line) for line in (out / "grpo" / "samples.jsonl").read_text().splitlines()][:4]
    rescored = build_combined([str(out / "rm" / "final")], [], [], [])(
        [[{"role": "user", "content": r["prompt"]}] for r in rows], [r["completion"] for r in rows])
    assert rescored == pytest.approx([r["reward"] for r in rows], abs=1e-5)


def test_a_lora_policy_is_merged_for_the_stage_that_starts_from_it(tmp_path, capsys):
    from posttrain.models.presets import preset_path

    out = tmp_path / "out"
    lora_sft = {**SFT, "overrides": {**SFT["overrides"], "adapter.method": ["lora"], "train.max_steps": 2}}
    path = write_pipeline(tmp_path, [lora_sft, DPO])
    run_pipeline(path)
    merged = out / "sft" / "merged"
    assert yaml.safe_load((out / "dpo" / "config.yaml").read_text())["model"]["path"] == str(merged)
    assert (out / "sft" / "final" / "adapter_config.json").is_file()
    base, folded = weights(preset_path("tiny")), weights(merged)
    changed = [k for k in base if "q_proj" in k and not torch.equal(base[k], folded[k])]
    assert changed  # the trained LoRA update is in the weights DPO started from
    stamp = mtime(merged / "model.safetensors")
    run_pipeline(path)
    assert capsys.readouterr().out.count("skipped") == 2 and mtime(merged / "model.safetensors") == stamp


@pytest.mark.parametrize("stages, message", [
    ([{"name": "a", "kind": "dop"}], r"stage 'a': kind 'dop' is not a stage; did you mean dpo\?"),
    ([SFT, {**DPO, "name": "sft"}], r"stage 'sft': two stages are called 'sft'"),
    ([SFT, {**DPO, "overrides": ["dpo.bta=1"]}],
     r"stage 'dpo': overrides: unknown key dpo.bta; did you mean dpo.beta\?"),
    ([SFT, {**DPO, "overrides": ["dpo.beta=0"]}], r"stage 'dpo': dpo.beta must be positive"),
    ([{**SFT, "config": "missing.yaml"}], r"stage 'sft': config file .*missing.yaml does not exist"),
    ([{**SFT, "overides": []}], r"stage 'sft': unknown key 'overides'; did you mean overrides\?"),
    ([{"name": "g", "kind": "grpo", "inputs": {"reward.models": ["rm"]}}, {"name": "rm", "kind": "rm"}],
     r"stage 'g': inputs.reward.models: 'rm' is not an earlier stage"),
    ([SFT, {**DPO, "inputs": {"model.path": "sft"}, "overrides": ["model.path=tiny"]}],
     r"stage 'dpo': model.path is set both in inputs and in overrides"),
    ([SFT, {**DPO, "overrides": ["output_dir=x"]}], r"stage 'dpo': output_dir is the pipeline's"),
    ([{**SFT, "overrides": {"adapter.method": ["prompt"]}}, DPO],
     r"stage 'dpo': model.path: stage 'sft' trains prompt"),
])
def test_the_whole_pipeline_is_validated_before_anything_trains(stages, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run_pipeline(write_pipeline(tmp_path, stages))
    assert not (tmp_path / "out").exists()


def test_cli_errors_are_one_line_and_only_needs_ready_inputs(tmp_path):
    bad = write_pipeline(tmp_path, [SFT, {**DPO, "overrides": ["train.lr=fast"]}])
    result = subprocess.run([sys.executable, "-m", "posttrain", "pipeline", str(bad)], check=False, cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "stage 'dpo'" in result.stderr and "train.lr must be a number" in result.stderr
    good = write_pipeline(tmp_path, [SFT, DPO], "good.yaml")
    with pytest.raises(ConfigError, match="--only dpo: it uses the output of sft, which is not ready"):
        run_pipeline(good, only="dpo")
    with pytest.raises(ConfigError, match="--from nope: no such stage; stages: sft, dpo"):
        run_pipeline(good, from_stage="nope")


def _stage(tmp_path: Path, name: str, deps: list[str], fingerprint: str, complete: bool = True) -> Stage:
    run_dir = tmp_path / name
    if complete:
        (run_dir / "final").mkdir(parents=True)
        (run_dir / "final" / "model.safetensors").write_text("x")
        (run_dir / "summary.json").write_text("{}")
    return Stage(name, "sft", SimpleNamespace(output_dir=str(run_dir)), None, deps, {}, fingerprint=fingerprint,
                 flat={"dpo.beta": fingerprint})


def _done(fingerprint: str, run_id: str, **inputs: str) -> dict:
    return {"status": "done", "fingerprint": fingerprint, "run_id": run_id, "inputs": inputs,
            "config": {"dpo.beta": fingerprint}}


def test_plan_reruns_the_stages_that_read_a_changed_output_and_no_others(tmp_path):
    """sft -> rm (from sft) and dpo (from sft): a changed rm leaves dpo alone; a changed sft reruns both."""
    state = {"sft": _done("s", "1"), "rm": _done("r", "2", sft="1"), "dpo": _done("d", "3", sft="1")}
    stages = [_stage(tmp_path, "sft", [], "s"), _stage(tmp_path, "rm", ["sft"], "r2"),
              _stage(tmp_path, "dpo", ["sft"], "d")]
    actions = plan(stages, state)
    assert [a for a, _ in actions] == ["skip", "fresh", "skip"]
    assert actions[1][1] == "its config changed (dpo.beta: 'r' -> 'r2')"
    stages[0].fingerprint, stages[1].fingerprint = "s2", "r"
    assert [a for a, _ in plan(stages, state)] == ["fresh", "fresh", "fresh"]
    stages[0].fingerprint = "s"
    assert [a for a, _ in plan(stages, state, from_stage="rm")] == ["skip", "fresh", "fresh"]
    state["dpo"]["inputs"] = {"sft": "0"}  # dpo was trained on an earlier sft run
    assert plan(stages, state)[2] == ("fresh", "sft was retrained since")
    state["dpo"] = {**_done("d", "3", sft="1"), "status": "running"}
    assert plan(stages, state)[2][0] == "resume"


def test_example_pipelines_load_and_validate():
    from posttrain import cli

    for name in ("pipeline_sft_dpo", "pipeline_sft_grpo"):
        output_dir, stages = load_pipeline(ROOT / "examples" / f"{name}.yaml")
        assert output_dir == Path(f"runs/{name}")
        assert stages[1].cfg.model.path == f"runs/{name}/sft/final" and stages[1].deps == ["sft"]
    # Command-line overrides beat the file's, for every stage as for one: file < file stage < cli < cli stage.
    _, stages = load_pipeline(ROOT / "examples" / "pipeline_sft_grpo.yaml",
                              ["data.synthetic_tasks=[copy]", "train.max_steps=3", "grpo.train.max_steps=4"])
    assert stages[0].cfg.data.synthetic_tasks == ["copy"] and stages[1].cfg.data.synthetic_tasks == ["copy"]
    assert [s.cfg.train.max_steps for s in stages] == [3, 4]
    if "ppo" not in cli._STAGES:
        pytest.skip("examples/pipeline_rlhf.yaml needs the ppo stage, which posttrain.cli._STAGES does not list yet")
    _, stages = load_pipeline(ROOT / "examples" / "pipeline_rlhf.yaml")
    assert [s.kind for s in stages] == ["sft", "rm", "ppo"]
    assert stages[2].cfg.reward.models == ["runs/pipeline_rlhf/rm/final"]
    assert stages[2].cfg.model.path == "runs/pipeline_rlhf/sft/final" and stages[2].deps == ["rm", "sft"]


def test_example_pipeline_runs_from_the_command_line(tmp_path):
    args = [sys.executable, "-m", "posttrain", "pipeline", "examples/pipeline_sft_grpo.yaml", f"output_dir={tmp_path}",
            "train.max_steps=1", "train.progress_bar=false", "data.synthetic_size=64", "sft.eval.exact_match_prompts=0",
            "grpo.eval.prompts=0", "grpo.train.batch_size=8", "grpo.rollout.num_generations=4"]
    result = subprocess.run(args, check=False, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "grpo" / "final").is_dir() and (tmp_path / "sft" / "final").is_dir()
    grpo_config = yaml.safe_load((tmp_path / "grpo" / "config.yaml").read_text())
    assert grpo_config["model"]["path"] == str(tmp_path / "sft" / "final")


@pytest.mark.slow
def test_two_processes_run_a_pipeline_of_several_stages(tmp_path):
    """Each stage's end destroys the process group (accelerate's end_training); the next stage and the
    merge of LoRA adapters in between must get a working one, and only the first process writes the state."""
    lora_dpo = {**DPO, "overrides": [*DPO["overrides"], "adapter.method=lora", "data.eval_fraction=0"]}
    stages = [{**SFT, "overrides": {**SFT["overrides"], "data.eval_fraction": 0}}, lora_dpo,
              {**DPO, "name": "dpo2", "overrides": [*DPO["overrides"], "data.eval_fraction=0"]}]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "posttrain", "pipeline",
              str(write_pipeline(tmp_path, stages))]
    result = subprocess.run(launch, check=False, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "out"
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert [state[name]["status"] for name in ("sft", "dpo", "dpo2")] == ["done"] * 3
    assert yaml.safe_load((out / "dpo2" / "config.yaml").read_text())["model"]["path"] == str(out / "dpo" / "merged")
    assert json.loads((out / "dpo2" / "metrics.jsonl").read_text().splitlines()[0])["world_size"] == 2
