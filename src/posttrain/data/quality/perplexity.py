"""Perplexity of each row's trained response under a reference language model, and the cuts on it.

    PPL(row) = exp( -(1/N) Σ_{t ∈ trained tokens} log p_ref(x_t | x_<t) )

The trained tokens are those a training stage puts loss on: the row is rendered with the chat
template and label mask of the SFT stage (`tokens.encode_trained`, which is
`templates.encode_record` / `preferences.encode_response`), cut to max_length as training cuts
it, and the prompt is context only. A max_length past the model's position table
(`models.loading.position_limit`) is cut to the table, and the log says so: a learned table
cannot be indexed past its end, and a rotary model scores positions it never saw. A preference
row is scored on its chosen response (a ranking's best, the tokens of every tied-best one
pooled; a desirable KTO completion); a row with no trained token (an undesirable KTO row, an
empty answer, labels all past max_length, or one the template cannot render) is not scored, and
counted.

Why: text that a language model trained on good text of the target domain finds very unlikely is
often garbled, machine-translated or off-domain; CCNet (Wenzek et al. 2020, §3.3) keeps web
text by its perplexity under a Wikipedia-trained model. Very low perplexity is suspicious the
other way: boilerplate, templated answers, or text the reference model has memorised. Both cuts
are relative to the reference model, so it must be a real model trained on text like the target
domain (a tiny preset's numbers mean nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.data.quality.stats import nearest_rank
from posttrain.data.records import Example
from posttrain.errors import DataError

_EXP_LIMIT = 700.0  # exp(nll) above this overflows a float; such a row's perplexity is inf


@dataclass
class RowScore:
    """One row's result: its perplexity and the response tokens it was computed on, or, when
    it was not scored, why (no_trained_tokens, labels_past_max_length, unrenderable)."""

    perplexity: float | None = None
    tokens: int = 0
    not_scored: str = ""
    truncated: bool = False


def score_rows(rows: Sequence, cfg, log: Callable[[str], Any]) -> tuple[list[RowScore], str, int]:
    """Score every row under cfg.model (a `PerplexityConfig`); returns the scores in row order,
    the name of the template used and the max_length used (cfg.max_length, or the model's
    position table where that is shorter)."""
    import torch

    from posttrain.data.quality.tokens import encode_trained
    from posttrain.data.templates import resolve_template
    from posttrain.inference import load_for_inference
    from posttrain.models.loading import position_limit

    model, tokenizer = load_for_inference(cfg.model, "float32", trust_remote_code=cfg.trust_remote_code)
    max_length, table = cfg.max_length, position_limit(model)
    if table is not None and max_length > table:
        log(f"perplexity: max_length={max_length} is past {cfg.model}'s position table of {table} tokens; "
            f"rows are cut at {table}")
        max_length = table
    if torch.cuda.is_available():
        model.to("cuda")
    template = resolve_template(tokenizer, cfg.template)
    name = cfg.template
    if name == "auto":
        name += " (the model's own)" if getattr(tokenizer, "chat_template", None) else " (chatml)"
    scores: list[RowScore] = []
    sequences: list[Example] = []
    owner: list[int] = []  # the row of each sequence
    for position, row in enumerate(rows):
        try:
            encoded = encode_trained(row, tokenizer, template)
        except DataError:
            scores.append(RowScore(not_scored="unrenderable"))
            continue
        if not any(e.num_label_tokens for e in encoded):
            scores.append(RowScore(not_scored="no_trained_tokens"))
            continue
        cut = [Example(e.input_ids[:max_length], e.labels[:max_length], e.source) for e in encoded]
        if not any(e.num_label_tokens for e in cut):
            scores.append(RowScore(not_scored="labels_past_max_length"))
            continue
        scores.append(RowScore(truncated=any(len(e) > max_length for e in encoded)))
        sequences += cut
        owner += [position] * len(cut)
    log(f"perplexity: scoring {len(set(owner))} rows ({len(sequences)} sequences) under {cfg.model}")
    nll = [0.0] * len(rows)
    for position, (total, count) in zip(owner, response_nll(model, sequences, cfg.batch_size,
                                                             tokenizer.pad_token_id)):
        nll[position] += total
        scores[position].tokens += count
    for position in set(owner):
        mean = nll[position] / scores[position].tokens
        scores[position].perplexity = math.exp(mean) if mean < _EXP_LIMIT else math.inf
    return scores, name, max_length


def response_nll(model, sequences: Sequence[Example], batch_size: int, pad_id: int) -> list[tuple[float, int]]:
    """(summed negative log-likelihood, token count) of each sequence's labelled tokens under
    `model`, in the order given. Sequences go `batch_size` at a time, sorted by length so that
    little of a batch is padding, under no_grad; `policy_logps` reads the log-probs from the
    final hidden states chunk by chunk, so not even one batch's [B, T, V] logits are formed
    (a model whose head scales its logits falls back to one batch's logits)."""
    import torch

    from posttrain.data.batching import collate
    from posttrain.train.preference import policy_logps

    device = next(model.parameters()).device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    out: list[tuple[float, int]] = [(0.0, 0)] * len(sequences)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([sequences[i] for i in chunk], pad_id).items()}
            logps, counts = policy_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
            for i, logp, count in zip(chunk, logps.double().tolist(), counts.tolist()):
                out[i] = (-logp, int(count))
    return out


