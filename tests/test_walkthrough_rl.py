"""A newcomer's walk through the README's online-RL (GRPO, RLOO, PPO), catastrophic-forgetting and
generation sections, and the generate / chat / merge / score / env commands: what they type, the
mistakes they make, and what they are told.

The tests named for a failure pin a defect found on that walk (each was a strict xfail until its
fix, stop 28); the others pin user-facing behaviour that was right but had no test."""

from __future__ import annotations

import io
import json
import shutil
import sys
from pathlib import Path

import pytest

from posttrain import cli
from tests.cli_runner import run_cli

ROOT = Path(__file__).resolve().parents[1]

# the smallest RL run the examples allow: 8 completions a step, no held-out figures
QUICK = ["train.max_steps=1", "train.batch_size=8", "eval.prompts=0"]




@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


@pytest.fixture(scope="module")
def rloo_run(tmp_path_factory) -> Path:
    """`posttrain rloo examples/grpo_rloo_lora.yaml`, one step: a LoRA (causal LM) run directory."""
    out = tmp_path_factory.mktemp("rloo") / "run"
    rc = cli.main(["rloo", "examples/grpo_rloo_lora.yaml", "train.max_steps=1", "eval.prompts=1",
                   "eval.samples=2", "train.progress_bar=false", f"output_dir={out}"])
    assert rc == 0
    return out


def _rows(tmp_path: Path) -> Path:
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "Smallest letter: c b d", "response": "b", "answer": "b"}\n'
                    '{"prompt": "Smallest letter: e f", "response": "f", "answer": "e"}\n')
    return path


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("Smallest letter: c b d\n")
    return path


def _module(tmp_path: Path, monkeypatch, name: str, source: str) -> str:
    (tmp_path / f"{name}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return name


# --------------------------------------------------------------------------- defects


def test_generate_output_in_missing_directory_is_a_one_line_error(capsys, tmp_path):
    rc, out = run_cli(capsys, "generate", "--model", "tiny", "--prompts", _prompts(tmp_path), "--max-new-tokens", "1",
                      "--output", tmp_path / "no" / "such" / "out.jsonl")
    assert rc == 2 and "error:" in out


def test_score_output_in_missing_directory_is_a_one_line_error(capsys, tmp_path):
    rc, out = run_cli(capsys, "score", "--function", "em=posttrain.rewards:exact_match", "--input", _rows(tmp_path),
                      "--output", tmp_path / "no" / "such" / "scored.jsonl")
    assert rc == 2 and "error:" in out


def test_score_with_a_model_that_is_not_a_reward_model_is_refused_or_warned(capsys, tmp_path):
    rc, out = run_cli(capsys, "score", "--model", "tiny", "--input", _rows(tmp_path),
                      "--output", tmp_path / "scored.jsonl")
    assert rc == 2 or any(word in out.lower() for word in ("score head", "not a reward model", "random", "untrained"))


def test_score_with_a_policy_adapter_is_a_one_line_error(capsys, tmp_path, rloo_run):
    rc, out = run_cli(capsys, "score", "--model", rloo_run / "final", "--input", _rows(tmp_path))
    assert rc == 2 and "error:" in out


def test_grpo_zero_generations_is_a_one_line_error(capsys, tmp_path):
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", "rollout.num_generations=0", f"output_dir={tmp_path}")
    assert rc == 2 and "num_generations" in out


def test_ppo_zero_generations_is_a_one_line_error(capsys, tmp_path):
    rc, out = run_cli(capsys, "ppo", "examples/ppo.yaml", "rollout.num_generations=0", f"output_dir={tmp_path}")
    assert rc == 2 and "num_generations" in out


def test_grpo_zero_eval_samples_is_refused_or_runs(capsys, tmp_path):
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", *QUICK, "eval.prompts=1", "eval.samples=0",
                      "train.progress_bar=false", f"output_dir={tmp_path}")
    assert rc in (0, 2)


