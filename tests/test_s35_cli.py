"""The command line's shared spellings (stop 35, backlog items): `serve` takes its model as
`--model` too (as generate and chat do) and `--template none` with generate's meaning (no chat
template, no end-of-turn marker; one rule, `inference.chat_template`); serve's `--dtype` choices
are the list the other commands use; a second config file is refused as such, naming both; a
`--template` error names the flag, not the config key; generate writes its JSONL as UTF-8 text."""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import pytest

from posttrain import cli
from posttrain.errors import UserError
from tests.cli_runner import run_cli


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[command]


def _option(command: str, flag: str) -> argparse.Action:
    return next(a for a in _subparser(command)._actions if flag in a.option_strings)


# ---- item 1: serve --model


def test_serve_takes_the_model_as_model_flag_too(capsys):
    # --max-batch-size 0 is refused after the model is named and before anything loads
    rc, text = run_cli(capsys, "serve", "--model", "tiny", "--max-batch-size", "0")
    assert rc == 2 and "--max-batch-size must be at least 1" in text, text
    rc, text = run_cli(capsys, "serve", "tiny", "--model", "tiny", "--max-batch-size", "0")
    assert rc == 2 and "--max-batch-size must be at least 1" in text, text


def test_serve_refuses_two_different_models_and_none(capsys):
    rc, text = run_cli(capsys, "serve", "tiny", "--model", "runs/other")
    assert rc == 2 and "tiny" in text and "runs/other" in text and len(text.strip().splitlines()) == 1, text
    rc, text = run_cli(capsys, "serve")
    assert rc == 2 and "--model" in text, text


def test_serve_help_says_model_is_also_a_flag():
    text = _subparser("serve").format_help()
    assert "--model MODEL" in text and "as generate and chat" in text


# ---- item 2: serve --template none


def test_serve_and_generate_take_the_same_template_names():
    assert _option("serve", "--template").choices == _option("generate", "--template").choices
    assert "none" in _option("serve", "--template").choices


def test_template_none_is_no_template_for_generate_and_serve(capsys):
    from posttrain.inference import chat_template

    assert chat_template(SimpleNamespace(chat_template=None), "none") is None
    rc, text = run_cli(capsys, "serve", "tiny", "--template", "none", "--max-batch-size", "0")
    assert rc == 2 and "--max-batch-size must be at least 1" in text, text


def test_serve_template_none_serves_raw_completions_and_refuses_chat(tmp_path):
    pytest.importorskip("torch")
    from posttrain.serve import build_server
    from posttrain.serve.protocol import APIError, Request
    from tests.test_walkthrough_tokenizers import build_family

    directory = build_family("gemma", tmp_path / "gemma")  # <end_of_turn> ends a turn, <eos> the text
    server = build_server(str(directory), served_model_name="m", template="none", port=0, log_requests=False)
    try:
        engine, tokenizer = server.engine, server.engine.tokenizer
        assert engine.template is None and engine.turn_stops == []
        assert engine.eos_ids == {tokenizer.convert_tokens_to_ids("<eos>")}  # no end-of-turn marker
        completion = Request(kind="completion", model="m", prompts=["hello"], max_tokens=2, temperature=0.0)
        assert engine.submit(completion) is not None
        chat = Request(kind="chat", model="m", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(APIError) as caught:
            engine.submit(chat)
        assert caught.value.status == 400 and "--template none" in str(caught.value)
    finally:
        server.close()


# ---- item 3: one dtype list


def test_serve_dtype_choices_are_the_list_every_command_uses():
    from posttrain.models.loading import _DTYPES

    for command in ("serve", "generate", "chat", "score"):
        assert _option(command, "--dtype").choices is _DTYPES, command


# ---- item 4: a second config file


def test_a_second_config_file_is_refused_as_such_naming_both(capsys, tmp_path):
    first, second = tmp_path / "a.yaml", tmp_path / "b.yaml"
    for path in (first, second):
        path.write_text("train:\n  lr: 1.0e-4\n")
    rc, text = run_cli(capsys, "sft", first, second, "train.max_steps=1")
    assert rc == 2 and "one config file" in text and str(first) in text and str(second) in text, text
    assert "among the overrides" not in text
    # a file after overrides only (no config given first) is still told to go first
    rc, text = run_cli(capsys, "sft", "train.max_steps=1", first)
    assert rc == 2 and "goes first" in text, text


# ---- item 5: the flag named, not data.template


def test_generate_unknown_template_names_the_flag_before_the_model_loads(capsys, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    rc, text = run_cli(capsys, "generate", "--model", "no/such/model", "--prompts", prompts, "--template", "bogus")
    assert rc == 2 and "--template" in text and "data.template" not in text, text


def test_tokenizer_template_missing_names_the_flag():
    from posttrain.inference import chat_template

    with pytest.raises(UserError) as caught:
        chat_template(SimpleNamespace(chat_template=None), "tokenizer")
    assert "--template" in str(caught.value) and "data.template" not in str(caught.value)
    with pytest.raises(UserError) as caught:
        chat_template(SimpleNamespace(chat_template=None), "tokenizer", flag="--judge-template")
    assert "--judge-template" in str(caught.value)


# ---- item 6: generate's JSONL as UTF-8 text


def test_generate_output_is_utf8_text_not_escaped(capsys, tmp_path):
    pytest.importorskip("torch")
    prompts, out = tmp_path / "p.jsonl", tmp_path / "out.jsonl"
    prompts.write_text(json.dumps({"prompt": "café ✓"}, ensure_ascii=False) + "\n", encoding="utf-8")
    rc, text = run_cli(capsys, "generate", "--model", "tiny", "--prompts", prompts, "--output", out,
                       "--max-new-tokens", "1")
    assert rc == 0, text
    data = out.read_bytes()
    assert "café ✓".encode() in data and b"\\u00e9" not in data
    assert json.loads(data.decode("utf-8"))["prompt"] == "café ✓"
