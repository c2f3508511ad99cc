"""The resumable job machinery: JsonlLog (torn last line, unfinished groups, refusing
duplicates) and run_items (skips what is done, counts failures, stops when everything fails,
and after a kill -9 partway a rerun leaves every id exactly once)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from posttrain.errors import DataError, UserError
from posttrain.feedback.jobs import JsonlLog, RunSummary, run_items

ROOT = Path(__file__).resolve().parents[1]


def lines(path: Path) -> list[dict]:
    """The complete lines of a JSONL file (a kill may have left a last line half written)."""
    return [json.loads(line) for line in path.read_text().splitlines(keepends=True) if line.endswith("\n")]


def test_log_appends_reopens_and_refuses_a_done_id(tmp_path):
    path = tmp_path / "sub" / "log.jsonl"
    with JsonlLog(path) as log:
        assert log.records == [] and log.done == set()
        log.append({"id": "a", "x": 1})
        log.append({"id": "b", "text": "ünïcode"})
        with pytest.raises(ValueError, match="'a' is already in the log"):
            log.append({"id": "a", "x": 2})
        with pytest.raises(ValueError, match="string 'id'"):
            log.append({"x": 3})
    reopened = JsonlLog(path)
    assert reopened.done == {"a", "b"} and reopened.records[1]["text"] == "ünïcode"
    assert [r["id"] for r in lines(path)] == ["a", "b"]


def test_a_second_writer_is_refused_while_the_log_is_open(tmp_path):
    path = tmp_path / "log.jsonl"
    first = JsonlLog(path)
    with pytest.raises(UserError, match="is being written by another run"):
        JsonlLog(path)
    first.close()
    JsonlLog(path).close()
    with pytest.raises(ValueError, match="closed"):
        first.append({"id": "late"})


def test_a_torn_last_line_is_cut_off_with_a_warning(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    warnings = io.StringIO()
    log = JsonlLog(path, warn=warnings)
    assert log.done == {"a", "b"}
    assert "log.jsonl:3: an unfinished last line" in warnings.getvalue()
    assert path.read_text() == '{"id": "a"}\n{"id": "b"}\n'  # appends now start on a fresh line
    log.append({"id": "c"})
    log.close()
    assert [r["id"] for r in lines(path)] == ["a", "b", "c"]


def test_damaged_or_foreign_logs_are_refused_with_file_and_line(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(DataError, match=r"log.jsonl:2: not valid JSON"):
        JsonlLog(path)
    path.write_text('{"id": "a"}\n{"name": "b"}\n')
    with pytest.raises(DataError, match=r"log.jsonl:2: a record without a string 'id'"):
        JsonlLog(path)
    path.write_text('{"id": "a"}\n{"id": "a"}\n')
    with pytest.raises(DataError, match=r"log.jsonl:2: id 'a' appears twice"):
        JsonlLog(path)


def test_list_results_are_groups_and_an_unfinished_group_is_dropped(tmp_path):
    path = tmp_path / "log.jsonl"
    with JsonlLog(path) as log:
        run_items([("x", 2), ("y", 3)], lambda i, n: [{"k": k} for k in range(n)], log, stream=None)
    assert [r["id"] for r in lines(path)] == ["x/0", "x/1", "y/0", "y/1", "y/2"]
    assert lines(path)[3] == {"id": "y/1", "k": 1, "item": "y", "parts": 3}
    # A kill after two of y's three records: y is dropped on reopen and redone.
    path.write_text("".join(json.dumps(r) + "\n" for r in lines(path)[:4]))
    warnings = io.StringIO()
    log = JsonlLog(path, warn=warnings)
    assert log.items == {"x"} and log.done == {"x/0", "x/1"} and "incomplete" in warnings.getvalue()
    summary = run_items([("x", 2), ("y", 3)], lambda i, n: [{"k": k} for k in range(n)], log, stream=None)
    log.close()
    assert (summary.skipped, summary.written) == (1, 1)
    assert [r["id"] for r in lines(path)] == ["x/0", "x/1", "y/0", "y/1", "y/2"]


def test_run_items_skips_done_ids_and_counts_failures_and_empties(tmp_path):
    log = JsonlLog(tmp_path / "log.jsonl")
    log.append({"id": "0", "value": 0})

    def work(item_id, n):
        if n == 3:
            raise RuntimeError("three is bad")
        if n == 5:
            return None
        return {"value": n * n}

    stream = io.StringIO()
    summary = run_items([(str(n), n) for n in range(8)], work, log, concurrency=3, desc="squares", stream=stream)
    log.close()
    assert (summary.total, summary.skipped, summary.written, summary.failed, summary.empty) == (8, 1, 5, 1, 1)
    assert summary.errors == ["3: RuntimeError: three is bad"]
    assert sorted(r["id"] for r in lines(tmp_path / "log.jsonl")) == ["0", "1", "2", "4", "6", "7"]
    assert "squares 7/7" in stream.getvalue()  # the last progress line
    text = "\n".join(summary.lines())
    assert "8 items: 5 written, 1 already done, 1 gave nothing, 1 failed" in text and "rerun" in text


def test_run_items_stops_when_every_item_fails(tmp_path):
    def work(item_id, n):
        raise UserError("POST http://x/v1/chat/completions: HTTP 404: model 'gpt' not found")

    log = JsonlLog(tmp_path / "log.jsonl")
    with pytest.raises(UserError, match="every item failed. First error: 1: POST .* HTTP 404"):
        run_items([("1", 1), ("2", 2)], work, log, stream=None)
    many = [(str(n), n) for n in range(100)]
    started = []

    def counting(item_id, n):
        started.append(n)
        raise UserError("HTTP 401")

    with pytest.raises(UserError, match="the first 8 items all failed; stopping"):
        run_items(many, counting, log, concurrency=4, stream=None)
    assert len(started) < 30  # stopped early instead of sending all 100


def test_items_run_concurrently_and_ids_must_be_unique(tmp_path):
    active, peak = [0], [0]
    lock = threading.Lock()

    def work(item_id, n):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.05)
        with lock:
            active[0] -= 1
        return {"n": n}

    log = JsonlLog(tmp_path / "log.jsonl")
    run_items([(str(n), n) for n in range(12)], work, log, concurrency=4, stream=None)
    assert peak[0] == 4
    with pytest.raises(ValueError, match="'1' appears more than once"):
        run_items([("1", 1), ("1", 2)], work, log, stream=None)
    with pytest.raises(ValueError, match="single record's id must be its item's"):
        run_items([("new", 1)], lambda i, n: {"id": "other"}, log, stream=None)


def test_summary_lines_read_well():
    summary = RunSummary(total=10, skipped=4, written=6, failed=0, seconds=75.2, desc="rlaif")
    assert summary.lines() == ["rlaif: 10 items: 6 written, 4 already done, 0 failed in 1m15s"]


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    from posttrain.feedback.jobs import JsonlLog, run_items

    path, kill_at = sys.argv[1], int(sys.argv[2])

    def work(item_id, n):
        if n == kill_at:
            time.sleep(0.1)  # let the other workers finish their items
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(0.01 * (n % 3))
        return {"n": n, "text": "x" * 200}

    with JsonlLog(path) as log:
        summary = run_items([(f"item-{n:03d}", n) for n in range(40)], work, log, concurrency=3, desc="demo")
    print(summary.lines()[0])
""")


