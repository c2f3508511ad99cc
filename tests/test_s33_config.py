"""Config and preference-loss backlog items (stop 33), each pinned as it should behave.

1. IPO reads per-token average log-probs (policy and reference), as its authors advised after
   Eq. 17 and as TRL's DPOTrainer does for loss_type="ipo": the pure function against the
   formula in float64, and the dpo stage feeding it averages (a strict xfail until the stage
   passes them: train/preference.py's `_ipo`).
2. dpo.beta unset takes the loss's default: 0.1, and SimPO's 2.0 under simpo, with γ = β/2
   (SimPO's γ/β); the resolved values are in the config a run records, and --help says so.
3. A non-finite float assigned in Python is refused by validate_dpo / validate_rm / validate_sft
   for every float setting, by the one check a file's values get (schema.checked).
4. An int setting takes an exact whole number given as a float or as text (YAML 1.1 reads
   `max_steps: 1e3` as text) and refuses 1.5 and '1e-3'; a file's top-level `x-` keys are
   anchor holders (docker-compose's convention), not settings.
5. rm takes adapter.method=dora as lora with adapter.lora.dora, as the other stages do.
6. train.loss is sft's alone: its help says so, and dpo / rm accept it (a pipeline-wide
   override sets it in every stage) without listing it in their --help.
"""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import DPOConfig, RMConfig, SFTConfig, validate_dpo, validate_rm, validate_sft
from posttrain.config.schema import _walk
from posttrain.errors import ConfigError
from posttrain.losses.preference import ipo_loss

# --------------------------------------------------------------------------- 1. IPO on per-token averages


def test_ipo_loss_is_the_formula_on_per_token_average_log_ratios_in_float64():
    g = torch.Generator().manual_seed(3)
    sums = [-(torch.rand(6, generator=g, dtype=torch.float64) * 80) for _ in range(4)]  # pc, pr, rc, rr
    n_w = torch.tensor([1, 4, 17, 40, 100, 3], dtype=torch.float64)
    n_l = torch.tensor([2, 4, 9, 80, 7, 50], dtype=torch.float64)
    pc, pr, rc, rr = sums[0] / n_w, sums[1] / n_l, sums[2] / n_w, sums[3] / n_l
    beta = 0.3
    losses, chosen, rejected = ipo_loss(pc, pr, rc, rr, beta)
    for i in range(6):
        h = (float(sums[0][i]) - float(sums[2][i])) / float(n_w[i]) - (float(sums[1][i]) - float(sums[3][i])) / float(n_l[i])
        assert float(losses[i]) == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-12)
        assert float(chosen[i]) == pytest.approx(beta * (float(sums[0][i]) - float(sums[2][i])) / float(n_w[i]), rel=1e-12)
    # the target is per token: a pair whose average log-ratios differ by 1/(2β) has loss 0, at any length
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(ipo_loss(zero + 1 / (2 * beta), zero, zero, zero, beta)[0]) == 0.0


def _naive(model, example) -> tuple[float, int]:
    """(Σ log-probs of the labelled tokens, their count) from full logits, in float64."""
    with torch.no_grad():
        logprobs = model(input_ids=torch.tensor([example.input_ids])).logits[0].double().log_softmax(-1)
    labelled = [(i, tok) for i, tok in enumerate(example.labels) if tok != -100]
    return sum(float(logprobs[i - 1, tok]) for i, tok in labelled), len(labelled)


