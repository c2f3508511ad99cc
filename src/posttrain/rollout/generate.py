"""Batched generation with a transformers model and its KV cache.

The engine behind `posttrain generate`, `posttrain chat` and online-RL rollouts.

Prompts are left-padded so every row's next token is at the same column, which lets
one forward per step serve the whole batch. Pad positions are masked out and excluded
from the position ids (position = number of real tokens before it), so a prompt
gives the same completion alone or inside a padded batch.
"""

from __future__ import annotations

import inspect
import itertools
import sys
from dataclasses import replace
from typing import Callable

import torch
from torch import Tensor

from posttrain.data.batching import real_positions
from posttrain.models.adapters.model import cache_argument, output_cache
from posttrain.rollout import is_greedy
from posttrain.rollout.sampling import (
    SamplingSettings,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    request_seed,
    row_generators,
    sample_next,
)


def generate(
    model, tokenizer, prompts: list[str], settings: SamplingSettings, *, batch_size: int = 8,
    template: str | None = None, raw: bool = False, window: int | None = None,
    on_done: Callable[[int, str], object] | None = None, indices: list[int] | None = None,
    names: list[str] | None = None,
) -> list[str]:
    """Complete each prompt; return the completion texts only, in prompt order.

    Prompts are text rendered by a chat template (BOS and all), or with `raw` text no
    template was applied to; `prompt_token_ids` tokenizes either. Each completion ends at an EOS token (tokenizer's, the model's
    generation_config's, and the chat template's end-of-turn token: `eos_token_ids`; raw prompts
    imply no template's), at the first stop string (the text is cut before it; a several-token
    end-of-turn marker is one: `stop_strings`; a stop string that is one special token is its id:
    `stop_token_ids`; one that starts with a special token is looked for where that token's text
    is kept: `StopCheck`), or after settings.max_new_tokens tokens. `template` is the
    chat template the prompts were rendered with (default: the tokenizer's own). Texts
    are decoded with skip_special_tokens (`completion_text`). `window`, `indices` and `names`: as
    `generate_token_ids` takes them; `on_done(i, text)` hears prompt i's completion text.
    """
    eos_ids = eos_token_ids(model, tokenizer, template, raw=raw)
    stop = stop_strings(tokenizer, settings.stop, template, raw=raw)
    stop_check = _make_stop_check(tokenizer, stop) if stop else None
    prompt_ids = [prompt_token_ids(tokenizer, p, raw=raw) for p in prompts]

    def text(ids: list[int]) -> str:
        return completion_text(tokenizer, ids, stop)

    completions = generate_token_ids(
        model, prompt_ids, settings, pad_token_id=pad_token_id(tokenizer, eos_ids),
        eos_token_ids=eos_ids, batch_size=batch_size, stop_check=stop_check, window=window,
        on_done=None if on_done is None else (lambda i, ids: on_done(i, text(ids))), indices=indices, names=names,
    )
    return [text(ids) for ids in completions]


def prompt_token_ids(tokenizer, text: str, *, raw: bool) -> list[int]:
    """A prompt's token ids. Text rendered by a chat template holds the template's own special
    tokens (BOS and all), and a second BOS would change the model's input; a raw prompt (no
    template) is the model's whole input, so it gets the tokenizer's special tokens (BOS), as
    text SFT trains on `tokenizer(text)` and as transformers' generate and the OpenAI / vLLM
    completions endpoint read a prompt. `generate --template none` and `serve`'s completions
    share this rule."""
    return tokenizer(text, add_special_tokens=raw, verbose=False)["input_ids"]


