"""Agent rows beyond training (stop 31): `posttrain quality` on SFT and preference files whose turns call tools
(one text per turn for the checks, PII redacted inside call arguments, kept rows written in their own shape,
token checks rendered with the row's tools), and exact match / `posttrain evaluate` on rows with tools (prompts
as transformers renders them with tools=..., answers that are tool calls not scored)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.test_walkthrough_agentdata import ASK, CALL_LONDON, CALL_PARIS, TOOL_TEMPLATE, TOOLS

RESULT = {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "sunny, 24C"}
CALLING = {"role": "assistant", "content": None, "tool_calls": [CALL_PARIS]}
ANSWER = {"role": "assistant", "content": "It is sunny in Paris."}
TRAJECTORY = [ASK, CALLING, RESULT, ANSWER]
QUIET = {"log": lambda _: None}


def _jsonl(path: Path, rows: list) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _call(name: str, arguments) -> dict:
    return {"id": "call_9", "type": "function", "function": {"name": name, "arguments": arguments}}


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory) -> str:
    """The tiny model saved with the tool-aware template as its tokenizer's chat template."""
    from posttrain.inference import load_for_inference

    root = tmp_path_factory.mktemp("agent-model")
    model, tokenizer = load_for_inference("tiny")
    tokenizer.chat_template = TOOL_TEMPLATE
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return str(root)


# --------------------------------------------------------------------------- texts


def test_a_message_gives_one_text_reasoning_content_then_each_call():
    from posttrain.data.quality.rows import message_text

    message = {"content": "Let me check.", "reasoning_content": "Paris is in France.",
               "tool_calls": [CALL_PARIS, _call("get_time", {"zone": "CET"})]}
    assert message_text(message) == ('Paris is in France.\nLet me check.\n```\nget_weather({"city": "Paris"})\n```\n'
                                     '```\nget_time({"zone": "CET"})\n```')
    assert message_text({"content": "", "tool_calls": [CALL_PARIS]}) == '```\nget_weather({"city": "Paris"})\n```'
    assert message_text("plain text") == "plain text"


def test_texts_of_an_agent_sft_row_and_preference_row():
    from posttrain.data.formats import to_record
    from posttrain.data.preferences import to_preference_record
    from posttrain.data.quality.rows import texts

    skipped = {"role": "assistant", "content": "Hmm.", "weight": 0}
    record = to_record({"messages": [ASK, skipped, {"role": "user", "content": "Well?"}, CALLING, RESULT, ANSWER],
                        "tools": TOOLS}, "messages")
    prompt, response, full, turns = texts(record)
    assert prompt == "Weather in Paris?\nWell?\nsunny, 24C"  # user and tool turns
    # the calling turn and the answer; the turn marked out of the loss is context
    assert response == '```\nget_weather({"city": "Paris"})\n```\nIt is sunny in Paris.'
    assert "Hmm." in full and "get_weather" in full and turns == 6
    assert "Current weather" not in full  # the tools' definitions are in no text (module docstring)
    pair = to_preference_record({"prompt": [ASK], "chosen": [{"role": "assistant", "tool_calls": [CALL_PARIS]}],
                                 "rejected": [{"role": "assistant", "tool_calls": [CALL_LONDON]}], "tools": TOOLS},
                                "pairs")
    prompt, response, full, _ = texts(pair)
    assert response == '```\nget_weather({"city": "Paris"})\n```' and "London" in full and "London" not in response


def test_long_structured_call_arguments_are_not_dropped_as_repetition():
    from posttrain.config.quality import FilterConfig
    from posttrain.data.formats import to_record
    from posttrain.data.quality import filters
    from posttrain.data.quality.rows import texts

    rows = [{"id": i, "status": "open", "owner": "team-a", "priority": "low"} for i in range(12)]
    turn = {"role": "assistant", "content": "", "tool_calls": [_call("update_tickets", {"tickets": rows})]}
    prompt, response, _, _ = texts(to_record({"messages": [ASK, turn]}, "messages"))
    assert filters.check(prompt, response, FilterConfig()) is None
    # the same arguments as prose are dropped: the fence is what sets them aside
    assert filters.check(prompt, response.replace("```", ""), FilterConfig())[0] == "repetition"


