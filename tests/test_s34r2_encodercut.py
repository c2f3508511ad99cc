"""One cut for an over-long sequence (stop 34): training (`fit_preference_length`) and an encoder
reward model's scoring cut an encoder row as [CLS] + its first content tokens + its closing [SEP]
(`preferences.cut`); a decoder's training cut keeps the first max_length tokens as before. And a
preference sequence renders only its response turn for the label spans (multi-turn context turns are
not rendered turn by turn), with the same tokens and labels as before."""

from __future__ import annotations

import pytest

from posttrain.data.preferences import (
    PreferenceExample,
    cut,
    encode_preference,
    encode_response,
    fit_preference_length,
    response_record,
    to_preference_record,
)
from posttrain.data.records import IGNORE_INDEX, Example

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def tokenizer():
    from posttrain.models.presets import build_tokenizer

    return build_tokenizer()


def test_cut_keeps_the_closing_tokens_and_loses_content():
    ids = [CLS, 1, 2, 3, 4, 5, SEP]
    assert cut(ids, 5, closing=1) == [CLS, 1, 2, 3, SEP]
    assert cut(ids, 5) == [CLS, 1, 2, 3, 4]  # a decoder's: the first max_length, as before
    assert cut(ids, 7, closing=1) == ids and cut(ids, 9, closing=1) == ids  # fits: whole, never doubled
    assert cut(ids, 2, closing=1) == [CLS, 1]  # no room for content beside [SEP]: the plain cut
    assert cut([CLS, 1, 2, 3, 4, SEP, SEP], 5, closing=2) == [CLS, 1, 2, SEP, SEP]


def _encoder_seq(n_prompt: int, answer: list[int]) -> Example:
    """[CLS] prompt answer [SEP], labelled on the answer."""
    ids = [CLS, *range(1, n_prompt + 1), *answer, SEP]
    return Example(ids, [IGNORE_INDEX] * (1 + n_prompt) + answer + [IGNORE_INDEX], "f")


def test_training_cuts_an_encoder_sequence_keeping_its_sep_and_its_labels_in_step():
    sequences = [_encoder_seq(2, [3, 4, 5, 6]), _encoder_seq(2, [7, 8, 9])]
    example = PreferenceExample(sequences, [0, 1], None, None, "a", closing=1)
    (kept,), report = fit_preference_length([example], 6)
    chosen, rejected = kept.sequences
    assert chosen.input_ids == [CLS, 1, 2, 3, 4, SEP] and chosen.labels == [IGNORE_INDEX] * 3 + [3, 4, IGNORE_INDEX]
    assert rejected.input_ids == [CLS, 1, 2, 7, 8, SEP] and rejected.labels == [IGNORE_INDEX] * 3 + [7, 8, IGNORE_INDEX]
    assert report["truncated_sequences"] == 2
    assert kept.closing == 1


def test_a_decoder_sequence_keeps_its_start_as_before():
    ids = list(range(1, 9))
    seq = Example(ids, [IGNORE_INDEX] * 3 + ids[3:], "f")
    (kept,), _ = fit_preference_length([PreferenceExample([seq], None, True, None, "a")], 5)
    assert kept.sequences[0].input_ids == [1, 2, 3, 4, 5] and kept.closing == 0


def test_encode_preference_records_the_closing_tokens_of_an_encoder_only(tokenizer):
    record = to_preference_record({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairs")
    assert encode_preference(record, tokenizer, "chatml").closing == 0


def test_a_multi_turn_row_labels_its_response_turn_as_rendering_every_turn_did(tokenizer):
    from posttrain.data.templates import assistant_spans, resolve_template, tokenize_with_labels

    template = resolve_template(tokenizer, "auto")
    prompt = []
    for i in range(5):
        prompt += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
    prompt.append({"role": "user", "content": "last"})
    example = encode_response(prompt, "reply", tokenizer, template)
    text, spans = assistant_spans(response_record(prompt, "reply").messages, tokenizer, template)  # every turn
    assert len(spans) == 6
    ids, labels = tokenize_with_labels(tokenizer, text, spans[-1:])
    assert (example.input_ids, example.labels) == (ids, labels)
