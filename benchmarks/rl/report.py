"""Drive the online-RL benchmark: interleaved child runs, parity checks, results table.

    python benchmarks/rl/report.py --cache benchmarks/.cache/rl_cpu --results benchmarks/results

Every measured run is a fresh child process (`bench.py`), so imports, model load and
allocator state never carry over between tools or cases. Runs are interleaved round by
round (trl, posttrain, trl, posttrain, ...) so slow drift of the machine hits every row
alike. Step figures are medians over every timed step of every repeat; the first
`--warmup` steps of each run are not timed. Writes RESULTS/rl_cpu.json (every raw number)
and RESULTS/rl_cpu.md. Standard library only; it runs in the benchmark venv only to read
package versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402  (a sibling script, not a package)
    CHILD_ENV, checks_hold, driver_arguments, exit_on_parity_failure, fmt, fmt_e, mean_loadavg, ratio_rows,
    repeat_spread, report_header, run_child, save_report, timing_warnings, versions, warning_lines)

PACKAGES = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "posttrain")
CASES = {"grpo": "GRPO without a reference model", "grpo_kl": "GRPO with a KL penalty to a reference model",
         "rloo": "RLOO (leave-one-out baseline) without a reference model"}
# Per case: TRL's default, posttrain, TRL's closer match, so the tools alternate within a round.
# RLOO gets only TRL's closer match and posttrain, to keep the default run short (TRL's default
# row can be added with BENCH_RUNS). A row named twice in --runs runs twice per round (more
# repeats of it), still one row.
CASE_ROWS = {"grpo": ("trl:default", "posttrain:default", "trl:gc_off"),
             "grpo_kl": ("trl:default", "posttrain:default", "trl:gc_off"),
             "rloo": ("trl:gc_off", "posttrain:default")}
DEFAULT_RUNS = ",".join(f"{case}:{tv}" for case, rows in CASE_ROWS.items() for tv in rows)
NOTES = {
    ("trl", "default"): "TRL defaults: gradient checkpointing on",
    ("trl", "gc_off"): "gradient_checkpointing=False",
    ("posttrain", "default"): "posttrain defaults",
    ("posttrain", "padded"): "model.padding_free=false (rows keep their padding)",
}
SPREAD_WARNING = 1.15  # repeats of one row whose median step times differ more than this are reported
TARGET = 0.5  # the issue's target: posttrain ≤ 0.5× TRL's step time


LOSS_TOLERANCE, GRAD_TOLERANCE = 1e-6, 1e-5  # loss parity: |Δloss| and ‖Δgrad‖ / ‖grad‖


def child(case: str, tool: str, variant: str, args, out: Path, log: Path) -> dict:
    cmd = [sys.executable, str(HERE / "bench.py"), "--tool", tool, "--case", case, "--variant", variant,
           "--model", str(args.cache / "model"), "--data", str(args.cache / "prompts.jsonl"),
           "--workdir", str(args.work / out.stem), "--out", str(out), "--steps", str(args.steps),
           "--prompts-per-step", str(args.prompts_per_step), "--num-generations", str(args.num_generations),
           "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
           "--lr", str(args.lr), "--beta", str(args.beta), "--seed", "0"]
    return run_child(cmd, f"{case} {tool}:{variant}", out, log, CHILD_ENV)


def timed_steps(run: dict, warmup: int) -> list[dict]:
    """Per timed step: wall, CPU, generation, rollout phase, the rest (the update), shares, tokens."""
    out = []
    for k in range(warmup, len(run["step_times_s"])):
        step, gen, phase = run["step_times_s"][k], run["generate_s"][k], run["rollout_phase_s"][k]
        out.append({"step_s": step, "cpu_s": run["step_cpu_s"][k], "generate_s": gen, "phase_s": phase,
                    "update_s": step - phase, "generate_share": gen / step, "phase_share": phase / step,
                    "tokens": run["generated_tokens"][k]})
    return out


def summarize(runs: list[dict], warmup: int) -> dict:
    def med(key, steps):
        return statistics.median(s[key] for s in steps)

    per_run = []
    for r in runs:
        steps = timed_steps(r, warmup)
        per_run.append({"step_ms_median": 1000 * med("step_s", steps), "peak_rss_mib": r["peak_rss_mib"],
                        "rss_after_import_mib": r["rss_after_import_mib"],
                        "loadavg": mean_loadavg(r),
                        "child_wall_s": r["child_wall_s"]})
    pooled = [s for r in runs for s in timed_steps(r, warmup)]
    all_tokens = [t for r in runs for t in r["generated_tokens"]]
    full = [f for r in runs for f in r["full_length_fraction"]]
    return {
        "repeats": len(runs), "timed_steps": len(pooled), "per_run": per_run,
        "step_ms": 1000 * med("step_s", pooled),
        "step_cpu_ms": 1000 * med("cpu_s", pooled),
        "generate_ms": 1000 * med("generate_s", pooled),
        "phase_ms": 1000 * med("phase_s", pooled),
        "update_ms": 1000 * med("update_s", pooled),
        "generate_share": med("generate_share", pooled),
        "phase_share": med("phase_share", pooled),
        "generated_tokens_per_step": statistics.fmean(all_tokens),
        "generated_tokens_per_s": statistics.median(s["tokens"] / s["generate_s"] for s in pooled),
        "full_length_fraction": statistics.fmean(full),
        "peak_rss_mib": statistics.median(p["peak_rss_mib"] for p in per_run),
        "rss_after_import_mib": statistics.median(p["rss_after_import_mib"] for p in per_run),
        "step1_losses": [r["losses"][0] for r in runs],
        "repeat_spread": repeat_spread(per_run, "step_ms_median"),
        "loadavg": max(p["loadavg"] for p in per_run),
    }


def parity(case: str, rows: list[dict], expected_completions: int) -> dict:
    """Same prompt ids at every rollout in every run; P × G completions per step; step-1 KL 0."""
    runs = [run for row in rows for run in row["runs"]]
    prompt_lists = {json.dumps(run["prompts_sha256"]) for run in runs}
    counts = {c for run in runs for c in run["completions"]}
    kl1 = {}  # every run's step-1 KL (keyed by tool, each run kept): all must be 0, not the last per tool
    for run in runs:
        if run["kl"] and run["kl"][0] is not None:
            kl1.setdefault(run["tool"], []).append(run["kl"][0])
    beta = runs[0]["beta"]
    return {"case": case, "beta": beta, "same_prompts_every_rollout": len(prompt_lists) == 1,
            "rollouts_compared": len(runs[0]["prompts_sha256"]),
            "completions_per_step": sorted(counts), "completions_ok": counts == {expected_completions},
            "step1_kl": kl1, "step1_kl_zero": beta == 0 or (bool(kl1) and all(abs(v) < 1e-6 for vs in kl1.values() for v in vs)),
            "step1_loss": {row["tool"] + ":" + row["variant"]: row["summary"]["step1_losses"] for row in rows},
            "late_imports": {run["tool"]: run["late_imports"] for run in runs if run["late_imports"]}}


# the checks of a case's parity record: `parity`'s, and `fixed_batch_agree` (`add_fixed_batch`)
PARITY_CHECKS = ("same_prompts_every_rollout", "completions_ok", "step1_kl_zero", "fixed_batch_agree")


def parity_ok(p: dict) -> bool:
    """A case's parity holds: no check of PARITY_CHECKS failed (`common.checks_hold`)."""
    return checks_hold(p, PARITY_CHECKS)


