"""A newcomer's walk through the README's training sections (Using it, Config, Models, PEFT,
Data, Reward models and preference optimisation, The training loop): first-contact defects
(strict xfails until their fixes, stop 28) and a few user-journey behaviours that are right but were untested."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain import cli
from posttrain.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def _cli(args: list[str], capsys) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, stdout + stderr)."""
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as exc:  # argparse
        rc = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return rc, out.out + out.err


QUIET = ["train.progress_bar=false"]


@pytest.fixture(scope="module")
def rm_run(tmp_path_factory):
    """One reward-model run of a single step on the bundled pairs (the README's rm_pairs.yaml)."""
    from posttrain.config import RMConfig
    from posttrain.train.reward import run_rm

    out = tmp_path_factory.mktemp("rm-run")
    cfg = RMConfig.load(str(EXAMPLES / "rm_pairs.yaml"), [f"output_dir={out}", "train.max_steps=1", *QUIET])
    return Path(run_rm(cfg))


@pytest.fixture()
def rows_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "Smallest letter: z f z w", "response": "f"}\n'
                    '{"prompt": "Smallest letter: z f z w", "response": "z"}\n')
    return path


# --------------------------------------------------------------------------- passing journeys


def test_readme_config_error_line_is_exact(capsys):
    rc, out = _cli(["sft", EXAMPLES / "sft_full.yaml", "train.learning_rate=1e-4"], capsys)
    assert rc == 2
    assert out.strip().endswith("error: overrides: unknown key train.learning_rate; did you mean train.lr?")


def test_every_training_subcommand_has_help(capsys):
    for command in ["sft", "rm", "dpo", "kto", "orpo", "merge", "score"]:
        rc, out = _cli([command, "--help"], capsys)
        assert rc == 0, command
        assert "usage: posttrain " + command in out


def test_kto_subcommand_refuses_a_conflicting_loss_override(capsys, tmp_path):
    rc, out = _cli(["kto", EXAMPLES / "kto.yaml", "dpo.loss=dpo", f"output_dir={tmp_path / 'r'}"], capsys)
    assert rc == 2
    assert "posttrain dpo" in out
    assert not (tmp_path / "r").exists()


def test_model_path_that_does_not_exist_is_one_line(capsys, tmp_path):
    rc, out = _cli(["sft", EXAMPLES / "sft_lora.yaml", f"model.path={tmp_path / 'nope'}",
                    f"output_dir={tmp_path / 'r'}"], capsys)
    assert rc == 2
    assert "does not exist" in out and "Traceback" not in out


def test_malformed_rows_are_named_by_file_and_line(capsys, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = (EXAMPLES / "data" / "alpaca.jsonl").read_text()
    data.write_text(good + '{"instruction": "Copy: a b", "output": "a b"\n')
    rc, out = _cli(["sft", EXAMPLES / "sft_lora.yaml", f"data.train_files=[{data}]", "train.max_steps=1",
                    f"output_dir={tmp_path / 'r'}", *QUIET], capsys)
    assert rc == 2
    assert f"{data}:13: invalid JSON" in out


def test_rm_run_writes_the_outputs_the_readme_names(rm_run):
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "data_report.json", "final/config.json"]:
        assert (rm_run / name).exists(), name
    summary = json.loads((rm_run / "summary.json").read_text())
    assert {"eval_before", "eval_after"} <= set(summary)


def test_score_with_the_trained_reward_model_final_dir(capsys, rm_run, rows_file, tmp_path):
    out_file = tmp_path / "scored.jsonl"
    rc, out = _cli(["score", "--model", rm_run / "final", "--input", rows_file, "--output", out_file], capsys)
    assert rc == 0, out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert len(rows) == 2 and all(isinstance(r["reward"], float) for r in rows)


# --------------------------------------------------------------------------- defects


def test_merge_of_a_missing_directory_says_it_does_not_exist(capsys, tmp_path):
    rc, out = _cli(["merge", tmp_path / "runs" / "sft_lora_typo", tmp_path / "merged"], capsys)
    assert rc == 2
    assert "a full model needs no merging" not in out
    assert "does not exist" in out or "no such" in out.lower()


