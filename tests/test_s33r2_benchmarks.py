"""The benchmark drivers after stop 33's fixes, beyond the pinned walkthrough tests.

- dpo/report.py (the CPU driver): a case whose parity fails claims no target met ("parity failed"
  in the verdict's met? column) and the run exits non-zero after writing its page; the
  tensor-tracking run's losses match the timed run's only if there are as many of them.
- dpo/gpu.py (the GPU driver): the medians and slowest steps, the unsteady-row warning, the time
  target by mean and by median, the parity check (step-0 losses to 1e-3, same first batch, same
  tokens at every step), and `--from-json`, which rewrote results/dpo_gpu*.md from their runs.
- README's GPU table and the commits it quotes, against the results files.

No benchmark is run (TRL is not installed here); the drivers' pure functions get made-up runs
whose answers are worked out by hand, and the stored results are recomputed in plain Python.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import statistics
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"


def _load(monkeypatch, path: Path, name: str, **modules):
    monkeypatch.setattr(sys, "path", [str(BENCH), str(path.parent), *sys.path])
    for key, module in modules.items():
        monkeypatch.setitem(sys.modules, key, module)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def report(monkeypatch):
    return _load(monkeypatch, BENCH / "dpo" / "report.py", "s33r2_bench_dpo_report")


@pytest.fixture
def gpu(monkeypatch, report):
    return _load(monkeypatch, BENCH / "dpo" / "gpu.py", "s33r2_bench_dpo_gpu", report=report)


def _results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _readme_benchmark() -> str:
    text = (ROOT / "README.md").read_text()
    return text[text.index("## Benchmark\n"):text.index("## Architecture\n")]


# --------------------------------------------------------------------------- the CPU driver


def test_cpu_verdict_of_a_failed_parity_says_parity_failed_and_the_run_exits_nonzero(report, tmp_path):
    """results/dpo_cpu.json with the reward model's TRL step-0 loss moved by 0.01: the parity
    check fails, the verdict carries it, the page's met? column reads "parity failed" for that
    case only, a warning names it, and the driver's exit check raises."""
    stored = _results("dpo_cpu")
    bad = json.loads(json.dumps(stored))
    for row in bad["rows"]:
        if row["case"] == "rm" and row["tool"] == "trl":
            for run in row["runs"]:
                run["losses"][0] += 0.01
    parities = [report.parity(c, [r for r in bad["rows"] if r["case"] == c], bad["reference_logps_first_batch"])
                for c in ("dpo_full", "dpo_lora", "rm")]
    assert [report.parity_ok(p) for p in parities] == [True, True, False]
    bad["parity"] = parities
    bad["verdicts"] = [report.verdict(c, [r for r in bad["rows"] if r["case"] == c],
                                      [r for r in bad["ratios"] if r["case"] == c], p)
                       for c, p in zip(("dpo_full", "dpo_lora", "rm"), parities)]
    assert [v["parity_ok"] for v in bad["verdicts"]] == [True, True, False]
    bad["warnings"] = report.parity_warnings(parities)
    want = ("rm: parity check failed (step-0 losses agree: False, step-0 log-probs match the float64 reference: "
            "True, same first batch: True, same tokens every step: True)")
    assert bad["warnings"] == [want]
    page = tmp_path / "dpo_cpu.md"
    report.write_markdown(bad, page)
    verdict_lines = {line.split("|")[1].strip(): line for line in page.read_text().splitlines()
                     if line.startswith(("| DPO full |", "| DPO LoRA |", "| reward model |"))}
    assert verdict_lines["reward model"].endswith("| parity failed |")
    assert "parity failed" not in verdict_lines["DPO full"] + verdict_lines["DPO LoRA"]
    assert "MISMATCH" in page.read_text()
    with pytest.raises(SystemExit) as exc:
        report.exit_on_parity_failure(parities)
    assert exc.value.code not in (0, None) and "rm" in str(exc.value)
    report.exit_on_parity_failure(parities[:2])  # parity holds: no exit


