"""Review tests: chat templates, assistant-only label masks, RL prompts, truncation.

Every expectation is independent of posttrain's character-span method: token ids and the
assistant mask come from transformers' own `apply_chat_template(..., tokenize=True,
return_assistant_tokens_mask=True)` on `{% generation %}`-tagged copies of hand-written
templates (ChatML, Llama-3, Zephyr, Mistral [INST], Gemma, a default-system template); the
product gets the same templates with the tags removed (the tags do not change the text).
Other expectations are the README / docstring contract, written out by hand.
"""

from __future__ import annotations

import json

import pytest

from posttrain.data.records import IGNORE_INDEX, Record
from posttrain.errors import DataError

G0, G1 = "{%- generation -%}", "{%- endgeneration -%}"


def _untagged(template: str) -> str:
    return template.replace(G0, "").replace(G1, "")


def _fresh_tiny(bos: bool = False, extra: tuple[str, ...] = ()):
    """The tiny preset tokenizer, loaded fresh (stages mutate chat_template), optionally with a
    BOS token and extra special tokens (template markers)."""
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    if extra:
        tok.add_tokens(list(extra), special_tokens=True)
    if bos:
        tok.add_special_tokens({"bos_token": "<|endoftext|>"})
    return tok


def _reference(tok, template: str, messages):
    """(ids, labels) from transformers' {% generation %} mask."""
    out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids = list(out["input_ids"])
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, out["assistant_masks"])]


def _runs(labels):
    runs, cur = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if cur:
                runs.append(cur)
            cur = []
        else:
            cur.append(label)
    if cur:
        runs.append(cur)
    return runs


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _quiet(*_a, **_k):
    pass


# --------------------------------------------------------------------------- hand-written templates

