"""What packing shared-prompt blocks into rows saves, on prompts of long-tailed length.

    .venv/bin/python benchmarks/dpo/packing.py [--cache benchmarks/.cache/dpo_cpu32k] [--rounds 2]

`train.grouped.collate_shared_prompt` lays out each item (a prompt and its responses) as one
block and packs blocks, longest first, into rows no wider than the batch's longest block. The
benchmark against TRL cannot show it: its rows are all 31-38 tokens, so no two blocks fit in
one row. This script writes 320 rows cut from the bundled corpus, prompts of log-normal length
(median ~150 characters, up to 1,500) and responses of 20-200 characters, then trains the
V=32k reward-model start and the V=32k model of `run_dpo_bench.sh` (`BENCH_PROFILE=cpu32k`
builds them) for 20 steps of 16 items, each in a fresh process, alternating:

    row per item the packing switched off (one block per row, the layout before packing)
    packed       blocks packed into rows, padded (model.padding_free=false)
    padding-free the default since model.padding_free: the packed rows' real tokens only go
                 through the model, attention alone sees the rows (models.attention)

and prints ms/step (mean over steps 3-20), the positions each batch sends through the model's
linears (the padded rows, or the real tokens), the step-0 and last losses (equal up to float
rounding: neither layout changes a result) and the peak RSS.
Nothing here is imported by posttrain.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import random
import resource
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write_rows(path: Path, rows: int = 320, seed: int = 0) -> None:
    text = " ".join(resources.files("posttrain").joinpath("assets/corpus.txt").read_text().split())
    rng = random.Random(seed)

    def passage(chars: int) -> str:
        start = rng.randrange(0, len(text) - chars)
        return text[start : start + chars]

    with path.open("w") as f:
        for _ in range(rows):
            prompt_chars = max(20, min(int(rng.lognormvariate(5.0, 0.8)), 1500))
            f.write(json.dumps({"prompt": "Continue: " + passage(prompt_chars),
                                "chosen": passage(rng.randint(20, 200)),
                                "rejected": passage(rng.randint(20, 200))}) + "\n")


MODES = {"rows": "row per item", "packed": "packed", "free": "padding-free"}


def child(stage: str, model: Path, data: Path, out: Path, mode: str) -> dict:
    """One run in this process; returns its figures."""
    import posttrain.train.grouped as grouped

    if mode == "rows":
        grouped._first_fit = lambda lengths, capacity: [[i] for i in range(len(lengths))]
    slots = []
    collate = grouped.collate_shared_prompt

    def counting(items, pad_id, row_width=0, **kwargs):
        batch = collate(items, pad_id, row_width, **kwargs)
        slots.append(batch["input_ids"].numel())
        return batch

    grouped.collate_shared_prompt = counting
    overrides = [f"output_dir={out}", f"model.path={model}", f"data.train_files=[{data}]", "data.eval_fraction=0",
                 "data.max_length=512", "train.max_steps=20", "train.batch_size=16", "train.lr=5e-5",
                 "train.schedule=constant", "train.warmup_steps=0", "train.progress_bar=false", "train.log_every=1",
                 "train.resume=never", "train.save_every=0", f"model.padding_free={mode == 'free'}"]
    shutil.rmtree(out, ignore_errors=True)
    if stage == "rm":
        from posttrain.config import RMConfig
        from posttrain.train.reward import run_rm

        run, cfg = run_rm, RMConfig.load(None, overrides)
    else:
        from posttrain.config import DPOConfig
        from posttrain.train.preference import run_dpo

        run, cfg = run_dpo, DPOConfig.load(None, overrides)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        run(cfg)
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"step_time' in line]
    timed = [s["step_time_s"] for s in steps[2:]]
    return {"ms_per_step": 1000 * sum(timed) / len(timed), "positions_per_batch": sum(slots) / len(slots),
            "loss_first": steps[0]["loss"], "loss_last": steps[-1]["loss"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=HERE.parent / ".cache" / "dpo_cpu32k")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs=4, metavar=("STAGE", "MODE", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = {"rm": args.cache / "rm_init", "dpo": args.cache / "model"}
    if args.child:
        stage, mode, data, out = args.child
        print(json.dumps(child(stage, models[stage], Path(data), Path(out), mode)))
        return
    if not all((m / "model.safetensors").is_file() for m in models.values()):
        sys.exit(f"missing models under {args.cache}: run `BENCH_PROFILE=cpu32k bash benchmarks/run_dpo_bench.sh` once")
    work = HERE.parent / ".cache" / "packing_work"
    work.mkdir(parents=True, exist_ok=True)
    write_rows(work / "prefs.jsonl")
    for stage in ("rm", "dpo"):
        for round_ in range(args.rounds):
            for mode, label in MODES.items():
                done = subprocess.run([sys.executable, __file__, "--cache", str(args.cache), "--child", stage, mode,
                                       str(work / "prefs.jsonl"), str(work / "run")],
                                      check=True, capture_output=True, text=True)
                figures = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{stage} round {round_ + 1} {label:>12}: {figures['ms_per_step']:7.1f} ms/step, "
                      f"{figures['positions_per_batch']:6.0f} positions/batch, loss {figures['loss_first']:.6f} → "
                      f"{figures['loss_last']:.6f}, peak RSS {figures['peak_rss_mib']:.0f} MiB", flush=True)


if __name__ == "__main__":
    main()
