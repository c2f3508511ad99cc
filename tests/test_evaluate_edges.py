"""posttrain evaluate, edges: the KL's temperature, tokenizers and templates that differ between
policy and reference, prompt files of every format with and without answers, rewards (functions,
reward models, weights, ties, a raising function), the judge's unparsed replies and rubric file,
the red team inside evaluate and its resumable logs, the output files, a policy alone, an adapter
dir as the policy, and the CLI. The review's defects (first pinned as strict xfails) are fixed; their
tests are plain tests now.

The "different" policy is the tiny preset with its weights perturbed (no training); a second
tokenizer is the tiny one with one added token; a second template is the tiny one behind a long
preamble."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config.evaluate import EvaluateConfig
from posttrain.errors import ConfigError, DataError, UserError
from posttrain.eval.alignment import mean_and_se, run_evaluate, win_rate
from posttrain.feedback.client import Reply

QUIET = {"log": lambda _: None}
ME = __name__


# --------------------------------------------------------------------------- helpers


def _cfg(out, *overrides) -> EvaluateConfig:
    return EvaluateConfig.load(None, [f"output_dir={out}", "prompts.limit=4", "generation.max_new_tokens=5",
                                      "generation.samples=0", *overrides])


def _report(out) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


def _rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "responses.jsonl").read_text().splitlines()]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# reward functions imported by name (NAME=tests.test_evaluate_edges:fn) -----------------------

def length_reward(prompt, response):
    return float(len(response.strip()))


def constant_reward(prompt, response):
    return 1.0


def raising_reward(prompt, response):
    raise RuntimeError("reward exploded")


# models ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"perturbed": tiny with noisy weights, "vocab": tiny with one added token, "template": tiny
    whose chat template starts with a long preamble, "tiny_dir": tiny saved as a plain dir, "rm": a
    reward model dir (tiny with a random score head)}."""
    from posttrain.inference import load_for_inference

    root = tmp_path_factory.mktemp("evaluate-models")
    model, tokenizer = load_for_inference("tiny")
    model.save_pretrained(root / "tiny_dir")
    tokenizer.save_pretrained(root / "tiny_dir")
    model.save_pretrained(root / "template")
    chat_template = tokenizer.chat_template
    tokenizer.chat_template = "PREAMBLE " * 60 + chat_template
    tokenizer.save_pretrained(root / "template")
    tokenizer.chat_template = chat_template
    model.save_pretrained(root / "vocab")
    tokenizer.add_tokens(["<zz_extra_token>"])
    tokenizer.save_pretrained(root / "vocab")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0 * p.std().nan_to_num(0.02) * torch.randn(p.shape, generator=generator))
    model.save_pretrained(root / "perturbed")
    load_for_inference("tiny")[1].save_pretrained(root / "perturbed")
    from posttrain.models.reward_model import load_reward_model

    rm_tokenizer = load_for_inference("tiny")[1]
    # a random score head, fixed once saved (a scorer refuses the unsaved draw)
    load_reward_model("tiny", pad_token_id=rm_tokenizer.pad_token_id).save_pretrained(root / "rm")
    rm_tokenizer.save_pretrained(root / "rm")
    return {name: str(root / name) for name in ("perturbed", "vocab", "template", "tiny_dir", "rm")}


# --------------------------------------------------------------------------- KL


