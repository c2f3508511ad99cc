"""An agent builder brings chat data: OpenAI / Hugging Face messages with tools. Walked, on the data layer
(rows -> records -> token labels, as `sft`, `dpo` and `grpo` read them): an assistant turn that calls a
function (`tool_calls`: name and JSON arguments, beside text, or with null or empty `content`), a `tool`
turn answering it (`tool_call_id`, `name`), a `tools` column of JSON-schema function definitions that a
model's chat template renders (transformers' `apply_chat_template(tools=...)`), `reasoning_content`
beside the answer and thinking written inline, a `developer` turn, per-turn `weight: 0` (OpenAI's
fine-tuning format) and `train: false` (axolotl's) on turns a dataset keeps out of the loss, preference
pairs whose sides are tool calls, and RL prompt rows that carry their tools. The templates are written
here in the style transformers documents (a Qwen2.5-like one that renders tools, tool calls, tool turns
and reasoning; a Qwen3-like one that drops the thinking of earlier turns), on the tiny preset's
tokenizer; expectations come from transformers' own `apply_chat_template`.

What was right: a `tool` turn, a `developer` turn and ShareGPT's `function_call` / `observation` turns
are refused by file:line naming the role (tested for `tool` in test_sft_data_edges.py; not pinned here,
as a later release may read them); a tool-aware template renders and masks plain conversations
exactly as transformers renders them; turns as a Parquet table writes them (`tool_calls`,
`reasoning_content`, `weight` null where a row has none) train as plain turns; thinking written inline
in the content is trained whole, and a template that drops an earlier turn's thinking is refused rather
than mis-masked. What was wrong: every other key a turn or row carries is dropped without a word, so
tool calls, tool definitions, reasoning and the loss flags vanish from training, or the row is refused
for a reason that is not the one (a tool-call turn's "content is null"; a pair differing in its calls is
"the same text").

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop
31: each asserts the right behaviour, which is either training on what the template renders or a
refusal by file:line naming the unsupported key); the others pin behaviour that was right but had no
test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.errors import DataError

CALL_PARIS = {"id": "call_1", "type": "function",
              "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}
CALL_LONDON = {"id": "call_1", "type": "function",
               "function": {"name": "get_weather", "arguments": json.dumps({"city": "London"})}}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = {"role": "user", "content": "Weather in Paris?"}

# Qwen2.5-like: tool definitions in the system turn, calls as <tool_call> blocks after the text,
# tool results in their own turn, reasoning as a <think> block before the answer.
TOOL_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' + (tool | tojson) }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{- '<|im_start|>user\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if message.reasoning_content %}{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- if message.content %}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls or [] %}"
    "{%- set fn = call.function if call.function is defined else call %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + fn.name + '\", \"arguments\": ' }}"
    "{{- fn.arguments if fn.arguments is string else fn.arguments | tojson }}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{{- '<|im_start|>tool\\n<tool_response>\\n' + message['content'] + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Qwen3-like: thinking written inline is split off; only turns after the last user turn keep it.
THINK_TEMPLATE = (
    "{%- set ns = namespace(last_query=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def tok():
    from posttrain.models.loading import load_tokenizer

    return load_tokenizer("tiny")


def _quiet(_):
    return None


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _labelled(tokenizer, example) -> str:
    return tokenizer.decode([t for t in example.labels if t != -100])


def _context(tokenizer, example) -> str:
    return tokenizer.decode([i for i, t in zip(example.input_ids, example.labels) if t == -100])


def _render(tokenizer, messages, template, tools=None, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def _last_answer(tokenizer, messages, template, tools=None) -> str:
    """The final assistant turn as transformers renders it (content, calls, end-of-turn marker)."""
    full = _render(tokenizer, messages, template, tools)
    prompt = _render(tokenizer, messages[:-1], template, tools, generation_prompt=True)
    assert full.startswith(prompt)
    return full[len(prompt):].rstrip()


def _sft(tmp_path, tokenizer, row, template):
    """(refusal message, None) or (None, example): the row read from a file and encoded as sft does."""
    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record

    path = _jsonl(tmp_path / "agent.jsonl", [row])
    try:
        (record,), _ = load_records([str(path)], log=_quiet)
        return None, encode_record(record, tokenizer, template)
    except DataError as e:
        return str(e), None


def _refused_naming(refusal, *keys) -> bool:
    """Refused by file:line, naming one of `keys` quoted as the key it is ('tools', not "tool")."""
    return refusal is not None and "agent.jsonl:1" in refusal and any(
        f"{q}{k}{q}" in refusal for k in keys for q in ("'", '"', "`"))


# --------------------------------------------------------------------------- defects: sft


def test_tool_calls_beside_text_are_trained_as_the_template_renders_them_or_refused(tmp_path, tok):
    messages = [ASK, {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL_PARIS]}]
    refusal, example = _sft(tmp_path, tok, {"messages": messages}, TOOL_TEMPLATE)
    if refusal is not None:
        assert _refused_naming(refusal, "tool_calls"), refusal
        return
    want = _last_answer(tok, messages, TOOL_TEMPLATE)
    assert "<tool_call>" in want
    assert _labelled(tok, example) == want, f"trained on {_labelled(tok, example)!r}, the template renders {want!r}"


@pytest.mark.parametrize("content", [None, ""], ids=["null", "empty"])
def test_a_tool_call_turn_without_text_is_trained_or_refused_naming_tool_calls(tmp_path, tok, content):
    messages = [ASK, {"role": "assistant", "content": content, "tool_calls": [CALL_PARIS]}]
    refusal, example = _sft(tmp_path, tok, {"messages": messages}, TOOL_TEMPLATE)
    if refusal is not None:
        assert _refused_naming(refusal, "tool_calls"), f"refused, but not for its tool calls: {refusal!r}"
        return
    want = _last_answer(tok, [ASK, {**messages[1], "content": ""}], TOOL_TEMPLATE)
    assert _labelled(tok, example) == want


def test_a_rows_tools_reach_the_chat_template_or_are_refused(tmp_path, tok):
    messages = [ASK, {"role": "assistant", "content": "I cannot look that up."}]
    refusal, example = _sft(tmp_path, tok, {"messages": messages, "tools": TOOLS}, TOOL_TEMPLATE)
    if refusal is not None:
        assert _refused_naming(refusal, "tools"), refusal
        return
    want = _render(tok, messages, TOOL_TEMPLATE, TOOLS)
    assert "Current weather in a city" in want
    got = tok.decode(example.input_ids)
    assert got == want, f"rendered without the tools: {got!r}"
    assert _labelled(tok, example) == "I cannot look that up.<|im_end|>"


def test_reasoning_content_is_trained_as_the_template_renders_it_or_refused(tmp_path, tok):
    messages = [ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Paris is in France."}]
    refusal, example = _sft(tmp_path, tok, {"messages": messages}, TOOL_TEMPLATE)
    if refusal is not None:
        assert _refused_naming(refusal, "reasoning_content"), refusal
        return
    want = _last_answer(tok, messages, TOOL_TEMPLATE)
    assert want == "<think>\nParis is in France.\n</think>\n\nSunny.<|im_end|>"
    assert _labelled(tok, example) == want, f"trained on {_labelled(tok, example)!r}"


@pytest.mark.parametrize("flag", [{"weight": 0}, {"train": False}], ids=["weight-0", "train-false"])
def test_assistant_turns_marked_out_of_the_loss_are_not_trained(tmp_path, tok, flag):
    from posttrain.data.templates import resolve_template

    row = {"messages": [{"role": "user", "content": "Capital of France?"},
                        {"role": "assistant", "content": "Lyon, I think.", **flag},
                        {"role": "user", "content": "Are you sure?"},
                        {"role": "assistant", "content": "Paris."}]}
    refusal, example = _sft(tmp_path, tok, row, resolve_template(tok))
    if refusal is not None:
        assert _refused_naming(refusal, *flag), refusal
        return
    assert _labelled(tok, example) == "Paris.<|im_end|>", f"trained on {_labelled(tok, example)!r}"
    assert "Lyon, I think." in _context(tok, example)


# --------------------------------------------------------------------------- defects: dpo and rl


@pytest.mark.parametrize("texts", [("Checking.", "Checking."), ("Checking Paris.", "Sure.")],
                         ids=["same-text", "different-text"])
def test_preference_sides_that_call_tools_compare_the_calls_or_are_refused(tmp_path, tok, texts):
    from posttrain.data.preferences import encode_preference, load_preference_records

    sides = [[{"role": "assistant", "content": text, "tool_calls": [call]}]
             for text, call in zip(texts, (CALL_PARIS, CALL_LONDON))]
    path = _jsonl(tmp_path / "agent.jsonl", [{"prompt": [ASK], "chosen": sides[0], "rejected": sides[1]}])
    try:
        (record,), _ = load_preference_records([str(path)], log=_quiet)
        example = encode_preference(record, tok, TOOL_TEMPLATE)
    except DataError as e:
        assert _refused_naming(str(e), "tool_calls"), f"refused, but not for its tool calls: {e}"
        return
    got = [_labelled(tok, s) for s in example.sequences]
    want = [_last_answer(tok, [ASK, *side], TOOL_TEMPLATE) for side in sides]
    assert got == want, f"trained on {got!r}"


@pytest.mark.parametrize("row", [{"prompt": [ASK], "tools": TOOLS, "answer": "get_weather"},
                                 {"messages": [ASK], "tools": TOOLS}], ids=["prompt", "messages"])
def test_rl_prompt_rows_with_tools_are_asked_with_them_or_refused(tmp_path, tok, row):
    from posttrain.data.prompts import encode_prompts, load_prompt_records

    path = _jsonl(tmp_path / "agent.jsonl", [row])
    try:
        records, _ = load_prompt_records([str(path)], log=_quiet)
        ids, _ = encode_prompts(records, tok, TOOL_TEMPLATE, 512, log=_quiet)
    except DataError as e:
        assert _refused_naming(str(e), "tools"), e
        return
    want = _render(tok, [ASK], TOOL_TEMPLATE, TOOLS, generation_prompt=True)
    assert tok.decode(ids[0]) == want, f"the policy is asked {tok.decode(ids[0])!r}"


# --------------------------------------------------------------------------- right, had no test


def test_a_tool_aware_template_masks_plain_conversations_as_transformers_renders_them(tok):
    """A model whose template branches on tools and reads `message.tool_calls` (Qwen2.5, Llama-3.1, Hermes)
    trains plain rows exactly: ids are transformers' rendering, labels each answer and its <|im_end|>, and
    the RL prompt is the generation prompt transformers gives."""
    from posttrain.data.formats import to_record
    from posttrain.data.prompts import PromptRecord, encode_prompts
    from posttrain.data.templates import encode_record

    messages = [{"role": "system", "content": "Be brief."}, ASK, {"role": "assistant", "content": "Sunny."},
                {"role": "user", "content": "And tomorrow?"}, {"role": "assistant", "content": "Rain."}]
    example = encode_record(to_record({"messages": messages}, "messages", "m:1"), tok, TOOL_TEMPLATE)
    assert tok.decode(example.input_ids) == _render(tok, messages, TOOL_TEMPLATE)
    assert _labelled(tok, example) == "Sunny.<|im_end|>Rain.<|im_end|>"
    ids, _ = encode_prompts([PromptRecord(messages[:4])], tok, TOOL_TEMPLATE, 512, log=_quiet)
    assert ids[0] == tok(_render(tok, messages[:4], TOOL_TEMPLATE, generation_prompt=True),
                         add_special_tokens=False)["input_ids"]


def test_turns_with_null_tool_keys_as_parquet_writes_them_train_as_plain_turns(tmp_path, tok):
    """A Parquet table of agent data gives every turn every key, null (or an empty list) where a turn has
    none: such turns are plain turns, trained as usual (a fix for the defects above must keep this)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from posttrain.data.formats import load_records
    from posttrain.data.templates import encode_record, resolve_template

    nulls = {"tool_calls": None, "tool_call_id": None, "name": None, "reasoning_content": None, "weight": None}
    rows = [{"messages": [{"role": "user", "content": "Hi", **nulls},
                          {"role": "assistant", "content": "Hello.", **nulls}]},
            {"messages": [{"role": "user", "content": "Bye", **nulls, "tool_calls": []},
                          {"role": "assistant", "content": "Goodbye.", **nulls, "tool_calls": [], "weight": 1}]}]
    path = tmp_path / "agent.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    records, report = load_records([str(path)], log=_quiet)
    assert (report.good, report.bad) == (2, 0)
    template = resolve_template(tok)
    assert [_labelled(tok, encode_record(r, tok, template)) for r in records] == ["Hello.<|im_end|>",
                                                                                  "Goodbye.<|im_end|>"]


