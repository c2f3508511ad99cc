"""Stop 35, online RL (backlog items): an RL run's reward takes floors and a floor penalty
(reward.floors / reward.floor_penalty) reaching the combined scorer's floor rule, checked before any
model loads; rollout.min_p reaches the rollouts' and the held-out sampling's settings (the ones both
engines read); reward.max_length caps the tokens a reward model reads, as `posttrain score
--max-length` does; samples.jsonl records the reward as scored and, when the no-EOS penalty,
normalising or clipping changed it, the one trained on beside it; GRPO's and PPO's run summaries
share their figures' keys (one function writes them)."""

from __future__ import annotations

import json

import pytest
import torch

from posttrain.config import GRPOConfig, PPOConfig, validate_grpo, validate_ppo
from posttrain.data.prompts import PromptRecord
from posttrain.errors import ConfigError

SHORT = "reward.functions=[short=tests.rewards_fixture:short]"  # minus the response's length
TURNS = [{"role": "user", "content": "x"}]
QUICK = ["train.max_steps=1", "train.batch_size=2", "rollout.num_generations=2", "rollout.max_new_tokens=3",
         "train.progress_bar=false", "model.path=tiny-2l", SHORT, "data.synthetic_size=40", "eval.prompts=2",
         "eval.samples=1"]


def _records(n):
    return [PromptRecord(TURNS, "y", source=f"s35:{i}") for i in range(n)]


@pytest.fixture(scope="module")
def tiny():
    from posttrain.config import ModelConfig
    from posttrain.models.loading import load_model, load_tokenizer

    torch.manual_seed(0)
    return load_tokenizer("tiny"), load_model(ModelConfig(path="tiny"))


class _Engine:
    """Hands back fixed completions (ids, EOS kept) and records the sampling settings it was given."""

    is_policy = True
    generation_config = None

    def __init__(self, outs):
        self.outs, self.settings = outs, []

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        self.settings.append(settings)
        return [list(o) for o in self.outs]


# --------------------------------------------------------------------------- reward.floors / floor_penalty


@pytest.mark.parametrize("config", [GRPOConfig, PPOConfig])
def test_rl_reward_floors_reach_the_combined_floor_rule(config):
    """reward.floors NAME=X and reward.floor_penalty P: the total is Σ w·r − P·max(0, X − r)/scale,
    `CombinedReward`'s rule, as `posttrain score --floor/--floor-penalty` gives it."""
    from posttrain.train.rollouts import build_reward

    cfg = config.load(None, [SHORT, "reward.format_regex='a+'", "reward.floors=[short=-2]",
                             "reward.floor_penalty=3", "reward.weights=[format=0.5]"])
    score = build_reward(cfg)
    assert score.penalty == 3.0 and {c.name: c.floor for c in score.components} == {"short": -2.0, "format": None}
    # "a": short -1 (above the floor), format 1; "bbbb": short -4, 2 below the floor, format 0
    assert score([TURNS, TURNS], ["a", "bbbb"], [{}, {}]) == pytest.approx([-1 + 0.5, -4 - 3 * 2])
    default = build_reward(config.load(None, [SHORT, "reward.floors=[short=-2]"]))
    assert default([TURNS], ["bbbb"], [{}]) == pytest.approx([-4 - 10 * 2])  # score's default penalty, 10


@pytest.mark.parametrize("override, message", [
    ("reward.floors=[nosuch=1]", "reward.floors nosuch=...: no reward named nosuch"),
    ("reward.floors=[short=lots]", "reward.floors short=lots: not a number"),
    ("reward.floors=[short]", "reward.floors 'short' must look like NAME=VALUE"),
])
def test_rl_reward_floors_are_checked_before_any_model_loads(override, message):
    from posttrain.train.rollouts import check_reward_functions

    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        check_reward_functions(GRPOConfig.load(None, [SHORT, override]))


@pytest.mark.parametrize("config, validate", [(GRPOConfig, validate_grpo), (PPOConfig, validate_ppo)])
def test_rl_floor_penalty_is_validated_up_front(config, validate):
    with pytest.raises(ConfigError, match="reward.floor_penalty must be a finite number, at least 0, got -1"):
        validate(config.load(None, [SHORT, "reward.floors=[short=0]", "reward.floor_penalty=-1"]))
    with pytest.raises(ConfigError, match="reward.floor_penalty=3.0 is read only with reward.floors"):
        validate(config.load(None, [SHORT, "reward.floor_penalty=3"]))
    validate(config.load(None, [SHORT, "reward.floors=[short=0]", "reward.floor_penalty=0"]))


# --------------------------------------------------------------------------- rollout.min_p


@pytest.mark.parametrize("config, validate", [(GRPOConfig, validate_grpo), (PPOConfig, validate_ppo)])
@pytest.mark.parametrize("value", ["1", "-0.1", "1.5"])
def test_rollout_min_p_outside_zero_to_one_is_refused(config, validate, value):
    with pytest.raises(ConfigError, match=r"rollout.min_p must be in \[0, 1\)"):
        validate(config.load(None, [SHORT, f"rollout.min_p={value}"]))


