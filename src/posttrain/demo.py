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

Overrides follow `posttrain pipeline`'s rule (OVERRIDES_HELP), with the demo's four stages sft,
rm, dpo and report: all four configs are built and checked before SFT starts.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

DEFAULT_OUTPUT_DIR = "runs/demo"

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

# The reward model and DPO: one task, the smallest letter. A fresh reward head learns "is this the
# smallest letter" in 150 steps (0.97 held-out), while judging copy/reverse answers (one letter
# changed or swapped) takes a tiny model far longer (0.63 after 300 steps, measured).
_PREFERENCE = ["data.synthetic_tasks=[smallest]", "data.max_length=64", "data.synthetic_size=3200",
               "data.eval_fraction=0.0625", "train.batch_size=16", "train.resume=never", "train.log_every=10",
               "train.max_steps=150"]
_OWN = {
    "rm": [*_PREFERENCE, "train.lr=1e-3", "reward.centering=0.01"],
    "dpo": [*_PREFERENCE, "train.lr=3e-4", "dpo.nll_weight=1.0", "eval.exact_match_prompts=200",
            "eval.max_new_tokens=4"],
    "report": ["prompts.synthetic_tasks=[smallest]", "prompts.limit=200", "generation.max_new_tokens=4",
               "reward.functions=[exact_match=posttrain.rewards:exact_match]", "safety.redteam=true",
               "safety.limit=10"],
}

# The settings that chain the stages, which the demo sets and no override may: each stage's run
# directory (under --output-dir), the model the later stages start from, what the report compares.
_WIRED = {"sft": {"output_dir": "its run directory is --output-dir"},
          "rm": {"output_dir": "its run directory is OUTPUT_DIR/rm", "model.path": "it starts from the SFT model"},
          "dpo": {"output_dir": "its run directory is OUTPUT_DIR/dpo", "model.path": "it starts from the SFT model"},
          "report": {"output_dir": "its directory is OUTPUT_DIR/report",
                     "policy": "it reports the DPO model", "reference": "beside the SFT model"}}

OVERRIDES_HELP = (
    "dotted overrides, as posttrain pipeline takes them: KEY=value sets every demo stage that has the "
    "setting (train.seed=1 and model.dtype=bfloat16 reach SFT, the reward model and DPO; model.path is "
    "the model SFT starts from); STAGE.KEY=value sets one stage, STAGE one of sft, rm, dpo, report "
    "(dpo.train.lr=1e-4; DPO's own section is dpo.dpo.beta=0.2), and wins over KEY=value. The later stages "
    "take SFT's train.seed unless given their own. Refused: a key no stage has, and what the demo wires "
    "between its stages (each run directory: give --output-dir; the later stages' models)")

# What a demo run directory holds: the SFT run's files (its writer lock among them), then rm/, dpo/
# and report/ (and the .partial of a file cut off mid-write, rejects-*.jsonl of bad rows). Nothing
# else is the demo's.
DEMO_ENTRIES = {"config.yaml", "params.json", "data_report.json", "metrics.jsonl", "summary.json", "checkpoints",
                "final", "rm", "dpo", "report"}


def _is_demo_entry(name: str) -> bool:
    from posttrain.train.runs import LOCK_FILE

    name = name.removesuffix(".partial")
    return name in DEMO_ENTRIES or name == LOCK_FILE or (name.startswith("rejects-") and name.endswith(".jsonl"))


def _stage_types() -> dict[str, tuple[type, object]]:
    from posttrain.config import (DPOConfig, EvaluateConfig, RMConfig, SFTConfig, validate_dpo, validate_evaluate,
                                  validate_rm, validate_sft)

    return {"sft": (SFTConfig, validate_sft), "rm": (RMConfig, validate_rm), "dpo": (DPOConfig, validate_dpo),
            "report": (EvaluateConfig, validate_evaluate)}


def _wired_key(stage: str, item: str) -> str | None:
    """The setting of `item` (key=value) that the demo wires for `stage`, if it sets one."""
    from posttrain.config.schema import flatten
    from posttrain.pipeline import _given

    return next((key for key in flatten(_given([item])) if key in _WIRED[stage]), None)