LLAMA3 = (
    "{{- bos_token -}}{%- for m in messages -%}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] | trim + '<|eot_id|>' -}}" + G1 +
    "{%- else -%}{{- m['content'] | trim + '<|eot_id|>' -}}{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}"
)
ZEPHYR = (  # every turn, user and system included, ends with eos: only the assistant's is trained
    "{%- for m in messages -%}{{- '<|' + m['role'] + '|>\n' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] + eos_token -}}" + G1 +
    "{%- else -%}{{- m['content'] + eos_token -}}{%- endif -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|assistant|>\n' -}}{%- endif -%}"
)
MISTRAL = (  # no generation prompt at all; no system role
    "{{- bos_token -}}{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}{{- '[INST] ' + m['content'] + ' [/INST]' -}}"
    "{%- elif m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] + eos_token -}}" + G1 +
    "{%- else -%}{{- raise_exception('Only user and assistant roles are supported!') -}}{%- endif -%}"
    "{%- endfor -%}"
)
GEMMA = (  # no system role: it raises, as Gemma's own template does
    "{{- bos_token -}}{%- if messages[0]['role'] == 'system' -%}{{- raise_exception('System role not supported') -}}"
    "{%- endif -%}{%- for m in messages -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] | trim + '<end_of_turn>' -}}" + G1 +
    "{%- else -%}{{- m['content'] | trim + '<end_of_turn>' -}}{%- endif -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
GEMMA3 = (  # Gemma-3 style: a system message is folded into the first user turn
    "{{- bos_token -}}{%- if messages[0]['role'] == 'system' -%}{%- set first = messages[0]['content'] + '\n\n' -%}"
    "{%- set rest = messages[1:] -%}{%- else -%}{%- set first = '' -%}{%- set rest = messages -%}{%- endif -%}"
    "{%- for m in rest -%}{%- set role = 'model' if m['role'] == 'assistant' else m['role'] -%}"
    "{{- '<start_of_turn>' + role + '\n' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] | trim + '<end_of_turn>' -}}" + G1 +
    "{%- else -%}{{- (first if loop.first else '') + m['content'] | trim + '<end_of_turn>' -}}{%- endif -%}"
    "{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\n' -}}{%- endif -%}"
)
DEFAULT_SYSTEM = (  # Qwen-2.5 style: a default system turn when the conversation has none
    "{%- if messages[0]['role'] != 'system' -%}{{- '<|im_start|>system\nYou are a default helper.<|im_end|>\n' -}}"
    "{%- endif -%}{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] + '<|im_end|>' -}}" + G1 +
    "{%- else -%}{{- m['content'] + '<|im_end|>' -}}{%- endif -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
CHATML_G = (  # the built-in CHATML's layout, tagged
    "{%- for m in messages -%}{{- '<|im_start|>' + m['role'] + '\n' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] + '<|im_end|>' -}}" + G1 +
    "{%- else -%}{{- m['content'] + '<|im_end|>' -}}{%- endif -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}"
)
ALPACA_G = (  # the built-in ALPACA's documented layout, tagged
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{- m['content'] + '\n\n' -}}"
    "{%- elif m['role'] == 'user' -%}{{- '### Instruction:\n' + m['content'] + '\n\n' -}}"
    "{%- else -%}{{- '### Response:\n' -}}" + G0 + "{{- m['content'] + eos_token -}}" + G1 + "{{- '\n\n' -}}"
    "{%- endif -%}{%- endfor -%}{%- if add_generation_prompt -%}{{- '### Response:\n' -}}{%- endif -%}"
)

# name -> (tagged template, extra special tokens, bos?, supports a system turn?, end-of-turn marker)
TEMPLATES = {
    "chatml": (CHATML_G, (), False, True, "<|im_end|>"),
    "alpaca": (ALPACA_G, (), False, True, "<|im_end|>"),
    "llama3": (LLAMA3, ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), True, True, "<|eot_id|>"),
    "zephyr": (ZEPHYR, (), False, True, "<|im_end|>"),
    "mistral": (MISTRAL, (), True, False, "<|im_end|>"),
    "gemma": (GEMMA, ("<start_of_turn>", "<end_of_turn>"), True, False, "<end_of_turn>"),
    "gemma3": (GEMMA3, ("<start_of_turn>", "<end_of_turn>"), True, True, "<end_of_turn>"),
    "default_system": (DEFAULT_SYSTEM, (), False, True, "<|im_end|>"),
}

CONVS = [
    [{"role": "system", "content": "Be brief and exact."},
     {"role": "user", "content": "Copy: a b c"},
     {"role": "assistant", "content": "a b c"},
     {"role": "user", "content": "Reverse: d e"},
     {"role": "assistant", "content": "e d"},
     {"role": "user", "content": "Smallest of 7 3 9?"},
     {"role": "assistant", "content": "3"}],
    [{"role": "user", "content": "what is the cat"},
     {"role": "assistant", "content": "the cat is here"}],
    [{"role": "user", "content": "same"},
     {"role": "assistant", "content": "same"},
     {"role": "user", "content": "same"},
     {"role": "assistant", "content": "same"}],
    [{"role": "user", "content": " padded question \n"},
     {"role": "assistant", "content": "first answer"},
     {"role": "user", "content": "more"},
     {"role": "assistant", "content": " spaced answer  "}],
]


def _cases():
    for name, (_tpl, _extra, _bos, system_ok, _m) in TEMPLATES.items():
        for k, conv in enumerate(CONVS):
            if conv[0]["role"] == "system" and not system_ok:
                continue
            yield pytest.param(name, k, id=f"{name}-{k}")


@pytest.fixture(scope="module")
def tokenizers():
    return {name: _fresh_tiny(bos=bos, extra=extra) for name, (_t, extra, bos, _s, _m) in TEMPLATES.items()}