def fraction_count(fraction: float, n: int) -> int:
    """Rows a fraction of n comes to: rounded down, so never more than the fraction asked (fewer
    than 1 / fraction scored rows drop none); 1e-9 absorbs float error (0.29 · 100 = 28.999…)."""
    return math.floor(fraction * n + 1e-9)


def threshold_drops(values: Sequence[float], max_perplexity: float, top: float,
                    bottom: float) -> tuple[dict[int, tuple[str, str]], dict]:
    """Which of the scored rows (their perplexities `values`, in input order) the thresholds drop:
    {position: (reason, detail)}, and the cut-offs applied.

    max_perplexity (0 = off) drops every row above it. The fractions are then counted over the
    rows left (n): the floor(top · n) highest and the floor(bottom · n) lowest go. Ties: rows
    rank by (perplexity, position in the input), so among equal values an earlier row counts as
    lower: at the top cut-off the later of tied rows is dropped, at the bottom cut-off the
    earlier. top + bottom < 1 keeps the two cuts apart."""
    drops: dict[int, tuple[str, str]] = {}
    if max_perplexity:
        for i, value in enumerate(values):
            if value > max_perplexity:
                drops[i] = ("perplexity_high", f"perplexity {value:.2f} > max_perplexity={max_perplexity:g}")
    left = sorted((i for i in range(len(values)) if i not in drops), key=lambda i: (values[i], i))
    n = len(left)
    n_top, n_bottom = fraction_count(top, n), fraction_count(bottom, n)
    cutoffs: dict[str, float | None] = {"top_cutoff": None, "bottom_cutoff": None}
    if n_top:
        cutoffs["top_cutoff"] = cut = values[left[n - n_top]]
        for i in left[n - n_top:]:
            drops[i] = ("perplexity_high", f"perplexity {values[i]:.2f} >= {cut:.2f}, the cut-off of the highest "
                        f"{n_top} of {n} scored rows (drop_top_fraction={top:g})")
    if n_bottom:
        cutoffs["bottom_cutoff"] = cut = values[left[n_bottom - 1]]
        for i in left[:n_bottom]:
            drops[i] = ("perplexity_low", f"perplexity {values[i]:.2f} <= {cut:.2f}, the cut-off of the lowest "
                        f"{n_bottom} of {n} scored rows (drop_bottom_fraction={bottom:g})")
    return drops, {k: None if v is None else round(v, 4) for k, v in cutoffs.items()}


def distribution(values: Sequence[float]) -> dict:
    """count, mean and nearest-rank p10 / p50 / p90 / p99 (with min and max) of the perplexities."""
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    figures = {"min": ordered[0], **{f"p{q}": nearest_rank(ordered, q / 100) for q in (10, 50, 90, 99)},
               "max": ordered[-1], "mean": sum(ordered) / len(ordered)}
    return {"count": len(ordered), **{k: round(v, 3) for k, v in figures.items()}}