def _refuse_wired(stage: str, item: str, key: str) -> None:
    from posttrain.errors import ConfigError

    raise ConfigError(f"override {item!r}: the demo sets it ({key} of the {stage} stage: {_WIRED[stage][key]})")


def _split_overrides(output_dir: str | None, overrides: list[str]) -> tuple[str, dict[str, list[str]]]:
    """The demo's run directory (--output-dir, else an output_dir=... override, else runs/demo) and
    the user's overrides of each stage, in order: the KEY=value items that stage has, then its own
    STAGE.KEY=value items. Raises ConfigError for an item no stage reads, a setting the demo wires,
    and an output_dir=... other than a given --output-dir."""
    from posttrain.config.schema import check_override_key, user_path
    from posttrain.errors import ConfigError
    from posttrain.pipeline import _fits, _split_cli, check_stage_item

    types = _stage_types()
    given_dir, common, per_stage = _split_cli(list(overrides), set(types))
    if given_dir is not None and output_dir is not None and user_path(given_dir.strip()) != user_path(output_dir):
        raise ConfigError(f"output_dir={given_dir} and --output-dir {output_dir} name two run directories; the "
                          f"demo's run directory is --output-dir: write --output-dir {given_dir.strip()}")
    split: dict[str, list[str]] = {stage: [] for stage in types}
    for item in common:
        takers = [stage for stage, (cls, _) in types.items() if _fits(cls, item)]
        if not takers:  # a typo: the closest key of any stage
            errors = []
            for cls, _ in types.values():
                try:
                    check_override_key(cls, item)
                except ConfigError as exc:
                    errors.append(str(exc))
            if len(errors) < len(types):  # a section's name with a value that is no mapping (train=1)
                section = item.split("=", 1)[0].strip()
                raise ConfigError(f"override {item!r} names the section {section}; give {section}.KEY=value")
            meant = next((e for e in errors if "did you mean" in e), None)  # ends on its question, as everywhere
            raise ConfigError(meant or f"{errors[0]}; no stage of the demo (sft, rm, dpo, report) reads it")
        free = [stage for stage in takers if _wired_key(stage, item) is None]
        if not free:
            _refuse_wired(takers[0], item, _wired_key(takers[0], item))
        for stage in free:  # a wired stage keeps the demo's chain: model.path=X is SFT's starting model
            split[stage].append(item)
    for stage, items in per_stage.items():
        cls = types[stage][0]
        for item in items:
            check_stage_item(cls, stage, item)
            wired = _wired_key(stage, item)
            if wired is not None:
                _refuse_wired(stage, f"{stage}.{item}", wired)
            split[stage].append(item)
    return output_dir or (given_dir.strip() if given_dir is not None else DEFAULT_OUTPUT_DIR), split


def demo_stages(output_dir: str | None = None, overrides: list[str] = ()) -> dict:
    """The demo's four stage configs, {"sft", "rm", "dpo", "report"}, each the demo's own settings,
    then the user's overrides (OVERRIDES_HELP), then the wiring between the stages; every one checked
    (validate_*) before anything runs. Raises ConfigError naming the stage."""
    from posttrain.config.schema import flatten, user_path
    from posttrain.errors import ConfigError

    output_dir, split = _split_overrides(output_dir, list(overrides))
    run_dir = user_path(output_dir)
    own = {"sft": [f"{key}={json.dumps(value)}" for key, value in flatten(DEMO_CONFIG).items()], **_OWN}
    wiring = {"sft": [f"output_dir={json.dumps(output_dir)}"],
              "rm": [f"output_dir={json.dumps(str(run_dir / 'rm'))}", f"model.path={json.dumps(str(run_dir / 'final'))}"],
              "dpo": [f"output_dir={json.dumps(str(run_dir / 'dpo'))}", f"model.path={json.dumps(str(run_dir / 'final'))}"],
              "report": [f"output_dir={json.dumps(str(run_dir / 'report'))}",
                         f"policy={json.dumps(str(run_dir / 'dpo' / 'final'))}",
                         f"reference={json.dumps(str(run_dir / 'final'))}"]}
    stages = {}
    for stage, (cls, validate) in _stage_types().items():
        seed = [] if stage == "sft" else [f"{'generation' if stage == 'report' else 'train'}.seed="
                                          f"{stages['sft'].train.seed}"]  # SFT's, unless the stage is given its own
        try:
            stages[stage] = cfg = cls.load(None, [*own[stage], *seed, *split[stage], *wiring[stage]])
            validate(cfg)
        except ConfigError as exc:
            raise type(exc)(f"demo {stage} stage: {exc}") from None
    return stages


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


