"""`posttrain demo`: the main job on the built-in default, with no downloads.

Builds the tiny preset (random-init Llama-style model + tokenizer trained on bundled
text), fine-tunes it on the bundled synthetic instruction tasks, and prints exact match
on held-out prompts before and after. Then the RLHF stages on the SFT model, with
verifiable synthetic preferences (chosen = the correct answer): a reward model (held-out
pairwise accuracy before → after) and DPO with the RPO term (held-out implicit-reward
accuracy and exact match before → after). Last, one alignment report of the DPO model beside
the SFT model (exact match, answer NLL, sampled KL, red-team rates). Everything lands in the
run directory (the SFT run), the reward model in its rm/, the DPO policy in its dpo/ and the
report in its report/.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from posttrain.train.loop import LOCK_FILE

DEMO_CONFIG = {
    "model": {"path": "tiny"},
    "data": {
        "train_files": ["synthetic"],
        "synthetic_tasks": ["smallest", "copy", "reverse"],
        "synthetic_size": 24000,
        "eval_fraction": 0.05,
        "max_length": 64,
    },
    "train": {
        "seed": 0,
        "max_steps": 1600,
        "batch_size": 64,
        "lr": 3e-3,
        "weight_decay": 0.01,
        "schedule": "cosine",
        "warmup_steps": 30,
        "min_lr_ratio": 0.1,
        "eval_every": 400,
        "log_every": 10,
        "resume": "never",
    },
    "eval": {"exact_match_prompts": 300, "max_new_tokens": 16},
}


# What a demo run directory holds: the SFT run's files (its writer lock among them), then rm/, dpo/
# and report/ (and the .partial of a file cut off mid-write, rejects-*.jsonl of bad rows). Nothing
# else is the demo's.
DEMO_ENTRIES = {"config.yaml", "params.json", "data_report.json", "metrics.jsonl", "summary.json", "checkpoints",
                "final", "rm", "dpo", "report", LOCK_FILE}


def _is_demo_entry(name: str) -> bool:
    name = name.removesuffix(".partial")
    return name in DEMO_ENTRIES or (name.startswith("rejects-") and name.endswith(".jsonl"))


def clear_earlier_run(output_dir: str) -> None:
    """The demo starts from scratch, so it deletes its output dir first, but only one that is
    missing, empty, or an earlier demo run (its config.yaml, and only names the demo writes):
    `--output-dir ~/work` must never take the user's files with it."""
    import shutil

    from posttrain.config.schema import user_path
    from posttrain.errors import UserError

    out = user_path(output_dir)
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise UserError(f"demo output dir {out} is not a directory the demo wrote; give another --output-dir")
    names = sorted(p.name for p in out.iterdir())
    if not names:
        return
    foreign = [name for name in names if not _is_demo_entry(name)]
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise UserError(f"demo output dir {out} holds files no demo wrote ({shown}); the demo clears only an "
                        "earlier demo run: give another --output-dir")
    if "config.yaml" not in names:
        raise UserError(f"demo output dir {out} is not an earlier demo run (no config.yaml); the demo clears only "
                        "those: give another --output-dir")
    kept = [name for name in ("final", "rm", "dpo", "report") if name in names]
    print(f"demo: removing the earlier demo run in {out}" + (f" (its {', '.join(kept)})" if kept else ""), flush=True)
    shutil.rmtree(out)


def demo_config(output_dir: str, overrides: list[str] = ()):
    import copy

    from posttrain.config import SFTConfig, apply_override

    data = copy.deepcopy(DEMO_CONFIG)
    data["output_dir"] = output_dir
    for item in overrides:
        apply_override(data, item)
    return SFTConfig.from_dict(data, source="demo")


def _preference_stages(run_dir: Path, seed: int) -> str:
    """Reward model and DPO on the SFT model, for the smallest-letter task; returns the lines to print.

    One task: a fresh reward head learns "is this the smallest letter" in 150 steps (0.97
    held-out), while judging copy/reverse answers (one letter changed or swapped) takes a
    tiny model far longer (0.63 after 300 steps, measured)."""
    from posttrain.config import DPOConfig, RMConfig
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    common = [f"model.path={run_dir / 'final'}", "data.synthetic_tasks=[smallest]", "data.max_length=64",
              "data.synthetic_size=3200", "data.eval_fraction=0.0625", "train.batch_size=16", f"train.seed={seed}",
              "train.resume=never", "train.log_every=10"]
    rm = json.loads((run_rm(RMConfig.load(None, [f"output_dir={run_dir / 'rm'}", "train.max_steps=150",
                                                   "train.lr=1e-3", "reward.centering=0.01", *common]))
                     / "summary.json").read_text())
    dpo = json.loads((run_dpo(DPOConfig.load(None, [f"output_dir={run_dir / 'dpo'}", "train.max_steps=150",
                                                      "train.lr=3e-4", "dpo.nll_weight=1.0", "eval.exact_match_prompts=200",
                                                      "eval.max_new_tokens=4", *common]))
                      / "summary.json").read_text())
    return (f"smallest letter — reward model: held-out pairwise accuracy {rm['eval_before']['accuracy']:.1%} → "
            f"{rm['eval_after']['accuracy']:.1%} after {rm['steps']} steps ({rm['eval_items']} prompts)\n"
            f"smallest letter — DPO (+NLL): held-out implicit-reward accuracy {dpo['eval_before']['rewards/accuracy']:.1%} → "
            f"{dpo['eval_after']['rewards/accuracy']:.1%} ({dpo['eval_items']} pairs); "
            f"{_exact_match(dpo)} after {dpo['steps']} steps")


