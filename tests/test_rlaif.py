"""RLAIF: prompts and ids, preference rows and statistics by hand, config checks, and end to
end on loopback: `posttrain serve` with the tiny preset as the policy over HTTP, a scripted
position-biased judge with a known preference (a random-init tiny model almost never writes
a verdict line, so it cannot stand in for the judge here), a kill -9 mid-run and a resume
that matches an uninterrupted run row for row, and `posttrain dpo` training on the output
as it is. The local backend runs the whole pipeline in-process too."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from posttrain.config import RLAIFConfig, validate_rlaif
from posttrain.errors import ConfigError, DataError
from posttrain.feedback.jobs import check_resume_settings
from posttrain.feedback.rlaif import (load_prompts, preference_rows, prompt_id, result_settings,
                                      run_rlaif, summarize)
from tests.feedback_fixture import Scripted, is_biased, preference_judge

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "rlaif.yaml"
BIAS = 0.3
KEY = "sk-rlaif-test-secret"


def read(path: Path) -> list[dict]:
    """The complete lines of a JSONL file (a kill may have left a last line half written)."""
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- units


def test_prompt_ids_are_content_hashes_repeats_are_numbered_and_bad_rows_named(tmp_path):
    rows = [{"prompt": "Copy: a b"}, {"prompt": [{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Reverse: x y"}]},
            {"prompt": "Copy: a b"}, {"prompt": "Smallest letter: q m"}]
    chats = [{"messages": [{"role": "user", "content": "Copy: a b"}]},  # ends with the user: all of it is the prompt
             {"messages": [{"role": "user", "content": "Copy: c"}, {"role": "assistant", "content": "c"}]}]
    files = [str(write(tmp_path / "p.jsonl", rows)), str(write(tmp_path / "chat.jsonl", chats))]
    items = load_prompts(files, log=lambda line: None)
    first = prompt_id([{"role": "user", "content": "Copy: a b"}])
    assert [i for i, _ in items] == [first, items[1][0], f"{first}-2", items[3][0], f"{first}-3", items[5][0]]
    assert items[1][1].prompt[0] == {"role": "system", "content": "Be brief."}
    assert items[2][1].source.endswith("p.jsonl:3") and items[4][1].source.endswith("chat.jsonl:1")
    assert items[5][1].prompt == [{"role": "user", "content": "Copy: c"}]
    assert len(load_prompts(files, limit=2, log=lambda line: None)) == 2
    bad = write(tmp_path / "bad.jsonl", [rows[0], {"prompt": ""}, "{not json"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*empty[^\n]*\n.*bad.jsonl:3"):
        load_prompts([str(bad)], log=lambda line: None)


def judged(outcome, ab, ba, replies=1):
    def order(verdict):
        return {"verdict": verdict, "replies": ["..."] * replies, "prompt_tokens": 100, "completion_tokens": 10}

    return {"outcome": outcome, "ab": order(ab), "ba": order(ba)}


RECORD = {
    "id": "p1", "source": "p.jsonl:1", "prompt": [{"role": "user", "content": "Say hi"}],
    "policy": "pol", "judge": "jud",
    "responses": [{"text": t} for t in ("hi", "hello", "hey there", "hi", " ")],
    "pairs": [
        {"pair": [0, 1], **judged("first", "A", "B")},
        {"pair": [0, 2], **judged("second", "B", "A")},
        {"pair": [0, 3], "outcome": "identical"},
        {"pair": [0, 4], "outcome": "empty"},
        {"pair": [1, 2], **judged("inconsistent", "A", "A")},
        {"pair": [1, 3], **judged("tie", "tie", "tie")},
        {"pair": [2, 3], **judged("unparsed", None, "B", replies=2)},
        {"pair": [2, 4], **judged("inconsistent", "B", "tie")},
    ],
    "tokens": {"policy_prompt": 50, "policy_completion": 20, "judge_prompt": 1200, "judge_completion": 120},
}


def test_preference_rows_keep_only_agreed_pairs_with_provenance():
    rows = preference_rows(RECORD)
    assert [(r["id"], r["chosen"], r["rejected"]) for r in rows] == [("p1/0-1", "hi", "hello"),
                                                                     ("p1/0-2", "hey there", "hi")]
    assert rows[0]["prompt"] == "Say hi"
    provenance = rows[1]["provenance"]
    assert provenance["pair"] == [0, 2] and provenance["chosen_index"] == 2 and provenance["outcome"] == "second"
    assert (provenance["ab"]["verdict"], provenance["ba"]["verdict"]) == ("B", "A")
    assert (provenance["policy"], provenance["judge"], provenance["source"]) == ("pol", "jud", "p.jsonl:1")
    system = {**RECORD, "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]}
    assert preference_rows(system)[0]["prompt"] == system["prompt"]


def test_summary_statistics_by_hand():
    stats = summarize([RECORD])
    assert stats["pairs"] == 8 and stats["judged"] == 6 and stats["not_judged"] == {"identical": 1, "empty": 1, "repeated": 0}
    assert stats["outcomes"] == {"first": 1, "second": 1, "tie": 1, "inconsistent": 2, "unparsed": 1}
    assert stats["preferences"] == 2
    # 5 pairs with both verdicts: 3 consistent (first, second, tie), 2 inconsistent
    assert stats["consistent_rate"] == pytest.approx(3 / 5) and stats["inconsistent_rate"] == pytest.approx(2 / 5)
    assert stats["same_slot_twice"] == {"A": 1, "B": 0}
    # slot verdicts of the 6 judged pairs: ab A,B,A,tie,None,B and ba B,A,A,tie,B,tie: 4 A, 4 B -> 4/8
    assert stats["first_slot_win_rate"] == pytest.approx(4 / 8)
    # kappa over the 5 parsed pairs, labels as responses: ab = first, second, first, tie, second;
    # ba = first, second, second, tie, tie. p_o = 3/5; p_e = (2·1 + 2·2 + 1·2)/25 = 8/25; κ = (15/25 - 8/25)/(17/25)
    assert stats["order_agreement_kappa"] == pytest.approx(7 / 17)
    assert stats["unparsed_replies"] == 1 and stats["judge_retries"] == 2
    assert stats["tokens"]["judge_prompt"] == 1200


def test_config_checks_and_resume_settings(tmp_path):
    with pytest.raises(ConfigError, match="did you mean rlaif.num_responses"):
        RLAIFConfig.from_dict({"rlaif": {"num_response": 3}})
    cases = [({"rlaif": {"num_responses": 1}}, "at least 2 responses"),
             ({"policy": {"temperature": 0}}, "policy.temperature must be at least 1e-05"),
             ({"judge": {"base_url": "localhost:8000"}}, "judge.base_url='localhost:8000' must start with http"),
             ({"judge": {"rubric": "x", "rubric_file": "r.txt"}}, "not both"),
             ({"data": {"prompt_files": []}}, "data.prompt_files is empty")]
    for data, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_rlaif(RLAIFConfig.from_dict(data))
    cfg = RLAIFConfig.from_dict({})
    run_json = tmp_path / "run.json"

    def check(cfg, rubric, resuming):
        check_resume_settings(tmp_path, result_settings(cfg, rubric), resuming, name="run.json")

    check(cfg, "rubric one", resuming=False)
    cfg.rlaif.concurrency, cfg.judge.timeout_s, cfg.policy.base_url = 9, 5.0, "http://elsewhere:1/v1"
    check(cfg, "rubric one", resuming=True)  # these may change
    cfg.policy.temperature = 0.7
    with pytest.raises(ConfigError, match=r"records made with policy.temperature=1.0, now 0.7"):
        check(cfg, "rubric one", resuming=True)
    with pytest.raises(ConfigError, match=r"judge.rubric='rubric one', now 'other'"):
        check(RLAIFConfig.from_dict({}), "other", resuming=True)
    check(cfg, "rubric one", resuming=False)  # nothing written yet: start over
    assert json.loads(run_json.read_text())["policy"]["temperature"] == 0.7


# --------------------------------------------------------------------------- end to end on loopback


@pytest.fixture(scope="module")
def policy_server():
    torch = pytest.importorskip("torch")
    from posttrain.serve import build_server

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: one steady thread
    server = build_server("tiny", port=0, log_requests=False).start()
    yield server
    server.close()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def biased_judge():
    with Scripted(preference_judge(bias=BIAS), delay_s=0.02) as endpoint:
        yield endpoint


def overrides(policy_server, judge, output_dir) -> list[str]:
    return [f"policy.base_url={policy_server.url}/v1", "policy.model=tiny", f"judge.base_url={judge.url}", "judge.model=scripted",
            f"output_dir={output_dir}", "policy.max_tokens=8", "rlaif.concurrency=2",
            "judge.api_key_env=RLAIF_TEST_KEY"]


@pytest.fixture(scope="module")
def uninterrupted(policy_server, biased_judge, tmp_path_factory):
    out = tmp_path_factory.mktemp("rlaif") / "run"
    cfg = RLAIFConfig.load(EXAMPLE, overrides(policy_server, biased_judge, out))
    os.environ["RLAIF_TEST_KEY"] = KEY
    try:
        lines: list[str] = []
        run_rlaif(cfg, log=lines.append)
    finally:
        del os.environ["RLAIF_TEST_KEY"]
    return out, lines


def test_rlaif_over_http_shapes_provenance_and_debiasing(uninterrupted, biased_judge):
    out, lines = uninterrupted
    raw, rows = read(out / "raw.jsonl"), read(out / "preferences.jsonl")
    stats = json.loads((out / "summary.json").read_text())
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "examples/data/prompts.jsonl").read_text().splitlines()]
    turns = [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]
    assert sorted(r["id"] for r in raw) == sorted(prompt_id(t) for t in turns)
    for record in raw:
        assert [r["seed"] for r in record["responses"]] == [0, 1, 2]
        assert [p["pair"] for p in record["pairs"]] == [[0, 1], [0, 2], [1, 2]]
        assert record["policy"] == "tiny" and record["judge"] == "scripted"
        assert all(r["completion_tokens"] <= 8 for r in record["responses"])
    # The judge prefers the longer response, except on a known 30% of pairs where it answers "A"
    # in both orders: those, and only those, are inconsistent; every emitted row has the true winner.
    pairs = [(record, p) for record in raw for p in record["pairs"] if p["outcome"] not in ("identical", "empty")]
    biased = [is_biased(*(record["responses"][k]["text"] for k in p["pair"]), BIAS) for record, p in pairs]
    assert [p["outcome"] == "inconsistent" for _, p in pairs] == biased
    assert 0 < sum(biased) < len(pairs)
    assert stats["outcomes"]["inconsistent"] == sum(biased) and stats["outcomes"]["unparsed"] == 0
    assert stats["first_slot_win_rate"] > 0.5  # the bias shows in the raw verdicts...
    assert len(rows) == stats["preferences"] == stats["outcomes"]["first"] + stats["outcomes"]["second"]
    for row in rows:  # ...and not in the preferences
        assert len(row["chosen"]) > len(row["rejected"])
        assert row["provenance"]["outcome"] in ("first", "second") and row["provenance"]["judge"] == "scripted"
        assert row["provenance"]["ab"]["replies"][0].endswith(f"**Verdict:** {row['provenance']['ab']['verdict']}")
    assert len({r["id"] for r in rows}) == len(rows)
    assert stats["tokens"]["policy_completion"] > 0 and stats["tokens"]["judge_prompt"] > 0
    assert stats["run"]["written"] == len(raw) and stats["usage_this_run"]["judge"]["requests"] == 2 * len(pairs)
    assert any(line.startswith("judge: consistent") for line in lines)
    # The API key went into the Authorization header and nowhere on disk.
    assert biased_judge.requests[0][2]["Authorization"] == f"Bearer {KEY}"
    assert not any(KEY in path.read_text() for path in out.iterdir())


def test_kill_9_mid_run_then_resume_matches_the_uninterrupted_run(uninterrupted, policy_server, biased_judge,
                                                                   tmp_path):
    out = tmp_path / "run"
    command = [sys.executable, "-m", "posttrain", "rlaif", str(EXAMPLE), *overrides(policy_server, biased_judge, out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    biased_judge.delay_s = 0.1  # ~0.3 s a prompt, so the kill lands mid-run
    try:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            raw = out / "raw.jsonl"
            if raw.exists() and raw.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.communicate()
    finally:
        biased_judge.delay_s = 0.02
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    kept = read(out / "raw.jsonl")
    assert 2 <= len(kept) < 8
    with (out / "raw.jsonl").open("a") as f:
        f.write('{"id": "torn", "source": "exam')  # as if killed mid-write
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "unfinished last line" in resumed.stderr
    assert f"8 items: {8 - len(kept)} written, {len(kept)} already done, 0 failed" in resumed.stdout
    raw = read(out / "raw.jsonl")
    assert [r["id"] for r in raw[:len(kept)]] == [r["id"] for r in kept]  # kept in place, not redone
    reference = uninterrupted[0]
    assert sorted(r["id"] for r in raw) == sorted(r["id"] for r in read(reference / "raw.jsonl"))  # no gaps, no dups
    assert (out / "preferences.jsonl").read_text() == (reference / "preferences.jsonl").read_text()


def test_posttrain_dpo_trains_on_the_preferences_as_written(uninterrupted, tmp_path):
    preferences = uninterrupted[0] / "preferences.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "posttrain", "dpo", "model.path=tiny", f"data.train_files=[{preferences}]",
         "data.eval_fraction=0", "data.max_length=128", "train.max_steps=2", "train.batch_size=2",
         "train.progress_bar=false", "eval.exact_match_prompts=0", f"output_dir={tmp_path / 'dpo'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "dpo" / "final").is_dir()
    steps = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert any(s.get("step") == 2 for s in steps)


def test_local_backend_runs_the_pipeline_in_process(tmp_path):
    pytest.importorskip("torch")
    prompts = write(tmp_path / "p.jsonl", [{"prompt": "Copy: a b"}, {"prompt": "Reverse: c d"}])
    cfg = RLAIFConfig.from_dict({
        "output_dir": str(tmp_path / "run"), "data": {"prompt_files": [str(prompts)]},
        "policy": {"kind": "local", "model": "tiny", "max_tokens": 4},
        "judge": {"kind": "local", "model": "tiny", "max_tokens": 6, "parse_retries": 1},
        "rlaif": {"num_responses": 2, "concurrency": 2}})
    lines: list[str] = []
    run_rlaif(cfg, log=lines.append)
    stats = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert stats["prompts"] == 2 and stats["pairs"] == 2
    # An untrained judge writes no verdict line: the pairs are recorded as unparsed, not guessed.
    assert stats["outcomes"]["unparsed"] == stats["judged"] and stats["preferences"] == 0
    assert stats["judge_retries"] == 2 * stats["judged"]
    assert stats["usage_this_run"]["policy"] == stats["usage_this_run"]["judge"]  # one model served both
    assert any("most pairs have no verdict" in line for line in lines)
    assert (tmp_path / "run" / "preferences.jsonl").read_text() == ""
