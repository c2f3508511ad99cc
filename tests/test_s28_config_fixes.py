"""Config, model-path and run-directory fixes of the walkthrough reviews (test_walkthrough_training.py
and test_walkthrough_rl.py pin the user-facing cases): the corners those tests leave out."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import ConfigError, UserError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# --------------------------------------------------------------------------- duplicate YAML keys


def _load(tmp_path: Path, text: str):
    from posttrain.config import SFTConfig

    path = tmp_path / "c.yaml"
    path.write_text(text)
    return SFTConfig.load(str(path))


def test_duplicate_key_inside_a_section_names_both_lines(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "train:\n  lr: 1.0e-3\n  max_steps: 2\n  lr: 2.0e-3\n")
    assert str(info.value).startswith(f"{tmp_path / 'c.yaml'}:4: lr is given twice (first on line 2)")


def test_duplicate_top_level_section_names_its_line(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "train:\n  lr: 1.0e-3\nmodel:\n  path: tiny\ntrain:\n  max_steps: 2\n")
    assert str(info.value).startswith(f"{tmp_path / 'c.yaml'}:5: train is given twice (first on line 1)")


def test_merge_key_settings_may_be_set_again(tmp_path):
    # `<<: *base` then one of its keys: YAML's way to override, not a duplicate
    cfg = _load(tmp_path, "train: &t\n  lr: 1.0e-3\n  max_steps: 3\neval:\n  exact_match_prompts: 0\n")
    assert cfg.train.max_steps == 3
    from posttrain.config import read_yaml

    path = tmp_path / "m.yaml"
    path.write_text("base: &b {lr: 1, max_steps: 3}\ntrain:\n  <<: *b\n  lr: 2\n")
    assert read_yaml(path)["train"] == {"lr": 2, "max_steps": 3}


def test_same_key_in_two_sections_is_fine(tmp_path):
    cfg = _load(tmp_path, "adapter:\n  lora:\n    dropout: 0.1\nmodel:\n  path: tiny\n")
    assert cfg.adapter.lora.dropout == 0.1


# --------------------------------------------------------------------------- override values


@pytest.mark.parametrize("override", ["adapter.lora={r: [1]}", "adapter.lora={r: x}", "train.lr=null",
                                      "model.dtype='bf16'", 'train.freeze=[[a]]'])
def test_every_override_value_is_blamed_on_the_overrides(override):
    from posttrain.config import SFTConfig

    with pytest.raises(ConfigError) as info:
        SFTConfig.load(str(EXAMPLES / "sft_full.yaml"), [override])
    assert str(info.value).startswith("overrides:"), str(info.value)


def test_override_values_parse_as_before():
    from posttrain.config import SFTConfig

    cfg = SFTConfig.load(str(EXAMPLES / "sft_full.yaml"),
                         ["train.freeze=[a, b]", "output_dir=010", "adapter.lora={r: 4}", "adapter.lora.alpha=3",
                          "data.train_files=x.jsonl", 'model.path="tiny"'])
    assert cfg.train.freeze == ["a", "b"] and cfg.output_dir == "010"
    assert (cfg.adapter.lora.r, cfg.adapter.lora.alpha) == (4, 3.0)
    assert cfg.data.train_files == ["x.jsonl"] and cfg.model.path == "tiny"
    assert type(cfg.train.freeze) is list and type(cfg.data.train_files) is list  # plain lists, as YAML dumps them


def test_a_file_value_is_still_blamed_on_the_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, "train:\n  lr: [1, 2]\n")
    assert str(info.value).startswith(str(tmp_path / "c.yaml"))


# --------------------------------------------------------------------------- output_dir


@pytest.mark.parametrize("where", ["file", "override"])
def test_empty_output_dir_is_refused_at_load(tmp_path, where):
    from posttrain.config import GRPOConfig

    path = tmp_path / "c.yaml"
    path.write_text("output_dir: ''\n" if where == "file" else "{}\n")
    with pytest.raises(ConfigError) as info:
        GRPOConfig.load(str(path), ["output_dir="] if where == "override" else [])
    assert "output_dir is empty" in str(info.value)
    assert str(info.value).startswith("overrides:" if where == "override" else str(path))


def test_start_run_refuses_an_empty_output_dir_given_in_code(tmp_path, monkeypatch):
    from posttrain.config import SFTConfig
    from posttrain.train.runs import start_run

    monkeypatch.chdir(tmp_path)
    cfg = SFTConfig()
    cfg.output_dir = ""
    with pytest.raises(ConfigError, match="output_dir is empty"):
        start_run(cfg)
    assert not (tmp_path / "config.yaml").exists()


def test_output_dir_under_a_file_is_a_one_line_error(tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.train.runs import start_run

    (tmp_path / "afile").write_text("hi\n")
    cfg = SFTConfig.load(None, [f"output_dir={tmp_path / 'afile' / 'run'}"])
    with pytest.raises(ConfigError, match="cannot create the run directory"):
        start_run(cfg)


def test_config_yaml_is_written_atomically(tmp_path):
    from posttrain.config import SFTConfig
    from posttrain.train.runs import start_run

    cfg = SFTConfig.load(None, [f"output_dir={tmp_path / 'run'}"])
    run_dir = start_run(cfg)[0]
    assert (run_dir / "config.yaml").is_file()
    # no config.yaml.partial left (.lock: the run directory's writer lock, runs.start_run)
    assert sorted(p.name for p in run_dir.iterdir()) == [".lock", "config.yaml"]


# --------------------------------------------------------------------------- model.path


def _adapter(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "adapter_config.json").write_text('{"peft_type": "LORA", "base_model_name_or_path": "/x"}')
    (directory / "adapter_model.safetensors").write_bytes(b"")
    return directory


def test_run_directory_whose_final_is_an_adapter_says_merge_the_run(tmp_path):
    from posttrain.models.loading import resolve_model_path

    run = tmp_path / "sft_lora"
    _adapter(run / "final")
    with pytest.raises(UserError) as info:
        resolve_model_path(run)
    assert f"posttrain merge {run} OUT_DIR" in str(info.value)


def test_directory_that_is_neither_is_still_refused(tmp_path):
    from posttrain.models.loading import resolve_model_path

    (tmp_path / "empty" / "final").mkdir(parents=True)
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(tmp_path / "empty")


def test_run_directory_is_recorded_as_its_final_model(tmp_path, capsys):
    import shutil

    import yaml

    from posttrain.config import SFTConfig
    from posttrain.models.loading import resolve_model_path
    from posttrain.train.runs import run_fingerprint, start_run

    run = tmp_path / "sft_full"
    shutil.copytree(resolve_model_path("tiny"), run / "final")
    cfg = SFTConfig.load(None, [f"model.path={run}", f"output_dir={tmp_path / 'out'}"])
    fingerprint = run_fingerprint(cfg)
    run_dir = start_run(cfg)[0]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["path"] == str(run / "final")
    assert cfg.model.path == str(run) and run_fingerprint(cfg) == fingerprint  # the caller's config is left alone
    assert "is a run directory" in capsys.readouterr().out


# --------------------------------------------------------------------------- online RL settings


def test_ppo_value_model_path_with_a_head_names_both_settings():
    from posttrain.config.rl import PPOConfig, validate_ppo

    cfg = PPOConfig.load(str(EXAMPLES / "ppo.yaml"), ["ppo.value_model_path=tiny"])
    with pytest.raises(ConfigError) as info:
        validate_ppo(cfg)
    assert "ppo.value_model_path" in str(info.value) and "ppo.value_model=head" in str(info.value)
    validate_ppo(PPOConfig.load(str(EXAMPLES / "ppo.yaml"), ["ppo.value_model_path=tiny", "ppo.value_model=separate"]))


@pytest.mark.parametrize("samples", ["0", "-1"])
def test_eval_samples_below_one_is_refused_unless_eval_is_off(samples):
    from posttrain.config.rl import GRPOConfig, validate_grpo

    with pytest.raises(ConfigError, match="eval.samples"):
        validate_grpo(GRPOConfig.load(str(EXAMPLES / "grpo.yaml"), [f"eval.samples={samples}", "eval.prompts=4"]))
    validate_grpo(GRPOConfig.load(str(EXAMPLES / "grpo.yaml"), [f"eval.samples={samples}", "eval.prompts=0"]))


@pytest.mark.parametrize("generations", ["0", "-2"])
def test_non_positive_generations_are_config_errors(generations):
    from posttrain.config.rl import GRPOConfig, PPOConfig, validate_grpo, validate_ppo

    with pytest.raises(ConfigError, match="num_generations"):
        validate_grpo(GRPOConfig.load(str(EXAMPLES / "grpo.yaml"), [f"rollout.num_generations={generations}"]))
    with pytest.raises(ConfigError, match="num_generations"):
        validate_ppo(PPOConfig.load(str(EXAMPLES / "ppo.yaml"), [f"rollout.num_generations={generations}"]))
