"""A chat-template walk: a user brings models whose tokenizers carry real-world chat templates and runs
sft / dpo / rm / generate / chat / serve data rendering on them.

Walked, with templates written here in Jinja from their published structure and attached to the tiny
preset's tokenizer (their markers added as special tokens): Llama-3 (`<|start_header_id|>role<|end_header_id|>`
and `<|eot_id|>`, BOS from the template), Gemma (no system role: it raises on one; `<start_of_turn>user` /
`model`, `<end_of_turn>`), Mistral `[INST]` (system folded into the first user turn, alternation enforced
with `raise_exception`), Qwen / ChatML with a tools block, `<tool_call>` and `<tool_response>`, a template
whose assistant text sits in a `{% generation %}` block, and ChatML with a default system prompt. Checked:
the prompt / response split of SFT and preference rows (labels cover the assistant content and its end
marker, nothing of the header), chosen and rejected sharing the rendered prompt, multi-turn masks, the
end-of-turn marker (`templates.end_of_turn`, `rollout.generate.end_of_turn`) as stop ids and as
`templates.doubled_turns`' marker, a system turn under Gemma in sft / dpo / grpo prompt files (a DataError
naming file:line), `posttrain generate` and `chat` on such models, and `posttrain serve`'s rendering and stop ids.

Right: every template's labels are exactly each assistant turn's content plus its end marker (the
`{% generation %}` template's equal transformers' own assistant mask with the tags left in); both sides of a
pair carry the same prompt tokens; the end-of-turn marker is found for all six and is a stop id; an answer
that already ends with it is trained once; the training readers name the file:line of a system row under
Gemma; serve renders a chat as training renders its prompt and stops at the template's marker. Wrong:
`posttrain generate` renders prompt rows with `apply_chat_template` directly, so a row the template refuses
(a system turn under Gemma) ends in a Jinja traceback, and a row's `tools` are dropped; `chat --system` on a
template without a system role is a traceback too.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 34:
each asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import io
import json
import sys

import pytest

from posttrain.data.records import IGNORE_INDEX, Record

# --------------------------------------------------------------------------- the templates

LLAMA3 = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
GEMMA = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{{- raise_exception('System role not supported') }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{- '<start_of_turn>' + role + '\\n' + m['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)
MISTRAL = (  # system folded into the first user turn; roles must alternate
    "{%- if messages[0]['role'] == 'system' %}{%- set sys = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set sys = none %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for m in loop_messages %}"
    "{%- if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif %}"
    "{%- if m['role'] == 'user' %}"
    "{%- if loop.first and sys is not none %}{{- '[INST] ' + sys + '\\n\\n' + m['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + m['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif m['role'] == 'assistant' %}{{- ' ' + m['content'] + eos_token }}"
    "{%- else %}{{- raise_exception('Only user and assistant roles are supported!') }}{%- endif %}"
    "{%- endfor %}"
)
QWEN_TOOLS = (  # ChatML; tools in the system turn, calls in <tool_call>, results as user <tool_response>
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- elif m.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if m.content %}{{- '\\n' + m.content }}{%- endif %}"
    "{%- for tc in m.tool_calls or [] %}{%- set f = tc.function if tc.function is defined else tc %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + f.name + '\", \"arguments\": ' + (f.arguments | tojson) + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif m.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + m.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
GENERATION_TAGGED = (  # Phi-3-like markers, the assistant's text and end marker in a {% generation %} block
    "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- '<|assistant|>\\n' }}"
    "{%- generation %}{{- m['content'] + '<|end|>' }}{%- endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|assistant|>\\n' }}{%- endif %}"
)
DEFAULT_SYSTEM = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# name: (template, special tokens it writes, bos, eos, its end-of-turn marker)
FAMILIES = {
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|begin_of_text|>",
               "<|end_of_text|>", "<|eot_id|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "<end_of_turn>"),
    "mistral": (MISTRAL, [], "<s>", "</s>", "</s>"),
    "qwen": (QWEN_TOOLS, ["<|im_start|>"], None, None, "<|im_end|>"),
    "generation": (GENERATION_TAGGED, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], None, None, "<|end|>"),
    "default_system": (DEFAULT_SYSTEM, ["<|im_start|>"], None, None, "<|im_end|>"),
}
TALK = [{"role": "user", "content": "Copy: a b"}, {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "Reverse: c d"}, {"role": "assistant", "content": "d c"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def _tokenizer(name: str):
    """The tiny preset's tokenizer with the family's template, markers, BOS and EOS (fresh: stages
    adopt templates onto the tokenizer they are given)."""
    from transformers import AutoTokenizer

    from posttrain.models.presets import preset_path

    template, extra, bos, eos, _ = FAMILIES[name]
    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    tok.add_special_tokens({k: v for k, v in (("bos_token", bos), ("eos_token", eos)) if v})
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """name -> a saved model directory: the tiny preset, its embeddings resized to the family's
    tokens, the family's tokenizer, EOS in config and generation_config."""
    from posttrain.inference import load_for_inference

    made = {}
    for name in ("llama3", "gemma", "qwen"):
        model, _ = load_for_inference("tiny")
        tok = _tokenizer(name)
        model.resize_token_embeddings(len(tok))
        model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        made[name] = path
    return made


