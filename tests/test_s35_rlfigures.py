"""Stop 35, backlog items from the reasoning-RL walk (tests/test_walkthrough_reasoning.py):

- `data.system_prompt` (grpo / rloo / ppo): one system turn put first in every prompt that has
  none, train and held out alike (so rollouts and the held-out figures both see it); a row with
  its own system turn or `system` key keeps its own, counted once in the log and the data report.
- the held-out figures per reward component: with several rewards, `held_out_reward` gives each
  component's raw mean (`reward/<name>`, `greedy_reward/<name>`), logged at each evaluation as
  `eval_reward/<name>` and `eval_greedy_reward/<name>` beside the combined sums.
- `rollout/flat_groups` under RLOO with β > 0: counted on the rewards before the KL term, so a
  flat group still gets (KL-only) advantages; README says so.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from posttrain.config import GRPOConfig, PPOConfig
from posttrain.data.prompts import PromptRecord, prepare_prompts
from posttrain.errors import ConfigError

R1_SYSTEM = ("A conversation between User and Assistant. The Assistant first thinks about the reasoning process "
             "in <think> </think> tags and then gives the answer in <answer> </answer> tags.")


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# --------------------------------------------------------------------------- data.system_prompt


def test_system_prompt_opens_every_train_and_held_out_prompt_without_one(tmp_path):
    train = _write(tmp_path / "train.jsonl", [
        {"question": "1+1?", "answer": "2"},
        {"question": "2+2?", "answer": "4", "system": "Be terse."},  # its own, by key
    ])
    chats = _write(tmp_path / "chats.jsonl", [  # its own, by turn
        {"messages": [{"role": "system", "content": "Own turn."}, {"role": "user", "content": "3+3?"},
                      {"role": "assistant", "content": "6"}]}])
    held = _write(tmp_path / "eval.jsonl", [{"prompt": "4+4?", "answer": "8"}])
    cfg = GRPOConfig.load(None, [f"data.train_files=[{train},{chats}]", f"data.eval_files=[{held}]",
                                 f"data.system_prompt={R1_SYSTEM}"])
    logs: list[str] = []
    train_records, held_out, report = prepare_prompts(cfg.data, None, 0, logs.append)
    firsts = [r.prompt[0] for r in train_records + held_out]
    assert firsts == [{"role": "system", "content": R1_SYSTEM}, {"role": "system", "content": "Be terse."},
                      {"role": "system", "content": "Own turn."}, {"role": "system", "content": R1_SYSTEM}]
    assert [len(r.prompt) for r in train_records + held_out] == [2, 2, 2, 2]  # one system turn each
    assert report["system_prompt"] == {"added": 2, "kept_own": 2}
    said = [line for line in logs if "system_prompt" in line]
    assert len(said) == 1 and "2 prompts kept their own" in said[0], logs


def test_system_prompt_reaches_the_synthetic_prompts_and_their_rendering(tmp_path):
    """The bundled tasks' train and held-out prompts too; the encoded prompt the policy completes
    (rollouts and held-out evaluation read these ids) holds the system prompt."""
    from posttrain.data.prompts import encode_prompts
    from posttrain.data.templates import adopt_template
    from posttrain.models.loading import load_tokenizer

    cfg = PPOConfig.load(None, ["data.synthetic_size=40", "data.eval_fraction=0.25", "data.system_prompt=Think first."])
    train, held_out, report = prepare_prompts(cfg.data, None, 0, lambda _: None)
    assert held_out and all(r.prompt[0] == {"role": "system", "content": "Think first."} for r in train + held_out)
    assert report["system_prompt"] == {"added": len(train) + len(held_out), "kept_own": 0}
    tokenizer = load_tokenizer("tiny")
    ids, _ = encode_prompts(held_out[:1], tokenizer, adopt_template(tokenizer, "auto"), 256, lambda _: None)
    assert "Think first." in tokenizer.decode(ids[0])


def test_no_system_prompt_leaves_the_prompts_and_the_report_as_read(tmp_path):
    cfg = GRPOConfig.load(None, ["data.synthetic_size=20"])
    assert cfg.data.system_prompt == ""
    train, _, report = prepare_prompts(cfg.data, None, 0, lambda _: None)
    assert train[0].prompt[0]["role"] == "user" and "system_prompt" not in report


def test_a_blank_system_prompt_is_refused():
    from posttrain.config.rl import validate_grpo

    with pytest.raises(ConfigError, match="data.system_prompt"):
        validate_grpo(GRPOConfig.load(None, ["data.system_prompt=' '"]))


# --------------------------------------------------------------------------- held-out figures per component


def _component_run(tmp_path):
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.train.rollouts import RLRun, build_reward

    cfg = GRPOConfig.load(None, ["eval.prompts=2", "eval.samples=2", "rollout.max_new_tokens=3",
                                 "reward.format_regex=(?s).*"])  # exact_match (0 here) + format (always 1)
    tokenizer, model = load_tokenizer("tiny"), load_model("tiny")
    records = [PromptRecord([{"role": "user", "content": f"q{i}"}], "never said", source=f"h:{i}") for i in range(2)]
    ids = [tokenizer(f"q{i}", add_special_tokens=False)["input_ids"] for i in range(2)]
    run = RLRun(cfg, tmp_path, SimpleNamespace(autocast=contextlib.nullcontext), True, lambda _: None, tokenizer,
                model, None, [], [], ids, records, {}, build_reward(cfg), None, None)
    return run, model


def test_held_out_figures_give_each_reward_components_mean_beside_the_sum(tmp_path):
    from posttrain.train.rollouts import held_out_reward

    run, model = _component_run(tmp_path)
    out = held_out_reward(model, run.tokenizer, run.eval_ids, run.eval_records, run.score, run.cfg)
    assert out["reward/format"] == out["greedy_reward/format"] == 1.0
    assert out["reward/exact_match"] == out["greedy_reward/exact_match"] == 0.0
    assert out["reward"] == out["greedy_reward"] == 1.0  # the combined sum


def test_each_evaluation_logs_the_held_out_component_means(tmp_path):
    run, model = _component_run(tmp_path)
    stage = SimpleNamespace(_policy=lambda: model)
    run.attach_evaluation(stage)
    figures = stage.held_out_figures(None, None, 1)  # the loop logs them as eval_<name>
    assert {"reward", "greedy_reward", "reward/exact_match", "greedy_reward/exact_match", "reward/format",
            "greedy_reward/format"} <= set(figures)
    assert figures["greedy_reward/format"] == 1.0 and figures["greedy_reward/exact_match"] == 0.0


def test_one_reward_gives_no_component_figures(tmp_path):
    from posttrain.train.rollouts import held_out_reward

    run, model = _component_run(tmp_path)
    run.cfg.reward.format_regex = ""
    from posttrain.train.rollouts import build_reward

    out = held_out_reward(model, run.tokenizer, run.eval_ids, run.eval_records, build_reward(run.cfg), run.cfg)
    assert not [key for key in out if "/" in key]


# --------------------------------------------------------------------------- flat groups under RLOO with β > 0


def test_a_flat_group_under_rloo_with_a_kl_term_still_gets_kl_only_advantages():
    """rollout/flat_groups is counted on the rewards as scored (before RLOO's KL term): a group all
    right still differs in its samples' KL, so the leave-one-out advantages are not 0; README's
    wording says they give no signal from the reward (only the KL term's)."""
    from posttrain.losses import policy_gradient as pg

    scores = torch.tensor([1.0, 1.0])  # flat: both right
    logps, ref, mask = torch.tensor([[-1.0, -1.0], [-0.5, -2.0]]), torch.tensor([[-1.2, -1.0], [-1.0, -1.0]]), \
        torch.ones(2, 2)
    advantages = pg.rloo_advantages(pg.kl_penalised_rewards(scores, logps, ref, mask, 0.1), 2)
    assert bool((advantages != 0).all())
    readme = Path(__file__).parents[1].joinpath("README.md").read_text(encoding="utf-8")
    said = " ".join(readme[readme.index("`rollout/flat_groups`:"):].split("\n  - ", 1)[0].split())
    assert "no group-relative signal from the reward" in said and "from the KL term alone" in said
