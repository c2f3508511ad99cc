"""A newcomer's walk through the README's serving, AI-feedback, red-team, alignment-report and
data-quality sections: what they type, the mistakes they make, and what they are told.

Each xfail(strict=True) test pins a defect found on that walk; the plain tests pin user-facing
behaviour that was right but had no test."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

from posttrain import cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from feedback_fixture import Scripted, longer_is_better, shown_responses  # noqa: E402

README = (ROOT / "README.md").read_text(encoding="utf-8")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    """posttrain ARGV in this process, from the repository root; (exit code, stderr + stdout)."""
    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as exc:  # argparse
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


@pytest.fixture(autouse=True)
def _in_repo_root(monkeypatch):
    monkeypatch.chdir(ROOT)  # the examples name examples/data/... relative to the root


def _section(title: str) -> str:
    start = README.index(f"### {title}")
    end = README.find("\n## ", start + 1)
    nxt = README.find("\n### ", start + 1)
    return README[start:min(x for x in (end, nxt) if x != -1)]


def _yaml(name: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "examples" / name).read_text())


def _bad_prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    rows = ['{"prompt": "Copy: a b"}', "not json", '{"prompt": "Copy: c d"}']
    path.write_text("\n".join(rows) + "\n")
    return path


# --------------------------------------------------------------------------- defects


def test_serve_port_out_of_range_is_a_one_line_error(capsys):
    rc, out = run_cli(capsys, "serve", "tiny", "--port", "99999")
    assert rc == 2 and "error:" in out and "Traceback" not in out


def test_serve_unknown_template_names_the_flag(capsys):
    rc, out = run_cli(capsys, "serve", "tiny", "--template", "jinja", "--port", "0")
    assert rc == 2 and "--template" in out and "data.template" not in out


@pytest.mark.parametrize("command,example", [("rlaif", "examples/rlaif.yaml"),
                                             ("constitutional", "examples/constitutional.yaml")])
def test_malformed_prompt_row_advice_can_be_followed(capsys, tmp_path, command, example):
    bad = _bad_prompts(tmp_path)
    common = [command, example, f"data.prompt_files=[{bad}]", f"output_dir={tmp_path / 'out'}"]
    rc, out = run_cli(capsys, *common)
    assert rc == 2 and f"{bad}:2" in out
    if "bad_rows=skip" in out:  # the advice given must name a setting this command has
        _, out2 = run_cli(capsys, *common, "data.bad_rows=skip", "data.limit=-1")
        assert "unknown key" not in out2


def test_skipped_rows_message_names_no_python_argument(capsys, tmp_path):
    # quality's decontamination file with a malformed row (evaluate's prompts.files says the same)
    rc, out = run_cli(capsys, "quality", "examples/quality.yaml", f"decontaminate.files=[{_bad_prompts(tmp_path)}]",
                      "tokens.tokenizer=", f"output_dir={tmp_path / 'q'}")
    assert rc == 0 and "malformed" in out
    assert "rejects_path" not in out


def test_override_value_error_is_not_blamed_on_the_yaml_file(capsys, tmp_path):
    rc, out = run_cli(capsys, "rlaif", "examples/rlaif.yaml", "rlaif.num_responses=three",
                      f"output_dir={tmp_path}")
    assert rc == 2 and "rlaif.num_responses" in out
    assert "examples/rlaif.yaml:" not in out  # the file says 3; the command line said 'three'


def test_evaluate_reward_function_error_names_the_config_key(capsys, tmp_path):
    rc, out = run_cli(capsys, "evaluate", "examples/evaluate.yaml", "reward.functions=[exact_match]",
                      f"output_dir={tmp_path}")
    assert rc == 2 and "NAME=" in out
    assert "--function" not in out and "reward.functions" in out


def test_redteam_command_names_a_model_the_demo_writes():
    demo_models = {"runs/demo/final", "runs/demo/dpo/final", "runs/demo/rm/final"}  # demo.py: SFT, DPO, RM
    named = re.findall(r"target\.model=(runs/demo\S*)", _section("Red-teaming and over-refusal"))
    named += re.findall(r"target\.model=(runs/demo\S*)", (ROOT / "examples" / "redteam.yaml").read_text())
    assert named and set(named) <= demo_models, named


def test_readme_feedback_block_asks_for_the_served_model():
    block = re.search(r"```bash\n(posttrain serve .*?)```", _section("AI feedback: judges, RLAIF, Constitutional AI, "
                                                                     "Self-Instruct"), re.S).group(1)
    served = re.search(r"posttrain serve (\S+)", block).group(1)
    asked = {"rlaif.yaml policy": _yaml("rlaif.yaml")["policy"]["model"],
             "rlaif.yaml judge": _yaml("rlaif.yaml")["judge"]["model"],
             "constitutional.yaml policy": _yaml("constitutional.yaml")["policy"]["model"],
             "self_instruct.yaml generator": _yaml("self_instruct.yaml")["generator"]["model"]}
    assert all(model == served for model in asked.values()), (served, asked)


def test_redteam_raised_probe_limit_resumes_or_says_what_changed(capsys, tmp_path):
    with Scripted(lambda body: "Sure, here you go.") as server:
        args = ["redteam", "examples/redteam.yaml", "target.kind=openai", f"target.base_url={server.url}",
                "attacks.names=[direct]", "probes.overrefusal=", f"output_dir={tmp_path / 'rt'}"]
        rc, _ = run_cli(capsys, *args, "probes.limit=1")
        assert rc == 0 and len(server.requests) == 1
        rc, out = run_cli(capsys, *args, "probes.limit=2")  # "a few first, then more": as rlaif's data.limit
    out = out.replace(str(tmp_path), "<tmp>")
    assert rc == 0 or ("probe" in out and not re.search(r"requests='[0-9a-f]{16}'", out)), out


# --------------------------------------------------------------------------- right, and now tested


def _verdict_judge(body: dict) -> str:
    """Policy requests get an answer whose length follows the seed; judge requests a verdict."""
    text = "\n".join(m["content"] for m in body["messages"])
    if "Response A" in text:
        return "Verdict: " + longer_is_better(*shown_responses(body))
    return "answer" + " x" * (body.get("seed", 0) % 3)


def test_rlaif_resume_keeps_rows_and_refuses_changed_settings(capsys, tmp_path):
    out = tmp_path / "rlaif"
    with Scripted(_verdict_judge) as server:
        args = ["rlaif", "examples/rlaif.yaml", f"output_dir={out}", f"policy.base_url={server.url}",
                f"judge.base_url={server.url}", "data.limit=2"]
        rc, _ = run_cli(capsys, *args)
        assert rc == 0
        first = (out / "preferences.jsonl").read_bytes()
        assert len(first.splitlines()) == 6  # 2 prompts x 3 distinct answers -> 3 pairs each
        asked = len(server.requests)
        rc, text = run_cli(capsys, *args)  # a rerun: nothing asked again, the same rows
        assert rc == 0 and len(server.requests) == asked and "2 already done" in text
        assert (out / "preferences.jsonl").read_bytes() == first
        rc, text = run_cli(capsys, *args, "rlaif.num_responses=2")
        assert rc == 2 and "num_responses=3, now 2" in text and len(server.requests) == asked


def test_wrong_api_key_fails_at_once_and_says_which_setting(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "wrong")
    denied = (401, {}, {"error": {"message": "missing or wrong API key", "type": "invalid_request_error"}})
    with Scripted(lambda body: denied) as server:
        rc, out = run_cli(capsys, "rlaif", "examples/rlaif.yaml", f"output_dir={tmp_path}", "data.limit=2",
                          f"policy.base_url={server.url}", f"judge.base_url={server.url}")
        assert len(server.requests) == 2  # one per prompt: a 401 is not retried
    assert rc == 2 and "HTTP 401" in out and "api_key_env" in out


def test_serve_api_key_variable_unset_is_refused_before_loading(capsys, monkeypatch):
    monkeypatch.delenv("WALKTHROUGH_UNSET_KEY", raising=False)
    rc, out = run_cli(capsys, "serve", "tiny", "--api-key-env", "WALKTHROUGH_UNSET_KEY")
    assert rc == 2 and "WALKTHROUGH_UNSET_KEY" in out and "unset or empty" in out


def test_redteam_compare_to_a_missing_run_is_refused_before_any_request(capsys, tmp_path):
    with Scripted(lambda body: "Sure.") as server:
        rc, out = run_cli(capsys, "redteam", "examples/redteam.yaml", "target.kind=openai",
                          f"target.base_url={server.url}", "probes.limit=1", f"output_dir={tmp_path / 'rt'}",
                          f"compare_to={tmp_path / 'never_ran'}")
        assert rc == 2 and "compare_to" in out and server.requests == []


def test_quality_example_writes_what_the_readme_lists(capsys, tmp_path):
    out = tmp_path / "quality"
    rc, text = run_cli(capsys, "quality", "examples/quality.yaml", f"output_dir={out}", "tokens.tokenizer=")
    assert rc == 0
    for name in ("kept.jsonl", "dropped.jsonl", "rejects.jsonl", "report.json", "report.md"):
        assert (out / name).is_file(), name
    counts = [len((out / n).read_text().splitlines()) for n in ("kept.jsonl", "dropped.jsonl", "rejects.jsonl")]
    total = sum(1 for line in (ROOT / "examples/data/quality_dirty.jsonl").read_text().splitlines() if line.strip())
    assert sum(counts) == total and counts[2] == 1  # rows in = kept + dropped + malformed
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert all(re.fullmatch(r".+:\d+", d["location"]) and d["reason"] for d in dropped)
    assert "@example.com" not in (out / "kept.jsonl").read_text()  # PII redacted