def test_kill_9_partway_then_rerun_gives_every_id_once(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILLED_RUN)
    path = tmp_path / "out.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    killed = subprocess.run([sys.executable, str(script), str(path), "17"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert killed.returncode == -signal.SIGKILL
    first = lines(path)
    assert 5 <= len(first) < 40
    with path.open("a") as f:  # and the kill tore a line mid-write
        f.write('{"id": "item-039", "n": 39, "te')
    done = subprocess.run([sys.executable, str(script), str(path), "-1"], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "unfinished last line" in done.stderr
    assert f"40 items: {40 - len(first)} written, {len(first)} already done, 0 failed" in done.stdout
    ids = [r["id"] for r in lines(path)]
    assert len(ids) == len(set(ids)) == 40 and set(ids) == {f"item-{n:03d}" for n in range(40)}
    assert ids[:len(first)] == [r["id"] for r in first]  # what was there stays, in place


def test_ctrl_c_stops_at_once_without_waiting_for_items_in_flight(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from posttrain.feedback.jobs import JsonlLog, run_items

        def work(item_id, n):
            if n:
                time.sleep(300)  # a request that hangs
            return {"n": n}

        with JsonlLog(sys.argv[1]) as log:
            run_items([(str(n), n) for n in range(4)], work, log, concurrency=2, stream=None)
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # SIGINT back to its default in the child: a suite started in the background (`cmd &`) ignores it,
    # and a child that inherits the ignore never raises KeyboardInterrupt.
    process = subprocess.Popen([sys.executable, str(script), str(tmp_path / "out.jsonl")], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    out = tmp_path / "out.jsonl"
    while not (out.exists() and out.stat().st_size) and time.monotonic() < deadline:  # item 0 is written
        time.sleep(0.02)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)  # would hang for 300 s if exit waited for the workers
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr
    assert [r["id"] for r in lines(tmp_path / "out.jsonl")] == ["0"]


def test_an_aborted_run_lets_the_items_in_flight_end(tmp_path):
    """After an abort, no worker is still inside `work`: a thread left inside torch when the
    interpreter exits aborts the process (exit 134 instead of 2)."""
    import threading
    import time as _time

    from posttrain.feedback.jobs import JsonlLog, RunAborted, run_items

    inside = threading.Event()

    def work(item_id, item):
        inside.set()
        _time.sleep(0.05)
        raise RuntimeError("down")

    with JsonlLog(tmp_path / "log.jsonl") as log:
        with pytest.raises(RunAborted):
            run_items([(str(i), i) for i in range(40)], work, log, concurrency=4, stream=None)
    assert inside.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("posttrain-job-") and t.is_alive()]