def _runs(tok, example) -> list[str]:
    """The labelled stretches of an example, decoded."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def _first_label(example) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def _cli(capsys, *argv) -> tuple[int | None, str, BaseException | None]:
    """posttrain ARGV in this process: (exit code, stderr + stdout, the exception that escaped)."""
    from posttrain import cli

    try:
        rc, escaped = cli.main([str(a) for a in argv]), None
    except SystemExit as exc:
        rc, escaped = exc.code, None
    except Exception as exc:  # noqa: BLE001 - what a user would see as a traceback
        rc, escaped = None, exc
    captured = capsys.readouterr()
    return rc, captured.err + captured.out, escaped


# --------------------------------------------------------------------------- masks and markers


@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_assistant_turn_is_labelled_with_its_end_marker_and_the_marker_is_a_stop_id(name):
    """A system turn (folded into Mistral's first [INST]; none under Gemma) and two exchanges: the labels are
    the two answers with the template's end marker, nothing of a header, a user turn or the default system
    prompt; both end-of-turn finders give the marker, and generation stops at its one id."""
    from posttrain.data.templates import encode_record, end_of_turn
    from posttrain.rollout.generate import end_of_turn as generation_end_of_turn
    from posttrain.rollout.generate import eos_token_ids, stop_strings

    tok = _tokenizer(name)
    template, marker = FAMILIES[name][0], FAMILIES[name][4]
    system = [] if name == "gemma" else [{"role": "system", "content": "Be brief."}]
    example = encode_record(Record(messages=[*system, *TALK], source="chat.jsonl:1"), tok, template)
    lead = " " if name == "mistral" else ""  # [/INST] then a space, then the answer
    assert _runs(tok, example) == [f"{lead}a b{marker}", f"{lead}d c{marker}"]
    assert end_of_turn(tok, template) == generation_end_of_turn(tok, template) == marker
    assert tok.convert_tokens_to_ids(marker) in eos_token_ids(None, tok, template)
    assert stop_strings(tok, [], template) == []  # one token: a stop id, not a string


def test_a_generation_tagged_template_masks_as_transformers_does_with_the_tags_left_in():
    """The template is used as it is, `{% generation %}` block and all: ids and labels equal transformers'
    `return_assistant_tokens_mask` on a multi-turn conversation with a system turn."""
    from posttrain.data.templates import encode_record

    tok = _tokenizer("generation")
    messages = [{"role": "system", "content": "Be brief."}, *TALK[:3],
                {"role": "assistant", "content": " d c\n"}]
    reference = tok.apply_chat_template(messages, chat_template=GENERATION_TAGGED, tokenize=True, return_dict=True,
                                        return_assistant_tokens_mask=True)
    example = encode_record(Record(messages=messages, source="x"), tok, GENERATION_TAGGED)
    assert example.input_ids == list(reference["input_ids"])
    assert [label != IGNORE_INDEX for label in example.labels] == [bool(m) for m in reference["assistant_masks"]]


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral", "generation"])
def test_an_answer_that_already_ends_with_the_marker_is_trained_with_it_once(name):
    """TRL users append the end-of-turn marker (or EOS, where it is the marker) to answers: the row is
    counted by `doubled_turns` and trained on one marker, in SFT and in a preference response."""
    from posttrain.data.preferences import encode_response
    from posttrain.data.templates import doubled_turns, encode_record

    tok = _tokenizer(name)
    template, marker = FAMILIES[name][0], FAMILIES[name][4]
    record = Record(messages=[TALK[0], {"role": "assistant", "content": f"a b{marker}"}], source="x")
    assert doubled_turns(record, tok, template) == [1]
    lead = " " if name == "mistral" else ""
    assert _runs(tok, encode_record(record, tok, template)) == [f"{lead}a b{marker}"]
    response = encode_response([TALK[0]], f"a b{marker}\n", tok, template)
    assert _runs(tok, response) == [f"{lead}a b{marker}"]


@pytest.mark.parametrize("name", ["llama3", "gemma", "mistral", "default_system"])
def test_chosen_and_rejected_carry_the_same_rendered_prompt_with_the_context_turns(name):
    """A multi-turn preference prompt: both sides' tokens before their first label are the same, and are
    the prompt as generation tokenises it (rendered with the generation prompt, BOS and default system
    prompt included); only the response and its marker are labelled."""
    from posttrain.data.preferences import PreferenceRecord, encode_preference
    from posttrain.data.templates import render

    tok = _tokenizer(name)
    template, marker = FAMILIES[name][0], FAMILIES[name][4]
    prompt = TALK[:3]
    pair = encode_preference(PreferenceRecord(prompt=prompt, responses=["d c", "c d"], ranks=[0, 1],
                                              source="pairs.jsonl:1"), tok, template)
    chosen, rejected = pair.sequences
    asked = tok(render(tok, template, prompt, True), add_special_tokens=False)["input_ids"]
    assert chosen.input_ids[:_first_label(chosen)] == rejected.input_ids[:_first_label(rejected)] == asked
    lead = " " if name == "mistral" else ""
    assert (_runs(tok, chosen), _runs(tok, rejected)) == ([f"{lead}d c{marker}"], [f"{lead}c d{marker}"])


# --------------------------------------------------------------------------- a system turn under Gemma


def test_a_system_row_under_gemma_names_its_file_line_in_sft_dpo_and_rl_prompt_data(tmp_path):
    """The template raises on the system turn: training's readers turn that into a DataError naming the
    row's file:line (not a Jinja traceback), for chat rows, preference rows and RL prompt rows."""
    from posttrain.data.preferences import encode_preference, load_preference_records
    from posttrain.data.prompts import encode_prompts, load_prompt_records
    from posttrain.data.templates import encode_record
    from posttrain.errors import DataError

    tok = _tokenizer("gemma")
    system = {"role": "system", "content": "Be brief."}
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*System role not supported"):
        encode_record(Record(messages=[system, *TALK[:2]], source="chat.jsonl:2"), tok, GEMMA)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Copy: a b", "chosen": "a b", "rejected": "b a"}) + "\n"
                     + json.dumps({"prompt": "Copy: a b", "system": "Be brief.", "chosen": "a b",
                                   "rejected": "b a"}) + "\n")
    first, second = load_preference_records([str(pairs)], log=lambda _: None)[0]
    encode_preference(first, tok, GEMMA)
    with pytest.raises(DataError, match=rf"{pairs}:2: .*System role not supported"):
        encode_preference(second, tok, GEMMA)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": TALK[:1]}) + "\n" + json.dumps({"messages": [system, TALK[0]]}) + "\n")
    records = load_prompt_records([str(prompts)])[0]
    with pytest.raises(DataError, match=rf"{prompts}:2: .*System role not supported"):
        encode_prompts(records, tok, GEMMA, 256, log=lambda _: None)


