"""A multi-turn walk: a user fine-tuning a chat assistant brings conversations of several user / assistant
turns (with a system turn) and carries them through every stage and every way of asking the model.

Walked, on the tiny preset's ChatML template and on a Llama-3 template (`<|start_header_id|>` headers, `<|eot_id|>`,
BOS from the template; built as tests/test_walkthrough_chattemplates.py builds it): SFT `messages` rows (which
assistant turns are trained: every one, a turn kept out by its `weight: 0` / `train: false`, a prompt-completion
row's prompt turns as context; the held-out split of conversations that branch from a shared opening, as
OpenAssistant-style trees do; a top-level `system` key as LLaMA-Factory's ShareGPT files carry it), preference
rows whose prompt is a history (a prompt list with text sides, whole conversations without a prompt, KTO's
unpaired rows), RL prompt rows read from a conversation file, `posttrain generate` on the same files, `chat`
carrying its history from turn to turn, and `serve`'s chat endpoint given a history.

Right: SFT labels every assistant turn with its end-of-turn marker and nothing else, under both templates; the
history before the last answer is the same tokens in an SFT row, in both sides of a pair (given as a prompt list
or as whole conversations), in a KTO row, as an RL prompt, as `generate` asks it, as `chat` asks its second turn
and as `serve` renders the request. Wrong: the held-out split keys a conversation by the turns before its last
answer only, so a held-out conversation whose earlier answers a longer training conversation trains on (same
opening, same answer) is held out beside its own training text; a `messages` row's top-level `system` key, read
by every other row format, is dropped without a word in SFT and RL prompt data; and `generate` asks a
conversation that ends with its reference answer for a second answer after it, and leaves out a prompt row's
`system`, where the RL prompt reader takes the turns before the last answer and the system turn.

The tests named for a failure pin a defect found on that walk (each a strict xfail until its fix, stop 35: each
asserts the right behaviour); the others pin behaviour that was right but had no test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from posttrain.data.records import IGNORE_INDEX, Record
from tests.test_walkthrough_chattemplates import LLAMA3, _tokenizer

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "Be brief."}


def U(text: str) -> dict:
    return {"role": "user", "content": text}


def A(text: str) -> dict:
    return {"role": "assistant", "content": text}


CONVERSATION = [SYSTEM, U("Copy: a b"), A("a b"), U("Now reverse it."), A("b a")]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _template(name: str):
    """(tokenizer, template): the tiny preset's own ChatML, or Llama-3's on the tiny tokenizer."""
    if name == "llama3":
        return _tokenizer("llama3"), LLAMA3
    from transformers import AutoTokenizer

    from posttrain.data.templates import resolve_template
    from posttrain.models.presets import preset_path

    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    return tok, resolve_template(tok, "auto")


def _runs(example) -> list[tuple[int, int]]:
    """The [start, end) stretches of labelled tokens."""
    runs, start = [], None
    for i, label in enumerate([*example.labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _first_label(example) -> int:
    return next(i for i, label in enumerate(example.labels) if label != IGNORE_INDEX)


def _cli(capsys, *argv):
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


# --------------------------------------------------------------------------- one history, every stage


@pytest.mark.parametrize("name", ["chatml", "llama3"])
def test_a_history_is_the_same_tokens_in_sft_dpo_kto_rl_generate_and_chat(name, tmp_path, monkeypatch):
    """SFT trains both answers (content and end marker, nothing of a header); the tokens before the last
    answer are what a pair's two sides (a prompt list, or whole conversations without a prompt), a KTO row,
    an RL prompt read from the conversation file, `generate` on a prompt row, and `chat`'s second turn ask."""
    import posttrain.rollout.generate as generation
    from posttrain.data.preferences import encode_preference, to_preference_record
    from posttrain.data.prompts import encode_prompts, load_prompt_records
    from posttrain.data.templates import encode_record, end_of_turn
    from posttrain.inference import render as generate_render
    from posttrain.rollout.generate import chat_session
    from posttrain.rollout.sampling import SamplingSettings

    tok, template = _template(name)
    marker = end_of_turn(tok, template)
    sft = encode_record(Record(messages=CONVERSATION, source="chat.jsonl:1"), tok, template)
    runs = _runs(sft)
    assert [tok.decode(sft.input_ids[a:b]) for a, b in runs] == [f"a b{marker}", f"b a{marker}"]
    history = sft.input_ids[: runs[-1][0]]

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    rows = [({"prompt": CONVERSATION[:4], "chosen": "b a", "rejected": "a b"}, "pairs"),
            ({"chosen": CONVERSATION, "rejected": [*CONVERSATION[:4], A("a b")]}, "pairs"),
            ({"prompt": CONVERSATION[:4], "completion": "b a", "label": True}, "unpaired")]
    for row, fmt in rows:
        example = encode_preference(to_preference_record(row, fmt, "p.jsonl:1"), tok, template)
        assert [s.input_ids[: _first_label(s)] for s in example.sequences] == [history] * len(example.sequences), row
    chosen = encode_preference(to_preference_record(*rows[0], "p.jsonl:1"), tok, template).sequences[0]
    assert (chosen.input_ids, chosen.labels[runs[-1][0]:]) == (sft.input_ids, sft.labels[runs[-1][0]:])

    records = load_prompt_records([str(_write(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}]))])[0]
    assert encode_prompts(records, tok, template, 512, log=lambda _: None)[0] == [history]
    assert ids(generate_render({"messages": CONVERSATION[:4]}, tok, template, "p.jsonl:1")) == history

    asked = []

    def fake_generate(model, tokenizer, prompts, settings, **kw):
        asked.append(prompts[0])
        return ["a b"]

    monkeypatch.setattr(generation, "generate", fake_generate)
    lines = iter(["Copy: a b", "Now reverse it.", "/exit"])
    chat_session(None, tok, template, SamplingSettings(), read=lambda _: next(lines), write=lambda _: None,
                 system="Be brief.")
    assert ids(asked[1]) == history


