"""generate and score, stop 35 (round 2): a prompt row is read as RL's prompt reader reads it
(`inference.prompt_record`), so generate's output rows score as they are; score hands a row's tools
to reward functions and reward models; template errors name the flag the user gave; help texts name
the keys the prompt reader takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from posttrain.errors import DataError, UserError
from tests.cli_runner import run_cli
from tests.test_walkthrough_agentdata import ASK, TOOL_TEMPLATE, TOOLS

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = {"role": "system", "content": "Be brief."}
CONVERSATION = [SYSTEM, {"role": "user", "content": "Copy: a b"}, {"role": "assistant", "content": "a b"},
                {"role": "user", "content": "Now reverse it."}, {"role": "assistant", "content": "b a"}]

SEEN = '''
def seen(prompt, response, row):
    """What the reward was handed: the prompt's turns, its system turn, the row's answer and tools."""
    return (10 * len(prompt) + (prompt[0]["role"] == "system") + 100 * (row.get("answer") == "b a")
            + 1000 * len(row.get("tools") or []))
'''


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --------------------------------------------------------------------------- generate -> score


@pytest.mark.parametrize("row, reward", [
    ({"messages": CONVERSATION}, 10 * 4 + 1 + 100),  # asked after u2; the last answer is the reference
    ({"prompt": "Copy: a b", "system": "Be brief."}, 10 * 2 + 1),
    ({"question": "Name a colour.", "solution": "b a"}, 10 * 1 + 100),  # GSM8K's / MATH's keys
], ids=["messages", "system-key", "question"])
def test_generate_output_rows_score_as_they_are(row, reward, capsys, monkeypatch, tmp_path):
    """`posttrain generate` then `posttrain score` on its output: score reads the prompt generate asked
    (the turns before a conversation's last answer, a system key's turn) and hands the reward the row's
    reference answer, as RL does."""
    (tmp_path / "seen_reward.py").write_text(SEEN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts, generated, scored = _write(tmp_path / "p.jsonl", [row]), tmp_path / "g.jsonl", tmp_path / "s.jsonl"
    rc, out = run_cli(capsys, "generate", "--model", "tiny", "--prompts", prompts, "--output", generated,
                      "--max-new-tokens", 2, "--temperature", 1)  # seeded: a completion not blank, which
    assert rc == 0, out[-400:]                                         # score refuses
    [written] = [json.loads(line) for line in generated.read_text().splitlines()]
    assert written == {**row, "completion": written["completion"]}  # the row as given, and its completion
    rc, out = run_cli(capsys, "score", "--function", "seen=seen_reward:seen", "--input", generated,
                      "--output", scored)
    assert rc == 0, out[-400:]
    [result] = [json.loads(line) for line in scored.read_text().splitlines()]
    assert result == {**written, "reward": reward}


def test_score_hands_a_rows_tools_to_reward_functions(capsys, monkeypatch, tmp_path):
    (tmp_path / "seen_reward.py").write_text(SEEN)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": "Weather in Paris?", "tools": TOOLS, "response": "Sunny."}])
    rc, out = run_cli(capsys, "score", "--function", "seen=seen_reward:seen", "--input", rows)
    assert rc == 0, out[-400:]
    assert json.loads(out.strip().splitlines()[-1])["reward"] == 1000 + 10


def test_score_names_a_row_it_cannot_read_as_a_prompt_row(capsys, tmp_path):
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": "q", "response": "a"},
                                            {"messages": [CONVERSATION[2]], "response": "a"}])
    rc, out = run_cli(capsys, "score", "--function", "len=tests.rewards_fixture:short", "--input", rows)
    assert rc == 2 and f"{rows}:2: the first turn is the assistant's" in out, out[-400:]


# --------------------------------------------------------------------------- a reward model sees the tools


@pytest.fixture(scope="module")
def tool_rm(tmp_path_factory):
    """tiny-2l as a reward model with a trained-looking head, its tokenizer carrying a template that
    renders tools (Qwen2.5-like)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from posttrain.models.loading import load_tokenizer
    from posttrain.models.presets import preset_path

    tokenizer = load_tokenizer("tiny-2l")
    tokenizer.chat_template = TOOL_TEMPLATE
    config = AutoConfig.from_pretrained(preset_path("tiny-2l"), num_labels=1, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_config(config)
        torch.nn.init.normal_(model.score.weight)
    out = tmp_path_factory.mktemp("s35r2rm") / "rm"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_a_reward_model_scores_a_row_with_its_tools_rendered(tool_rm, capsys, tmp_path):
    """RL hands a reward model the prompt row (`PromptRecord.reward_row`: its tools among it), and score
    the row read: the model reads the prompt with the tools rendered, as `posttrain rm` trained on them."""
    from posttrain.data.preferences import encode_response
    from posttrain.models.reward_model import score
    from posttrain.rewards import RewardModelScorer

    scorer = RewardModelScorer(str(tool_rm))
    with_tools = scorer([[ASK]], ["Sunny."], rows=[{"tools": TOOLS}])[0]
    assert with_tools != pytest.approx(scorer([[ASK]], ["Sunny."], rows=[{}])[0], abs=1e-6)
    ids = encode_response([ASK], "Sunny.", scorer.tokenizer, TOOL_TEMPLATE, tools=TOOLS).input_ids
    with torch.no_grad():
        direct = float(score(scorer.model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long))[0])
    assert with_tools == pytest.approx(direct, abs=1e-5)
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": "Weather in Paris?", "tools": TOOLS, "response": "Sunny."}])
    rc, out = run_cli(capsys, "score", "--model", tool_rm, "--input", rows)
    assert rc == 0, out[-400:]
    assert json.loads(out.strip().splitlines()[-1])["reward"] == pytest.approx(with_tools, abs=1e-5)