def test_generate_names_the_prompt_row_a_template_without_system_role_refuses(capsys, tmp_path, model_dirs):
    """The training readers name such a row (above); generate reads the same rows, "as training reads them"."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": TALK[:1]}) + "\n"
                       + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, TALK[0]]}) + "\n")
    rc, out, escaped = _cli(capsys, "generate", "--model", model_dirs["gemma"], "--prompts", prompts,
                            "--output", tmp_path / "out.jsonl", "--max-new-tokens", 2)
    assert escaped is None, f"traceback: {type(escaped).__name__}: {escaped}"
    # an error naming the row, or (as `kind: local` does) the system text folded, said
    assert (rc == 2 and f"{prompts}:2" in out) or (rc == 0 and "system" in out.lower()), (rc, out[-400:])


def test_chat_with_a_system_message_on_a_template_without_system_role_is_no_traceback(capsys, monkeypatch,
                                                                                       model_dirs):
    """Right: the system text folded into the first user turn, as `kind: local` does for the judge and the
    red-team target (exit 0), or a one-line error saying the template has no system role (exit 2)."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("Copy: a b\n/exit\n"))
    rc, out, escaped = _cli(capsys, "chat", "--model", model_dirs["gemma"], "--system", "Be brief.",
                            "--max-new-tokens", 2)
    assert escaped is None, f"traceback: {type(escaped).__name__}: {escaped}"
    assert rc == 0 or (rc == 2 and "system" in out.lower()), (rc, out[-400:])


