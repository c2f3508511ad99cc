"""Records → token ids with an exact assistant-only label mask, and the length policy.

How the mask is found, for any chat template: render the conversation once; for each
assistant turn i, render the turns before it plus the generation prompt (the text a
model sees just before it starts answering) and the turns up to and including it. The
assistant's span is the text between the two renders — its content plus whatever
end-of-turn marker the template writes (`<|im_end|>`, the eos token, ...), with
trailing whitespace dropped. The full string is tokenised once and a token is trained
on when its first character lies inside a span. No template-specific parsing, no
`{% generation %}` tags needed. A template that writes something after the last turn
only (Phi-3's eos) ends an earlier turn's span where rendering through that turn and the
whole conversation stop agreeing; a template whose earlier turns change when later ones are
added ("not prefix-stable") is refused rather than guessed at.

Agent rows render as transformers renders them: the row's `tools` go to every render
(`apply_chat_template(tools=...)`), and an assistant turn's span is everything the template
writes for it, tool calls and reasoning included. A row carrying something the template does
not render (its tools, tool calls, reasoning, tool turns, a speaker's `name`) is refused, naming
it (`render`).
"""

from __future__ import annotations

import dataclasses
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
_BOS = "{{- bos_token }}"  # put before a built-in template for a tokenizer that adds BOS to every text


def builtin_template(name: str, tokenizer: Any) -> str:
    """The built-in template `name`, starting with BOS when `tokenizer` puts BOS before every
    text it tokenises (Llama-2, Mistral, Gemma base models): such a model never saw a sequence
    without it, and its text rows get it, so its chat rows and prompts must too (once: rendered
    text is tokenised without the tokenizer's own special tokens)."""
    template = _BUILTIN_TEMPLATES[name]
    return _BOS + template if adds_bos(tokenizer) else template


