"""The benchmark figures against what was measured.

Every figure in `benchmarks/results/*.md` (and the README's Benchmark section) is recomputed
here in plain Python from the raw per-repeat numbers in the matching `results/*.json`, the way
the pages and `benchmarks/README.md` say it is computed; the report functions themselves are
called on small synthetic inputs whose answers are worked out by hand. No benchmark is run.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402  (benchmarks/ is a script folder, not a package)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dpo_report = _load(BENCH / "dpo" / "report.py", "bench_dpo_report")
rl_report = _load(BENCH / "rl" / "report.py", "bench_rl_report")
sft_report = _load(BENCH / "sft_report.py", "bench_sft_report")
rh_report = _load(BENCH / "reward_hacking" / "report.py", "bench_rh_report")

DPO_FILES = ["dpo_cpu", "dpo_cpu32k", "dpo_cpulong", "dpo_cpulong_blocks", "dpo_padding_free", "dpo_readout"]
RL_FILES = ["rl_cpu", "rl_cpu32k", "rl_padding_free"]


# --------------------------------------------------------------------------- plain arithmetic


def median(xs) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def mean(xs) -> float:
    xs = list(xs)
    return math.fsum(xs) / len(xs)


def f0(x) -> str:
    return f"{x:,.0f}"


def close(a, b, rel=1e-9) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= rel * max(1.0, abs(a), abs(b))


def results(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def page(name: str) -> str:
    return (RESULTS / f"{name}.md").read_text()


def readme_benchmark() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("## Benchmark")
    end = text.index("\n## ", start + 5)
    return " ".join(text[start:end].split())  # line breaks inside sentences do not matter


# --------------------------------------------------------------------------- DPO / RM pages


def dpo_figures(report: dict) -> dict:
    """Every row's figures from its raw runs, as benchmarks/README.md describes them."""
    s = report["settings"]
    w, steps = s["warmup"], s["steps"]
    out = {}
    for row in report["rows"]:
        runs = row["runs"]
        timed = [t for r in runs for t in r["step_times_s"][w:]]
        cpu = [t for r in runs for t in r["step_cpu_s"][w:]]
        per = [1000 * mean(r["step_times_s"][w:]) for r in runs]
        pre = [r["precompute_s"] for r in runs if r["precompute_s"] is not None]
        fig = {"step_ms": 1000 * mean(timed), "per_repeat_ms": per, "cpu_ms": 1000 * mean(cpu),
               "median_ms": 1000 * median(timed), "precompute_s": median(pre) if pre else None,
               "peak_rss": median([r["peak_rss_mib"] for r in runs]), "rss_per_repeat": [r["peak_rss_mib"] for r in runs],
               "spread": max(per) / min(per) if len(runs) > 1 else 1.0,
               "load": max((r["loadavg_1min_before"] + r["loadavg_1min_after"]) / 2 for r in runs),
               "tensors": (row.get("tensor_run") or {}).get("peak_tensor_mib")}
        fig["incl_ms"] = fig["step_ms"] + (1000 * fig["precompute_s"] / steps if fig["precompute_s"] else 0.0)
        out[(row["case"], row["tool"], row["variant"])] = fig
    return out


@pytest.mark.parametrize("name", DPO_FILES)
def test_dpo_row_figures_follow_from_the_raw_runs(name):
    report = results(name)
    mine = dpo_figures(report)
    for row in report["rows"]:
        m, fig = row["summary"], mine[(row["case"], row["tool"], row["variant"])]
        assert len(row["runs"]) == report["settings"]["rounds"]
        assert all(len(r["step_times_s"]) == report["settings"]["steps"] for r in row["runs"])
        for key, want in (("step_ms_mean", fig["step_ms"]), ("step_cpu_ms_mean", fig["cpu_ms"]),
                          ("step_ms_median", fig["median_ms"]), ("precompute_s", fig["precompute_s"]),
                          ("step_ms_with_precompute", fig["incl_ms"]), ("peak_rss_mib", fig["peak_rss"]),
                          ("repeat_spread", fig["spread"]), ("loadavg", fig["load"]),
                          ("peak_tensor_mib", fig["tensors"])):
            assert close(m.get(key), want), (row["case"], row["tool"], row["variant"], key, m.get(key), want)


