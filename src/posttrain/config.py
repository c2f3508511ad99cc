"""Typed configs: one dataclass per stage, YAML in, dotted overrides on top.

Every field carries a one-line description (`help`). That single source feeds
`posttrain sft --help`, validation of YAML files and the README's config reference.
Unknown keys are rejected before any work starts, with the closest valid key.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from posttrain.errors import ConfigError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with a default and its one-line description."""
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    path: str = option("tiny", "built-in preset name (tiny) or a local Hugging Face model directory")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype the weights are loaded in")
    trust_remote_code: bool = option(False, "run Python code shipped inside the model directory (only if you trust it)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")


@dataclass
class LoraConfig:
    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: list[str] = option(
        ["all-linear"], "module names to adapt, all-linear, or one 're:<regex>' matched against full module paths"
    )
    rslora: bool = option(False, "rank-stabilised scaling alpha / sqrt(r) (Kalajdzievski 2023)")
    dora: bool = option(False, "weight-decomposed LoRA (DoRA, Liu et al. 2024); method dora sets it")
    lr_ratio_b: float = option(1.0, "LoRA+: the B matrices learn at lr x this (Hayou et al. 2024 suggest 16)")


@dataclass
class QuantizationConfig:
    quant_type: Literal["nf4", "fp4"] = option("nf4", "4-bit data type of the frozen base (QLoRA uses NF4)")
    double_quant: bool = option(True, "quantise the quantisation constants too (~0.4 bits/param saved)")
    compute_dtype: Literal["bfloat16", "float16", "float32"] = option("bfloat16", "dtype of the 4-bit matmuls")


@dataclass
class IA3Config:
    target_modules: list[str] = option([], "modules whose output IA3 rescales; empty = peft's default for the model type")
    feedforward_modules: list[str] = option([], "the subset of targets that rescale their input (FFN); empty = default")


@dataclass
class VirtualTokensConfig:
    num_virtual_tokens: int = option(16, "number of trained virtual tokens")
    init: Literal["random", "text"] = option("random", "prompt tuning init: random, or the embeddings of init_text")
    init_text: str = option("", "text whose token embeddings initialise the soft prompt (init=text)")
    projection: bool = option(False, "prefix tuning: reparameterise the prefix through an MLP (Li & Liang 2021)")
    projection_hidden: int = option(256, "hidden size of that MLP")


@dataclass
class BottleneckConfig:
    size: int = option(32, "bottleneck width (hidden -> size -> hidden)")
    activation: Literal["relu", "gelu", "silu", "tanh"] = option("relu", "nonlinearity inside the bottleneck")
    where: list[Literal["attention", "ffn"]] = option(["attention", "ffn"], "after attention and/or after the FFN")
    init_std: float = option(1e-3, "std of the near-identity init (down-projection random, up-projection zero)")


@dataclass
class FreezeTuningConfig:
    top_layers: int = option(0, "freeze tuning: train the top N transformer layers")
    modules: list[str] = option([], "freeze tuning: also train parameters whose name matches these globs")


@dataclass
class AdapterConfig:
    method: list[str] = option(
        ["full"], "one or more of: full, freeze, lora, dora, qlora, ia3, prefix, prompt, bottleneck (a list mixes them)"
    )
    schedule: list[str] = option(
        [], "staged training 'STEP:method+method' (or STEP:all), e.g. [0:prompt, 200:prompt+lora, 400:all]"
    )
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig, metadata={"help": "LoRA / DoRA / QLoRA"})
    quantization: QuantizationConfig = dataclasses.field(
        default_factory=QuantizationConfig, metadata={"help": "QLoRA's 4-bit base (CUDA + bitsandbytes)"})
    ia3: IA3Config = dataclasses.field(default_factory=IA3Config, metadata={"help": "IA3 rescaling vectors"})
    virtual_tokens: VirtualTokensConfig = dataclasses.field(
        default_factory=VirtualTokensConfig, metadata={"help": "prompt and prefix tuning"})
    bottleneck: BottleneckConfig = dataclasses.field(
        default_factory=BottleneckConfig, metadata={"help": "Houlsby bottleneck adapters"})
    freeze: FreezeTuningConfig = dataclasses.field(
        default_factory=FreezeTuningConfig, metadata={"help": "freeze tuning"})


