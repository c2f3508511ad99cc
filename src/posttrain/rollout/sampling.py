"""Sampling settings and pure logit processors for the rollout engine.

Every processor takes logits (B, V) and returns new logits (B, V); none mutates its
input. Filtered-out tokens get -inf, so a softmax afterwards gives them probability 0.
Order used by `generate`: penalties on the raw logits, then temperature, top-k,
top-p, min-p, sample (the order Hugging Face and vLLM use, so settings mean the same thing).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from posttrain.rollout import is_greedy


@dataclass
class SamplingSettings:
    """How to decode a completion."""

    max_new_tokens: int = 128  # upper bound on generated tokens per prompt
    temperature: float = 1.0  # softmax temperature; 0 (or below GREEDY_BELOW) means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: smallest set with cumulative probability >= top_p; 1 = off
    min_p: float = 0.0  # keep tokens with probability >= min_p x the top token's (after temperature); 0 = off
    repetition_penalty: float = 1.0  # CTRL-style, over prompt + generated tokens; 1 = off
    frequency_penalty: float = 0.0  # OpenAI-style, subtract penalty * count (generated tokens only)
    presence_penalty: float = 0.0  # OpenAI-style, subtract penalty once per generated token seen
    stop: list[str] = field(default_factory=list)  # stop strings; the completion is cut before them
    seed: int | None = None  # seed for sampling (prompt i draws with request_seed(seed, i)); None = nondeterministic

    def __post_init__(self) -> None:
        """Every number checked, NaN and infinity refused (NaN passes every `<` test: a NaN temperature
        is an error in the sampler after the model loads, a NaN penalty empty completions). The
        frequency and presence penalties take any finite value here (a large one forbids repeats
        outright); the CLI holds them to OpenAI's range (`check_penalty_range`), as `serve` does."""
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "frequency_penalty", "presence_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")

    def check_penalty_range(self) -> None:
        """The frequency and presence penalties within PENALTY_RANGE (OpenAI's), as a user may set them."""
        low, high = PENALTY_RANGE
        for name in ("frequency_penalty", "presence_penalty"):
            if not low <= getattr(self, name) <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}] (OpenAI's range; 0 = off), "
                                 f"got {getattr(self, name)}")


PENALTY_RANGE = (-2.0, 2.0)  # OpenAI's documented range of frequency_penalty and presence_penalty

FROM_GENERATION_CONFIG = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")  # a model's file may set


def generation_config_settings(generation_config) -> dict[str, float]:
    """The sampling settings a model's generation_config sets, as transformers' `generate` reads
    them: only fields its generation_config.json sets (`to_diff_dict`; unset ones are not the
    model's choice); its temperature only when it samples (`do_sample`: true), 1.0 when it samples
    without naming one, and none when it decodes greedily (posttrain's default then: greedy).
    top_k 0, top_p 1, min_p 0 and repetition_penalty 1 mean off in both. None gives {}."""
    if generation_config is None:
        return {}
    given = generation_config.to_diff_dict() if hasattr(generation_config, "to_diff_dict") else \
        dict(vars(generation_config))
    found = {name: given[name] for name in FROM_GENERATION_CONFIG if given.get(name) is not None}
    found.pop("temperature", None)
    if given.get("do_sample") is True:
        found["temperature"] = given.get("temperature") if given.get("temperature") is not None else 1.0
    return {name: found[name] for name in FROM_GENERATION_CONFIG if name in found}


def request_seed(seed: int, index: int) -> int:
    """The seed of request (prompt row) `index` of a generate call seeded with `seed`, for both
    rollout engines: every row has its own, so the G copies of a prompt are G different samples,
    and a row's sample does not depend on the rows generated beside it, nor on the batch size."""
    return (seed * 1_000_003 + index) % (2**31)