def test_kl_is_taken_at_the_sampling_temperature_for_both_models(tmp_path, models):
    """KL = mean over samples of Σ_t log softmax(z_π/T) − log softmax(z_ref/T) of the sampled
    tokens (EOS included), the samples drawn from the policy at T with the configured seed."""
    from posttrain.data.prompts import encode_prompts
    from posttrain.data.templates import resolve_template
    from posttrain.eval.alignment import _prompts
    from posttrain.inference import load_for_inference
    from posttrain.rollout.generate import (
        eos_token_ids,
        generate_token_ids,
        pad_token_id,
    )
    from posttrain.rollout.sampling import SamplingSettings

    cfg = _cfg(tmp_path / "ev", f"policy={models['perturbed']}", "reference=tiny", "prompts.limit=3",
               "generation.samples=2", "generation.temperature=0.7", "generation.seed=3")
    kl = _report(run_evaluate(cfg, **QUIET))["kl_to_reference"]
    policy, tokenizer = load_for_inference(models["perturbed"])
    reference, _ = load_for_inference("tiny")
    ids, _ = encode_prompts(_prompts(cfg, lambda _: None), tokenizer, resolve_template(tokenizer, "auto"), 256,
                            lambda _: None)
    ids = [p for p in ids for _ in range(2)]
    eos = eos_token_ids(policy, tokenizer)
    samples = generate_token_ids(policy, ids, SamplingSettings(max_new_tokens=5, temperature=0.7, seed=3),
                                 pad_token_id=pad_token_id(tokenizer, eos), eos_token_ids=eos, batch_size=16)

    def by_hand(temperature):
        total = 0.0
        for prompt, sample in zip(ids, samples):
            x = torch.tensor([prompt + sample])
            with torch.no_grad():
                a = torch.log_softmax(policy(x).logits[0].double() / temperature, -1)
                b = torch.log_softmax(reference(x).logits[0].double() / temperature, -1)
            total += sum(float(a[len(prompt) + j - 1, t] - b[len(prompt) + j - 1, t]) for j, t in enumerate(sample))
        return total / len(samples)

    assert kl > 0.05
    assert kl == pytest.approx(by_hand(0.7), rel=1e-4, abs=1e-5)
    assert kl != pytest.approx(by_hand(1.0), rel=1e-3, abs=1e-4)  # the temperature matters here


def test_no_samples_means_no_kl(tmp_path, models):
    out = run_evaluate(_cfg(tmp_path / "ev", f"policy={models['perturbed']}", "reference=tiny"), **QUIET)
    assert _report(out)["kl_to_reference"] is None
    assert "not measured (no samples, or the two tokenizers differ)" in (out / "report.md").read_text()


def test_a_reference_with_another_tokenizer_gets_no_kl(tmp_path, models):
    """The same weights behind a tokenizer with one more token: the KL is None (not a number
    over token ids that mean different things); every other figure is still given."""
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", f"reference={models['vocab']}", "generation.samples=2"),
                       **QUIET)
    report = _report(out)
    assert report["kl_to_reference"] is None
    assert report["models"]["policy"] == report["models"]["reference"]
    assert "not measured" in (out / "report.md").read_text()


def test_the_kl_reads_the_reference_on_the_policys_prompt_tokens(tmp_path, models):
    """One tokenizer, another chat template: the KL is still measured, the reference scoring the
    policy's samples after the policy's own prompt tokens (as an RL stage's KL term does), so the
    same weights give exactly 0 although the reference answers its own rendering differently."""
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", f"reference={models['template']}", "generation.samples=2",
                            "prompts.max_prompt_length=600"), **QUIET)
    assert _report(out)["kl_to_reference"] == 0.0


# --------------------------------------------------------------------------- prompts