def test_cpu_stored_verdicts_without_a_parity_key_render_as_before(report, tmp_path):
    """A results file written before verdicts carried `parity_ok` (every stored page) keeps its
    met? column."""
    stored = _results("dpo_cpu")
    assert all("parity_ok" not in v for v in stored["verdicts"])
    page = tmp_path / "dpo_cpu.md"
    report.write_markdown(stored, page)
    stored_page = (RESULTS / "dpo_cpu.md").read_text()
    for line in page.read_text().splitlines():
        if line.startswith(("| DPO full | precompute |", "| reward model | default |")):
            assert line in stored_page


def _tracked(losses):
    return {"peak_tensor_mib": 1.0, "peak_process_tensor_mib": 1.0, "tensor_mib_at": {}, "losses": losses}


def _cpu_run(losses):
    return {"step_times_s": [1, 1, 0.1, 0.1], "step_cpu_s": [1, 1, 0.1, 0.1], "precompute_s": None,
            "peak_rss_mib": 1.0, "peak_rss_before_train_mib": 1.0, "rss_after_import_mib": 1.0, "losses": losses,
            "loadavg_1min_before": 0.0, "loadavg_1min_after": 0.0, "child_wall_s": 1.0, "tokens": [1] * 4}


@pytest.mark.parametrize("tracked, match", [([0.7, 0.6, 0.5, 0.4], True), ([0.7, 0.6], False), ([], False),
                                            ([0.7, 0.6, 0.5, 0.4, 0.3], False), ([0.7, 0.6, 0.5, 0.41], False)])
def test_tensor_run_losses_match_only_with_as_many_losses(report, tracked, match):
    """A tensor-tracking run that stopped after two steps (or logged nothing) computed less than
    the timed runs: zip() used to pair what there was and call it a match."""
    s = report.summarize([_cpu_run([0.7, 0.6, 0.5, 0.4])], warmup=2, steps=4, tensors=_tracked(tracked))
    assert s["tensor_run_losses_match"] is match


def test_step0_agreement_is_shared_and_strict(report):
    assert report.step0_agreement([0.69], [0.69 + 5e-6], 1e-5) == (pytest.approx(5e-6), True)
    assert report.step0_agreement([0.69], [0.69 + 2e-5], 1e-5)[1] is False
    assert report.step0_agreement([0.69, 0.69 + 1e-6], [], 1e-5)[1] is True  # posttrain against itself
    assert report.step0_agreement([0.69], [0.69, math.nan], 1e-3) == (None, False)
    assert report.step0_agreement([], [0.69], 1e-3) == (None, False)


# --------------------------------------------------------------------------- the GPU driver


def _gpu_row(case, tool, variant, times, losses, peak, pre=None, tokens=None, digest="d"):
    run = {"step_times_s": times, "losses": losses, "peak_cuda_mib": peak, "peak_rss_mib": 1.0, "precompute_s": pre,
           "tokens": tokens if tokens is not None else [100] * len(times), "first_batch_digest": digest}
    return {"case": case, "tool": tool, "variant": variant, "note": variant, "run": run}


def test_gpu_row_summary_by_hand(gpu):
    row = _gpu_row("dpo_full", "trl", "v", [9, 9, 0.3, 0.3, 0.3, 2.1, 2.1], [0.69], 1.0, pre=1.4)["run"]
    m = gpu.row_summary(row, 2, 7)
    assert m["step_ms"] == pytest.approx(1020.0) and m["step_ms_median"] == pytest.approx(300.0)
    assert m["step_ms_max"] == pytest.approx(2100.0)
    assert m["step_ms_with_precompute"] == pytest.approx(1220.0)  # + 1,400 ms / 7 steps
    assert m["step_ms_median_with_precompute"] == pytest.approx(500.0)


