"""Configs of AI feedback: the model backends that answer (a local model or any
OpenAI-compatible endpoint), the pairwise judge, and RLAIF (`posttrain rlaif`)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option
from posttrain.config.sections import MAX_BAD_FRACTION_HELP, listed_once_check
from posttrain.rollout import GREEDY_BELOW, is_greedy


@dataclass
class BackendConfig:
    kind: Literal["openai", "local"] = option(
        "openai", "openai: any OpenAI-compatible endpoint (posttrain serve, vLLM, Ollama, a hosted API); "
        "local: load the model in this process")
    model: str = option("tiny", "openai: the model name sent with each request; local: a model, run or adapter "
                        "dir, or a preset")
    base_url: str = option("http://127.0.0.1:8000/v1", "openai: the API root, the part before /chat/completions")
    api_key_env: str = option("OPENAI_API_KEY", "openai: environment variable holding the API key (read at run "
                              "time, never written to outputs); unset or empty = send no key")
    timeout_s: float = option(120.0, "openai: seconds to wait for one response before retrying")
    max_retries: int = option(5, "openai: retries of a request after 429, 5xx, a timeout or a dropped connection")
    backoff_s: float = option(1.0, "openai: first retry waits about this long (x2 each retry, with jitter); "
                              "a Retry-After header takes precedence")
    requests_per_second: float = option(0.0, "openai: client-side rate limit shared by all threads (0 = unlimited)")
    max_tokens: int = option(128, "generation budget per reply")
    temperature: float = option(1.0, "sampling temperature (0 = greedy)")
    seed: int = option(0, "sampling seed (RLAIF: response i of a prompt uses seed + i; of a prompt's k-th "
                          "occurrence, seed + (k-1)·num_responses + i)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option(
        "auto", "local: chat template (the tokenizer's own, or chatml when it has none)")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "local: dtype the weights are loaded in")


@dataclass
class JudgeConfig(BackendConfig):
    max_tokens: int = option(256, "generation budget per verdict (reasoning plus the verdict line)")
    temperature: float = option(0.0, "sampling temperature of the judge (0 = greedy, the usual choice)")
    rubric: str = option("", "what makes a response better (principles, criteria); empty = the built-in "
                         "helpful/honest/harmless rubric")
    rubric_file: str = option("", "read the rubric from this text file instead")
    parse_retries: int = option(1, "when a reply has no verdict line, ask this many more times for one")


@dataclass
class RLAIFDataConfig:
    prompt_files: list[str] = option(["examples/data/prompts.jsonl"],
                                     "prompt files (jsonl, json, parquet, csv, datasets dir): 'prompt' (text or "
                                     "turns), 'messages' or alpaca rows")
    format: Literal["auto", "prompt", "messages", "alpaca"] = option("auto", "row format; auto-detected per file")
    limit: int = option(0, "use only the first N prompts (0 = all)")
    bad_rows: Literal["error", "skip"] = option(
        "error", "malformed prompt rows: stop before any request, or skip them into the run's rejects.jsonl "
        "(file:line and reason)")
    max_bad_fraction: float = option(0.01, MAX_BAD_FRACTION_HELP)


@dataclass
class RLAIFLoopConfig:
    num_responses: int = option(4, "N: responses sampled per prompt; all N(N-1)/2 pairs are judged in both orders")
    concurrency: int = option(4, "prompts worked on at once (each one's requests run one after another)")


@dataclass
class RLAIFConfig(_StageConfig):
    output_dir: str = option("runs/rlaif", "run directory: raw.jsonl (resumable log), preferences.jsonl, "
                             "summary.json")
    policy: BackendConfig = dataclasses.field(default_factory=BackendConfig,
                                              metadata={"help": "the model that writes the responses"})
    judge: JudgeConfig = dataclasses.field(default_factory=JudgeConfig,
                                           metadata={"help": "the model that compares them, and its rubric"})
    data: RLAIFDataConfig = dataclasses.field(default_factory=RLAIFDataConfig, metadata={"help": "prompts"})
    rlaif: RLAIFLoopConfig = dataclasses.field(default_factory=RLAIFLoopConfig,
                                               metadata={"help": "sampling and judging"})


def is_variable_name(value: str) -> bool:
    """An environment variable's name (letters, digits and _, not first a digit): what every
    api_key_env setting (and serve's --api-key-env) takes, never the key itself."""
    return re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) is not None