def test_reward_function_that_raises_is_named(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "walk_rl_raising", "def boom(prompt, response):\n    return 1 / 0\n")
    rc, out = run_cli(capsys, "score", "--function", f"boom={name}:boom", "--input", _rows(tmp_path))
    assert rc == 2 and "'boom'" in out


def test_reward_module_that_fails_to_import_is_a_one_line_error(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "walk_rl_syntax", "def f(prompt, response):\n    return (\n")
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", *QUICK, f"reward.functions=[f={name}:f]",
                      f"output_dir={tmp_path / 'run'}")
    assert rc == 2 and "cannot be imported" in out


def test_merge_into_an_existing_file_is_refused(capsys, tmp_path, rloo_run):
    target = tmp_path / "notes.txt"
    target.write_text("mine\n")
    rc, out = run_cli(capsys, "merge", rloo_run, target)
    assert rc == 2


def test_merge_into_the_adapter_directory_is_refused(capsys, tmp_path, rloo_run):
    adapter = tmp_path / "adapter"
    shutil.copytree(rloo_run / "final", adapter)
    rc, out = run_cli(capsys, "merge", adapter, adapter)
    assert rc == 2 and not (adapter / "model.safetensors").exists()


def test_merge_of_a_missing_path_says_it_does_not_exist(capsys, tmp_path):
    rc, out = run_cli(capsys, "merge", tmp_path / "runs" / "sft_lora", tmp_path / "merged")
    assert rc == 2 and "does not exist" in out


def test_adapter_as_policy_model_path_says_it_is_an_adapter(capsys, tmp_path, rloo_run):
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", *QUICK, f"model.path={rloo_run / 'final'}",
                      f"output_dir={tmp_path}")
    assert rc == 2 and "merge" in out and "not a Hugging Face model directory (the one save_pretrained writes), " \
        "a run directory (its final/) or an adapter directory" not in out


def test_run_dir_as_policy_model_path_is_taken_or_pointed_at_final(capsys, tmp_path):
    from posttrain.models.loading import resolve_model_path

    run = tmp_path / "sft_full"  # what `posttrain sft` leaves: the model in final/
    shutil.copytree(resolve_model_path("tiny"), run / "final")
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", *QUICK, f"model.path={run}",
                      f"output_dir={tmp_path / 'out'}")
    assert rc == 0 or (rc == 2 and str(run / "final") in out)


def test_generate_reads_ndjson_prompts_as_json(capsys, tmp_path):
    prompts = tmp_path / "prompts.ndjson"
    prompts.write_text('{"prompt": "Smallest letter: c b d"}\n')
    out_file = tmp_path / "out.jsonl"
    rc, out = run_cli(capsys, "generate", "--model", "tiny", "--prompts", prompts, "--max-new-tokens", "1",
                      "--output", out_file)
    assert rc == 0 or "error:" in out
    if rc == 0:
        assert json.loads(out_file.read_text().splitlines()[0])["prompt"] == "Smallest letter: c b d"


def test_ppo_value_model_path_without_separate_critic_is_not_silent(capsys, tmp_path):
    rc, out = run_cli(capsys, "ppo", "examples/ppo.yaml", *QUICK, "ppo.value_model_path=tiny",
                      "train.progress_bar=false", f"output_dir={tmp_path}")
    assert rc == 2 or "ppo.value_model_path" in out  # (the run directory's name holds "value_model_path")


# --------------------------------------------------------------------------- right, and now tested


@pytest.mark.parametrize("command", ["generate", "chat", "merge", "score", "env", "grpo", "rloo", "ppo"])
def test_every_subcommand_help_exits_zero(capsys, command):
    rc, out = run_cli(capsys, command, "--help")
    assert rc == 0 and f"posttrain {command}" in out


def test_env_prints_versions_device_and_threads(capsys):
    rc, out = run_cli(capsys, "env")
    assert rc == 0
    for word in ("posttrain", "torch", "device", "threads"):
        assert word in out