# --------------------------------------------------------------------------- tools at generation


def test_generate_asks_a_prompt_row_with_its_tools_as_rl_prompts_do(capsys, monkeypatch, tmp_path, model_dirs):
    """README: generate reads turns "as training reads them"; a row's `tools` reach every render of it. The
    prompt generate hands the model must be the one grpo would ask (`encode_prompts`), tools included."""
    from transformers import AutoTokenizer

    import posttrain.rollout.generate as generation
    from posttrain.data.prompts import encode_prompts, load_prompt_records
    from posttrain.data.templates import render

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                   "tools": TOOLS}) + "\n")
    asked = []

    def fake_generate(model, tokenizer, texts, settings, **kw):
        asked.extend(texts)
        for i in range(len(texts)):
            kw["on_done"](i, "x")
        return ["x"] * len(texts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    rc, out, escaped = _cli(capsys, "generate", "--model", model_dirs["qwen"], "--prompts", prompts,
                            "--output", tmp_path / "out.jsonl", "--max-new-tokens", 2)
    assert escaped is None and rc == 0, (rc, escaped, out[-400:])
    tok = AutoTokenizer.from_pretrained(model_dirs["qwen"])
    ids = encode_prompts(load_prompt_records([str(prompts)])[0], tok, QWEN_TOOLS, 512, log=lambda _: None)[0]
    with_tools = render(tok, QWEN_TOOLS, [{"role": "user", "content": "Weather in Paris?"}], True, tools=TOOLS)
    assert "get_weather" in with_tools and ids[0] == tok(with_tools, add_special_tokens=False)["input_ids"]
    assert asked == [with_tools], f"generate asked {asked!r}"


# --------------------------------------------------------------------------- serve


def _engine(path):
    from posttrain.data.templates import resolve_template
    from posttrain.inference import load_for_inference
    from posttrain.serve.engine import Engine
    from posttrain.serve.protocol import Limits

    model, tok = load_for_inference(str(path))
    engine = Engine(model, tok, {"m": None}, resolve_template(tok, "auto"), Limits(max_tokens=4), idle_exit_s=5.0)
    engine._start_worker = lambda: None  # render and queue only; nothing is generated
    return engine, tok


def test_serve_renders_a_chat_as_training_renders_its_prompt_and_stops_at_the_turn_marker(model_dirs):
    """Llama-3: a system + user request's prompt ids are the tokens an SFT row of the same turns has before
    its answer (BOS once, the assistant header), and the server ends a reply at <|eot_id|> as well as at
    EOS. Gemma: a system turn is a 400 naming the template's refusal, not a 500."""
    from posttrain.data.templates import encode_record
    from posttrain.serve.protocol import APIError, Request

    engine, tok = _engine(model_dirs["llama3"])
    turns = [{"role": "system", "content": "Be brief."}, TALK[0]]
    job = engine.submit(Request(kind="chat", model="m", messages=turns, max_tokens=2, temperature=0.0))
    example = encode_record(Record(messages=[*turns, TALK[1]], source="x"), tok, LLAMA3)
    assert job.choices[0].prompt_ids == example.input_ids[:_first_label(example)]
    assert job.choices[0].prompt_ids.count(tok.bos_token_id) == 1
    assert {tok.convert_tokens_to_ids("<|eot_id|>"), tok.eos_token_id} <= set(engine.eos_ids)

    gemma, _ = _engine(model_dirs["gemma"])
    with pytest.raises(APIError) as info:
        gemma.submit(Request(kind="chat", model="m", messages=turns, max_tokens=2, temperature=0.0))
    assert info.value.status == 400 and "System role not supported" in str(info.value)
