"""The sections every stage shares (model, adapter, data, train, eval) and the SFT config."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from posttrain.config.schema import _raise_first, _StageConfig, checked, option


# every data section's max_bad_fraction (formats.load_records applies it to each file of a mix)
MAX_BAD_FRACTION_HELP = ("with bad_rows=skip, fail the run if more than this fraction of any one file's rows is "
                         "malformed (each file of a mix on its own, named)")


@dataclass
class ModelConfig:
    path: str = option("tiny", "built-in preset name (tiny) or a local Hugging Face model directory")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype the weights are loaded in")
    trust_remote_code: bool = option(False, "run Python code shipped inside the model directory (only if you trust it)")
    gradient_checkpointing: bool = option(False, "recompute activations in backward to save memory")
    lean_activations: Literal["auto", True, False] = option(
        "auto", "RMSNorm and SwiGLU of Llama-style layers keep fewer tensors for the backward (same forward "
                "values; under bf16 autocast a layer keeps 27-45% fewer activation bytes by count: LoRA 27%, full "
                "fine-tuning 45%; measured: 26% off DPO full's peak GPU memory); auto: on a GPU or other accelerator, "
                "not on CPU, where it measured no gain")
    padding_free: bool = option(
        True, "reward models, the DPO family and online RL (GRPO, RLOO, PPO and its critic) hand their batches "
              "to the model without the padding: only attention sees rows, everything else runs on the real "
              "tokens, and the last layer only where the loss reads it (Llama, Mistral, Qwen2, Qwen3 with sdpa attention and no sliding window narrower than the "
              "longest sequence; other models take padded batches)")


@dataclass
class LoraConfig:
    r: int = option(8, "LoRA rank")
    alpha: float = option(16.0, "LoRA scaling numerator (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = option(0.0, "dropout on the LoRA input")
    target_modules: list[str] = option(
        ["all-linear"], "layers to adapt: names (a module path or its dotted tail: q_proj, self_attn.q_proj), "
                        "all-linear alone, or one 're:<regex>' alone, which must match a whole module path (peft's "
                        "re.fullmatch: re:.*q_proj, not re:q_proj)"
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
    target_modules: list[str] = option([], "modules whose output IA3 rescales (named as adapter.lora.target_modules); "
                                        "empty = peft's default for the model type, else the key / value (or fused "
                                        "qkv) and FFN down projections found by name")
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
    init_std: float = option(1e-3, "std of the down projection's random init (the up projection starts at zero, so "
                                   "the adapter starts as the identity); must be > 0: at 0 neither projection ever "
                                   "gets a gradient")


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
    eval_files: list[str] = option([], "held-out files (also with `train_files: [synthetic]`, in place of its held-out "
                                       "split); empty = split eval_fraction off the training data")
    eval_fraction: float = option(0.05, "fraction of training rows held out when eval_files is empty, by prompt "
                                         "(all of a prompt's rows on one side)")
    format: Literal["auto", "alpaca", "messages", "prompt_completion", "text"] = option(
        "auto", "row format; auto-detected from the first rows")
    train_on: Literal["all", "last"] = option(
        "all", "which assistant turns of a chat row train: all, or the last only (the earlier ones context, as "
               "'weight': 0 makes them); text rows have no turns: last refuses them")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option(
        "auto", "chat template: the tokenizer's own (auto falls back to chatml when it has none) or a built-in one"
    )
    max_length: int = option(512, "maximum tokens per example (and per packed row)")
    overlength: Literal["truncate", "drop"] = option("truncate", "what to do with examples longer than max_length (always counted)")
    bad_rows: Literal["error", "skip"] = option("error", "malformed rows: stop before training, or skip them into the run's rejects-train.jsonl / rejects-eval.jsonl")
    max_bad_fraction: float = option(0.01, MAX_BAD_FRACTION_HELP)
    packing: bool = option(False, "pack several examples per row (no attention across them)")
    group_by_length: bool = option(
        False, "batch examples of similar length together: less padding, but can hurt multi-task learning"
    )
    streaming: bool = option(False, "read training files lazily, in file order each pass, not shuffled (for files larger "
                                    "than memory; needs train.max_steps and files, not synthetic)")
    synthetic_tasks: list[str] = option(["smallest", "copy", "reverse"], "tasks of the bundled synthetic generator")
    synthetic_size: int = option(4000, "number of synthetic training examples")


@dataclass
class TrainConfig:
    seed: int = option(0, "seed for weights init, data order and dropout")
    epochs: float = option(1.0, "passes over the training data (ignored when max_steps > 0)")
    max_steps: int = option(0, "optimizer steps; 0 = derive from epochs")
    batch_size: int = option(8, "rows per micro-batch per process (packed rows under data.packing, streamed or not)")
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float = option(2e-5, "peak learning rate")
    weight_decay: float = option(0.0, "AdamW decoupled weight decay")
    adam_betas: list[float] = option([0.9, 0.999], "AdamW betas")
    adam_eps: float = option(1e-8, "AdamW epsilon")
    optimizer: Literal["adamw", "adamw_fused", "adamw_8bit", "paged_adamw_8bit"] = option(
        "adamw", "adamw (torch's per-tensor loop, or its foreach kernel on CUDA: on float32 weights torch's AdamW "
                 "bit for bit), adamw_fused (torch's fused kernel: the same update several times faster, rounded "
                 "differently, so float32 weights differ from adamw's in the last bits), or bitsandbytes' 8-bit / "
                 "paged 8-bit AdamW (CUDA only); adamw and adamw_fused keep float32 moments for bfloat16 / float16 "
                 "weights and update them through a float32 copy rounded once (torch's AdamW keeps those moments "
                 "in the weight's dtype), and update an untied input embedding on the rows a gradient has reached "
                 "(from a sparse gradient on one process) with moments for those rows only: the same weights as "
                 "updating every row, exactly under adamw, to rounding under adamw_fused; checkpoints hold torch's "
                 "full state")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this (0 = no clipping)")
    schedule: Literal["constant", "linear", "cosine"] = option("cosine", "learning-rate schedule after warmup")
    warmup_steps: int = option(0, "linear warmup steps")
    warmup_ratio: float = option(0.0, "warmup as a fraction of max steps (used when warmup_steps is 0)")
    min_lr_ratio: float = option(0.0, "final learning rate as a fraction of the peak (linear, cosine)")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "autocast precision (accelerate)")
    layer_lr_decay: float = option(1.0, "layer i of L trains at lr * decay^(L - i); embeddings at decay^(L+1)")
    freeze: list[str] = option([], "glob patterns of parameter names to freeze (e.g. '*embed_tokens*')")
    loss: Literal["auto", "chunked", "plain"] = option(
        "auto", "sft's token loss, read by sft alone (the other stages take the setting, which a pipeline-wide "
                "override sets in every stage, and ignore it): chunked (linear + cross-entropy a chunk of tokens at "
                "a time, never building [B,T,V] logits), plain (the model's logits, then cross-entropy), or auto: chunked when the logits "
                "are a plain linear map of the last hidden state (an nn.Linear output layer, or LoRA on one without "
                "dropout, and no logit scaling or soft-capping in the config), else plain")
    loss_chunk_size: int = option(256, "tokens per chunk of the chunked loss and log-probs (peak extra memory ~ "
                                       "chunk × vocab × 12-20 bytes; a trained head with bfloat16 weights adds its "
                                       "float32 vocab × hidden gradient)")
    eval_every: int = option(0, "evaluate every N steps (0 = only at the end); the RL stages measure their "
                                            "held-out reward there")
    early_stopping_patience: int = option(0, "stop after N evaluations without improvement (0 = never)")
    save_every: int = option(0, "checkpoint every N steps (0 = only at the end)")
    keep_last: int = option(2, "complete checkpoints to keep")
    resume: str = option("auto", "auto (newest complete checkpoint in output_dir), never, or a checkpoint path")
    log_every: int = option(1, "write metrics every N steps: loss, grad norm, tokens and stage metrics are "
                                "means over them (a skipped non-finite step is logged alone); lr, epoch and "
                                "counters are the last step's")
    max_consecutive_nonfinite: int = option(5, "stop after this many non-finite steps in a row")
    report_to: list[str] = option([], "extra trackers through accelerate: tensorboard, wandb")
    progress_bar: bool = option(True, "show a progress bar with ETA")


@dataclass
class EvalConfig:
    exact_match_prompts: int = option(0, "held-out synthetic prompts scored by exact match before and after (0 = off)")
    max_new_tokens: int = option(32, "generation budget for exact-match scoring")


FORGETTING_HELP = ("catastrophic-forgetting control: measure, replay, L2-SP, EWC, an LM loss or distillation on retain "
                   "rows, A-GEM projection, gradual unfreezing")


@dataclass
class ForgettingConfig:
    retain_files: list[str] = option(
        [], "data the model must not forget (rows in any of sft's formats, detected per file, in every stage): "
            "measured at every evaluation, and the pool of replay, EWC's Fisher, lm_coef, distill and project; "
            "empty = off")
    retain_eval_fraction: float = option(
        0.2, "share of the retain rows held out to measure forgetting: never replayed, never in the Fisher")
    replay_ratio: float = option(0.0, "share of the training examples drawn from the retain rows (replay); 0 = none")
    l2sp: float = option(0.0, "L2-SP strength α: a penalty α/2·Σ(θ−θ₀)² toward the weights the run starts from "
                              "(needs no retain rows); 0 = off")
    ewc: float = option(0.0, "EWC strength λ: a penalty λ/2·Σ F·(θ−θ₀)², F the diagonal empirical Fisher (the rows' "
                             "own labels) on retain rows scaled to mean 1 (so λ reads like α); 0 = off")
    fisher_examples: int = option(64, "retain pool rows, drawn by train.seed, whose gradients estimate EWC's Fisher "
                                      "(one backward each)")
    max_retain_increase: float = option(
        0.0, "stop the run at an evaluation where the retain loss is this much above its value at the start, "
             "or not finite (nats per token; 0 = never)")
    retain_exact_match: int = option(0, "held-out retain prompts scored by greedy exact match before and after (0 = off)")
    lm_coef: float = option(
        0.0, "γ of a language-modelling loss on a batch of retain rows added every step (InstructGPT's PPO-ptx; "
             "replay for the stages whose rows are not text: dpo, grpo, rloo, ppo); 0 = off")
    distill: float = option(
        0.0, "λ of a distillation term on a batch of retain rows every step (LwF): KL(p_θ₀ ‖ p_θ) per label "
             "token, p_θ₀ the model as the run starts, over its top distill_top_k tokens and the rest; 0 = off")
    distill_top_k: int = option(32, "tokens of the starting model's distribution kept per position for distill "
                                    "(computed once over the pool; the rest is one bucket)")
    distill_temperature: float = option(
        1.0, "temperature T of distill: T²·KL(softmax(z₀/T) ‖ softmax(z/T)) per label token (Hinton et al.'s T² "
             "scaling); Li & Hoiem use 2; 1 = the plain KL")
    project: bool = option(
        False, "A-GEM: when a step's gradient would raise the loss on a batch of retain rows (negative dot "
               "product), remove its component along that batch's gradient")
    retain_batch_size: int = option(
        0, "retain rows per optimizer step for lm_coef, distill and project, run train.batch_size at a time "
           "(0 = the step's global batch: train.batch_size x grad_accum x processes)")
    unfreeze_every: int = option(
        0, "gradual unfreezing (ULMFiT): the topmost group of trained parameters (final norm and head, or the "
           "top layer's adapters) trains from step 0 and the next layer below joins every N steps, the "
           "embeddings last; 0 = off; needs no retain data")


@dataclass
class SFTConfig(_StageConfig):
    output_dir: str = option("runs/sft", "run directory: checkpoints, metrics.jsonl, final model")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "model to train"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "what is trained: full, freeze or PEFT methods"})
    data: DataConfig = dataclasses.field(default_factory=DataConfig, metadata={"help": "training data"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    forgetting: ForgettingConfig = dataclasses.field(
        default_factory=ForgettingConfig, metadata={"help": FORGETTING_HELP})


def _forgetting_checks(f: ForgettingConfig, d: DataConfig, t: TrainConfig) -> list[tuple[bool, str]]:
    uses = [name for name, on in (("replay_ratio", f.replay_ratio > 0), ("ewc", f.ewc > 0),
                                  ("max_retain_increase", f.max_retain_increase > 0),
                                  ("retain_exact_match", f.retain_exact_match > 0), ("lm_coef", f.lm_coef > 0),
                                  ("distill", f.distill > 0), ("project", f.project)) if on]
    return [
        (0.0 <= f.replay_ratio < 1.0, "forgetting.replay_ratio must be in [0, 1)"),
        (0.0 < f.retain_eval_fraction < 1.0, "forgetting.retain_eval_fraction must be in (0, 1)"),
        (min(f.l2sp, f.ewc, f.max_retain_increase, f.retain_exact_match, f.lm_coef, f.distill,
             f.retain_batch_size, f.unfreeze_every) >= 0,
         "forgetting.l2sp, ewc, max_retain_increase, retain_exact_match, lm_coef, distill, retain_batch_size and "
         "unfreeze_every must be >= 0"),
        (f.fisher_examples >= 1, "forgetting.fisher_examples must be at least 1"),
        (f.distill_top_k >= 1, "forgetting.distill_top_k must be at least 1"),
        (f.distill_temperature > 0, "forgetting.distill_temperature must be above 0"),
        (bool(f.retain_files) or not uses,
         f"forgetting.{uses[0] if uses else ''} needs forgetting.retain_files (the data not to forget)"),
        ("synthetic" not in f.retain_files, "forgetting.retain_files takes files; write synthetic rows to a file first"),
        (not (getattr(d, "streaming", False) and f.replay_ratio > 0),
         "forgetting.replay_ratio needs data in memory (data.streaming=false)"),
        (f.max_retain_increase == 0 or t.eval_every > 0,
         "forgetting.max_retain_increase is checked at evaluations during training: set train.eval_every too "
         "(0 evaluates only at the end, where there is nothing left to stop)"),
    ]


def other_stage_forgetting_checks(f: ForgettingConfig, d, t: TrainConfig) -> list[tuple[bool, str]]:
    """`forgetting` in dpo, grpo, rloo and ppo, whose rows are not text the model can be trained on."""
    return _forgetting_checks(f, d, t) + [
        (f.replay_ratio == 0, "forgetting.replay_ratio mixes retain rows into the training rows, which only sft "
                              "can; use forgetting.lm_coef (a language-modelling loss on retain rows every step)"),
    ]


SEED_RANGE = 2**32  # numpy's seeds (accelerate's set_seed, MinHash permutations): 0 <= seed < 2**32


def _train_checks(t: TrainConfig) -> list[tuple[bool, str]]:
    return [
        (0 <= t.seed < SEED_RANGE, f"train.seed must be in [0, 2**32) (numpy's seeds), got {t.seed}"),
        (t.batch_size >= 1, "train.batch_size must be at least 1"),
        (t.grad_accum >= 1, "train.grad_accum must be at least 1"),
        (t.lr > 0, "train.lr must be positive"),
        (t.max_steps >= 0, "train.max_steps must be 0 (use epochs) or positive"),
        (t.max_steps > 0 or t.epochs > 0, "set train.max_steps or train.epochs above 0"),
        (0.0 <= t.warmup_ratio < 1.0, "train.warmup_ratio must be in [0, 1)"),
        (0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (0.0 < t.layer_lr_decay <= 1.0, "train.layer_lr_decay must be in (0, 1]"),
        (len(t.adam_betas) == 2 and all(0.0 <= b < 1.0 for b in t.adam_betas),
         "train.adam_betas must be two numbers in [0, 1)"),
        (t.adam_eps >= 0, "train.adam_eps must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.max_grad_norm >= 0, "train.max_grad_norm must be >= 0 (0 = no clipping)"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.epochs >= 0, "train.epochs must be >= 0"),
        (t.log_every >= 1, "train.log_every must be at least 1"),
        (t.eval_every >= 0 and t.save_every >= 0 and t.early_stopping_patience >= 0,
         "train.eval_every, train.save_every and train.early_stopping_patience must be >= 0 (0 = off)"),
        (t.early_stopping_patience == 0 or t.eval_every > 0,
         "train.early_stopping_patience counts evaluations during training: set train.eval_every too "
         "(0 evaluates only at the end, where there is nothing left to stop)"),
        (t.keep_last >= 1, "train.keep_last must be at least 1"),
        (t.loss_chunk_size >= 1, "train.loss_chunk_size must be at least 1"),
        (t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be at least 1"),
        (all(r in ("tensorboard", "wandb") for r in t.report_to), "train.report_to accepts tensorboard and wandb"),
    ]


def _weight_checks(model: ModelConfig, adapter: AdapterConfig) -> list[tuple[bool, str]]:
    trains_weights = any(m in ("full", "freeze") for m in adapter.method)
    return [(not (model.dtype == "float16" and trains_weights),
             "model.dtype=float16 cannot train the weights themselves (adapter.method full / freeze): AdamW's second "
             "moment underflows in float16 and its eps (1e-8) rounds to 0, so the first update is 0/0 = NaN; load "
             "float32 or bfloat16 weights (train.mixed_precision=fp16 computes in float16)")]


def synthetic_checks(files: list[str], tasks: list[str], size: int | None, section: str,
                     min_size: int = 1) -> list[tuple[bool, str]]:
    """The bundled generator's settings, checked when `files` is ['synthetic'] (the training
    stages' data, evaluate's prompts): before the model loads, not after."""
    from posttrain.data.synthetic import TASKS

    if files != ["synthetic"]:
        return []
    unknown = [t for t in tasks if t not in TASKS]
    return [
        (bool(tasks), f"{section}.synthetic_tasks is empty; choose from {', '.join(TASKS)}"),
        (not unknown, f"{section}.synthetic_tasks: unknown {', '.join(map(repr, unknown))}; choose from "
                      f"{', '.join(TASKS)}"),
        (size is None or size >= min_size, f"{section}.synthetic_size must be at least {min_size}"),
    ]


def _rows_checks(d, min_synthetic: int = 1) -> list[tuple[bool, str]]:
    """Checks of every training stage's data section (DataConfig, PreferenceDataConfig, PromptDataConfig)."""
    return [
        (0.0 <= d.eval_fraction < 1.0, "data.eval_fraction must be in [0, 1)"),
        (0.0 <= d.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (bool(d.train_files), "data.train_files is empty"),
        synthetic_alone_check(d.train_files, "data.train_files"),
        ("synthetic" not in d.eval_files,
         "data.eval_files takes files, not 'synthetic' (data.train_files: [synthetic] with data.eval_files "
         "empty holds out data.eval_fraction of the generator's own prompts)"),
        *synthetic_checks(d.train_files, d.synthetic_tasks, d.synthetic_size, "data", min_synthetic),
        *_held_out_checks(d.train_files, d.eval_files),
    ]


def synthetic_alone_check(files: list[str], key: str) -> tuple[bool, str]:
    """'synthetic', the bundled generator, is the whole of a list of data files or no part of it
    (the data layer reads either the generator or files, never both): checked up front, before
    the model loads."""
    return (files == ["synthetic"] or "synthetic" not in files,
            f"{key}: 'synthetic' (the bundled generator) cannot be mixed with files or listed twice; give "
            f"[synthetic] alone, or files only")


def listed_once_check(files: list[str], key: str) -> tuple[bool, str]:
    """No file is listed twice in one list of data files, by any spelling (`readers.files_listed_twice`):
    its rows would count twice, a dedup pass would drop every row of it as a duplicate, and a
    held-out split would put copies of a row on both sides."""
    from posttrain.data.readers import files_listed_twice

    twice = files_listed_twice(files)
    return (not twice, f"{key} lists {', '.join(map(str, twice))} twice (another entry names the same file): its "
                       f"rows would count twice; list each file once")


def _held_out_checks(train_files: list[str], eval_files: list[str]) -> list[tuple[bool, str]]:
    """A held-out file is not also a training file: every held-out figure would be a training figure.
    No file is listed twice in one list (`listed_once_check`)."""
    from posttrain.data.readers import files_in_both

    both = files_in_both(eval_files, train_files)
    return [listed_once_check(train_files, "data.train_files"), listed_once_check(eval_files, "data.eval_files"),
            (not both, f"data.eval_files and data.train_files both list {', '.join(map(str, both))}; held-out files "
                       f"must not be trained on (every held-out figure would be measured on training rows): give "
                       f"other files, or leave data.eval_files empty to hold out data.eval_fraction of the training "
                       f"rows")]


def _data_checks(d, min_synthetic: int = 1) -> list[tuple[bool, str]]:  # DataConfig or PreferenceDataConfig
    return [(d.max_length >= 8, "data.max_length must be at least 8"), *_rows_checks(d, min_synthetic)]


def _train_on_checks(d: DataConfig) -> list[tuple[bool, str]]:
    """data.train_on=last picks a chat row's final assistant turn: text rows have none."""
    return [(not (d.train_on == "last" and d.format == "text"),
             "data.train_on=last trains a chat row's final assistant turn; text rows have no turns: set "
             "data.train_on=all, or give chat rows (messages, alpaca, prompt_completion)")]


def _eval_checks(e: EvalConfig) -> list[tuple[bool, str]]:
    return [(e.exact_match_prompts <= 0 or e.max_new_tokens >= 1,
             "eval.max_new_tokens must be at least 1 when eval.exact_match_prompts is on")]


def _streaming_checks(d: DataConfig, t: TrainConfig) -> list[tuple[bool, str]]:
    """data.streaming reads training files lazily: there are files to read, and no length to derive steps from."""
    if not d.streaming:
        return []
    return [
        (d.train_files != ["synthetic"], "data.streaming=true reads training files lazily; the bundled synthetic "
                                         "data is generated in memory: set data.streaming=false, or give "
                                         "data.train_files"),
        (t.max_steps > 0, "data.streaming=true needs train.max_steps (the data length is unknown)"),
    ]


def validate_adapter_settings(adapter: AdapterConfig, model: ModelConfig, optimizer: str, packing: bool = False):
    """Every stage's adapter checks, before anything loads (`models.adapters.validate_adapter`).
    Returns the AdapterPlan."""
    from posttrain.models.adapters import validate_adapter

    return validate_adapter(adapter, packing=packing, gradient_checkpointing=model.gradient_checkpointing,
                            optimizer=optimizer)


def validate_sft(cfg: SFTConfig) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError."""
    cfg = checked(cfg)
    _raise_first(_train_checks(cfg.train) + _weight_checks(cfg.model, cfg.adapter) + _data_checks(cfg.data)
                 + _streaming_checks(cfg.data, cfg.train) + _train_on_checks(cfg.data) + _eval_checks(cfg.eval)
                 + _forgetting_checks(cfg.forgetting, cfg.data, cfg.train))
    validate_adapter_settings(cfg.adapter, cfg.model, cfg.train.optimizer, packing=cfg.data.packing)
