"""Small user-facing fixes found by walking the README as a newcomer (stop 28): a silent retry
loop, a missing reference found after minutes of loading, an adapter on another base, an adapter
path that does not exist, a negative sampled KL without a word."""

from __future__ import annotations

import socket

import pytest

from posttrain import cli
from posttrain.errors import UserError


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: nothing listens there


def test_the_first_retry_is_said_once(capsys):
    from posttrain.feedback.client import BackendError, OpenAICompatible

    client = OpenAICompatible(f"http://127.0.0.1:{_closed_port()}/v1", "m", max_retries=3, sleep=lambda s: None)
    for _ in range(2):
        with pytest.raises(BackendError, match="gave up after 3 retries"):
            client.chat([{"role": "user", "content": "hi"}])
    err = capsys.readouterr().err
    assert err.count("warning: POST") == 1 and "cannot connect" in err and "retrying (up to 3 times" in err


def test_a_missing_reference_is_said_before_the_policy_loads(tmp_path, monkeypatch):
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval import alignment

    def no_load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(alignment, "_load_side", no_load)
    cfg = EvaluateConfig.load(None, [f"output_dir={tmp_path}", "policy=tiny", f"reference={tmp_path / 'nope'}",
                                     "prompts.limit=2"])
    with pytest.raises(UserError, match=r"^reference: model path .*nope does not exist"):
        alignment.run_evaluate(cfg, log=lambda _: None)
    cfg = EvaluateConfig.load(None, [f"output_dir={tmp_path}", f"policy={tmp_path}", "prompts.limit=2"])
    with pytest.raises(UserError, match="^policy: .* has no config.json: it is not a Hugging Face model directory"):
        alignment.run_evaluate(cfg, log=lambda _: None)


def test_an_adapter_path_that_does_not_exist_says_so(tmp_path):
    from posttrain.models.adapters.io import read_layout

    with pytest.raises(UserError, match=f"adapter {tmp_path / 'nope'} does not exist"):
        read_layout(tmp_path / "nope")
    with pytest.raises(UserError, match="is not an adapter directory"):
        read_layout(tmp_path)


def test_an_adapter_loaded_onto_another_base_is_warned_about(tmp_path, monkeypatch, capsys):
    from posttrain import inference
    from posttrain.models.adapters import io
    from posttrain.models.presets import preset_path

    monkeypatch.setattr(io, "read_layout", lambda path: ("tiny", {}))
    inference._warn_other_base({"sql": "a"}, str(preset_path("tiny")))  # the preset by its name or its directory
    assert capsys.readouterr().err == ""
    inference._warn_other_base({"sql": "a"}, str(tmp_path))
    assert capsys.readouterr().err == f"warning: adapter sql was trained on tiny; it is loaded onto {tmp_path}\n"


def test_a_negative_sampled_kl_is_explained():
    from posttrain.eval.report import markdown

    report = {"policy": "p", "reference": "r", "prompts": 1, "models": {"policy": {}, "reference": {}}}
    assert "never below 0" in markdown({**report, "kl_to_reference": -0.04})
    assert "never below 0" not in markdown({**report, "kl_to_reference": 0.04})


def test_the_cai_alias_says_what_it_does(capsys):
    with pytest.raises(SystemExit):
        cli.main(["cai", "--help"])
    assert "critiqued and revised" in capsys.readouterr().out


def test_chat_help_and_unknown_commands_are_not_sent_to_the_model(monkeypatch):
    from posttrain.rollout import generate
    from posttrain.rollout.sampling import SamplingSettings

    sent = []
    monkeypatch.setattr(generate, "generate", lambda model, tok, prompts, settings, batch_size, template=None: sent.append(
        prompts[0]) or ["ok"])

    class Tok:
        def apply_chat_template(self, messages, **kwargs):
            return messages[-1]["content"]

    lines, written = iter(["/help", "/hlep", " /etc/hosts is a file", "/adapter x", "/exit"]), []
    generate.chat_session(None, Tok(), "t", SamplingSettings(), read=lambda _: next(lines), write=written.append)
    assert written[0].startswith("/reset: clear the history") and "no adapters loaded" in written[0]
    assert written[1].startswith("[unknown command /hlep; /help lists them")
    assert sent == ["/etc/hosts is a file"] and written[2] == "ok"
    assert written[3].startswith("usage: /adapter NAME")


