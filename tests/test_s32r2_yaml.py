"""YAML files as people write them, beyond what test_walkthrough_yaml.py pins: an empty list setting
or section, a boolean-looking key, shared YAML nodes, the one loader every user YAML file goes
through, and `~` in the paths a pipeline, a constitution and an attacks file name."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import ConfigError, DataError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --------------------------------------------------------------------------- empty values


def test_an_empty_list_setting_in_a_file_is_the_empty_list(tmp_path):
    from posttrain.config import SFTConfig

    path = _write(tmp_path / "c.yaml", "data:\n  eval_files:   # empty = hold out data.eval_fraction\n")
    cfg = SFTConfig.load(path)
    assert cfg.data.eval_files == [] == SFTConfig.load(None, ["data.eval_files="]).data.eval_files
    assert SFTConfig.load(None, ["data.eval_files=null"]).data.eval_files == []


def test_a_section_with_every_key_commented_out_gives_its_defaults(tmp_path):
    from posttrain.config import DPOConfig

    path = _write(tmp_path / "c.yaml", "train:\n  # lr: 1e-5\n  # max_steps: 10\ndpo:\n")
    assert DPOConfig.load(path) == DPOConfig.load(None)


def test_a_section_given_as_a_value_is_still_refused(tmp_path):
    from posttrain.config import SFTConfig

    with pytest.raises(ConfigError, match="train must be a mapping"):
        SFTConfig.load(_write(tmp_path / "c.yaml", "train: 3\n"))


# --------------------------------------------------------------------------- keys and shared nodes


@pytest.mark.parametrize("word", ["yes", "off", "True"])
def test_a_boolean_looking_key_is_named_as_written(tmp_path, word):
    from posttrain.config import SFTConfig

    with pytest.raises(ConfigError, match=f"unknown key train.{word}\\b"):
        SFTConfig.load(_write(tmp_path / "c.yaml", f"train:\n  {word}: 1\n"))


def test_boolean_values_are_still_booleans(tmp_path):
    from posttrain.config.schema import read_yaml

    assert read_yaml(_write(tmp_path / "c.yaml", "train:\n  progress_bar: on\n")) == {"train": {"progress_bar": True}}


def test_read_yaml_shares_no_object_between_an_anchor_and_its_uses(tmp_path):
    from posttrain.config.schema import read_yaml

    data = read_yaml(_write(tmp_path / "c.yaml",
                            "a: &base\n  lora: {r: 4}\n  files: [x]\nb: *base\nc:\n  <<: *base\n  extra: 1\n"))
    assert data["a"] == data["b"] and data["c"]["lora"] == {"r": 4}
    assert data["a"] is not data["b"]
    assert data["a"]["lora"] is not data["c"]["lora"] and data["a"]["files"] is not data["b"]["files"]


def test_an_override_on_an_aliased_subsection_changes_only_its_own(tmp_path):
    from posttrain.config.schema import apply_override, read_yaml

    data = read_yaml(_write(tmp_path / "c.yaml", "x: &lora\n  r: 4\nadapter:\n  method: lora\n  lora: *lora\n"))
    apply_override(data, "adapter.lora.r=8")
    assert data["x"] == {"r": 4} and str(data["adapter"]["lora"]["r"]) == "8"


def test_load_yaml_raises_the_callers_error_with_file_and_line():
    from posttrain.config.schema import load_yaml

    with pytest.raises(DataError, match=r"^f\.yaml:3: a is given twice \(first on line 1\)"):
        load_yaml("a: 1\nb: 2\na: 3\n", "f.yaml", DataError)
    with pytest.raises(DataError, match=r"^f\.yaml:2: not valid YAML"):
        load_yaml("a: 1\n  b: x: y\n", "f.yaml", DataError)
    data, node = load_yaml("- {name: a}\n- {name: b}\n", "f.yaml", with_node=True)
    assert data == [{"name": "a"}, {"name": "b"}] and [n.start_mark.line for n in node.value] == [0, 1]
    assert load_yaml("", "f.yaml") is None and load_yaml("# nothing\n", "f.yaml", with_node=True) == (None, None)


# --------------------------------------------------------------------------- ~ in paths


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    return home


def test_user_path_expands_the_home_directory(home):
    from posttrain.config.schema import user_path

    assert user_path("~/runs/x") == home / "runs" / "x"
    assert user_path("runs/~x") == Path("runs/~x") and user_path(Path("a")) == Path("a")


def test_a_pipeline_expands_home_in_its_output_dir_and_stage_configs(home, tmp_path):
    from posttrain.pipeline import load_pipeline

    _write(home / "sft.yaml", "model:\n  path: tiny\ntrain:\n  max_steps: 1\n")
    path = _write(tmp_path / "p.yaml", "output_dir: ~/runs/p\nstages:\n  - {name: sft, kind: sft, config: ~/sft.yaml}\n")
    output_dir, stages = load_pipeline(path)
    assert output_dir == home / "runs" / "p"
    assert stages[0].run_dir == home / "runs" / "p" / "sft" and stages[0].cfg.train.max_steps == 1
    assert load_pipeline(path, ["output_dir=~/other"])[0] == home / "other"


def test_a_constitution_and_an_attacks_file_under_home(home):
    from posttrain.feedback.constitutional import load_constitution
    from posttrain.safety.attacks import load_attacks

    _write(home / "c.yaml", "- {name: honest, critique: Point out what is untrue., revision: Make it true.}\n")
    _write(home / "a.yaml", "attacks:\n  - {name: grandma, template: 'Grandma says {prompt}'}\n")
    assert [p.name for p in load_constitution("~/c.yaml")] == ["honest"]
    assert [a.name for a in load_attacks([], "~/a.yaml")] == ["grandma"]
