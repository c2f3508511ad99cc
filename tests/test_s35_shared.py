"""Rules the demo shares with evaluate and the pipeline (stop 35, backlog items: write no code twice).

Pinned: the sampled KL is written in one place (`eval.report.kl_figure`), so evaluate's report.md and
the demo's report line give it in the same words: a sampled estimate over its responses, with its
standard error, and for a negative figure whether it is within 2 standard errors of 0; report.json
holds that standard error (kl_se) and the responses it is over (kl_responses) beside the mean, from
the per-response values `rollouts._sequence_kl` returns. A `STAGE.KEY=value` override whose KEY the
stage has no section for is refused by one rule (`pipeline.check_stage_item`) in the pipeline and in
the demo, naming STAGE.STAGE.KEY only where that is a setting of the stage.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from posttrain.errors import ConfigError

QUIET = {"log": lambda _: None}


def _report(kl, se=None, responses=None) -> dict:
    def rate(successes: int, n: int) -> dict:
        return {"rate": successes / n, "n": n, "successes": successes, "ci95": [0.0, 1.0]}

    red = {"attack_success": rate(30, 30), "over_refusal": rate(0, 10)}
    side = {"exact_match": rate(180, 200), "answer_nll": 0.1, "redteam": red}
    report = {"policy": "p", "reference": "r", "prompts": 200, "kl_to_reference": kl,
              "models": {"policy": side, "reference": side}}
    if se is not None or responses is not None:
        report |= {"kl_se": se, "kl_responses": responses}
    return report


def _both(report: dict) -> tuple[str, str]:
    """The KL as the demo's report line and evaluate's report.md give it."""
    from posttrain.demo import report_summary
    from posttrain.eval.report import markdown

    demo = report_summary(report, Path("r/report.md"))
    [line] = [x for x in markdown(report).splitlines() if "KL" in x]
    return demo, line


# --------------------------------------------------------------------------- item 1: one KL caveat


@pytest.mark.parametrize("kl, se, responses", [(-0.004, 0.003, 800), (0.067, 0.01, 800), (-0.05, 0.01, 800),
                                               (-0.004, None, None), (None, None, None)])
def test_the_demo_and_the_report_give_the_kl_in_the_same_words(kl, se, responses):
    from posttrain.eval.report import kl_figure

    figure = kl_figure(_report(kl, se, responses))
    demo, md = _both(_report(kl, se, responses))
    # measured before: the demo said "within sampling noise of 0", report.md "an unbiased estimate, which a
    # few samples of near-equal models can put below 0; raise generation.samples"
    assert f"KL {figure}" in demo and md.endswith(figure)


def test_a_kl_with_its_standard_error_and_count():
    from posttrain.eval.report import kl_figure

    assert kl_figure(_report(0.067, 0.01, 800)) == "0.067 ± 0.010 nats per response (a sampled estimate over 800 responses)"
    assert kl_figure(_report(None)) == "not measured (no samples, or the two tokenizers differ)"
    assert kl_figure(_report(0.03)) == "0.030 nats per response (a sampled estimate)"  # a report before kl_se


def test_a_negative_kl_says_whether_it_is_within_two_standard_errors_of_0():
    from posttrain.eval.report import kl_figure

    near = kl_figure(_report(-0.004, 0.003, 800))
    assert near.startswith("-0.004 ± 0.003 nats per response (a sampled estimate over 800 responses; within 2 "
                           "standard errors of 0")
    far = kl_figure(_report(-0.05, 0.01, 800))
    assert "more than 2 standard errors below 0" in far and "within" not in far
    unknown = kl_figure(_report(-0.004, None, 1))  # one response: no standard error
    assert "standard error" not in unknown and "never below 0" in unknown and "generation.samples" in unknown
    assert "below 0" not in kl_figure(_report(0.0, 0.0, 8))


# --------------------------------------------------------------------------- item 3: the KL's standard error


def test_report_json_holds_the_kls_standard_error_from_the_per_response_values(tmp_path, monkeypatch):
    import posttrain.train.rollouts as rollouts
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval.alignment import mean_and_se, run_evaluate

    values = [0.1, -0.3, 0.2, 0.0]
    seen = []

    def per_response(model, tokenizer, prompt_ids, completions, *args, **kwargs):
        seen.append(len(completions))
        return values

    monkeypatch.setattr(rollouts, "_sequence_kl", per_response)
    cfg = EvaluateConfig.load(None, [f"output_dir={tmp_path / 'ev'}", "policy=tiny", "reference=tiny",
                                     "prompts.limit=2", "generation.max_new_tokens=2", "generation.samples=2"])
    out = run_evaluate(cfg, **QUIET)
    report = json.loads((out / "report.json").read_text())
    expected = mean_and_se(values)  # measured before: report.json held the mean alone
    assert seen == [4]
    assert report["kl_to_reference"] == pytest.approx(expected["mean"])
    assert report["kl_se"] == pytest.approx(expected["se"]) and report["kl_responses"] == 4
    md = (out / "report.md").read_text()
    assert f"{expected['mean']:.3f} ± {expected['se']:.3f} nats per response (a sampled estimate over 4 " in md


def test_sequence_kl_gives_one_value_per_response(tmp_path):
    """The same weights as reference: every response's log π − log π_ref is 0; the values are per
    response, the held-out RL figure their mean."""
    import copy

    import torch

    from posttrain.inference import load_for_inference
    from posttrain.train.rollouts import _sequence_kl

    model, tokenizer = load_for_inference("tiny")
    prompts, completions = [[5, 6, 7], [8, 9]], [[10, 11], [12]]
    same = _sequence_kl(model, tokenizer, prompts, completions, torch.no_grad, copy.deepcopy(model))
    assert same == [0.0, 0.0]
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    values = _sequence_kl(model, tokenizer, prompts, completions, torch.no_grad, other)
    assert len(values) == 2 and all(math.isfinite(v) for v in values) and values[0] != values[1]


def test_the_demo_prints_the_kl_with_its_standard_error():
    from posttrain.demo import report_summary

    text = report_summary(_report(0.067, 0.01, 800), Path("r/report.md"))
    assert "per token, KL 0.067 ± 0.010 nats per response (a sampled estimate over 800 responses)" in text


# --------------------------------------------------------------------------- item 2: one stage-key rule


def _pipeline(tmp_path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "stages": [
        {"name": "sft", "kind": "sft", "overrides": {"model.path": "tiny"}},
        {"name": "dpo", "kind": "dpo", "inputs": {"model.path": "sft"}}]}))
    return path


def _refusal(call) -> str:
    with pytest.raises(ConfigError) as caught:
        call()
    return str(caught.value)


def test_the_pipeline_and_the_demo_refuse_a_misread_stage_key_in_the_same_words(tmp_path):
    from posttrain.demo import demo_stages
    from posttrain.pipeline import check_stage_item, load_pipeline

    from posttrain.config import DPOConfig

    said = _refusal(lambda: check_stage_item(DPOConfig, "dpo", "beta=0.2"))
    assert said == ("override 'dpo.beta=0.2' reads as stage 'dpo', key 'beta', which the dpo stage does not have; "
                    "for its dpo.beta, write dpo.dpo.beta=0.2")
    # measured before: the pipeline said "override dpo.'beta=0.2' ... which is not a dpo key; for that stage's ..."
    assert _refusal(lambda: load_pipeline(_pipeline(tmp_path), ["dpo.beta=0.2"])).endswith(said)
    assert _refusal(lambda: demo_stages(str(tmp_path / "demo"), ["dpo.beta=0.2"])).endswith(said)
    check_stage_item(DPOConfig, "dpo", "dpo.beta=0.2")  # the stage's own section: no refusal


@pytest.mark.parametrize("item, meant", [("sft.lr=1", "did you mean train.lr?"), ("sft.foo=1", "unknown key foo")])
def test_the_pipeline_names_stage_stage_key_only_where_the_stage_has_it(tmp_path, item, meant):
    from posttrain.demo import demo_stages
    from posttrain.pipeline import load_pipeline

    for said in (_refusal(lambda: load_pipeline(_pipeline(tmp_path), [item])),
                 _refusal(lambda: demo_stages(str(tmp_path / "demo"), [item]))):
        # measured before (pipeline): "for that stage's sft.lr, write sft.sft.lr=1", which SFT has not
        assert "sft.sft." not in said and meant in said, said