def add_fixed_batch(parities: list[dict], loss_parity: dict, rloo_parity: dict | None) -> None:
    """Each case's fixed-batch check into its parity record: RLOO's for rloo, GRPO's for the others."""
    for p in parities:
        p["fixed_batch_agree"] = (rloo_parity or {}).get("agree") if p["case"] == "rloo" else loss_parity.get("agree")


RATIOS = {"step_time": "step_ms", "step_cpu": "step_cpu_ms", "generate": "generate_ms", "phase": "phase_ms",
          "update": "update_ms", "peak_rss": "peak_rss_mib", "generate_share": "generate_share",
          "phase_share": "phase_share"}  # name: summary key


def verdict(case: str, rows: list[dict], rs: list[dict], parity: dict | None = None) -> dict:
    """posttrain's default row against TRL's fastest and default rows. With the case's `parity`,
    `parity_ok` says whether the comparison holds at all: a verdict whose parity failed claims
    no target met (the page's met? column reads "parity failed"), as the DPO driver's does."""
    trl_rows = [row for row in rows if row["tool"] == "trl"]
    mine = [r for r in rs if r["ours"] == "default"]
    if not mine or not trl_rows:
        return {}
    fastest = min(trl_rows, key=lambda row: row["summary"]["step_ms"])["variant"]
    vs_fastest = next(r for r in mine if r["vs"] == fastest)
    vs_default = next((r for r in mine if r["vs"] == "default"), None)
    out = {"case": case, "trl_fastest": fastest, "time_ratio_vs_fastest": vs_fastest["step_time"],
           "time_ratio_vs_default": vs_default and vs_default["step_time"],
           "rss_ratio_vs_fastest": vs_fastest["peak_rss"], "time_target_met": vs_fastest["step_time"] <= TARGET}
    if parity is not None:
        out["parity_ok"] = parity_ok(parity)
    return out


