"""The command line beside the walkthrough's pins (stop 34): an unknown command's "did you mean",
the subcommands' defaults in --help, score's loading flags reaching the reward model, an override's
text with a colon, and a directory given as the config file."""

from __future__ import annotations

import json

import pytest

from posttrain import cli
from tests.test_walkthrough_cli import _main


@pytest.mark.parametrize("word, meant", [("self_instruct", "self-instruct"), ("sftt", "sft"), ("genrate", "generate")])
def test_an_unknown_command_close_to_one_gets_did_you_mean(word, meant, capsys):
    code, _, err = _main([word, "x.yaml"], capsys)
    assert code == 2 and err.rstrip().endswith(f"unknown command {word!r}; did you mean {meant}?"), err


def test_an_unknown_command_like_none_gets_argparse_list(capsys):
    code, _, err = _main(["zzzzzz"], capsys)
    assert code == 2 and "invalid choice: 'zzzzzz'" in err and "did you mean" not in err


def test_help_adds_no_default_that_is_no_value():
    """A flag whose default is None, [] or an on/off flag's False says no "(default: None)"; the
    stage commands' help (defaults in their config fields) is as it was."""
    subcommands = cli.build_parser()._subparsers._group_actions[0].choices
    for name, parser in subcommands.items():
        text = parser.format_help()
        for empty in ("(default: None)", "(default: [])", "(default: False)"):
            assert empty not in text, (name, empty)
    assert "(default:" not in subcommands["sft"].format_help().split("config fields")[0]
    assert "the default 0 makes" in subcommands["generate"].format_help()  # %(default)s, not said twice


def test_score_loads_reward_models_with_its_dtype_and_trust_remote_code(tmp_path, monkeypatch, capsys):
    from posttrain import rewards

    seen = {}

    class Scorer:
        def __init__(self, path, template="auto", batch_size=32, dtype="float32", trust_remote_code=False,
                     max_length=None, device=None, log=None):
            seen.update(dtype=dtype, trust_remote_code=trust_remote_code)

        def __call__(self, prompts, responses):
            return [0.5] * len(responses)

        def cut_note(self):
            return None

    monkeypatch.setattr(rewards, "RewardModelScorer", Scorer)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    code, out, err = _main(["score", "--model", tmp_path, "--input", rows, "--dtype", "bfloat16",
                            "--trust-remote-code"], capsys)
    assert code == 0, err
    assert seen == {"dtype": "bfloat16", "trust_remote_code": True}
    assert json.loads(out)["reward"] == 0.5


def test_a_colon_in_an_override_is_text_to_a_text_setting_and_quoted_in_any_refusal():
    from posttrain.config import DPOConfig, SFTConfig
    from posttrain.config.synthesis import ConstitutionalConfig
    from posttrain.errors import ConfigError

    assert ConstitutionalConfig.load(None, ["constitutional.system=Rules: {a}"]).constitutional.system == "Rules: {a}"
    assert SFTConfig.load(None, ["adapter.lora.target_modules=a: b"]).adapter.lora.target_modules == ["a: b"]
    assert SFTConfig.load(None, ["adapter.lora=r: 4"]).adapter.lora.r == 4  # a section still takes a mapping
    with pytest.raises(ConfigError, match=r"train.lr must be a number, got 'Note: x'$"):
        SFTConfig.load(None, ["train.lr=Note: x"])
    with pytest.raises(ConfigError, match=r"dpo.loss='a: b' is not one of"):
        DPOConfig.load(None, ["dpo.loss=a: b"])
    with pytest.raises(ConfigError, match=r"must be a string, got \{'a': 'b'\}"):  # typed as a mapping
        ConstitutionalConfig.load(None, ["constitutional.system={a: b}"])


def test_a_directory_given_as_the_config_says_so_and_names_a_run_directory_config(tmp_path):
    from posttrain.config.schema import read_yaml
    from posttrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"is a directory, not a YAML file$"):
        read_yaml(tmp_path)
    (tmp_path / "config.yaml").write_text("train: {lr: 1.0e-4}\n")
    with pytest.raises(ConfigError, match=f"its config is {tmp_path / 'config.yaml'}"):
        read_yaml(tmp_path)