@pytest.mark.parametrize("name, k", list(_cases()))
def test_ids_and_labels_equal_transformers_generation_mask(tokenizers, name, k):
    """Token ids equal the tokenizer's own rendering; exactly the assistant turns (content +
    end-of-turn marker) are labelled; one BOS at most, only where the template writes it."""
    from posttrain.data.templates import encode_record

    tagged, _extra, bos, _s, marker = TEMPLATES[name]
    tok, messages = tokenizers[name], CONVS[k]
    ids, labels = _reference(tok, tagged, messages)
    ex = encode_record(Record(messages=messages, source="t:1"), tok, _untagged(tagged))
    assert ex.input_ids == ids
    assert ex.labels == labels
    trims = "| trim" in tagged
    decoded = [tok.decode(r) for r in _runs(ex.labels)]
    assert decoded == [(m["content"].strip() if trims else m["content"]) + marker
                       for m in messages if m["role"] == "assistant"]
    if bos:
        assert ex.input_ids.count(tok.bos_token_id) == 1 and ex.input_ids[0] == tok.bos_token_id
    if name == "zephyr":  # eos closes user/system turns too: those eos tokens stay unlabelled
        eos = [i for i, t in enumerate(ex.input_ids) if t == tok.eos_token_id]
        assert len(eos) == len(messages)
        assert sum(ex.labels[i] != IGNORE_INDEX for i in eos) == sum(m["role"] == "assistant" for m in messages)


@pytest.mark.parametrize("name, k", list(_cases()))
def test_rl_prompt_is_a_token_prefix_of_the_training_rendering(tokenizers, name, k):
    """encode_prompts (RL / generation) on the turns before the last answer gives a token prefix
    of the SFT example, ending exactly where that answer's labels begin."""
    from posttrain.data.prompts import PromptRecord, encode_prompts
    from posttrain.data.templates import encode_record

    tagged = TEMPLATES[name][0]
    tok, messages = tokenizers[name], CONVS[k]
    template = _untagged(tagged)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    (prompt_ids,), _ = encode_prompts([PromptRecord(messages[:last])], tok, template, 10_000, log=_quiet)
    ex = encode_record(Record(messages=messages), tok, template)
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert ex.labels[len(prompt_ids)] != IGNORE_INDEX and ex.labels[len(prompt_ids) - 1] == IGNORE_INDEX


def test_default_system_turn_of_the_template_is_never_labelled(tokenizers):
    from posttrain.data.templates import encode_record

    tok = tokenizers["default_system"]
    messages = CONVS[1]
    ex = encode_record(Record(messages=messages), tok, _untagged(DEFAULT_SYSTEM))
    text = tok.decode(ex.input_ids)
    assert text.startswith("<|im_start|>system\nYou are a default helper.<|im_end|>\n")
    labelled = tok.decode([label for label in ex.labels if label != IGNORE_INDEX])
    assert labelled == "the cat is here<|im_end|>"


def test_gemma3_folds_system_into_the_first_user_turn_unlabelled(tokenizers):
    from posttrain.data.templates import encode_record

    tok = tokenizers["gemma3"]
    ex = encode_record(Record(messages=CONVS[0]), tok, _untagged(GEMMA3))
    unlabelled = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    assert "Be brief and exact.\n\nCopy: a b c" in unlabelled
    assert "Be brief" not in tok.decode([label for label in ex.labels if label != IGNORE_INDEX])


@pytest.mark.parametrize("name", ["gemma", "mistral"])
def test_system_turn_on_a_template_without_system_role_fails_naming_the_row(tokenizers, name):
    """No silent drop of the system text: a clear DataError with the row's location."""
    from posttrain.data.templates import encode_record

    with pytest.raises(DataError, match=r"d\.jsonl:4: the chat template failed.*(System role|Only user)"):
        encode_record(Record(messages=CONVS[0], source="d.jsonl:4"), tokenizers[name], _untagged(TEMPLATES[name][0]))