@pytest.mark.parametrize("name", DPO_FILES)
def test_dpo_ratios_verdicts_and_warnings_follow_from_the_rows(name):
    report = results(name)
    mine = dpo_figures(report)
    cases = {case for case, _, _ in mine}
    # every posttrain row against every TRL row of its case, posttrain / TRL
    want_pairs = {(c, a[2], b[2]) for a in mine for b in mine for c in cases
                  if a[0] == b[0] == c and a[1] == "posttrain" and b[1] == "trl"}
    assert {(r["case"], r["ours"], r["vs"]) for r in report["ratios"]} == want_pairs
    for r in report["ratios"]:
        a, b = mine[(r["case"], "posttrain", r["ours"])], mine[(r["case"], "trl", r["vs"])]
        assert close(r["step_time"], a["step_ms"] / b["step_ms"])
        assert close(r["step_cpu"], a["cpu_ms"] / b["cpu_ms"])
        assert close(r["step_time_with_precompute"], a["incl_ms"] / b["incl_ms"])
        assert close(r["peak_rss"], a["peak_rss"] / b["peak_rss"])
        if "peak_tensors" in r:
            assert close(r["peak_tensors"], a["tensors"] / b["tensors"])
    defaults = {"dpo_full": "precompute", "dpo_lora": "precompute", "rm": "default"}
    with_trl = {c for c in cases if any(k[0] == c and k[1] == "trl" for k in mine)}
    assert {v["case"] for v in report["verdicts"]} == {c for c in with_trl if (c, "posttrain", defaults[c]) in mine}
    for v in report["verdicts"]:
        c, ours = v["case"], mine[(v["case"], "posttrain", defaults[v["case"]])]
        trl = {k[2]: fig for k, fig in mine.items() if k[0] == c and k[1] == "trl"}
        fastest = min(trl, key=lambda k: trl[k]["incl_ms"])
        smallest = min(trl, key=lambda k: trl[k]["peak_rss"])
        assert (v["trl_fastest"], v["trl_smallest"]) == (fastest, smallest)
        assert close(v["time_ratio_vs_fastest"], ours["incl_ms"] / trl[fastest]["incl_ms"])
        assert close(v["rss_ratio_vs_smallest"], ours["peak_rss"] / trl[smallest]["peak_rss"])
        assert v["time_target_met"] == (ours["incl_ms"] / trl[fastest]["incl_ms"] <= 0.5)
        assert v["rss_target_met"] == (ours["peak_rss"] / trl[smallest]["peak_rss"] <= 0.5)
        # the fastest row gives the largest time ratio: no other TRL row makes posttrain look slower
        assert all(ours["incl_ms"] / fig["incl_ms"] <= v["time_ratio_vs_fastest"] + 1e-12 for fig in trl.values())
        if "tensor_ratio_vs_least" in v:
            least = min(trl, key=lambda k: trl[k]["tensors"])
            assert v["trl_least_tensors"] == least
            assert close(v["tensor_ratio_vs_least"], ours["tensors"] / trl[least]["tensors"])
        if "default" in trl:
            assert close(v["vs_trl_default"]["step_time_with_precompute"], ours["incl_ms"] / trl["default"]["incl_ms"])
            assert close(v["vs_trl_default"]["peak_rss"], ours["peak_rss"] / trl["default"]["peak_rss"])
    disturbed = sorted(f"{c} {t}:{v}" for (c, t, v), fig in mine.items() if fig["spread"] > 1.15)
    warned = sorted(w.split(": the repeats'")[0] for w in report["warnings"] if "disturbed timing" in w)
    assert warned == disturbed
    for p in report["parity"]:
        pt = [r["losses"][0] for row in report["rows"] if row["case"] == p["case"] and row["tool"] == "posttrain"
              for r in row["runs"]]
        trl = [r["losses"][0] for row in report["rows"] if row["case"] == p["case"] and row["tool"] == "trl"
               for r in row["runs"]]
        diff = max(abs(a - b) for a in pt for b in (trl or pt))
        assert close(p["max_abs_diff"], diff) and p["agree"] == (diff < 1e-5)
        if p["case"] != "rm":
            assert all(abs(c["logged"] - c["reference"]) / abs(c["reference"]) < 1e-5 for c in p["logps_checks"])


@pytest.mark.parametrize("name", DPO_FILES)
def test_dpo_page_quotes_the_recomputed_figures(name):
    report, text = results(name), page(name)
    mine = dpo_figures(report)
    for (case, tool, variant), fig in mine.items():
        pre = "—" if fig["precompute_s"] is None else f"{fig['precompute_s']:,.2f}"
        cells = (f"| {f0(fig['step_ms'])} ({' / '.join(f0(x) for x in fig['per_repeat_ms'])}) | {f0(fig['cpu_ms'])} | "
                 f"{pre} | {f0(fig['incl_ms'])} | {f0(fig['peak_rss'])} ({' / '.join(f0(x) for x in fig['rss_per_repeat'])}) |")
        assert cells in text, (case, tool, variant, cells)
        if fig["tensors"] is not None:
            assert f"| {f0(fig['tensors'])} (" in text
    sections = {chunk.split("\n", 1)[0]: chunk for chunk in text.split("\n## ")}
    for case in {k[0] for k in mine}:
        section = sections[dpo_report.CASES[case]]
        for (c, tool, variant), fig in mine.items():
            if c != case or tool != "posttrain":
                continue
            for (c2, tool2, theirs), other in mine.items():
                if c2 == case and tool2 == "trl":
                    line = (f"| {variant} | {theirs} | {fig['step_ms'] / other['step_ms']:.2f}× | "
                            f"{fig['cpu_ms'] / other['cpu_ms']:.2f}× | {fig['incl_ms'] / other['incl_ms']:.2f}× | "
                            f"{fig['peak_rss'] / other['peak_rss']:.2f}× |")
                    assert line in section, line


def test_dpo_pages_state_the_batch_they_averaged_over():
    for name in DPO_FILES:
        batch = results(name)["settings"]["batch_size"]
        stated = {int(n) for n in re.findall(r"means over the (\d+) pairs", page(name))}
        assert stated <= {batch}, (name, stated, batch)


# --------------------------------------------------------------------------- RL pages


def rl_figures(report: dict) -> dict:
    w = report["settings"]["warmup"]
    out = {}
    for row in report["rows"]:
        runs = row["runs"]

        def pooled(f, runs=runs):
            return [f(r, k) for r in runs for k in range(w, len(r["step_times_s"]))]

        per = [1000 * median(r["step_times_s"][w:]) for r in runs]
        out[(row["case"], row["tool"], row["variant"])] = {
            "step_ms": 1000 * median(pooled(lambda r, k: r["step_times_s"][k])), "per_repeat_ms": per,
            "cpu_ms": 1000 * median(pooled(lambda r, k: r["step_cpu_s"][k])),
            "gen_ms": 1000 * median(pooled(lambda r, k: r["generate_s"][k])),
            "phase_ms": 1000 * median(pooled(lambda r, k: r["rollout_phase_s"][k])),
            "update_ms": 1000 * median(pooled(lambda r, k: r["step_times_s"][k] - r["rollout_phase_s"][k])),
            "gen_share": median(pooled(lambda r, k: r["generate_s"][k] / r["step_times_s"][k])),
            "phase_share": median(pooled(lambda r, k: r["rollout_phase_s"][k] / r["step_times_s"][k])),
            "peak_rss": median([r["peak_rss_mib"] for r in runs]),
            "spread": max(per) / min(per) if len(runs) > 1 else 1.0}
    return out


