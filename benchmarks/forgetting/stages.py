"""The alignment tax, measured: does `forgetting.*` keep what the model knew when a later DPO
stage trains on something else?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forgetting/stages.py [--seeds 0] [--work DIR] [--fresh]

Everything runs in this process on the `tiny` preset (CPU, deterministic), in three parts:

1. DPO after SFT. Phase A is tests/test_forgetting_outcomes.py's: SFT teaches "Copy: q m t" →
   "q m t" (400 steps of 64, cosine, lr 3e-3); trained once and cached in --work. Then DPO on
   synthetic "Smallest letter: …" pairs (chosen = the right letter, rejected = a wrong one;
   2,000 train pairs, 200 held out), 100 steps of 16, lr 1e-3 (aggressive, so that it does
   disturb copy), β 0.1, cosine, once per control row, all else equal. The retain data are the
   1,000 copy rows that test writes (training side; 800 in the pool that lm_coef, distill and
   project draw from, 200 held out and only measured; 100 of those scored by greedy exact match).
   Per row: copy exact match before → after, retain loss (nats/token on the 200) before →
   after, and the DPO's own figures: held-out implicit-reward accuracy and greedy exact match
   on 100 held-out smallest prompts, before → after.
2. SFT phase B of tests/test_forgetting_outcomes.py (300 steps of 32 on "reverse" only, lr 2e-3,
   constant) from the same phase-A model: no control, and gradual unfreezing.
3. The setting of tests/test_forgetting_stage_outcomes.py: the tiny preset after 33 SFT steps on
   "smallest" (conftest's weak_sft_model), then DPO on "largest" pairs (30 steps of 16, lr 1e-3)
   with 300 smallest rows as retain data; no control vs lm_coef 0.3, three seeds.

--seeds repeats part 1 per DPO seed (data order, retain split and batches); the phase-A model
is shared. ~4 minutes on a 2-core machine with one thread (~3 once phase A, ~75 s, is cached);
--seeds 0,1,2 ~6.5 minutes with it cached.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PHASE_A = [  # tests/test_forgetting_outcomes.py's copy_model
    "model.path=tiny", "data.train_files=[synthetic]", "data.synthetic_tasks=[copy]", "data.synthetic_size=25800",
    f"data.eval_fraction={200 / 25800}", "data.max_length=64", "train.max_steps=400", "train.batch_size=64",
    "train.lr=3e-3", "train.schedule=cosine", "train.warmup_steps=30", "train.weight_decay=0.01", "train.seed=0",
    "train.resume=never", "train.progress_bar=false", "train.log_every=100"]

DPO = [
    "data.synthetic_tasks=[smallest]", "data.synthetic_size=2200", f"data.eval_fraction={200 / 2200}",
    "data.max_length=64", "train.max_steps=100", "train.batch_size=16", "train.lr=1e-3", "dpo.beta=0.1",
    "train.progress_bar=false", "train.resume=never", "train.log_every=50", "eval.exact_match_prompts=100",
    "eval.max_new_tokens=16", "forgetting.retain_exact_match=100"]

DPO_ROWS = [
    ("no control", []),
    ("`lm_coef: 0.1`", ["forgetting.lm_coef=0.1"]),
    ("`lm_coef: 0.3`", ["forgetting.lm_coef=0.3"]),
    ("`lm_coef: 1`", ["forgetting.lm_coef=1"]),
    ("`distill: 0.3`", ["forgetting.distill=0.3"]),
    ("`distill: 1`", ["forgetting.distill=1"]),
    ("`project: true`", ["forgetting.project=true"]),
    ("`lm_coef: 0.1` + `project`", ["forgetting.lm_coef=0.1", "forgetting.project=true"]),
    ("`l2sp: 0.1`", ["forgetting.l2sp=0.1"]),
    ("`l2sp: 1`", ["forgetting.l2sp=1"]),
    ("`unfreeze_every: 10`", ["forgetting.unfreeze_every=10"]),
    ("`unfreeze_every: 20`", ["forgetting.unfreeze_every=20"]),
]

SFT_B = [  # tests/test_forgetting_outcomes.py's _phase_b
    "data.train_files=[synthetic]", "data.synthetic_tasks=[reverse]", "data.synthetic_size=9800",
    "data.eval_fraction=0.02", "data.max_length=64", "train.max_steps=300", "train.batch_size=32", "train.lr=2e-3",
    "train.schedule=constant", "train.weight_decay=0.01", "train.seed=0", "train.resume=never",
    "train.progress_bar=false", "train.log_every=100", "eval.exact_match_prompts=100", "eval.max_new_tokens=16",
    "forgetting.retain_exact_match=100"]

SFT_ROWS = [("no control", []), ("`unfreeze_every: 50`", ["forgetting.unfreeze_every=50"])]

# tests/test_forgetting_stage_outcomes.py (and conftest.weak_sft_model for the start)
WEAK_SFT = {
    "model": {"path": "tiny"},
    "data": {"train_files": ["synthetic"], "synthetic_tasks": ["smallest"], "synthetic_size": 6000,
             "eval_fraction": 0.05, "max_length": 64},
    "train": {"max_steps": 33, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20, "min_lr_ratio": 0.1,
              "progress_bar": False, "log_every": 50}}
TEST_DPO = [
    "data.synthetic_tasks=[largest]", "data.synthetic_size=400", "data.eval_fraction=0.25", "data.max_length=32",
    "train.max_steps=30", "train.batch_size=16", "train.lr=1e-3", "dpo.beta=0.1", "train.resume=never",
    "train.progress_bar=false", "train.log_every=1000", "forgetting.retain_batch_size=8"]
TEST_ROWS = [("no control", []), ("`lm_coef: 0.3`", ["forgetting.lm_coef=0.3"])]


def _write_rows(path: Path, task: str, n: int) -> Path:
    from posttrain.data.synthetic import make_rows

    rows = make_rows([task], n, seed=77, side="train", unique=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _cached(run_dir: Path, settings, train) -> Path:
    """run_dir/final, trained by `train()` unless a finished run with the same settings is there."""
    stamp = run_dir / "bench_settings.json"
    final = run_dir / "final"
    if final.is_dir() and stamp.is_file() and json.loads(stamp.read_text()) == settings:
        print(f"reusing {final}", file=sys.stderr)
        return final
    shutil.rmtree(run_dir, ignore_errors=True)
    final = train()
    stamp.write_text(json.dumps(settings))
    return final


def phase_a(work: Path) -> tuple[Path, Path]:
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    retain = _write_rows(work / "copy.jsonl", "copy", 1000)
    run_dir = work / "phase_a"
    model = _cached(run_dir, PHASE_A,
                    lambda: run_sft(SFTConfig.load(None, [f"output_dir={run_dir}", *PHASE_A])) / "final")
    return model, retain


def _summary(run_dir: Path) -> dict:
    """The run's summary.json; its weights and checkpoints are deleted (~20 MB a run), logs kept."""
    summary = json.loads((run_dir / "summary.json").read_text())
    for heavy in ("checkpoints", "final", "reference_logps.safetensors"):
        path = run_dir / heavy
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return summary


