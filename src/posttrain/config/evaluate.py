"""Config of `posttrain evaluate`: one alignment report for a policy, against a reference model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from posttrain.config.feedback import JudgeConfig, api_key_env_checks, judge_checks
from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option
from posttrain.config.sections import synthetic_checks
from posttrain.rollout import GREEDY_BELOW, is_greedy


@dataclass
class EvalPromptsConfig:
    files: list[str] = option(["synthetic"], "prompt files (prompt rows: a question under 'prompt', 'question' or "
                              "'problem' with an optional 'answer', else 'solution'; messages or alpaca rows), or "
                              "'synthetic': the bundled tasks' held-out prompts with answers")
    synthetic_tasks: list[str] = option(["smallest", "copy", "reverse"], "tasks of the synthetic prompts")
    limit: int = option(200, "evaluate the first N prompts (0 = all)")
    max_prompt_length: int = option(256, "prompts longer than this many tokens are left out (counted)")
    max_bad_fraction: float = option(0.01, "malformed prompt rows are skipped (file:line in the log); fail when "
                                     "more than this fraction of any one file's rows is malformed")


@dataclass
class EvalGenerationConfig:
    max_new_tokens: int = option(64, "tokens per response")
    samples: int = option(4, "sampled responses per prompt for the KL estimate (the other figures use the greedy one)")
    temperature: float = option(1.0, "sampling temperature of those samples (KL is measured at it)")
    batch_size: int = option(16, "prompts generated at once")
    seed: int = option(0, "sampling seed")


@dataclass
class EvalRewardConfig:
    functions: list[str] = option([], "NAME=module:function rewards, fn(prompt_turns, response[, row]) -> float "
                                  "(e.g. exact_match=posttrain.rewards:exact_match)")
    models: list[str] = option([], "reward models trained by posttrain rm: DIR or NAME=DIR")
    weights: list[str] = option([], "NAME=W weight per component (default 1)")


@dataclass
class EvalJudgeConfig(JudgeConfig):
    enabled: bool = option(False, "judge policy vs reference responses pairwise, in both orders (win rate)")


@dataclass
class EvalSafetyConfig:
    redteam: bool = option(False, "also red-team both models with the bundled suites (posttrain redteam's "
                           "attack success and over-refusal)")
    limit: int = option(10, "probes of each bundled suite, a fixed sample spread over its categories (0 = all)")
    attacks: list[str] = option(["direct", "instruction_override", "role_play"], "attacks applied")
    max_tokens: int = option(64, "tokens per red-team response")


@dataclass
class EvaluateConfig(_StageConfig):
    output_dir: str = option("runs/evaluate", "where responses.jsonl, report.json and report.md are written")
    policy: str = option("tiny", "the model evaluated: a model, run or adapter dir, or a preset")
    reference: str = option("", "the model it is compared with (its SFT starting point, say): KL, win rates and "
                            "every figure side by side; empty = the policy alone")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype both models are loaded in")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option("auto", "chat template of the prompts")
    prompts: EvalPromptsConfig = dataclasses.field(default_factory=EvalPromptsConfig,
                                                   metadata={"help": "what is asked"})
    generation: EvalGenerationConfig = dataclasses.field(default_factory=EvalGenerationConfig,
                                                         metadata={"help": "how both models answer"})
    reward: EvalRewardConfig = dataclasses.field(default_factory=EvalRewardConfig,
                                                 metadata={"help": "rewards of the greedy responses"})
    judge: EvalJudgeConfig = dataclasses.field(default_factory=EvalJudgeConfig,
                                               metadata={"help": "pairwise LLM judge (win rate)"})
    safety: EvalSafetyConfig = dataclasses.field(default_factory=EvalSafetyConfig,
                                                 metadata={"help": "red-team figures"})


def validate_evaluate(cfg: EvaluateConfig) -> None:
    """Range checks of an evaluate config, before anything is read. Raises ConfigError. (The run
    then loads rewards, the rubric and the attacks before any policy or reference model.)"""
    cfg = checked(cfg)
    g, p = cfg.generation, cfg.prompts
    checks = api_key_env_checks(cfg) + [
        (bool(cfg.policy.strip()), "policy is empty; give a model, run or adapter dir, or a preset"),
        (bool(p.files), "prompts.files is empty; give prompt files or 'synthetic'"),
        (p.files == ["synthetic"] or "synthetic" not in p.files, "prompts.files: 'synthetic' cannot be mixed "
                                                                 "with files"),
        (p.limit >= 0 and p.max_prompt_length >= 1, "prompts.limit must be >= 0 and max_prompt_length >= 1"),
        (0.0 <= p.max_bad_fraction <= 1.0, "prompts.max_bad_fraction must be between 0 and 1"),
        *synthetic_checks(p.files, p.synthetic_tasks, None, "prompts"),
        (g.max_new_tokens >= 1 and g.batch_size >= 1, "generation.max_new_tokens and batch_size must be >= 1"),
        (g.samples >= 0, "generation.samples must be >= 0 (0 = no KL estimate)"),
        (not is_greedy(g.temperature), f"generation.temperature must be at least {GREEDY_BELOW:g} (below it "
                                       "sampling is greedy): the KL is estimated on samples"),
        (not cfg.judge.enabled or bool(cfg.reference.strip()), "judge.enabled needs a reference to compare with"),
        (cfg.safety.limit >= 0 and cfg.safety.max_tokens >= 1, "safety.limit must be >= 0, max_tokens >= 1"),
    ]
    if cfg.judge.enabled:
        checks += judge_checks(cfg.judge)
    _raise_first(checks)


def evaluate_reference() -> str:
    """The README's config reference table for `posttrain evaluate`."""
    return markdown_reference(EvaluateConfig)