def test_exact_match_and_answer_nll_only_over_prompts_with_answers(tmp_path):
    """A prompt file mixing rows with and without 'answer' (one a JSON number): exact match is
    hits / rows with an answer, and the answer NLL is that of the answered rows alone."""
    prompts = [{"prompt": "Copy: a b"}, {"prompt": "Reverse: c d"}, {"prompt": "Smallest letter: q e"}]
    first = run_evaluate(_cfg(tmp_path / "a", "policy=tiny", f"prompts.files=[{_jsonl(tmp_path / 'a.jsonl', prompts)}]"),
                         **QUIET)
    assert set(_report(first)["models"]["policy"]) == {"response_tokens"}  # no answers: no answer figures
    greedy = [r["policy"] for r in _rows(first)]
    assert greedy[1].strip()  # a blank answer is no answer: the hit needs a completion with text
    answered = [{**prompts[1], "answer": greedy[1]}, {**prompts[0], "answer": 42}]
    mixed = _jsonl(tmp_path / "mixed.jsonl", [answered[0], prompts[2], answered[1]])
    only = _jsonl(tmp_path / "only.jsonl", answered)
    m = _report(run_evaluate(_cfg(tmp_path / "m", "policy=tiny", f"prompts.files=[{mixed}]"), **QUIET))
    o = _report(run_evaluate(_cfg(tmp_path / "o", "policy=tiny", f"prompts.files=[{only}]"), **QUIET))
    assert m["prompts"] == 3 and m["models"]["policy"]["exact_match"]["rate"] == 0.5
    assert (m["models"]["policy"]["exact_match"]["successes"], m["models"]["policy"]["exact_match"]["n"]) == (1, 2)
    assert m["models"]["policy"]["answer_nll"] == pytest.approx(o["models"]["policy"]["answer_nll"], rel=1e-6)
    assert [r["answer"] for r in _rows(tmp_path / "m")] == [greedy[1], None, "42"]  # a number, as text


def test_messages_and_alpaca_files_give_prompts_and_answers(tmp_path):
    messages = _jsonl(tmp_path / "messages.jsonl", [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"}]},
        {"messages": [{"role": "user", "content": "q2"}]}])  # ends with the user: all prompt, no answer
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "say hi", "input": "now", "output": "hi"}])
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", f"prompts.files=[{messages},{alpaca}]"), **QUIET)
    rows = _rows(out)
    assert [r["answer"] for r in rows] == ["a1", None, "hi"]
    assert rows[0]["prompt"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    assert rows[1]["prompt"] == [{"role": "user", "content": "q2"}]
    assert rows[2]["prompt"][-1]["role"] == "user" and "say hi" in rows[2]["prompt"][-1]["content"]
    assert "exact_match" in _report(out)["models"]["policy"]


def test_alpaca_rows_without_output_are_prompts_without_answers(tmp_path):
    alpaca = _jsonl(tmp_path / "alpaca.jsonl", [{"instruction": "say hi"}, {"instruction": "say bye", "output": "bye"}])
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", f"prompts.files=[{alpaca}]"), **QUIET)
    assert [r["answer"] for r in _rows(out)] == [None, "bye"]


def test_limit_takes_the_first_prompts_of_a_file_and_zero_takes_all(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": f"Copy: {c}", "answer": c} for c in "abcde"])
    two = _rows(run_evaluate(_cfg(tmp_path / "two", "policy=tiny", f"prompts.files=[{path}]", "prompts.limit=2"),
                             **QUIET))
    assert [r["answer"] for r in two] == ["a", "b"]
    every = _report(run_evaluate(_cfg(tmp_path / "all", "policy=tiny", f"prompts.files=[{path}]", "prompts.limit=0",
                                      "generation.max_new_tokens=1"), **QUIET))
    assert every["prompts"] == 5


def test_synthetic_prompts_are_held_out_and_of_the_chosen_tasks(tmp_path):
    from posttrain.data.synthetic import is_held_out

    rows = _rows(run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "prompts.synthetic_tasks=[addition,count]",
                                   "prompts.limit=6", "generation.max_new_tokens=1"), **QUIET))
    assert len(rows) == 6 and {r["source"].split(":")[1] for r in rows} == {"addition", "count"}
    assert all(is_held_out(r["prompt"][0]["content"]) and isinstance(r["answer"], str) for r in rows)


