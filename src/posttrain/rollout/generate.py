"""Batched generation with a transformers model and its KV cache.

The engine behind `posttrain generate`, `posttrain chat` and online-RL rollouts.

Prompts are left-padded so every row's next token is at the same column, which lets
one forward per step serve the whole batch. Pad positions are masked out and excluded
from the position ids (position = number of real tokens before it), so a prompt
gives the same completion alone or inside a padded batch.
"""

from __future__ import annotations

import inspect
from typing import Callable

import torch
from torch import Tensor

from posttrain.data.batching import real_positions
from posttrain.models.adapters.model import cache_argument, output_cache
from posttrain.rollout.sampling import (
    SamplingSettings,
    apply_frequency_presence_penalty,
    apply_repetition_penalty,
    sample_next,
)


def generate(
    model, tokenizer, prompts: list[str], settings: SamplingSettings, *, batch_size: int = 8
) -> list[str]:
    """Complete each prompt; return the completion texts only, in prompt order.

    Prompts are tokenized with add_special_tokens=False: callers pass text that is
    already rendered (chat template, BOS and all), and a second BOS would change the
    model's input. Each completion ends at an EOS token (tokenizer's and the model's
    generation_config's), at the first stop string (the text is cut before it), or
    after settings.max_new_tokens tokens. Texts are decoded with skip_special_tokens.
    """
    eos_ids = eos_token_ids(model, tokenizer)
    stop = [s for s in settings.stop if s]
    stop_check = _make_stop_check(tokenizer, stop) if stop else None
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completions = generate_token_ids(
        model, prompt_ids, settings, pad_token_id=pad_token_id(tokenizer, eos_ids),
        eos_token_ids=eos_ids, batch_size=batch_size, stop_check=stop_check,
    )
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    return [truncate_at_stop(text, stop) for text in texts]


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
) -> list[list[int]]:
    """Token-level generation: completion ids per prompt (ending with the EOS id if one
    was produced, no padding). `stop_check(ids)` may end a row early (stop strings).
    `on_token(i, ids)` is called after every token generated for prompt i, with that
    prompt's completion ids so far (EOS included); True ends the row. It serves
    per-prompt limits, streaming and cancellation (`posttrain serve`).

    Prompts are batched by length (longest first) to minimise padding; results come
    back in the original order. The model is put in eval mode and restored after.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"prompt {i} is empty after tokenization; give it at least one token")
    device = next(model.parameters()).device
    generator = None
    if settings.seed is not None:
        generator = torch.Generator(device=device).manual_seed(settings.seed)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    results: list[list[int]] = [[] for _ in prompt_ids]
    cache_name = cache_argument(model)  # `cache` (transformers >= 5.24) or `past_key_values`
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                on_row = None if on_token is None else (lambda row, ids, rows=rows: on_token(rows[row], ids))
                batch = _generate_batch(
                    model, [prompt_ids[i] for i in rows], settings, device,
                    pad_token_id, eos_token_ids, stop_check, generator, on_row, cache_name,
                )
                for i, ids in zip(rows, batch):
                    results[i] = ids
    finally:
        model.train(was_training)
    return results


def _generate_batch(model, prompt_ids, settings, device, pad_id, eos_ids, stop_check, generator, on_row=None,
                    cache_name: str | None = None):
    """Prefill the left-padded batch, then decode one token per step with the KV cache, passed back
    to the model under `cache_name` (its forward's name for it; detected here when not given)."""
    cache_name = cache_name or cache_argument(model)
    input_ids, attention_mask = left_pad(prompt_ids, pad_id, device)
    position_ids = real_positions(attention_mask)
    num_rows = len(prompt_ids)
    generated: list[list[int]] = [[] for _ in range(num_rows)]
    if settings.max_new_tokens == 0:
        return generated
    extra = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **extra)
    logits = out.logits[:, -1, :]
    history = _TokenHistory(input_ids, attention_mask, logits.shape[-1], settings)
    finished = torch.zeros(num_rows, dtype=torch.bool, device=device)
    positions = position_ids[:, -1:]
    for step in range(settings.max_new_tokens):
        next_tokens = _pick_next(logits, history, settings, generator)
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
            if ended:
                done_now.append(row)
        finished[done_now] = True
        if bool(finished.all()) or step == settings.max_new_tokens - 1:
            break
        # Finished rows are still fed (a pad, or their EOS) to keep the batch rectangular,
        # but masked, so nothing attends to them.
        attention_mask = torch.cat([attention_mask, (~finished).long()[:, None]], dim=1)
        positions = positions + 1
        out = model(input_ids=next_tokens[:, None], attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **{cache_name: output_cache(out)})
        logits = out.logits[:, -1, :]
    return generated


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


def _pick_next(logits: Tensor, history: _TokenHistory, settings: SamplingSettings, generator) -> Tensor:
    logits = logits.float()
    if history.seen is not None:
        logits = apply_repetition_penalty(logits, history.seen, settings.repetition_penalty)
    if history.counts is not None:
        logits = apply_frequency_presence_penalty(
            logits, history.counts, settings.frequency_penalty, settings.presence_penalty
        )
    return sample_next(logits, settings.temperature, top_k=settings.top_k, top_p=settings.top_p,
                       generator=generator)


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


def eos_token_ids(model, tokenizer) -> set[int]:
    """EOS ids from the tokenizer and the model's generation_config (int or list)."""
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
    return ids


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


def _make_stop_check(tokenizer, stop: list[str]) -> Callable[[list[int]], bool]:
    # Checked every step, so a stop string is found the step its last character
    # arrives, inside a short tail. Each token decodes to >= 1 byte and a character
    # is <= 4 bytes, so the tail of 4 * len + 4 tokens covers it; decoding the tail
    # only keeps the check O(1) per step instead of O(length).
    window = 4 * max(len(s) for s in stop) + 4

    def stop_check(ids: list[int]) -> bool:
        tail = tokenizer.decode(ids[-window:], skip_special_tokens=True)
        return any(s in tail for s in stop)

    return stop_check


def _accepts(model, argument: str) -> bool:
    try:
        return argument in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


CHAT_HELP = "/reset: clear the history (the system message stays); /adapter NAME: switch adapters; /exit: end"


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
    written, and both messages are appended to the history.
    """
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
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
        prompt = tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=True
        )
        reply = generate(model, tokenizer, [prompt], settings, batch_size=1)[0]
        write(reply)
        messages.append({"role": "assistant", "content": reply})
    return messages
