"""Config of `posttrain quality`: a training-data quality pass (filters, PII, dedup,
decontamination, perplexity under a reference model, balance, token checks) that writes the
kept rows, every dropped row with its reason, and a report."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from posttrain.config.schema import _raise_first, _StageConfig, checked, markdown_reference, option
from posttrain.config.sections import MAX_BAD_FRACTION_HELP, SEED_RANGE

ANY_FORMAT = Literal["auto", "alpaca", "messages", "prompt_completion", "text", "pairs", "ranking", "unpaired"]


@dataclass
class QualityDataConfig:
    files: list[str] = option(["examples/data/quality_dirty.jsonl"],
                              "files to check (jsonl, json, parquet, csv, datasets dir): SFT rows (alpaca, messages, "
                              "prompt_completion, text) or preference rows (pairs, ranking, unpaired)")
    format: ANY_FORMAT = option("auto", "row format; auto-detected per file from its first rows")
    bad_rows: Literal["error", "skip"] = option("skip", "malformed rows: stop, or skip them into rejects.jsonl "
                                                "(file:line and reason) and count them in the report")
    max_bad_fraction: float = option(1.0, MAX_BAD_FRACTION_HELP)


@dataclass
class FilterConfig:
    min_response_words: int = option(1, "drop rows whose trained response has fewer words (0 = off)")
    max_response_words: int = option(0, "drop rows whose trained response has more words (0 = off)")
    echo: bool = option(True, "drop rows whose response repeats the prompt (after normalisation)")
    encoding: bool = option(True, "drop rows with U+FFFD, control characters or mojibake (UTF-8 read as Latin-1)")
    repetition: bool = option(True, "drop responses of at least repetition_min_words words that fail Gopher's "
                              "repetition limits (duplicate lines, top 2-4-gram and duplicated 5-10-gram shares)")
    repetition_min_words: int = option(20, "shorter responses are not checked for repetition")
    max_char_run: int = option(40, "drop rows with one character repeated this many times in a row (0 = off)")
    blocklist: list[str] = option([], "drop rows whose response contains one of these phrases (any case), "
                                  "e.g. 'as an AI language model'")


@dataclass
class PIIConfig:
    action: Literal["redact", "report", "drop", "off"] = option(
        "redact", "redact: replace each match by <KIND> in the kept rows; report: count and locate only; "
        "drop: drop the row; off: no scan")
    kinds: list[str] = option(["email", "phone", "ip_address", "credit_card", "iban", "ssn", "secret"],
                              "what to look for")


@dataclass
class DedupConfig:
    exact: bool = option(True, "drop rows whose normalised text repeats an earlier row's")
    near: bool = option(True, "drop near-duplicates: MinHash-LSH candidates re-checked by exact Jaccard")
    threshold: float = option(0.8, "word-shingle Jaccard at or above which two rows are near-duplicates")
    ngram: int = option(5, "words per shingle (2n characters for a mostly Chinese / Japanese / Thai ... row)")
    num_perm: int = option(128, "MinHash permutations (more: better recall of pairs near the threshold, slower)")
    on: Literal["full", "prompt"] = option("full", "compare whole rows, or prompts only (one row per prompt)")
    seed: int = option(0, "seeds the MinHash permutations")


@dataclass
class DecontaminateConfig:
    files: list[str] = option([], "evaluation files whose prompts must not appear in the training rows: any "
                              "format above, or benchmark rows with a question under 'prompt', 'question' or "
                              "'problem' (an 'answer', else 'solution', searched too with on=full)")
    ngram: int = option(13, "a training row sharing one n-word sequence with an eval prompt is dropped (2n "
                        "characters for a mostly Chinese / Japanese / Thai ... prompt); an eval prompt shorter than "
                        "that must appear whole")
    on: Literal["prompt", "full"] = option("prompt", "which text of the eval rows is searched for: prompt (the "
                                           "prompt's turns, the system prompt left out) or full (the answer too)")
    max_shared: int = option(10, "an n-gram found in more of the eval rows is a shared template (instruction "
                             "preamble, few-shot examples, a passage several questions share), not searched for "
                             "(0 = no limit)")


@dataclass
class BalanceConfig:
    field: str = option("", "a column of the rows (e.g. 'category', 'task'); its distribution and entropy "
                        "are reported (empty = none)")
    max_per_value: int = option(0, "keep at most this many rows per value of the field, chosen by seed (0 = keep all)")
    seed: int = option(0, "seeds which rows a capped value keeps")


@dataclass
class TokenCheckConfig:
    tokenizer: str = option("", "model dir or preset whose tokenizer and chat template render the rows, to count "
                            "tokens, over-long rows and rows with nothing to train on (empty = skip)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option("auto", "chat template, as data.template "
                                                                        "of the training stages")
    max_length: int = option(512, "the max_length training will use")
    trust_remote_code: bool = option(False, "let the tokenizer's directory run its own Python code")


@dataclass
class PerplexityConfig:
    model: str = option("", "reference language model (preset, model dir or run dir) under which each row's trained "
                        "response is scored by its perplexity per token (empty = off)")
    template: Literal["auto", "tokenizer", "chatml", "alpaca"] = option("auto", "chat template the rows are "
                                                                        "rendered with, as data.template of the "
                                                                        "training stages")
    max_length: int = option(512, "rows are cut to this many tokens before scoring, as training truncates them")
    batch_size: int = option(8, "sequences per forward pass (sorted by length, so little of a batch is padding)")
    max_perplexity: float = option(0.0, "drop rows whose response perplexity is above this (0 = off)")
    drop_top_fraction: float = option(0.0, "drop this fraction (rounded down) of the scored rows still in, those "
                                      "with the highest perplexity, e.g. 0.05 (0 = off)")
    drop_bottom_fraction: float = option(0.0, "drop this fraction (rounded down) with the lowest perplexity: "
                                         "boilerplate or memorised text (0 = off)")
    trust_remote_code: bool = option(False, "let the model's directory run its own Python code")


@dataclass
class QualityConfig(_StageConfig):
    output_dir: str = option("runs/quality", "where kept.jsonl, dropped.jsonl, rejects.jsonl, report.json and "
                             "report.md are written")
    max_drop_fraction: float = option(1.0, "exit with an error (after writing everything) when more than this "
                                      "fraction of the rows is dropped or malformed: a gate for CI")
    data: QualityDataConfig = dataclasses.field(default_factory=QualityDataConfig, metadata={"help": "input rows"})
    filters: FilterConfig = dataclasses.field(default_factory=FilterConfig, metadata={"help": "heuristic filters"})
    pii: PIIConfig = dataclasses.field(default_factory=PIIConfig, metadata={"help": "personal information"})
    dedup: DedupConfig = dataclasses.field(default_factory=DedupConfig, metadata={"help": "duplicates"})
    decontaminate: DecontaminateConfig = dataclasses.field(
        default_factory=DecontaminateConfig, metadata={"help": "evaluation prompts leaked into training rows"})
    balance: BalanceConfig = dataclasses.field(default_factory=BalanceConfig, metadata={"help": "category balance"})
    tokens: TokenCheckConfig = dataclasses.field(default_factory=TokenCheckConfig,
                                                 metadata={"help": "template and label-mask checks"})
    perplexity: PerplexityConfig = dataclasses.field(
        default_factory=PerplexityConfig, metadata={"help": "perplexity of each trained response under a reference model"})


def validate_quality(cfg: QualityConfig) -> None:
    """Checks of a quality config before any row is read. Raises ConfigError."""
    cfg = checked(cfg)
    from posttrain.config.sections import listed_once_check
    from posttrain.data.quality.pii import PII_KINDS

    f, d = cfg.filters, cfg.dedup
    unknown = [k for k in cfg.pii.kinds if k not in PII_KINDS]
    _raise_first([
        (bool(cfg.data.files), "data.files is empty; give at least one file to check"),
        listed_once_check(cfg.data.files, "data.files"),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be between 0 and 1"),
        (0.0 <= cfg.max_drop_fraction <= 1.0, "max_drop_fraction must be between 0 and 1"),
        (f.min_response_words >= 0 and f.max_response_words >= 0, "filters.min/max_response_words must be >= 0"),
        (f.max_response_words == 0 or f.max_response_words >= f.min_response_words,
         "filters.max_response_words is below filters.min_response_words"),
        (f.repetition_min_words >= 1, "filters.repetition_min_words must be >= 1"),
        (f.max_char_run == 0 or f.max_char_run >= 2, "filters.max_char_run must be 0 (off) or >= 2"),
        (all(p.strip() for p in f.blocklist), "filters.blocklist has an empty phrase, which every row contains"),
        (not unknown, f"pii.kinds: unknown {unknown}; known: {', '.join(PII_KINDS)}"),
        (0.0 < d.threshold <= 1.0, "dedup.threshold must be in (0, 1]"),
        (d.ngram >= 1, "dedup.ngram must be >= 1"),
        (d.num_perm >= 2, "dedup.num_perm must be >= 2"),
        (0 <= d.seed < SEED_RANGE, f"dedup.seed must be in [0, 2**32) (numpy's seeds), got {d.seed}"),
        (cfg.decontaminate.ngram >= 1, "decontaminate.ngram must be >= 1"),
        (cfg.decontaminate.max_shared >= 0, "decontaminate.max_shared must be >= 0 (0 = no limit)"),
        (cfg.balance.max_per_value >= 0, "balance.max_per_value must be >= 0"),
        (cfg.balance.max_per_value == 0 or bool(cfg.balance.field),
         "balance.max_per_value needs balance.field (the column whose values are capped)"),
        (cfg.tokens.max_length >= 1, "tokens.max_length must be >= 1"),
        *_perplexity_checks(cfg.perplexity),
    ])


def _perplexity_checks(p: PerplexityConfig) -> list[tuple[bool, str]]:
    thresholds = [name for name in ("max_perplexity", "drop_top_fraction", "drop_bottom_fraction") if getattr(p, name)]
    return [
        (p.max_perplexity >= 0, "perplexity.max_perplexity must be >= 0 (0 = off)"),
        (0.0 <= p.drop_top_fraction < 1.0, "perplexity.drop_top_fraction must be in [0, 1)"),
        (0.0 <= p.drop_bottom_fraction < 1.0, "perplexity.drop_bottom_fraction must be in [0, 1)"),
        (p.drop_top_fraction + p.drop_bottom_fraction < 1.0,
         "perplexity.drop_top_fraction + drop_bottom_fraction must be below 1 (together they would drop every row)"),
        (p.batch_size >= 1, "perplexity.batch_size must be >= 1"),
        (p.max_length >= 2, "perplexity.max_length must be >= 2 (a response token needs one before it)"),
        (bool(p.model) or not thresholds,
         f"perplexity.{thresholds[0] if thresholds else ''} needs perplexity.model, the reference model that scores "
         "the rows (a preset, model dir or run dir)"),
    ]


def quality_reference() -> str:
    """The README's config reference table for `posttrain quality`."""
    return markdown_reference(QualityConfig)