def test_rollout_min_p_reaches_the_rollouts_and_the_held_out_sampling(tiny, monkeypatch):
    """The rollout's SamplingSettings carry min_p (both engines read it there: the transformers
    sampler, and vLLM's SamplingParams through `vllm_sampling_kwargs`), and so do the held-out
    samples', drawn as in the rollouts; the greedy answer has none."""
    from posttrain.rollout import generate
    from posttrain.rollout.engines import vllm_sampling_kwargs
    from posttrain.train.rollouts import held_out_reward, sample_and_score

    tokenizer, model = tiny
    eos = tokenizer.eos_token_id
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=4", "rollout.min_p=0.2",
                                 "eval.prompts=1", "eval.samples=2"])
    engine = _Engine([[5, eos], [6, eos]])
    sample_and_score(engine, tokenizer, [[1, 5]], _records(1), [0], cfg, lambda p, t, rows: [0.0] * len(t), 0)
    assert engine.settings[0].min_p == 0.2
    assert vllm_sampling_kwargs(engine.settings[0], {eos}, None, 0)["min_p"] == 0.2

    seen = []

    def fake(model, ids, settings, **_):
        seen.append(settings)
        return [[5, eos] for _ in ids]

    monkeypatch.setattr(generate, "generate_token_ids", fake)
    held_out_reward(model, tokenizer, [[1, 5]], _records(1), lambda p, t, rows: [0.0] * len(t), cfg)
    assert [s.min_p for s in seen] == [0.0, 0.2]  # greedy, then the samples


# --------------------------------------------------------------------------- reward.max_length


@pytest.mark.parametrize("config", [GRPOConfig, PPOConfig])
def test_reward_max_length_reaches_every_reward_model(config, monkeypatch):
    from posttrain import rewards
    from posttrain.train.rollouts import build_reward

    seen = []

    class Scorer:
        def __init__(self, path, template="auto", batch_size=32, max_length=None, **_):
            seen.append(max_length)

        def __call__(self, prompts, responses, rows=None):
            return [0.0] * len(responses)

    monkeypatch.setattr(rewards, "RewardModelScorer", Scorer)
    build_reward(config.load(None, ["reward.models=[a=rm1, b=rm2]", "reward.max_length=48"]))
    build_reward(config.load(None, ["reward.models=[rm1]"]))
    assert seen == [48, 48, None]  # unset (0): each model's own position table


@pytest.mark.parametrize("config, validate", [(GRPOConfig, validate_grpo), (PPOConfig, validate_ppo)])
def test_reward_max_length_is_validated_up_front(config, validate):
    with pytest.raises(ConfigError, match="reward.max_length must be a whole number of tokens, at least 1"):
        validate(config.load(None, ["reward.models=[rm]", "reward.max_length=-3"]))
    with pytest.raises(ConfigError, match="reward.max_length is the most tokens a reward model reads"):
        validate(config.load(None, [SHORT, "reward.max_length=64"]))
    validate(config.load(None, ["reward.models=[rm]", "reward.max_length=64"]))


# --------------------------------------------------------------------------- samples.jsonl


def _sampled_rows(tiny, tmp_path, overrides):
    """One rollout of fixed completions ("a" ends, "bbbb" runs to the limit) through a RolloutStage
    writing samples.jsonl; its rows."""
    from posttrain.train.rollouts import RolloutStage

    tokenizer, _ = tiny
    enc = lambda s: tokenizer(s, add_special_tokens=False)["input_ids"]
    cfg = GRPOConfig.load(None, ["rollout.num_generations=2", "rollout.max_new_tokens=4", "eval.sample_every=1",
                                 *overrides])
    engine = _Engine([enc("a") + [tokenizer.eos_token_id], enc("bbbb")[:4]])
    stage = RolloutStage(torch.nn.Module(), [[1, 5]], _records(1), cfg, tokenizer,
                         lambda p, texts, rows: [-float(len(t)) for t in texts], tmp_path, engine=engine)
    rollout = stage._sample([0], 0, 0)
    return rollout, [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]


def test_samples_record_the_reward_as_scored_and_the_one_trained_on_beside_it(tiny, tmp_path):
    rollout, rows = _sampled_rows(tiny, tmp_path, ["reward.normalize=true", "reward.clip=0.5",
                                                   "reward.no_eos_penalty=1"])
    scored = [-float(len(r["completion"])) for r in rows]
    assert [r["reward"] for r in rows] == scored  # the reward function's value
    assert [r["trained_reward"] for r in rows] == pytest.approx(rollout.rewards.tolist())
    assert [r["trained_reward"] for r in rows] == pytest.approx([0.5, -0.5])  # z-scores ±0.71, clipped


def test_samples_without_normalising_or_clipping_record_one_reward(tiny, tmp_path):
    rollout, rows = _sampled_rows(tiny, tmp_path, [])
    assert [r["reward"] for r in rows] == rollout.rewards.tolist() == [-float(len(r["completion"])) for r in rows]
    assert all("trained_reward" not in r for r in rows)


# --------------------------------------------------------------------------- the run summaries


def test_grpo_and_ppo_summaries_share_their_figures(tmp_path):
    """One step of each: summary.json holds the same run figures (prompts, data report, held-out
    before and after, rollouts, the loop's summary), besides each algorithm's own keys."""
    from posttrain.train.grpo import run_grpo
    from posttrain.train.ppo import run_ppo

    grpo = json.loads((run_grpo(GRPOConfig.load(None, [f"output_dir={tmp_path / 'g'}", *QUICK]))
                       / "summary.json").read_text())
    ppo = json.loads((run_ppo(PPOConfig.load(None, [f"output_dir={tmp_path / 'p'}", *QUICK]))
                      / "summary.json").read_text())
    assert set(grpo) - {"advantage"} == set(ppo) - {"value_model", "final_kl_coef"}
    for summary in (grpo, ppo):
        assert summary["rollouts"] == 1 and summary["held_out_after"]["prompts"] == 2
        assert summary["train_prompts"] + summary["eval_prompts"] == 40