def times(x):
    return "—" if x is None else f"{x:.2f}×"


def rloo_header(report: dict) -> list[str]:
    """What the RLOO case matches and what it cannot (only when the run has an RLOO row)."""
    if not any(row["case"] == "rloo" for row in report["rows"]):
        return []
    return [
        "RLOO (`rloo`): TRL's `RLOOTrainer` (β = 0, `normalize_advantages=False`, its default) against `posttrain "
        "rloo` (`posttrain grpo` with `grpo.advantage=rloo`; `grpo.aggregation=token`, β = 0). The advantages are the "
        "same (r_i minus the mean of the other G−1 rewards, no scaling). **The losses are not the same, and no "
        "setting of either tool makes them so:** TRL's RLOO loss has no aggregation option; its ratio is per "
        "sequence, exp(Σ_t log π − Σ_t log π_old), clipped, averaged over completions, while posttrain's ratio is "
        "per token, averaged over all completion tokens (token aggregation, the closest option; sequence "
        "aggregation would weigh each completion by 1/length). At μ = 1 every ratio is 1, so the two gradients "
        "point the same way and TRL's is larger by the batch's mean completion length (checked on a fixed batch "
        "below); AdamW's step is nearly scale-free, but gradient clipping at 1.0 acts on the larger norm sooner. "
        "The work differs too: TRL's `RLOOTrainer` runs one extra no-grad forward of the policy per rollout for "
        "the rollout log-probs its sequence ratio uses, even at μ = 1 and β = 0 (it is inside its rollout phase); "
        "posttrain does not need them at μ = 1. No `rloo_kl` case: TRL puts the KL into the reward "
        "(r − β·Σ_t (log π_old − log π_ref), before the baseline), posttrain adds β·KL to the per-token loss; no "
        "posttrain option moves it into the reward, so a β > 0 comparison would time two different objectives. "
        "To keep the default run short, RLOO runs only TRL's closer match (`gradient_checkpointing=False`) and "
        "posttrain's default; add `rloo:trl:default` to `BENCH_RUNS` for TRL's defaults.",
        "",
    ]


