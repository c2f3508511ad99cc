"""Preference stage after the review of KTO / ORPO / cDPO against their papers (session 34): cdpo's
ε recorded as the value used (and an older run's `label_smoothing: null` still loading), an
explicit ε of 0 accepted under the losses that do not read it, KTO's per-class figures, and the
honest word on a one-item KTO set's KL estimate."""

from __future__ import annotations

import pytest
import torch
import yaml

from posttrain.config import DPOConfig, DPOLossConfig, validate_dpo
from posttrain.config.preference import CDPO_LABEL_SMOOTHING
from posttrain.errors import ConfigError
from tests.test_accumulation_equivalence_edges import PAD, _accelerator, _kto_items, _lm, _NoClip, _seq_logp

# --------------------------------------------------------------------------- 1. cdpo's ε, recorded


def test_cdpo_config_records_the_epsilon_it_trains_with():
    cfg = DPOConfig.load(None, ["dpo.loss=cdpo"])
    validate_dpo(cfg)
    assert cfg.dpo.label_smoothing == CDPO_LABEL_SMOOTHING == 0.1
    assert cfg.to_dict()["dpo"]["label_smoothing"] == 0.1  # what config.yaml holds
    assert DPOConfig.load(None, ["dpo.loss=cdpo", "dpo.label_smoothing=0.2"]).dpo.label_smoothing == 0.2
    assert DPOConfig.load(None, ["dpo.loss=cdpo", "dpo.label_smoothing=0.0"]).dpo.label_smoothing == 0.0  # = dpo
    for loss in ("dpo", "ipo", "hinge", "simpo", "orpo", "kto"):
        assert DPOConfig.load(None, [f"dpo.loss={loss}"]).dpo.label_smoothing is None, loss  # not read: unset


def test_an_older_cdpo_config_yaml_with_label_smoothing_null_loads_as_the_epsilon_it_trained_with(tmp_path):
    """A cdpo run from before ε was resolved wrote `label_smoothing: null` and trained with 0.1."""
    recorded = DPOConfig.load(None, ["dpo.loss=cdpo"]).to_dict()
    recorded["dpo"]["label_smoothing"] = None
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(recorded, sort_keys=False))
    again = DPOConfig.load(path)
    validate_dpo(again)
    assert again.dpo.label_smoothing == 0.1


def test_the_fingerprint_change_null_to_the_default_epsilon_is_the_same_training():
    """A checkpoint of an older cdpo run holds dpo.label_smoothing: null, this version 0.1 for the
    same training: `config.preference.same_as_recorded_earlier` says so for the resume check (runs.py
    has to consult it). So does an older non-simpo run's simpo_gamma 0.5 (its default then, unread)."""
    from posttrain.config.preference import same_as_recorded_earlier
    from posttrain.train.runs import run_fingerprint

    now = run_fingerprint(DPOConfig.load(None, ["dpo.loss=cdpo"]))
    assert now["dpo.label_smoothing"] == 0.1
    assert same_as_recorded_earlier("dpo.label_smoothing", None, 0.1)
    assert not same_as_recorded_earlier("dpo.label_smoothing", None, 0.2)  # trained with 0.1: other training
    assert not same_as_recorded_earlier("dpo.label_smoothing", 0.1, None)
    assert same_as_recorded_earlier("dpo.simpo_gamma", 0.5, None)  # before da668b6 every run recorded γ = 0.5
    assert not same_as_recorded_earlier("dpo.simpo_gamma", 0.5, 1.0)  # simpo at its new defaults: other training
    assert not same_as_recorded_earlier("dpo.beta", 0.1, 2.0)


def test_the_loss_reads_the_recorded_epsilon():
    from posttrain.losses.preference import dpo_loss
    from posttrain.train.preference import PAIR_LOSSES, PairLogps

    logps = [torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.5]), torch.tensor([-1.2, -2.2]), torch.tensor([-2.5, -1.0])]
    pairs = PairLogps(*logps, *[None] * 4)
    c = DPOConfig.load(None, ["dpo.loss=cdpo", "dpo.beta=0.3"]).dpo
    assert torch.equal(PAIR_LOSSES["cdpo"](c, pairs)[0], dpo_loss(*logps, 0.3, label_smoothing=c.label_smoothing)[0])


# --------------------------------------------------------------------------- 2. ε = 0 means off


@pytest.mark.parametrize("loss", ["dpo", "ipo", "hinge", "simpo", "orpo", "kto"])
def test_an_explicit_zero_label_smoothing_is_off_under_any_loss(loss):
    """TRL configs commonly carry label_smoothing: 0.0; it is the absence of smoothing, not a setting
    the loss ignores. It is recorded as unset (null), as the loss does not read it."""
    extra = ["data.synthetic_kind=unpaired"] if loss == "kto" else []
    cfg = DPOConfig.load(None, [f"dpo.loss={loss}", "dpo.label_smoothing=0.0"] + extra)
    validate_dpo(cfg)
    assert cfg.dpo.label_smoothing is None
    assert cfg.dpo == DPOConfig.load(None, [f"dpo.loss={loss}"] + extra).dpo  # the same run, the same fingerprint


@pytest.mark.parametrize("value", ["0.05", "0.2"])
def test_a_nonzero_label_smoothing_under_another_loss_is_still_refused(value):
    with pytest.raises(ConfigError, match=f"dpo.label_smoothing={value} does nothing with dpo.loss=ipo"):
        validate_dpo(DPOConfig.load(None, ["dpo.loss=ipo", f"dpo.label_smoothing={value}"]))


def test_a_zero_assigned_in_python_under_dpo_is_accepted_too():
    cfg = DPOConfig()
    cfg.dpo.label_smoothing = 0.0
    validate_dpo(cfg)


