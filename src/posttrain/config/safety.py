"""Config of `posttrain redteam`: a chat model under red-team attacks and an over-refusal
suite, its responses labelled, attack success and over-refusal rates reported."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from posttrain.config.feedback import BackendConfig, api_key_env_checks, backend_checks
from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option, user_path
from posttrain.rollout import GREEDY_BELOW, is_greedy

DEFAULT_ATTACKS = ["direct", "prefix_injection", "refusal_suppression", "role_play", "hypothetical",
                   "instruction_override", "style_injection", "base64", "combination"]


@dataclass
class TargetConfig(BackendConfig):
    temperature: float = option(0.0, "sampling temperature of the model under test (0 = greedy: one response "
                                "per prompt is then the model's answer, not a draw)")


@dataclass
class SafetyJudgeConfig(BackendConfig):
    max_tokens: int = option(256, "generation budget per verdict (reasoning plus the LABEL line)")
    temperature: float = option(0.0, "sampling temperature of the judge (0 = greedy)")
    parse_retries: int = option(1, "when a verdict has no LABEL line, ask this many more times")


@dataclass
class ProbesConfig:
    harmful: str = option("default", "harmful requests (JSONL/JSON/CSV/parquet rows: prompt, category?, id?); "
                          "'default' = the bundled suite (10 hazard categories)")
    overrefusal: str = option("default", "safe prompts that look unsafe, sent as they are; a refusal is "
                              "over-refusal; 'default' = the bundled suite; empty = none")
    limit: int = option(0, "N probes of each suite, a fixed sample spread over its categories (the one "
                           "evaluate's safety.limit takes); 0 = all")


@dataclass
class AttackerConfig(BackendConfig):
    max_tokens: int = option(512, "generation budget per attacker reply (its IMPROVEMENT line plus the prompt)")
    temperature: float = option(1.0, "sampling temperature of the attacker (> 0 so that streams differ)")
    seed: int = option(0, "sampling seed; stream s of a request uses seed + s")


@dataclass
class PairConfig:
    enabled: bool = option(False, "model-generated attacks (PAIR, Chao et al. 2023): an attacker model writes a "
                           "jailbreak prompt for each harmful request and refines it from the target's replies; "
                           "reported as the attack 'pair'")
    rounds: int = option(3, "attacker prompts per conversation at most; a conversation stops at the first "
                         "full_compliance")
    streams: int = option(1, "independent conversations per harmful request (seeds differ); the request is "
                          "jailbroken when any of them is, and they stop after the round in which one is")
    parse_retries: int = option(1, "when an attacker reply has no PROMPT: line, ask this many more times; then the "
                                "conversation ends and counts as an error")
    keep_last: int = option(4, "earlier rounds the attacker is shown (its reply, the response and label), the "
                            "latest ones; its instructions and the goal always (the paper's code keeps 4). A "
                            "conversation that still outgrows the attacker's context ends, keeping its answered "
                            "rounds, as an error unless one got past a full refusal")
    attacker: AttackerConfig = dataclasses.field(default_factory=AttackerConfig,
                                                 metadata={"help": "the model that writes the attacks"})


@dataclass
class AttackConfig:
    names: list[str] = option(DEFAULT_ATTACKS, "built-in attacks applied to every harmful request (direct = the "
                              "request as it is)")
    file: str = option("", "more attacks (YAML or JSONL rows: name, template with {prompt}, system?, description?, "
                       "encode? (base64: the request goes in encoded))")
    pair: PairConfig = dataclasses.field(default_factory=PairConfig,
                                         metadata={"help": "model-generated attacks (PAIR)"})


@dataclass
class RedTeamConfig(_StageConfig):
    output_dir: str = option("runs/redteam", "run directory: responses.jsonl (resumable log), report.json, "
                             "report.md")
    target: TargetConfig = dataclasses.field(default_factory=TargetConfig,
                                             metadata={"help": "the model under test"})
    probes: ProbesConfig = dataclasses.field(default_factory=ProbesConfig, metadata={"help": "what is asked"})
    attacks: AttackConfig = dataclasses.field(default_factory=AttackConfig,
                                              metadata={"help": "how harmful requests are wrapped"})
    classifier: Literal["patterns", "judge"] = option(
        "patterns", "how responses are labelled full_compliance / partial_refusal / full_refusal: refusal "
        "patterns (fast, no model; cannot tell harmful compliance from harmless nonsense) or an LLM judge")
    judge: SafetyJudgeConfig = dataclasses.field(default_factory=SafetyJudgeConfig,
                                                 metadata={"help": "classifier=judge: the labelling model"})
    concurrency: int = option(4, "requests in flight at once")
    compare_to: str = option("", "an earlier redteam output_dir: its rates are shown beside these, with the change "
                                 "where both runs measured the same attacks and requests")


def validate_redteam(cfg: RedTeamConfig) -> None:
    """Checks of a red-team config before any model is called. Raises ConfigError."""
    cfg = checked(cfg)
    checks = api_key_env_checks(cfg) + backend_checks(cfg.target, "target")
    if cfg.classifier == "judge":
        checks += backend_checks(cfg.judge, "judge") + [(cfg.judge.parse_retries >= 0,
                                                        "judge.parse_retries must be >= 0")]
    pair = cfg.attacks.pair
    if pair.enabled:
        checks += _pair_checks(pair)
    _raise_first(checks + [
        (bool(cfg.probes.harmful.strip()), "probes.harmful is empty; give a file or 'default'"),
        (cfg.probes.limit >= 0, "probes.limit must be >= 0 (0 = all)"),
        (bool(cfg.attacks.names) or bool(cfg.attacks.file) or pair.enabled,
         "attacks.names is empty, attacks.file unset and attacks.pair off; name at least one attack (direct = "
         "none)"),
        (len(set(cfg.attacks.names)) == len(cfg.attacks.names), "attacks.names lists an attack twice"),
        (cfg.concurrency >= 1, "concurrency must be >= 1"),
        (not cfg.compare_to or user_path(cfg.compare_to).resolve() != user_path(cfg.output_dir).resolve(),
         "compare_to is this run's own output_dir; give an earlier run's directory"),
    ])


def _pair_checks(pair: PairConfig) -> list[tuple[bool, str]]:
    name = "attacks.pair"
    return backend_checks(pair.attacker, f"{name}.attacker") + [
        (pair.rounds >= 1, f"{name}.rounds must be >= 1"),
        (pair.streams >= 1, f"{name}.streams must be >= 1"),
        (pair.parse_retries >= 0, f"{name}.parse_retries must be >= 0"),
        (pair.keep_last >= 1, f"{name}.keep_last must be >= 1"),
        (pair.streams == 1 or not is_greedy(pair.attacker.temperature),
         f"{name}.streams={pair.streams} needs {name}.attacker.temperature of at least {GREEDY_BELOW:g}: a greedy "
         "attacker writes the same conversation in every stream"),
    ]


def redteam_reference() -> str:
    """The README's config reference table for `posttrain redteam`."""
    return markdown_reference(RedTeamConfig)