def rloo_parity_lines(lp: dict | None) -> list[str]:
    """The RLOO fixed-batch check (bench.py `rloo_same_batch`)."""
    if not lp:
        return []
    trl, seq = lp["trl"], lp["trl_vs_sequence_aggregation"]
    return [
        "## RLOO parity on one fixed batch", "",
        f"`bench.py --tool same_batch --case rloo`: the same {lp['pairs']} (prompt, completion) pairs "
        f"({lp['response_tokens']} completion tokens) and policy perturbation as above, and the same seeded rewards. "
        "TRL runs its own `RLOOTrainer._generate_and_score_completions` (chat template, rollout log-probs, "
        "advantages) with the fixed completions handed to its generation call and the fixed rewards as its reward "
        f"function, then `_compute_loss`; posttrain runs `rloo_advantages` and `GroupPolicyLoss` as its loop does. "
        f"Same prompt and completion ids reached TRL: {lp['same_inputs']}.", "",
        "| quantity | posttrain | TRL | comparison | agree? |", "|---|---|---|---|---|",
        f"| leave-one-out advantages | `rloo_advantages` | inline in `_generate_and_score_completions` | "
        f"max abs. difference {fmt_e(lp['advantages_max_abs_diff'])} | {'yes' if lp['advantages_agree'] else 'NO'} |",
        f"| gradient, posttrain token aggregation × tokens / completions (× {trl['grad_scale']:.2f}) | | | "
        f"‖Δgrad‖ / ‖grad‖ {fmt_e(trl['grad_rel_diff'])}, cosine {trl['grad_cosine']:.7f} | "
        f"{'yes' if lp['agree'] else 'NO'} (tolerance {GRAD_TOLERANCE:g}) |",
        f"| gradient, posttrain sequence aggregation (for information) | | | ‖Δgrad‖ / ‖grad‖ "
        f"{fmt_e(seq['grad_rel_diff'])}, cosine {seq['grad_cosine']:.4f} | differs by definition (weights 1/length) |",
        f"| loss value | {lp['posttrain_loss']:.9f} (−Σ A_i L_i / tokens = {lp['posttrain_loss_closed_form']:.9f}) | "
        f"{trl['loss']:.2e} (−mean A_i = {trl['loss_closed_form']:.2e}) | not comparable | differs by definition |",
        "",
        "Why the loss values differ while the gradients agree: at μ = 1 TRL's sequence ratio and posttrain's token "
        "ratios are all 1 in value, so TRL's loss is −mean_i A_i, which is 0 for leave-one-out advantages (they "
        "sum to zero within each group), and posttrain's is −Σ_i A_i L_i / tokens (L_i: completion length). Their "
        "gradients are both Σ_i A_i ∇Σ_t log π_it, divided by the number of completions (TRL) or of completion "
        "tokens (posttrain).", ""]