# --------------------------------------------------------------------------- 3. KTO's per-class figures


KTO_C = DPOLossConfig(loss="kto", beta=0.5, kto_desirable_weight=1.5, kto_undesirable_weight=0.7)


def _expected_per_class(items):
    model = _lm(tied=True)
    out = {}
    with torch.no_grad():
        for name, want in (("chosen", True), ("rejected", False)):
            logps = [float(_seq_logp(model, it.sequences[0])[0]) for it in items if bool(it.desirable) == want]
            refs = [it.reference_logps[0] for it in items if bool(it.desirable) == want]
            if logps:
                out[f"logps/{name}"] = sum(logps) / len(logps)
                out[f"rewards/{name}"] = sum(KTO_C.beta * (a - b) for a, b in zip(logps, refs)) / len(logps)
    return out


def _step(tmp_path, items, groups):
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import _train_step
    from posttrain.train.preference import PreferenceLoss, kto_extras

    module = PreferenceLoss(_lm(tied=True), KTO_C, chunk_size=5)
    stage = GroupedStage(module, items, [], TrainConfig(batch_size=4), PAD, kto_extras)
    micro = [stage.collate([items[i] for i in g]) for g in groups]
    return _train_step(module, stage, micro, _accelerator(tmp_path), _NoClip())[2]


@pytest.mark.parametrize("split", ["whole", "by_class", "uneven"])
def test_kto_logs_each_class_mean_over_the_step_as_trl_does(tmp_path, split):
    """rewards/chosen (rejected): the mean implied reward β(log π − log π_ref) of the step's
    desirable (undesirable) items; logps/chosen (rejected) their mean log π. Over the whole step,
    from counts and sums: a micro-batch holding one class only changes nothing, and a split into
    micro-batches of unequal class mixes is not a mean of their means."""
    items = _kto_items(_lm(tied=True))
    desirable = [i for i, it in enumerate(items) if it.desirable]
    undesirable = [i for i, it in enumerate(items) if not it.desirable]
    assert 1 < len(desirable) < len(items) - 1
    groups = {"whole": [list(range(len(items)))], "by_class": [desirable, undesirable],
              "uneven": [desirable[:1] + undesirable, desirable[1:]]}[split]
    metrics = _step(tmp_path, items, groups)
    expected = _expected_per_class(items)
    assert set(expected) == {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert {"kl", "rewards/signed", "logps"} <= set(metrics)  # kept
    assert not any(key.startswith("_") or "count" in key for key in metrics), sorted(metrics)


def test_kto_step_without_a_class_logs_nothing_for_it(tmp_path):
    """A step of desirable items only has no rejected figures: not NaN, not 0."""
    items = _kto_items(_lm(tied=True))
    only = [i for i, it in enumerate(items) if it.desirable]
    metrics = _step(tmp_path, [items[i] for i in only], [list(range(len(only)))])
    assert "rewards/rejected" not in metrics and "logps/rejected" not in metrics
    expected = _expected_per_class([items[i] for i in only])
    assert metrics["rewards/chosen"] == pytest.approx(expected["rewards/chosen"], rel=1e-6, abs=1e-7)


def test_kto_held_out_figures_are_per_class_too(tmp_path):
    from posttrain.config.sections import TrainConfig
    from posttrain.train.grouped import GroupedStage
    from posttrain.train.loop import evaluate
    from posttrain.train.preference import PreferenceLoss, kto_extras

    items = _kto_items(_lm(tied=True))
    module = PreferenceLoss(_lm(tied=True), KTO_C, chunk_size=5)
    stage = GroupedStage(module, [], items, TrainConfig(batch_size=3), PAD, kto_extras)
    _, metrics = evaluate(module, stage, _accelerator(tmp_path))
    for key, value in _expected_per_class(items).items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key


def test_pair_losses_keep_their_figures():
    """The per-class finishing touches KTO's counts alone: a pair loss's figures pass through."""
    from posttrain.train.grouped import GroupedStage
    from posttrain.config.sections import TrainConfig
    from posttrain.train.preference import PreferenceLoss, pair_extras

    module = PreferenceLoss(_lm(tied=True), DPOLossConfig(loss="dpo"))
    stage = GroupedStage(module, [], [], TrainConfig(), PAD, pair_extras)
    figures = {"rewards/chosen": 0.25, "rewards/rejected": -0.5, "rewards/accuracy": 0.75, "logps/chosen": -3.0}
    assert stage.finish_metrics(dict(figures)) == figures


# --------------------------------------------------------------------------- 4. a one-item KTO set


def _one_item():
    from tests.test_accumulation_equivalence_edges import _ranked_items

    pair = _ranked_items()[0]
    return [type(pair)([pair.sequences[0]], desirable=True, source="held:1")]


def test_a_one_item_kto_set_says_its_z0_is_no_kl_estimate():
    """One item has no other item to take a mismatched response from: its own sequence is its
    partner (log π/π_ref of its own completion, the reward, not a KL estimate), and the log says
    so, naming the set, rather than claiming another item's response."""
    from posttrain.train.preference import kto_items

    said = []
    items = kto_items(_one_item(), 64, said.append, split="held-out")
    own, partner = items[0].sequences
    assert partner.input_ids == own.input_ids  # still its own sequence: there is no other
    assert len(said) == 1 and "another item" not in said[0], said
    assert "held-out" in said[0] and "one item" in said[0] and "not a KL estimate" in said[0], said


def test_two_items_of_one_prompt_still_say_they_share_it():
    from posttrain.train.preference import kto_items
    from tests.test_accumulation_equivalence_edges import _ranked_items

    said = []
    kto_items(_ranked_items()[:1], 64, said.append)
    assert len(said) == 1 and "same prompt" in said[0] and "another item's response" in said[0], said