@dataclass
class DataConfig:
    train_files: list[str] = option(["synthetic"], "training files (jsonl, json, parquet, csv, datasets dir) or 'synthetic'")
    eval_files: list[str] = option([], "held-out files; empty = split eval_fraction off the training data")
    eval_fraction: float = option(0.05, "fraction of training rows held out when eval_files is empty")
    format: Literal["auto", "alpaca", "messages", "text"] = option("auto", "row format; auto-detected from the first rows")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option(
        "auto", "chat template: the tokenizer's own (auto falls back to chatml when it has none) or a built-in one"
    )
    max_length: int = option(512, "maximum tokens per example (and per packed row)")
    overlength: Literal["truncate", "drop"] = option("truncate", "what to do with examples longer than max_length (always counted)")
    bad_rows: Literal["error", "skip"] = option("error", "malformed rows: stop before training, or skip them into rejects.jsonl")
    max_bad_fraction: float = option(0.01, "with bad_rows=skip, fail the run if more than this fraction is malformed")
    packing: bool = option(False, "pack several examples per row (no attention across them)")
    group_by_length: bool = option(
        False, "batch examples of similar length together: less padding, but can hurt multi-task learning"
    )
    streaming: bool = option(False, "read training files lazily (for files larger than memory)")
    synthetic_tasks: list[str] = option(["smallest", "copy", "reverse"], "tasks of the bundled synthetic generator")
    synthetic_size: int = option(4000, "number of synthetic training examples")