def test_text_record_with_bos_tokenizer_gets_one_bos_and_trailing_eos():
    """Plain text: the tokenizer's own special tokens (here a BOS post-processor), eos appended once."""
    from tokenizers import processors

    from posttrain.data.templates import encode_record

    tok = _fresh_tiny(bos=True, extra=TEMPLATES["llama3"][1])
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", bos)])
    plain = tok("the cat is here", add_special_tokens=False)["input_ids"]
    ex = encode_record(Record(text="the cat is here"), tok, "")
    assert ex.input_ids == [bos, *plain, tok.eos_token_id] == ex.labels
    # and a chat template that writes BOS itself gets no second one from the post-processor
    ex = encode_record(Record(messages=CONVS[1]), tok, _untagged(LLAMA3))
    assert ex.input_ids.count(bos) == 1 and ex.input_ids[0] == bos


# --------------------------------------------------------------------------- tokens straddling the prompt/answer boundary

# Llama-3's (and Qwen2's) pre-tokenizer pattern: `\s*[\r\n]+` keeps a run of newlines together.
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.fixture(scope="module")
def newline_merging_tok():
    """A byte-level BPE with Llama-3's split pattern, trained on text full of blank lines, so
    "\\n\\n" is one token (as in Llama 3, Qwen2)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    lines = ["the cat is here\n\nand the dog is there\n\n\nok", "user\n\nassistant\n\nsystem\n\n"] * 20
    raw.train_from_iterator(lines, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|im_end|>", pad_token="<|pad|>")
    assert len(tok("a\n\nb", add_special_tokens=False)["input_ids"]) == 3  # "\n\n" is one token
    return tok


NEWLINE_ANSWER = [{"role": "user", "content": "show the cat"}, {"role": "assistant", "content": "\nthe cat is here"}]


def test_answer_starting_with_newline_is_fully_labelled_under_newline_merging_tokenizer(newline_merging_tok):
    from posttrain.data.templates import CHATML, encode_record

    tok = newline_merging_tok
    ex = encode_record(Record(messages=NEWLINE_ANSWER), tok, CHATML)
    runs = [tok.decode(r) for r in _runs(ex.labels)]
    # README: the loss covers the assistant's content plus its end-of-turn marker
    assert len(runs) == 1 and runs[0].endswith("\nthe cat is here<|im_end|>")


def test_rl_prompt_prefix_under_newline_merging_tokenizer(newline_merging_tok):
    from posttrain.data.prompts import PromptRecord, encode_prompts
    from posttrain.data.templates import CHATML, encode_record

    tok = newline_merging_tok
    (prompt_ids,), _ = encode_prompts([PromptRecord(NEWLINE_ANSWER[:1])], tok, CHATML, 10_000, log=_quiet)
    ex = encode_record(Record(messages=NEWLINE_ANSWER), tok, CHATML)
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids


# A Vicuna-like layout whose generation prompt ends with a space ("ASSISTANT: ").
SPACED = (
    "{%- for m in messages -%}{{- m['role'] | upper + ': ' -}}"
    "{%- if m['role'] == 'assistant' -%}" + G0 + "{{- m['content'] + eos_token -}}" + G1 +
    "{%- else -%}{{- m['content'] -}}{%- endif -%}{{- '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
)


def test_first_answer_token_labelled_when_generation_prompt_ends_with_space():
    """" the" straddles "ASSISTANT: " and the answer. transformers' mask labels the joint token;
    posttrain cuts the text at the answer's start instead, as generation tokenises the prompt
    alone: the prompt's tokens are exactly what a model asked the prompt is given, and every
    answer character is trained."""
    from posttrain.data.prompts import PromptRecord, encode_prompts
    from posttrain.data.templates import encode_record

    tok = _fresh_tiny()
    messages = CONVS[1]
    joint_ids, joint_labels = _reference(tok, SPACED, messages)
    ex = encode_record(Record(messages=messages), tok, _untagged(SPACED))
    (prompt_ids,), _ = encode_prompts([PromptRecord(messages[:-1])], tok, _untagged(SPACED), 10_000, log=_quiet)
    assert ex.input_ids != joint_ids  # the straddling token is what this test is about
    assert ex.input_ids[: len(prompt_ids)] == prompt_ids
    assert set(ex.labels[: len(prompt_ids)]) == {IGNORE_INDEX}
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == messages[-1]["content"] + tok.eos_token
    assert tok.decode(ex.input_ids) == tok.decode(joint_ids)


# --------------------------------------------------------------------------- truncation and data_report.json


def test_truncation_multi_turn_and_eval_counts_in_data_report(tmp_path):
    """The first max_length tokens are kept (labels aligned with the reference); a row whose
    every label falls past the cut is dropped and counted, in train and in eval alike."""
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data

    tok = _fresh_tiny()
    L = 40
    rows = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]},
        {"messages": [{"role": "user", "content": "copy a b"}, {"role": "assistant", "content": "a b"},
                      {"role": "user", "content": "and now a long one"},
                      {"role": "assistant", "content": " ".join(["x y z"] * 30)}]},
        {"messages": [{"role": "system", "content": " ".join(["rule"] * 60)}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "lost"}]},
        {"messages": [{"role": "user", "content": "long answer " * 3}, {"role": "assistant", "content": "w " * 80}]},
    ]
    train = _write_jsonl(tmp_path / "t.jsonl", rows)
    ev = _write_jsonl(tmp_path / "e.jsonl", rows[:3])
    cfg = DataConfig(train_files=[train], eval_files=[ev], eval_fraction=0.0, max_length=L, template="auto")
    data = prepare_sft_data(cfg, tok, tmp_path / "run", seed=0, log=_quiet)

    ref_tok = _fresh_tiny()

    refs = [_reference(ref_tok, ref_tok.chat_template, r["messages"]) for r in rows]
    cut = [(ids[:L], labels[:L]) for ids, labels in refs]
    survives = [any(x != IGNORE_INDEX for x in labels) for _, labels in cut]
    assert survives == [True, True, False, True]
    assert [len(ids) > L for ids, _ in refs] == [False, True, True, True]
    assert [(e.input_ids, e.labels) for e in data.train] == [c for c, s in zip(cut, survives) if s]
    assert [(e.input_ids, e.labels) for e in data.eval] == [c for c, s in zip(cut[:3], survives[:3]) if s]
    report = json.loads((tmp_path / "run" / "data_report.json").read_text())
    assert report["train_length"] == {"num_examples": 4, "max_length": L, "policy": "truncate",
                                      "num_too_long": 3, "num_lost_labels": 1, "dropped_no_labels": 0,
                                      "unrendered": 0, "unrendered_first": []}
    assert report["eval_length"] == {"num_examples": 3, "max_length": L, "policy": "truncate",
                                     "num_too_long": 2, "num_lost_labels": 1, "dropped_no_labels": 0,
                                     "unrendered": 0, "unrendered_first": []}
    assert report["train_examples"] == 3 and report["eval_examples"] == 2
    assert report["train_label_tokens"] == sum(sum(x != IGNORE_INDEX for x in lab) for (_, lab), s
                                               in zip(cut, survives) if s)


def test_truncation_that_leaves_only_the_prompt_is_dropped_when_streaming(tmp_path):
    """Streaming applies the same cut and counts the rows left with no label."""
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import stream_sft_examples

    tok = _fresh_tiny()
    rows = [{"instruction": "hi", "output": "ok"}, {"instruction": "p " * 60, "output": "lost"},
            {"instruction": "q", "output": "a " * 60}]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train_files=[path], eval_fraction=0.0, max_length=24, streaming=True)
    got = list(stream_sft_examples(cfg, tok, tmp_path / "run", log=_quiet))
    ref_tok = _fresh_tiny()
    refs = [_reference(ref_tok, ref_tok.chat_template, [{"role": "user", "content": r["instruction"]},
                                                         {"role": "assistant", "content": r["output"]}]) for r in rows]
    assert [(e.input_ids, e.labels) for e in got] == [(refs[0][0], refs[0][1]), (refs[2][0][:24], refs[2][1][:24])]
    stream = json.loads((tmp_path / "run" / "data_report.json").read_text())["train_stream"]
    assert stream["too_long"] == 2 and stream["dropped_no_labels"] == 1


# --------------------------------------------------------------------------- RL prompts from conversations


def _prompts(tmp_path, rows):
    from posttrain.data.prompts import load_prompt_records

    path = _write_jsonl(tmp_path / "p.jsonl", rows)
    records, _ = load_prompt_records([path], log=_quiet)
    return [(r.prompt, r.answer) for r in records]


def test_messages_conversation_ending_with_user_is_all_prompt(tmp_path):
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    assert _prompts(tmp_path, [{"messages": turns}]) == [(turns, None)]


def test_sharegpt_conversation_ending_with_human_is_all_prompt(tmp_path):
    """prompts.py docstring: messages (or ShareGPT "conversations"): prompt = every turn before the
    last assistant turn; a conversation ending with the user's turn is all prompt, with no answer.
    The same turns as a 'messages' row give exactly that (test above)."""
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
                             {"from": "human", "value": "c"}]}
    assert _prompts(tmp_path, [row]) == [
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], None)]


def test_sharegpt_single_human_turn_is_a_prompt(tmp_path):
    row = {"conversations": [{"from": "human", "value": "only a question"}]}
    assert _prompts(tmp_path, [row]) == [([{"role": "user", "content": "only a question"}], None)]


def test_rl_prompt_from_alpaca_row_matches_the_sft_prompt_tokens(tmp_path):
    """An alpaca row used as an RL prompt renders the same tokens as the SFT example's prompt part."""
    from posttrain.data.formats import load_records
    from posttrain.data.prompts import encode_prompts, load_prompt_records
    from posttrain.data.templates import ALPACA, encode_record

    tok = _fresh_tiny()
    row = {"instruction": "Sort", "input": "c a b", "output": "a b c", "system": "Be exact."}
    path = _write_jsonl(tmp_path / "a.jsonl", [row])
    (prompt,), _ = load_prompt_records([path], log=_quiet)
    (record,), _ = load_records([path], log=_quiet)
    assert prompt.answer == "a b c"
    (ids,), _ = encode_prompts([prompt], tok, ALPACA, 10_000, log=_quiet)
    text = "Be exact.\n\n### Instruction:\nSort\n\nc a b\n\n### Response:\n"
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    ex = encode_record(record, tok, ALPACA)
    assert ex.input_ids[: len(ids)] == ids
    assert tok.decode([x for x in ex.labels if x != IGNORE_INDEX]) == "a b c" + tok.eos_token