def test_a_reward_model_whose_template_drops_the_tools_is_refused_naming_the_row(tool_rm, capsys, tmp_path):
    rows = _write(tmp_path / "rows.jsonl", [{"prompt": "Hi", "response": "Hello."},
                                            {"prompt": "Weather in Paris?", "tools": TOOLS, "response": "Sunny."}])
    rc, out = run_cli(capsys, "score", "--model", tool_rm, "--template", "chatml", "--input", rows)
    assert rc == 2 and f"{rows}:2: reward 'reward_model'" in out and "does not render the row's 'tools'" in out, \
        out[-400:]


# --------------------------------------------------------------------------- generate's reading of a row


def test_generate_reads_a_row_as_rl_does_and_names_a_bad_one(tmp_path):
    from posttrain.inference import prompt_record, read_prompt_rows

    record = prompt_record({"messages": CONVERSATION, "id": 7}, "p.jsonl:1")
    assert record.prompt == CONVERSATION[:4] and record.answer == "b a" and record.fields == {"id": 7}
    assert prompt_record({"problem": "2+2?", "solution": "4"}).prompt == [{"role": "user", "content": "2+2?"}]
    assert prompt_record({"instruction": "Say hi"}).prompt == [{"role": "user", "content": "Say hi"}]
    with pytest.raises(DataError, match=r"^p\.jsonl:1: 'prompt' ends with an assistant turn"):
        prompt_record({"prompt": CONVERSATION[1:3]}, "p.jsonl:1")
    bad = _write(tmp_path / "p.jsonl", [{"prompt": "fine"}, {"text": "no prompt"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: expected an object with 'prompt' or 'messages'"):
        read_prompt_rows(str(bad))


def test_template_none_takes_one_plain_text_and_refuses_a_system_turn():
    from posttrain.inference import render

    assert render({"prompt": "The capital of France is "}, None, None, "p.jsonl:1") == "The capital of France is "
    assert render({"messages": [CONVERSATION[1]]}, None, None) == "Copy: a b"
    with pytest.raises(DataError, match=r"^p\.jsonl:2: --template none needs plain prompts .*system turn"):
        render({"prompt": "x", "system": "Be brief."}, None, None, "p.jsonl:2")


# --------------------------------------------------------------------------- templates: names, flags


class _NoTemplate:
    chat_template = None
    bos_token_id = None


def test_template_errors_name_the_setting_the_user_gave():
    from posttrain.data.templates import resolve_template
    from posttrain.inference import chat_template

    with pytest.raises(UserError, match=r"^data\.template is 'tokenizer' .*set data\.template: chatml"):
        resolve_template(_NoTemplate(), "tokenizer")
    with pytest.raises(UserError, match=r"^--template is 'tokenizer' .*set --template chatml \(or alpaca\)"):
        chat_template(_NoTemplate(), "tokenizer")
    with pytest.raises(UserError, match=r"^unknown --template 'chatm'; choose one of auto, tokenizer, chatml"):
        resolve_template(_NoTemplate(), "chatm", "--template")


def test_chat_template_none_is_refused_with_the_names_it_takes(capsys):
    rc, out = run_cli(capsys, "chat", "--model", "tiny", "--template", "none")
    assert rc == 2 and "--template auto|tokenizer|chatml|alpaca" in out, out[-400:]


def test_the_template_argument_without_none_for_score():
    import argparse

    from posttrain.inference import add_template_argument

    for none, names in ((True, ["auto", "tokenizer", "chatml", "alpaca", "none"]),
                        (False, ["auto", "tokenizer", "chatml", "alpaca"])):
        parser = argparse.ArgumentParser()
        add_template_argument(parser, none=none)
        action = next(a for a in parser._actions if a.dest == "template")
        assert list(action.choices) == names and ("none:" in action.help) == none


# --------------------------------------------------------------------------- help texts


def test_help_texts_name_the_keys_the_prompt_reader_takes():
    import dataclasses

    from posttrain.config.evaluate import EvalPromptsConfig
    from posttrain.config.quality import DecontaminateConfig
    from posttrain.config.rl import PromptDataConfig
    from posttrain.rewards import missing_row_key

    for config, key in ((PromptDataConfig, "format"), (EvalPromptsConfig, "files"), (DecontaminateConfig, "files")):
        said = next(f for f in dataclasses.fields(config) if f.name == key).metadata["help"]
        assert all(name in said for name in ("'question'", "'problem'", "'solution'")), (config, said)

    class Record:
        source, fields = "p.jsonl:1", {"id": 1}

        def reward_row(self):
            return {"id": 1, "answer": None}

    hint = missing_row_key({"em": type("R", (), {"row_keys": ("answer",)})()}, [Record()])
    assert "e.g. 'target', renamed" in hint

