"""Config and CLI for a user coming from TRL (session 29): a TRL argument or value name gets the
posttrain setting it means, a TRL-style --flag is answered with its override, and a loss option
the chosen loss never reads is refused even at its default value."""

from __future__ import annotations

import pytest
import torch
import yaml

from posttrain import cli
from posttrain.config import DPOConfig, DPOLossConfig, GRPOConfig, PPOConfig, SFTConfig, validate_dpo
from posttrain.errors import ConfigError


def _load_error(cls, *overrides: str) -> str:
    with pytest.raises(ConfigError) as exc:
        cls.load(None, list(overrides))
    return str(exc.value)


# --------------------------------------------------------------------------- dpo.label_smoothing and dpo.beta


def test_cdpo_without_label_smoothing_trains_with_the_documented_epsilon():
    from posttrain.config.preference import CDPO_LABEL_SMOOTHING
    from posttrain.losses.preference import dpo_loss
    from posttrain.train.preference import PAIR_LOSSES, PairLogps

    logps = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5]), torch.tensor([-1.2, -2.2]), torch.tensor([-2.5, -1.0])]
    pairs = PairLogps(*logps, *[None] * 4)  # cDPO reads the sums alone
    unset = PAIR_LOSSES["cdpo"](DPOLossConfig(loss="cdpo", beta=0.3), pairs)[0]
    expected = dpo_loss(*logps, 0.3, label_smoothing=CDPO_LABEL_SMOOTHING)[0]
    assert CDPO_LABEL_SMOOTHING == 0.1 and torch.equal(unset, expected)
    assert not torch.equal(unset, dpo_loss(*logps, 0.3)[0])  # not plain DPO
    set_ = PAIR_LOSSES["cdpo"](DPOLossConfig(loss="cdpo", beta=0.3, label_smoothing=0.2), pairs)[0]
    assert torch.equal(set_, dpo_loss(*logps, 0.3, label_smoothing=0.2)[0])


@pytest.mark.parametrize("overrides", [
    [], ["dpo.loss=cdpo"], ["dpo.loss=cdpo", "dpo.label_smoothing=0.1"], ["dpo.label_smoothing=null"],
    ["dpo.loss=orpo"], ["dpo.loss=orpo", "dpo.orpo_lambda=0.5"],
    ["dpo.loss=orpo", "dpo.beta=0.1"],  # β at its default is λ's default too: what a TRL user meant
])
def test_loss_options_the_loss_reads_are_accepted(overrides):
    validate_dpo(DPOConfig.load(None, overrides))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "simpo", "orpo"])
def test_label_smoothing_under_another_loss_names_cdpo(loss):
    with pytest.raises(ConfigError) as exc:
        validate_dpo(DPOConfig.load(None, [f"dpo.loss={loss}", "dpo.label_smoothing=0.1"]))
    assert f"dpo.label_smoothing=0.1 does nothing with dpo.loss={loss}" in str(exc.value)
    assert str(exc.value).endswith("set dpo.loss=cdpo"), str(exc.value)


def test_orpo_beta_names_the_lambda_to_set():
    with pytest.raises(ConfigError) as exc:
        validate_dpo(DPOConfig.load(None, ["dpo.loss=orpo", "dpo.beta=0.25"]))
    assert "set dpo.orpo_lambda=0.25" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("loss", ["dpo", "cdpo", "orpo", "kto"])
def test_a_runs_own_config_yaml_loads_and_validates_again(tmp_path, loss):
    """What a run writes to config.yaml (every setting, defaults included) is a config that runs."""
    overrides = [f"dpo.loss={loss}"] + (["data.synthetic_kind=unpaired"] if loss == "kto" else [])
    cfg = DPOConfig.load(None, overrides)
    dumped = tmp_path / "config.yaml"
    dumped.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    again = DPOConfig.load(dumped)
    # cdpo records the ε it trains with (resolved as β is, session 34); the other losses, which do
    # not read it, leave it unset
    assert again == cfg and again.dpo.label_smoothing == (0.1 if loss == "cdpo" else None)
    validate_dpo(again)


# --------------------------------------------------------------------------- TRL names