@pytest.mark.parametrize("name", RL_FILES)
def test_rl_figures_ratios_and_verdicts_follow_from_the_raw_runs(name):
    report, text = results(name), page(name)
    mine = rl_figures(report)
    keys = {"step_ms": "step_ms", "cpu_ms": "step_cpu_ms", "gen_ms": "generate_ms", "phase_ms": "phase_ms",
            "update_ms": "update_ms", "gen_share": "generate_share", "phase_share": "phase_share",
            "peak_rss": "peak_rss_mib", "spread": "repeat_spread"}
    for row in report["rows"]:
        fig = mine[(row["case"], row["tool"], row["variant"])]
        for k, key in keys.items():
            assert close(row["summary"][key], fig[k]), (row["case"], row["tool"], row["variant"], key)
        assert f"| {f0(fig['step_ms'])} ({' / '.join(f0(x) for x in fig['per_repeat_ms'])}) | {f0(fig['cpu_ms'])} | " \
               f"{f0(fig['gen_ms'])} | {f0(fig['phase_ms'])} | {f0(fig['update_ms'])} |" in text
    names = {"step_time": "step_ms", "step_cpu": "cpu_ms", "generate": "gen_ms", "phase": "phase_ms",
             "update": "update_ms", "peak_rss": "peak_rss", "generate_share": "gen_share"}
    for r in report["ratios"]:
        a, b = mine[(r["case"], "posttrain", r["ours"])], mine[(r["case"], "trl", r["vs"])]
        for name_, k in names.items():
            assert close(r[name_], a[k] / b[k])
    for v in report["verdicts"]:
        trl = {k[2]: fig for k, fig in mine.items() if k[0] == v["case"] and k[1] == "trl"}
        ours = mine[(v["case"], "posttrain", "default")]
        fastest = min(trl, key=lambda k: trl[k]["step_ms"])
        assert v["trl_fastest"] == fastest
        assert close(v["time_ratio_vs_fastest"], ours["step_ms"] / trl[fastest]["step_ms"])
        assert close(v["rss_ratio_vs_fastest"], ours["peak_rss"] / trl[fastest]["peak_rss"])
        if "default" in trl:
            assert close(v["time_ratio_vs_default"], ours["step_ms"] / trl["default"]["step_ms"])
        assert f"| {v['case']} | {ours['step_ms'] / trl[fastest]['step_ms']:.2f}× ({fastest}) |" in text
    disturbed = sorted(f"{c} {t}:{v}" for (c, t, v), fig in mine.items() if fig["spread"] > 1.15)
    assert sorted(w.split(": the repeats'")[0] for w in report["warnings"] if "disturbed" in w) == disturbed
    lp = report["loss_parity"]
    assert lp["agree"] == (abs(lp["posttrain_loss"] - lp["trl"]["loss"]) < 1e-6 and lp["trl"]["grad_rel_diff"] < 1e-5)
    for p in report["parity"]:
        kls = [r["kl"][0] for row in report["rows"] if row["case"] == p["case"] for r in row["runs"]
               if r["kl"] and r["kl"][0] is not None]
        assert p["step1_kl_zero"] == (p["beta"] == 0 or (bool(kls) and all(abs(x) < 1e-6 for x in kls)))


# --------------------------------------------------------------------------- SFT, PEFT, reward hacking, GPU pages


def test_sft_page_follows_from_the_raw_runs():
    report, text = results("sft_cpu"), page("sft_cpu")
    w = report["settings"]["warmup"]
    mine = {}
    for row in report["rows"]:
        runs = row["runs"]
        tokens = sum(sum(r["tokens"][w:]) for r in runs)
        fig = {"tokens_per_s": tokens / sum(sum(r["step_times_s"][w:]) for r in runs),
               "tokens_per_cpu_s": tokens / sum(sum(r["step_cpu_s"][w:]) for r in runs),
               "s_per_step_median": median([median(r["step_times_s"][w:]) for r in runs]),
               "peak_rss_mib": median([r["peak_rss_mib"] for r in runs]),
               "tokens_per_step_mean": tokens / sum(len(r["tokens"][w:]) for r in runs)}
        for key, want in fig.items():
            assert close(row["summary"][key], want), (row["tool"], row["variant"], key)
        per_run = " / ".join(f0(sum(r["tokens"][w:]) / sum(r["step_times_s"][w:])) for r in runs)
        assert (f"| {fig['s_per_step_median']:,.2f} | {fig['tokens_per_s']:,.1f} ({per_run}) | "
                f"{fig['tokens_per_cpu_s']:,.1f} | {f0(fig['tokens_per_step_mean'])} | {f0(fig['peak_rss_mib'])} |") in text
        mine[f"{row['tool']} {row['variant']}"] = fig
    for r in report["ratios"]:
        a, b = mine[r["ours"]], mine[r["vs"]]
        assert close(r["tokens_per_s"], a["tokens_per_s"] / b["tokens_per_s"])
        assert close(r["peak_rss"], a["peak_rss_mib"] / b["peak_rss_mib"])
        assert (f"| {r['ours']} | {r['vs']} | {a['tokens_per_s'] / b['tokens_per_s']:.2f}× | "
                f"{a['tokens_per_cpu_s'] / b['tokens_per_cpu_s']:.2f}× | {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}× |") in text
    trl, pt = report["fixed_batch"]["runs"]
    assert report["fixed_batch"]["same_ids"] == (trl["ids_sha256"] == pt["ids_sha256"])
    rel = abs(trl["loss"] - pt["loss"]) / abs(trl["reference_loss"])
    assert close(report["fixed_batch"]["rel_diff"], rel) and report["fixed_batch"]["agree"] == (rel < 1e-3)
    assert f"| trl | {trl['loss']:.6f} | {trl['reference_loss']:.6f} |" in text
    assert f"| posttrain | {pt['loss']:.6f} | {pt['reference_loss']:.6f} |" in text


def test_peft_page_quotes_its_json():
    report, text = results("peft_cpu"), page("peft_cpu")
    for r in report["rows"]:
        if "skipped" in r:
            assert f"| {r['method']} | {r['lr']:g} | {r['skipped']} |" in text
            continue
        assert 100 * r["trainable"] / r["total"] == pytest.approx(r["percent"])
        assert (f"| {r['method']} | {r['lr']:g} | {r['trainable']:,} | {100 * r['trainable'] / r['total']:.2f} | "
                f"{f0(r['peak_rss_mib'])} | {r['state_mib']:.1f} | {f0(r['tokens_per_s'])} | "
                f"{100 * r['exact_match_after']:.1f}% | {r['eval_loss']:.3f} | {r['wall_s']:.0f} | {r['loadavg']:.1f} |") in text
        assert r["timed_records"] == report["meta"]["steps"] - 10  # the first 10 steps left out, as the page says