@dataclass
class TrainConfig:
    seed: int = option(0, "seed for weights init, data order and dropout")
    epochs: float = option(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0 = derive from epochs")
    batch_size: int = option(8, "examples per micro-batch per process")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit"] = option(
        "adamw", "adamw (torch), or bitsandbytes' 8-bit / paged 8-bit AdamW (CUDA only)")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    schedule: Literal["constant", "linear", "cosine"] = option("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = option(0, "linear warmup steps")
    warmup_ratio: float = option(0.0, "warmup as a fraction of max steps (used when warmup_steps is 0)")
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak (linear, cosine)")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "autocast precision (accelerate)")
    layer_lr_decay: float = option(1.0, "layer i of L trains at lr * decay^(L - i); embeddings at decay^(L+1)")
    freeze: list[str] = option([], "glob patterns of parameter names to freeze (e.g. '*embed_tokens*')")
    loss: Literal["auto", "chunked", "plain"] = option("auto", "chunked linear+cross-entropy never builds [B,T,V] logits")
    loss_chunk_size: int = option(256, "tokens per chunk of the chunked loss (peak extra memory ~ chunk × vocab × 8 bytes)")
    eval_every: int = option(0, "evaluate every N steps (0 = only at the end)")
    early_stopping_patience: int = option(0, "stop after N evaluations without improvement (0 = never)")
    save_every: int = option(0, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = option(2, "complete checkpoints to keep")
    resume: str = option("auto", "auto (newest complete checkpoint in output_dir), never, or a checkpoint path")
    log_every: int = option(1, "write metrics every N steps")
    max_consecutive_nonfinite: int = option(5, "stop after this many non-finite steps in a row")
    report_to: list[str] = option([], "extra trackers through accelerate: tensorboard, wandb")
    progress_bar: bool = option(True, "show a progress bar with ETA")


@dataclass
class EvalConfig:
    exact_match_prompts: int = option(0, "held-out synthetic prompts scored by exact match before and after (0 = off)")
    max_new_tokens: int = option(32, "generation budget for exact-match scoring")


class _StageConfig:
    """Shared loading, validation and help for all stage configs."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, *, source: str = "config") -> "_StageConfig":
        return _build(cls, data or {}, prefix="", source=source, root=cls)

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] = ()) -> "_StageConfig":
        data: dict[str, Any] = {}
        source = "overrides"
        if path is not None:
            data = read_yaml(path)
            source = str(path)
        for item in overrides:
            apply_override(data, item)
        return cls.from_dict(data, source=source)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def help_lines(cls) -> list[str]:
        return list(_help_lines(cls, ""))


@dataclass
class SFTConfig(_StageConfig):
    output_dir: str = option("runs/sft", "run directory: checkpoints, metrics.jsonl, final model")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "model to train"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "what is trained: full, freeze or PEFT methods"})
    data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig, metadata={"help": "evaluation"})


@dataclass
class PreferenceDataConfig:
    train_files: list[str] = option(["synthetic"], "preference files (jsonl, json, parquet, csv, datasets dir) or 'synthetic'")
    eval_files: list[str] = option([], "held-out files; empty = split eval_fraction off the training data")
    eval_fraction: float = option(0.05, "fraction of training rows held out when eval_files is empty")
    format: Literal["auto", "pairs", "ranking", "unpaired"] = option(
        "auto", "pairs (prompt/chosen/rejected), ranking (prompt/responses/ranks), unpaired (prompt/completion/label)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option(
        "auto", "chat template, applied the same way to every response of a prompt")
    max_length: int = option(512, "maximum tokens per prompt + response")
    overlength: Literal["truncate", "drop"] = option(
        "truncate", "over-long responses: cut their end, or drop the whole row (always counted)")
    bad_rows: Literal["error", "skip"] = option("error", "malformed rows: stop before training, or skip them into rejects.jsonl")
    max_bad_fraction: float = option(0.01, "with bad_rows=skip, fail the run if more than this fraction is malformed")
    synthetic_tasks: list[str] = option(["smallest"], "tasks of the bundled generator (chosen = the correct answer)")
    synthetic_size: int = option(2000, "number of synthetic preference rows")
    synthetic_kind: Literal["pairs", "ranking", "unpaired"] = option("pairs", "shape of the synthetic rows")
    synthetic_responses: int = option(4, "responses per prompt for synthetic rankings")


@dataclass
class RewardConfig:
    centering: float = option(0.0, "reward-centering coefficient c: adds c·(r_w + r_l)² (Eisenstein et al. 2023)")
    use_margins: bool = option(True, "subtract a row's 'margin' inside the Bradley-Terry loss (Llama 2)")


@dataclass
class DPOLossConfig:
    loss: Literal["dpo", "cdpo", "ipo", "hinge", "simpo", "orpo", "kto"] = option(
        "dpo", "dpo (sigmoid), cdpo, ipo, hinge, simpo, orpo, kto")
    beta: float = option(0.1, "β: strength of the KL anchor (dpo/cdpo/ipo/hinge/kto) or reward scale (simpo)")
    label_smoothing: float = option(0.1, "cdpo: probability ε that a pair's label is flipped")
    simpo_gamma: float = option(0.5, "simpo: target reward margin γ")
    orpo_lambda: float = option(0.1, "orpo: weight λ of the odds-ratio term")
    kto_desirable_weight: float = option(1.0, "kto: λ_D, weight of desirable examples")
    kto_undesirable_weight: float = option(1.0, "kto: λ_U, weight of undesirable examples")
    nll_weight: float = option(0.0, "add this × the chosen responses' mean token NLL (RPO); orpo has its own")
    share_prompt: bool = option(
        True, "compute a prompt once for all its responses (one row, 4-D attention mask); off for KTO and virtual tokens")
    reference: Literal["precompute", "live"] = option(
        "precompute", "reference log-probs: computed once before training and cached in the run, "
        "or every step (adapters disabled, or a frozen copy for full fine-tuning)")


@dataclass
class RMConfig(_StageConfig):
    output_dir: str = option("runs/rm", "run directory: checkpoints, metrics.jsonl, final reward model")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "backbone to score with"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "full or lora"})
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig, metadata={"help": "preference data"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig, metadata={"help": "reward-model loss"})


@dataclass
class DPOConfig(_StageConfig):
    output_dir: str = option("runs/dpo", "run directory: checkpoints, metrics.jsonl, final policy")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "policy to start from (the SFT model)"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "what is trained: full, freeze or PEFT methods"})
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig, metadata={"help": "preference data"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    dpo: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig, metadata={"help": "the preference loss"})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig, metadata={"help": "evaluation"})


@dataclass
class PromptDataConfig:
    train_files: list[str] = option(["synthetic"], "prompt files (jsonl, json, parquet, csv, datasets dir) or 'synthetic'")
    eval_files: list[str] = option([], "held-out prompt files; empty = split eval_fraction off the training prompts")
    eval_fraction: float = option(0.05, "fraction of training prompts held out when eval_files is empty")
    format: Literal["auto", "prompt", "messages", "alpaca"] = option(
        "auto", "prompt ('prompt' + optional 'answer'), messages or alpaca (their last answer is the reference)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option("auto", "chat template for the prompts")
    max_prompt_length: int = option(256, "prompts longer than this many tokens are dropped (counted, never cut)")
    bad_rows: Literal["error", "skip"] = option("error", "malformed rows: stop before training, or skip them into rejects.jsonl")
    max_bad_fraction: float = option(0.01, "with bad_rows=skip, fail the run if more than this fraction is malformed")
    synthetic_tasks: list[str] = option(["smallest"], "tasks of the bundled generator (each prompt carries its answer)")
    synthetic_size: int = option(2000, "number of synthetic prompts")


@dataclass
class RolloutConfig:
    engine: Literal["transformers", "vllm"] = option(
        "transformers", "generation backend: transformers (the policy itself, any device); vllm is not built yet")
    num_generations: int = option(4, "G: completions sampled per prompt")
    max_new_tokens: int = option(32, "generation budget per completion")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = option(0, "keep the k most likely tokens (0 = off)")
    stop: list[str] = option([], "stop strings: a completion ends at the first one")
    batch_size: int = option(64, "sequences generated at once")


@dataclass
class RLRewardConfig:
    functions: list[str] = option(["exact_match=posttrain.rewards:exact_match"],
                                  "NAME=module:function rewards, fn(prompt_turns, response[, row]) -> float")
    models: list[str] = option([], "reward models trained by posttrain rm: DIR or NAME=DIR")
    weights: list[str] = option([], "NAME=W weight per component (default 1)")
    format_regex: str = option("", "adds a 'format' component: 1 when the whole response matches this regex")
    no_eos_penalty: float = option(0.0, "subtracted from the reward of a response that never ends (hits max_new_tokens)")
    clip: float = option(0.0, "clip total rewards to [-clip, clip] (0 = off)")


@dataclass
class GRPOLossConfig:
    advantage: Literal["grpo", "rloo"] = option(
        "grpo", "grpo: (r - group mean) / group std; rloo: r - mean of the other G-1 samples")
    scale_rewards: bool = option(True, "grpo: divide by the group's std (false: Dr. GRPO, Liu et al. 2025)")
    beta: float = option(0.0, "coefficient of the per-token KL to the reference (0 = no reference model at all)")
    kl_estimator: Literal["k1", "k2", "k3"] = option("k3", "per-token KL estimator (Schulman 2020; GRPO uses k3)")
    clip_eps: float = option(0.2, "PPO ratio clip ε (acts when updates_per_rollout > 1)")
    aggregation: Literal["token", "sequence"] = option(
        "token", "token: every response token weighs the same (DAPO); sequence: every response does (GRPO paper)")
    updates_per_rollout: int = option(1, "μ: optimizer steps taken on each batch of rollouts")


@dataclass
class RLEvalConfig:
    prompts: int = option(100, "held-out prompts scored before and after training (0 = off)")
    samples: int = option(4, "completions sampled per held-out prompt (as in the rollouts) besides the greedy one")
    sample_every: int = option(10, "write a few completions of every Nth rollout to samples.jsonl (0 = never)")


@dataclass
class GRPOConfig(_StageConfig):
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


# --------------------------------------------------------------------------- YAML and overrides


def read_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Apply `a.b.c=value` to a nested dict; the value is parsed as YAML (so 1e-5, true, [a, b] work)."""
    import yaml

    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like section.key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def _walk(cls: type, prefix: str = ""):
    """Yield (dotted key, type hint, default, help) for every leaf field, and
    (section key, None, None, help) before each section's fields."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, help_text = hints[f.name], f.metadata.get("help", "")
        if dataclasses.is_dataclass(hint):
            yield prefix + f.name, None, None, help_text
            yield from _walk(hint, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        yield prefix + f.name, hint, default, help_text


def _leaf_keys(cls: type) -> list[str]:
    return [key for key, hint, _, _ in _walk(cls) if hint is not None]


# Names users bring from transformers / TRL / LLaMA-Factory configs.
_FAMILIAR_NAMES = {
    "learning_rate": "lr", "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum", "num_train_epochs": "epochs", "lr_scheduler_type": "schedule",
    "max_seq_length": "max_length", "cutoff_len": "max_length", "model_name_or_path": "path",
    "lora_r": "r", "lora_alpha": "alpha", "lora_dropout": "dropout", "save_steps": "save_every",
    "eval_steps": "eval_every", "logging_steps": "log_every", "save_total_limit": "keep_last",
    "torch_dtype": "dtype", "bf16": "mixed_precision", "fp16": "mixed_precision",
    "finetuning_type": "method", "peft_type": "method", "enabled": "method", "use_dora": "dora",
    "use_rslora": "rslora", "lora_target": "target_modules",
    "freeze_trainable_layers": "top_layers", "optim": "optimizer",
}


def _suggest(key: str, root: type) -> str | None:
    """The valid dotted key closest to `key`: familiar aliases, same last part, then spelling."""
    keys = _leaf_keys(root)
    last = key.rsplit(".", 1)[-1]
    last = _FAMILIAR_NAMES.get(last, last)
    same_name = [k for k in keys if k.rsplit(".", 1)[-1] == last]
    if same_name:
        return same_name[0]
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.6)
    if not close:
        by_last = {k.rsplit(".", 1)[-1]: k for k in keys}
        close = [by_last[c] for c in difflib.get_close_matches(last, list(by_last), n=1, cutoff=0.6)]
    return close[0] if close else None


def _build(cls: type, data: dict[str, Any], prefix: str, source: str, root: type) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            value = data[key]
            if isinstance(value, dict) and value:  # an unknown section: judge it by its first key
                key = f"{key}.{next(iter(value))}"
            close = _suggest(prefix + str(key), root)
            valid = ", ".join(prefix + name for name in fields)
            hint = f"; did you mean {close}?" if close else f"; valid keys here: {valid}"
            raise ConfigError(f"{source}: unknown key {prefix}{key}{hint}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, prefix + name, source, root)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str, source: str, root: type) -> Any:
    origin = get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".", source, root)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
            hint_txt = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"{source}: {key}={value!r} is not one of {', '.join(map(str, choices))}{hint_txt}")
        return value
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, source, root)
    if origin is list:
        (item_type,) = get_args(hint)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value where a list is expected
        if not isinstance(value, list):
            raise ConfigError(f"{source}: {key} must be a list, got {value!r}")
        return [_coerce(item_type, v, key, source, root) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key} must be a string, got {value!r}")
    return value


def _type_name(hint: Any) -> str:
    origin = get_origin(hint)
    if origin is Literal:
        return "|".join(map(str, get_args(hint)))
    if origin is list:
        return f"list[{_type_name(get_args(hint)[0])}]"
    return getattr(hint, "__name__", str(hint))


def _help_lines(cls: type, prefix: str = ""):
    for key, hint, default, help_text in _walk(cls, prefix):
        if hint is None:
            yield f"{key}:  ({help_text})"
        else:
            yield f"  {key} ({_type_name(hint)}, default {default!r}): {help_text}"


def _train_checks(t: TrainConfig) -> list[tuple[bool, str]]:
    return [
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (t.lr > 0, "train.lr must be positive"),
        (t.max_steps >= 0, "train.max_steps must be 0 (use epochs) or positive"),
        (t.max_steps > 0 or t.epochs > 0, "set train.max_steps or train.epochs above 0"),
        (0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)"),
        (0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (0.0 < t.layer_lr_decay <= 1.0, "train.layer_lr_decay must be in (0, 1]"),
        (len(t.adam_betas) == 2, "train.adam_betas must have two numbers"),
        (t.keep_last >= 1, "train.keep_last must be at least 1"),
        (t.loss_chunk_size >= 1, "train.loss_chunk_size must be at least 1"),
        (t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be at least 1"),
        (all(r in ("tensorboard", "wandb") for r in t.report_to), "train.report_to accepts tensorboard and wandb"),
    ]


def _data_checks(d: DataConfig | PreferenceDataConfig) -> list[tuple[bool, str]]:
    return [
        (d.max_length >= 8, "data.max_length must be at least 8"),
        (0.0 <= d.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (bool(d.train_files), "data.train_files is empty"),
    ]


def _raise_first(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def validate_sft(cfg: SFTConfig) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError."""
    _raise_first(_train_checks(cfg.train) + _data_checks(cfg.data))
    from posttrain.models.adapters import validate_adapter

    validate_adapter(cfg.adapter, packing=cfg.data.packing, gradient_checkpointing=cfg.model.gradient_checkpointing,
                     optimizer=cfg.train.optimizer)


def _preference_data_checks(d: PreferenceDataConfig) -> list[tuple[bool, str]]:
    return _data_checks(d) + [
        (d.synthetic_size >= 2, "data.synthetic_size must be at least 2"),
        (d.synthetic_responses >= 2, "data.synthetic_responses must be at least 2"),
    ]


def validate_rm(cfg: RMConfig) -> None:
    """Cross-field checks of a reward-model config. Raises ConfigError."""
    _raise_first(_train_checks(cfg.train) + _preference_data_checks(cfg.data) + [
        (cfg.reward.centering >= 0, "reward.centering must be >= 0"),
        (cfg.data.format != "unpaired" and not (cfg.data.train_files == ["synthetic"]
                                                 and cfg.data.synthetic_kind == "unpaired"),
         "a reward model learns from comparisons: data must be pairs or rankings, not unpaired"),
        (cfg.adapter.method in (["full"], ["lora"]), "reward models train with adapter.method full or lora"),
    ])


def validate_dpo(cfg: DPOConfig) -> None:
    """Cross-field checks of a preference-optimisation config. Raises ConfigError."""
    p = cfg.dpo
    _raise_first(_train_checks(cfg.train) + _preference_data_checks(cfg.data) + [
        (p.beta > 0, "dpo.beta must be positive"),
        (0.0 <= p.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
        (p.orpo_lambda >= 0 and p.nll_weight >= 0, "dpo.orpo_lambda and dpo.nll_weight must be >= 0"),
        (p.kto_desirable_weight > 0 and p.kto_undesirable_weight > 0, "dpo.kto_*_weight must be positive"),
    ])
    from posttrain.models.adapters import validate_adapter

    validate_adapter(cfg.adapter, packing=False, gradient_checkpointing=cfg.model.gradient_checkpointing,
                     optimizer=cfg.train.optimizer)


def validate_grpo(cfg: GRPOConfig) -> None:
    """Cross-field checks of a GRPO / RLOO config. Raises ConfigError."""
    g, r, t = cfg.grpo, cfg.rollout, cfg.train
    per_rollout = t.batch_size * t.grad_accum
    _raise_first(_train_checks(t) + _rollout_checks(cfg) + [
        (r.num_generations >= 2, "rollout.num_generations must be at least 2 (advantages compare a prompt's samples)"),
        (per_rollout % r.num_generations == 0,
         f"train.batch_size x train.grad_accum = {per_rollout} completions per step must be a multiple of "
         f"rollout.num_generations = {r.num_generations} (whole groups per rollout)"),
        (g.beta >= 0 and g.clip_eps > 0, "grpo.beta must be >= 0 and grpo.clip_eps > 0"),
        (g.updates_per_rollout >= 1, "grpo.updates_per_rollout must be >= 1"),
        (t.save_every % g.updates_per_rollout == 0,
         "train.save_every must be a multiple of grpo.updates_per_rollout (checkpoints fall between rollouts)"),
    ])
    from posttrain.models.adapters import validate_adapter

    validate_adapter(cfg.adapter, packing=False, gradient_checkpointing=cfg.model.gradient_checkpointing,
                     optimizer=cfg.train.optimizer)


def _rollout_checks(cfg: GRPOConfig | PPOConfig) -> list[tuple[bool, str]]:
    r = cfg.rollout
    return [
        (r.engine == "transformers", "rollout.engine=vllm is not built yet in this version; use rollout.engine=transformers"),
        (r.max_new_tokens >= 1 and r.batch_size >= 1, "rollout.max_new_tokens and rollout.batch_size must be >= 1"),
        (r.temperature > 0, "rollout.temperature must be > 0: online RL learns from sampled completions"),
        (cfg.data.max_prompt_length >= 1, "data.max_prompt_length must be >= 1"),
        (0 <= cfg.data.eval_fraction < 1, "data.eval_fraction must be in [0, 1)"),
        (bool(cfg.reward.functions or cfg.reward.models or cfg.reward.format_regex),
         "no reward: set reward.functions, reward.models or reward.format_regex"),
    ]


def validate_ppo(cfg: PPOConfig) -> None:
    """Cross-field checks of a PPO config. Raises ConfigError."""
    p, t, r = cfg.ppo, cfg.train, cfg.rollout
    per_rollout = t.batch_size * t.grad_accum * p.minibatches
    _raise_first(_train_checks(t) + _rollout_checks(cfg) + [
        (r.num_generations >= 1, "rollout.num_generations must be at least 1"),
        (per_rollout % r.num_generations == 0,
         f"train.batch_size x train.grad_accum x ppo.minibatches = {per_rollout} completions per rollout must be a "
         f"multiple of rollout.num_generations = {r.num_generations}"),
        (p.epochs >= 1 and p.minibatches >= 1, "ppo.epochs and ppo.minibatches must be >= 1"),
        (p.kl_coef >= 0 and p.kl_target > 0 and p.kl_horizon > 0, "ppo.kl_coef must be >= 0, kl_target and kl_horizon > 0"),
        (not (p.kl_control == "adaptive" and p.kl_coef == 0), "ppo.kl_control=adaptive needs ppo.kl_coef > 0 to adapt"),
        (0 <= p.gamma <= 1 and 0 <= p.lam <= 1, "ppo.gamma and ppo.lam must be in [0, 1]"),
        (p.clip_eps > 0 and p.value_clip > 0, "ppo.clip_eps and ppo.value_clip must be > 0"),
        (p.vf_coef > 0 and p.value_lr_ratio > 0, "ppo.vf_coef and ppo.value_lr_ratio must be > 0"),
        (p.entropy_coef >= 0 and p.early_stop_kl >= 0, "ppo.entropy_coef and ppo.early_stop_kl must be >= 0"),
    ])
    from posttrain.models.adapters import validate_adapter

    validate_adapter(cfg.adapter, packing=False, gradient_checkpointing=cfg.model.gradient_checkpointing,
                     optimizer=cfg.train.optimizer)


def section_values(section_cls: type, config: Any = None, overrides: dict[str, Any] | None = None,
                   caller: str = "") -> dict[str, Any]:
    """A section's fields as a dict: `config`'s values (defaults when None), then keyword overrides.

    Lets library functions take a config section or plain keywords without restating defaults.
    """
    defaults = dataclasses.asdict(section_cls())
    values = {name: getattr(config, name, default) for name, default in defaults.items()}
    unknown = set(overrides or {}) - set(values)
    if unknown:
        raise TypeError(f"{caller} got unexpected arguments: {sorted(unknown)}")
    values.update(overrides or {})
    return values


def markdown_reference(cls: type | None = None, sections: tuple[str, ...] = ()) -> str:
    """The config reference table for the README (kept in sync by a test); `sections`
    limits it to keys under those sections."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, hint, default, help_text in _walk(cls or SFTConfig):
        if hint is not None and (not sections or key.split(".")[0] in sections):
            type_name = _type_name(hint).replace("|", "\\|")
            rows.append(f"| `{key}` | {type_name} | `{default!r}` | {help_text} |")
    return "\n".join(rows)


def preference_reference() -> str:
    """The sections rm and dpo add to (or change from) SFT's."""
    return (markdown_reference(DPOConfig, ("data",)) + "\n" + markdown_reference(RMConfig, ("reward",)).split("\n", 2)[2]
            + "\n" + markdown_reference(DPOConfig, ("dpo",)).split("\n", 2)[2])


def rl_reference() -> str:
    """The sections grpo and ppo add to (or change from) SFT's."""
    tables = [markdown_reference(GRPOConfig, (name,)) for name in ("data", "rollout", "reward", "grpo", "eval")]
    tables.append(markdown_reference(PPOConfig, ("ppo",)))
    return "\n".join([tables[0]] + [t.split("\n", 2)[2] for t in tables[1:]])


if __name__ == "__main__":
    print(markdown_reference())
    print("\n## Config reference (rm and dpo: the sections that differ from SFT)\n")
    print(preference_reference())
    print("\n## Config reference (grpo, rloo and ppo: the sections that differ from SFT)\n")
    print(rl_reference())
