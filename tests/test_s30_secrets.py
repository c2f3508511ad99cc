"""Where an API key may go, and what `posttrain demo` may delete, beyond the walkthrough's pinned cases:
a redirect is refused with where it points (never retried), every `*.api_key_env` of every command is
checked (used or not), and the demo clears an earlier demo run but nothing else."""

from __future__ import annotations

from pathlib import Path

import pytest

from posttrain.errors import ConfigError, UserError
from tests.cli_runner import run_cli
from tests.feedback_fixture import Scripted

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-proj-S30SecretKey0123"


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_an_error_naming_where_it_points_and_is_not_retried(status):
    from posttrain.feedback.client import BackendError, OpenAICompatible

    moved = (status, {"Location": "https://elsewhere.example/v2/chat/completions"}, b"")
    with Scripted(lambda body: moved) as endpoint:
        backend = OpenAICompatible(endpoint.url, "judge", api_key=KEY, max_retries=3, sleep=lambda s: None)
        with pytest.raises(BackendError) as caught:
            backend.chat([{"role": "user", "content": "hi"}])
        sent = len(endpoint.requests)
    message = str(caught.value)
    assert sent == 1 and caught.value.status == status
    assert f"HTTP {status}" in message and "https://elsewhere.example/v2/chat/completions" in message
    assert "base_url=https://elsewhere.example/v2" in message and KEY not in message
    assert backend.usage.snapshot()["failures"] == 1 and backend.usage.snapshot()["retries"] == 0


def test_a_redirect_without_location_is_said_too():
    from posttrain.feedback.client import BackendError, OpenAICompatible

    with Scripted(lambda body: (302, {}, b"")) as endpoint:
        backend = OpenAICompatible(endpoint.url, "judge", max_retries=0)
        with pytest.raises(BackendError, match="HTTP 302 redirect with no Location"):
            backend.chat([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("command, overrides, setting", [
    ("RedTeamConfig", ["classifier=patterns"], "judge.api_key_env"),  # a section the run does not use
    ("RedTeamConfig", [], "attacks.pair.attacker.api_key_env"),
    ("EvaluateConfig", ["policy=tiny"], "judge.api_key_env"),
    ("ConstitutionalConfig", [], "judge.api_key_env"),
    ("SelfInstructConfig", [], "generator.api_key_env"),
    ("RLAIFConfig", [], "judge.api_key_env"),
])
def test_every_api_key_env_setting_takes_a_variable_name(command, overrides, setting):
    import posttrain.config as config

    validate = {"RedTeamConfig": config.validate_redteam, "EvaluateConfig": config.validate_evaluate,
                "ConstitutionalConfig": config.validate_constitutional,
                "SelfInstructConfig": config.validate_self_instruct, "RLAIFConfig": config.validate_rlaif}[command]
    cls = getattr(config, command)
    validate(cls.load(None, [*overrides, f"{setting}=MY_KEY_2"]))  # a name
    validate(cls.load(None, [*overrides, f"{setting}="]))  # empty: no key sent
    with pytest.raises(ConfigError) as caught:
        validate(cls.load(None, [*overrides, f"{setting}={KEY}"]))
    assert str(caught.value).startswith(f"{setting} takes the NAME") and KEY not in str(caught.value)


def test_redteam_with_a_key_in_an_unused_section_writes_nothing(capsys, tmp_path):
    out = tmp_path / "rt"
    rc, text = run_cli(capsys, "redteam", "examples/redteam.yaml", f"output_dir={out}", "classifier=patterns",
                       f"judge.api_key_env={KEY}")
    assert rc == 2 and "judge.api_key_env" in text and KEY not in text and not out.exists()


def _stop_at_training(monkeypatch):
    import posttrain.train.sft as sft

    class Started(Exception):
        pass

    def started(cfg):
        raise Started

    monkeypatch.setattr(sft, "run_sft", started)
    return Started


def _earlier_demo(directory: Path) -> None:
    for name in ("final", "checkpoints/step-0001600", "rm/final", "dpo/final", "report"):
        (directory / name).mkdir(parents=True)
    for name in ("config.yaml", "summary.json", "metrics.jsonl", "params.json", "data_report.json",
                 "rejects-train.jsonl", "summary.json.partial"):
        (directory / name).write_text("{}")


def test_demo_clears_an_earlier_demo_run_and_an_empty_dir(tmp_path, monkeypatch):
    from posttrain.demo import run_demo

    started = _stop_at_training(monkeypatch)
    earlier = tmp_path / "earlier"
    _earlier_demo(earlier)
    with pytest.raises(started):
        run_demo(str(earlier))
    assert not earlier.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(started):
        run_demo(str(empty))
    with pytest.raises(started):
        run_demo(str(tmp_path / "missing"))


@pytest.mark.parametrize("extra", ["notes.txt", None])
def test_demo_refuses_a_dir_that_is_not_an_earlier_demo_run(tmp_path, monkeypatch, extra):
    from posttrain.demo import run_demo

    _stop_at_training(monkeypatch)
    mine = tmp_path / "mine"
    _earlier_demo(mine)
    if extra:
        (mine / extra).write_text("mine")
    else:
        (mine / "config.yaml").unlink()  # demo-like names, but no run's config
    with pytest.raises(UserError, match="give another --output-dir") as caught:
        run_demo(str(mine))
    assert "\n" not in str(caught.value) and (extra is None or extra in str(caught.value))
    assert (mine / "final").is_dir() and (extra is None or (mine / extra).is_file())


def test_demo_refuses_a_file_as_its_output_dir(capsys, tmp_path, monkeypatch):
    _stop_at_training(monkeypatch)
    target = tmp_path / "a-file"
    target.write_text("mine")
    rc, text = run_cli(capsys, "demo", "--output-dir", target)
    assert rc == 2 and "give another --output-dir" in text and target.read_text() == "mine"