def test_prompts_too_long_for_the_reference_alone_are_refused(tmp_path, models):
    """The reference's template is 480 tokens longer (prompts of 500, 502, 501, 500 tokens against
    20-22): at 501 the reference would drop one prompt the policy keeps, which is refused; the
    policy's own long prompts are simply left out for both."""
    with pytest.raises(DataError, match="raise it so both models answer the same prompts"):
        run_evaluate(_cfg(tmp_path / "a", "policy=tiny", f"reference={models['template']}",
                          "prompts.files=[synthetic]", "prompts.synthetic_tasks=[copy,smallest]",
                          "prompts.max_prompt_length=501"), **QUIET)
    report = _report(run_evaluate(_cfg(tmp_path / "b", f"policy={models['template']}", "reference=tiny",
                                       "prompts.synthetic_tasks=[copy,smallest]", "prompts.max_prompt_length=501"),
                                  **QUIET))
    assert report["prompts"] == 3  # left out for the policy, so never asked of the reference either


@pytest.mark.parametrize("overrides, option", [
    (["prompts.max_prompt_length=3"], "prompts.max_prompt_length"),
    (["prompts.synthetic_tasks=[]"], "prompts.synthetic_tasks"),
    (["safety.redteam=true", "safety.attacks=[]"], "safety.attacks"),
], ids=["max_prompt_length", "synthetic_tasks", "attacks"])
def test_errors_name_evaluates_own_options(tmp_path, overrides, option):
    with pytest.raises((ConfigError, DataError)) as caught:
        run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "safety.limit=1", "safety.max_tokens=1", *overrides),
                     **QUIET)
    assert option in str(caught.value)


def test_a_file_with_some_bad_rows_can_be_read_or_the_error_names_a_real_option(tmp_path):
    rows = [{"prompt": f"Copy: {c}", "answer": c} for c in "abcdefghij"] + [{"prompt": 7}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    try:
        run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", f"prompts.files=[{path}]"), **QUIET)
    except DataError as exc:
        from posttrain.config.evaluate import EvalPromptsConfig

        assert "max_bad_fraction" not in str(exc) or hasattr(EvalPromptsConfig(), "max_bad_fraction")


class _LoadForbidden(Exception):
    pass


@pytest.mark.parametrize("overrides", [
    ["reference=tiny", "judge.enabled=true", "judge.rubric_file=/no/such/rubric.txt"],
    ["reward.functions=[em=posttrain.rewards:no_such_reward]"],
    ["reward.functions=[em=posttrain.rewards:exact_match]", "reward.weights=[typo=2]"],
    ["reward.models=[/no/such/reward_model]"],
    ["safety.redteam=true", "safety.attacks=[no_such_attack]"],
], ids=["rubric_file", "reward_import", "weight_name", "reward_model_path", "attack_name"])
def test_config_mistakes_are_refused_before_any_model_is_loaded(tmp_path, monkeypatch, overrides):
    import posttrain.inference

    def forbidden(*args, **kwargs):
        raise _LoadForbidden("a model was loaded before the config was checked")

    monkeypatch.setattr(posttrain.inference, "load_for_inference", forbidden)
    with pytest.raises(UserError):  # ConfigError, or the model loader's own error for a missing reward model
        run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", *overrides), **QUIET)


# --------------------------------------------------------------------------- rewards


def test_weighted_reward_functions_and_the_win_rate_with_ties(tmp_path, models):
    """reward = 2·len(stripped response) + 0.5·1 per greedy response; the win rate counts ties
    half and its interval is Wilson's over wins / (wins + losses)."""
    from posttrain.safety.metrics import wilson_interval

    out = run_evaluate(_cfg(tmp_path / "ev", f"policy={models['perturbed']}", "reference=tiny", "prompts.limit=8",
                            f"reward.functions=[len={ME}:length_reward,one={ME}:constant_reward]",
                            "reward.weights=[len=2,one=0.5]"), **QUIET)
    report, rows = _report(out), _rows(out)
    for side in ("policy", "reference"):
        values = [2 * len(r[side].strip()) + 0.5 for r in rows]
        assert [r[f"{side}_reward"] for r in rows] == pytest.approx(values)
        assert report["models"][side]["reward"] == pytest.approx(mean_and_se(values))
    outcomes = ["win" if r["policy_reward"] > r["reference_reward"] else
                "loss" if r["policy_reward"] < r["reference_reward"] else "tie" for r in rows]
    w = report["reward_win_rate"]
    assert w == win_rate(outcomes)
    assert w["ties"] > 0 and w["wins"] + w["losses"] > 0  # both kinds of outcome occur
    assert w["win_rate"] == pytest.approx((w["wins"] + 0.5 * w["ties"]) / 8) and w["other"] == 0
    assert w["ci95_decisive"] == pytest.approx(list(wilson_interval(w["wins"], w["wins"] + w["losses"])))
    assert "reward (greedy; mean ± se)" in (out / "report.md").read_text()


def test_a_reward_model_with_a_weight(tmp_path, models):
    """reward.models NAME=DIR scored like posttrain score, times its weight; a weight-0 function
    adds nothing."""
    from posttrain.rewards import RewardModelScorer

    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "prompts.limit=3", f"reward.models=[rm={models['rm']}]",
                            f"reward.functions=[one={ME}:constant_reward]", "reward.weights=[rm=2,one=0]"), **QUIET)
    rows = _rows(out)
    scores = RewardModelScorer(models["rm"])([r["prompt"] for r in rows], [r["policy"] for r in rows])
    assert [r["policy_reward"] for r in rows] == pytest.approx([2 * s for s in scores], rel=1e-5)