def test_gpu_verdict_meets_the_time_target_only_by_mean_and_median(gpu):
    """posttrain's steps take 200 ms. TRL's five timed steps: first 300, 300, 2.5 s × 3 (mean 1,620,
    median 2,500), then 300 × 3, 2.5 s × 2 (mean 1,180, median 300): there posttrain is 0.17× by
    the mean and 0.67× by the median, so the time target is not met."""
    rows = [_gpu_row("dpo_full", "posttrain", "precompute", [9, 9] + [0.2] * 5, [0.69], 100.0),
            _gpu_row("dpo_full", "trl", "gc_off", [9, 9, 0.3, 0.3, 2.5, 2.5, 2.5], [0.69], 1000.0)]
    for r in rows:
        r["summary"] = gpu.row_summary(r["run"], 2, 7)
    (v,) = gpu.verdicts(rows)
    assert v["time_ratio_vs_fastest"] == pytest.approx(200 / 1620)
    assert v["time_ratio_vs_fastest_median"] == pytest.approx(200 / 2500)  # median of 300, 300, 2.5k ×3: 2,500
    rows[1]["run"]["step_times_s"] = [9, 9, 0.3, 0.3, 0.3, 2.5, 2.5]
    rows[1]["summary"] = gpu.row_summary(rows[1]["run"], 2, 7)
    (v,) = gpu.verdicts(rows)
    assert v["time_ratio_vs_fastest"] == pytest.approx(200 / 1180) and v["time_ratio_vs_fastest_median"] == \
        pytest.approx(200 / 300)
    assert (v["time_met"], v["memory_met"], v["parity_ok"], v["met"]) == (False, True, True, False)
    (warning,) = gpu.unsteady_warnings(rows)
    assert warning.startswith("dpo_full trl:gc_off: unsteady steps — mean 1,180 ms is 3.93× the median 300 ms")


def test_gpu_unsteady_warning_uses_the_cpu_drivers_limit(gpu, report):
    assert gpu.SPREAD_WARNING is report.SPREAD_WARNING
    steady = _gpu_row("rm", "trl", "default", [9, 9, 0.1, 0.1, 0.1, 0.1, 0.145], [0.69], 1.0)
    steady["summary"] = gpu.row_summary(steady["run"], 2, 7)  # mean 109 ms, median 100: 1.09×
    assert gpu.unsteady_warnings([steady]) == []


def test_gpu_parity_checks_tokens_and_first_batch_and_names_the_steps(gpu):
    rows = [_gpu_row("rm", "posttrain", "default", [0.1] * 4, [0.7081], 1.0, tokens=[5, 6, 7, 8]),
            _gpu_row("rm", "trl", "default", [0.1] * 4, [0.7078], 1.0, tokens=[5, 6, 9, 8])]
    p = gpu.parity("rm", rows)
    assert p["agree"] is True and p["max_abs_diff"] == pytest.approx(3e-4)
    assert p["same_first_batch_ids"] is True and p["same_tokens_every_step"] is False
    assert p["tokens_differ_at_steps"] == [3]
    assert "same prompt+response tokens at every step: False (they differ at step 3)" in gpu._parity_line(p)
    assert gpu._parity_line(p).startswith("Parity: MISMATCH.")
    want = "rm: parity check failed (step-0 losses agree: True, same first batch: True, same tokens every step: False)"
    assert gpu.parity_warnings([p]) == [want]
    rows[1]["run"]["tokens"] = [5, 6, 7]  # a run with a step fewer
    assert gpu.parity("rm", rows)["tokens_differ_at_steps"] == [4]
    rows[1]["run"]["tokens"], rows[1]["run"]["first_batch_digest"] = [5, 6, 7, 8], "other"
    assert gpu.parity("rm", rows)["same_first_batch_ids"] is False
    for r in rows:  # runs that do not record them: not checked, not a failure
        del r["run"]["tokens"], r["run"]["first_batch_digest"]
    p = gpu.parity("rm", rows)
    assert (p["same_first_batch_ids"], p["same_tokens_every_step"]) == (None, None) and gpu.parity_ok(p)
    assert gpu._parity_line(p).endswith("under bf16 autocast).")