def test_rloo_example_writes_what_the_readme_lists(rloo_run):
    for name in ("config.yaml", "metrics.jsonl", "samples.jsonl", "summary.json", "final/adapter_config.json"):
        assert (rloo_run / name).is_file(), name
    summary = json.loads((rloo_run / "summary.json").read_text())
    assert summary["advantage"] == "rloo"
    for key in ("reward", "greedy_reward", "kl_to_reference"):
        assert key in summary["held_out_before"] and key in summary["held_out_after"]
    metrics = json.loads((rloo_run / "metrics.jsonl").read_text().splitlines()[0])
    # "with several rewards, each one's raw mean as rollout/reward/<name>"
    for key in ("rollout/reward_mean", "rollout/flat_groups", "rollout/reward/exact_match", "rollout/reward/format"):
        assert key in metrics, key


def test_rloo_command_refuses_a_contradicting_advantage(capsys, tmp_path):
    rc, out = run_cli(capsys, "rloo", "examples/grpo.yaml", "grpo.advantage=grpo", f"output_dir={tmp_path}")
    assert rc == 2 and "posttrain grpo" in out


def test_grpo_example_rejects_ppo_keys_with_the_valid_sections(capsys, tmp_path):
    rc, out = run_cli(capsys, "grpo", "examples/ppo.yaml", f"output_dir={tmp_path}")
    assert rc == 2 and "unknown key ppo.value_model" in out


def test_merge_of_a_full_model_run_says_it_needs_no_merging(capsys, tmp_path):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "run" / "final" / "config.json").write_text("{}")
    rc, out = run_cli(capsys, "merge", tmp_path / "run", tmp_path / "merged")
    assert rc == 2 and "needs no merging" in out


def test_merged_lora_run_is_a_plain_model_that_generate_loads(capsys, tmp_path, rloo_run):
    merged = tmp_path / "merged"
    rc, out = run_cli(capsys, "merge", rloo_run, merged)
    assert rc == 0 and (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    outputs = []
    for model in (rloo_run, merged):  # a run dir means its final/; greedy: the same text
        target = tmp_path / f"{model.name}.jsonl"
        rc, _ = run_cli(capsys, "generate", "--model", model, "--prompts", _prompts(tmp_path),
                        "--max-new-tokens", "3", "--output", target)
        assert rc == 0
        outputs.append(json.loads(target.read_text())["completion"])
    assert outputs[0] == outputs[1]


def test_generate_malformed_prompt_row_names_file_and_line(capsys, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Smallest letter: c b d"}\n{"prompt": "x"\n')
    rc, out = run_cli(capsys, "generate", "--model", "tiny", "--prompts", prompts)
    assert rc == 2 and f"{prompts}:2: not valid JSON" in out


def test_generate_missing_model_is_one_line(capsys, tmp_path):
    rc, out = run_cli(capsys, "generate", "--model", tmp_path / "nope", "--prompts", _prompts(tmp_path))
    assert rc == 2 and "does not exist" in out


def test_chat_from_stdin_answers_each_turn_and_resets(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Smallest letter: c b d\n/reset\n\nhi\n/exit\nnever read\n"))
    rc, out = run_cli(capsys, "chat", "--model", "tiny", "--max-new-tokens", "2", "--temperature", "0")
    assert rc == 0
    assert out.count("> ") == 5  # two answered turns, /reset, the empty line, /exit; nothing after /exit


def test_score_nan_reward_names_the_component(capsys, tmp_path, monkeypatch):
    name = _module(tmp_path, monkeypatch, "walk_rl_nan", "def nan(prompt, response):\n    return float('nan')\n")
    rc, out = run_cli(capsys, "score", "--function", f"n={name}:nan", "--input", _rows(tmp_path))
    assert rc == 2 and "reward 'n' returned nan" in out


def test_grpo_forgetting_refuses_replay_ratio(capsys, tmp_path):
    rc, out = run_cli(capsys, "grpo", "examples/grpo.yaml", "forgetting.retain_files=[examples/data/retain_copy.jsonl]",
                      "forgetting.replay_ratio=0.2", f"output_dir={tmp_path}")
    assert rc == 2 and "forgetting.lm_coef" in out