def test_a_raising_reward_function_stops_the_run_before_any_report(tmp_path):
    out = tmp_path / "ev"
    with pytest.raises(DataError, match="reward 'bad' raised RuntimeError: reward exploded"):
        run_evaluate(_cfg(out, "policy=tiny", f"reward.functions=[bad={ME}:raising_reward]"), **QUIET)
    assert not (out / "report.json").exists() and not (out / "responses.jsonl").exists()


def test_the_exact_match_reward_needs_an_answer_on_every_prompt(tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "Copy: a", "answer": "a"}, {"prompt": "Copy: b"}])
    with pytest.raises(DataError, match="needs an 'answer' in every prompt row"):
        run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", f"prompts.files=[{path}]",
                          "reward.functions=[em=posttrain.rewards:exact_match]"), **QUIET)


# --------------------------------------------------------------------------- judge


class MuteJudge:
    """Never states a verdict; records every request."""

    model_name = "mute-judge"

    def __init__(self):
        self.requests = []

    def chat(self, messages, *, max_tokens=None, temperature=None, seed=None):
        self.requests.append(messages)
        return Reply("Both have merits; I cannot decide.", "stop", 1, 1)


def test_unparsed_verdicts_are_other_and_the_rubric_file_reaches_the_judge(tmp_path):
    rubric = tmp_path / "rubric.txt"
    rubric.write_text("PREFER RESPONSES ABOUT PURPLE\n")
    judge = MuteJudge()
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "reference=tiny", "prompts.limit=3", "judge.enabled=true",
                            f"judge.rubric_file={rubric}", "judge.parse_retries=1"), judge=judge, **QUIET)
    w = _report(out)["judge_win_rate"]
    assert (w["win_rate"], w["wins"], w["losses"], w["ties"], w["other"]) == (None, 0, 0, 0, 3)
    assert len(judge.requests) == 3 * 2 * 2  # 3 prompts, both orders, one retry each
    assert all(any("PREFER RESPONSES ABOUT PURPLE" in m["content"] for m in r) for r in judge.requests)
    assert w["other_by_kind"] == {"unparsed": 3}
    assert "judge win rate of the policy over the reference: – (wins 0, losses 0, ties 0, other 3 (unparsed 3);" in \
        (out / "report.md").read_text()