def em_points(before: float, after: float, prompts: int) -> Fraction:
    """An exact-match change in points, from the counts behind the fractions."""
    return Fraction(round(after * prompts) - round(before * prompts), prompts) * 100


def test_reward_hacking_summary_and_verdicts_follow_the_stated_rule():
    report, text = results("reward_hacking"), page("reward_hacking")
    for seed, s in report["seeds"].items():
        start = s["results"]["sft"]
        n_greedy = start["prompts"]
        n_sampled = start["prompts"] * start["samples_per_prompt"]
        for name, r in s["results"].items():
            if name == "sft":
                continue
            d_greedy = em_points(start["exact_match_greedy"], r["exact_match_greedy"], n_greedy)
            d_sampled = em_points(start["exact_match_sampled"], r["exact_match_sampled"], n_sampled)
            rose = r["rm_reward_sampled"] > start["rm_reward_sampled"]
            word = ("exploited" if rose and d_greedy < -5 and d_sampled < -5 else
                    "not exploited" if d_greedy >= -5 and d_sampled >= -5 else "partly")
            beta = float(name.split("=")[1])
            label = "GRPO, β = 0 (KL off)" if beta == 0 else f"GRPO, β = {beta:g} (KL on)"
            line = (f"| {label} | {seed} | {start['rm_reward_sampled']:.3f} → {r['rm_reward_sampled']:.3f} | "
                    f"{start['exact_match_greedy']:.1%} → {r['exact_match_greedy']:.1%} | "
                    f"{start['exact_match_sampled']:.1%} → {r['exact_match_sampled']:.1%} | {r['kl_to_sft']:.2f} | {word} |")
            assert line in text, line


def test_gpu_page_ratios_follow_from_its_json():
    """Each verdict line of the GPU page, recomputed from the runs' raw step times, reference
    passes and peaks: posttrain's row against TRL's fastest (time incl. the reference pass) and
    smallest (memory) rows of the same case."""
    report, text = results("dpo_gpu"), page("dpo_gpu")
    w, steps = report["settings"]["warmup"], report["settings"]["steps"]

    def incl(run):
        return 1000 * mean(run["step_times_s"][w:]) + 1000 * (run.get("precompute_s") or 0.0) / steps

    checked = 0
    for case in ("dpo_full", "dpo_lora", "rm"):
        runs = {(r["tool"], r["variant"]): r["run"] for r in report["rows"] if r["case"] == case}
        theirs = {v: r for (tool, v), r in runs.items() if tool == "trl"}
        if not theirs:
            continue
        fastest = min(theirs, key=lambda v: incl(theirs[v]))
        smallest = min(theirs, key=lambda v: theirs[v]["peak_cuda_mib"])
        for (tool, variant), run in runs.items():
            if tool != "posttrain":
                continue
            time = incl(run) / incl(theirs[fastest])
            memory = run["peak_cuda_mib"] / theirs[smallest]["peak_cuda_mib"]
            line = f"| {case} | {variant} | {time:.2f}× ({fastest}; "
            assert line in text, line
            assert f"| {memory:.2f}× ({smallest}; " in text.split(line, 1)[1].split("\n", 1)[0], (case, variant)
            checked += 1
    assert checked >= 3


# --------------------------------------------------------------------------- the README's Benchmark section