@pytest.mark.parametrize("cls, override, hint", [
    (PPOConfig, "epsilon=0.2", "did you mean ppo.clip_eps?"),
    (GRPOConfig, "cliprange=0.2", "did you mean grpo.clip_eps?"),
    (PPOConfig, "beta=0.05", "did you mean ppo.kl_coef?"),
    (PPOConfig, "num_ppo_epochs=2", "did you mean ppo.epochs?"),
    (PPOConfig, "cliprange_value=0.2", "did you mean ppo.value_clip?"),
    (DPOConfig, "max_completion_length=64", "did you mean data.max_length?"),
    (DPOConfig, "desirable_weight=1.5", "did you mean dpo.kto_desirable_weight?"),
    (SFTConfig, "lora_alpha=32", "did you mean adapter.lora.alpha?"),
    (SFTConfig, "adapter.lora.lora_alpha=32", "did you mean adapter.lora.alpha?"),
    (SFTConfig, "train.lr_scheduler_type=linear", "did you mean train.schedule?"),
    (GRPOConfig, "reward_funcs=[a]", "did you mean reward.functions?"),
])
def test_trl_names_point_at_the_setting_of_this_command(cls, override, hint):
    assert _load_error(cls, override).endswith(hint)


@pytest.mark.parametrize("cls, override", [
    (SFTConfig, "loss_type=dft"),  # sft has no counterpart of TRL's SFT loss_type
    (SFTConfig, "epsilon=0.2"),
    (DPOConfig, "use_vllm=true"),
])
def test_a_trl_name_without_a_counterpart_gets_no_spelling_guess(cls, override):
    assert "did you mean" not in _load_error(cls, override)


def test_a_trl_name_in_a_yaml_file_gets_the_same_hint(tmp_path):
    path = tmp_path / "grpo.yaml"
    path.write_text("grpo:\n  num_iterations: 2\n")
    with pytest.raises(ConfigError) as exc:
        GRPOConfig.load(path)
    assert str(exc.value).startswith(f"{path}: unknown key grpo.num_iterations; did you mean grpo.updates_per_rollout?")


def test_a_typo_still_gets_its_spelling_match():
    assert _load_error(GRPOConfig, "grpo.updates_per_rolout=2").endswith("did you mean grpo.updates_per_rollout?")


@pytest.mark.parametrize("cls, override, meant", [
    (SFTConfig, "train.optimizer=adamw_torch_fused", "adamw_fused"),
    (SFTConfig, "train.schedule=constant_with_warmup", "constant"),
    (SFTConfig, "model.dtype=bf16", "bfloat16"),
    (SFTConfig, "train.mixed_precision=true", "bf16"),
    (GRPOConfig, "grpo.aggregation=dapo", "token"),
    (GRPOConfig, "grpo.aggregation=grpo", "sequence"),
])
def test_trl_value_names_point_at_the_value(cls, override, meant):
    assert f"; did you mean {meant}?" in _load_error(cls, override)


# --------------------------------------------------------------------------- TRL-style flags


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        rc = cli.main(list(argv))
    except SystemExit as exc:
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def test_each_flag_is_answered_with_its_override_and_overrides_after_it_are_not_its_value(capsys, tmp_path):
    (tmp_path / "grpo.yaml").write_text("train:\n  max_steps: 1\n")
    rc, out = _cli(capsys, "grpo", str(tmp_path / "grpo.yaml"), "--learning-rate=1e-4", "--use_vllm", "train.max_steps=2", "--num_iterations", "2",
                   "--no_such_thing", "3")
    assert rc == 2 and out.count("\n") == 1, out
    assert out.startswith("error: posttrain grpo takes settings as KEY=VALUE overrides")
    assert "--learning-rate=1e-4 is train.lr=1e-4" in out
    assert "--use_vllm is rollout.engine (rollout.engine=vllm)" in out  # not rollout.engine=train.max_steps=2
    assert "--num_iterations 2 is grpo.updates_per_rollout=2" in out
    assert "--no_such_thing 3 has no counterpart" in out


def test_a_flag_with_no_config_file_keeps_its_value(capsys, tmp_path, monkeypatch):
    """`posttrain dpo --beta 0.2`: argparse takes 0.2 for the config file, and the answer lost it."""
    monkeypatch.chdir(tmp_path)
    rc, out = _cli(capsys, "dpo", "--beta", "0.2")
    assert rc == 2 and "--beta 0.2 is dpo.beta=0.2" in out
    (tmp_path / "0.2").write_text("train:\n  max_steps: 1\n")  # a config file of that name is the file
    rc, out = _cli(capsys, "dpo", "--beta", "0.2")
    assert rc == 2 and "--beta is dpo.beta" in out and "dpo.beta=0.2" not in out


def test_a_command_without_overrides_keeps_argparse_s_answer(capsys):
    rc, out = _cli(capsys, "env", "--learning_rate", "1e-4")
    assert rc == 2 and "unrecognized arguments: --learning_rate 1e-4" in out