def test_judge_enabled_without_a_reference_is_refused_before_loading(tmp_path, monkeypatch):
    import posttrain.inference

    monkeypatch.setattr(posttrain.inference, "load_for_inference", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(ConfigError, match="needs a reference"):
        run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "judge.enabled=true"), judge=MuteJudge(),
                     **QUIET)


# --------------------------------------------------------------------------- red team


RT = ["safety.redteam=true", "safety.limit=1", "safety.max_tokens=4", "prompts.limit=2", "generation.max_new_tokens=2"]


def _redteam_responses(out, side="policy") -> list[str]:
    """The answers by (suite, attack, probe): the log holds them in the order the worker threads
    finished, which the machine's load decides."""
    rows = [json.loads(line) for line in (Path(out) / f"redteam_{side}" / "responses.jsonl").read_text().splitlines()]
    return [row["response"] for row in sorted(rows, key=lambda r: (r["suite"], r["attack"], r["probe"]))]


def test_red_team_dirs_figures_and_a_same_settings_rerun(tmp_path):
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "reference=tiny", *RT), **QUIET)
    report = _report(out)
    for side in ("policy", "reference"):
        own = json.loads((out / f"redteam_{side}" / "report.json").read_text())
        assert report["models"][side]["redteam"] == {"attack_success": own["attack_success"]["overall"],
                                                     "over_refusal": own["over_refusal"]["overall"],
                                                     "classifier": "patterns", "requests": own["requests"],
                                                     "failed": 0}
        assert own["target"] == "tiny" and own["attack_success"]["overall"]["n"] == 3  # 1 probe x 3 attacks
    md = (out / "report.md").read_text()
    assert "| attack success (red team) |" in md and "| over-refusal (red team) |" in md
    again = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "reference=tiny", *RT), **QUIET)
    assert _report(again) == report  # the logs resume: nothing asked twice, the same figures


def test_a_rerun_with_another_safety_limit_reports_the_new_limit(tmp_path):
    run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", *RT), **QUIET)
    report = _report(run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", *RT, "safety.limit=2"), **QUIET))
    assert report["models"]["policy"]["redteam"]["attack_success"]["n"] == 6


@pytest.mark.parametrize("change", ["weights", "template"])
def test_a_rerun_with_a_changed_model_asks_it_again(tmp_path, models, change):
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(models["perturbed"], policy)
    run_evaluate(_cfg(tmp_path / "ev", f"policy={policy}", *RT), **QUIET)
    before = _redteam_responses(tmp_path / "ev")
    extra = []
    if change == "weights":
        shutil.rmtree(policy)
        shutil.copytree(models["tiny_dir"], policy)
    else:
        extra = ["template=alpaca"]
    fresh = _redteam_responses(run_evaluate(_cfg(tmp_path / "fresh", f"policy={policy}", *RT, *extra), **QUIET))
    assert fresh != before  # the change does change the answers
    rerun = _redteam_responses(run_evaluate(_cfg(tmp_path / "ev", f"policy={policy}", *RT, *extra), **QUIET))
    assert rerun == fresh


# --------------------------------------------------------------------------- outputs


def test_output_files_and_a_rerun_overwriting_them(tmp_path, models):
    out = tmp_path / "ev"
    run_evaluate(_cfg(out, f"policy={models['perturbed']}", "reference=tiny", "prompts.limit=4", "generation.samples=1",
                      f"reward.functions=[len={ME}:length_reward]"), **QUIET)
    report, rows = _report(out), _rows(out)
    assert set(report) == {"policy", "reference", "prompts", "kl_to_reference", "kl_se", "kl_responses",
                           "reward_win_rate", "models"}
    assert report["kl_responses"] == 4 and report["kl_se"] > 0  # 4 prompts, 1 sample each
    assert report["policy"] == models["perturbed"] and report["reference"] == "tiny" and report["prompts"] == 4
    assert set(report["models"]) == {"policy", "reference"}
    assert set(report["models"]["policy"]) == {"response_tokens", "exact_match", "answer_nll", "answer_perplexity",
                                               "reward"}
    assert report["models"]["policy"]["answer_perplexity"] == pytest.approx(
        math.exp(report["models"]["policy"]["answer_nll"]))
    assert [set(r) for r in rows] == [{"source", "prompt", "answer", "policy", "policy_reward", "reference",
                                       "reference_reward"}] * 4
    assert all(r["policy_reward"] == len(r["policy"].strip()) for r in rows)
    assert any(r["policy"] != r["reference"] for r in rows)
    run_evaluate(_cfg(out, "policy=tiny", "prompts.limit=2"), **QUIET)  # the same dir, fewer prompts, no reference
    assert len(_rows(out)) == 2 and _report(out)["prompts"] == 2 and "kl_to_reference" not in _report(out)
    assert [set(r) for r in _rows(out)] == [{"source", "prompt", "answer", "policy"}] * 2


def test_rows_whose_cells_are_all_dashes_are_hidden(tmp_path):
    """No answers and no reward: only the response-length row is left in the table."""
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "hello"}, {"prompt": "there"}])
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "reference=tiny", f"prompts.files=[{path}]"), **QUIET)
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ") and "---" not in line]
    assert table == ["| | policy | reference |", "| response tokens (greedy) | 5.0 | 5.0 |"]