NO_MARKER = (  # a plain "ROLE: text" layout that writes no end-of-turn marker
    "{%- for m in messages -%}{{- m['role'] | upper + ': ' + m['content'] + '\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT: ' -}}{%- endif -%}"
)


def test_row_with_no_label_tokens_is_dropped_and_counted_like_streaming(tmp_path, monkeypatch):
    """A row whose encoding trains on nothing (a template rendering an assistant turn as nothing:
    simulated here by blanking one row's labels) is dropped, named and counted in
    data_report.json by the in-memory path, as streaming drops and counts it."""
    from posttrain.config.sections import DataConfig
    from posttrain.data import templates
    from posttrain.data.pipeline import prepare_sft_data, stream_sft_examples
    from posttrain.data.records import Example

    real = templates.encode_record

    def blank_where(record, tokenizer, template):
        example = real(record, tokenizer, template)
        if "where" in str(record.messages):
            return Example(example.input_ids, [IGNORE_INDEX] * len(example.input_ids), example.source)
        return example

    monkeypatch.setattr(templates, "encode_record", blank_where)
    rows = [{"instruction": "where", "output": "the"}, {"instruction": "what", "output": "the cat is here"}]
    path = _write_jsonl(tmp_path / "t.jsonl", rows)
    cfg = DataConfig(train_files=[path], eval_fraction=0.0, max_length=64)
    streamed = list(stream_sft_examples(DataConfig(train_files=[path], eval_fraction=0.0, max_length=64,
                                                   streaming=True), _fresh_tiny(), tmp_path / "s", log=_quiet))
    stream_report = json.loads((tmp_path / "s" / "data_report.json").read_text())["train_stream"]
    assert stream_report["dropped_no_labels"] == 1 and len(streamed) == 1
    lines = []
    data = prepare_sft_data(cfg, _fresh_tiny(), tmp_path / "m", seed=0, log=lines.append)
    assert [e.num_label_tokens > 0 for e in data.train] == [True]
    report = json.loads((tmp_path / "m" / "data_report.json").read_text())
    assert report["train_length"]["dropped_no_labels"] == 1 and report["train_examples"] == 1
    assert any("t.jsonl:1" in line and "no token to train on" in line for line in lines), lines