def _readme_claims() -> list[tuple[str, str]]:
    """(id, text the README must contain), each text formatted from the results files."""
    claims = []
    sft = results("sft_cpu")
    S = {f"{r['tool']} {r['variant']}": r["summary"] for r in sft["rows"]}
    for ours, theirs in (("posttrain default", "trl default"), ("posttrain group_by_length", "trl group_by_length")):
        a, b = S[ours], S[theirs]
        # tokens/s as the page prints it (one decimal: 1,055.5), then to a whole number as the README does
        claims += [(f"sft {ours}", f"{f0(round(a['tokens_per_s'], 1))} tok/s, {f0(a['peak_rss_mib'])} MiB"),
                   (f"sft {theirs}", f"{f0(round(b['tokens_per_s'], 1))} tok/s, {f0(b['peak_rss_mib'])} MiB"),
                   (f"sft {ours} ratios", f"**{a['tokens_per_s'] / b['tokens_per_s']:.2f}×** | "
                                          f"**{a['peak_rss_mib'] / b['peak_rss_mib']:.2f}×**")]
    lowest = min(r["tokens_per_s"] for r in sft["ratios"]), max(r["peak_rss"] for r in sft["ratios"])
    claims.append(("sft lowest pairing", f"(lowest: {lowest[0]:.2f}× and {lowest[1]:.2f}×)"))
    claims.append(("sft date", f"Measured {sft['date'][:10]} on the 2-core machine"))

    dpo = results("dpo_cpu")
    claims.append(("dpo_cpu date/commit/wall", f"Measured {dpo['date'][:10]} at {dpo['versions']['posttrain_commit']} "
                                               f"on the 2-core machine ({dpo['total_wall_s'] / 60:.1f} minutes"))
    fig = dpo_figures(dpo)
    for v in dpo["verdicts"]:
        c, d = v["case"], v["vs_trl_default"]
        ours, theirs = fig[(c, "posttrain", v["posttrain_row"])], fig[(c, "trl", "default")]
        claims.append((f"dpo_cpu {c} vs default", f"{d['step_time_with_precompute']:.2f}×"))
        claims.append((f"dpo_cpu {c} ms", f"{f0(ours['incl_ms'])} vs {f0(theirs['incl_ms'])} ms"))
        claims.append((f"dpo_cpu {c} tensors", f"{f0(ours['tensors'])} vs {f0(theirs['tensors'])} MiB"))
        claims.append((f"dpo_cpu {c} fastest/smallest",
                       f"{v['time_ratio_vs_fastest']:.2f}×, {v['rss_ratio_vs_smallest']:.2f}×, "))
    claims.append(("dpo_cpu logps 1e-7", "match a float64 forward with no tool code to within 1e-7"))

    long = results("dpo_cpulong")
    T = {(r["case"], r["tool"], r["variant"]): r["summary"]["peak_tensor_mib"] for r in long["rows"]}
    # the posttrain rows run again after the reached-rows moments (a subset; TRL's rows as before)
    moments = results("dpo_cpulong_moments")
    M = {(r["case"], r["tool"], r["variant"]): r["summary"]["peak_tensor_mib"] for r in moments["rows"]}
    assert M[("rm", "trl", "default")] == T[("rm", "trl", "default")]  # deterministic: the same TRL peak
    # and again after attention by blocks on the CPU (c86cfbd)
    blocks = results("dpo_cpulong_blocks")
    B = {(r["case"], r["tool"], r["variant"]): r["summary"]["peak_tensor_mib"] for r in blocks["rows"]}
    assert all(B[key] == T[key] for key in B if key[1] == "trl")
    for case, label in (("dpo_full", "DPO, full"), ("dpo_lora", "DPO, LoRA"), ("rm", "reward model")):
        default = "default" if case == "rm" else "precompute"
        base = T[(case, "trl", "default")]
        bold = "**" if case != "rm" else ""
        claims.append((f"cpulong {case}", f"| {label} | {f0(T[(case, 'posttrain', default)])}: "
                                          f"{bold}{T[(case, 'posttrain', default)] / base:.2f}×{bold} ("))
        again = M[(case, "posttrain", default)]
        claims.append((f"cpulong moments {case}", f"({f0(again)}: {bold}{again / base:.2f}×{bold}; "
                       if case != "dpo_lora" else f"({f0(again)}; "))
        last = B[(case, "posttrain", default)]
        claims.append((f"cpulong blocks {case}", f"; {f0(last)}: {bold}{last / base:.2f}×{bold})"))
    for case, variant, bold in (("dpo_full", "precompute+gc", ""), ("rm", "gc", "**")):
        base = T[(case, "trl", "default")]
        before, after = M[(case, "posttrain", variant)], B[(case, "posttrain", variant)]
        claims.append((f"cpulong {case} gc", f"({f0(before)}: {before / base:.2f}×; {f0(after)}: {bold}{after / base:.2f}×{bold})"))
    claims.append(("cpulong blocks wall/commit", f"at {blocks['versions']['posttrain_commit']} (2026-11-30, "
                                                 f"`benchmarks/results/dpo_cpulong_blocks.md`, 8 rows, "
                                                 f"{blocks['total_wall_s'] / 60:.1f} minutes"))
    rm_gc = B[("rm", "posttrain", "gc")]
    claims.append(("cpulong rm gc bullet", f"posttrain is at **{rm_gc / T[('rm', 'trl', 'default')]:.2f}×** ({f0(rm_gc)} "
                                           f"against {f0(T[('rm', 'trl', 'default')])}"))
    claims.append(("cpulong wall/commit", f"{long['total_wall_s'] / 60:.1f} minutes at {long['versions']['posttrain_commit']}"))

    k32 = results("dpo_cpu32k")
    fig = dpo_figures(k32)
    for v in k32["verdicts"]:
        c, d = v["case"], v["vs_trl_default"]
        ours, theirs = fig[(c, "posttrain", v["posttrain_row"])], fig[(c, "trl", "default")]
        claims.append((f"cpu32k {c}", f"({f0(ours['incl_ms'])} vs {f0(theirs['incl_ms'])} ms; {f0(ours['peak_rss'])} vs "
                                      f"{f0(theirs['peak_rss'])} MiB; {f0(ours['tensors'])} vs {f0(theirs['tensors'])} MiB"))
    claims.append(("cpu32k wall/commit", f"{k32['total_wall_s'] / 60:.1f} minutes at {k32['versions']['posttrain_commit']}"))

    for name in ("rl_cpu", "rl_cpu32k"):
        rl = results(name)
        fig = rl_figures(rl)
        for case, label in (("grpo", "GRPO β = 0"), ("grpo_kl", "GRPO β = 0.04")):
            ours, d = fig[(case, "posttrain", "default")], fig[(case, "trl", "default")]
            claims.append((f"{name} {case}", f"| {label} | " + ("**" if name == "rl_cpu32k" else "")
                           + f"{ours['step_ms'] / d['step_ms']:.2f}×" + ("**" if name == "rl_cpu32k" else "")
                           + f" ({f0(ours['step_ms'])} vs {f0(d['step_ms'])} ms)"))
    rl = results("rl_cpu")
    bd = rl["loss_parity"]["breakdown"]
    a, b = bd["optimizer_step"]["posttrain"]["cpu_ms_median"], bd["optimizer_step"]["trl"]["cpu_ms_median"]
    claims.append(("rl_cpu optimizer", f"{a / b:.2f}× ({a:.1f} vs {b:.1f} CPU-ms)"))
    claims.append(("rl_cpu loss", f"(−{abs(rl['loss_parity']['posttrain_loss']):.9f} on both sides)"))

    gpu = results("dpo_gpu")
    rows = {(r["case"], r["tool"], r["variant"]): r["summary"] for r in gpu["rows"]}
    for case, label, ours, theirs in (("dpo_full", "DPO full", "precompute", "gc_off+precompute"),
                                      ("dpo_lora", "DPO LoRA", "precompute", "gc_off+precompute"),
                                      ("rm", "reward model", "default", "default")):
        a, b = rows[(case, "posttrain", ours)], rows[(case, "trl", theirs)]
        ratio = a["peak_cuda_mib"] / b["peak_cuda_mib"]
        bold = "**" if ratio <= 0.5 else ""
        claims.append((f"gpu {case}", f"| {label} | {f0(a['step_ms_median'])} vs {f0(b['step_ms_median'])} ms: "))
        claims.append((f"gpu {case} mean", f"(mean {f0(a['step_ms'])} vs {f0(b['step_ms'])} ms: "))
        claims.append((f"gpu {case} memory", f"{a['peak_cuda_mib'] / 1024:.1f} vs {b['peak_cuda_mib'] / 1024:.1f} GiB: "
                                             f"{bold}{ratio:.2f}×{bold} |"))

    peft = results("peft_cpu")
    for r in peft["rows"]:
        if "skipped" not in r:
            claims.append((f"peft {r['method']}", f"| {r['trainable']:,} | {r['percent']:.2f} | {r['state_mib']:.1f} MiB | "
                                                  f"{f0(r['peak_rss_mib'])} MiB | {f0(r['tokens_per_s'])} | "
                                                  f"{100 * r['exact_match_after']:.1f}% |".replace("| 100.00 |", "| 100 |")))
    return claims