def test_an_interrupted_stage_says_how_to_resume(monkeypatch, capsys):
    def interrupt(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_run", interrupt)
    assert cli.main(["sft"]) == 130
    assert "the same command resumes from the run's newest checkpoint" in capsys.readouterr().err
    assert cli.main(["generate", "--model", "tiny", "--prompts", "p", "--output", "-"]) == 130
    assert capsys.readouterr().err == "interrupted\n"


def test_a_config_file_after_an_override_is_named(capsys):
    assert cli.main(["sft", "train.max_steps=3", "examples/sft_full.yaml"]) == 2
    assert "the config file goes first: posttrain sft examples/sft_full.yaml key=value" in capsys.readouterr().err


def test_every_command_has_its_config_and_run_in_the_package():
    import subprocess
    import sys

    import posttrain

    assert {"RMConfig", "run_rm", "DPOConfig", "run_dpo", "GRPOConfig", "run_grpo", "PPOConfig", "run_ppo",
            "QualityConfig", "run_quality", "EvaluateConfig", "run_evaluate", "run_pipeline"} <= set(posttrain.__all__)
    for name in posttrain.__all__:
        assert getattr(posttrain, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        posttrain.nope  # noqa: B018
    cold = subprocess.run([sys.executable, "-c", "import posttrain, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True, check=True)
    assert cold.stdout.strip() == "False"  # the names are imported on first use


@pytest.mark.parametrize("command, override, message", [
    ("sft", "data.train_files=[nope.jsonl]", "data.train_files: nope.jsonl: no such file or directory"),
    ("dpo", "data.eval_files=[nope.jsonl]", "data.eval_files: nope.jsonl: no such file or directory"),
    ("sft", "forgetting.retain_files=[nope.jsonl]", "forgetting.retain_files: nope.jsonl: no such file"),
    ("grpo", "reward.functions=[em=posttrain.rewardz:exact_match]", "cannot be imported"),
])
def test_a_missing_data_file_or_reward_function_is_said_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                                command, override, message):
    from posttrain.train import sft

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sft, "build_model", no_model)
    monkeypatch.chdir(tmp_path)
    assert cli.main([command, override, f"output_dir={tmp_path / 'run'}"]) == 2
    assert message in capsys.readouterr().err


def test_a_stopped_red_team_report_says_how_many_requests_were_never_sent():
    from posttrain.safety.report import markdown

    report = {"target": "m", "classifier": "patterns", "requests": 10, "answered": 6, "failed": 1,
              "truncated_responses": 0, "labels": {}}
    assert "3 not sent (the run stopped first; rerun to send them)" in markdown(report)
    assert "not sent" not in markdown({**report, "answered": 9})


def test_a_red_team_judge_naming_the_target_s_local_model_shares_its_weights(tmp_path, monkeypatch):
    from posttrain.config.safety import RedTeamConfig
    from posttrain.feedback import client
    from posttrain.safety.run import run_redteam

    loads = []
    init = client.LocalModel.__init__

    def counted(self, *args, **kwargs):
        loads.append(kwargs.get("name"))
        init(self, *args, **kwargs)

    monkeypatch.setattr(client.LocalModel, "__init__", counted)
    cfg = RedTeamConfig.load(None, [f"output_dir={tmp_path}", "target.kind=local", "target.model=tiny",
                                    "target.max_tokens=2", "classifier=judge", "judge.kind=local", "judge.model=tiny",
                                    "judge.max_tokens=2", "judge.parse_retries=0", "probes.limit=1",
                                    "probes.overrefusal=", "attacks.names=[direct]"])
    with pytest.raises(UserError):  # the tiny judge gives no LABEL line: the one item fails
        run_redteam(cfg, log=lambda _: None, stream=None)
    assert len(loads) == 1


def test_an_alias_command_says_which_setting_of_the_file_it_replaces(capsys):
    from posttrain.cli import _note_replaced_by_alias

    _note_replaced_by_alias("kto", "examples/dpo_lora_chat.yaml")  # its dpo.loss is ipo
    assert capsys.readouterr().out == ("note: posttrain kto runs dpo.loss=kto; examples/dpo_lora_chat.yaml sets "
                                       "dpo.loss: ipo, which is not used\n")
    _note_replaced_by_alias("orpo", "examples/sft_full.yaml")  # no dpo section: nothing replaced
    _note_replaced_by_alias("dpo", "examples/dpo_lora_chat.yaml")  # not an alias
    assert capsys.readouterr().out == ""


def test_a_key_of_another_command_names_that_command_instead_of_a_near_spelling(capsys):
    assert cli.main(["grpo", "examples/grpo.yaml", "ppo.kl_coef=0.1"]) == 2
    assert capsys.readouterr().err == "error: overrides: unknown key ppo.kl_coef; ppo.kl_coef is a setting of posttrain ppo\n"
    assert cli.main(["sft", "examples/sft_full.yaml", "train.learning_rate=1e-4"]) == 2  # a typo: still its guess
    assert "did you mean train.lr?" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("reward.weights=[nope=1]", "reward.weights nope=...: no reward named nope (have exact_match)"),
    ("reward.weights=[exact_match=x]", "reward.weights exact_match=x: not a number"),
    ("reward.format_regex=([", "format regex '([' is not valid"),
])
def test_reward_weights_and_format_regex_are_checked_before_the_model_loads(tmp_path, monkeypatch, capsys,
                                                                            override, message):
    from posttrain.train import sft

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(sft, "build_model", no_model)
    assert cli.main(["grpo", "examples/grpo.yaml", override, f"output_dir={tmp_path}"]) == 2
    assert message in capsys.readouterr().err


def test_generate_on_an_empty_prompts_file_says_so(tmp_path, capsys):
    empty = tmp_path / "p.txt"
    empty.write_text("\n\n")
    assert cli.main(["generate", "--model", "tiny", "--prompts", str(empty), "--output", "-"]) == 2
    assert "no prompts (an empty file, or only blank lines)" in capsys.readouterr().err