def generate_token_ids(
    model,
    prompt_ids: list[list[int]],
    settings: SamplingSettings,
    *,
    pad_token_id: int,
    eos_token_ids: set[int],
    batch_size: int = 8,
    stop_check: Callable[[list[int]], bool] | None = None,
    on_token: Callable[[int, list[int]], bool] | None = None,
    window: int | None = None,
    on_done: Callable[[int, list[int]], object] | None = None,
    indices: list[int] | None = None,
    names: list[str] | None = None,
) -> list[list[int]]:
    """Token-level generation: completion ids per prompt (ending with the EOS id if one
    was produced, no padding). `stop_check(ids)` may end a row early (stop strings).
    `on_token(i, ids)` is called after every token generated for prompt i, with that
    prompt's completion ids so far (EOS included); True ends the row. It serves
    per-prompt limits, streaming and cancellation (`posttrain serve`).

    Prompts are batched by length (longest first) to minimise padding; results come
    back in the original order. With `window`, prompts are sorted within each run of `window`
    prompts in input order only, so the first prompts are done early (a file written in
    order as rows finish: `posttrain generate`); `on_done(i, ids)` hears each prompt's
    completion as its batch ends. A prefix-tuned model under a sliding window that a row
    can outgrow is batched with prompts of its own length only (`_equal_lengths`). The
    model is put in eval mode and restored after.

    A seeded sampling call gives prompt i its own generator, seeded with
    `request_seed(settings.seed, indices[i])` (default: i) as the vLLM engine seeds request i: a
    prompt's sample depends on the seed and its index, not on the batch size or the prompts
    batched with it. `indices` keep a file's numbering when its rows are generated in parts
    (one adapter's rows at a time: `inference._generate_per_adapter`).

    The model's positions (`loading.position_limit`) bound every row, as `serve` bounds a
    request: a prompt that leaves no room for a token is a DataError naming it (before any
    generation; `names[i]`, its file:line, when given), and a row ends when its prompt and
    completion fill them, whatever settings.max_new_tokens says (`completion_budgets`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for given, what in ((indices, "indices"), (names, "names")):
        if given is not None and len(given) != len(prompt_ids):
            raise ValueError(f"{len(given)} {what} for {len(prompt_ids)} prompts; give one per prompt")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"{_prompt_name(i, names)} is empty after tokenization; give it at least one token")
    budgets = completion_budgets(model, [len(ids) for ids in prompt_ids], settings.max_new_tokens, names)
    device = next(model.parameters()).device
    generators = None  # unseeded: the global generator, one draw for the batch
    if settings.seed is not None and not is_greedy(settings.temperature):
        generators = row_generators(settings.seed, len(prompt_ids), indices)
    results: list[list[int]] = [[] for _ in prompt_ids]
    cache_name = cache_argument(model)  # `cache` (transformers >= 5.24) or `past_key_values`
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for rows in _batches(prompt_ids, batch_size, _equal_lengths(model, prompt_ids, settings), window):
                on_row = None if on_token is None else (lambda row, ids, rows=rows: on_token(rows[row], ids))
                batch = _generate_batch(
                    model, [prompt_ids[i] for i in rows], settings, device,
                    pad_token_id, eos_token_ids, stop_check,
                    None if generators is None else [generators[i] for i in rows], on_row, cache_name,
                    [budgets[i] for i in rows],
                )
                for i, ids in zip(rows, batch):
                    results[i] = ids
                    if on_done is not None:
                        on_done(i, ids)
    finally:
        model.train(was_training)
    return results


def completion_budgets(model, prompt_lengths: list[int], max_new_tokens: int,
                       names: list[str] | None = None) -> list[int]:
    """The tokens each prompt may generate: `max_new_tokens`, less what the model's positions
    (`loading.position_limit`) leave after the prompt. A prompt that leaves no room for one
    token is a DataError naming it (`names[i]`, its file:line, else its index), said before
    any generation."""
    from posttrain.errors import DataError
    from posttrain.models.loading import position_limit

    limit = position_limit(model)
    if limit is None:
        return [max_new_tokens] * len(prompt_lengths)
    for i, length in enumerate(prompt_lengths):
        if length >= limit:
            virtual = ", less its virtual tokens" if getattr(model, "num_virtual_tokens", 0) else ""
            raise DataError(f"{_prompt_name(i, names)} has {length} tokens; the model reads at most {limit} "
                            f"(its position table{virtual}), leaving no room for an answer; shorten the prompt")
    return [min(max_new_tokens, limit - length) for length in prompt_lengths]


def _prompt_name(i: int, names: list[str] | None) -> str:
    """Prompt i as an error names it: 'FILE:LINE: the prompt' from `names`, else its index."""
    return f"{names[i]}: the prompt" if names is not None else f"prompt {i} (counting from 0)"


def _batches(prompt_ids: list[list[int]], batch_size: int, equal_lengths: bool,
             window: int | None = None) -> list[list[int]]:
    """Prompt indices in batches of up to `batch_size`, longest prompts first (a stable sort: equal
    lengths keep their order) within each run of `window` prompts in input order (default: all
    of them); with `equal_lengths`, a batch holds prompts of one length only."""
    window = window or max(1, len(prompt_ids))
    batches = []
    for first in range(0, len(prompt_ids), window):
        order = sorted(range(first, min(first + window, len(prompt_ids))), key=lambda i: -len(prompt_ids[i]))
        runs = [list(run) for _, run in itertools.groupby(order, key=lambda i: len(prompt_ids[i]))] \
            if equal_lengths else [order]
        batches += [run[start:start + batch_size] for run in runs for start in range(0, len(run), batch_size)]
    return batches


def _equal_lengths(model, prompt_ids: list[list[int]], settings: SamplingSettings) -> bool:
    """Whether rows must be batched with prompts of their own length: prefix tuning under a sliding
    window narrower than the longest row can get (prefix + prompt + completion).

    A prefix is KV-cache entries before every input column, so a shorter row's left padding sits
    between its prefix and its tokens; the window counts those pad slots, and the row's tokens see
    less of the prefix than alone, so the row's completion would depend on its batch. Prompt tuning
    puts the pads in front of its soft prompt instead (`AdaptedModel.decoder_inputs`); a prefix in
    the cache cannot move. Said once per model, on stderr."""
    from posttrain.models.attention import attention_window

    if getattr(model, "virtual_kind", None) != "prefix" or len({len(ids) for ids in prompt_ids}) < 2:
        return False
    window = attention_window(model)
    longest = model.num_virtual_tokens + max(len(ids) for ids in prompt_ids) + settings.max_new_tokens
    if window is None or longest <= window:
        return False
    if not getattr(model, "_equal_length_batches_said", False):
        model._equal_length_batches_said = True
        print(f"note: prefix tuning under a {window}-token sliding window: prompts are generated in batches of "
              "equal length (left padding would sit between the prefix and a row's tokens and take window "
              "places, so a completion would depend on its batch)", file=sys.stderr)
    return True


def _generate_batch(model, prompt_ids, settings, device, pad_id, eos_ids, stop_check, generators, on_row=None,
                    cache_name: str | None = None, budgets: list[int] | None = None):
    """Prefill the left-padded batch, then decode one token per step with the KV cache, passed back
    to the model under `cache_name` (its forward's name for it; detected here when not given).
    `generators`: one per row (a seeded call), or None (the global generator). `budgets`: the
    tokens each row may generate (default: settings.max_new_tokens each)."""
    cache_name = cache_name or cache_argument(model)
    input_ids, attention_mask = left_pad(prompt_ids, pad_id, device)
    position_ids = real_positions(attention_mask)
    num_rows = len(prompt_ids)
    generated: list[list[int]] = [[] for _ in range(num_rows)]
    budgets = [settings.max_new_tokens] * num_rows if budgets is None else budgets
    steps = max(budgets)
    if steps <= 0:
        return generated
    out, logits = _prefill(model, input_ids, attention_mask, position_ids, prompt_ids)
    history = _TokenHistory(input_ids, attention_mask, logits.shape[-1], settings)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    positions = position_ids[:, -1:]
    for step in range(steps):
        next_tokens = _pick_next(logits, history, settings, generators)
        next_tokens = torch.where(finished, torch.full_like(next_tokens, pad_id), next_tokens)
        history.add(next_tokens, ~finished)
        done_now = []
        for row, (token, was_done) in enumerate(zip(next_tokens.tolist(), finished.tolist())):
            if was_done:
                continue
            generated[row].append(token)
            ended = token in eos_ids or (stop_check is not None and stop_check(generated[row]))
            if on_row is not None and on_row(row, generated[row]):
                ended = True
            if ended or len(generated[row]) >= budgets[row]:
                done_now.append(row)
        finished[done_now] = True
        if bool(finished.all()) or step == steps - 1:
            break
        # Finished rows are still fed (a pad, or their EOS) to keep the batch rectangular,
        # but masked, so nothing attends to them; they keep their last position, which a row
        # ended by the model's positions has no next one past.
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
        positions = positions + (~finished).long()[:, None]
        out = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **{cache_name: output_cache(out)})
        logits = out.logits[:, -1, :]
    return generated


def _prefill(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, prompt_ids: list[list[int]]):
    """(output, last-position logits (B, V)) of the batch's prompt forward. Rows that repeat a prompt
    (RL's G samples of each) are computed once, and the KV cache and logits copied to every copy
    (`Cache.reorder_cache`): a row's numbers do not depend on the rows beside it (their padding is
    masked, and the padded width, the longest prompt's, stays), so it samples what it would have,
    up to the rounding of a kernel that blocks a smaller batch otherwise (none on the CPU: tested).
    A model whose cache is not a transformers `Cache` runs every row."""
    from transformers.cache_utils import Cache

    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    first: dict[tuple[int, ...], int] = {}  # a prompt -> its place among the distinct ones
    rows, copies = [], []  # the row computed for each distinct prompt; each row's distinct prompt
    for row, ids in enumerate(prompt_ids):
        if tuple(ids) not in first:
            first[tuple(ids)] = len(rows)
            rows.append(row)
        copies.append(first[tuple(ids)])
    if len(rows) < len(prompt_ids):
        distinct = torch.tensor(rows, device=input_ids.device)
        out = model(input_ids=input_ids[distinct], attention_mask=attention_mask[distinct],
                    position_ids=position_ids[distinct], use_cache=True, **extra)
        cache = output_cache(out)
        if isinstance(cache, Cache):
            expand = torch.tensor(copies, device=input_ids.device)
            cache.reorder_cache(expand)
            return out, out.logits[expand, -1, :]
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True, **extra)
    return out, out.logits[:, -1, :]


class _TokenHistory:
    """Per-row token statistics the penalties need, kept only when a penalty is on."""

    def __init__(self, input_ids: Tensor, attention_mask: Tensor, vocab: int, settings: SamplingSettings):
        rows = input_ids.shape[0]
        self.seen = None  # (B, V) bool: in prompt or generated (repetition penalty)
        self.counts = None  # (B, V) float: generated-token counts (frequency/presence)
        if settings.repetition_penalty != 1.0:
            prompt_counts = torch.zeros(rows, vocab, device=input_ids.device)
            prompt_counts.scatter_add_(1, input_ids, attention_mask.float())  # pads add 0
            self.seen = prompt_counts > 0
        if settings.frequency_penalty != 0.0 or settings.presence_penalty != 0.0:
            self.counts = torch.zeros(rows, vocab, device=input_ids.device)

    def add(self, tokens: Tensor, active: Tensor) -> None:
        if self.seen is not None:
            self.seen[active, tokens[active]] = True
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], active.float()[:, None])


def _pick_next(logits: Tensor, history: _TokenHistory, settings: SamplingSettings, generators) -> Tensor:
    logits = logits.float()
    if history.seen is not None:
        logits = apply_repetition_penalty(logits, history.seen, settings.repetition_penalty)
    if history.counts is not None:
        logits = apply_frequency_presence_penalty(
            logits, history.counts, settings.frequency_penalty, settings.presence_penalty
        )
    return sample_next(logits, settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                       min_p=settings.min_p, generator=generators)


def left_pad(prompt_ids: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    """Left-pad to the longest prompt. -> input_ids (B, T) long, attention_mask (B, T) long."""
    width = max(len(ids) for ids in prompt_ids)
    input_ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for row, ids in enumerate(prompt_ids):
        if ids:
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def eos_token_ids(model, tokenizer, template: str | None = None, *, raw: bool = False) -> set[int]:
    """The ids that end a completion: the tokenizer's EOS, the model's generation_config's
    (int or list), and the chat template's end-of-turn token (`end_of_turn`), which is
    what a chat model was trained to end its answer with and need not be EOS: ChatML's
    <|im_end|> on a GPT-2-style tokenizer whose EOS is <|endoftext|> (posttrain's fallback
    template), Gemma's <end_of_turn>. `template` is the one prompts are rendered with
    (default: the tokenizer's own); `raw`: no template was applied (`generate --template none`),
    so no template's marker is implied. A marker of several tokens is a stop string instead
    (`stop_strings`)."""
    ids: set[int] = set()
    sources = [getattr(tokenizer, "eos_token_id", None)]
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        sources.append(getattr(generation_config, "eos_token_id", None))
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source is not None:
            ids.update(int(i) for i in source)
    marker = None if raw else _end_of_turn_id(tokenizer, end_of_turn(tokenizer, template))
    if marker is not None:
        ids.add(marker)
    return ids


def stop_strings(tokenizer, stop: list[str], template: str | None = None, *, raw: bool = False) -> list[str]:
    """`stop` (empty strings dropped) plus the chat template's end-of-turn marker when the
    tokenizer spells it in several ordinary tokens (ChatML's '<|im_end|>' on a tokenizer
    without that token), where no single id can end the row (`eos_token_ids`); with `raw`
    (no template applied) no marker."""
    stops = [s for s in stop if s]
    marker = None if raw else end_of_turn(tokenizer, template)
    if marker and _end_of_turn_id(tokenizer, marker) is None and marker not in stops:
        stops.append(marker)
    return stops


def end_of_turn(tokenizer, template: str | None = None) -> str | None:
    """The text `template` (default: the tokenizer's own chat template) writes after an
    assistant's answer to end the turn: '<|im_end|>', '<end_of_turn>', '<|eot_id|>', the
    EOS token; None without a template, or when it writes only whitespace there.

    Found as SFT finds the marker it trains on and strips from answers that already end with it
    (`data.templates.end_of_turn`: one rule)."""
    from posttrain.data.templates import end_of_turn as template_end_of_turn
    from posttrain.data.templates import resolve_template

    if template is None:
        if not getattr(tokenizer, "chat_template", None):
            return None
        template = resolve_template(tokenizer, "tokenizer")
    return template_end_of_turn(tokenizer, template) or None


def _end_of_turn_id(tokenizer, marker: str | None) -> int | None:
    """The one id that ends a turn marked by `marker`: the marker's token when it is one token,
    or its first token when that is a special token (it would be dropped from the decoded
    text a stop string is looked for in; what follows it in the marker is the template's,
    not the answer's). None for a marker spelled in ordinary tokens."""
    if not marker:
        return None
    ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
    if len(ids) == 1 or (ids and ids[0] in set(getattr(tokenizer, "all_special_ids", []))):
        return int(ids[0])
    return None


def _special_lead(tokenizer, stop: str) -> tuple[int | None, int]:
    """(the special token a stop string's tokens start with, or None; how many tokens it takes)."""
    ids = tokenizer(stop, add_special_tokens=False)["input_ids"] if stop else []
    special = set(getattr(tokenizer, "all_special_ids", []))
    return (int(ids[0]) if ids and ids[0] in special else None), len(ids)


def stop_token_ids(tokenizer, stop: list[str]) -> set[int]:
    """The ids of the stop strings the tokenizer spells as one special token (ChatML's
    '<|im_start|>', for a model that starts the next turn instead of ending its own). Text is
    decoded with skip_special_tokens, so such a string never shows in it: the token ends the row
    instead, as transformers' generate(stop_strings=...) matches it (it reads the tokens' strings).
    The string stays a text stop as well, for the same text spelled in ordinary tokens.
    `StopCheck` (generate, chat, the rollouts, the vLLM engine's stop ids) and `serve` end a row
    on these ids."""
    ids = set()
    for s in stop:
        lead, length = _special_lead(tokenizer, s)
        if lead is not None and length == 1:
            ids.add(lead)
    return ids


def special_led_stops(tokenizer, stop: list[str]) -> dict[str, int]:
    """{stop string: its first token} for the stop strings that start with a special token and go
    on after it ('<|im_start|>user', where a model starts the user's turn itself). Text decoded
    with skip_special_tokens drops the token, so these are looked for in text that keeps it, and
    the completion is cut at that token (`StopCheck`, `completion_text`)."""
    led = {}
    for s in stop:
        lead, length = _special_lead(tokenizer, s)
        if lead is not None and length > 1:
            led[s] = lead
    return led


def pad_token_id(tokenizer, eos_ids: set[int]) -> int:
    """The tokenizer's pad id, else an EOS id (any id works: pads are masked)."""
    if getattr(tokenizer, "pad_token_id", None) is not None:
        return tokenizer.pad_token_id
    return min(eos_ids) if eos_ids else 0


def truncate_at_stop(text: str, stop: list[str]) -> str:
    """Cut `text` just before the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop:
        at = text.find(s) if s else -1
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def completion_text(tokenizer, ids: list[int], stop: list[str]) -> str:
    """A completion's text: its ids decoded with skip_special_tokens and cut before the earliest
    stop string; a stop string that starts with a special token (`special_led_stops`) is looked
    for in text that keeps special tokens, and the ids are cut at that token first."""
    return truncate_at_stop(tokenizer.decode(ids[:special_stop_start(tokenizer, ids, stop)],
                                             skip_special_tokens=True), stop)


def special_stop_start(tokenizer, ids: list[int], stop: list[str]) -> int:
    """Where the first special-led stop string starts in `ids` (its special token's place), or len(ids)."""
    led = special_led_stops(tokenizer, stop)
    for at, token in enumerate(ids):
        for s, lead in led.items():
            if token == lead and tokenizer.decode(ids[at:at + 4 * len(s) + 4], skip_special_tokens=False).startswith(s):
                return at
    return len(ids)


class StopCheck:
    """Whether a completion's ids have reached a stop string: `check(ids)` after every token.

    A stop string that is one special token is matched by its id (`token_ids`: `stop_token_ids`);
    the others in the decoded tail of the ids, with skip_special_tokens, as the text is decoded,
    except those that start with a special token (`special_led_stops`), which are looked for in
    the tail decoded with special tokens kept (`special_text`: a vLLM engine decodes so too).
    Checked every step, so a stop string is found the step its last character arrives, inside a
    short tail: each token decodes to >= 1 byte and a character is <= 4 bytes, so the tail of
    4 * len + 4 tokens covers it, and the check is O(1) per step instead of O(length)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.window = 4 * max((len(s) for s in self.stop), default=0) + 4
        self.token_ids = stop_token_ids(tokenizer, self.stop)
        self.led = list(special_led_stops(tokenizer, self.stop))
        self.special_text = bool(self.led)

    def __call__(self, ids: list[int]) -> bool:
        if ids and ids[-1] in self.token_ids:
            return True
        tail = ids[-self.window:]
        if any(s in self.tokenizer.decode(tail, skip_special_tokens=True) for s in self.stop):
            return True
        return bool(self.led) and any(s in self.tokenizer.decode(tail, skip_special_tokens=False) for s in self.led)


def _make_stop_check(tokenizer, stop: list[str]) -> StopCheck:
    return StopCheck(tokenizer, stop)


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


CHAT_HELP = "/reset: clear the history (the system message stays); /adapter NAME: switch adapters; /exit: end"


def _fit_history(model, tokenizer, template: str, messages: list[dict], fixed: int,
                 room: int, fold: bool = False) -> tuple[list[dict], str, int]:
    """(messages, rendered prompt, its tokens) with the oldest exchanges after the first `fixed`
    messages (the system message) dropped, one user turn and its answer at a time, until the
    prompt leaves `room` tokens of the model's positions (`loading.position_limit`), or only the
    newest user message is left after them. A model that names no limit keeps all (tokens: 0).
    Rendered by `data.templates.render` (a template that refuses the conversation: a DataError);
    with `fold`, the system message is folded into the first user turn kept (`fold_system`)."""
    from posttrain.data.templates import fold_system, render
    from posttrain.models.loading import position_limit

    limit = position_limit(model)
    while True:
        prompt = render(tokenizer, template, fold_system(messages) if fold else messages, True, "chat")
        if limit is None:
            return messages, prompt, 0
        length = len(prompt_token_ids(tokenizer, prompt, raw=False))
        if length + room <= limit or len(messages) <= fixed + 1:
            return messages, prompt, length
        messages = messages[:fixed] + messages[fixed + 2:]


def chat_session(
    model,
    tokenizer,
    template: str,
    settings: SamplingSettings,
    *,
    read: Callable[[str], str] = input,
    write: Callable[[str], object] = print,
    system: str | None = None,
    switch_adapter: Callable[[str], None] | None = None,
) -> list[dict[str, str]]:
    """Interactive multi-turn chat. Returns the final message history.

    Each turn: read a user line (`read` is called with a prompt string, like input());
    EOF or `/exit` ends, `/reset` clears the history (the system message stays), an
    empty line is skipped, `/adapter NAME` switches adapters (when `switch_adapter` is
    given; the history stays). The history plus the new user message is rendered with
    `template` (adding the generation prompt), one completion is generated and
    written, and both messages are appended to the history. A history that leaves the reply
    less than settings.max_new_tokens of the model's positions loses its oldest exchanges
    (the system message stays; one line says how many turns: `_fit_history`); a message that
    leaves no room even alone is refused, and the session goes on. Reply n of the session (`/reset`
    keeps counting) is generated with the seed `request_seed(seed, n)`, so a seeded chat's turns do
    not repeat one another's draws.

    Under a template with no system role (Gemma's, Mistral's raise on one: `has_system_role`), the
    system message is folded into the first user turn (`fold_system`, as a `kind: local` judge's
    is), said once on stderr. A message the template refuses (a DataError) is refused in one line,
    and the session goes on.
    """
    from posttrain.data.templates import has_system_role
    from posttrain.errors import DataError
    from posttrain.models.loading import position_limit

    start = [{"role": "system", "content": system}] if system else []
    fold = bool(start) and not has_system_role(tokenizer, template)
    if fold:
        print("note: the chat template has no system role; the system message is folded into the first user "
              "message", file=sys.stderr)
    messages = list(start)
    turn = 0  # replies generated: each seeded from (seed, turn), not every one from (seed, 0)
    while True:
        try:
            line = read("> ")
        except EOFError:
            break
        typed_command = line.startswith("/")  # " /etc/hosts ..." (a leading space) is text for the model
        line = line.strip()
        if line == "/exit":
            break
        if line == "/reset":
            messages = list(start)
            continue
        if not line:
            continue
        if line == "/help":
            write(CHAT_HELP + ("" if switch_adapter is not None else " (no adapters loaded: start chat with "
                                                                       "--adapter NAME=DIR)"))
            continue
        command = line.split(maxsplit=1)[0]
        if typed_command and command != "/adapter":
            write(f"[unknown command {command}; /help lists them; start the line with a space to send it as text]")
            continue
        if typed_command:
            name = line[len("/adapter"):].strip()
            if switch_adapter is None or not name:
                write("usage: /adapter NAME (start chat with --adapter NAME=DIR)")
                continue
            from posttrain.errors import UserError

            try:
                switch_adapter(name)
                write(f"[adapter {name}]")
            except UserError as exc:  # a wrong name must not end the session
                write(f"[{exc}]")
            continue
        messages.append({"role": "user", "content": line})
        try:
            kept, prompt, length = _fit_history(model, tokenizer, template, messages, len(start),
                                                settings.max_new_tokens, fold)
        except DataError as exc:
            messages.pop()
            write(f"[{exc}]")
            continue
        limit = position_limit(model)
        if limit is not None and length >= limit:
            messages.pop()
            system = " and the system message" if start else ""
            write(f"[this message takes {length} tokens with the chat template{system}; "
                  f"the model reads at most {limit}, leaving no room for an answer; send a shorter one]")
            continue
        if len(kept) < len(messages):
            write(f"[dropped {len(messages) - len(kept)} earlier turns to fit the model's {limit} positions]")
            messages = kept
        seeded = settings if settings.seed is None else replace(settings, seed=request_seed(settings.seed, turn))
        reply = generate(model, tokenizer, [prompt], seeded, batch_size=1, template=template)[0]
        turn += 1
        write(reply)
        messages.append({"role": "assistant", "content": reply})
    return messages