def adds_bos(tokenizer: Any) -> bool:
    """Whether tokenising a text with the tokenizer's special tokens puts BOS first."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _plain_builtin(template: str) -> str:
    """A built-in template without the BOS `builtin_template` may have put before it."""
    return template[len(_BOS):] if template.startswith(_BOS) else template


def resolve_template(tokenizer: Any, name: str = "auto", setting: str = "data.template") -> str:
    """The Jinja chat template to use for `data.template: name`.

    auto:      the tokenizer's own `chat_template` when it has one, else CHATML.
    tokenizer: the tokenizer's own template; an error when it has none.
    chatml / alpaca: the built-in templates above (with BOS first for a tokenizer that adds
               BOS to every text: `builtin_template`).

    `setting`: what an error calls the choice, a config key ("data.template: chatml") or a
    command's flag ("--template chatml").
    """
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates; "default" is the chat one
        own = own.get("default")
    if name == "auto":
        return own or builtin_template("chatml", tokenizer)
    if name == "tokenizer":
        if not own:
            raise DataError(
                f"{setting} is 'tokenizer' but this tokenizer has no chat_template; "
                f"set {_setting(setting, 'chatml')} (or alpaca) to use a built-in template"
            )
        return own
    if name in _BUILTIN_TEMPLATES:
        return builtin_template(name, tokenizer)
    raise ConfigError(f"unknown {setting} {name!r}; choose one of {', '.join(TEMPLATE_NAMES)}")


def _setting(setting: str, value: str) -> str:
    """`setting` set to `value` as the user writes it: a flag "--template chatml", a config key
    "data.template: chatml"."""
    return f"{setting} {value}" if setting.startswith("-") else f"{setting}: {value}"


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

    A chat record whose prompt or user / system text is already rendered with the chat template
    is refused (`check_not_rendered`, a DataError: the caller's bad-row policy); a trained answer
    that already ends with the template's end-of-turn marker has it stripped (`strip_end_of_turn`;
    callers count such rows with `DoubledMarkers.count`): the template writes it once, as eos once
    ends a text row.

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
    # the prompt's turns (a prompt-completion row's) and every user / system turn: context text
    check_not_rendered([m for i, m in enumerate(record.messages) if i < record.prompt_turns
                        or m["role"] in ("system", "user")], tokenizer, template, record.source)
    record = strip_end_of_turn(record, tokenizer, template)
    text, spans = assistant_spans(record.messages, tokenizer, template, record.source, record.prompt_turns,
                                  tools=record.tools, untrained=record.untrained)
    input_ids, labels = tokenize_with_labels(tokenizer, text, spans)
    return Example(input_ids=input_ids, labels=labels, source=record.source)


def _check_messages(record: Record) -> None:
    for i, message in enumerate(record.messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise DataError(f"{record.source}: message {i} needs a string 'role'")
        if not isinstance(message.get("content"), str):
            raise DataError(f"{record.source}: message {i} ({message['role']}) needs a string 'content'")


def trained_turns(messages: list[dict[str, Any]], first: int = 0, untrained: tuple[int, ...] = ()) -> list[int]:
    """The indices of the assistant turns a row trains: from message `first` on (a prompt-completion
    row's prompt turns are context), but those in `untrained`."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first and i not in untrained]


@dataclass
class DoubledMarkers:
    """The rows whose trained answer already ended with the template's end-of-turn marker
    (`strip_end_of_turn` strips it): how many, the first, and the marker; said once (`summary`)."""

    rows: int = 0
    first: str = ""
    marker: str = ""

    def count(self, records: Record | list[Record], tokenizer: Any, template: str) -> None:
        """Count a row when it has such an answer: a record, or the records of one preference row
        (one a response: `preferences.response_record`)."""
        records = [records] if isinstance(records, Record) else records
        if any(doubled_turns(record, tokenizer, template) for record in records):
            self.rows += 1
            self.first, self.marker = self.first or records[0].source, end_of_turn(tokenizer, template)

    def entry(self) -> dict:
        """data_report.json's `end_of_turn_stripped` (the rows), present when there were some."""
        return {"end_of_turn_stripped": self.rows} if self.rows else {}

    def summary(self, name: str) -> str:
        return (f"{name}: {self.rows} rows' trained answer already ended with the end-of-turn marker {self.marker!r} "
                f"that the chat template writes itself (first: {self.first}); it is stripped, trained once")


def doubled_turns(record: Record, tokenizer: Any, template: str) -> list[int]:
    """The trained assistant turns of a chat record whose text already ends with the template's
    end-of-turn marker (`end_of_turn`; "a b<|im_end|>": TRL users append the eos themselves)."""
    if record.messages is None:
        return []
    marker = end_of_turn(tokenizer, template)
    return [i for i in trained_turns(record.messages, record.prompt_turns, record.untrained)
            if marker and record.messages[i]["content"].rstrip().endswith(marker)]


def strip_end_of_turn(record: Record, tokenizer: Any, template: str) -> Record:
    """`record` with one end-of-turn marker cut from the end of each of its `doubled_turns`: the
    template writes one after every answer, so the model would learn to say it twice. Context
    turns are left as they are."""
    doubled = doubled_turns(record, tokenizer, template)
    if not doubled:
        return record
    cut = len(end_of_turn(tokenizer, template))
    messages = [{**m, "content": m["content"].rstrip()[:-cut]} if i in doubled else m
                for i, m in enumerate(record.messages)]
    return dataclasses.replace(record, messages=messages)


def end_of_turn(tokenizer: Any, template: str) -> str:
    """What `template` writes right after an assistant turn's content, surrounding whitespace
    dropped: ChatML's `<|im_end|>`, Llama 3's `<|eot_id|>`, Alpaca's eos. Found on the span
    `assistant_spans` gives a probe answer followed by another user turn (so what a template
    writes after the last turn only, Phi-3's eos, is not part of it); "" when the template
    writes nothing there or cannot render the probe."""
    key = (id(tokenizer), template, "end")
    if key in _MARKERS and _MARKERS[key][0] is tokenizer:
        return _MARKERS[key][1]
    probe = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE},
             {"role": "user", "content": _PROBE}]
    try:
        text, spans = assistant_spans(probe, tokenizer, template, "<probe>")
        answer = text[spans[0][0] : spans[0][1]]
        marker = answer[answer.index(_PROBE) + 1 :].strip() if _PROBE in answer else ""
    except DataError:
        marker = ""
    _remember(key, tokenizer, marker)
    return marker


