"""Adapter settings checked before any work (stop 33): a setting no chosen method reads is refused,
in a stage's own config; one set for every stage of a pipeline goes to the stages whose methods read
it. Target errors name the target as written: a regex quoted with its `re:` and a path it must match,
a non-linear module named as such, all-linear alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from posttrain.config import AdapterConfig, RMConfig, SFTConfig, validate_rm, validate_sft
from posttrain.errors import ConfigError
from posttrain.models.adapters import apply_adapters, validate_adapter
from posttrain.models.loading import load_model
from posttrain.pipeline import load_pipeline

PRESET = "tiny-2l"
SFT = {"name": "sft", "kind": "sft", "overrides": {"train.max_steps": 1, "data.synthetic_size": 16}}
DPO = {"name": "dpo", "kind": "dpo", "overrides": {"train.max_steps": 1, "data.synthetic_size": 16}}


def _cfg(method, **sections) -> AdapterConfig:
    cfg = AdapterConfig(method=list(method) if isinstance(method, (list, tuple)) else [method])
    for section, values in sections.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, value)
    return cfg


def _load(tmp_path: Path, stages: list[dict], cli_overrides=(), **top):
    path = tmp_path / "pipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), **top, "stages": stages}))
    return {s.name: s for s in load_pipeline(path, list(cli_overrides))[1]}


# --------------------------------------------------------------------------- settings no method reads


@pytest.mark.parametrize("overrides, named", [
    (["adapter.method=lora", "adapter.quantization.quant_type=fp4"], r"adapter\.quantization\.quant_type=fp4 .*qlora"),
    (["adapter.method=dora", "adapter.freeze.modules=[lm_head*]"], r"adapter\.freeze\.modules.*adapter\.method dora"),
    (["adapter.method=freeze", "adapter.freeze.top_layers=1", "adapter.ia3.target_modules=[k_proj]"],
     r"adapter\.ia3\.target_modules"),
    (["adapter.method=lora", "adapter.virtual_tokens.num_virtual_tokens=4"], r"prefix or prompt"),
    (["adapter.method=bottleneck", "adapter.lora.lr_ratio_b=16"], r"only adapter\.method lora, dora or qlora"),
])
def test_a_setting_no_chosen_method_reads_is_named(overrides, named):
    with pytest.raises(ConfigError, match=named):
        validate_sft(SFTConfig.load(None, ["model.path=tiny-2l", *overrides]))


@pytest.mark.parametrize("overrides", [
    ["adapter.method=dora", "adapter.lora.r=4"],
    ["adapter.method=[lora, bottleneck]", "adapter.lora.r=4", "adapter.bottleneck.size=8"],
    ["adapter.method=prompt", "adapter.virtual_tokens.num_virtual_tokens=4"],
    ["adapter.method=freeze", "adapter.freeze.top_layers=1"],
])
def test_settings_the_chosen_methods_read_pass(overrides):
    validate_sft(SFTConfig.load(None, ["model.path=tiny-2l", *overrides]))


def test_a_reward_model_reads_only_the_lora_section():
    validate_rm(RMConfig.load(None, ["adapter.method=lora", "adapter.lora.r=4"]))
    validate_rm(RMConfig.load(None, ["adapter.method=dora"]))  # lora with adapter.lora.dora
    with pytest.raises(ConfigError, match=r"adapter\.lora\.r=4 does nothing with adapter\.method full"):
        validate_rm(RMConfig.load(None, ["adapter.lora.r=4"]))
    with pytest.raises(ConfigError, match=r"adapter\.bottleneck\.size"):
        validate_rm(RMConfig.load(None, ["adapter.method=lora", "adapter.bottleneck.size=8"]))


@pytest.mark.parametrize("init_std", [0.0, -1e-3])
def test_a_bottleneck_init_std_at_or_below_zero_is_refused(init_std):
    with pytest.raises(ConfigError, match="init_std must be > 0.*neither ever gets a gradient"):
        validate_adapter(_cfg("bottleneck", bottleneck={"init_std": init_std}))


# --------------------------------------------------------------------------- pipeline-wide settings


def test_a_pipeline_wide_lora_setting_goes_to_the_stages_that_read_it(tmp_path):
    """adapter.lora.r for every stage, one stage lora and one full: the lora stage gets it, the full
    stage runs without it (as before the check), and its fingerprint does not depend on it."""
    stages = _load(tmp_path, [{**SFT, "overrides": {**SFT["overrides"], "adapter.method": ["lora"]}}, DPO],
                   overrides={"adapter.lora.r": 4})
    assert stages["sft"].cfg.adapter.lora.r == 4
    assert stages["dpo"].cfg.adapter.lora.r == AdapterConfig().lora.r
    assert "adapter.lora.r=4" in stages["dpo"].unread
    again = _load(tmp_path, [{**SFT, "overrides": {**SFT["overrides"], "adapter.method": ["lora"]}}, DPO],
                  overrides={"adapter.lora.r": 6})
    assert again["dpo"].fingerprint == stages["dpo"].fingerprint
    assert again["sft"].fingerprint != stages["sft"].fingerprint


def test_a_command_line_virtual_tokens_setting_goes_to_the_prompt_stage_only(tmp_path):
    stages = _load(tmp_path, [{**SFT, "overrides": {**SFT["overrides"], "adapter.method": ["lora"]}},
                              {**SFT, "name": "sft2", "overrides": {**SFT["overrides"], "adapter.method": ["prompt"]}}],
                   ["adapter.virtual_tokens.num_virtual_tokens=4"])
    assert stages["sft2"].cfg.adapter.virtual_tokens.num_virtual_tokens == 4
    assert stages["sft"].cfg.adapter.virtual_tokens.num_virtual_tokens == 16


def test_a_pipeline_wide_setting_no_stage_reads_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"overrides: adapter\.bottleneck\.size=8 is read by no stage.*"
                                          r"stage 'sft': adapter\.bottleneck\.size=8 does nothing"):
        _load(tmp_path, [SFT, DPO], overrides={"adapter.bottleneck.size": 8})


def test_a_stage_own_unread_setting_is_refused_in_a_pipeline(tmp_path):
    with pytest.raises(ConfigError, match=r"stage 'dpo'.*adapter\.lora\.r=4 does nothing with adapter\.method full"):
        _load(tmp_path, [SFT, {**DPO, "overrides": {**DPO["overrides"], "adapter.lora.r": 4}}])


# --------------------------------------------------------------------------- target errors


@pytest.mark.parametrize("method, targets, named", [
    ("lora", ["re:q_proj"], r"re:q_proj matches no module.*whole module path.*model\.layers\.0\.self_attn\.q_proj"
                            r".*write re:\.\*q_proj"),
    ("ia3", ["re:v_proj"], r"re:v_proj matches no module.*model\.layers\.0\.self_attn\.v_proj"),
    ("lora", ["mlp"], r"\[mlp\] names a non-linear module, model\.layers\.0\.mlp of type LlamaMLP.*inside it instead: "
                      r"down_proj, gate_proj, up_proj"),
    ("lora", ["re:.*norm"], r"\[re:\.\*norm\] names a non-linear module"),
    ("ia3", ["embed_tokens"], r"names a non-linear module, model\.embed_tokens of type Embedding"),
    ("lora", ["no_such_proj"], r"'no_such_proj' matches no layer"),
])
def test_target_errors_name_the_target_as_written(method, targets, named):
    with pytest.raises(ConfigError, match=named) as info:
        apply_adapters(load_model(PRESET), _cfg(method, **{method: {"target_modules": targets}}))
    assert "{" not in str(info.value)  # not peft's Python set


@pytest.mark.parametrize("targets, named", [
    (["all-linear", "embed_tokens"], r"all-linear must be the only entry.*to add embed_tokens"),
    (["q_proj", "re:.*v_proj"], r"a 're:<regex>' target must be the only entry"),
    (["re:(q"], r"re:\(q is not a valid regular expression"),
])
def test_target_lists_peft_would_misread_are_refused_before_the_model_loads(targets, named):
    with pytest.raises(ConfigError, match=r"adapter\.lora\.target_modules: " + named):
        validate_adapter(_cfg("lora", lora={"target_modules": targets}))


def test_lora_on_the_embeddings_by_name_still_works():
    model = apply_adapters(load_model(PRESET), _cfg("lora", lora={"target_modules": ["embed_tokens", "q_proj"]}))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("lora_embedding_B" in n for n in names) and any("q_proj.lora_B" in n for n in names)


def test_a_reward_models_lora_targets_are_checked_in_the_users_words():
    """`posttrain rm` with LoRA goes through the same target checks as every other stage
    (build.inject): a regex matching no whole module path is named as written."""
    import torch

    from posttrain.models.loading import load_tokenizer
    from posttrain.models.reward_model import add_lora, load_reward_model

    cfg = RMConfig.from_dict({"adapter": {"method": ["lora"], "lora": {"target_modules": ["re:q_proj"]}}})
    torch.manual_seed(0)
    model = load_reward_model("tiny", pad_token_id=load_tokenizer("tiny").pad_token_id)
    with pytest.raises(ConfigError, match=r"re:q_proj matches no module .* a regex must match a whole module path"):
        add_lora(model, cfg.adapter.lora)
