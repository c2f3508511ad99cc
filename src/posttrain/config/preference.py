"""Configs of the preference stages: reward models (`posttrain rm`) and the DPO family."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option
from posttrain.config.sections import (FORGETTING_HELP, MAX_BAD_FRACTION_HELP, AdapterConfig, EvalConfig,
                                       ForgettingConfig, ModelConfig, TrainConfig, _data_checks, _eval_checks,
                                       _train_checks, _weight_checks, other_stage_forgetting_checks,
                                       validate_adapter_settings)


@dataclass
class PreferenceDataConfig:
    train_files: list[str] = option(["synthetic"], "preference files (jsonl, json, parquet, csv, datasets dir) or 'synthetic'")
    eval_files: list[str] = option([], "held-out files (also with `train_files: [synthetic]`, in place of its held-out "
                                       "split); empty = split eval_fraction off the training data")
    eval_fraction: float = option(0.05, "fraction of training rows held out when eval_files is empty, by prompt "
                                         "(all of a prompt's rows on one side)")
    format: Literal["auto", "pairs", "ranking", "unpaired"] = option(
        "auto", "pairs (prompt/chosen/rejected), ranking (prompt/responses/ranks), unpaired (prompt/completion/label)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option(
        "auto", "chat template, applied the same way to every response of a prompt")
    max_length: int = option(512, "maximum tokens per prompt + response")
    overlength: Literal["truncate", "drop"] = option(
        "truncate", "over-long responses: cut their end, or drop the whole row (always counted)")
    bad_rows: Literal["error", "skip"] = option("error", "malformed rows: stop before training, or skip them into the run's rejects-train.jsonl / rejects-eval.jsonl")
    max_bad_fraction: float = option(0.01, MAX_BAD_FRACTION_HELP)
    synthetic_tasks: list[str] = option(["smallest"], "tasks of the bundled generator (chosen = the correct answer)")
    synthetic_size: int = option(2000, "number of synthetic preference rows")
    synthetic_kind: Literal["pairs", "ranking", "unpaired"] = option("pairs", "shape of the synthetic rows")
    synthetic_responses: int = option(4, "responses per prompt for synthetic rankings")


@dataclass
class RewardConfig:
    centering: float = option(0.0, "reward-centering coefficient c: adds c·(r_w + r_l)² (Eisenstein et al. 2023)")
    use_margins: bool = option(True, "subtract a row's 'margin' inside the Bradley-Terry loss (Llama 2)")
    share_prompt: bool = option(
        True, "compute a prompt once for all its responses (one block, 4-D attention mask; short blocks packed into "
              "a row); decoder backbones only, not under a sliding window narrower than data.max_length, nor with "
              "ALiBi position biases (Bloom, MPT, Falcon-RW), nor under attention other than sdpa (eager attention "
              "would add the boolean block mask to the scores)")


# cdpo's ε when dpo.label_smoothing is unset. The setting's default is None, not this, so that a
# value given under another loss is seen (TRL's sigmoid loss with label_smoothing=0.1 is cdpo);
# under cdpo an unset ε is resolved to it (DPOLossConfig.__post_init__), as β is.
CDPO_LABEL_SMOOTHING = 0.1

# dpo.beta when unset: the DPO paper's 0.1 for the losses with a reference (a KL strength), and
# under simpo, where β scales per-token average log-probs, SimPO's own (Meng et al. 2024 tune
# β in 2–10 with γ/β about 0.5): unset, γ is SIMPO_GAMMA_BETA_RATIO · β.
DPO_BETA = 0.1
SIMPO_BETA = 2.0
SIMPO_GAMMA_BETA_RATIO = 0.5


@dataclass
class DPOLossConfig:
    loss: Literal["dpo", "cdpo", "ipo", "hinge", "simpo", "orpo", "kto"] = option(
        "dpo", "dpo (sigmoid), cdpo, ipo, hinge, simpo, orpo, kto")
    beta: float | None = option(
        None, f"β: strength of the KL anchor (dpo/cdpo/ipo/hinge/kto) or reward scale (simpo); orpo reads it only "
              f"to scale its logged rewards (unset: {DPO_BETA}, under simpo {SIMPO_BETA}, SimPO's own; the "
              f"run's config.yaml records the value used)")
    label_smoothing: float | None = option(None, f"cdpo: probability ε that a pair's label is flipped (unset: "
                                                 f"{CDPO_LABEL_SMOOTHING}, recorded in the run's config.yaml; 0 "
                                                 f"under another loss: off, recorded as unset)")
    simpo_gamma: float | None = option(None, f"simpo: target reward margin γ (unset: {SIMPO_GAMMA_BETA_RATIO} × "
                                             f"dpo.beta, SimPO's γ/β; {SIMPO_GAMMA_BETA_RATIO * SIMPO_BETA:g} at "
                                             f"its default β)")
    orpo_lambda: float = option(0.1, "orpo: weight λ of the odds-ratio term (TRL's ORPOConfig.beta)")
    kto_desirable_weight: float = option(1.0, "kto: λ_D, weight of desirable examples")
    kto_undesirable_weight: float = option(1.0, "kto: λ_U, weight of undesirable examples")
    nll_weight: float = option(0.0, "add this × the chosen responses' mean token NLL (RPO; TRL's rpo_alpha; in a "
                                    "ranking, the best-ranked response's); not with orpo (it has its own) nor kto")
    share_prompt: bool = option(
        True, "compute a prompt once for all its responses (one block, 4-D attention mask; short blocks packed into "
              "a row); off for KTO, virtual tokens, a sliding window narrower than data.max_length, ALiBi position "
              "biases (Bloom, MPT, Falcon-RW) and attention other than sdpa (eager attention would add the boolean "
              "block mask to the scores)")
    reference: Literal["precompute", "live"] = option(
        "precompute", "reference log-probs: computed once before training and cached in the run, "
        "or every step (adapters disabled, or a frozen copy for full fine-tuning)")

    def __post_init__(self) -> None:
        """An unset β (SimPO's γ, cDPO's ε) takes the chosen loss's default, so that the config a
        run records, and prints, holds the values it trains with. An ε of 0 under a loss that does
        not read it (TRL configs carry label_smoothing: 0.0) is no smoothing: unset, as the loss
        has none, so that it is the same config (and resume fingerprint) as leaving it out."""
        if self.beta is None:
            self.beta = SIMPO_BETA if self.loss == "simpo" else DPO_BETA
        if self.simpo_gamma is None and self.loss == "simpo" and isinstance(self.beta, (int, float)):
            self.simpo_gamma = SIMPO_GAMMA_BETA_RATIO * self.beta
        if self.loss == "cdpo" and self.label_smoothing is None:
            self.label_smoothing = CDPO_LABEL_SMOOTHING
        elif self.loss != "cdpo" and self.label_smoothing == 0 and type(self.label_smoothing) in (int, float):
            self.label_smoothing = None


# The settings an older version recorded otherwise for the same training: {key: ((then, now), ...)}.
# A cdpo run from before ε was resolved recorded label_smoothing null and trained with
# CDPO_LABEL_SMOOTHING (a run of any other loss still records null); every run from before
# SimPO's γ followed β (da668b6) recorded simpo_gamma 0.5, read by simpo alone, where a run of
# any other loss now records null (under simpo γ is always a number, so 0.5 → null is never a
# simpo run). A resume compares a checkpoint's fingerprint through `same_as_recorded_earlier`.
RECORDED_EARLIER = {
    "dpo.label_smoothing": ((None, CDPO_LABEL_SMOOTHING),),
    "dpo.simpo_gamma": ((0.5, None),),
}


def same_as_recorded_earlier(key: str, then, now) -> bool:
    """True when a checkpoint's `then` for the fingerprint setting `key` is this version's `now`
    for the same training (RECORDED_EARLIER): a resume need not refuse the change."""
    return (then, now) in RECORDED_EARLIER.get(key, ())


@dataclass
class RMAdapterConfig(AdapterConfig):
    """The adapter section as a reward model reads it: its method (full, lora or dora) and adapter.lora."""

    method: list[str] = option(["full"], "full or lora (dora: lora with adapter.lora.dora=true); the new score "
                                         "head trains in full with each")

    def __post_init__(self) -> None:
        """method dora is lora with adapter.lora.dora, as plan_adapters reads it in every stage: the
        config a run records says so, and the reward model is built from those two settings."""
        if self.method == ["dora"]:
            self.method = ["lora"]
            self.lora = dataclasses.replace(self.lora, dora=True)


@dataclass
class RMConfig(_StageConfig):
    # the adapter settings of the other methods: validate_rm refuses those methods and a schedule;
    # train.loss is sft's token loss
    unread_in_help = ("adapter.schedule", "adapter.quantization", "adapter.ia3", "adapter.virtual_tokens",
                      "adapter.bottleneck", "adapter.freeze", "train.loss")

    output_dir: str = option("runs/rm", "run directory: checkpoints, metrics.jsonl, final reward model")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "backbone to score with"})
    adapter: RMAdapterConfig = dataclasses.field(default_factory=RMAdapterConfig, metadata={"help": "full or lora (dora)"})
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig, metadata={"help": "preference data"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig, metadata={"help": "reward-model loss"})


@dataclass
class DPOConfig(_StageConfig):
    unread_in_help = ("train.loss",)  # sft's token loss

    output_dir: str = option("runs/dpo", "run directory: checkpoints, metrics.jsonl, final policy")
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig, metadata={"help": "policy to start from (the SFT model)"})
    adapter: AdapterConfig = dataclasses.field(default_factory=AdapterConfig, metadata={"help": "what is trained: full, freeze or PEFT methods"})
    data: PreferenceDataConfig = dataclasses.field(default_factory=PreferenceDataConfig, metadata={"help": "preference data"})
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig, metadata={"help": "optimisation"})
    dpo: DPOLossConfig = dataclasses.field(default_factory=DPOLossConfig, metadata={"help": "the preference loss"})
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig, metadata={"help": "evaluation"})
    forgetting: ForgettingConfig = dataclasses.field(default_factory=ForgettingConfig,
                                                     metadata={"help": FORGETTING_HELP})


def _preference_data_checks(d: PreferenceDataConfig) -> list[tuple[bool, str]]:
    return _data_checks(d, min_synthetic=2) + [
        (d.synthetic_responses >= 2, "data.synthetic_responses must be at least 2"),
    ]


def _check_synthetic_rankings(d: PreferenceDataConfig, seed: int) -> None:
    """A synthetic ranking needs synthetic_responses - 1 distinct plausible wrong answers to each
    prompt, and some tasks have only a few (count: 5); the generator refuses a prompt that has
    fewer. Its first prompts of every task, held-out then training as the run draws them (with
    `seed`, train.seed), are drawn here so that the refusal, in the generator's words, comes
    before the model loads."""
    if d.train_files != ["synthetic"] or d.synthetic_kind != "ranking":
        return
    from posttrain.data.pipeline import synthetic_split_sizes
    from posttrain.data.synthetic import make_preference_split

    per_task = len(d.synthetic_tasks)
    n_train, n_eval = synthetic_split_sizes(d)  # as data.preferences draws them
    make_preference_split(d.synthetic_tasks, min(per_task, n_train), min(per_task, n_eval),
                          seed=seed, kind="ranking", num_responses=d.synthetic_responses)


def _unpaired_data(d: PreferenceDataConfig) -> bool:
    return d.format == "unpaired" or (d.train_files == ["synthetic"] and d.synthetic_kind == "unpaired")


def validate_rm(cfg: RMConfig) -> None:
    """Cross-field checks of a reward-model config. Raises ConfigError."""
    cfg = checked(cfg)
    _raise_first(_train_checks(cfg.train) + _weight_checks(cfg.model, cfg.adapter) + _preference_data_checks(cfg.data) + [
        (cfg.reward.centering >= 0, "reward.centering must be >= 0"),
        (not _unpaired_data(cfg.data),
         "a reward model learns from comparisons: data must be pairs or rankings, not unpaired"),
        (cfg.adapter.method in (["full"], ["lora"]),
         "reward models train with adapter.method full or lora (or dora: lora with adapter.lora.dora)"),
        (not cfg.adapter.schedule, "adapter.schedule stages several adapter methods; a reward model has one"),
        (cfg.model.dtype != "float16", "model.dtype=float16: a reward model's score head trains in full even with "
                                       "LoRA, and AdamW goes NaN on float16 weights; use bfloat16 or float32"),
    ])
    _check_synthetic_rankings(cfg.data, cfg.train.seed)
    validate_adapter_settings(cfg.adapter, cfg.model, cfg.train.optimizer)


# the losses that read each loss-specific option of the dpo section
_READ_BY = {
    "label_smoothing": ("cdpo",),
    "simpo_gamma": ("simpo",),
    "orpo_lambda": ("orpo",),
    "kto_desirable_weight": ("kto",),
    "kto_undesirable_weight": ("kto",),
    "nll_weight": ("dpo", "cdpo", "ipo", "hinge", "simpo"),  # orpo has its own NLL term; kto none
    "reference": ("dpo", "cdpo", "ipo", "hinge", "kto"),  # simpo and orpo are reference-free
}


def _loss_option_checks(p: DPOLossConfig) -> list[tuple[bool, str]]:
    """An option set away from its default that the chosen loss never reads is refused: the run
    would silently ignore it. dpo.beta is ORPO's only to scale its logged rewards, and TRL's
    ORPOConfig.beta is the λ of posttrain's dpo.orpo_lambda: a β away from its default is refused
    under orpo too (the default is λ's default as well, so a run's own config.yaml still loads)."""
    default = DPOLossConfig()
    checks = []
    for name, losses in _READ_BY.items():
        fix = f"set dpo.loss={losses[0]}" if len(losses) == 1 else "change dpo.loss"
        checks.append((p.loss in losses or getattr(p, name) == getattr(default, name),
                       f"dpo.{name}={getattr(p, name)} does nothing with dpo.loss={p.loss} (read by "
                       f"{', '.join(losses)}); remove it or {fix}"))
    checks.append((p.loss != "orpo" or p.beta == default.beta,
                   f"dpo.beta={p.beta} is not ORPO's weight: dpo.loss=orpo weighs its odds-ratio term by "
                   f"dpo.orpo_lambda (TRL's ORPOConfig.beta) and reads dpo.beta only to scale its logged "
                   f"rewards; set dpo.orpo_lambda={p.beta} and remove dpo.beta"))
    return checks


def validate_dpo(cfg: DPOConfig) -> None:
    """Cross-field checks of a preference-optimisation config. Raises ConfigError."""
    cfg = checked(cfg)
    p = cfg.dpo
    _raise_first(_train_checks(cfg.train) + _weight_checks(cfg.model, cfg.adapter) + _preference_data_checks(cfg.data) + [
        (p.beta > 0, "dpo.beta must be positive"),
        (p.label_smoothing is None or 0.0 <= p.label_smoothing < 0.5, "dpo.label_smoothing must be in [0, 0.5)"),
        (p.orpo_lambda >= 0 and p.nll_weight >= 0, "dpo.orpo_lambda and dpo.nll_weight must be >= 0"),
        (p.simpo_gamma is None or p.simpo_gamma >= 0,
         "dpo.simpo_gamma must be >= 0: SimPO's target reward margin (0: no margin); a negative one counts a chosen "
         "answer worse than the rejected one as partly right"),
        (p.kto_desirable_weight > 0 and p.kto_undesirable_weight > 0, "dpo.kto_*_weight must be positive"),
        (p.loss == "kto" or not _unpaired_data(cfg.data),
         f"dpo.loss={p.loss} needs pairs or rankings, not unpaired data; use dpo.loss=kto for unpaired feedback"),
    ] + _eval_checks(cfg.eval) + _loss_option_checks(p) + other_stage_forgetting_checks(cfg.forgetting, cfg.data, cfg.train))
    _check_synthetic_rankings(cfg.data, cfg.train.seed)
    from posttrain.errors import ConfigError

    plan = validate_adapter_settings(cfg.adapter, cfg.model, cfg.train.optimizer)
    virtual = [m for m in plan.methods if m in ("prompt", "prefix")]
    if virtual and p.reference == "live" and p.loss not in ("simpo", "orpo"):
        raise ConfigError(f"dpo.reference=live with adapter.method {virtual[0]}: the live reference switches the "
                          "adapters off, but the starting policy holds the randomly drawn virtual tokens, so it "
                          "would not be the starting model; use dpo.reference=precompute")


def preference_reference() -> str:
    """The sections rm and dpo add to (or change from) SFT's."""
    return (markdown_reference(DPOConfig, ("data",)) + "\n" + markdown_reference(RMConfig, ("reward",)).split("\n", 2)[2]
            + "\n" + markdown_reference(DPOConfig, ("dpo",)).split("\n", 2)[2])
