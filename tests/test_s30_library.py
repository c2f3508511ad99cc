"""The Python API's config checks (library walk, s30): the checked copy a run works on, the
message a wrong config gets, overrides as a list, and the range checks made before the model loads.
No model is loaded: every test takes milliseconds."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import posttrain as P
from posttrain import config as C
from posttrain.errors import ConfigError


def test_for_run_returns_a_checked_copy_and_leaves_the_callers_config_as_it_was(tmp_path):
    cfg = P.SFTConfig.from_dict({"output_dir": str(tmp_path / "a")})
    cfg.output_dir = tmp_path / "run"
    cfg.train.lr = "3e-4"
    checked = P.SFTConfig.for_run(cfg, "run_sft")
    assert (checked.output_dir, checked.train.lr) == (str(tmp_path / "run"), 3e-4)
    assert (cfg.output_dir, cfg.train.lr) == (tmp_path / "run", "3e-4")  # the caller's object, untouched
    assert checked is not cfg and checked.train is not cfg.train


def test_for_run_names_a_misspelt_attribute_in_a_nested_section():
    cfg = P.GRPOConfig()
    cfg.rollout.top_q = 0.9
    with pytest.raises(ConfigError, match=r"GRPOConfig: unknown key rollout\.top_q; did you mean rollout\.top_p\?"):
        P.GRPOConfig.for_run(cfg, "run_grpo")


@pytest.mark.parametrize("cls, runner, given, article", [
    (P.SFTConfig, "run_sft", {}, "an"), (P.DPOConfig, "run_dpo", C.RMConfig(), "a"),
    (P.RedTeamConfig, "run_redteam", None, "a"), (P.EvaluateConfig, "run_evaluate", "x.yaml", "an"),
])
def test_a_wrong_object_is_a_type_error_naming_the_config_and_how_to_make_one(cls, runner, given, article):
    name = cls.__name__
    with pytest.raises(TypeError) as exc:
        cls.for_run(given, runner)
    assert str(exc.value) == (f"{runner} takes {article} {name} ({name}.from_dict / {name}.load), "
                              f"got {type(given).__name__}")


def test_one_string_of_overrides_is_refused_saying_they_are_a_list():
    with pytest.raises(TypeError, match=r'SFTConfig\.load: overrides are a list of "section\.key=value" strings'):
        P.SFTConfig.load(None, "train.lr=1e-4")
    assert P.SFTConfig.load(None, ("train.lr=1e-4",)).train.lr == 1e-4  # any sequence of strings


def test_paths_and_numpy_numbers_are_taken_where_files_and_floats_are():
    import numpy as np

    cfg = P.DPOConfig.from_dict({"data": {"train_files": Path("a.jsonl"), "eval_files": [Path("b.jsonl")]},
                                 "train": {"lr": np.float32(0.5), "weight_decay": np.int64(1)}})
    assert (cfg.data.train_files, cfg.data.eval_files) == (["a.jsonl"], ["b.jsonl"])
    assert (cfg.train.lr, cfg.train.weight_decay) == (0.5, 1.0) and type(cfg.train.weight_decay) is float
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        P.SFTConfig.from_dict({"train": {"max_steps": np.bool_(True)}})


def test_the_class_docstring_keeps_its_own_text_before_the_settings():
    @dataclasses.dataclass
    class Mine(P.SFTConfig):
        """My sweep's config."""

    assert Mine.__doc__.startswith("My sweep's config.\n\nSettings")
    assert "  train.lr (float, default 2e-05): peak learning rate" in Mine.__doc__.splitlines()


@pytest.mark.parametrize("cls, validate, overrides, message", [
    (C.DPOConfig, C.validate_dpo, ["eval.exact_match_prompts=2", "eval.max_new_tokens=0"], "eval.max_new_tokens"),
    (C.DPOConfig, C.validate_dpo, ["data.synthetic_size=1"], "data.synthetic_size must be at least 2"),
    (C.RMConfig, C.validate_rm, ["data.synthetic_tasks=[smallest, smalest]"], "unknown 'smalest'; choose from"),
    (C.GRPOConfig, C.validate_grpo, ["data.train_files=[]"], "data.train_files is empty"),
    (C.EvaluateConfig, C.validate_evaluate, ["prompts.synthetic_tasks=[]"], "prompts.synthetic_tasks is empty"),
])
def test_shared_data_and_eval_checks_hold_in_every_stage(cls, validate, overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        validate(cls.load(None, overrides))


def test_settings_that_are_off_are_not_range_checked():
    C.validate_sft(C.SFTConfig.load(None, ["eval.max_new_tokens=0"]))  # exact match is off
    C.validate_sft(C.SFTConfig.load(None, ["data.train_files=[a.jsonl]", "data.synthetic_tasks=[]",
                                           "data.synthetic_size=0"]))  # no synthetic data
    C.validate_grpo(C.GRPOConfig.load(None, ["train.seed=4294967295", "rollout.top_p=1"]))


def test_the_loop_puts_the_callers_grad_mode_back_when_it_fails():
    from posttrain.train.loop import train

    torch.set_grad_enabled(False)
    try:
        with pytest.raises(AttributeError):
            train(object(), object(), Path("."), object())  # fails on its first line, inside enable_grad
        assert not torch.is_grad_enabled()
    finally:
        torch.set_grad_enabled(True)