def test_inline_thinking_trains_whole_and_a_template_that_drops_earlier_thinking_is_refused(tmp_path, tok):
    """Thinking written in the content (Qwen3 / DeepSeek-R1 data) is trained with the answer, exactly as the
    model's template renders it. Under a template that drops an earlier turn's thinking once a later user
    turn exists, the earlier answer's tokens cannot be located in the conversation: the row is refused by
    file:line, never trained on the wrong tokens."""
    one = [ASK, {"role": "assistant", "content": "<think>\nParis is in France.\n</think>\n\nSunny."}]
    refusal, example = _sft(tmp_path, tok, {"messages": one}, THINK_TEMPLATE)
    assert refusal is None, refusal
    assert _labelled(tok, example) == "<think>\nParis is in France.\n</think>\n\nSunny.<|im_end|>"
    assert tok.decode(example.input_ids) == _render(tok, one, THINK_TEMPLATE)
    two = [*one, {"role": "user", "content": "Tomorrow?"},
           {"role": "assistant", "content": "<think>\nCheck.\n</think>\n\nRain."}]
    refusal, _ = _sft(tmp_path, tok, {"messages": two}, THINK_TEMPLATE)
    assert refusal is not None and "agent.jsonl:1" in refusal and "not prefix-stable at message 1" in refusal