def test_gpu_parity_tolerance_and_a_run_without_losses(gpu):
    def rows(pt, trl):
        return [_gpu_row("rm", "posttrain", "default", [0.1] * 3, pt, 1.0),
                _gpu_row("rm", "trl", "default", [0.1] * 3, trl, 1.0)]

    assert gpu.parity("rm", rows([0.7081], [0.7072]))["agree"] is True    # 9e-4
    assert gpu.parity("rm", rows([0.7081], [0.7069]))["agree"] is False   # 1.2e-3
    assert gpu.parity("rm", rows([0.7081], []))["agree"] is False          # TRL logged nothing


def test_gpu_main_exits_nonzero_after_writing_a_page_whose_parity_failed(gpu, tmp_path):
    rows = [_gpu_row("rm", "posttrain", "default", [0.1] * 7, [0.75, 0.7], 1000.0),
            _gpu_row("rm", "trl", "default", [0.3] * 7, [0.69, 0.68], 4000.0)]
    rep = {"command": "c", "date": "d", "total_wall_s": 60.0, "gpu": "g", "failed": [],
           "versions": {k: "0" for k in ("torch", "transformers", "trl", "peft", "accelerate", "python")}
           | {"posttrain_commit": "abc1234", "machine": "x86_64, 16 CPUs"},
           "assets": {"params": 2.2e8, "rows": 192, "sequence_tokens_min": 1, "sequence_tokens_max": 2,
                      "sequence_tokens_median": 1},
           "settings": {"steps": 7, "warmup": 2, "batch_size": 16, "max_length": 1024, "lr": 5e-5}, "rows": rows}
    gpu.summarise(rep)
    gpu.write_markdown(rep, tmp_path / "dpo_gpu.md")
    text = (tmp_path / "dpo_gpu.md").read_text()
    assert "| rm | default |" in text and text.split("| rm | default |")[1].split("\n")[0].endswith("| parity failed |")
    assert "- rm: parity check failed" in text and "; x86_64, 16 CPUs." in text
    with pytest.raises(SystemExit):
        gpu.exit_on_parity_failure(rep["parity"])


@pytest.mark.parametrize("name", ["dpo_gpu", "dpo_gpu_gc"])
def test_stored_gpu_pages_are_what_from_json_writes(gpu, monkeypatch, tmp_path, name):
    """results/dpo_gpu*.md were rewritten by `gpu.py --from-json` from their JSON's raw runs: doing
    it again on a copy gives the same page, but for the line naming the rewrite's date and commit,
    and the same summaries."""
    stored = _results(name)
    copy = tmp_path / f"{name}.json"
    copy.write_text(json.dumps(stored, indent=1) + "\n")
    monkeypatch.setattr(gpu, "save_report", lambda rep, folder, stem, write: write(rep, folder / f"{stem}.md"))
    gpu.from_json(copy)
    again = [line for line in (tmp_path / f"{name}.md").read_text().splitlines() if "were rewritten" not in line]
    page = [line for line in (RESULTS / f"{name}.md").read_text().splitlines() if "were rewritten" not in line]
    assert again == page
    assert "were rewritten from the stored runs" in (RESULTS / f"{name}.md").read_text()


def test_stored_gpu_figures_follow_from_the_raw_steps():
    """Every row's mean, median and slowest timed step on the GPU pages, recomputed from the raw
    step times in plain Python; the stored TRL DPO full row is flagged unsteady."""
    for name in ("dpo_gpu", "dpo_gpu_gc"):
        rep = _results(name)
        w = rep["settings"]["warmup"]
        for row in rep["rows"]:
            timed = row["run"]["step_times_s"][w:]
            m = row["summary"]
            assert m["step_ms"] == pytest.approx(1000 * sum(timed) / len(timed))
            assert m["step_ms_median"] == pytest.approx(1000 * statistics.median(timed))
            assert m["step_ms_max"] == pytest.approx(1000 * max(timed))
            assert (f"| {m['peak_cuda_mib']:,.0f} | {m['step_ms_median']:,.0f} ({m['step_ms_max']:,.0f}) | "
                    f"{m['step_ms_median_with_precompute']:,.0f} |") in (RESULTS / f"{name}.md").read_text()
    warnings = _results("dpo_gpu")["warnings"]
    assert any(x.startswith("dpo_full trl:gc_off+precompute: unsteady steps") for x in warnings)


