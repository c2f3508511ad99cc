"""Chat templates, assistant-only label masks, the length policy and the empty-mask guard."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.data.templates import (
    ALPACA,
    CHATML,
    LengthReport,
    check_label_mask,
    encode_record,
    fit_length,
    resolve_template,
)
from posttrain.errors import ConfigError, DataError

SENTENCES = [
    "You are a helpful assistant that answers briefly.",
    "What is the capital of France? The capital of France is Paris.",
    "Name two primary colours. Red and blue are primary colours.",
    "And one more? Yellow is the third one.",
    "### Instruction:\nSay hello.\n\n### Response:\nHello!",
    "The quick brown fox jumps over the lazy dog, 42 times.",
]

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant that answers briefly."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "Name two primary colours."},
    {"role": "assistant", "content": "Red and blue.\nBoth are primary."},
    {"role": "user", "content": "And one more?"},
    {"role": "assistant", "content": " Yellow, of course  "},  # leading/trailing spaces on purpose
]


def _tiny_tokenizer(chat_template: str | None = None, trim_offsets: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained offline in milliseconds. trim_offsets=True is GPT-2's
    setting, the harder case for offset-based masks."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(SENTENCES * 5, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|pad|>")
    if chat_template is not None:
        wrapped.chat_template = chat_template
    return wrapped


@pytest.fixture(scope="module")
def tokenizer():
    return _tiny_tokenizer()


def _labelled_runs(example: Example) -> list[list[int]]:
    """Contiguous runs of labelled tokens."""
    runs, current = [], []
    for label in example.labels:
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(label)
    if current:
        runs.append(current)
    return runs


def _assistant_texts(messages):
    return [m["content"] for m in messages if m["role"] == "assistant"]


@pytest.mark.parametrize("template, marker", [(CHATML, "<|im_end|>"), (ALPACA, "<|im_end|>")])
@pytest.mark.parametrize("trim_offsets", [True, False])
def test_every_assistant_turn_is_labelled_exactly(template, marker, trim_offsets):
    tokenizer = _tiny_tokenizer(trim_offsets=trim_offsets)
    example = encode_record(Record(messages=CONVERSATION, source="t.jsonl:1"), tokenizer, template)
    assert all(label in (IGNORE_INDEX, token) for label, token in zip(example.labels, example.input_ids))
    decoded = [tokenizer.decode(run) for run in _labelled_runs(example)]
    expected = _assistant_texts(CONVERSATION)
    assert len(decoded) == len(expected)
    for text, content in zip(decoded, expected):
        assert text.endswith(marker)
        assert text[: -len(marker)] == content


@pytest.mark.parametrize("template", [CHATML, ALPACA])
def test_no_system_or_user_token_is_labelled(tokenizer, template):
    example = encode_record(Record(messages=CONVERSATION), tokenizer, template)
    unlabelled = tokenizer.decode([t for t, label in zip(example.input_ids, example.labels) if label == IGNORE_INDEX])
    for message in CONVERSATION:
        if message["role"] != "assistant":
            assert message["content"] in unlabelled
    labelled = tokenizer.decode([label for label in example.labels if label != IGNORE_INDEX])
    assert "France?" not in labelled and "helpful" not in labelled
    assert example.num_label_tokens == sum(len(run) for run in _labelled_runs(example))


def test_renders_as_documented(tokenizer):
    messages = CONVERSATION[:3]
    chatml = tokenizer.apply_chat_template(messages, chat_template=CHATML, tokenize=False, add_generation_prompt=False)
    assert chatml == (
        "<|im_start|>system\nYou are a helpful assistant that answers briefly.<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nThe capital of France is Paris.<|im_end|>\n"
    )
    prompt = tokenizer.apply_chat_template(messages[:2], chat_template=CHATML, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    alpaca = tokenizer.apply_chat_template(messages, chat_template=ALPACA, tokenize=False, add_generation_prompt=False)
    assert alpaca == (
        "You are a helpful assistant that answers briefly.\n\n"
        "### Instruction:\nWhat is the capital of France?\n\n"
        "### Response:\nThe capital of France is Paris.<|im_end|>\n\n"
    )
    alpaca_prompt = tokenizer.apply_chat_template(messages[1:2], chat_template=ALPACA, tokenize=False, add_generation_prompt=True)
    assert alpaca_prompt == "### Instruction:\nWhat is the capital of France?\n\n### Response:\n"


# A template with a space between the role tag and the answer: with trim_offsets=True the
# lone " " token appears to start at the answer's first character unless handled.
SPACED = (
    "{%- for m in messages -%}{{- m['role'] | upper + ': ' + m['content'] -}}"
    "{%- if m['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
)


def test_tokenizers_own_template_is_used_when_set():
    tokenizer = _tiny_tokenizer(chat_template=SPACED)
    assert resolve_template(tokenizer, "auto") == SPACED
    assert resolve_template(tokenizer, "tokenizer") == SPACED
    messages = [{"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"}]
    example = encode_record(Record(messages=messages), tokenizer, resolve_template(tokenizer, "auto"))
    assert tokenizer.decode(example.input_ids) == "USER: Say hello.\nASSISTANT: Hello!<|im_end|>\n"
    assert [tokenizer.decode(run) for run in _labelled_runs(example)] == ["Hello!<|im_end|>"]


def test_resolve_template_without_tokenizer_template(tokenizer):
    assert tokenizer.chat_template is None
    assert resolve_template(tokenizer, "auto") == CHATML
    assert resolve_template(tokenizer, "chatml") == CHATML
    assert resolve_template(tokenizer, "alpaca") == ALPACA
    with pytest.raises(DataError, match="data.template: chatml"):
        resolve_template(tokenizer, "tokenizer")
    with pytest.raises(ConfigError, match="alpaca"):
        resolve_template(tokenizer, "vicuna")


def test_chatml_works_without_its_special_tokens():
    """Markers are then ordinary text; the spans are found on characters, so still exact."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(SENTENCES, trainer)
    plain = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>")
    example = encode_record(Record(messages=CONVERSATION), plain, CHATML)
    decoded = [plain.decode(run) for run in _labelled_runs(example)]
    assert decoded == [content + "<|im_end|>" for content in _assistant_texts(CONVERSATION)]