@pytest.mark.parametrize("claim", _readme_claims(), ids=lambda c: c[0])
def test_readme_quotes_the_results_files(claim):
    assert claim[1] in readme_benchmark(), claim


def test_readme_logps_bound_holds_in_dpo_cpu():
    worst = max(abs(c["logged"] - c["reference"]) / abs(c["reference"])
                for p in results("dpo_cpu")["parity"] for c in p["logps_checks"])
    assert worst < 1e-7  # the README: "match a float64 forward with no tool code to within 1e-7"


def test_readme_sft_fixed_batch_losses():
    trl, pt = results("sft_cpu")["fixed_batch"]["runs"]
    assert (f"losses {trl['loss']:.6f} (TRL) vs {pt['loss']:.6f} (posttrain), float64 reference "
            f"{trl['reference_loss']:.6f}") in readme_benchmark()


def test_readme_grpo_gradient_agreement():
    rel = results("rl_cpu")["loss_parity"]["trl"]["grad_rel_diff"]
    assert f"the gradients agree to {rel:.1e}".replace("e-07", "e-7") in readme_benchmark()


def test_readme_rl32k_generation_times():
    fig = rl_figures(results("rl_cpu32k"))
    pairs = {f"{f0(a['gen_ms'])} vs {f0(b['gen_ms'])} ms a rollout)" for ka, a in fig.items() for kb, b in fig.items()
             if ka[0] == kb[0] and ka[1] == "posttrain" and kb[1] == "trl"}
    assert any(p in readme_benchmark() for p in pairs), pairs


def test_readme_trl_default_peak_rss_range():
    fig = dpo_figures(results("dpo_cpu"))
    peaks = [f["peak_rss"] for (c, t, v), f in fig.items() if t == "trl" and v == "default"]
    assert f"TRL's peak ({f0(min(peaks))}–{f0(max(peaks))} MiB)" in readme_benchmark()


def test_readme_rm_tensors_vs_trl_gc_off():
    fig = dpo_figures(results("dpo_cpu"))
    ratio = fig[("rm", "posttrain", "default")]["tensors"] / fig[("rm", "trl", "gc_off")]["tensors"]
    assert f"a peak of {f0(fig[('rm', 'trl', 'gc_off')]['tensors'])} MiB: posttrain {ratio:.2f}×" in readme_benchmark()


def test_readme_padding_free_figures_are_in_the_cited_file():
    report = results("dpo_padding_free")
    fig = dpo_figures(report)
    pf = [(fig[(c, "posttrain", free)]["step_ms"], fig[(c, "posttrain", padded)]["step_ms"])
          for c, free, padded in (("dpo_full", "precompute", "precompute+padded"),
                                  ("dpo_lora", "precompute", "precompute+padded"), ("rm", "default", "padded"))]
    want = (f"(`benchmarks/results/dpo_padding_free.md`, {report['versions']['posttrain_commit']}): DPO full "
            f"{f0(pf[0][0])} against {f0(pf[0][1])} ms, LoRA {f0(pf[1][0])} against {f0(pf[1][1])}, the reward model "
            f"{f0(pf[2][0])} against {f0(pf[2][1])}")
    assert want in readme_benchmark()


# --------------------------------------------------------------------------- report functions on synthetic input


def _dpo_run(times, cpu, pre, rss, losses, load=(1.0, 2.0)):
    return {"step_times_s": times, "step_cpu_s": cpu, "precompute_s": pre, "peak_rss_mib": rss,
            "peak_rss_before_train_mib": 100.0, "rss_after_import_mib": 50.0, "losses": losses,
            "loadavg_1min_before": load[0], "loadavg_1min_after": load[1], "child_wall_s": 1.0,
            "tokens": [10] * len(times), "tokens_processed": [6] * len(times)}


def test_dpo_summarize_by_hand():
    a = _dpo_run([9, 9, 0.1, 0.2, 0.3, 0.4], [9, 9, 0.2, 0.4, 0.6, 0.8], 1.0, 500.0, [0.7, 0.6], (1.0, 2.0))
    b = _dpo_run([9, 9, 0.2, 0.2, 0.6, 0.2], [9, 9, 0.4, 0.4, 1.2, 0.4], 3.0, 600.0, [0.7, 0.6], (3.0, 4.0))
    tensors = {"peak_tensor_mib": 12.0, "peak_process_tensor_mib": 20.0, "tensor_mib_at": {"train_begin": 4.0},
               "losses": [0.7, 0.6]}
    s = dpo_report.summarize([a, b], warmup=2, steps=6, tensors=tensors)
    assert s["step_ms_mean"] == pytest.approx(275.0)  # (0.25·4 + 0.30·4) / 8 s
    assert s["step_ms_median"] == pytest.approx(200.0)  # sorted 0.1 .2 .2 .2 | .2 .3 .4 .6: (0.2 + 0.2) / 2
    assert s["step_cpu_ms_mean"] == pytest.approx(550.0)
    assert s["precompute_s"] == pytest.approx(2.0)  # median of 1 and 3
    assert s["step_ms_with_precompute"] == pytest.approx(275.0 + 2000.0 / 6)  # the pass over all 6 steps of the epoch
    assert s["peak_rss_mib"] == pytest.approx(550.0)
    assert s["repeat_spread"] == pytest.approx(0.30 / 0.25)
    assert s["loadavg"] == pytest.approx(3.5)
    assert [p["step_ms_mean"] for p in s["per_run"]] == pytest.approx([250.0, 300.0])
    assert s["peak_tensor_mib"] == 12.0 and s["tensor_run_losses_match"] is True
    no_pass = dpo_report.summarize([_dpo_run([1, 1, 0.1, 0.1], [1, 1, 0.1, 0.1], None, 1.0, [0.7])], 2, 4)
    assert no_pass["step_ms_with_precompute"] == pytest.approx(100.0) and no_pass["repeat_spread"] == 1.0
    differ = dpo_report.summarize([a, b], 2, 6, {**tensors, "losses": [0.7, 0.5]})
    assert differ["tensor_run_losses_match"] is False