def assistant_spans(
    messages: list[dict[str, Any]], tokenizer: Any, template: str, source: str = "<memory>", first: int = 0, *,
    tools: list[dict[str, Any]] | None = None, untrained: tuple[int, ...] = (),
) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` (with `tools`, checked by `render`); return the text and the [start, end)
    character span of every assistant turn from message `first` on, but those in `untrained`
    (what the template writes for the turn: content, tool calls, reasoning, end-of-turn marker;
    trailing whitespace dropped); the other assistant turns are context.

    An earlier turn's span ends where the render through it and the whole render stop
    agreeing: a template may write something after the last turn only (Phi-3's eos), which
    belongs to no earlier turn; the turn's own content must lie before that point."""
    full = render(tokenizer, template, messages, False, source, tools)
    spans = []
    for i in trained_turns(messages, first, untrained):
        message = messages[i]
        prompt = _render(tokenizer, template, messages[:i], True, source, tools)
        # The last turn's "through" render is the full render: skip a third of the work
        # for the common single-answer conversation.
        last = i == len(messages) - 1
        through = full if last else _render(tokenizer, template, messages[: i + 1], False, source, tools)
        stable = full.startswith(through)
        answer = through[len(prompt) : len(through) if stable else _agreeing_end(tokenizer, through, full)].rstrip()
        if not (through.startswith(prompt) and full.startswith(prompt)
                and (stable or message["content"].strip() in answer)):
            raise DataError(
                f"{source}: the chat template is not prefix-stable at message {i} (rendering the "
                "earlier turns plus the generation prompt is not a prefix of the whole "
                "conversation), so the assistant tokens cannot be located; "
                "set data.template: chatml (or alpaca)"
            )
        spans.append((len(prompt), len(prompt) + len(answer)))
    return full, spans


def _agreeing_end(tokenizer: Any, through: str, full: str) -> int:
    """Where the tokens of `through` and of `full` stop agreeing, as a character offset: on
    tokens, not characters, so a marker that only begins alike (Phi-3's <|endoftext|> and
    <|user|>) is no part of the earlier turn. 0 for a slow tokenizer (no offsets)."""
    if not getattr(tokenizer, "is_fast", False):
        return 0
    a, b = (tokenizer(text, add_special_tokens=False, return_offsets_mapping=True) for text in (through, full))
    end = 0
    for id_a, id_b, span_a, span_b in zip(a["input_ids"], b["input_ids"], a["offset_mapping"], b["offset_mapping"]):
        if id_a != id_b or tuple(span_a) != tuple(span_b):
            break
        end = span_a[1]
    return end


_PROBE = "\x00"  # a message content no template writes itself
_MARKERS: dict[tuple[int, str, str], tuple[Any, Any]] = {}  # (id(tokenizer), template, what) -> (tokenizer, markers)


def role_markers(tokenizer: Any, template: str) -> tuple[str, ...]:
    """The markers `template` writes around a turn, which no plain prompt text holds: the
    tokenizer's special tokens it writes (`<|im_start|>`, `<|start_header_id|>`, BOS), found by
    rendering a probe turn, plus the opening words of the built-in templates (their markers are
    plain text under a tokenizer without ChatML's special tokens)."""
    key = (id(tokenizer), template, "roles")
    if key in _MARKERS and _MARKERS[key][0] is tokenizer:
        return _MARKERS[key][1]
    try:
        around = _render(tokenizer, template, [{"role": "user", "content": _PROBE}], True, "<probe>")
    except DataError:  # a template that wants more than one user turn: its rows will say so
        around = ""
    specials = _special_tokens(tokenizer)
    builtin = {CHATML: ("<|im_start|>",), ALPACA: ("### Instruction:\n", "### Response:\n")}.get(
        _plain_builtin(template), ())
    markers = tuple(dict.fromkeys([*builtin, *sorted(t for t in specials if t and t in around)]))
    _remember(key, tokenizer, markers)
    return markers


def _remember(key: tuple[int, str, str], tokenizer: Any, value: Any) -> None:
    if len(_MARKERS) > 16:  # a few tokenizers per process; never a leak
        _MARKERS.clear()
    _MARKERS[key] = (tokenizer, value)


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


def _special_tokens(tokenizer: Any) -> set[str]:
    """The tokenizer's special tokens: the named ones and every added token marked special."""
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    return specials | {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}


def written_tokens(tokenizer: Any, template: str) -> set[str]:
    """The tokenizer's special tokens that `template` writes in a conversation (its markers,
    BOS, the end-of-turn marker, anything it writes after the last turn), found by rendering a
    probe exchange, with a system turn when the template takes one."""
    specials = _special_tokens(tokenizer)
    turns = [{"role": "user", "content": _PROBE}, {"role": "assistant", "content": _PROBE}]
    texts = []
    for messages, generation_prompt in (([{"role": "system", "content": _PROBE}, *turns], False),
                                        (turns, False), (turns[:1], True)):
        try:
            texts.append(_render(tokenizer, template, messages, generation_prompt, "<probe>"))
        except DataError:
            continue
    return {t for t in specials if t and any(t in text for text in texts)}


def has_system_role(tokenizer: Any, template: str) -> bool:
    """False when `template` refuses a system turn that it renders a conversation without
    (Gemma's and Mistral's raise on one)."""
    user = [{"role": "user", "content": _PROBE}]
    try:
        _render(tokenizer, template, [{"role": "system", "content": _PROBE}, *user], True, "<probe>")
        return True
    except DataError:
        pass
    try:
        _render(tokenizer, template, user, True, "<probe>")
    except DataError:
        return True  # it fails without a system turn too: the system turn is not what it refuses
    return False


def fold_system(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """A leading system turn folded into the first user turn ("system text, blank line, user
    text"), as Llama-2's template does itself: how to send instructions to a model whose
    template has no system role. Other conversations come back as they are."""
    if len(messages) < 2 or messages[0].get("role") != "system" or messages[1].get("role") != "user":
        return messages
    user = {**messages[1], "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [user, *messages[2:]]


def render(tokenizer: Any, template: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
           source: str = "<memory>", tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation rendered with the chat template, given the row's `tools`. A row that carries
    something the template does not render — its tools, an assistant turn's tool calls or
    reasoning, tool turns, the `name` of a turn other than a tool's: rendering without it gives
    the same text — is refused naming it
    (DataError), never trained or asked without it. Plain conversations render once."""
    text = _render(tokenizer, template, messages, add_generation_prompt, source, tools)
    for name, (fewer, fewer_tools) in _carried(messages, tools):
        try:
            without = _render(tokenizer, template, fewer, add_generation_prompt, source, fewer_tools)
        except DataError:
            continue  # the template cannot do without it: it reads it
        if without == text:
            raise DataError(
                f"{source}: the chat template does not render {name} (the conversation renders the same without "
                "them), so the model would never see them; use a model whose chat template renders them "
                "(data.template: tokenizer), or leave them out of the data"
            )
    return text


def _carried(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None):
    """(name, (messages, tools) without it) for each thing beyond plain turns the conversation carries."""
    if tools is not None:
        yield "the row's 'tools'", (messages, None)
    for key in ("tool_calls", "reasoning_content"):
        if any(key in m for m in messages):
            yield f"the assistant turns' {key!r}", ([{k: v for k, v in m.items() if k != key} for m in messages], tools)
    if any(m["role"] == "tool" for m in messages):
        yield "the 'tool' turns", ([m for m in messages if m["role"] != "tool"], tools)
    # a tool turn's name repeats the function its call names, which the template writes with the call
    if any("name" in m for m in messages if m["role"] != "tool"):
        yield "the turns' 'name'", ([{k: v for k, v in m.items() if k != "name" or m["role"] == "tool"}
                                     for m in messages], tools)


def _render(tokenizer: Any, template: str, messages: list, add_generation_prompt: bool, source: str,
            tools: list[dict[str, Any]] | None = None) -> str:
    import jinja2  # a dependency of transformers; imported here to keep imports cheap

    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools
        )
    except (jinja2.TemplateError, ValueError, TypeError, KeyError, IndexError) as err:
        raise DataError(
            f"{source}: the chat template failed on this conversation ({type(err).__name__}: {err}); "
            "check the roles and their order, or use the chatml template (data.template: chatml; --template chatml)"
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
    cuts = _straddled_starts(starts, offsets, spans)
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


def _straddled_starts(starts: list[int], offsets: list, spans: list[tuple[int, int]]) -> list[int]:
    """The span starts some token straddles (starts before, ends after), in the spans' order.
    Tokens and spans are both in text order, so one merge pass finds them: O(tokens + spans),
    where a scan of every token per span made a long conversation quadratic."""
    cuts, k = [], 0
    for lo, _ in spans:
        while k < len(offsets) and offsets[k][1] <= lo:  # ends by lo: straddles no later start either
            k += 1
        if k < len(offsets) and starts[k] < lo:  # the first token ending past lo starts earliest
            cuts.append(lo)
    return cuts


def _labels_from_spans(input_ids: list[int], offsets: list, spans: list[tuple[int, int]],
                       starts: list[int] | None = None) -> list[int]:
    """A token is labelled when it starts inside a span (its true start, see `_true_starts`).
    One merge pass over the tokens and the spans, both in text order (overlapping spans joined)."""
    merged: list[list[int]] = []
    for lo, hi in sorted(span for span in spans if span[0] < span[1]):
        if merged and lo <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    labels, k = [IGNORE_INDEX] * len(input_ids), 0
    for i, (token_id, true_start) in enumerate(zip(input_ids, starts or _true_starts(offsets))):
        while k < len(merged) and merged[k][1] <= true_start:
            k += 1
        if k < len(merged) and merged[k][0] <= true_start:
            labels[i] = token_id
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
