"""Configs of synthetic data from a model's own outputs: Constitutional AI (`posttrain constitutional`)
and Self-Instruct (`posttrain self-instruct`). Both talk to their model through a backend section
(config/feedback.py): any OpenAI-compatible endpoint, or a model loaded in this process."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from posttrain.config.feedback import (BackendConfig, JudgeConfig, RLAIFDataConfig, api_key_env_checks,
                                       backend_checks, judge_checks)
from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option
from posttrain.config.sections import listed_once_check

# Things a text-only model cannot see, make or visit (Self-Instruct filters a list like this).
DEFAULT_BANNED_WORDS = ["image", "images", "picture", "pictures", "photo", "photos", "graph", "graphs", "chart",
                        "charts", "diagram", "diagrams", "flowchart", "draw", "drawing", "plot", "map", "maps",
                        "video", "videos", "audio", "music", "file", "files", "pdf", "spreadsheet", "go to"]


@dataclass
class CAIDataConfig(RLAIFDataConfig):
    prompt_files: list[str] = option(["examples/data/constitutional_prompts.jsonl"],
                                     "prompt files (jsonl, json, parquet, csv, datasets dir): 'prompt' (text or "
                                     "turns), 'messages' or alpaca rows; an 'id' column names each prompt")


@dataclass
class CAILoopConfig:
    constitution: str = option("default", "principles file (YAML or JSONL: name, critique, revision); "
                               "'default' = the bundled constitution")
    rounds: int = option(1, "critique -> revision rounds per prompt, each under a freshly sampled principle")
    system: str = option("", "system message for the initial response (empty = none)")
    drop_truncated: bool = option(True, "discard a critique or revision cut off by max_tokens (counted as "
                                  "'truncated'); an original cut off gives no pair (counted as 'truncated_original')")
    rl_cai: bool = option(False, "RL-CAI: the judge compares original and revision in both orders under the "
                          "constitution; only consistent verdicts become pairs (the preferred side chosen)")
    seed: int = option(0, "seeds the principle sampled at each round of each prompt, and each request's sampling "
                       "seed (policy.seed is not used)")
    concurrency: int = option(4, "prompts worked on at once (each prompt's requests run one after another)")


@dataclass
class ConstitutionalConfig(_StageConfig):
    output_dir: str = option("runs/constitutional", "run directory: chains.jsonl (resumable log), sft.jsonl, "
                             "preferences.jsonl, summary.json")
    policy: BackendConfig = dataclasses.field(
        default_factory=BackendConfig,
        metadata={"help": "the model that answers, critiques its answer and revises it"})
    judge: JudgeConfig = dataclasses.field(
        default_factory=JudgeConfig,
        metadata={"help": "RL-CAI only: the model comparing original and revision (rubric empty = the constitution)"})
    data: CAIDataConfig = dataclasses.field(default_factory=CAIDataConfig, metadata={"help": "prompts"})
    constitutional: CAILoopConfig = dataclasses.field(default_factory=CAILoopConfig,
                                                      metadata={"help": "principles and the critique/revision chain"})


@dataclass
class SeedTasksConfig:
    seed_file: str = option("default", "seed tasks (JSONL: instruction, input?, output, is_classification?); "
                            "'default' = the bundled 25 tasks")


@dataclass
class SelfInstructLoopConfig:
    num_tasks: int = option(100, "stop once this many new tasks have been accepted")
    per_round: int = option(8, "candidate tasks generated per round (in parallel); the pool grows between rounds")
    max_rounds: int = option(50, "give up after this many rounds even if num_tasks is not reached")
    seed_examples: int = option(6, "in-context example instructions drawn from the seed tasks")
    generated_examples: int = option(2, "...and from tasks generated earlier (seed tasks fill in while there are none)")
    task_type: Literal["model", "examples"] = option(
        "model", "model: ask the model whether a new task is classification; examples: decide first (see "
        "classification_fraction) and show only examples of that type, whose flag the new task inherits")
    classification_fraction: float = option(0.3, "task_type=examples: share of candidates that are classification")
    instance_examples: int = option(3, "seed tasks of the same type shown (with input and output) when "
                                    "writing the new task's instance")
    instances_per_task: int = option(1, "instances (input/output pairs) asked for each new task, each an SFT row; "
                                     "exact duplicates and instances sharing an input with another output are "
                                     "dropped (counted)")
    seed: int = option(0, "seeds the in-context examples, task types and each request's sampling seed "
                       "(generator.seed is not used)")
    concurrency: int = option(4, "candidates worked on at once (each candidate's requests run one after another)")


@dataclass
class SelfInstructFilterConfig:
    min_words: int = option(3, "reject instructions with fewer words (Chinese / Japanese / Thai: 2 characters a word)")
    max_words: int = option(150, "reject instructions with more words (as min_words counts them)")
    banned_words: list[str] = option(DEFAULT_BANNED_WORDS, "reject instructions containing any of these words or "
                                     "phrases (whole words, any case): things a text-only model cannot do")
    rouge_threshold: float = option(0.7, "reject instructions whose ROUGE-L F with any pool task is >= this")
    drop_truncated: bool = option(True, "reject candidates whose instruction line or instance was cut off by "
                                  "max_tokens (counted as truncated_instruction / truncated_instance)")


@dataclass
class SelfInstructConfig(_StageConfig):
    output_dir: str = option("runs/self_instruct", "run directory: candidates.jsonl (resumable log), tasks.jsonl, "
                             "rejected.jsonl, sft.jsonl, summary.json")
    generator: BackendConfig = dataclasses.field(
        default_factory=BackendConfig, metadata={"help": "the model that writes new instructions, inputs and outputs"})
    data: SeedTasksConfig = dataclasses.field(default_factory=SeedTasksConfig, metadata={"help": "seed tasks"})
    self_instruct: SelfInstructLoopConfig = dataclasses.field(
        default_factory=SelfInstructLoopConfig, metadata={"help": "rounds, in-context examples and task types"})
    filters: SelfInstructFilterConfig = dataclasses.field(
        default_factory=SelfInstructFilterConfig, metadata={"help": "which candidates join the pool"})


def validate_constitutional(cfg: ConstitutionalConfig) -> None:
    """Checks of a Constitutional AI config before any model is called. Raises ConfigError."""
    cfg = checked(cfg)
    c = cfg.constitutional
    judge = judge_checks(cfg.judge) if c.rl_cai else []
    _raise_first(api_key_env_checks(cfg) + backend_checks(cfg.policy, "policy") + judge + [
        (bool(cfg.data.prompt_files), "data.prompt_files is empty; give at least one prompt file"),
        listed_once_check(cfg.data.prompt_files, "data.prompt_files"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be between 0 and 1"),
        (cfg.data.limit >= 0, "data.limit must be >= 0 (0 = all prompts)"),
        (bool(c.constitution.strip()), "constitutional.constitution is empty; give a file or 'default'"),
        (c.rounds >= 1, "constitutional.rounds must be >= 1 (each round is one critique and one revision)"),
        (c.concurrency >= 1, "constitutional.concurrency must be >= 1"),
    ])


def validate_self_instruct(cfg: SelfInstructConfig) -> None:
    """Checks of a Self-Instruct config before any model is called. Raises ConfigError."""
    cfg = checked(cfg)
    s, f = cfg.self_instruct, cfg.filters
    _raise_first(api_key_env_checks(cfg) + backend_checks(cfg.generator, "generator") + [
        (bool(cfg.data.seed_file.strip()), "data.seed_file is empty; give a JSONL file or 'default'"),
        (s.num_tasks >= 1 and s.per_round >= 1 and s.max_rounds >= 1,
         "self_instruct.num_tasks, per_round and max_rounds must be >= 1"),
        (s.seed_examples >= 1, "self_instruct.seed_examples must be >= 1 (the model needs examples to imitate)"),
        (s.generated_examples >= 0 and s.instance_examples >= 0,
         "self_instruct.generated_examples and instance_examples must be >= 0"),
        (s.instances_per_task >= 1, "self_instruct.instances_per_task must be >= 1"),
        (0 <= s.classification_fraction <= 1, "self_instruct.classification_fraction must be in [0, 1]"),
        (s.concurrency >= 1, "self_instruct.concurrency must be >= 1"),
        (1 <= f.min_words <= f.max_words, "filters.min_words must be >= 1 and <= filters.max_words"),
        (0 < f.rouge_threshold <= 1, "filters.rouge_threshold must be in (0, 1] (1 = only exact word matches)"),
    ])


def synthesis_reference() -> str:
    """The README's config reference tables for `posttrain constitutional` and `posttrain self-instruct`."""
    return markdown_reference(ConstitutionalConfig) + "\n\n" + markdown_reference(SelfInstructConfig)
