"""Review tests: `posttrain pipeline` stage edges — weights really flow from a stage's final/ (or
merged/) into the next, reruns touch exactly what the README says, an interruption mid-stage resumes
to the same weights as an uninterrupted run, wrong wiring stops before anything trains, and a
fresh rerun leaves nothing of the old run behind. Tiny preset, 1-4 steps per stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import cli
from posttrain.errors import ConfigError
from posttrain.pipeline import STATE_FILE, load_pipeline, run_pipeline

ROOT = Path(__file__).resolve().parents[1]

COMMON = {"train.progress_bar": False, "train.schedule": "constant", "train.warmup_steps": 0,
          "data.eval_fraction": 0}
SFT = {"name": "sft", "kind": "sft", "overrides": {
    "data.synthetic_size": 48, "data.synthetic_tasks": ["smallest"], "data.max_length": 48, "train.max_steps": 2,
    "train.batch_size": 4, "train.lr": 3e-3}}
# lr 1e-12: AdamW moves each weight by ~1e-12 (measured: at most 1.8e-12), so such a stage's final
# weights are the weights it started from to 1e-9, while a real training step moves them by >1e-4.
FROZEN = {"data.synthetic_size": 32, "data.synthetic_tasks": ["smallest"], "data.max_length": 48,
          "train.max_steps": 1, "train.batch_size": 4, "train.lr": 1e-12, "train.weight_decay": 0.0}
RM = {"name": "rm", "kind": "rm", "overrides": {**FROZEN, "data.train_files": ["synthetic"]}}
SFT2 = {"name": "sft2", "kind": "sft", "overrides": FROZEN}


def write(tmp_path: Path, stages: list[dict], out: str = "out", name: str = "p.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / out), "overrides": COMMON, "stages": stages}))
    return path


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def stamps(run_dir: Path) -> dict[str, int]:
    """Every file under a stage's directory with its mtime: a skipped stage changes none."""
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], keys=None) -> float:
    keys = list(a) if keys is None else keys
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in keys)


def base_weights() -> dict[str, torch.Tensor]:
    from posttrain.models.presets import preset_path

    return weights(Path(preset_path("tiny")))


# ---------------------------------------------------------------- weights flow through the chain


def test_weights_flow_from_final_into_the_next_stages(tmp_path, capsys):
    out = tmp_path / "out"
    path = write(tmp_path, [SFT, RM, SFT2])
    run_pipeline(path)
    base, sft = base_weights(), weights(out / "sft" / "final")
    assert max_diff(sft, base) > 1e-4  # the sft stage trained
    # sft2 (lr ~0) started from the sft stage's final weights — not from the preset, not from the rm
    assert max_diff(weights(out / "sft2" / "final"), sft) < 1e-9
    # the rm stage's backbone is the sft model's (InstructGPT's init), with a new one-output head
    rm = weights(out / "rm" / "final")
    backbone = [k for k in rm if k.startswith("model.")]
    assert len(backbone) == len([k for k in sft if k.startswith("model.")]) and max_diff(rm, sft, backbone) < 1e-9
    assert rm["score.weight"].shape[0] == 1
    # each stage's summary reflects its own run: its per-stage max_steps, and the state says done
    for name, steps in (("sft", 2), ("rm", 1), ("sft2", 1)):
        assert json.loads((out / name / "summary.json").read_text())["steps"] == steps
    state = json.loads((out / STATE_FILE).read_text())["stages"]
    assert [state[n]["status"] for n in ("sft", "rm", "sft2")] == ["done"] * 3
    assert state["sft2"]["inputs"] == {"sft": state["sft"]["run_id"]}  # it reads sft, not rm

    # --dry-run with a changed first stage: prints the plan (all three rerun), changes nothing on disk
    before = {n: stamps(out / n) for n in ("sft", "rm", "sft2")}
    state_text = (out / STATE_FILE).read_text()
    capsys.readouterr()
    run_pipeline(path, ["sft.train.lr=0.01"], dry_run=True)
    printed = capsys.readouterr().out
    assert printed.count(": running:") == 3 and "sft (sft): running: its config changed (train.lr" in printed
    assert {n: stamps(out / n) for n in before} == before and (out / STATE_FILE).read_text() == state_text