# --------------------------------------------------------------------------- the quality pass


def _quality(tmp_path: Path, files: list[str], *overrides: str) -> Path:
    from posttrain.config.quality import QualityConfig
    from posttrain.data.quality.run import run_quality

    cfg = QualityConfig.load(None, [f"output_dir={tmp_path / 'q'}", f"data.files={json.dumps(files)}", *overrides])
    return run_quality(cfg, **QUIET)


def test_quality_on_an_agent_sft_file(tmp_path, tool_model):
    secret = _call("send_email", json.dumps({"to": "bob@example.com", "body": "hi"}))
    as_object = _call("send_email", {"to": "eve@example.org", "body": "hi"})
    rows = [
        {"messages": TRAJECTORY, "tools": TOOLS},
        {"messages": TRAJECTORY, "tools": TOOLS},  # an exact duplicate
        {"messages": [ASK, {"role": "assistant", "content": "", "tool_calls": [secret]}], "tools": TOOLS},
        {"messages": [{"role": "user", "content": "Mail Eve."}, {"role": "assistant", "tool_calls": [as_object]}]},
        {"messages": [ASK, RESULT, ANSWER]},  # a tool turn that answers no call: malformed
        {"messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "Hi there!"}]},
    ]
    out = _quality(tmp_path, [_jsonl(tmp_path / "agent.jsonl", rows)], "data.bad_rows=skip",
                   "data.max_bad_fraction=0.5", "pii.action=redact", f"tokens.tokenizer={tool_model}")
    report = json.loads((out / "report.json").read_text())
    s = report["summary"]
    assert (s["rows"], s["kept"], s["dropped"], s["malformed"]) == (6, 4, 1, 1)
    assert s["dropped_by_reason"] == {"exact_duplicate": 1}
    kept = _read(out / "kept.jsonl")
    assert kept[0] == rows[0] and kept[3] == rows[5]  # written as read
    # redacted inside the arguments, the row in its own shape: JSON text stays JSON text, an object an object
    redacted = kept[1]["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert json.loads(redacted) == {"to": "<EMAIL>", "body": "hi"}
    assert kept[2]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"to": "<EMAIL>", "body": "hi"}
    assert kept[1]["tools"] == TOOLS and report["pii"]["matches"] == {"email": 2}
    # the token checks render each row with its tools, as training does
    tokens = report["tokens"]
    assert (tokens["unrenderable"], tokens["no_label_tokens"]) == (0, 0)


def test_pii_in_escaped_call_arguments_is_read_as_the_tool_reads_it(tmp_path):
    key = "-----BEGIN RSA PRIVATE KEY-----\n" + "MIIEowIBAAKCAQEA" * 4 + "\n-----END RSA PRIVATE KEY-----"
    call = _call("write_file", json.dumps({"path": "id_rsa", "text": key}))
    untouched = _call("write_file", json.dumps({"path": "notes.txt", "text": "a\nb"}, indent=2))
    rows = [{"messages": [ASK, {"role": "assistant", "content": "Saving.", "tool_calls": [call, untouched]}]}]
    out = _quality(tmp_path, [_jsonl(tmp_path / "a.jsonl", rows)], "pii.action=redact")
    (kept,) = _read(out / "kept.jsonl")
    calls = kept["messages"][1]["tool_calls"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"path": "id_rsa", "text": "<SECRET>"}
    assert calls[1] == untouched  # no PII: the text as written, indentation included


def test_quality_on_an_agent_preference_file_from_the_cli(tmp_path, tool_model):
    from posttrain.cli import main

    calls = lambda call: [{"role": "assistant", "content": "", "tool_calls": [call]}]  # noqa: E731
    rows = [
        {"prompt": [ASK], "chosen": calls(CALL_PARIS), "rejected": calls(CALL_LONDON), "tools": TOOLS},
        {"prompt": [ASK, CALLING, RESULT], "chosen": "It is sunny in Paris.", "rejected": "It rains.",
         "tools": TOOLS},
        {"prompt": [ASK], "chosen": [{"role": "assistant", "content": "Checking.", "reasoning_content": "Paris.",
                                      "tool_calls": [CALL_PARIS]}], "rejected": "I don't know.", "tools": TOOLS},
        {"prompt": [ASK], "chosen": calls(CALL_PARIS), "rejected": calls(CALL_LONDON), "tools": TOOLS},  # duplicate
    ]
    data = _jsonl(tmp_path / "pairs.jsonl", rows)
    code = main(["quality", f"output_dir={tmp_path / 'q'}", f"data.files=[{data}]", f"tokens.tokenizer={tool_model}"])
    assert code == 0
    report = json.loads((tmp_path / "q" / "report.json").read_text())
    s = report["summary"]
    assert (s["rows"], s["kept"], s["dropped"], s["malformed"]) == (4, 3, 1, 0)
    assert s["dropped_by_reason"] == {"exact_duplicate": 1}
    assert _read(tmp_path / "q" / "kept.jsonl") == rows[:3]  # tool calls, reasoning and tools kept as read
    assert (report["tokens"]["unrenderable"], report["tokens"]["no_label_tokens"]) == (0, 0)


def test_token_checks_count_rows_whose_tools_the_template_does_not_render(tmp_path):
    """tiny's own ChatML template renders no tools: such rows are counted unrenderable, by file:line."""
    rows = [{"prompt": [ASK], "chosen": "Sunny.", "rejected": "Rainy.", "tools": TOOLS},
            {"prompt": [ASK], "chosen": "Sunny.", "rejected": "Rainy."}]
    out = _quality(tmp_path, [_jsonl(tmp_path / "p.jsonl", rows)], "tokens.tokenizer=tiny")
    tokens = json.loads((out / "report.json").read_text())["tokens"]
    assert tokens["unrenderable"] == 1 and "p.jsonl:1" in tokens["first"]["unrenderable"][0]
    assert "'tools'" in tokens["first"]["unrenderable"][0]


def test_perplexity_scores_an_agent_preference_row_rendered_with_its_tools(tmp_path, tool_model):
    from posttrain.config.quality import QualityConfig
    from posttrain.data.quality.perplexity import score_rows
    from posttrain.data.quality.rows import convert

    row = {"prompt": [ASK], "chosen": [{"role": "assistant", "tool_calls": [CALL_PARIS]}], "rejected": "No.",
           "tools": TOOLS}
    cfg = QualityConfig.load(None, [f"perplexity.model={tool_model}"]).perplexity
    (score,), _, _ = score_rows([convert(row, "pairs", "p.jsonl:1")], cfg, lambda _: None)
    assert not score.not_scored and score.perplexity > 0 and score.tokens > 0


# --------------------------------------------------------------------------- exact match


def _tool_records():
    from posttrain.data.formats import to_record

    return [to_record({"messages": TRAJECTORY, "tools": TOOLS}, "messages", "a.jsonl:1"),
            to_record({"messages": [ASK, CALLING], "tools": TOOLS}, "messages", "a.jsonl:2"),
            to_record({"messages": [ASK, {"role": "assistant", "content": "Sunny.", "tool_calls": [CALL_PARIS]}],
                       "tools": TOOLS}, "messages", "a.jsonl:3"),
            to_record({"messages": [ASK, {"role": "assistant", "content": "Sunny.", "reasoning_content": "Hm."}],
                       "tools": TOOLS}, "messages", "a.jsonl:4")]


def test_exact_match_prompts_are_rendered_with_the_rows_tools(tool_model):
    from posttrain.eval.exact_match import answered, prompts_and_answers
    from posttrain.models.loading import load_tokenizer

    tok = load_tokenizer(tool_model)
    records = _tool_records()
    # an answer that calls a tool, or carries reasoning, is no text answer: not scored
    assert answered(records) == records[:1]
    prompts, answers = prompts_and_answers(records, TOOL_TEMPLATE, tok)
    assert answers == ["It is sunny in Paris."]
    expected = tok.apply_chat_template(TRAJECTORY[:3], tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=True,
                                       add_generation_prompt=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # a BatchEncoding in transformers 5
    assert tok(prompts[0], add_special_tokens=False)["input_ids"] == list(expected)
    assert "get_weather" in prompts[0] and "<tools>" in prompts[0]


def test_exact_match_scores_only_text_answers(tool_model):
    from posttrain.eval.exact_match import exact_match
    from posttrain.inference import load_for_inference

    model, tok = load_for_inference(tool_model)
    records = _tool_records()
    assert exact_match(model, tok, TOOL_TEMPLATE, records[1:], max_new_tokens=4) == {}  # nothing to score
    assert set(exact_match(model, tok, TOOL_TEMPLATE, records, max_new_tokens=4)) == {"all"}


# --------------------------------------------------------------------------- evaluate


def _evaluate_cfg(tmp_path: Path, policy: str, files: str):
    from posttrain.config.evaluate import EvaluateConfig

    return EvaluateConfig.load(None, [f"output_dir={tmp_path / 'ev'}", f"policy={policy}", f"prompts.files=[{files}]",
                                      "generation.max_new_tokens=4", "generation.samples=0",
                                      "prompts.max_prompt_length=1024"])


def test_evaluate_asks_and_scores_rows_with_their_tools(tmp_path, tool_model):
    from posttrain.data.prompts import load_prompt_records
    from posttrain.eval.alignment import _load_side, run_evaluate

    messages = _jsonl(tmp_path / "messages.jsonl", [
        {"messages": TRAJECTORY, "tools": TOOLS},
        {"messages": [ASK, CALLING], "tools": TOOLS},  # answered with a call alone: no text answer
    ])
    prompts = _jsonl(tmp_path / "prompts.jsonl", [{"prompt": [ASK], "answer": "Sunny.", "tools": TOOLS}])
    cfg = _evaluate_cfg(tmp_path, tool_model, f"{messages},{prompts}")
    records, _ = load_prompt_records([messages, prompts], bad_rows="error", max_bad_fraction=0.0, log=lambda _: None)
    side, kept = _load_side("policy", tool_model, cfg, records, lambda _: None)
    model, tok = side.model, side.tokenizer
    assert len(kept) == 3
    for record, ids in zip(kept, side.prompt_ids):
        expected = tok.apply_chat_template(record.prompt, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False,
                                           add_generation_prompt=True)
        assert ids == tok(expected, add_special_tokens=False)["input_ids"]

    out = run_evaluate(cfg, **QUIET)
    report = json.loads((out / "report.json").read_text())
    figures = report["models"]["policy"]
    assert report["prompts"] == 3 and figures["exact_match"]["n"] == 2  # the call-only answer is no text answer
    assert records[1].answer is None
    rows = _read(out / "responses.jsonl")
    assert all(r["tools"] == TOOLS for r in rows)
    # the reference-answer NLL by hand: prompt rendered with the tools, the answer's tokens after it
    total, count = 0.0, 0
    for record in (records[0], records[2]):
        text = tok.apply_chat_template(record.prompt, tools=TOOLS, chat_template=TOOL_TEMPLATE, tokenize=False,
                                       add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        answer = tok(record.answer, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logps = torch.log_softmax(model(torch.tensor([prompt + answer])).logits[0].double(), -1)
        for j, token in enumerate(answer):
            total -= float(logps[len(prompt) + j - 1, token])
            count += 1
    assert figures["answer_nll"] == pytest.approx(total / count, rel=1e-4)