def test_serve_renders_a_chat_history_as_sft_trains_it():
    """The tiny preset served: a request carrying the system turn and the first exchange asks exactly the
    tokens an SFT row of the same conversation has before its last answer."""
    from posttrain.data.templates import encode_record, resolve_template
    from posttrain.inference import load_for_inference
    from posttrain.serve.engine import Engine
    from posttrain.serve.protocol import Limits, Request

    model, tok = load_for_inference("tiny")
    engine = Engine(model, tok, {"m": None}, resolve_template(tok, "auto"), Limits(max_tokens=4), idle_exit_s=5.0)
    engine._start_worker = lambda: None  # render and queue only; nothing is generated
    job = engine.submit(Request(kind="chat", model="m", messages=CONVERSATION[:4], max_tokens=2, temperature=0.0))
    sft = encode_record(Record(messages=CONVERSATION, source="x"), tok, resolve_template(tok, "auto"))
    assert job.choices[0].prompt_ids == sft.input_ids[: _runs(sft)[-1][0]]


# --------------------------------------------------------------------------- the held-out split


def test_no_held_out_answer_is_trained_inside_a_longer_conversation_with_the_same_opening(tmp_path):
    """OpenAssistant-style data: ten openings, each as a one-exchange row and as that exchange followed by a
    second one. SFT trains every assistant turn, so the two rows of an opening both train its first answer;
    README: rows that ask the same thing go to one side, "so no held-out prompt is trained on". Measured: no
    held-out label token may be one training predicts from the same tokens before it."""
    from transformers import AutoTokenizer

    from posttrain.config import SFTConfig
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.models.presets import preset_path

    rows = []
    for a, b in zip("abcdefghij", "qrstuvwxyz"):
        opening = [U(f"Copy: {a} {b}"), A(f"{a} {b}")]
        rows += [{"messages": opening}, {"messages": [*opening, U("Now reverse it."), A(f"{b} {a}")]}]
    path = _write(tmp_path / "tree.jsonl", rows)
    cfg = SFTConfig.from_dict({"output_dir": str(tmp_path / "run"), "model": {"path": "tiny"},
                               "data": {"train_files": [str(path)], "eval_fraction": 0.3, "max_length": 64}})
    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    data = prepare_sft_data(cfg.data, tok, None, 0, log=lambda _: None)

    def predicted(example) -> set:
        return {(tuple(example.input_ids[:i]), label) for i, label in enumerate(example.labels) if label != IGNORE_INDEX}

    trained = set().union(*map(predicted, data.train))
    assert data.eval, "nothing was held out"
    seen = [(e.source, len(predicted(e) & trained), e.num_label_tokens) for e in data.eval if predicted(e) & trained]
    held = sum(e.num_label_tokens for e in data.eval)
    assert not seen, (f"{sum(n for _, n, _ in seen)} of {held} held-out label tokens are trained from the same "
                      f"context, in {len(seen)} of {len(data.eval)} held-out rows: {seen}")