def test_a_lora_stage_is_merged_for_the_next_and_a_changed_stage_reruns_its_reader(tmp_path, capsys):
    """merged/ = W + (alpha / r) B A in float64 from the saved adapter, and the next stage starts from it;
    after the lora stage's config changes, both rerun and the next stage holds the NEW merge."""
    out = tmp_path / "out"
    lora = {**SFT, "overrides": {**SFT["overrides"], "adapter.method": ["lora"], "train.lr": 1e-2}}
    path = write(tmp_path, [lora, SFT2])
    base = base_weights()

    def check_merge() -> dict[str, torch.Tensor]:
        final = out / "sft" / "final"
        adapter_cfg = json.loads((final / "adapter_config.json").read_text())
        assert not adapter_cfg.get("use_dora") and not adapter_cfg.get("use_rslora")
        scale = adapter_cfg["lora_alpha"] / adapter_cfg["r"]
        adapter = load_file(str(final / "adapter_model.safetensors"))
        merged = weights(out / "sft" / "merged")
        expected = {k: v.double() for k, v in base.items()}
        touched = 0
        for key, a in adapter.items():
            if ".lora_A." not in key:
                continue
            b = adapter[key.replace(".lora_A.", ".lora_B.")].double()
            target = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
            expected[target] = expected[target] + scale * (b @ a.double())
            touched += 1
        assert touched and set(merged) == set(base)
        assert max_diff(merged, expected) < 1e-6
        assert max_diff(merged, base) > 1e-5  # the LoRA update is really in there
        assert max_diff(weights(out / "sft2" / "final"), merged) < 1e-9  # sft2 started from merged/
        return merged

    run_pipeline(path)
    first = check_merge()
    capsys.readouterr()
    run_pipeline(path, ["sft.train.lr=2e-2"])
    printed = capsys.readouterr().out
    assert "sft (sft): running: its config changed (train.lr: 0.01 -> 0.02)" in printed
    assert "sft2 (sft): running: it uses the output of sft" in printed
    second = check_merge()
    assert max_diff(second, first) > 1e-5  # a new merge, not the stale one


# ---------------------------------------------------------------- interrupted mid-stage