# --------------------------------------------------------------------------- README's GPU table


def _readme_gpu_rows() -> list[str]:
    text = _readme_benchmark()
    return text[text.index("On a GPU (one NVIDIA H200"):text.index("**Long rows, by peak tensors**")].splitlines()


def _gpu_summaries() -> dict:
    rows = _results("dpo_gpu")["rows"] + _results("dpo_gpu_gc")["rows"]
    out = {}
    for r in rows:
        timed = r["run"]["step_times_s"][2:]
        pre = 1000 * (r["run"].get("precompute_s") or 0.0) / 12
        out[(r["case"], r["tool"], r["variant"])] = {
            "mean": 1000 * sum(timed) / len(timed), "median": 1000 * statistics.median(timed),
            "mean_incl": 1000 * sum(timed) / len(timed) + pre, "median_incl": 1000 * statistics.median(timed) + pre,
            "peak": r["run"]["peak_cuda_mib"]}
    return out


@pytest.mark.parametrize("case, label, ours, theirs", [
    ("dpo_full", "DPO full", "precompute", "gc_off+precompute"),
    ("dpo_lora", "DPO LoRA", "precompute", "gc_off+precompute"),
    ("rm", "reward model", "default", "default"),
    ("rm", "reward model, `gc`", "gc", "default")])
def test_readme_gpu_table_leads_with_the_median_from_the_results(case, label, ours, theirs):
    S = _gpu_summaries()
    a, b = S[(case, "posttrain", ours)], S[(case, "trl", theirs)]
    row = next(line for line in _readme_gpu_rows() if line.startswith(f"| {label} | "))
    median = f"{a['median']:,.0f} vs {b['median']:,.0f} ms: "
    mean = f"(mean {a['mean']:,.0f} vs {b['mean']:,.0f} ms: {a['mean'] / b['mean']:.2f}×)"
    assert row.startswith(f"| {label} | {median}"), row
    assert re.search(rf"\*?\*?{a['median'] / b['median']:.2f}×\*?\*? {re.escape(mean)}", row), row
    assert f"{a['peak'] / 1024:.1f} vs {b['peak'] / 1024:.1f} GiB: " in row
    assert f"{a['peak'] / b['peak']:.2f}×" in row
    if case != "rm":
        assert f"{a['median_incl'] / b['median_incl']:.2f}×" in row.split("|")[3]
        assert f"({a['mean_incl'] / b['mean_incl']:.2f}×)" in row.split("|")[3]


def test_readme_gpu_met_column_is_the_pages_verdict():
    verdicts = {v["case"]: v for v in _results("dpo_gpu")["verdicts"] if v["posttrain_row"] in ("precompute", "default")}
    words = {"dpo_full": "yes", "dpo_lora": "no (time)", "rm": "parity failed"}
    for case, label in (("dpo_full", "DPO full"), ("dpo_lora", "DPO LoRA"), ("rm", "reward model")):
        v = verdicts[case]
        want = "parity failed" if not v["parity_ok"] else "yes" if v["met"] else None
        assert want is None or want == words[case]
        row = next(line for line in _readme_gpu_rows() if line.startswith(f"| {label} | "))
        assert row.endswith(f"| {words[case]} |"), row


# --------------------------------------------------------------------------- commits the README quotes


@pytest.mark.parametrize("name, before", [
    ("dpo_gpu", "at "), ("rl_cpu", "2026-11-29 at "), ("dpo_cpulong_moments", "first at "),
    ("dpo_cpu", "Measured 2026-11-29 at "), ("dpo_cpu32k", "minutes at "), ("dpo_cpulong_blocks", "at "),
    ("rl_cpu32k", "minutes at ")])
def test_readme_quotes_the_commit_each_page_records(name, before):
    """The commit a results page records, "+dirty" included, is the one the README quotes for it
    (and a clean commit is not quoted with a "+dirty" the page does not have)."""
    commit = _results(name)["versions"]["posttrain_commit"]
    assert re.search(rf"{re.escape(before + commit)}(?![+\w])", _readme_benchmark()), (name, commit)