def test_text_record_trains_on_everything_and_ends_with_eos(tokenizer):
    example = encode_record(Record(text="The quick brown fox."), tokenizer, CHATML)
    assert example.input_ids[-1] == tokenizer.eos_token_id
    assert example.labels == example.input_ids
    assert tokenizer.decode(example.input_ids) == "The quick brown fox.<|im_end|>"


def test_prompt_only_record_comes_back_detectably_empty(tokenizer):
    example = encode_record(Record(messages=[{"role": "user", "content": "Hi?"}]), tokenizer, CHATML)
    assert len(example) > 0 and example.num_label_tokens == 0


def test_prefix_unstable_template_is_refused(tokenizer):
    # Renders only the final assistant turn's content differently from earlier ones.
    unstable = (
        "{%- for m in messages -%}{{- m['role'] + ':' + (m['content'] if loop.last else 'x') + '\n' -}}"
        "{%- endfor -%}{%- if add_generation_prompt -%}assistant:{%- endif -%}"
    )
    record = Record(messages=CONVERSATION[1:5], source="data.jsonl:7")
    with pytest.raises(DataError, match=r"data.jsonl:7.*not prefix-stable"):
        encode_record(record, tokenizer, unstable)


def test_bad_records_name_their_source(tokenizer):
    with pytest.raises(DataError, match="d.jsonl:3"):
        encode_record(Record(source="d.jsonl:3"), tokenizer, CHATML)
    with pytest.raises(DataError, match="d.jsonl:4: message 0"):
        encode_record(Record(messages=[{"role": "user", "content": None}], source="d.jsonl:4"), tokenizer, CHATML)


def test_slow_tokenizer_is_refused_clearly(tokenizer):
    class Slow:
        is_fast = False

    with pytest.raises(DataError, match="fast tokenizer"):
        encode_record(Record(messages=CONVERSATION), Slow(), CHATML)


def _example(prompt_len: int, answer_len: int, source: str = "x") -> Example:
    ids = list(range(1, prompt_len + answer_len + 1))
    return Example(input_ids=ids, labels=[IGNORE_INDEX] * prompt_len + ids[prompt_len:], source=source)


def test_fit_length_truncates_and_reports():
    examples = [_example(2, 3), _example(4, 6), _example(9, 3), _example(1, 1)]
    kept, report = fit_length(examples, max_length=8, policy="truncate")
    assert [len(e) for e in kept] == [5, 8, 2]
    assert kept[1].input_ids == list(range(1, 9)) and kept[1].labels[:4] == [IGNORE_INDEX] * 4
    assert (report.num_too_long, report.num_lost_labels) == (2, 1)
    assert report.summary() == (
        "2 of 4 examples longer than 8 tokens: truncated; 1 lost every label token and were dropped"
    )


def test_fit_length_drop_and_nothing_to_do():
    examples = [_example(2, 3), _example(4, 6)]
    kept, report = fit_length(examples, max_length=8, policy="drop")
    assert kept == examples[:1]
    assert report.summary() == "1 of 2 examples longer than 8 tokens: dropped"
    kept, report = fit_length(examples, max_length=100, policy="truncate")
    assert kept == examples and report == LengthReport(2, 100, "truncate")
    assert report.summary() == "0 of 2 examples longer than 100 tokens"
    with pytest.raises(ConfigError):
        fit_length(examples, max_length=8, policy="wrap")


def test_check_label_mask_catches_training_on_nothing():
    assert check_label_mask([_example(2, 3), _example(3, 0)]) == 1
    with pytest.raises(DataError, match="learn nothing"):
        check_label_mask([_example(3, 0), _example(5, 0)])
    with pytest.raises(DataError):
        check_label_mask([])