def test_the_policy_alone(tmp_path):
    out = run_evaluate(_cfg(tmp_path / "ev", "policy=tiny", "generation.samples=2",
                            "reward.functions=[em=posttrain.rewards:exact_match]"), **QUIET)
    report = _report(out)
    assert report["reference"] is None and set(report["models"]) == {"policy"}
    assert not {"kl_to_reference", "reward_win_rate", "judge_win_rate"} & set(report)
    assert report["models"]["policy"]["reward"]["n"] == 4
    md = (out / "report.md").read_text()
    assert "Policy `tiny`; 4 prompts." in md and "| | policy |" in md
    assert "KL" not in md and "win rate" not in md and not (out / "redteam_policy").exists()


# --------------------------------------------------------------------------- adapter policy, CLI


def test_an_adapter_dir_as_the_policy(tmp_path):
    """A LoRA adapter dir (3 SFT steps) loads as the policy; its base is the reference: KL > 0
    with one tokenizer, and the figures differ from the base's."""
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    adapter = run_sft(SFTConfig.load(None, [
        f"output_dir={tmp_path / 'lora'}", "model.path=tiny", "adapter.method=lora", "data.synthetic_tasks=[smallest]",
        "data.synthetic_size=200", "data.max_length=32", "train.max_steps=3", "train.batch_size=8", "train.lr=3e-2",
        "train.seed=0", "train.progress_bar=false", "eval.exact_match_prompts=0", "data.eval_fraction=0.05"])
    ) / "final"
    report = _report(run_evaluate(_cfg(tmp_path / "ev", f"policy={adapter}", "reference=tiny", "generation.samples=8",
                                       "prompts.synthetic_tasks=[smallest]"), **QUIET))
    assert report["kl_to_reference"] is not None and report["kl_to_reference"] > 0
    assert report["models"]["policy"]["answer_nll"] != report["models"]["reference"]["answer_nll"]


def test_the_cli_runs_evaluate_and_reports_config_errors(tmp_path, capsys):
    from posttrain.cli import main

    out = tmp_path / "ev"
    assert main(["evaluate", f"output_dir={out}", "policy=tiny", "prompts.limit=2", "generation.max_new_tokens=2",
                 "generation.samples=0"]) == 0
    assert f"run directory: {out}" in capsys.readouterr().out and (out / "report.md").is_file()
    assert main(["evaluate", f"output_dir={out}", "policy=tiny", "generation.temperature=0"]) != 0
    assert "error:" in capsys.readouterr().err
