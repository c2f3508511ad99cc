"""`posttrain demo`: its overrides and what it prints (stop 35, backlog items).

Pinned: an override reaches every demo stage that has the setting (not SFT's alone), STAGE.key=value
reaches one stage, one that no stage reads is refused, and the settings the demo wires between its
stages (each run directory, the later stages' models) are refused; all four configs are built and
checked before SFT starts; `--output-dir A output_dir=B` is refused; the sampled KL is printed as a
sampled estimate, a negative one with the caveat that it is within noise of 0; the sentence after
the red-team figures follows them. No stage trains: configs are built and lines formatted from given
figures.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.errors import ConfigError


def _stages(tmp_path, *overrides):
    from posttrain.demo import demo_stages

    return demo_stages(str(tmp_path / "demo"), list(overrides))


# --------------------------------------------------------------------------- item 1: overrides reach every stage


def test_an_override_reaches_every_stage_that_has_the_setting(tmp_path):
    stages = _stages(tmp_path, "model.dtype=bfloat16", "train.lr=1e-3", "eval.exact_match_prompts=7")
    assert list(stages) == ["sft", "rm", "dpo", "report"]
    for name in ("sft", "rm", "dpo"):  # measured before: rm and dpo stayed float32, dpo's lr 3e-4
        assert stages[name].model.dtype == "bfloat16", name
        assert stages[name].train.lr == 1e-3, name
    assert stages["sft"].eval.exact_match_prompts == stages["dpo"].eval.exact_match_prompts == 7
    assert stages["report"].dtype == "float32"  # evaluate's dtype is its own top-level key


def test_the_demo_keeps_its_own_settings_per_stage_without_overrides(tmp_path):
    stages = _stages(tmp_path)
    sft, rm, dpo, report = stages.values()
    assert (sft.train.lr, rm.train.lr, dpo.train.lr) == (3e-3, 1e-3, 3e-4)
    assert (sft.train.max_steps, rm.train.max_steps, dpo.train.max_steps) == (1600, 150, 150)
    run_dir = tmp_path / "demo"
    assert sft.output_dir == str(run_dir)
    assert (rm.output_dir, dpo.output_dir, report.output_dir) == tuple(str(run_dir / n) for n in ("rm", "dpo", "report"))
    assert rm.model.path == dpo.model.path == report.reference == str(run_dir / "final")
    assert report.policy == str(run_dir / "dpo" / "final")


def test_a_stage_prefix_sets_that_stage_alone(tmp_path):
    stages = _stages(tmp_path, "dpo.train.lr=1e-4", "dpo.dpo.beta=0.2", "report.prompts.limit=5",
                     "sft.train.max_steps=3")
    assert (stages["sft"].train.lr, stages["rm"].train.lr, stages["dpo"].train.lr) == (3e-3, 1e-3, 1e-4)
    assert stages["dpo"].dpo.beta == 0.2 and stages["report"].prompts.limit == 5
    assert (stages["sft"].train.max_steps, stages["rm"].train.max_steps) == (3, 150)


def test_a_stage_prefix_wins_over_an_override_for_every_stage(tmp_path):
    stages = _stages(tmp_path, "rm.train.lr=2e-4", "train.lr=1e-3")
    assert (stages["sft"].train.lr, stages["rm"].train.lr, stages["dpo"].train.lr) == (1e-3, 2e-4, 1e-3)


def test_the_seed_of_sft_is_every_stages_unless_a_stage_sets_its_own(tmp_path):
    stages = _stages(tmp_path, "sft.train.seed=3")
    assert stages["rm"].train.seed == stages["dpo"].train.seed == stages["report"].generation.seed == 3
    stages = _stages(tmp_path, "train.seed=1", "rm.train.seed=5")
    assert (stages["sft"].train.seed, stages["rm"].train.seed, stages["dpo"].train.seed) == (1, 5, 1)
    assert stages["report"].generation.seed == 1


@pytest.mark.parametrize("item, said", [
    ("train.lx=1", "train.lr"),                     # a typo: no stage has it, the closest key is named
    ("nonsense=1", "nonsense"),
    ("rm.eval.exact_match_prompts=3", "rm"),        # the reward model has no eval section
    ("dpo.beta=0.2", "dpo.dpo.beta"),               # stage dpo, key beta: DPO's is dpo.dpo.beta
    ("report.train.lr=1", "report"),
    ("rm", "key=value"),
])
def test_an_override_no_stage_reads_is_refused(tmp_path, item, said):
    with pytest.raises(ConfigError) as caught:
        _stages(tmp_path, item)
    assert said in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("item", ["rm.model.path=x", "dpo.output_dir=x", "report.policy=x", "policy=x",
                                  "reference=x", "sft.output_dir=x"])
def test_the_settings_the_demo_wires_between_stages_are_refused(tmp_path, item):
    with pytest.raises(ConfigError, match="the demo sets it"):
        _stages(tmp_path, item)


def test_model_path_sets_the_model_sft_starts_from_and_the_later_stages_start_from_sft(tmp_path):
    stages = _stages(tmp_path, "model.path=tiny")
    assert stages["sft"].model.path == "tiny"
    assert stages["rm"].model.path == stages["dpo"].model.path == str(tmp_path / "demo" / "final")


def test_every_stage_is_checked_before_sft_starts_or_an_earlier_run_is_removed(tmp_path, monkeypatch):
    import posttrain.train.sft as sft
    from posttrain.demo import run_demo

    def never(cfg):
        raise AssertionError("SFT started")

    monkeypatch.setattr(sft, "run_sft", never)
    earlier = tmp_path / "demo"
    (earlier / "final").mkdir(parents=True)
    (earlier / "config.yaml").write_text("output_dir: demo\n")
    with pytest.raises(ConfigError, match="beta"):  # DPO's cross-field check, before SFT's 1600 steps
        run_demo(str(earlier), ["dpo.dpo.beta=-1"])
    assert (earlier / "final").is_dir()


# --------------------------------------------------------------------------- item 2: --output-dir vs output_dir=


def test_output_dir_override_that_contradicts_output_dir_flag_is_refused(tmp_path):
    with pytest.raises(ConfigError) as caught:  # measured before: B won, silently
        _stages(tmp_path, f"output_dir={tmp_path / 'B'}")
    said = str(caught.value)
    assert str(tmp_path / "B") in said and str(tmp_path / "demo") in said and "--output-dir" in said


def test_output_dir_override_that_agrees_with_the_flag_is_accepted(tmp_path):
    stages = _stages(tmp_path, f"output_dir={tmp_path / 'demo'}")
    assert stages["sft"].output_dir == str(tmp_path / "demo")


def test_the_cli_refuses_output_dir_conflict_in_one_line(tmp_path, capsys, monkeypatch):
    import posttrain.train.sft as sft
    from posttrain import cli

    monkeypatch.setattr(sft, "run_sft", lambda cfg: pytest.fail("SFT started"))

    rc = cli.main(["demo", "--output-dir", str(tmp_path / "A"), f"output_dir={tmp_path / 'B'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "--output-dir" in err[0]
    assert not (tmp_path / "A").exists() and not (tmp_path / "B").exists()


# --------------------------------------------------------------------------- items 3 and 4: the report's lines


def _report(kl, policy_red=(1.0, 0.0), reference_red=(1.0, 0.0), se=0.003) -> dict:
    def side(red):
        return {"exact_match": {"rate": 0.9}, "answer_nll": 0.1,
                "redteam": {"attack_success": {"rate": red[0], "n": 30}, "over_refusal": {"rate": red[1], "n": 10}}}

    return {"prompts": 200, "kl_to_reference": kl, "kl_se": se, "kl_responses": 800,
            "models": {"policy": side(policy_red), "reference": side(reference_red)}}


def test_a_negative_sampled_kl_is_printed_with_its_caveat():
    from posttrain.demo import report_summary

    text = report_summary(_report(-0.004), Path("r/report.md"))
    # measured before: "KL -0.004 nats per response", no word that it is an estimate
    assert "KL -0.004 ± 0.003 nats per response" in text
    assert "sampled estimate over 800 responses" in text and "within 2 standard errors of 0: sampling noise" in text


def test_a_positive_sampled_kl_says_it_is_sampled_without_the_noise_caveat():
    from posttrain.demo import report_summary

    text = report_summary(_report(0.026), Path("r/report.md"))
    assert "KL 0.026 ± 0.003 nats per response (a sampled estimate over 800 responses)" in text
    assert "noise" not in text


def test_an_unmeasured_kl_is_said_so():
    from posttrain.demo import report_summary

    text = report_summary(_report(None, se=None), Path("r/report.md"))
    assert "KL not measured" in text and "None" not in text


def test_no_refusals_is_said_only_when_neither_model_refused():
    from posttrain.demo import report_summary

    quiet = report_summary(_report(0.01), Path("r/report.md"))
    assert "neither model refused any request (the demo's tasks teach no refusals)" in quiet
    # measured before: "(the demo's tasks teach no refusals)" printed beside over-refusal 30%
    refusing = report_summary(_report(0.01, policy_red=(0.5, 0.3)), Path("r/report.md"))
    assert "teach no refusals" not in refusing and "neither model refused" not in refusing
    assert "attack success 50% vs 100% of 30" in refusing and "over-refusal 30% vs 0% of 10" in refusing
    unanswered = _report(0.01)
    unanswered["models"]["policy"]["redteam"]["over_refusal"] = {"rate": None, "n": 0}
    assert "neither model refused" not in report_summary(unanswered, Path("r/report.md"))


def test_the_report_line_names_its_figures_and_file():
    from posttrain.demo import report_summary

    text = report_summary(_report(0.026), Path("r/report.md"))
    assert text.startswith("alignment report, DPO vs SFT model (200 held-out prompts; r/report.md): exact match "
                           "90.0% vs 90.0%, answer NLL 0.100 vs 0.100 per token, KL 0.026 ± 0.003 nats per response")
    assert json.dumps(text)  # one printable string