def _exact_match(summary: dict) -> str:
    """A run's exact-match figure as the demo prints it: only one that was measured."""
    if "exact_match_before" not in summary:
        return "exact match not measured (no held-out prompt scored; see eval.exact_match_prompts)"
    return (f"exact match on {summary['exact_match_prompts']} held-out prompts {summary['exact_match_before']:.1%} → "
            f"{summary['exact_match_after']:.1%}")


def _report_stage(run_dir: Path, seed: int) -> str:
    """One alignment report of the DPO model beside the SFT model it started from (posttrain
    evaluate: held-out answers, answer NLL, sampled KL, a short red-team run of both); returns
    the lines to print."""
    from posttrain.config.evaluate import EvaluateConfig
    from posttrain.eval.alignment import run_evaluate

    out = run_evaluate(EvaluateConfig.load(None, [
        f"output_dir={run_dir / 'report'}", f"policy={run_dir / 'dpo' / 'final'}", f"reference={run_dir / 'final'}",
        "prompts.synthetic_tasks=[smallest]", "prompts.limit=200", "generation.max_new_tokens=4",
        f"generation.seed={seed}", "reward.functions=[exact_match=posttrain.rewards:exact_match]",
        "safety.redteam=true", "safety.limit=10"]), log=lambda _: None)
    report = json.loads((out / "report.json").read_text())
    policy, reference = report["models"]["policy"], report["models"]["reference"]

    def both(get, form) -> str:
        return f"{form(get(policy))} vs {form(get(reference))}"

    def rate(key):
        return lambda side: side["redteam"][key]["rate"]

    def percent(value) -> str:  # a rate over no answered requests is no figure
        return "n/a" if value is None else f"{value:.0%}"

    red = policy["redteam"]["attack_success"]
    return (f"alignment report, DPO vs SFT model ({report['prompts']} held-out prompts; {out / 'report.md'}): "
            f"exact match {both(lambda s: s['exact_match']['rate'], '{:.1%}'.format)}, answer NLL "
            f"{both(lambda s: s['answer_nll'], '{:.3f}'.format)} per token, KL {report['kl_to_reference']:.3f} nats "
            f"per response\n"
            f"red team (refusal patterns): attack success {both(rate('attack_success'), percent)} of "
            f"{red['n']} attacked harmful requests, over-refusal {both(rate('over_refusal'), percent)} of "
            f"{policy['redteam']['over_refusal']['n']} safe ones (the demo's tasks teach no refusals)")


def run_demo(output_dir: str = "runs/demo", overrides: list[str] = ()) -> int:
    from transformers.utils import logging

    from posttrain.train.sft import run_sft

    logging.disable_progress_bar()  # one "Loading weights" bar per stage otherwise

    cfg = demo_config(output_dir, overrides)
    if cfg.train.resume == "never":  # the run directory itself, output_dir=... included
        clear_earlier_run(cfg.output_dir)  # the demo always starts from scratch
    started = time.time()
    run_dir = run_sft(cfg)
    summary = json.loads((run_dir / "summary.json").read_text())
    minutes = (time.time() - started) / 60
    by_task = summary.get("exact_match_after_by_task", {})
    per_task = ", ".join(f"{name} {value:.0%}" for name, value in by_task.items() if name != "all")
    print(f"\nposttrain demo: {_exact_match(summary)} after {summary['steps']} SFT steps ({minutes:.1f} min)")
    if per_task:
        print(f"after, by task: {per_task}")
    preference = _preference_stages(run_dir, cfg.train.seed)
    print(f"\n{preference}")
    print(f"\n{_report_stage(run_dir, cfg.train.seed)}\n(total {(time.time() - started) / 60:.1f} min)")
    print(f"run directory: {run_dir}  (final model: {run_dir / 'final'}; try `posttrain chat --model {run_dir}`)")
    return 0