def row_generators(seed: int, rows: int, indices: Sequence[int] | None = None) -> list[torch.Generator]:
    """One CPU generator per row, row r seeded with `request_seed(seed, indices[r])` (default: r),
    so a row generated apart from the rows before it (one adapter's rows of a file, one turn of a
    chat) keeps its own index. CPU, so a seeded row draws the same uniforms on any device
    (`sample_categorical` moves them)."""
    if indices is not None and len(indices) != rows:
        raise ValueError(f"{len(indices)} indices for {rows} rows; give one per row")
    indices = range(rows) if indices is None else indices
    return [torch.Generator().manual_seed(request_seed(seed, i)) for i in indices]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL repetition penalty (Keskar et al. 2019, Sec. 4.1), sign-aware as in HF.

    For every token v with seen[b, v] (present in the prompt or generated so far):
        z'[b, v] = z[b, v] / penalty   if z[b, v] > 0
        z'[b, v] = z[b, v] * penalty   otherwise
    so penalty > 1 always makes a seen token less likely. Unseen tokens are unchanged.

    logits: (B, V) float, seen: (B, V) bool -> (B, V)
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_frequency_presence_penalty(
    logits: Tensor, counts: Tensor, frequency_penalty: float, presence_penalty: float
) -> Tensor:
    """OpenAI frequency and presence penalties, over generated tokens only.

        z'[b, v] = z[b, v] - frequency_penalty * c[b, v] - presence_penalty * 1[c[b, v] > 0]

    where c[b, v] is how many times token v was generated so far in row b.

    logits: (B, V) float, counts: (B, V) int or float -> (B, V)
    """
    if frequency_penalty == 0.0 and presence_penalty == 0.0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - frequency_penalty * counts - presence_penalty * (counts > 0).to(logits.dtype)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits per row, set the rest to -inf; k <= 0 or k >= V is a no-op.

        z'[b, v] = z[b, v] if z[b, v] >= (k-th largest of z[b, :]) else -inf

    Ties with the k-th value are all kept. logits: (B, V) -> (B, V)
    """
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the smallest set of most likely
    tokens whose cumulative probability is >= p; the top token is always kept.

    With probabilities sorted descending, π_(1) >= π_(2) >= ..., token (j) is kept iff
        Σ_{i<j} π_(i) < p        (the mass before it has not reached p yet)
    p >= 1 is a no-op. logits: (B, V) -> (B, V)
    """
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits.float(), dim=-1)
    mass_before = torch.cumsum(probs, dim=-1) - probs  # Σ_{i<j} π_(i)
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: Tensor, p: float) -> Tensor:
    """Min-p filtering (Nguyen et al. 2024, "Turning Up the Heat: Min-p Sampling"): keep the
    tokens whose probability is at least p times the most likely token's.

        z'[b, v] = z[b, v] if π[b, v] >= p * max_w π[b, w] else -inf,   π = softmax(z[b, :])

    which is z[b, v] >= max_w z[b, w] + log p, so no softmax is needed; the top token is always
    kept. p <= 0 is a no-op. logits: (B, V) -> (B, V)
    """
    if p <= 0.0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def sample_next(
    logits: Tensor,
    temperature: float,
    *,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> Tensor:
    """Pick the next token per row.

    T < GREEDY_BELOW (0 included, `is_greedy`): argmax_v z[b, v] (greedy; top_k/top_p/min_p are
                      irrelevant; a tinier T would overflow z / T to inf in float32, and differs from
                      the argmax only between logits closer than ~T apart).
    otherwise:        v ~ Categorical(softmax(min_p(top_p(top_k(z / T)))))  using `generator`: one for
                      the batch, or one per row (`sample_categorical`).

    logits: (B, V) -> token ids (B,) long
    """
    if is_greedy(temperature):
        return torch.argmax(logits, dim=-1)
    scaled = logits.float() / temperature
    scaled = apply_min_p(apply_top_p(apply_top_k(scaled, top_k), top_p), min_p)
    probs = torch.softmax(scaled, dim=-1)
    return sample_categorical(probs, generator=generator)


SAMPLE_BLOCK = 256  # tokens per block in `sample_categorical`'s two-level search


def sample_categorical(probs: Tensor, *, generator: torch.Generator | Sequence[torch.Generator] | None = None
                       ) -> Tensor:
    """One draw per row from Categorical(probs): the inverse CDF, searched in two levels.

    With u ~ Uniform[0, Σ_v π_v), the draw is the smallest v with Σ_{w<=v} π_w > u, which has
    probability exactly π_v, so a token of probability 0 is never drawn. The vocabulary is cut
    into blocks of SAMPLE_BLOCK tokens: u first picks a block by the cumulative block sums (in
    float64), then a token inside it by that block's cumulative sum (float64). One uniform per
    row and one pass over the probabilities, where `torch.multinomial` draws an exponential per
    vocabulary entry: at V = 32,768 and 32 rows, 0.3 ms against 19 ms on a 2-core CPU, which
    was most of a rollout's time.

    `generator` is one generator for all rows, or a sequence of one per row: row b's uniform then
    comes from generator[b] alone, so its draw does not depend on which rows are batched with it.

    probs: (B, V), non-negative, rows need not sum to 1 -> token ids (B,) long
    """
    if isinstance(generator, Sequence):
        if len(generator) != probs.shape[0]:
            raise ValueError(f"{len(generator)} generators for {probs.shape[0]} rows; give one per row")
        uniforms = torch.cat([torch.rand(1, 1, dtype=torch.float64, device=g.device, generator=g)
                              for g in generator]).to(probs.device)
    else:
        uniforms = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device, generator=generator)
    return inverse_cdf(probs, uniforms)


def inverse_cdf(probs: Tensor, uniforms: Tensor) -> Tensor:
    """`sample_categorical` with its uniforms given: uniforms (B, 1) float64 in [0, 1)."""
    vocab = probs.shape[1]
    full_blocks, tail = divmod(vocab, SAMPLE_BLOCK)
    block_sums = probs[:, : full_blocks * SAMPLE_BLOCK].unflatten(-1, (full_blocks, SAMPLE_BLOCK)).sum(-1)
    if tail:
        block_sums = torch.cat([block_sums, probs[:, full_blocks * SAMPLE_BLOCK :].sum(-1, keepdim=True)], dim=1)
    cdf = block_sums.double().cumsum(-1)  # (B, blocks)
    total = cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("sampling probabilities contain inf or nan, or a row sums to 0")
    zero = torch.zeros_like(total)
    # Strictly below the total, so the chosen block has positive mass (rounding could reach it).
    target = torch.minimum(uniforms * total, torch.nextafter(total, zero))
    block = torch.searchsorted(cdf, target, right=True)  # (B, 1)
    before = torch.where(block > 0, cdf.gather(1, (block - 1).clamp(min=0)), zero)
    columns = block * SAMPLE_BLOCK + torch.arange(SAMPLE_BLOCK, device=probs.device)  # (B, SAMPLE_BLOCK)
    inside = columns < vocab
    within = (probs.gather(1, columns.clamp(max=vocab - 1)) * inside).double().cumsum(-1)
    last = within[:, -1:]
    # The two sums add in different orders; staying below the block's own last value keeps the
    # pick on a token of positive probability.
    rest = torch.minimum(target - before, torch.nextafter(last, zero))
    return (columns.gather(1, torch.searchsorted(within, rest, right=True))).squeeze(-1)
