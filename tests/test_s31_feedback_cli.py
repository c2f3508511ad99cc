"""Help texts of the stage and data commands, and one local model shared by two roles (stop 31)."""

from __future__ import annotations

import importlib
import re

import pytest

from posttrain import cli
from posttrain.config.feedback import BackendConfig, JudgeConfig
from posttrain.feedback import client
from posttrain.feedback.client import LocalModel, shared_or_new

VALIDATORS = {"constitutional": "synthesis:validate_constitutional", "cai": "synthesis:validate_constitutional",
              "self-instruct": "synthesis:validate_self_instruct", "rlaif": "feedback:validate_rlaif",
              "quality": "quality:validate_quality", "redteam": "safety:validate_redteam",
              "evaluate": "evaluate:validate_evaluate"}


def _help(capsys, command: str) -> str:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(cli._DATA_COMMANDS))
def test_data_command_example_override_loads_validates_and_changes_its_setting(capsys, command):
    example = cli.OVERRIDE_EXAMPLES[command]
    assert f"e.g. {example}" in _help(capsys, command)
    config_cls = cli._DATA_COMMANDS[command]()[0]
    cfg = config_cls.load(None, [example])
    module, name = VALIDATORS[command].split(":")
    getattr(importlib.import_module(f"posttrain.config.{module}"), name)(cfg)
    key, value = example.split("=", 1)
    given, default = cfg, config_cls()
    for part in key.split("."):
        given, default = getattr(given, part), getattr(default, part)
    assert str(given) == value and given != default  # an example that shows a change


@pytest.mark.parametrize("command", sorted(cli.ALIAS_OVERRIDES))
def test_alias_help_says_the_value_it_sets_and_the_plain_command_its_default(capsys, command):
    key, wanted = cli.ALIAS_OVERRIDES[command][0].split("=", 1)
    line = re.search(rf"^  {re.escape(key)} \(.*$", _help(capsys, command), re.M).group(0)
    assert f", set to {wanted!r} by this command):" in line and "default" not in line.split(":")[0]
    plain = re.search(rf"^  {re.escape(key)} \(.*$", _help(capsys, key.split(".")[0]), re.M).group(0)
    assert ", default " in plain and "set to" not in plain


class _Local(LocalModel):
    def __init__(self):  # no weights: only the type matters to shared_or_new
        pass


def test_shared_or_new_shares_a_local_model_only_when_kind_model_dtype_template_match(monkeypatch):
    made = []
    monkeypatch.setattr(client, "make_backend", lambda cfg: made.append(cfg) or object())
    local, policy = _Local(), BackendConfig(kind="local", model="tiny")
    same = JudgeConfig(kind="local", model="tiny", max_tokens=9, temperature=0.0)  # sampling may differ
    assert shared_or_new(local, policy, same) is local and not made
    for other in (JudgeConfig(kind="local", model="tiny", dtype="bfloat16"),
                  JudgeConfig(kind="local", model="tiny", template="chatml"),
                  JudgeConfig(kind="local", model="other"),
                  JudgeConfig(kind="openai", model="tiny")):
        assert shared_or_new(local, policy, other) is not local
    assert made[-1].kind == "openai" and len(made) == 4
    assert shared_or_new(object(), policy, same) is not local and len(made) == 5  # not loaded here: never shared


def test_constitutional_judge_asks_with_the_judges_own_sampling_settings():
    """A local judge shared with the policy has the policy's defaults: each verdict names its own."""
    from posttrain.config.synthesis import ConstitutionalConfig
    from posttrain.feedback.client import Reply
    from posttrain.feedback.constitutional import _make_judge

    asked = []

    class Backend:
        model_name, usage = "m", client.Usage()

        def chat(self, messages, *, max_tokens=None, temperature=None, seed=None):
            asked.append((max_tokens, temperature, seed))
            return Reply("Verdict: A", "stop", 1, 1)

    cfg = ConstitutionalConfig.load(None, ["judge.max_tokens=7", "judge.temperature=0.5", "judge.seed=3",
                                           "policy.max_tokens=99"])
    _make_judge(cfg, "rubric", Backend()).judge([{"role": "user", "content": "q"}], "a", "b")
    assert asked == [(7, 0.5, 3)] * 2