def test_the_dpo_stage_feeds_ipo_per_token_averages_of_policy_and_reference():
    from posttrain.config import DPOLossConfig
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import CHATML
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.train.grouped import collate_items, items_from_examples
    from posttrain.train.preference import PreferenceLoss, pair_extras

    tokenizer = load_tokenizer("tiny")
    torch.manual_seed(0)
    model = load_model("tiny").eval()
    record = PreferenceRecord(prompt=[{"role": "user", "content": "Copy: a b"}],
                              responses=["a b", "b a b a b a b a b a"], ranks=[0, 1], source="t:0")
    items = items_from_examples([encode_preference(record, tokenizer, CHATML)])
    items[0].reference_logps = [-3.0, -20.0]
    beta = 0.4
    batch = collate_items(items, tokenizer.pad_token_id) | pair_extras(items)
    with torch.no_grad():
        got, _ = PreferenceLoss(model, DPOLossConfig(loss="ipo", beta=beta))(**batch)
    (s_w, n_w), (s_l, n_l) = (_naive(model, s) for s in items[0].sequences)
    assert n_w != n_l
    h = (s_w - (-3.0)) / n_w - (s_l - (-20.0)) / n_l
    summed = ((s_w + 3.0) - (s_l + 20.0) - 1 / (2 * beta)) ** 2
    expected = (h - 1 / (2 * beta)) ** 2
    assert float(got) == pytest.approx(expected, rel=1e-5), f"stage {float(got)}, per token {expected}, sums {summed}"


# --------------------------------------------------------------------------- 2. per-loss β


def test_an_unset_beta_takes_simpos_default_under_simpo_and_gamma_follows_it():
    simpo = DPOConfig.load(None, ["dpo.loss=simpo"])
    validate_dpo(simpo)
    assert (simpo.dpo.beta, simpo.dpo.simpo_gamma) == (2.0, 1.0)  # SimPO's β, γ/β = 0.5
    assert simpo.to_dict()["dpo"]["beta"] == 2.0 and simpo.to_dict()["dpo"]["simpo_gamma"] == 1.0  # recorded
    assert DPOConfig.load(None, ["dpo.loss=simpo", "dpo.beta=2.5"]).dpo.simpo_gamma == 1.25
    assert DPOConfig.load(None, ["dpo.loss=simpo", "dpo.simpo_gamma=0.3"]).dpo.simpo_gamma == 0.3
    assert DPOConfig.load(None, ["dpo.loss=simpo", "dpo.beta=0.1"]).dpo.beta == 0.1  # a given β is kept
    for loss in ("dpo", "cdpo", "ipo", "hinge", "kto", "orpo"):
        cfg = DPOConfig.load(None, [f"dpo.loss={loss}"])
        validate_dpo(cfg)
        assert (cfg.dpo.beta, cfg.dpo.simpo_gamma) == (0.1, None), loss
    again = DPOConfig.from_dict(simpo.to_dict())  # a run's config.yaml loads back to the same values
    assert again.dpo == simpo.dpo
    with pytest.raises(ConfigError, match="dpo.simpo_gamma=0.7 does nothing with dpo.loss=dpo"):
        validate_dpo(DPOConfig.load(None, ["dpo.simpo_gamma=0.7"]))
    with pytest.raises(ConfigError, match="is not ORPO's weight"):
        validate_dpo(DPOConfig.load(None, ["dpo.loss=orpo", "dpo.beta=0.3"]))


def test_the_help_says_what_an_unset_beta_and_gamma_are():
    lines = {line.split(" (", 1)[0].strip(): line for line in DPOConfig.help_lines()}
    assert "unset: 0.1, under simpo 2.0" in lines["dpo.beta"]
    assert "unset: 0.5 × dpo.beta" in lines["dpo.simpo_gamma"]


# --------------------------------------------------------------------------- 3. non-finite floats set in Python


def _float_keys(cls) -> list[str]:
    return [key for key, hint, _, _ in _walk(cls) if hint is not None and float in (hint, *getattr(hint, "__args__", ()))]


def _assign(cfg, key: str, value) -> None:
    *sections, name = key.split(".")
    node = cfg
    for part in sections:
        node = getattr(node, part)
    setattr(node, name, [value, 0.999] if isinstance(getattr(node, name), list) else value)


@pytest.mark.parametrize("cls, validate", [(DPOConfig, validate_dpo), (RMConfig, validate_rm), (SFTConfig, validate_sft)],
                         ids=["dpo", "rm", "sft"])
