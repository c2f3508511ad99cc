"""Records → token ids with an exact assistant-only label mask, and the length policy.

How the mask is found, for any chat template: render the conversation once; for each
assistant turn i, render the turns before it plus the generation prompt (the text a
model sees just before it starts answering) and the turns up to and including it. The
assistant's span is the text between the two renders — its content plus whatever
end-of-turn marker the template writes (`<|im_end|>`, the eos token, ...), with
trailing whitespace dropped. The full string is tokenised once and a token is trained
on when its first character lies inside a span. No template-specific parsing, no
`{% generation %}` tags needed; a template whose earlier turns change when later ones
are added ("not prefix-stable") is refused rather than guessed at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.errors import ConfigError, DataError

# ChatML. Meant for tokenizers that have <|im_start|> / <|im_end|> as special tokens;
# with any other tokenizer it still works — the markers are tokenised as ordinary text
# (a few tokens each), and the label mask is still exact because spans are found on
# characters, not tokens. The generation prompt is `<|im_start|>assistant\n`.
CHATML = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)

# Alpaca (Taori et al. 2023) layout. System text, if any, comes first; each user turn is
# an "### Instruction:" block and each assistant turn a "### Response:" block ending in
# the tokenizer's eos token, which is what the model learns to stop on.
ALPACA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\n\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '### Instruction:\n' + message['content'] + '\n\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '### Response:\n' + message['content'] + eos_token + '\n\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"
)

_BUILTIN_TEMPLATES = {"chatml": CHATML, "alpaca": ALPACA}
TEMPLATE_NAMES = ("auto", "tokenizer", *_BUILTIN_TEMPLATES)


def resolve_template(tokenizer: Any, name: str = "auto") -> str:
    """The Jinja chat template to use for `data.template: name`.

    auto:      the tokenizer's own `chat_template` when it has one, else CHATML.
    tokenizer: the tokenizer's own template; an error when it has none.
    chatml / alpaca: the built-in templates above.
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates; "default" is the chat one
        own = own.get("default")
    if name == "auto":
        return own or CHATML
    if name == "tokenizer":
        if not own:
            raise DataError(
                "data.template is 'tokenizer' but this tokenizer has no chat_template; "
                "set data.template: chatml (or alpaca) to use a built-in template"
            )
        return own
    if name in _BUILTIN_TEMPLATES:
        return _BUILTIN_TEMPLATES[name]
    raise ConfigError(f"unknown data.template {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


def adopt_template(tokenizer: Any, name: str = "auto") -> str:
    """`resolve_template`, and the tokenizer takes that template as its own when it differs, so
    the model a stage saves carries the template it was trained with (a later stage, `chat` and
    `serve` on `data.template: auto` then render prompts the way it learned them)."""
    template = resolve_template(tokenizer, name)
    own = getattr(tokenizer, "chat_template", None)
    if template != (own.get("default") if isinstance(own, dict) else own):
        tokenizer.chat_template = template
    return template


def encode_record(record: Record, tokenizer: Any, template: str) -> Example:
    """Tokenise one record. Chat records are trained on every assistant turn (content and
    end-of-turn marker) and nothing else; text records on every token, with eos appended.

    A conversation with no assistant text comes back with every label IGNORE_INDEX
    (`example.num_label_tokens == 0`); callers count those, see `check_label_mask`.
    """
    if record.messages is not None:
        return _encode_messages(record, tokenizer, template)
    if record.text is not None:
        return _encode_text(record, tokenizer)
    raise DataError(f"{record.source}: record has neither 'messages' nor 'text'")


def _encode_text(record: Record, tokenizer: Any) -> Example:
    input_ids = list(tokenizer(record.text, add_special_tokens=True)["input_ids"])
    eos_id = tokenizer.eos_token_id
    # eos marks where one document ends, so packed documents don't run together.
    if eos_id is not None and (not input_ids or input_ids[-1] != eos_id):
        input_ids.append(eos_id)
    return Example(input_ids=input_ids, labels=list(input_ids), source=record.source)


def _encode_messages(record: Record, tokenizer: Any, template: str) -> Example:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer; exact label masks need "
            "character offsets, which only fast tokenizers give: load the model directory with "
            "a tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    _check_messages(record)
    text, spans = assistant_spans(record.messages, tokenizer, template, record.source, record.prompt_turns)
    input_ids, labels = tokenize_with_labels(tokenizer, text, spans)
    return Example(input_ids=input_ids, labels=labels, source=record.source)


def _check_messages(record: Record) -> None:
    for i, message in enumerate(record.messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{record.source}: message {i} needs a string 'role'")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{record.source}: message {i} ({message['role']}) needs a string 'content'")


def assistant_spans(
    messages: list[dict[str, str]], tokenizer: Any, template: str, source: str = "<memory>", first: int = 0
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages`; return the text and the [start, end) character span of every
    assistant turn from message `first` on (content plus end-of-turn marker, trailing
    whitespace dropped); the assistant turns before `first` are context."""
    full = _render(tokenizer, template, messages, False, source)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant" or i < first:
            continue
        prompt = _render(tokenizer, template, messages[:i], True, source)
        # The last turn's "through" render is the full render: skip a third of the work
        # for the common single-answer conversation.
        last = i == len(messages) - 1
        through = full if last else _render(tokenizer, template, messages[: i + 1], False, source)
        if not (through.startswith(prompt) and full.startswith(through)):
            raise DataError(
                f"{source}: the chat template is not prefix-stable at message {i} (rendering the "
                "earlier turns plus the generation prompt is not a prefix of the whole "
                "conversation), so the assistant tokens cannot be located; "
                "set data.template: chatml (or alpaca)"
            )
        answer = through[len(prompt) :].rstrip()
        spans.append((len(prompt), len(prompt) + len(answer)))
    return full, spans


_PROBE = "\x00"  # a message content no template writes itself
_MARKERS: dict[tuple[int, str], tuple[Any, tuple[str, ...]]] = {}  # (id(tokenizer), template) -> (tokenizer, markers)


def role_markers(tokenizer: Any, template: str) -> tuple[str, ...]:
    """The markers `template` writes around a turn, which no plain prompt text holds: the
    tokenizer's special tokens it writes (`<|im_start|>`, `<|start_header_id|>`, BOS), found by
    rendering a probe turn, plus the opening words of the built-in templates (their markers are
    plain text under a tokenizer without ChatML's special tokens)."""
    key = (id(tokenizer), template)
    if key in _MARKERS and _MARKERS[key][0] is tokenizer:
        return _MARKERS[key][1]
    try:
        around = _render(tokenizer, template, [{"role": "user", "content": _PROBE}], True, "<probe>")
    except DataError:  # a template that wants more than one user turn: its rows will say so
        around = ""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    builtin = {CHATML: ("<|im_start|>",), ALPACA: ("### Instruction:\n", "### Response:\n")}.get(template, ())
    markers = tuple(dict.fromkeys([*builtin, *sorted(t for t in specials if t and t in around)]))
    if len(_MARKERS) > 16:  # a few tokenizers per process; never a leak
        _MARKERS.clear()
    _MARKERS[key] = (tokenizer, markers)
    return markers


def check_not_rendered(prompt: list[dict[str, str]], tokenizer: Any, template: str, source: str) -> None:
    """A prompt whose text holds the template's own markers was rendered with a chat template
    already (TRL's apply_chat_template preprocessing): templating it again would nest two
    conversations, silently, and its markers would tokenise as the real special tokens."""
    markers = role_markers(tokenizer, template)
    for turn in prompt:
        found = next((m for m in markers if m in turn["content"]), None)
        if found is not None:
            raise DataError(
                f"{source}: this prompt is already rendered with a chat template (its {turn['role']} text holds "
                f"{found.strip()!r}, which the chat template writes itself); give the turns as a list of messages, "
                "or the plain text"
            )


def _render(tokenizer: Any, template: str, messages: list, add_generation_prompt: bool, source: str) -> str:
    import jinja2  # a dependency of transformers; imported here to keep imports cheap

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise DataError(
            f"{source}: the chat template failed on this conversation ({type(err).__name__}: {err}); "
            "check the roles and their order, or set data.template: chatml"
        ) from None


def tokenize_with_labels(tokenizer: Any, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Token ids of the rendered `text`, labelled on the characters of `spans` (assistant turns).

    The text is tokenised as one string (the template carries BOS, so the tokenizer adds
    nothing) unless a token straddles the start of an answer — "\n\n" merged under Llama 3's or
    Qwen2's pre-tokenizer after a template's newline, " the" after a generation prompt ending
    in a space. Such a token would be context, so the answer's first characters would never be
    trained, and a model asked the prompt (which generation tokenises alone) would see a token
    it never saw in training. The text is then cut at those answer starts and each piece
    tokenised alone, as generation does — unless the pieces do not decode to the same text (a
    tokenizer that prefixes a space to every string it tokenises): then the joint tokens stay.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    starts = _true_starts(offsets)
    cuts = [lo for lo, _ in spans if any(start < lo < end for start, (_, end) in zip(starts, offsets))]
    if not cuts:
        return ids, _labels_from_spans(ids, offsets, spans, starts)
    pieces_ids, pieces_offsets = [], []
    for lo, hi in zip([0, *cuts], [*cuts, len(text)]):
        piece = tokenizer(text[lo:hi], add_special_tokens=False, return_offsets_mapping=True)
        pieces_ids += piece["input_ids"]
        pieces_offsets += [(a + lo, b + lo) for a, b in piece["offset_mapping"]]

    def decoded(tokens):
        return tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    if decoded(pieces_ids) == decoded(ids):
        ids, offsets = pieces_ids, pieces_offsets
    return ids, _labels_from_spans(ids, offsets, spans)


def _true_starts(offsets: list) -> list[int]:
    """Where each token really starts. GPT-2-style tokenizers (ByteLevel trim_offsets=True) move
    a token's start past its leading spaces, so " the" after "ASSISTANT:" would appear to start
    inside the answer. Tokens tile the text, so the previous token's end is the true start."""
    starts, previous_end = [], None
    for start, end in offsets:
        starts.append(start if previous_end is None else min(start, previous_end))
        previous_end = end
    return starts


def _labels_from_spans(input_ids: list[int], offsets: list, spans: list[tuple[int, int]],
                       starts: list[int] | None = None) -> list[int]:
    """A token is labelled when it starts inside a span (its true start, see `_true_starts`)."""
    labels = [IGNORE_INDEX] * len(input_ids)
    for k, (token_id, true_start) in enumerate(zip(input_ids, starts or _true_starts(offsets))):
        if any(lo <= true_start < hi for lo, hi in spans):
            labels[k] = token_id
    return labels


@dataclass
class LengthReport:
    """What `fit_length` did, for the one-line data report."""

    num_examples: int
    max_length: int
    policy: str
    num_too_long: int = 0
    num_lost_labels: int = 0  # truncated until no label token was left, then dropped

    def summary(self) -> str:
        line = (
            f"{self.num_too_long} of {self.num_examples} examples longer than "
            f"{self.max_length} tokens"
        )
        if self.num_too_long:
            line += ": truncated" if self.policy == "truncate" else ": dropped"
        if self.num_lost_labels:
            line += f"; {self.num_lost_labels} lost every label token and were dropped"
        return line


def fit_length(examples: list[Example], max_length: int, policy: str = "truncate") -> tuple[list[Example], LengthReport]:
    """Apply the length policy. "truncate" keeps the first `max_length` tokens, and drops
    an example whose label tokens all fell past the cut; "drop" drops every example longer
    than `max_length`. Examples that had no label tokens to begin with pass through
    untouched (see `check_label_mask`)."""
    if policy not in ("truncate", "drop"):
        raise ConfigError(f"unknown length policy {policy!r}; choose truncate or drop")
    if max_length < 1:
        raise ConfigError(f"max_length must be at least 1, got {max_length}")
    report = LengthReport(num_examples=len(examples), max_length=max_length, policy=policy)
    kept = []
    for example in examples:
        if len(example) <= max_length:
            kept.append(example)
            continue
        report.num_too_long += 1
        if policy == "drop":
            continue
        truncated = _truncate(example, max_length)
        if truncated.num_label_tokens == 0 and example.num_label_tokens > 0:
            report.num_lost_labels += 1
            continue
        kept.append(truncated)
    return kept, report


def _truncate(example: Example, max_length: int) -> Example:
    position_ids = example.position_ids[:max_length] if example.position_ids is not None else None
    return Example(
        input_ids=example.input_ids[:max_length],
        labels=example.labels[:max_length],
        source=example.source,
        position_ids=position_ids,
    )


def check_label_mask(examples: list[Example]) -> int:
    """Return how many examples have no label tokens; raise if none has any.

    Every label IGNORE_INDEX means the loss is 0/0 and training silently learns nothing
    (a wrong template, prompt-only rows, or max_length cutting off every answer).
    """
    num_empty = sum(1 for example in examples if example.num_label_tokens == 0)
    if num_empty == len(examples):
        raise DataError(
            f"none of the {len(examples)} examples has a token to train on (every label is masked), "
            "so training would learn nothing; check that records have non-empty assistant turns, "
            "that data.template matches the model's chat format, and that max_length reaches "
            "the assistant text"
        )
    return num_empty
