"""Configs of the online-RL stages: GRPO / RLOO (`posttrain grpo`) and PPO (`posttrain ppo`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option
from posttrain.config.sections import (FORGETTING_HELP, MAX_BAD_FRACTION_HELP, AdapterConfig, ForgettingConfig,
                                       ModelConfig, TrainConfig, _rows_checks, _train_checks, _weight_checks,
                                       other_stage_forgetting_checks, validate_adapter_settings)
from posttrain.errors import ConfigError
from posttrain.rollout import GREEDY_BELOW, is_greedy

# The reward section's checks, shared with `posttrain score`'s flags (rewards.py); here, torch-free,
# so that reading a config loads no torch.
DEFAULT_FLOOR_PENALTY = 10.0


def check_max_length(value, option: str = "a reward model's max_length") -> None:
    """A ConfigError naming `option` unless `value` (tokens a reward model reads) is a whole number ≥ 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option} must be a whole number of tokens, at least 1, got {value!r}")


def check_floor_penalty(value, option: str = "the floor penalty") -> None:
    """A ConfigError naming `option` unless `value` is a finite number ≥ 0 (a negative one would
    reward falling below a floor)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{option} must be a finite number, at least 0, got {value!r}")


@dataclass
class PromptDataConfig:
    train_files: list[str] = option(["synthetic"], "prompt files (jsonl, json, parquet, csv, datasets dir) or 'synthetic'")
    eval_files: list[str] = option([], "held-out prompt files (a prompt also among the training prompts is dropped "
                                       "from them, counted); empty = split eval_fraction off the training prompts")
    eval_fraction: float = option(0.05, "fraction of training prompts held out when eval_files is empty (a "
                                         "prompt given twice stays on one side; held out with eval.prompts=0 too)")
    format: Literal["auto", "prompt", "messages", "alpaca"] = option(
        "auto", "prompt (a question under 'prompt', 'question' or 'problem', with an optional 'answer', else "
                "'solution'), messages or alpaca (their last answer is the reference)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option("auto", "chat template for the prompts")
    system_prompt: str = option("", "a system turn put first in every prompt that has none (train and held out); a "
                                "row's own system turn or 'system' key is kept (empty = none)")
    max_prompt_length: int = option(256, "prompts longer than this many tokens are dropped (counted, never cut)")
    bad_rows: Literal["error", "skip"] = option("error", "malformed rows: stop before training, or skip them into the run's rejects-train.jsonl / rejects-eval.jsonl")
    max_bad_fraction: float = option(0.01, MAX_BAD_FRACTION_HELP)
    synthetic_tasks: list[str] = option(["smallest"], "tasks of the bundled generator (each prompt carries its answer)")
    synthetic_size: int = option(2000, "number of synthetic prompts")


@dataclass
class RolloutConfig:
    engine: Literal["transformers", "vllm"] = option(
        "transformers", "generation backend: transformers (the policy itself, any device) or vllm (a vLLM engine "
        "beside the policy on one CUDA GPU; the policy's weights are pushed into it before each rollout)")
    num_generations: int = option(4, "G: completions sampled per prompt")
    max_new_tokens: int = option(32, "generation budget per completion")
    temperature: float = option(1.0, "sampling temperature; the loss's log-probs and KL are those of the same "
                                     "tempered distribution")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = option(0, "keep the k most likely tokens (0 = off)")
    min_p: float = option(0.0, "keep tokens at least this fraction of the top one's probability, after temperature "
                               "(0 = off)")
    stop: list[str] = option([], "stop strings: a completion ends at the first one; rewards see its text without "
                                 "the stop string (as vLLM and generate return it), the trained tokens include it")
    batch_size: int = option(64, "sequences generated at once (transformers; vLLM schedules its own batches)")
    vllm_gpu_memory_utilization: float = option(
        0.3, "vllm: fraction of the GPU's memory vLLM takes for its weights and KV cache; the rest is left to training")
    vllm_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", "vllm: dtype of vLLM's copy of the weights (auto: vLLM's choice from the checkpoint's dtype)")
    vllm_enforce_eager: bool = option(False, "vllm: no CUDA graphs (less memory and start-up time, slower decoding)")


@dataclass
class RLRewardConfig:
    functions: list[str] = option(["exact_match=posttrain.rewards:exact_match"],
                                  "NAME=module:function rewards, fn(prompt_turns, response[, row]) -> float")
    models: list[str] = option([], "reward models trained by posttrain rm: DIR or NAME=DIR")
    weights: list[str] = option([], "NAME=W weight per component (default 1)")
    floors: list[str] = option([], "NAME=X soft constraint per component: a raw reward r below X (its raw units) "
                                   "costs floor_penalty x (X - r)")
    floor_penalty: float = option(DEFAULT_FLOOR_PENALTY, "with floors: P of P·max(0, X − r) subtracted from the "
                                                         "total, as posttrain score --floor-penalty")
    max_length: int = option(0, "the most tokens a reward model reads (0: its position table); a longer row is cut: "
                                "a decoder keeps its end, an encoder its start")
    format_regex: str = option("", "adds a 'format' component: 1 when the whole response (whitespace-trimmed) matches this regex")
    no_eos_penalty: float = option(0.0, "subtracted from the reward of a response that never ends (hits max_new_tokens)")
    clip: float = option(0.0, "clip total rewards to [-clip, clip] (0 = off)")
    normalize: bool = option(False, "z-normalise each rollout's rewards (mean 0, std 1), after the penalty, before clipping")


@dataclass
class GRPOLossConfig:
    advantage: Literal["grpo", "rloo"] = option(
        "grpo", "grpo: (r - group mean) / group std; rloo: r - mean of the other G-1 samples")
    scale_rewards: bool = option(True, "grpo: divide by the group's std (false: Dr. GRPO, Liu et al. 2025)")
    beta: float = option(0.0, "KL coefficient (0 = no reference model at all); grpo: β·KL per token in the loss; "
                              "rloo: r - β·Σ_t (log π - log π_ref) as the reward, before the baseline (RLOO paper)")
    kl_estimator: Literal["k1", "k2", "k3"] = option(
        "k3", "grpo with beta > 0: per-token KL estimator (Schulman 2020; GRPO uses k3); rloo's reward KL is always k1")
    clip_eps: float = option(0.2, "PPO ratio clip ε (acts when updates_per_rollout > 1)")
    aggregation: Literal["token", "sequence", "constant"] = option(
        "token", "token: every response token weighs the same (DAPO); sequence: every response does (GRPO paper); "
                 "constant: Σ over tokens / (responses × rollout.max_new_tokens) (Dr. GRPO; its kl, entropy and "
                 "clip_fraction figures are per-response means)")
    updates_per_rollout: int = option(1, "μ: optimizer steps taken on each batch of rollouts")


@dataclass
class RLEvalConfig:
    prompts: int = option(100, "held-out prompts scored before and after training (0 = off)")
    samples: int = option(4, "completions sampled per held-out prompt (as in the rollouts) besides the greedy one")
    sample_every: int = option(10, "write a few completions of every Nth rollout to samples.jsonl (0 = never)")


@dataclass
class GRPOConfig(_StageConfig):
    unread_in_help = ("train.loss",)  # sft's token loss
    output_dir: str = option("runs/grpo", "run directory: checkpoints, metrics.jsonl, samples.jsonl, final policy")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "policy to start from (the SFT model)"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "what is trained: full, freeze or PEFT methods"})
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig, metadata={"help": "prompts"})
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig, metadata={"help": "sampling the completions"})
    reward: RLRewardConfig = dataclasses.field(default_factory=RLRewardConfig, metadata={"help": "scoring the completions"})
    grpo: GRPOLossConfig = dataclasses.field(default_factory=GRPOLossConfig, metadata={"help": "advantages and the loss"})
    train: TrainConfig = dataclasses.field(
        default_factory=TrainConfig,
        metadata={"help": "optimisation; batch_size counts completions: batch_size x grad_accum (x processes) per rollout"})
    eval: RLEvalConfig = dataclasses.field(default_factory=RLEvalConfig, metadata={"help": "held-out reward"})
    forgetting: ForgettingConfig = dataclasses.field(default_factory=ForgettingConfig,
                                                     metadata={"help": FORGETTING_HELP})


@dataclass
class PPORolloutConfig(RolloutConfig):
    num_generations: int = option(1, "completions sampled per prompt (PPO's critic is the baseline, so 1 suffices)")


@dataclass
class PPOLossConfig:
    value_model: Literal["head", "separate"] = option(
        "head", "head: a linear value head on the policy's last hidden state (shared trunk); separate: its own critic")
    value_model_path: str = option("", "separate critic's starting weights: a model or reward-model dir (default: model.path)")
    value_lr_ratio: float = option(1.0, "the value head / critic learns at train.lr x this")
    kl_coef: float = option(0.05, "β of the per-token KL penalty folded into the rewards (initial value when adaptive)")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k1", "per-token KL estimator in the reward (k1: log pi - log pi_ref)")
    kl_control: Literal["fixed", "adaptive"] = option("fixed", "fixed β, or the adaptive controller (Ziegler et al. 2019)")
    kl_target: float = option(6.0, "adaptive: the KL per response (nats) the controller steers towards")
    kl_horizon: float = option(10000.0, "adaptive: responses over which β moves by at most 20%")
    gamma: float = option(1.0, "GAE discount γ")
    lam: float = option(0.95, "GAE λ")
    whiten_advantages: bool = option(True, "normalise advantages to mean 0, std 1 over each rollout")
    clip_eps: float = option(0.2, "policy ratio clip ε")
    value_clip: float = option(0.2, "clip of the value change per update (PPO2's clipped value loss)")
    vf_coef: float = option(0.1, "weight of the value loss")
    entropy_coef: float = option(0.0, "weight of the entropy bonus (0 = off)")
    epochs: int = option(4, "PPO epochs: passes over each rollout")
    minibatches: int = option(1, "optimizer steps per PPO epoch; a rollout is minibatches x batch_size x grad_accum completions")
    early_stop_kl: float = option(0.0, "skip the rest of a rollout's updates once approx KL(old||new) > this (0 = never)")
    aggregation: Literal["token", "sequence"] = option("token", "token: every response token weighs the same; sequence: every response")


@dataclass
class PPOConfig(_StageConfig):
    unread_in_help = ("train.loss",)  # sft's token loss
    output_dir: str = option("runs/ppo", "run directory: checkpoints, metrics.jsonl, samples.jsonl, final policy")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "policy to start from (the SFT model)"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "what is trained: full, freeze or PEFT methods"})
    data: PromptDataConfig = dataclasses.field(default_factory=PromptDataConfig, metadata={"help": "prompts"})
    rollout: PPORolloutConfig = dataclasses.field(default_factory=PPORolloutConfig, metadata={"help": "sampling the completions"})
    reward: RLRewardConfig = dataclasses.field(default_factory=RLRewardConfig, metadata={"help": "scoring the completions"})
    ppo: PPOLossConfig = dataclasses.field(default_factory=PPOLossConfig, metadata={"help": "value model, KL control, GAE and the clipped losses"})
    train: TrainConfig = dataclasses.field(
        default_factory=TrainConfig,
        metadata={"help": "optimisation; one optimizer step per minibatch of batch_size x grad_accum (x processes) completions"})
    eval: RLEvalConfig = dataclasses.field(default_factory=RLEvalConfig, metadata={"help": "held-out reward"})
    forgetting: ForgettingConfig = dataclasses.field(default_factory=ForgettingConfig,
                                                     metadata={"help": FORGETTING_HELP})


def validate_grpo(cfg: GRPOConfig) -> None:
    """Cross-field checks of a GRPO / RLOO config. Raises ConfigError."""
    cfg = checked(cfg)
    g, r, t = cfg.grpo, cfg.rollout, cfg.train
    per_rollout = t.batch_size * t.grad_accum
    _raise_first(_train_checks(t) + _weight_checks(cfg.model, cfg.adapter) + _rollout_checks(cfg)
                 + other_stage_forgetting_checks(cfg.forgetting, cfg.data, t) + [
        (r.num_generations >= 2, "rollout.num_generations must be at least 2 (advantages compare a prompt's samples)"),
        (r.num_generations < 2 or per_rollout % r.num_generations == 0,  # (no % 0: the check above says it)
         f"train.batch_size x train.grad_accum = {per_rollout} completions per step must be a multiple of "
         f"rollout.num_generations = {r.num_generations} (whole groups per rollout)"),
        (g.beta >= 0 and g.clip_eps > 0, "grpo.beta must be >= 0 and grpo.clip_eps > 0"),
        (g.updates_per_rollout >= 1, "grpo.updates_per_rollout must be >= 1"),
        (g.advantage != "rloo" or g.scale_rewards == GRPOLossConfig.scale_rewards,
         f"grpo.scale_rewards={g.scale_rewards} does nothing with grpo.advantage=rloo (the leave-one-out "
         "advantage r - mean of the other G-1 is never divided by a std); remove it or set grpo.advantage=grpo"),
        (g.beta > 0 or g.kl_estimator == GRPOLossConfig.kl_estimator,
         f"grpo.kl_estimator={g.kl_estimator} is read only when grpo.beta > 0 (with beta = 0 there is no KL term "
         "and no reference); set grpo.beta, or remove grpo.kl_estimator"),
        (g.beta <= 0 or g.advantage != "rloo" or g.kl_estimator == GRPOLossConfig.kl_estimator,
         f"grpo.kl_estimator={g.kl_estimator} does nothing with grpo.advantage=rloo (its KL is always k1, "
         "β·Σ_t (log π - log π_ref) subtracted from the reward, as in the RLOO paper); remove it or set "
         "grpo.advantage=grpo"),
    ])
    validate_adapter_settings(cfg.adapter, cfg.model, cfg.train.optimizer)


def _rollout_checks(cfg: GRPOConfig | PPOConfig) -> list[tuple[bool, str]]:
    r = cfg.rollout
    return (_vllm_checks(cfg) if r.engine == "vllm" else []) + [
        (r.max_new_tokens >= 1 and r.batch_size >= 1, "rollout.max_new_tokens and rollout.batch_size must be >= 1"),
        (not is_greedy(r.temperature), f"rollout.temperature must be at least {GREEDY_BELOW:g} (below it sampling is "
                                       "greedy): online RL learns from sampled completions"),
        (0 < r.top_p <= 1, "rollout.top_p must be in (0, 1] (1 = off)"),
        (0 <= r.min_p < 1, f"rollout.min_p must be in [0, 1) (0 = off; 1 would keep only the most likely token, "
                           f"no sampling), got {r.min_p}"),
        (all(r.stop), "rollout.stop holds an empty string, which would end every completion at its first token"),
        (cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1"),
        (not cfg.data.system_prompt or bool(cfg.data.system_prompt.strip()),
         "data.system_prompt is blank: give its text, or leave it empty for no system turn"),
        *_rows_checks(cfg.data),
        (bool(cfg.reward.functions or cfg.reward.models or cfg.reward.format_regex),
         "no reward: set reward.functions, reward.models or reward.format_regex"),
        *_reward_checks(cfg.reward),
        (cfg.reward.clip >= 0, "reward.clip must be >= 0 (0 = off; rewards are clipped to [-clip, clip])"),
        (cfg.reward.no_eos_penalty >= 0, f"reward.no_eos_penalty must be >= 0 (it is subtracted from a response that "
                                         f"never ends; a negative one would reward not ending), got "
                                         f"{cfg.reward.no_eos_penalty}"),
        (cfg.eval.prompts <= 0 or cfg.eval.samples >= 1,
         f"eval.samples={cfg.eval.samples}: the held-out reward and KL are means over sampled completions, so it "
         "must be >= 1 (eval.prompts=0 turns the held-out figures off)"),
    ]


def _reward_checks(reward: RLRewardConfig) -> list[tuple[bool, str]]:
    """reward.floor_penalty and reward.max_length by `posttrain score`'s rules for --floor-penalty and
    --max-length; each read only beside what it acts on (reward.floors' names and values are checked
    with the reward functions, `rollouts.check_reward_functions`)."""
    return [
        _passes(check_floor_penalty, reward.floor_penalty, "reward.floor_penalty"),
        (bool(reward.floors) or reward.floor_penalty == DEFAULT_FLOOR_PENALTY,
         f"reward.floor_penalty={reward.floor_penalty} is read only with reward.floors (the cost of a component's "
         "shortfall below its floor); set reward.floors, or remove reward.floor_penalty"),
        _passes(check_max_length, reward.max_length, "reward.max_length") if reward.max_length != 0 else (True, ""),
        (not reward.max_length or bool(reward.models),
         "reward.max_length is the most tokens a reward model reads; set reward.models, or remove reward.max_length"),
    ]


def _passes(check, value, option: str) -> tuple[bool, str]:
    """A rule that raises ConfigError (`check(value, option)`) as a (passed, its message) check."""
    try:
        check(value, option)
    except ConfigError as exc:
        return False, str(exc)
    return True, ""


def _vllm_checks(cfg: GRPOConfig | PPOConfig) -> list[tuple[bool, str]]:
    """rollout.engine=vllm: the package, a GPU, one process, and a policy whose weights vLLM can hold."""
    from posttrain.env import launched_processes
    from posttrain.models.adapters import plan_adapters
    from posttrain.models.adapters.spec import MERGEABLE
    from posttrain.rollout.engines import NO_CUDA, VLLM_MISSING, cuda_available, vllm_installed

    plan = plan_adapters(cfg.adapter)
    unmergeable = [m for m in plan.methods if m not in ("full", "freeze", *MERGEABLE)]
    return [
        (0 < cfg.rollout.vllm_gpu_memory_utilization <= 1, "rollout.vllm_gpu_memory_utilization must be in (0, 1]"),
        (vllm_installed(), VLLM_MISSING),
        (cuda_available(), NO_CUDA),
        (launched_processes() == 1,
         "rollout.engine=vllm runs one vLLM engine inside a single training process (one GPU); launch without "
         "torchrun / accelerate --num_processes, or use rollout.engine=transformers"),
        (not unmergeable, f"rollout.engine=vllm samples with merged weights, and {', '.join(unmergeable)} adapters do "
                          "not merge into them; use lora, dora, ia3, freeze or full, or rollout.engine=transformers"),
        (not plan.quantized, "rollout.engine=vllm does not support adapter.method=qlora (the 4-bit base would need "
                             "dequantising at every weight push); use lora, or rollout.engine=transformers"),
    ]


def validate_ppo(cfg: PPOConfig) -> None:
    """Cross-field checks of a PPO config. Raises ConfigError."""
    cfg = checked(cfg)
    p, t, r = cfg.ppo, cfg.train, cfg.rollout
    per_rollout = t.batch_size * t.grad_accum * p.minibatches
    _raise_first(_train_checks(t) + _weight_checks(cfg.model, cfg.adapter) + _rollout_checks(cfg)
                 + other_stage_forgetting_checks(cfg.forgetting, cfg.data, t) + [
        (r.num_generations >= 1, "rollout.num_generations must be at least 1"),
        (r.num_generations < 1 or per_rollout % r.num_generations == 0,  # (no % 0: the check above says it)
         f"train.batch_size x train.grad_accum x ppo.minibatches = {per_rollout} completions per rollout must be a "
         f"multiple of rollout.num_generations = {r.num_generations}"),
        (p.epochs >= 1 and p.minibatches >= 1, "ppo.epochs and ppo.minibatches must be >= 1"),
        (p.kl_coef >= 0 and p.kl_target > 0 and p.kl_horizon > 0, "ppo.kl_coef must be >= 0, kl_target and kl_horizon > 0"),
        (not (p.kl_control == "adaptive" and p.kl_coef == 0), "ppo.kl_control=adaptive needs ppo.kl_coef > 0 to adapt"),
        (0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]"),
        (p.clip_eps > 0 and p.value_clip > 0, "ppo.clip_eps and ppo.value_clip must be > 0"),
        (p.vf_coef > 0 and p.value_lr_ratio > 0, "ppo.vf_coef and ppo.value_lr_ratio must be > 0"),
        (p.entropy_coef >= 0 and p.early_stop_kl >= 0, "ppo.entropy_coef and ppo.early_stop_kl must be >= 0"),
        (not p.value_model_path or p.value_model == "separate",
         f"ppo.value_model_path={p.value_model_path} is the separate critic's starting weights, but "
         f"ppo.value_model={p.value_model} (a value head on the policy) has no critic to load them into; set "
         "ppo.value_model=separate, or drop ppo.value_model_path"),
    ])
    validate_adapter_settings(cfg.adapter, cfg.model, cfg.train.optimizer)


def rl_reference() -> str:
    """The sections grpo and ppo add to (or change from) SFT's."""
    tables = []
    for name in ("data", "rollout", "reward", "grpo", "eval"):
        grpo = markdown_reference(GRPOConfig, (name,)).split("\n")
        ppo = {row.split(" | ")[0]: row for row in markdown_reference(PPOConfig, (name,)).split("\n")}
        for i, row in enumerate(grpo[2:], 2):  # a shared setting whose default PPO changes: both
            other = ppo.get(row.split(" | ")[0])
            if other is not None and other != row:
                cells, ppo_cells = row.split(" | "), other.split(" | ")
                cells[2] = f"{cells[2]} (ppo {ppo_cells[2]})"
                grpo[i] = " | ".join(cells)
        tables.append("\n".join(grpo))
    tables.append(markdown_reference(PPOConfig, ("ppo",)))
    return "\n".join([tables[0]] + [t.split("\n", 2)[2] for t in tables[1:]])