def test_every_float_setting_assigned_nan_or_inf_in_python_is_refused_by_validate(cls, validate):
    keys = _float_keys(cls)
    assert len(keys) >= 15 and "train.adam_betas" in keys
    if cls is DPOConfig:
        assert {"dpo.beta", "dpo.simpo_gamma", "dpo.label_smoothing", "dpo.orpo_lambda", "dpo.nll_weight"} <= set(keys)
    accepted = []
    for key in keys:
        for bad in (math.nan, math.inf, -math.inf):
            cfg = cls()
            _assign(cfg, key, bad)
            try:
                validate(cfg)
            except ConfigError as exc:
                assert key in str(exc) and "finite" in str(exc), (key, str(exc))
            else:
                accepted.append((key, bad))
    assert not accepted, f"{len(accepted)} accepted: {accepted[:6]}"


def test_validate_leaves_the_callers_config_as_it_was():
    cfg = DPOConfig()
    cfg.dpo.loss = "simpo"
    cfg.train.max_steps = "5"
    validate_dpo(cfg)
    assert (cfg.train.max_steps, cfg.dpo.simpo_gamma) == ("5", None)


# --------------------------------------------------------------------------- 4. YAML: whole numbers, x- anchors


@pytest.mark.parametrize("text, steps", [("1e3", 1000), ("'100'", 100), ("1000.0", 1000), ("'1e3'", 1000), ("2E+2", 200)])
def test_an_int_setting_takes_an_exact_whole_number_written_as_a_float_or_text(tmp_path, text, steps):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  max_steps: {text}\n")
    assert SFTConfig.load(path).train.max_steps == steps
    cfg = SFTConfig.load(None, [f"train.max_steps={text}"])
    assert cfg.train.max_steps == steps and type(cfg.train.max_steps) is int


@pytest.mark.parametrize("text", ["1.5", "'1e-3'", "1e-3", "abc", ".nan", ".inf", "true", "'1.5'"])
def test_an_int_setting_refuses_what_is_no_whole_number(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"train:\n  max_steps: {text}\n")
    with pytest.raises(ConfigError, match=r"c.yaml: train.max_steps must be an integer, got .*\(a whole number"):
        SFTConfig.load(path)


def test_top_level_x_keys_hold_yaml_anchors_and_are_no_settings(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("x-common: &common\n  lr: 1.0e-4\n  max_steps: 7\nx-note: just text\n"
                    "train:\n  <<: *common\n  batch_size: 2\n")
    cfg = SFTConfig.load(path)
    assert (cfg.train.lr, cfg.train.max_steps, cfg.train.batch_size) == (1e-4, 7, 2)
    assert "x-common" not in cfg.to_dict()
    path.write_text("train:\n  x-common: 1\n")  # only at the top level
    with pytest.raises(ConfigError, match="unknown key train.x-common"):
        SFTConfig.load(path)
    path.write_text("xcommon:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key xcommon"):
        SFTConfig.load(path)


# --------------------------------------------------------------------------- 5. rm: method dora


def test_rm_takes_method_dora_as_lora_with_dora_and_builds_a_dora_reward_model():
    from posttrain.models.loading import load_tokenizer
    from posttrain.train.reward import build_reward_model

    cfg = RMConfig.load(None, ["adapter.method=dora"])
    validate_rm(cfg)
    assert (cfg.adapter.method, cfg.adapter.lora.dora) == (["lora"], True)
    assert cfg.to_dict()["adapter"]["lora"]["dora"] is True
    model = build_reward_model(cfg, load_tokenizer("tiny"), lambda *_: None)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    assert any("lora_magnitude_vector" in name for name in names)
    with pytest.raises(ConfigError, match="full or lora"):
        validate_rm(RMConfig.load(None, ["adapter.method=ia3"]))


# --------------------------------------------------------------------------- 6. train.loss is sft's


def test_train_loss_is_documented_as_sfts_alone_and_other_stages_take_it_silently_by_design():
    sft = next(line for line in SFTConfig.help_lines() if line.startswith("  train.loss ("))
    assert "read by sft alone" in sft and "pipeline-wide" in sft
    for cls in (DPOConfig, RMConfig):
        assert not any(line.startswith("  train.loss (") for line in cls.help_lines()), cls.__name__
        assert any(line.startswith("  train.loss_chunk_size (") for line in cls.help_lines())
        assert cls.load(None, ["train.loss=plain"]).train.loss == "plain"  # a pipeline-wide override's value