def test_an_interruption_mid_stage_resumes_to_the_uninterrupted_weights(tmp_path, capsys, monkeypatch):
    """`--from more` reruns stage 2 of 2 afresh; it dies right after its step-2 checkpoint (of 4). The next
    plain invocation skips stage 1 (no file touched) and resumes stage 2 at step 2, ending bitwise equal
    to the uninterrupted first run of the same stage from the same start."""
    from posttrain.train import checkpoint

    out = tmp_path / "out"
    second = {"name": "more", "kind": "sft", "overrides": {**SFT["overrides"], "train.max_steps": 4,
                                                            "train.save_every": 1, "train.lr": 1e-2}}
    path = write(tmp_path, [SFT, second])
    run_pipeline(path)
    reference = weights(out / "more" / "final")
    first = stamps(out / "sft")
    real_save = checkpoint.save

    def save_then_die(root, step, **kwargs):
        result = real_save(root, step, **kwargs)
        if step == 2:
            raise KeyboardInterrupt
        return result

    monkeypatch.setattr(checkpoint, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(path, from_stage="more")
    monkeypatch.undo()
    assert json.loads((out / STATE_FILE).read_text())["stages"]["more"]["status"] == "running"
    assert not (out / "more" / "final").exists()  # the fresh rerun removed the old run's result
    capsys.readouterr()
    run_pipeline(path)
    printed = capsys.readouterr().out
    assert "sft (sft): skipped" in printed and "more (sft): resuming" in printed and "at step 2" in printed
    assert stamps(out / "sft") == first
    assert max_diff(weights(out / "more" / "final"), reference) == 0.0
    steps = [json.loads(line)["step"] for line in (out / "more" / "metrics.jsonl").read_text().splitlines()
             if '"loss"' in line]
    assert steps == [1, 2, 3, 4]
    assert json.loads((out / "more" / "summary.json").read_text())["steps"] == 4


# ---------------------------------------------------------------- wiring: what starts where


def test_model_path_set_for_one_stage_breaks_the_chain_only_there(tmp_path):
    """README: a stage starts from the latest earlier policy "unless it sets model.path"; the docstring:
    a config file's model.path only matters to the first stage."""
    (tmp_path / "own.yaml").write_text(yaml.safe_dump({"model": {"path": "/elsewhere/model"}}))
    path = write(tmp_path, [SFT, {"name": "b", "kind": "sft", "config": "own.yaml"},
                            {"name": "c", "kind": "sft"}, {"name": "d", "kind": "dpo", "inputs": {"model.path": "b"}}])
    out = tmp_path / "out"
    _, stages = load_pipeline(path, ["c.model.path=tiny"])
    by = {s.name: s for s in stages}
    assert by["b"].cfg.model.path == str(out / "sft" / "final")  # the config file's model.path is not used
    assert by["c"].cfg.model.path == "tiny" and by["c"].deps == []  # its own (command-line) override wins
    assert by["d"].cfg.model.path == str(out / "b" / "final") and by["d"].deps == ["b"]  # inputs: not the latest
    _, stages = load_pipeline(path)
    assert stages[2].cfg.model.path == str(out / "b" / "final") and stages[2].deps == ["b"]


@pytest.mark.parametrize("stages, message", [
    ([SFT, {"name": "g", "kind": "grpo", "inputs": {"reward.models": ["g"]}}],
     r"stage 'g': inputs.reward.models: 'g' is not an earlier stage"),
    ([SFT, {"name": "g", "kind": "grpo", "inputs": {"reward.models": ["judge=nope"]}}],
     r"stage 'g': inputs.reward.models: 'nope' is not an earlier stage.*earlier stages: sft"),
])
def test_inputs_to_itself_or_a_missing_stage_stop_before_training(tmp_path, stages, message):
    with pytest.raises(ConfigError, match=message):
        run_pipeline(write(tmp_path, stages))
    assert not (tmp_path / "out").exists()


def test_a_policy_stage_wired_as_a_reward_model_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        SFT, {"name": "g", "kind": "grpo", "inputs": {"reward.models": ["sft"]}}]}))
    code = cli.main(["pipeline", str(tmp_path / "p.yaml"), "--dry-run"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "reward.models" in err and "sft" in err, err


def test_an_alias_stage_refuses_an_override_that_contradicts_it(tmp_path):
    path = write(tmp_path, [{"name": "k", "kind": "kto", "overrides": {"dpo.loss": "ipo"}}])
    with pytest.raises(ConfigError, match="dpo.loss"):
        load_pipeline(path)


def test_a_cli_override_whose_section_is_also_a_stage_name_is_not_misread(capsys):
    """README: `key=value` for every stage, `NAME.key=value` for one. examples/pipeline_sft_dpo.yaml names its
    dpo stage 'dpo', so dpo.beta=0.2 is read as stage 'dpo' key 'beta' and refused with a hint to type
    exactly what was typed."""
    code = cli.main(["pipeline", str(ROOT / "examples" / "pipeline_sft_dpo.yaml"), "dpo.beta=0.2", "--dry-run"])
    err = capsys.readouterr().err
    assert "did you mean dpo.beta" not in err, err
    assert code == 0 or "ambiguous" in err or "dpo.dpo.beta" in err, err


# ---------------------------------------------------------------- a fresh rerun starts clean


def test_a_fresh_rerun_of_an_rl_stage_keeps_none_of_the_old_samples(tmp_path, capsys):
    out = tmp_path / "out"
    grpo = {"name": "g", "kind": "grpo", "overrides": {
        "data.synthetic_size": 32, "data.synthetic_tasks": ["smallest"], "rollout.max_new_tokens": 3,
        "rollout.num_generations": 4, "train.batch_size": 8, "train.max_steps": 2, "eval.prompts": 0,
        "eval.sample_every": 1}}
    path = write(tmp_path, [grpo])
    run_pipeline(path)
    first = (out / "g" / "samples.jsonl").read_text().splitlines()
    assert first
    capsys.readouterr()
    run_pipeline(path, ["g.rollout.temperature=0.7"])
    assert "g (grpo): running: its config changed" in capsys.readouterr().out
    second = (out / "g" / "samples.jsonl").read_text().splitlines()
    assert len(second) == len(first)  # measured: twice as many, the old run's rows first


def test_a_policy_stage_wired_to_start_from_a_reward_model_is_refused(tmp_path):
    """`inputs: {model.path: rm}` would start a DPO stage from a sequence-classification directory
    (no language-model head): refused at load, naming the stage and the key."""
    path = write(tmp_path, [SFT, RM, {"name": "d", "kind": "dpo", "inputs": {"model.path": "rm"}}])
    with pytest.raises(ConfigError, match=r"inputs\.model\.path: 'rm' is a reward model"):
        load_pipeline(path)


def test_output_dir_in_the_files_overrides_is_refused_not_ignored(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"overrides": {**COMMON, "output_dir": str(tmp_path / "elsewhere")},
                                    "stages": [SFT]}))
    with pytest.raises(ConfigError, match="output_dir is the pipeline's own key"):
        load_pipeline(path)