# --------------------------------------------------------------------------- a row's system key


def test_a_conversation_rows_system_key_is_its_system_turn_or_a_bad_row(tmp_path):
    """The same `system` key puts a system turn first in a pair of whole conversations; on a `messages` (or
    ShareGPT `conversations`) row, SFT and the RL prompt reader must do the same, or refuse the row naming it,
    never train or ask the conversation without it."""
    from posttrain.data.formats import load_records
    from posttrain.data.preferences import load_preference_records
    from posttrain.data.prompts import load_prompt_records
    from posttrain.errors import DataError

    french = {"role": "system", "content": "Answer in French."}
    pairs = _write(tmp_path / "pairs.jsonl", [{"system": french["content"], "chosen": [U("Hi"), A("Bonjour")],
                                               "rejected": [U("Hi"), A("Hello")]}])
    assert load_preference_records([str(pairs)], log=lambda _: None)[0][0].prompt == [french, U("Hi")]

    row = {"system": french["content"], "conversations": [{"from": "human", "value": "Hi"},
                                                          {"from": "gpt", "value": "Bonjour"}]}
    chat = _write(tmp_path / "sharegpt.jsonl", [row])
    read = {}
    for name, load in (("sft", lambda: load_records([str(chat)], log=lambda _: None)[0][0].messages),
                       ("rl", lambda: load_prompt_records([str(chat)], log=lambda _: None)[0][0].prompt)):
        try:
            read[name] = load()
        except DataError as exc:
            read[name] = str(exc)
    assert read["sft"][0] == french or (isinstance(read["sft"], str) and f"{chat}:1" in read["sft"]
                                       and "system" in read["sft"]), f"sft read the row as {read['sft']!r}"
    assert read["rl"][0] == french or (isinstance(read["rl"], str) and f"{chat}:1" in read["rl"]
                                      and "system" in read["rl"]), f"rl read the row as {read['rl']!r}"


# --------------------------------------------------------------------------- generate on conversation files


@pytest.mark.parametrize("row", [
    {"messages": CONVERSATION},  # an SFT file handed to generate: the last answer is the reference
    {"prompt": "Copy: a b", "system": "Be brief."},
], ids=["ends-with-answer", "system-key"])
def test_generate_asks_a_row_as_the_rl_prompt_reader_asks_it(row, capsys, monkeypatch, tmp_path):
    """README: generate reads turns "as training reads them". The text it hands the model is the prompt
    grpo would ask for the same row (`prompts.encode_prompts`), or the row is refused naming its file:line."""
    from transformers import AutoTokenizer

    import posttrain.rollout.generate as generation
    from posttrain.data.prompts import load_prompt_records
    from posttrain.data.templates import render, resolve_template
    from posttrain.models.presets import preset_path

    prompts = _write(tmp_path / "prompts.jsonl", [row])
    asked = []

    def fake_generate(model, tokenizer, texts, settings, **kw):
        asked.extend(texts)
        for i in range(len(texts)):
            kw["on_done"](i, "x")
        return ["x"] * len(texts)

    monkeypatch.setattr(generation, "generate", fake_generate)
    monkeypatch.chdir(ROOT)
    rc, out, escaped = _cli(capsys, "generate", "--model", "tiny", "--prompts", prompts,
                            "--output", tmp_path / "out.jsonl", "--max-new-tokens", 2)
    assert escaped is None, f"traceback: {type(escaped).__name__}: {escaped}"
    if rc == 2:
        assert f"{prompts}:1" in out, out[-400:]
        return
    tok = AutoTokenizer.from_pretrained(preset_path("tiny"))
    record = load_prompt_records([str(prompts)], log=lambda _: None)[0][0]
    rl = render(tok, resolve_template(tok, "auto"), record.prompt, True, record.source, record.tools)
    assert rc == 0 and asked == [rl], f"generate asked {asked!r}; grpo asks {rl!r}"