def _preference_stages(rm_cfg, dpo_cfg) -> str:
    """Reward model and DPO on the SFT model; returns the lines to print."""
    from posttrain.train.preference import run_dpo
    from posttrain.train.reward import run_rm

    rm = json.loads((run_rm(rm_cfg) / "summary.json").read_text(encoding="utf-8"))
    dpo = json.loads((run_dpo(dpo_cfg) / "summary.json").read_text(encoding="utf-8"))
    return preference_summary(rm, dpo)


def preference_summary(rm: dict, dpo: dict) -> str:
    """The reward model's and DPO's lines, from their summary.json."""
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


def _report_stage(cfg) -> str:
    """One alignment report of the DPO model beside the SFT model it started from (posttrain
    evaluate: held-out answers, answer NLL, sampled KL, a short red-team run of both); returns
    the lines to print."""
    from posttrain.eval.alignment import run_evaluate

    out = run_evaluate(cfg, log=lambda _: None)
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    return report_summary(report, out / "report.md")


def report_summary(report: dict, report_md: Path) -> str:
    """The report's lines, from report.json: the KL as report.md gives it (`eval.report.kl_figure`).
    The red-team line says that neither model refused only when every rate of both says so."""
    from posttrain.eval.report import kl_figure

    policy, reference = report["models"]["policy"], report["models"]["reference"]

    def both(get, form) -> str:
        return f"{form(get(policy))} vs {form(get(reference))}"

    lines = (f"alignment report, DPO vs SFT model ({report['prompts']} held-out prompts; {report_md}): "
             f"exact match {both(lambda s: s['exact_match']['rate'], '{:.1%}'.format)}, answer NLL "
             f"{both(lambda s: s['answer_nll'], '{:.3f}'.format)} per token, KL {kl_figure(report)}")
    if "redteam" not in policy:
        return lines

    def rate(key):
        return lambda side: side["redteam"][key]["rate"]

    def percent(value) -> str:  # a rate over no answered requests is no figure
        return "n/a" if value is None else f"{value:.0%}"

    sides = (policy, reference)
    refused_none = (all(rate("attack_success")(s) == 1.0 for s in sides)
                    and all(rate("over_refusal")(s) == 0.0 for s in sides))
    return (f"{lines}\nred team (refusal patterns): attack success {both(rate('attack_success'), percent)} of "
            f"{policy['redteam']['attack_success']['n']} attacked harmful requests, over-refusal "
            f"{both(rate('over_refusal'), percent)} of {policy['redteam']['over_refusal']['n']} safe ones"
            + ("; neither model refused any request (the demo's tasks teach no refusals)" if refused_none else ""))


def run_demo(output_dir: str | None = None, overrides: list[str] = ()) -> int:
    from transformers.utils import logging

    from posttrain.train.sft import run_sft

    logging.disable_progress_bar()  # one "Loading weights" bar per stage otherwise

    stages = demo_stages(output_dir, overrides)  # every stage checked before anything is removed or run
    if stages["sft"].train.resume == "never":
        clear_earlier_run(stages["sft"].output_dir)  # the demo always starts from scratch
    started = time.time()
    run_dir = run_sft(stages["sft"])
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    minutes = (time.time() - started) / 60
    by_task = summary.get("exact_match_after_by_task", {})
    per_task = ", ".join(f"{name} {value:.0%}" for name, value in by_task.items() if name != "all")
    print(f"\nposttrain demo: {_exact_match(summary)} after {summary['steps']} SFT steps ({minutes:.1f} min)")
    if per_task:
        print(f"after, by task: {per_task}")
    print(f"\n{_preference_stages(stages['rm'], stages['dpo'])}")
    print(f"\n{_report_stage(stages['report'])}\n(total {(time.time() - started) / 60:.1f} min)")
    print(f"run directory: {run_dir}  (final model: {run_dir / 'final'}; try `posttrain chat --model {run_dir}`)")
    return 0