def dpo_rows(work: Path, model: Path, retain: Path, seeds: list[int]) -> list[dict]:
    from posttrain.config import DPOConfig
    from posttrain.train.preference import run_dpo

    rows = []
    for seed in seeds:
        for i, (name, options) in enumerate(DPO_ROWS):
            start = time.time()
            cfg = DPOConfig.load(None, [f"output_dir={work / f'dpo_s{seed}_{i}'}", f"model.path={model}", *DPO,
                                        f"train.seed={seed}", f"forgetting.retain_files=[{retain}]", *options])
            s = _summary(run_dpo(cfg))
            rows.append({"control": name, "seed": seed, "seconds": time.time() - start,
                         "copy": (s["retain_exact_match_before"], s["retain_exact_match_after"]),
                         "retain_loss": (s["retain_loss_before"], s["retain_loss_after"]),
                         "accuracy": (s["eval_before"]["rewards/accuracy"], s["eval_after"]["rewards/accuracy"]),
                         "smallest": (s["exact_match_before"], s["exact_match_after"])})
    return rows


def sft_rows(work: Path, model: Path, retain: Path) -> list[dict]:
    from posttrain.config import SFTConfig
    from posttrain.train.sft import run_sft

    rows = []
    for i, (name, options) in enumerate(SFT_ROWS):
        start = time.time()
        cfg = SFTConfig.load(None, [f"output_dir={work / f'sft_b_{i}'}", f"model.path={model}", *SFT_B,
                                    f"forgetting.retain_files=[{retain}]", *options])
        s = _summary(run_sft(cfg))
        rows.append({"control": name, "seconds": time.time() - start,
                     "copy": (s["retain_exact_match_before"], s["retain_exact_match_after"]),
                     "retain_loss": (s["retain_loss_before"], s["retain_loss_after"]),
                     "reverse": s["exact_match_after_by_task"]["reverse"]})
    return rows