def test_score_with_a_model_that_is_not_a_reward_model_is_not_silent(capsys, rows_file):
    rc, out = _cli(["score", "--model", "tiny", "--input", rows_file, "--output", "-"], capsys)
    assert rc != 0 or "head" in out.lower(), out


def test_score_takes_a_run_directory_like_generate_and_merge(capsys, rm_run, rows_file):
    rc, out = _cli(["score", "--model", rm_run, "--input", rows_file, "--output", "-"], capsys)
    assert rc == 0, out


def test_bad_scalar_override_value_is_blamed_on_the_overrides():
    from posttrain.config import SFTConfig

    for override in ["model.dtype=bf16", "train.lr=abc"]:
        with pytest.raises(ConfigError) as info:
            SFTConfig.load(str(EXAMPLES / "sft_full.yaml"), [override])
        assert str(info.value).startswith("overrides:"), str(info.value)


@pytest.mark.parametrize("override", ["train.lr=[1, 2]", "model.gradient_checkpointing=[true]"])
def test_bad_override_value_is_blamed_on_the_overrides(override):
    from posttrain.config import SFTConfig

    with pytest.raises(ConfigError) as info:
        SFTConfig.load(str(EXAMPLES / "sft_full.yaml"), [override])
    assert str(info.value).startswith("overrides:"), str(info.value)


def test_model_path_at_an_adapter_directory_says_it_is_an_adapter(tmp_path):
    from posttrain.models.loading import resolve_model_path

    adapter = tmp_path / "sft_lora" / "final"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "/x"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as info:
        resolve_model_path(adapter)
    message = str(info.value).replace(str(adapter), "DIR")
    assert "posttrain merge" in message, message  # it is an adapter: say so and how to train from it


def test_model_path_at_a_run_directory_uses_or_names_its_final(tmp_path):
    from posttrain.models.loading import resolve_model_path

    run = tmp_path / "sft_full"
    (run / "final").mkdir(parents=True)
    (run / "final" / "config.json").write_text("{}")
    try:
        assert resolve_model_path(run) == (run / "final").resolve()
    except UserError as exc:
        assert str(run / "final") in str(exc), str(exc)


def test_rm_writes_params_json(rm_run):
    assert (rm_run / "params.json").is_file()


def test_sft_everything_dropped_for_length_names_the_length(capsys, tmp_path):
    rc, out = _cli(["sft", EXAMPLES / "sft_lora.yaml", "data.max_length=8", "data.overlength=drop",
                    "train.max_steps=1", f"output_dir={tmp_path / 'r'}", *QUIET], capsys)
    assert rc == 2
    assert "none of the 0 examples" not in out and "every label is masked" not in out, out


def test_output_dir_that_is_a_file_is_a_one_line_error(capsys, tmp_path):
    target = tmp_path / "afile"
    target.write_text("hi\n")
    try:
        rc, out = _cli(["sft", EXAMPLES / "sft_lora.yaml", "train.max_steps=1", f"output_dir={target}", *QUIET],
                       capsys)
    except FileExistsError as exc:
        pytest.fail(f"traceback instead of an error line: {exc!r}")
    assert rc == 2 and "afile" in out


def test_refused_resume_leaves_the_existing_run_config_alone(capsys, tmp_path):
    run = tmp_path / "run"
    common = [EXAMPLES / "sft_lora.yaml", "train.max_steps=1", f"output_dir={run}", *QUIET]
    rc, out = _cli(["sft", *common, "adapter.method=full", "train.batch_size=2"], capsys)
    assert rc == 0, out
    before = (run / "config.yaml").read_text()
    rc, out = _cli(["sft", *common, "adapter.method=lora", "train.batch_size=2"], capsys)
    assert rc == 2 and "other settings" in out
    assert (run / "config.yaml").read_text() == before


def test_empty_output_dir_is_refused(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc, out = _cli(["sft", EXAMPLES / "sft_lora.yaml", "output_dir=", "train.max_steps=1",
                    f"data.train_files=[{EXAMPLES / 'data' / 'alpaca.jsonl'}]", *QUIET], capsys)
    assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "final").exists(), out
    assert rc == 2, out


def test_duplicate_yaml_section_is_refused(tmp_path):
    from posttrain.config import SFTConfig

    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  lr: 1.0e-3\ntrain:\n  max_steps: 2\n")
    with pytest.raises(ConfigError):
        SFTConfig.load(str(path))