def test_common_ratio_rows_spread_and_disturbed_flag():
    rows = [{"case": "c", "tool": "trl", "variant": "t1", "summary": {"x": 200.0}},
            {"case": "c", "tool": "posttrain", "variant": "p", "summary": {"x": 50.0}},
            {"case": "c", "tool": "trl", "variant": "t2", "summary": {"x": 100.0}}]
    out = common.ratio_rows("c", rows, {"r": "x"})
    assert [(r["ours"], r["vs"], r["r"]) for r in out] == [("p", "t1", 0.25), ("p", "t2", 0.5)]  # posttrain / TRL
    assert common.repeat_spread([{"m": 2.0}, {"m": 2.3}, {"m": 2.1}], "m") == pytest.approx(1.15)
    assert common.repeat_spread([{"m": 2.0}], "m") == 1.0

    def row(spread):
        return {"case": "c", "tool": "trl", "variant": f"v{spread}",
                "summary": {"repeat_spread": spread, "per_run": [{"loadavg": 0.0}]}}

    warnings = common.timing_warnings([row(1.15), row(1.16), row(1.0)], 1.15, "mean")
    assert warnings == ["c trl:v1.16: the repeats' mean step times differ by 1.16× (disturbed timing)"]


def test_dpo_parity_fails_when_the_step0_losses_differ():
    def run(tool, loss):
        return {"tool": tool, "variant": "v", "losses": [loss, loss], "first_batch_digest": "d", "tokens": [1, 2],
                "order_sha256": "o", "first_batch_label_tokens": None}

    rows = [{"runs": [run("posttrain", 0.690), run("posttrain", 0.690)]}, {"runs": [run("trl", 0.690), run("trl", 0.695)]}]
    p = dpo_report.parity("rm", rows, {})
    assert p["max_abs_diff"] == pytest.approx(0.005) and p["agree"] is False
    same = dpo_report.parity("rm", [{"runs": [run("posttrain", 0.690)]}, {"runs": [run("trl", 0.690 + 5e-6)]}], {})
    assert same["agree"] is True


def test_dpo_parity_fails_on_a_nan_step0_loss():
    def run(tool, loss):
        return {"tool": tool, "variant": "v", "losses": [loss], "first_batch_digest": "d", "tokens": [1],
                "order_sha256": "o", "first_batch_label_tokens": None}

    rows = [{"runs": [run("posttrain", 0.69)]}, {"runs": [run("trl", 0.69), run("trl", float("nan"))]}]
    assert dpo_report.parity("rm", rows, {})["agree"] is False


def _rl_rows(trl_kls, pt_kls):
    def run(tool, kl):
        return {"tool": tool, "kl": [kl, 0.0], "beta": 0.04, "prompts_sha256": ["a", "b"], "completions": [32, 32],
                "late_imports": []}

    return [{"tool": "trl", "variant": "default", "summary": {"step1_losses": [0.0]}, "runs": [run("trl", k) for k in trl_kls]},
            {"tool": "posttrain", "variant": "default", "summary": {"step1_losses": [0.0]},
             "runs": [run("posttrain", k) for k in pt_kls]}]


def test_rl_parity_flags_a_nonzero_step1_kl_in_the_last_run():
    assert rl_report.parity("grpo_kl", _rl_rows([0.0, 0.3], [0.0, 0.0]), 32)["step1_kl_zero"] is False
    assert rl_report.parity("grpo_kl", _rl_rows([0.0, 0.0], [0.0, 0.0]), 32)["step1_kl_zero"] is True


def test_rl_parity_flags_a_nonzero_step1_kl_in_any_run():
    assert rl_report.parity("grpo_kl", _rl_rows([0.3, 0.0], [0.0, 0.0]), 32)["step1_kl_zero"] is False


def test_rl_summarize_by_hand():
    def run(steps, gens, phases, cpu, rss):
        return {"step_times_s": steps, "generate_s": gens, "rollout_phase_s": phases, "step_cpu_s": cpu,
                "generated_tokens": [100] * len(steps), "full_length_fraction": [1.0], "peak_rss_mib": rss,
                "rss_after_import_mib": 1.0, "losses": [0.0], "loadavg_1min_before": 1.0, "loadavg_1min_after": 1.0,
                "child_wall_s": 1.0}

    a = run([5, 1.0, 2.0], [5, 0.5, 0.5], [5, 0.6, 1.0], [5, 2.0, 4.0], 100.0)
    b = run([5, 3.0, 4.0], [5, 1.5, 1.0], [5, 2.0, 1.0], [5, 6.0, 8.0], 300.0)
    s = rl_report.summarize([a, b], warmup=1)
    assert s["step_ms"] == pytest.approx(2500.0)  # median of 1, 2, 3, 4
    assert s["generate_ms"] == pytest.approx(750.0)  # median of .5 .5 1.5 1.0
    assert s["update_ms"] == pytest.approx(1000.0)  # step − phase: .4 1.0 1.0 3.0
    assert s["generate_share"] == pytest.approx(0.375)  # per step .5 .25 .5 .25, then the median
    assert s["phase_share"] == pytest.approx((0.5 + 0.6) / 2)  # .6 .5 .6667 .25
    assert s["peak_rss_mib"] == pytest.approx(200.0)
    assert s["repeat_spread"] == pytest.approx(3.5 / 1.5)


