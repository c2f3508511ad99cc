"""AI feedback, stop 35 (backlog items): a resume of an RLAIF, Constitutional AI or Self-Instruct run
whose local model was retrained in place is refused, naming the model (its files are recorded with
the run's settings); Self-Instruct drops instructions that begin with punctuation or a symbol (Wang
et al. 2023) and cuts the markdown and lead-ins around a "Task 9:" label; an RLAIF run begun before
the policy was given the rows' tools is not resumed over prompts that have tools."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from posttrain.config.feedback import RLAIFConfig
from posttrain.config.synthesis import SelfInstructFilterConfig
from posttrain.errors import ConfigError
from posttrain.feedback.constitutional import run_constitutional
from posttrain.feedback.jobs import MODEL_FILES, check_resume_settings
from posttrain.feedback.rlaif import TOOLS_TO_POLICY, result_settings, run_rlaif
from posttrain.feedback.self_instruct import clean_instruction, instruction_rejection, run_self_instruct
from tests.test_constitutional import FakePolicy, write_prompts
from tests.test_constitutional import config as cai_config
from tests.test_self_instruct import FakeGenerator
from tests.test_self_instruct import config as self_instruct_config

TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _retrain_in_place(model: Path) -> None:
    """Another model under the same name: one byte of the weights changed (size kept)."""
    weights = next(model.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))


def _fake_model_dir(path: Path) -> Path:
    """A directory standing for a local model: the runs below never load it (their backends are given)."""
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    return path


# --------------------------------------------------------------------------- a local model retrained in place


def test_rlaif_resume_refuses_a_local_policy_retrained_in_place(tmp_path):
    pytest.importorskip("torch")
    from posttrain.models.presets import preset_path

    model = tmp_path / "model"
    shutil.copytree(preset_path("tiny"), model)
    prompts = _write_rows(tmp_path / "p.jsonl", [{"prompt": "Copy: a b"}])
    cfg = {"output_dir": str(tmp_path / "run"), "data": {"prompt_files": [str(prompts)]},
           "policy": {"kind": "local", "model": str(model), "max_tokens": 2},
           "judge": {"kind": "local", "model": str(model), "max_tokens": 2, "parse_retries": 0},
           "rlaif": {"num_responses": 2, "concurrency": 1}}
    run_rlaif(RLAIFConfig.from_dict(cfg), log=lambda _: None)
    run_rlaif(RLAIFConfig.from_dict(cfg), log=lambda _: None)  # the same model: resumes
    _retrain_in_place(model)
    with pytest.raises(ConfigError, match=rf"local model judge.model='{model}', whose files have changed since "
                       r"\(retrained or replaced in place\); resuming would mix two models' outputs"):
        run_rlaif(RLAIFConfig.from_dict(cfg), log=lambda _: None)
    # a copy of the same files is the same model: the recorded identity is the contents, not the place
    shutil.rmtree(model)
    shutil.copytree(preset_path("tiny"), model)
    run_rlaif(RLAIFConfig.from_dict(cfg), log=lambda _: None)


def test_constitutional_and_self_instruct_resumes_refuse_a_changed_local_model(tmp_path):
    model = _fake_model_dir(tmp_path / "model")
    prompts = write_prompts(tmp_path / "p.jsonl", ["Say hi"])
    cai = cai_config(tmp_path / "cai", prompts, policy={"kind": "local", "model": str(model)})
    run_constitutional(cai, policy=FakePolicy(), stream=None)
    run_constitutional(cai, policy=FakePolicy(), stream=None)  # unchanged: resumes
    recorded = json.loads((tmp_path / "cai" / "settings.json").read_text())
    assert recorded["policy"][MODEL_FILES] is not None
    (model / "model.safetensors").write_bytes(b"weights, trained more")
    with pytest.raises(ConfigError, match=r"local model policy.model='fake-policy', whose files have changed"):
        run_constitutional(cai, policy=FakePolicy(), stream=None)

    model = _fake_model_dir(tmp_path / "generator")
    sic = self_instruct_config(tmp_path / "si", generator={"kind": "local", "model": str(model)},
                               self_instruct={"num_tasks": 2, "max_rounds": 1})
    run_self_instruct(sic, generator=FakeGenerator(), stream=None)
    (model / "config.json").write_text('{"retrained": true}')
    with pytest.raises(ConfigError, match=r"local model generator.model='.*generator', whose files have changed"):
        run_self_instruct(sic, generator=FakeGenerator(), stream=None)


def test_settings_recorded_before_model_files_were_kept_still_resume(tmp_path):
    model = _fake_model_dir(tmp_path / "model")
    cfg = RLAIFConfig.from_dict({"policy": {"kind": "local", "model": str(model)}})
    settings = result_settings(cfg, "")
    assert MODEL_FILES in settings["policy"] and MODEL_FILES not in settings["judge"]  # a served judge: a name only
    earlier = json.loads(json.dumps(settings))
    del earlier["policy"][MODEL_FILES]
    (tmp_path / "run.json").write_text(json.dumps(earlier))
    check_resume_settings(tmp_path, settings, resuming=True, name="run.json")  # no refusal: nothing to compare


# --------------------------------------------------------------------------- RLAIF: tools given to the policy


def test_rlaif_run_begun_before_tools_reached_the_policy_is_not_resumed_over_tool_rows(tmp_path):
    out = tmp_path / "run"
    prompts = _write_rows(tmp_path / "p.jsonl", [{"prompt": "What time is it?", "tools": [TOOL]},
                                                 {"prompt": "Say hi"}])
    cfg = RLAIFConfig.from_dict({"output_dir": str(out), "data": {"prompt_files": [str(prompts)]},
                                 "policy": {"base_url": "http://127.0.0.1:9/v1"},
                                 "judge": {"base_url": "http://127.0.0.1:9/v1"}})
    earlier = result_settings(cfg, "")  # as an earlier version recorded them
    del earlier[TOOLS_TO_POLICY]
    out.mkdir()
    (out / "run.json").write_text(json.dumps(earlier))
    (out / "raw.jsonl").write_text(json.dumps({"id": "x", "pairs": [], "responses": []}) + "\n")
    with pytest.raises(ConfigError, match=r"did not give the policy the rows' tools, and 1 prompts here have tools; "
                       "resuming would mix responses written without and with them"):
        run_rlaif(cfg, log=lambda _: None)
    # without tool rows nothing differs: the same recorded settings resume
    from posttrain.feedback.rlaif import load_prompts, tools_unrecorded

    plain = load_prompts([str(_write_rows(tmp_path / "q.jsonl", [{"prompt": "Say hi"}]))], log=lambda _: None)
    check_resume_settings(out, result_settings(cfg, ""), resuming=True, name="run.json",
                          unrecorded=tools_unrecorded(plain))


# --------------------------------------------------------------------------- Self-Instruct's instruction filters


def _candidate(text: str) -> dict:
    return {"instruction": text, "raw_instruction": text, "instruction_finish_reason": "stop"}


@pytest.mark.parametrize("text", ["- write a story about a cat", "(Write a short story about two dogs)",
                                  "...write a poem about the sea", "* Name three rivers in Europe",
                                  "“Name three rivers” is what I ask", "→ Translate this sentence into French"])
def test_an_instruction_beginning_with_punctuation_or_a_symbol_is_rejected(text):
    assert instruction_rejection(_candidate(text), SelfInstructFilterConfig()) == "starts_with_punctuation"


@pytest.mark.parametrize("text", ["Write a story about a cat", "3 ways to cook rice: list them with steps",
                                  "Écris un poème sur la mer", "写一首关于大海的诗歌", "ゆっくり読んで要約してください"])
def test_an_instruction_beginning_with_a_letter_or_digit_of_any_script_passes(text):
    assert instruction_rejection(_candidate(text), SelfInstructFilterConfig()) is None


@pytest.mark.parametrize("reply, instruction", [
    ("Task 9: Write a poem about the sea.", "Write a poem about the sea."),
    ("Instruction: Explain how rainbows form.", "Explain how rainbows form."),
    ("**Task 9: Write a poem about the sea.**", "Write a poem about the sea."),
    ("## Task 9: Write a poem about rain.", "Write a poem about rain."),
    ("### Instruction\nWrite a poem about snow.", "Write a poem about snow."),
    ("> Task 9: Name three rivers.", "Name three rivers."),
    ("Instructions: Describe a cat in detail.", "Describe a cat in detail."),
    ("Task #9: Describe a dog in detail.", "Describe a dog in detail."),
    ("Sure! Task 9: Write a poem about tea.", "Write a poem about tea."),
    ("Here is a new task: Write a poem about tea.", "Write a poem about tea."),
    ("Here's task 9: Sort the list.", "Sort the list."),
    # kept: text that only looks like a lead-in
    ("Explain the following task: sorting numbers by size.", "Explain the following task: sorting numbers by size."),
    ("Sure-footed animals: name three of them.", "Sure-footed animals: name three of them."),
    ("Here is a list: apples, pears. Sort it by length.", "Here is a list: apples, pears. Sort it by length."),
])
def test_a_task_label_and_the_markdown_or_lead_in_around_it_are_cut(reply, instruction):
    assert clean_instruction(reply) == instruction
