"""Data and evaluation stages in `posttrain pipeline`: quality, rlaif, constitutional / cai,
self-instruct, evaluate and redteam chained with the training stages, their files wired into later
stages' settings, skipped, resumed and rerun like a training stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from posttrain import cli
from posttrain.errors import ConfigError
from posttrain.pipeline import STATE_FILE, load_pipeline, plan, read_state, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SFT = {"name": "sft", "kind": "sft", "overrides": {"train.max_steps": 1, "data.synthetic_size": 16}}
RED = {"name": "red", "kind": "redteam", "overrides": {"probes.limit": 1, "attacks.names": ["direct"],
                                                        "target.max_tokens": 4}}


def write(tmp_path: Path, stages: list[dict], **top) -> Path:
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **top, "stages": stages}))
    return path


def load(tmp_path: Path, stages: list[dict], cli_overrides=(), **top):
    return load_pipeline(write(tmp_path, stages, **top), list(cli_overrides))[1]


def test_rows_go_to_the_setting_that_reads_them_and_models_to_the_ones_that_load_them(tmp_path):
    clean = {"name": "clean", "kind": "quality", "config": str(EXAMPLES / "quality.yaml")}
    cai = {"name": "cai", "kind": "cai"}
    stages = load(tmp_path, [
        clean, SFT, cai,
        {"name": "sft2", "kind": "sft", "inputs": {"data.train_files": ["cai", "clean"]}},
        {"name": "dpo", "kind": "dpo", "inputs": {"data.train_files": "cai"}},
        {"name": "q2", "kind": "quality", "inputs": {"data.files": ["cai/preferences.jsonl"]}},
        {"name": "rl", "kind": "rlaif", "inputs": {"judge.model": "sft"}},
        {"name": "si", "kind": "self-instruct"},
        {"name": "report", "kind": "evaluate", "inputs": {"reference": "sft", "prompts.files": "clean"}},
    ])
    out = tmp_path / "out"
    by = {s.name: s for s in stages}
    # a data stage's rows: the file a stage of this kind trains on; a scalar input fills a list setting
    assert by["sft2"].cfg.data.train_files == [str(out / "cai" / "sft.jsonl"), str(out / "clean" / "kept.jsonl")]
    assert by["dpo"].cfg.data.train_files == [str(out / "cai" / "preferences.jsonl")]
    assert by["q2"].cfg.data.files == [str(out / "cai" / "preferences.jsonl")]
    assert by["report"].cfg.prompts.files == [str(out / "clean" / "kept.jsonl")]
    # every model setting left alone starts from the latest policy; a client given a directory loads it
    assert by["cai"].cfg.policy.model == str(out / "sft" / "final") and by["cai"].cfg.policy.kind == "local"
    assert by["rl"].cfg.policy.model == str(out / "dpo" / "final") and by["rl"].cfg.policy.kind == "local"
    assert by["rl"].cfg.judge.model == str(out / "sft" / "final") and by["rl"].cfg.judge.kind == "local"
    assert by["si"].cfg.generator.model == str(out / "dpo" / "final") and by["si"].cfg.generator.kind == "local"
    assert by["report"].cfg.policy == str(out / "dpo" / "final")
    assert by["report"].cfg.reference == str(out / "sft" / "final")
    # the data stages make no policy: dpo starts from sft2, not from cai
    assert by["dpo"].cfg.model.path == str(out / "sft2" / "final")
    assert by["dpo"].deps == ["cai", "sft2"] and sorted(by["report"].deps) == ["clean", "dpo", "sft"]
    assert by["clean"].deps == [] and by["clean"].cfg.output_dir == str(out / "clean")


@pytest.mark.parametrize("stages, message", [
    ([{"name": "cai", "kind": "cai"}, {"name": "q", "kind": "quality", "inputs": {"data.files": "cai"}}],
     "'cai' writes 2 files; name one: cai/sft.jsonl or cai/preferences.jsonl"),
    ([{"name": "q", "kind": "quality"}, {"name": "s", "kind": "sft", "inputs": {"model.path": "q"}}],
     "inputs.model.path: 'q' is a quality stage; it writes kept.jsonl, not a model"),
    ([SFT, {"name": "e", "kind": "evaluate"}, {"name": "s", "kind": "sft", "inputs": {"data.train_files": "e"}}],
     "'e' is a evaluate stage; it writes a report, which no stage reads"),
    ([SFT, {"name": "s2", "kind": "sft", "inputs": {"data.train_files": "sft"}}],
     "'sft' is a sft stage; it writes a model, not rows"),
    ([SFT, {"name": "s2", "kind": "sft", "inputs": {"data.train_files": "sft/final"}}],
     "only a data stage's files are named this way"),
    ([{"name": "rm", "kind": "rm"}, {"name": "e", "kind": "evaluate", "inputs": {"policy": "rm"}}],
     "'rm' is a reward model (a score head, no language-model head); a evaluate stage needs a policy stage"),
    ([SFT, {"name": "rl", "kind": "rlaif", "inputs": {"policy.model": "sft"}, "overrides": {"policy.kind": "openai"}}],
     "which policy.kind=openai would send to a server as a model name"),
])
def test_wiring_that_cannot_work_is_refused_before_anything_runs(tmp_path, stages, message):
    with pytest.raises(ConfigError, match="") as info:
        load(tmp_path, stages)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists()


def test_a_reward_model_scores_in_an_evaluate_stage_and_an_explicit_client_keeps_its_server(tmp_path):
    stages = load(tmp_path, [
        SFT, {"name": "rm", "kind": "rm"},
        {"name": "e", "kind": "evaluate", "inputs": {"reward.models": ["helpful=rm"]}},
        {"name": "rl", "kind": "rlaif", "overrides": {"policy.kind": "openai", "policy.model": "served"}},
    ])
    assert stages[2].cfg.reward.models == [f"helpful={tmp_path / 'out' / 'rm' / 'final'}"]
    assert stages[2].cfg.policy == str(tmp_path / "out" / "sft" / "final")  # rm makes no policy
    assert (stages[3].cfg.policy.kind, stages[3].cfg.policy.model) == ("openai", "served")
    assert stages[3].deps == []


def test_a_pipeline_wide_override_goes_to_the_stages_that_have_the_setting_and_a_typo_is_still_caught(tmp_path):
    quality = {"name": "q", "kind": "quality"}
    stages = load(tmp_path, [quality, SFT], ["train.lr=0.5"], overrides={"train.progress_bar": False})
    assert stages[1].cfg.train.lr == 0.5 and stages[1].cfg.train.progress_bar is False
    with pytest.raises(ConfigError, match=r"overrides: unknown key train.lrr; did you mean train.lr\?"):
        load(tmp_path, [quality, SFT], ["train.lrr=0.5"])
    with pytest.raises(ConfigError, match="pipe.yaml: overrides: unknown key train.progres_bar"):
        load(tmp_path, [quality, SFT], overrides={"train.progres_bar": False})


def test_the_validators_of_the_data_stages_run_at_load(tmp_path):
    with pytest.raises(ConfigError, match="stage 'si'"):
        load(tmp_path, [{"name": "si", "kind": "self-instruct", "overrides": {"self_instruct.num_tasks": 0}}])


def test_the_full_example_runs_skips_and_reruns_only_what_changed(tmp_path, capsys):
    args = ["pipeline", str(EXAMPLES / "pipeline_full.yaml"), f"output_dir={tmp_path}", "train.max_steps=1",
            "train.progress_bar=false", "data.synthetic_size=32", "dpo.eval.exact_match_prompts=2",
            "report.prompts.limit=2", "report.safety.limit=1", "report.generation.samples=1",
            "report.generation.max_new_tokens=4"]
    assert cli.main(args) == 0
    state = read_state(tmp_path)
    assert {name: record["status"] for name, record in state.items()} == dict.fromkeys(
        ["clean", "sft", "dpo", "report"], "done")
    sft_config = yaml.safe_load((tmp_path / "sft" / "config.yaml").read_text())
    assert sft_config["data"]["train_files"] == [str(tmp_path / "clean" / "kept.jsonl")]
    kept = (tmp_path / "clean" / "kept.jsonl").read_text().splitlines()
    quality = json.loads((tmp_path / "clean" / "report.json").read_text())
    assert len(kept) == quality["summary"]["kept"] > 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["policy"] == str(tmp_path / "dpo" / "final") and report["reference"] == str(tmp_path / "sft" / "final")
    assert set(report["models"]) == {"policy", "reference"}
    capsys.readouterr()
    # a second run skips all four; a change to the report stage reruns it alone
    assert cli.main(args + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("skipped: complete, config and inputs unchanged") == 4
    stamp = (tmp_path / "dpo" / "final" / "model.safetensors").stat().st_mtime_ns
    assert cli.main(args + ["report.generation.max_new_tokens=3"]) == 0
    out = capsys.readouterr().out
    assert "4/4 report (evaluate): running: its config changed (generation.max_new_tokens: 4 -> 3)" in out
    assert out.count("skipped") == 3
    assert (tmp_path / "dpo" / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    # a change to the quality gate reruns everything that reads from it, in order
    assert cli.main(args + ["clean.dedup.near=false", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1/4 clean (quality): running: its config changed (dedup.near: True -> False)" in out
    assert "2/4 sft (sft): running: it uses the output of clean, which runs again" in out
    assert "4/4 report (evaluate): running: it uses the output of sft, dpo, which runs again" in out


def test_a_data_stage_resumes_from_its_log_and_a_fresh_run_starts_a_new_one(tmp_path, capsys):
    red = {**RED, "overrides": {**RED["overrides"], "target.model": "tiny", "target.kind": "local"}}
    path = write(tmp_path, [red], overrides={})
    run_pipeline(path)
    out = tmp_path / "out" / "red"
    answers = (out / "responses.jsonl").read_text().splitlines()
    assert len(answers) == 2  # one harmful probe under one attack, one over-refusal probe
    # killed after its log was written, before its report: the state says running, the report is gone
    state = json.loads((tmp_path / "out" / STATE_FILE).read_text())
    state["stages"]["red"]["status"] = "running"
    (tmp_path / "out" / STATE_FILE).write_text(json.dumps(state))
    (out / "report.md").unlink()
    _, stages = load_pipeline(path)
    assert plan(stages, read_state(tmp_path / "out")) == [
        ("resume", "it was interrupted; resuming from what its log holds")]
    capsys.readouterr()
    run_pipeline(path)
    assert "2 items: 0 written, 2 already done" in capsys.readouterr().out
    assert (out / "report.md").is_file() and (out / "responses.jsonl").read_text().splitlines() == answers
    # another setting: the old log would be refused (or mixed in); the stage's directory starts empty
    (out / "stale.txt").write_text("x")
    run_pipeline(path, ["red.target.max_tokens=3"])
    assert "2 items: 2 written, 0 already done" in capsys.readouterr().out
    assert not (out / "stale.txt").exists()


def test_data_stages_refuse_to_run_on_several_processes(tmp_path, monkeypatch):
    path = write(tmp_path, [{"name": "q", "kind": "quality"}, SFT])
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"stage q \(quality\) runs on one process.*--only q"):
        run_pipeline(path)
    assert not (tmp_path / "out").exists()
