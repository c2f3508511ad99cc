"""Typed configs: YAML + dotted overrides, validation with the closest valid key."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.config import (SFTConfig, evaluate_reference, markdown_reference, preference_reference,
                              quality_reference, redteam_reference, rl_reference, rlaif_reference, synthesis_reference,
                              validate_sft)
from posttrain.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  path: tiny\ntrain:\n  lr: 1e-4\n  freeze: '*embed*'\n")
    cfg = SFTConfig.load(path, ["train.lr=3e-5", "data.packing=true", "adapter.lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.data.packing is True
    assert cfg.adapter.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.freeze == ["*embed*"]  # a single value where a list is expected
    assert SFTConfig.from_dict(cfg.to_dict()) == cfg  # round trip


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key train.lrr; did you mean train.lr?"),
    ("train.packing=true", "did you mean data.packing?"),
    ("gradient_accumulation_steps=4", "did you mean train.grad_accum?"),
    ("train.schedule=cosin", "did you mean cosine?"),
    ("train.batch_size=eight", "train.batch_size must be an integer"),
    ("data.packing=maybe", "data.packing must be true or false"),
    ("model=tiny", "model must be a mapping"),
    ("train.lr", "must look like section.key=value"),
])
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError) as info:
        SFTConfig.load(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="warmup_ratio"):
        validate_sft(SFTConfig.load(None, ["train.warmup_ratio=1.5"]))
    with pytest.raises(ConfigError, match="report_to"):
        validate_sft(SFTConfig.load(None, ["train.report_to=[mlflow]"]))


def test_bad_yaml_gives_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  lr: [1\n  batch_size: 2\n")
    with pytest.raises(ConfigError, match=f"{path}:\\d+: not valid YAML"):
        SFTConfig.load(path)


def test_readme_config_reference_is_current():
    assert markdown_reference(SFTConfig) in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert preference_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert rl_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert rlaif_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert synthesis_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert quality_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert redteam_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
    assert evaluate_reference() in (ROOT / "README.md").read_text(), "regenerate: python -m posttrain.config"
