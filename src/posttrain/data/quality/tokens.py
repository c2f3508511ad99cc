"""Template and label-mask checks: render every row as training would, and count what goes
wrong before a run does.

The silent failures this catches (ANCHORS: "chat-template / loss-mask mismatches that silently
train on nothing or on the wrong tokens"): rows the chat template cannot render, rows with no
token to train on, rows longer than max_length and those whose every label token lies past it
(truncation would leave nothing to learn). Each count comes with the first rows' file:line.
"""

from __future__ import annotations

from collections.abc import Sequence

from posttrain.data.quality.stats import percentiles
from posttrain.data.records import Example
from posttrain.errors import DataError

_FIRST = 5  # locations listed per problem


def encode_row(row, tokenizer, template: str) -> list[Example]:
    """The token sequences training would build from a row: one for an SFT row, one per
    response for a preference row. Raises DataError when the template cannot render it."""
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import encode_record

    if isinstance(row.record, PreferenceRecord):
        return encode_preference(row.record, tokenizer, template).sequences
    return [encode_record(row.record, tokenizer, template)]


def encode_trained(row, tokenizer, template: str) -> list[Example]:
    """The sequences that carry the row's trained response (`rows.texts`), as training renders and
    labels them: an SFT row's one sequence (every assistant turn labelled; a text row every
    token); a preference row's chosen response (a ranking's best, each one tied best; a
    desirable KTO completion), none for an undesirable KTO row. Raises DataError like encode_row."""
    from posttrain.data.preferences import PreferenceRecord, encode_response
    from posttrain.data.quality.rows import trained_responses

    record = row.record
    if isinstance(record, PreferenceRecord):
        return [encode_response(record.prompt, record.responses[i], tokenizer, template, record.source,
                                tools=record.tools) for i in trained_responses(record)]
    return encode_row(row, tokenizer, template)


def check_tokens(rows: Sequence, tokenizer, template: str, max_length: int) -> dict:
    """Counts and first locations of each problem, the token length distribution and the share of
    tokens that carry loss (None, like the lengths, when no row rendered: no tokens to count)."""
    problems: dict[str, list[str]] = {"unrenderable": [], "no_label_tokens": [], "over_max_length": [],
                                      "labels_past_max_length": []}
    lengths: list[int] = []
    label_tokens = total_tokens = 0
    for row in rows:
        try:
            sequences = encode_row(row, tokenizer, template)
        except DataError as exc:
            problems["unrenderable"].append(str(exc) if row.source in str(exc) else f"{row.source}: {exc}")
            continue
        for example in sequences:
            lengths.append(len(example))
            total_tokens += len(example)
            label_tokens += example.num_label_tokens
        if any(e.num_label_tokens == 0 for e in sequences):
            problems["no_label_tokens"].append(row.source)
        if any(len(e) > max_length for e in sequences):
            problems["over_max_length"].append(row.source)
            if any(e.num_label_tokens and Example(e.input_ids[:max_length], e.labels[:max_length]).num_label_tokens == 0
                   for e in sequences):
                problems["labels_past_max_length"].append(row.source)
    report = {name: len(where) for name, where in problems.items()}
    report["first"] = {name: where[:_FIRST] for name, where in problems.items() if where}
    report.update(max_length=max_length, sequence_tokens=percentiles(lengths),
                  label_token_share=round(label_tokens / total_tokens, 4) if total_tokens else None)
    return report