def write_markdown(report: dict, path: Path) -> None:
    s, a = report["settings"], report["assets"]
    per_step = s["prompts_per_step"] * s["num_generations"]
    lines = report_header("Online RL on CPU: posttrain GRPO / RLOO vs TRL GRPOTrainer / RLOOTrainer", report["command"],
                          report, PACKAGES[:-1]) + [
        f"Setup: small Llama ({a['params'] / 1e6:.2f}M params: hidden 256, 4 layers, vocab {a['vocab']:,}, "
        f"{'tied' if a.get('tied_embeddings', True) else 'untied'} embeddings, random init) over the `tiny` preset's tokenizer and ChatML template, float32; prompts from "
        f"posttrain's synthetic `{a['task']}` task ({a['prompt_tokens_min']}–{a['prompt_tokens_max']} tokens once "
        f"templated), the same prompts in the same order in both tools; per step one rollout of "
        f"{s['prompts_per_step']} prompts × G {s['num_generations']} = {per_step} completions of at most "
        f"{s['max_new_tokens']} new tokens, temperature {s['temperature']:g}, top-p 1, top-k off, all generated in "
        f"one batch; μ = 1 (one update per rollout), no gradient accumulation; reward = exact match "
        f"(`posttrain.rewards.exact_match` on both sides); GRPO: token-level loss aggregation (TRL "
        f"`loss_type=\"dapo\"`, posttrain `grpo.aggregation=token`), group std scaling, k3 KL; RLOO: see below; AdamW lr {s['lr']:g} constant, clip 1.0; "
        f"{s['steps']} steps per run, the first {s['warmup']} not timed; {s['rounds']} interleaved repeats, every "
        "run a fresh process. Step figures are medians over the timed steps of all repeats; peak RSS is the median "
        "over repeats of the process's ru_maxrss.",
        "",
        f"The policy is untrained: it ends a completion with EOS with probability ~{a['p_eos_after_prompt_mean']:.4f} "
        "per token, so nearly every completion runs to the token limit (column *full length*). Its exact-match "
        "reward is 0, and so is every advantage. That changes none of the work: both tools still sample, score, run "
        "the reference forward when β > 0, and run the forward and backward over every completion token.",
        "",
        *rloo_header(report),
        "Columns: *generation* is the generation call alone. *rollout phase* is everything that turns the step's "
        "prompts into its training batch: generation, decoding, rewards, advantages, reference log-probs and "
        "collation. *update* is the step minus the rollout phase: the policy forward, backward and optimizer step. "
        "*rollout share* is generation ÷ step time, taken per step, then the median.",
        "",
    ]
    for case, title in CASES.items():
        rows = [row for row in report["rows"] if row["case"] == case]
        if not rows:
            continue
        beta = rows[0]["runs"][0]["beta"]
        lines += [f"## {title}, β = {beta:g}", "",
                  "| tool | configuration | reference | generated tokens / step (full length) | ms/step (per repeat) | "
                  "CPU-ms/step | generation ms | rollout phase ms | update ms | rollout share | rollout-phase share | "
                  "peak RSS MiB (per repeat) | RSS after imports | load avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            m = row["summary"]
            reps = " / ".join(fmt(p["step_ms_median"], 0) for p in m["per_run"])
            rss = " / ".join(fmt(p["peak_rss_mib"], 0) for p in m["per_run"])
            lines.append(
                f"| {row['tool']} | {row['note']} | {row['runs'][0]['reference']} | "
                f"{fmt(m['generated_tokens_per_step'], 0)} ({100 * m['full_length_fraction']:.0f}%) | "
                f"{fmt(m['step_ms'], 0)} ({reps}) | {fmt(m['step_cpu_ms'], 0)} | {fmt(m['generate_ms'], 0)} | "
                f"{fmt(m['phase_ms'], 0)} | {fmt(m['update_ms'], 0)} | {100 * m['generate_share']:.0f}% | "
                f"{100 * m['phase_share']:.0f}% | {fmt(m['peak_rss_mib'], 0)} ({rss}) | "
                f"{fmt(m['rss_after_import_mib'], 0)} | {fmt(m['loadavg'], 1)} |")
        lines += ["", "Ratios posttrain / TRL (target: step time ≤ 0.5):", "",
                  "| posttrain | TRL | step time | CPU time/step | generation | rollout phase | update | peak RSS | "
                  "rollout share |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in report["ratios"] if r["case"] == case):
            lines.append(f"| {r['ours']} | {r['vs']} | {times(r['step_time'])} | {times(r['step_cpu'])} | "
                         f"{times(r['generate'])} | {times(r['phase'])} | {times(r['update'])} | "
                         f"{times(r['peak_rss'])} | {times(r['generate_share'])} |")
        p = next(p for p in report["parity"] if p["case"] == case)
        kl = ", ".join(f"{tool} {max(map(abs, values)):.2e}" if isinstance(values, list) else f"{tool} {values:.2e}"
                       for tool, values in p["step1_kl"].items()) or "not logged"  # the largest |KL| of the runs
        lines += ["", f"Parity: the same prompt token ids at each of the {p['rollouts_compared']} rollouts in every "
                  f"run of both tools: {p['same_prompts_every_rollout']}; completions per step "
                  f"{p['completions_per_step']} (expected {per_step}: {'OK' if p['completions_ok'] else 'MISMATCH'}); "
                  + (f"logged KL at step 1, where policy = reference: {kl} "
                     f"({'OK' if p['step1_kl_zero'] else 'MISMATCH'}); " if p["beta"] > 0 else "")
                  + "step-1 loss " + "; ".join(f"{k} {', '.join(f'{x:.3g}' for x in v)}" for k, v in p["step1_loss"].items())
                  + ". The tools sample with different random streams, so the completions differ; only their "
                  "number and lengths are matched.", ""]
    lp = report["loss_parity"]
    same, default = lp["trl"], lp.get("trl_bias_corrected_kl") or {}
    lines += ["## GRPO loss parity on one fixed batch", "",
              f"`bench.py --tool same_batch`: both tools' own code computes the reference log-probs, the GRPO loss "
              f"(β = {lp['beta']:g}) and its gradient on the same {lp['pairs']} (prompt, completion) pairs "
              f"({lp['response_tokens']} completion tokens of random length, the shorter ones ending in EOS, so padding "
              "is exercised), the same advantages, and a policy moved off the reference by the same seeded noise.", "",
              "| TRL setting | loss posttrain | loss TRL | max |Δ reference log-prob| | ‖Δgrad‖ / ‖grad‖ | agree? |",
              "|---|---|---|---|---|---|",
              f"| `use_bias_correction_kl=False` (as in the timed runs) | {lp['posttrain_loss']:.9f} | {same['loss']:.9f} | "
              f"{fmt_e(same['ref_logps_max_abs_diff'])} | {fmt_e(same['grad_rel_diff'])} | "
              f"{'yes' if lp['agree'] else 'NO'} (tolerances {LOSS_TOLERANCE:g}, {GRAD_TOLERANCE:g}) |"]
    if default:
        lines.append(f"| `use_bias_correction_kl=True` (TRL 1.16's default) | {lp['posttrain_loss']:.9f} | "
                     f"{default['loss']:.9f} | {fmt_e(default['ref_logps_max_abs_diff'])} | "
                     f"{fmt_e(default['grad_rel_diff'])} | same loss, another KL gradient (expected) |")
    lines += ["", "TRL 1.16 multiplies the per-token KL by the importance ratio π/π_old by default. That ratio is 1 in "
              "value, so the loss does not change, but it is differentiable, so the KL gradient does (DeepSeek-V3.2's "
              "unbiased KL gradient). posttrain uses the plain k3 gradient of the GRPO paper, so the timed TRL runs "
              "set `use_bias_correction_kl=False`; the compute is the same either way (one elementwise product).", ""]
    lines += rloo_parity_lines(report.get("rloo_loss_parity"))
    bd = lp["breakdown"]
    impl = bd["optimizer_implementations"]
    lines += ["## Where the time goes: each piece alone, same inputs, one thread", "",
              f"The same child then times each piece of a step for both tools on the same inputs, alternating, as "
              f"process CPU time with torch on {bd['threads']} thread (other load on the machine disturbs it little), "
              f"median of {bd['reps']} after a warm-up, and counts the aten ops each runs (torch.profiler; no load "
              "changes that count). Generation: P × G completions of the same prompts from the same weights (posttrain "
              "`generate_token_ids`, TRL `_generate_single_turn`). Forward + backward: the loss on the fixed batch above. "
              f"Optimizer step: posttrain's `make_optimizer` ({impl['posttrain']}), TRL's `create_optimizer` "
              f"({impl['trl']}), and torch's fused AdamW over posttrain's own parameter groups (the fix suggested in "
              "`benchmarks/README.md`).", "",
              "| piece | posttrain CPU-ms | TRL CPU-ms | posttrain / TRL | posttrain aten ops | TRL aten ops |",
              "|---|---|---|---|---|---|"]
    for piece, label in (("generation", "generation"), ("forward_backward", "loss forward + backward"),
                         ("optimizer_step", "optimizer step")):
        a, b = bd[piece]["posttrain"], bd[piece]["trl"]
        extra = (f" ({a['tokens']} vs {b['tokens']} tokens)" if "tokens" in a else "")
        lines.append(f"| {label}{extra} | {fmt(a['cpu_ms_median'], 1)} | {fmt(b['cpu_ms_median'], 1)} | "
                     f"{times(a['cpu_ms_median'] / b['cpu_ms_median'])} | {a['aten_ops']:,} | {b['aten_ops']:,} |")
    f = bd["optimizer_step"]["posttrain_groups_fused"]
    lines += [f"| optimizer step, fused AdamW on posttrain's groups | {fmt(f['cpu_ms_median'], 1)} | "
              f"{fmt(bd['optimizer_step']['trl']['cpu_ms_median'], 1)} | "
              f"{times(f['cpu_ms_median'] / bd['optimizer_step']['trl']['cpu_ms_median'])} | {f['aten_ops']:,} | "
              f"{bd['optimizer_step']['trl']['aten_ops']:,} |", ""]
    lines += ["## Verdict against the target (≤ 0.5× TRL's step time)", "",
              "posttrain's default row against TRL's fastest row (by median step time) and against TRL's default row.", "",
              "| case | step time vs TRL fastest | vs TRL default | peak RSS vs TRL fastest | met? |",
              "|---|---|---|---|---|"]
    for vd in report["verdicts"]:
        lines.append(f"| {vd['case']} | {times(vd['time_ratio_vs_fastest'])} ({vd['trl_fastest']}) | "
                     f"{times(vd['time_ratio_vs_default'])} | {times(vd['rss_ratio_vs_fastest'])} | "
                     f"{'parity failed' if vd.get('parity_ok') is False else 'yes' if vd['time_target_met'] else 'no'} |")
    lines.append("")
    lines += warning_lines(report)
    lines += ["How it is measured and what differs between the tools: `benchmarks/README.md`. Raw numbers, every step: "
              f"`{path.with_suffix('.json').name}`.", ""]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    driver_arguments(parser, cache="rl_cpu", runs=DEFAULT_RUNS, steps=6, warmup=1,
                     runs_help="comma-separated case:tool:variant, run in this order each round")
    parser.add_argument("--prompts-per-step", type=int, default=int(os.environ.get("BENCH_PROMPTS", "4")))
    parser.add_argument("--num-generations", type=int, default=int(os.environ.get("BENCH_G", "8")))
    parser.add_argument("--max-new-tokens", type=int, default=int(os.environ.get("BENCH_NEW_TOKENS", "32")))
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=float(os.environ.get("BENCH_BETA", "0.04")),
                        help="β of the grpo_kl case")
    parser.add_argument("--name", default="rl_cpu", help="results/NAME.md and NAME.json")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} leaves no timed step after {args.warmup} warm-up step(s)")
    args.work = args.cache.parent / "rl_work"  # scratch, gitignored; results/ keeps only the report
    args.work.mkdir(parents=True, exist_ok=True)
    assets = json.loads((args.cache / "assets.json").read_text())
    if assets["prompts"] < args.steps * args.prompts_per_step:
        raise SystemExit(f"{assets['prompts']} prompts are fewer than {args.steps} steps × {args.prompts_per_step}")
    plan = []
    for item in filter(None, args.runs.split(",")):
        key = tuple(item.split(":", 2))
        if key not in plan:  # a row named twice runs twice per round, but is one row
            plan.append(key)
    order = [tuple(item.split(":", 2)) for item in filter(None, args.runs.split(","))]
    t0 = time.time()
    rloo_parity = None
    if any(case == "rloo" for case, _, _ in plan):
        print("[same batch] RLOO: both tools' advantages and gradient on one fixed batch", flush=True)
        rloo_parity = child("rloo", "same_batch", "-", args, args.work / "same_batch_rloo.json",
                            args.work / "same_batch_rloo.log")
        rloo_parity["advantages_agree"] = rloo_parity["advantages_max_abs_diff"] < LOSS_TOLERANCE
        rloo_parity["agree"] = (rloo_parity["same_inputs"] and rloo_parity["advantages_agree"]
                                and rloo_parity["trl"]["grad_rel_diff"] < GRAD_TOLERANCE)
        print(f"  advantages max |diff| {rloo_parity['advantages_max_abs_diff']:.1e}, gradient relative difference "
              f"{rloo_parity['trl']['grad_rel_diff']:.1e} (posttrain × {rloo_parity['trl']['grad_scale']:.2f})",
              flush=True)
    print("[same batch] both tools' loss and gradient on one fixed batch, then a one-thread cost breakdown", flush=True)
    loss_parity = child("grpo_kl", "same_batch", "-", args, args.work / "same_batch.json", args.work / "same_batch.log")
    loss_parity["agree"] = (loss_parity["trl"]["loss_abs_diff"] < LOSS_TOLERANCE
                            and loss_parity["trl"]["grad_rel_diff"] < GRAD_TOLERANCE)
    print(f"  loss {loss_parity['posttrain_loss']:.9f} vs {loss_parity['trl']['loss']:.9f}, gradient relative "
          f"difference {loss_parity['trl']['grad_rel_diff']:.1e}; " + ", ".join(
              f"{piece} {b['posttrain']['cpu_ms_median']:.0f} vs {b['trl']['cpu_ms_median']:.0f} CPU-ms"
              for piece, b in loss_parity["breakdown"].items() if isinstance(b, dict) and isinstance(b.get("trl"), dict)), flush=True)
    results: dict[tuple[str, str, str], list[dict]] = {key: [] for key in plan}
    for round_index in range(args.rounds):
        for n, (case, tool, variant) in enumerate(order):
            name = f"{case}-{tool}-{variant}-r{round_index}-{n}"
            print(f"[round {round_index + 1}/{args.rounds}] {case} {tool}:{variant} ...", end=" ", flush=True)
            r = child(case, tool, variant, args, args.work / f"{name}.json", args.work / f"{name}.log")
            steps = timed_steps(r, args.warmup)
            print(f"{1000 * statistics.median(s['step_s'] for s in steps):.0f} ms/step, generation "
                  f"{1000 * statistics.median(s['generate_s'] for s in steps):.0f} ms "
                  f"({100 * statistics.median(s['generate_share'] for s in steps):.0f}%), tokens "
                  f"{r['generated_tokens'][:4]}…, peak RSS {r['peak_rss_mib']:.0f} MiB, load "
                  f"{r['loadavg_1min_before']:.1f} ({r['child_wall_s']:.0f} s)", flush=True)
            results[(case, tool, variant)].append(r)

    rows = [{"case": case, "tool": tool, "variant": variant, "note": NOTES.get((tool, variant), variant),
             "summary": summarize(runs, args.warmup), "runs": runs} for (case, tool, variant), runs in results.items()]
    cases = [c for c in CASES if any(row["case"] == c for row in rows)]
    per_step = args.prompts_per_step * args.num_generations
    parities = [parity(c, [row for row in rows if row["case"] == c], per_step) for c in cases]
    add_fixed_batch(parities, loss_parity, rloo_parity)
    all_ratios = [r for c in cases for r in ratio_rows(c, [row for row in rows if row["case"] == c], RATIOS)]
    verdicts = [v for c, p in zip(cases, parities)
                if (v := verdict(c, [row for row in rows if row["case"] == c], [r for r in all_ratios if r["case"] == c],
                                 p))]
    warnings = timing_warnings(rows, SPREAD_WARNING, "median")
    if not loss_parity["agree"]:
        warnings.append("loss parity failed: posttrain's and TRL's GRPO loss or gradient differ on the same batch")
    if rloo_parity and not rloo_parity["agree"]:
        warnings.append("RLOO parity failed: posttrain's and TRL's RLOO advantages or (rescaled) gradient differ on the "
                        "same batch")
    for p in parities:
        if not (p["same_prompts_every_rollout"] and p["completions_ok"] and p["step1_kl_zero"]):
            warnings.append(f"{p['case']}: parity check failed (same prompts: {p['same_prompts_every_rollout']}, "
                            f"completions per step: {p['completions_per_step']}, step-1 KL zero: {p['step1_kl_zero']})")
        if p["late_imports"]:
            warnings.append(f"{p['case']}: packages imported after the up-front import (RSS after imports "
                            f"understates them): {p['late_imports']}")
    report = {
        "command": os.environ.get("RL_BENCH_CMD", "bash benchmarks/run_rl_bench.sh"),
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "total_wall_s": time.time() - t0,
        "versions": versions(PACKAGES),
        "assets": assets,
        "settings": {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
                     "prompts_per_step": args.prompts_per_step, "num_generations": args.num_generations,
                     "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "lr": args.lr,
                     "beta_kl_case": args.beta, "schedule": "constant", "max_grad_norm": 1.0, "order": args.runs},
        "rows": rows,
        "ratios": all_ratios,
        "parity": parities,
        "loss_parity": loss_parity,
        "rloo_loss_parity": rloo_parity,
        "verdicts": verdicts,
        "warnings": warnings,
    }
    save_report(report, args.results, args.name, write_markdown)
    exit_on_parity_failure([p["case"] for p in parities if not parity_ok(p)])


if __name__ == "__main__":
    main()