def test_sft_summarize_by_hand():
    def run(times, tokens, cpu, rss):
        return {"step_times_s": times, "tokens": tokens, "step_cpu_s": cpu, "peak_rss_mib": rss, "losses": [1.0],
                "loadavg_1min_before": 1.0, "loadavg_1min_after": 1.0}

    a = run([9, 1.0, 2.0, 3.0], [9, 100, 100, 100], [9, 2, 4, 6], 10.0)
    b = run([9, 2.0, 2.0, 8.0], [9, 300, 300, 300], [9, 4, 4, 16], 30.0)
    s = sft_report.summarize([a, b], warmup=1)
    assert s["tokens_per_s"] == pytest.approx(1200 / 18)  # pooled: Σ tokens / Σ time of the timed steps
    assert s["tokens_per_cpu_s"] == pytest.approx(1200 / 36)
    assert s["s_per_step_median"] == pytest.approx(2.0)  # median over repeats of each run's median (2, 2)
    assert s["peak_rss_mib"] == pytest.approx(20.0)
    assert [p["tokens_per_s"] for p in s["per_run"]] == pytest.approx([50.0, 75.0])


def test_reward_hacking_verdict_words():
    start = {"rm_reward_sampled": 1.0, "exact_match_greedy": 0.8, "exact_match_sampled": 0.8, "kl_to_sft": 0.0}
    fell = {**start, "rm_reward_sampled": 1.5, "exact_match_greedy": 0.5, "exact_match_sampled": 0.5, "kl_to_sft": 2.0}
    kept = {**start, "rm_reward_sampled": 1.5, "exact_match_greedy": 0.78, "exact_match_sampled": 0.82}
    half = {**start, "rm_reward_sampled": 1.5, "exact_match_greedy": 0.79, "exact_match_sampled": 0.5}
    assert rh_report.verdict(start, fell).startswith("**exploited**")
    assert rh_report.verdict(start, kept).startswith("**not exploited**")
    assert rh_report.verdict(start, half).startswith("**partly**")


def test_reward_hacking_verdict_at_exactly_five_points():
    start = {"rm_reward_sampled": 1.0, "exact_match_greedy": 40 / 200, "exact_match_sampled": 160 / 800, "kl_to_sft": 0.0}
    after = {"rm_reward_sampled": 1.5, "exact_match_greedy": 30 / 200, "exact_match_sampled": 120 / 800, "kl_to_sft": 1.0}
    assert "-5.0 points greedy / -5.0 sampled" in rh_report.verdict(start, after)
    assert rh_report.verdict(start, after).startswith("**not exploited**")


class _Event:
    def __init__(self, ns, name, nbytes=0):
        self.ns, self._name, self._nbytes = ns, name, nbytes

    def start_ns(self):
        return self.ns

    def name(self):
        return self._name

    def nbytes(self):
        return self._nbytes


def _replay(events):
    tracker = common.TensorMemory()
    tracker.profiler = SimpleNamespace(__exit__=lambda *a: None,
                                       profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events)))
    return tracker.result()


MIB = 2**20


def test_tensor_memory_replays_a_synthetic_timeline():
    mark = common.TensorMemory.MARK
    timeline = [  # (ns, event): model 4, scratch 3 freed, two steps of 8 and 10, a save of 16 after the last step
        (1, _Event(1, "[memory]", 4 * MIB)), (2, _Event(2, "[memory]", 3 * MIB)), (3, _Event(3, "[memory]", -3 * MIB)),
        (4, _Event(4, mark + "train_begin")),
        (5, _Event(5, "[memory]", 8 * MIB)), (6, _Event(6, "[memory]", -8 * MIB)), (7, _Event(7, mark + "step_end")),
        (8, _Event(8, "[memory]", 10 * MIB)), (9, _Event(9, "[memory]", -10 * MIB)),
        (9, _Event(9, mark + "step_end")),  # same ns as the free before it: recorded after it
        (11, _Event(11, "[memory]", 16 * MIB)), (12, _Event(12, "[memory]", -16 * MIB)),
        (13, _Event(13, "aten::add")),  # neither memory nor a mark: ignored
    ]
    shuffled = [e for _, e in sorted(timeline, key=lambda item: (item[0] * 7919) % 17)]
    # keep the two ns-9 events in recorded order, as the profiler lists them
    shuffled = [e for e in shuffled if e.ns != 9] + [timeline[8][1], timeline[9][1]]
    r = _replay(shuffled)
    assert r["peak_setup_tensor_mib"] == pytest.approx(7.0)
    assert r["peak_steps_tensor_mib"] == pytest.approx(14.0)
    assert r["peak_tensor_mib"] == pytest.approx(14.0)
    assert r["peak_process_tensor_mib"] == pytest.approx(20.0)
    assert r["tensor_mib_at"] == {"train_begin": pytest.approx(4.0), "step_end": pytest.approx(4.0)}
    assert r["end_tensor_mib"] == pytest.approx(4.0)
    assert r["allocations"] == 5


def test_tensor_memory_setup_peak_wins_and_a_step_that_holds_memory():
    mark = common.TensorMemory.MARK
    events = [_Event(1, "[memory]", 10 * MIB), _Event(2, "[memory]", 30 * MIB), _Event(3, "[memory]", -30 * MIB),
              _Event(4, mark + "train_begin"), _Event(5, "[memory]", 5 * MIB), _Event(6, mark + "step_end"),
              _Event(7, "[memory]", 6 * MIB), _Event(8, mark + "step_end")]  # optimizer state kept: 10 → 15 → 21
    r = _replay(events)
    assert r["peak_setup_tensor_mib"] == pytest.approx(40.0)
    assert r["peak_steps_tensor_mib"] == pytest.approx(21.0)
    assert r["peak_tensor_mib"] == pytest.approx(40.0)
    assert r["tensor_mib_at"]["step_end"] == pytest.approx(21.0)