def api_key_env_checks(cfg: Any, prefix: str = "") -> list[tuple[bool, str]]:
    """Every `api_key_env` setting in a config, used or not, is "" or a variable's name. The natural
    slip is the key itself (`policy.api_key_env=sk-...`), which would be written to the run's
    config.yaml and no key sent; the message never repeats the value, since it may be the key."""
    checks = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            checks += api_key_env_checks(value, f"{prefix}{f.name}.")
        elif f.name == "api_key_env":
            checks.append((value == "" or is_variable_name(value),
                           f"{prefix}api_key_env takes the NAME of the environment variable holding the API key "
                           f"(letters, digits and _), not the key itself: export MY_KEY=... and set "
                           f"{prefix}api_key_env=MY_KEY"))
    return checks


def backend_checks(cfg: BackendConfig, name: str) -> list[tuple[bool, str]]:
    """Range checks of one backend section (`name` is its key, e.g. "judge")."""
    return [
        (bool(cfg.model.strip()), f"{name}.model is empty; name the model (a served name, or a local dir/preset)"),
        (cfg.kind != "openai" or cfg.base_url.startswith(("http://", "https://")),
         f"{name}.base_url={cfg.base_url!r} must start with http:// or https://"),
        (cfg.timeout_s > 0, f"{name}.timeout_s must be > 0"),
        (cfg.max_retries >= 0 and cfg.backoff_s >= 0, f"{name}.max_retries and {name}.backoff_s must be >= 0"),
        (cfg.requests_per_second >= 0, f"{name}.requests_per_second must be >= 0 (0 = unlimited)"),
        (cfg.max_tokens >= 1, f"{name}.max_tokens must be >= 1"),
        (cfg.temperature >= 0, f"{name}.temperature must be >= 0 (0 = greedy)"),
    ]


def judge_checks(cfg: JudgeConfig, name: str = "judge") -> list[tuple[bool, str]]:
    return backend_checks(cfg, name) + [
        (not (cfg.rubric.strip() and cfg.rubric_file), f"give {name}.rubric or {name}.rubric_file, not both"),
        (cfg.parse_retries >= 0, f"{name}.parse_retries must be >= 0"),
    ]


def validate_rlaif(cfg: RLAIFConfig) -> None:
    """Checks of an RLAIF config before any model is loaded or called. Raises ConfigError."""
    cfg = checked(cfg)
    n = cfg.rlaif.num_responses
    _raise_first(api_key_env_checks(cfg) + backend_checks(cfg.policy, "policy") + judge_checks(cfg.judge) + [
        (bool(cfg.data.prompt_files), "data.prompt_files is empty; give at least one prompt file"),
        listed_once_check(cfg.data.prompt_files, "data.prompt_files"),
        (cfg.data.limit >= 0, "data.limit must be >= 0 (0 = all prompts)"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be between 0 and 1"),
        (n >= 2, f"rlaif.num_responses={n}: at least 2 responses per prompt are needed to make a pair"),
        (cfg.rlaif.concurrency >= 1, "rlaif.concurrency must be >= 1"),
        (not is_greedy(cfg.policy.temperature),
         f"policy.temperature must be at least {GREEDY_BELOW:g}: below it (greedy) every response to a prompt is the "
         "same text"),
    ])


def rlaif_reference() -> str:
    """The README's config reference table for `posttrain rlaif`."""
    return markdown_reference(RLAIFConfig)
