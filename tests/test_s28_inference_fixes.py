"""Session 28 fixes to generate / score / merge and the rewards, past what the walkthrough tests
pin: a policy as a reward model in RL and evaluate, a policy adapter as PPO's critic, the reward
function errors, prompt files read by the data readers, and merge's and generate's outputs."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest

from posttrain import cli
from posttrain.errors import ConfigError, DataError, UserError

ROOT = Path(__file__).resolve().parents[1]


def _cli(capsys, *argv) -> tuple[int, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.fixture(scope="module")
def policy_adapter(tmp_path_factory) -> Path:
    """A one-step RLOO LoRA run: its final/ is a causal-LM adapter."""
    import os

    out = tmp_path_factory.mktemp("rloo") / "run"
    here = os.getcwd()
    os.chdir(ROOT)
    try:
        rc = cli.main(["rloo", "examples/grpo_rloo_lora.yaml", "train.max_steps=1", "eval.prompts=0",
                       "train.progress_bar=false", f"output_dir={out}"])
    finally:
        os.chdir(here)
    assert rc == 0
    return out


# --------------------------------------------------------------------------- not a reward model


def test_rl_reward_models_refuse_a_policy(capsys):
    from posttrain.config import GRPOConfig
    from posttrain.train.rollouts import build_reward

    with pytest.raises(UserError, match=r"tiny is not a reward model: it has no trained reward head.*posttrain rm"):
        build_reward(GRPOConfig.load(None, ["reward.models=[tiny]"]), "cpu")


def test_evaluate_reward_models_refuse_a_policy(tmp_path):
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval.alignment import run_evaluate

    cfg = EvaluateConfig.load(None, [f"output_dir={tmp_path / 'ev'}", "policy=tiny", "prompts.limit=2",
                                     "generation.max_new_tokens=2", "generation.samples=0", "reward.models=[tiny]"])
    with pytest.raises(UserError, match="not a reward model"):
        run_evaluate(cfg, log=lambda line: None)


def test_a_lora_reward_model_keeps_its_head_and_a_headless_one_is_named():
    from posttrain.config import LoraConfig
    from posttrain.models.reward_model import add_lora, check_trained_head, load_reward_model, untrained_modules

    model = load_reward_model("tiny")
    assert untrained_modules(model) == ["score"]
    with pytest.raises(UserError, match="lacks score"):
        check_trained_head(model, "tiny")
    assert untrained_modules(add_lora(model, LoraConfig())) == []  # the adapter trains and saves the head


def test_a_policy_adapter_as_the_ppo_critic_is_a_one_line_error(capsys, tmp_path, policy_adapter, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out = _cli(capsys, "ppo", "examples/ppo.yaml", "train.max_steps=1", "train.batch_size=8", "eval.prompts=0",
                   "train.progress_bar=false", "ppo.value_model=separate",
                   f"ppo.value_model_path={policy_adapter / 'final'}", f"output_dir={tmp_path / 'ppo'}")
    assert rc == 2 and "is a policy (causal LM) adapter, not a reward model" in out, out


# --------------------------------------------------------------------------- reward functions


def test_a_raising_function_is_named_with_its_response_and_its_exception():
    from posttrain.rewards import CombinedReward, RewardComponent, RewardFunctionError, function_reward

    fn = function_reward("posttrain.rewards:exact_match")  # raises DataError on a row without 'answer'
    combined = CombinedReward([RewardComponent("em", fn)])
    with pytest.raises(DataError, match=r"^reward 'em': the exact_match reward needs an 'answer'.*"
                                        r"\(on response 2 of 2\)$"):
        combined.score([[], []], ["a", "b"], rows=[{"answer": "a"}, {}])
    with pytest.raises(RewardFunctionError, match=r"reward 'operator:truediv' raised TypeError: .*on response 1 of 1"):
        function_reward("operator:truediv")([[]], ["x"])  # [] / "x": a TypeError, named by its spec


def test_a_module_that_raises_at_import_is_a_config_error(tmp_path, monkeypatch):
    from posttrain.rewards import function_reward

    (tmp_path / "s28_raising_module.py").write_text("raise RuntimeError('no network here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("s28_raising_module", None)
    with pytest.raises(ConfigError, match=r"cannot be imported: RuntimeError: no network here"):
        function_reward("s28_raising_module:f")


# --------------------------------------------------------------------------- prompts files


@pytest.mark.parametrize("name, text", [
    ("p.ndjson", '{"prompt": "a"}\n\n{"messages": [{"role": "user", "content": "b"}]}\n'),
    ("p.json", '[{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}]'),
    ("p.json", '{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n'),
])
def test_prompt_rows_from_ndjson_and_json(tmp_path, name, text):
    from posttrain.inference import read_prompts

    path = tmp_path / name
    path.write_text(text)
    assert read_prompts(str(path)) == [{"prompt": "a"}, {"messages": [{"role": "user", "content": "b"}]}]


def test_prompt_strings_from_a_json_list_and_gzipped_lines(tmp_path):
    from posttrain.inference import read_prompts

    (tmp_path / "p.json").write_text('["first", "second"]')
    assert read_prompts(str(tmp_path / "p.json")) == [{"prompt": "first"}, {"prompt": "second"}]
    with gzip.open(tmp_path / "p.jsonl.gz", "wt") as f:
        f.write(json.dumps({"prompt": "zipped"}) + "\n")
    assert read_prompts(str(tmp_path / "p.jsonl.gz")) == [{"prompt": "zipped"}]


@pytest.mark.parametrize("name, text, said", [
    ("p.json", '[{"prompt": "a"},\n {"x": 1}]', "p.json:2: expected an object with 'prompt' or 'messages'"),
    ("p.ndjson", '{"prompt": "a"}\n{"prompt": \n', "p.ndjson:2: not valid JSON"),
    ("p.json", '[{"prompt": ""}]', "p.json:1: 'prompt' is empty"),
])
def test_bad_json_prompt_rows_are_named_by_file_and_line(tmp_path, name, text, said):
    from posttrain.inference import read_prompts

    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=said.replace("(", r"\(")):
        read_prompts(str(tmp_path / name))


# --------------------------------------------------------------------------- outputs


def test_generate_output_that_is_a_directory_is_refused_before_loading(capsys, tmp_path, monkeypatch):
    from posttrain import inference

    (tmp_path / "p.txt").write_text("hi\n")
    monkeypatch.setattr(inference, "_load", lambda args: pytest.fail("the model loaded"))
    rc, out = _cli(capsys, "generate", "--model", "tiny", "--prompts", tmp_path / "p.txt", "--output", tmp_path)
    assert rc == 2 and "is a directory" in out


def test_score_output_in_a_missing_directory_is_refused_before_the_model_loads(capsys, tmp_path, monkeypatch):
    from posttrain import rewards

    (tmp_path / "rows.jsonl").write_text('{"prompt": "q", "response": "a"}\n')
    monkeypatch.setattr(rewards, "RewardModelScorer", lambda *a, **k: pytest.fail("the model loaded"))
    rc, out = _cli(capsys, "score", "--model", "tiny", "--input", tmp_path / "rows.jsonl",
                   "--output", tmp_path / "no" / "out.jsonl")
    assert rc == 2 and f"the directory {tmp_path / 'no'} does not exist" in out


def test_merge_refuses_inside_the_adapter_and_the_run_directory(capsys, tmp_path, policy_adapter):
    for output, said in [(policy_adapter / "final" / "merged", "is inside the adapter directory"),
                         (policy_adapter, "is the run directory being merged")]:
        rc, out = _cli(capsys, "merge", policy_adapter, output)
        assert rc == 2 and said in out, out
    assert not (policy_adapter / "final" / "merged").exists() and not (policy_adapter / "config.json").exists()


def test_merge_of_a_preset_still_says_a_full_model_needs_no_merging(capsys, tmp_path):
    rc, out = _cli(capsys, "merge", "tiny", tmp_path / "out")
    assert rc == 2 and "a full model needs no merging" in out