def test_setting_rows(work: Path) -> list[dict]:
    from posttrain.config import DPOConfig, SFTConfig
    from posttrain.train.preference import run_dpo
    from posttrain.train.sft import run_sft

    run_dir = work / "weak_smallest"
    model = _cached(run_dir, WEAK_SFT, lambda: run_sft(SFTConfig.from_dict(
        {"output_dir": str(run_dir), **WEAK_SFT})) / "final")
    retain = _write_rows(work / "smallest.jsonl", "smallest", 300)
    rows = []
    for seed in (0, 1, 2):
        for i, (name, options) in enumerate(TEST_ROWS):
            start = time.time()
            cfg = DPOConfig.load(None, [f"output_dir={work / f'test_dpo_s{seed}_{i}'}", f"model.path={model}",
                                        *TEST_DPO, f"train.seed={seed}", f"forgetting.retain_files=[{retain}]",
                                        *options])
            s = _summary(run_dpo(cfg))
            rows.append({"control": name, "seed": seed, "seconds": time.time() - start,
                         "retain_loss": (s["retain_loss_before"], s["retain_loss_after"]),
                         "increase": s["retain_loss_increase"],
                         "accuracy": (s["eval_before"]["rewards/accuracy"], s["eval_after"]["rewards/accuracy"])})
    return rows


def _pct(pair) -> str:
    return f"{pair[0]:.0%} → {pair[1]:.0%}"


def _nats(pair) -> str:
    return f"{pair[0]:.3f} → {pair[1]:.3f}"


def _spread(values: list[float], percent: bool) -> str:
    mean = sum(values) / len(values)
    if percent:
        return f"{mean:.0%} ({min(values):.0%}–{max(values):.0%})"
    return f"{mean:.3f} ({min(values):.3f}–{max(values):.3f})"


def tables(dpo: list[dict], sft: list[dict], test: list[dict]) -> str:
    seeds = len({r["seed"] for r in dpo}) > 1
    out = ["### DPO (smallest) after SFT (copy)", "",
           "| control |" + (" seed |" if seeds else "") + " copy exact match | retain loss (nats/token) | "
           "DPO held-out implicit-reward accuracy | smallest exact match | s |",
           "|---|" + ("---|" if seeds else "") + "---|---|---|---|---|"]
    for r in sorted(dpo, key=lambda r: [name for name, _ in DPO_ROWS].index(r["control"])):
        out.append(f"| {r['control']} |" + (f" {r['seed']} |" if seeds else "") + f" {_pct(r['copy'])} | "
                   f"{_nats(r['retain_loss'])} | {_pct(r['accuracy'])} | {_pct(r['smallest'])} | {r['seconds']:.0f} |")
    if seeds:
        out += ["", f"Mean over seeds {', '.join(str(s) for s in sorted({r['seed'] for r in dpo}))} (min–max):", "",
                ("| control | copy exact match after | retain loss after | implicit-reward accuracy after | "
                 "smallest exact match after |"), "|---|---|---|---|---|"]
        for name, _ in DPO_ROWS:
            mine = [r for r in dpo if r["control"] == name]
            out.append(f"| {name} | " + " | ".join(_spread([r[key][1] for r in mine], percent)
                                                   for key, percent in (("copy", True), ("retain_loss", False),
                                                                        ("accuracy", True), ("smallest", True))) + " |")
    out += ["", "### SFT phase B (reverse) of tests/test_forgetting_outcomes.py", "",
            "| phase B | copy before → after | retain loss before → after (nats/token) | reverse after | s |",
            "|---|---|---|---|---|"]
    for r in sft:
        out.append(f"| {r['control']} | {_pct(r['copy'])} | {_nats(r['retain_loss'])} | {r['reverse']:.0%} | "
                   f"{r['seconds']:.0f} |")
    out += ["",
            "### tests/test_forgetting_stage_outcomes.py's setting: DPO (largest) after 33 SFT steps (smallest)", "",
            "| control | seed | retain loss before → after | increase | held-out implicit-reward accuracy | s |",
            "|---|---|---|---|---|---|"]
    for r in test:
        out.append(f"| {r['control']} | {r['seed']} | {_nats(r['retain_loss'])} | {r['increase']:+.3f} | "
                   f"{_pct(r['accuracy'])} | {r['seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0", help="DPO seeds of part 1, comma-separated (default 0)")
    parser.add_argument("--work", default=str(ROOT / "benchmarks" / ".cache" / "forgetting_stages"),
                        help="run directories; the phase-A models are cached here (gitignored)")
    parser.add_argument("--fresh", action="store_true", help="retrain the cached phase-A models")
    args = parser.parse_args()
    work = Path(args.work)
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    model, retain = phase_a(work)
    dpo = dpo_rows(work, model, retain, [int(s) for s in args.seeds.split(",")])
    sft = sft_rows(work, model, retain)
    test = test_setting_rows(work)
    report = tables(dpo, sft, test)
    (work / "rows.json").write_text(json.dumps({"dpo": dpo, "sft": sft, "test": test}, indent=1))
    print(report)
    print(f"\n(total {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