GEMMA_LIKE = (  # no system role: a system turn raises, as Gemma's template does
    "{%- for m in messages -%}{%- if m['role'] == 'system' -%}{{ raise_exception('System role not supported') }}"
    "{%- endif -%}{{- '<' + m['role'] + '>' + m['content'] + '</' + m['role'] + '>\n' -}}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<assistant>' -}}{%- endif -%}"
)


@pytest.mark.parametrize("streaming", [False, True])
def test_a_row_the_template_cannot_render_is_a_bad_row_under_skip(tmp_path, streaming):
    """A system turn under a template without a system role: with data.bad_rows=skip the row is
    skipped, named and counted (it aborted the whole run); with error it stops the run."""
    from posttrain.config.sections import DataConfig
    from posttrain.data.pipeline import prepare_sft_data, stream_sft_examples
    from posttrain.errors import DataError

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
            for i in range(199)]
    rows.insert(7, {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                 {"role": "assistant", "content": "a"}]})
    path = _write_jsonl(tmp_path / "t.jsonl", rows)

    def run(policy):
        tok = _fresh_tiny()
        tok.chat_template = GEMMA_LIKE
        cfg = DataConfig(train_files=[path], eval_fraction=0.0, max_length=64, bad_rows=policy, streaming=streaming)
        lines = []
        if streaming:
            kept = list(stream_sft_examples(cfg, tok, tmp_path / policy, log=lines.append))
            counted = json.loads((tmp_path / policy / "data_report.json").read_text())["train_stream"]["unrendered"]
        else:
            kept = prepare_sft_data(cfg, tok, tmp_path / policy, seed=0, log=lines.append).train
            counted = json.loads((tmp_path / policy / "data_report.json").read_text())["train_length"]["unrendered"]
        return kept, counted, lines

    kept, counted, lines = run("skip")
    assert len(kept) == 199 and counted == 1
    assert any("t.jsonl:8" in line and "cannot render" in line for line in lines), lines
    with pytest.raises(DataError, match="t.jsonl:8"):
        run("error")


def test_a_preference_row_the_template_cannot_render_is_a_bad_row_under_skip(tmp_path):
    """The same policy for rm / dpo data: skipped, named, counted under skip; stops under error."""
    from posttrain.config import DPOConfig
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.errors import DataError

    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(199)]
    rows.insert(4, {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}],
                    "chosen": "a", "rejected": "b"})
    path = _write_jsonl(tmp_path / "p.jsonl", rows)

    def run(policy):
        tok = _fresh_tiny()
        tok.chat_template = GEMMA_LIKE
        cfg = DPOConfig.load(None, [f"data.train_files=[{path}]", "data.eval_fraction=0", f"data.bad_rows={policy}"])
        lines = []
        data = prepare_preference_data(cfg.data, tok, tmp_path / policy, 0, log=lines.append)
        return data, lines

    data, lines = run("skip")
    assert len(data.train) == 199 and data.report["train_length"]["unrendered"] == 1
    assert any("p.jsonl:5" in line and "cannot render" in line for line in lines), lines
    with pytest.raises(DataError, match="p.jsonl:5"):
        run("error")
