"""Where a DPO step's time goes on a GPU: the policy's forward + backward, by layout and kernel.

    python benchmarks/dpo/gpu_profile.py --cache benchmarks/.cache/dpo_gpu [--device cuda]

The first GPU benchmark run found posttrain's shared-prompt layout (one row per prompt, a
4-D mask) sending ~0.6x TRL's tokens through the model yet taking about TRL's time. This
script times the part that differs, the policy log-probs of a 16-pair batch and their
backward (no optimizer, no reference), in one process, for:

    shared, any SDPA kernel   the 4-D mask with PyTorch's own kernel choice (cuDNN on Hopper)
    shared, cuDNN kept off    what `models.attention.masked_attention_kernels` does now
    + TF32 head matmul        the same with TF32 allowed for the float32 vocabulary projection
    separate rows             one row per response, causal mask only (TRL's layout)

each on one batch repeated (shape-specific costs paid once) and over batches of different
widths (paid every time), then lists the slowest CUDA kernels of one shared-prompt step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "src"))


def load_batches(cache: Path, batch_size: int, max_length: int, count: int):
    from transformers import AutoTokenizer

    from posttrain.config import DPOConfig
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.train.grouped import collate_items, collate_shared_prompt, items_from_examples

    tokenizer = AutoTokenizer.from_pretrained(cache / "model")
    cfg = DPOConfig.load(overrides=[f"model.path={cache / 'model'}", f"data.train_files=[{cache / 'prefs.jsonl'}]",
                                    f"data.max_length={max_length}", "data.eval_fraction=0"])
    data = prepare_preference_data(cfg.data, tokenizer, Path("/tmp/gpu_profile_run"), 0, log=lambda _m: None)
    items = items_from_examples(data.train)
    pad = tokenizer.pad_token_id
    groups = [items[i * batch_size:(i + 1) * batch_size] for i in range(count)]
    return {"shared": [collate_shared_prompt(g, pad) for g in groups], "separate": [collate_items(g, pad) for g in groups]}


def step(model, batch: dict, chunk: int, device: str) -> None:
    from posttrain.train.preference import batch_logps

    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=device == "cuda"):
        logps, _ = batch_logps(model, batch, chunk)
    logps.sum().backward()


def timed(model, batch, chunk, device, repeats: int) -> tuple[float, float]:
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(2):
        step(model, batch, chunk, device)
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        step(model, batch, chunk, device)
        sync()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    return 1000 * statistics.median(times), peak


def top_kernels(model, batch, chunk, device, n: int = 10) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        step(model, batch, chunk, device)
        if device == "cuda":
            torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=n).splitlines()


def varying(model, batches: list[dict], device: str) -> float:
    """Mean ms of one forward + backward per batch over batches of different widths (the
    first, warm-up, excluded): per-shape costs such as kernel plans show up here."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step(model, batches[0], 256, device)
    model.zero_grad(set_to_none=True)
    times = []
    for batch in batches[1:]:
        sync()
        t0 = time.perf_counter()
        step(model, batch, 256, device)
        sync()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return 1000 * statistics.fmean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=HERE.parent / ".cache" / "dpo_gpu")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6, help="batches of different widths for the varying test")
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    import contextlib

    from transformers import AutoModelForCausalLM

    from posttrain.train import preference

    torch.manual_seed(0)
    loaded = load_batches(args.cache, args.batch_size, args.max_length, args.batches)
    batches = {k: [{n: (t.to(args.device) if torch.is_tensor(t) else t) for n, t in b.items()} for b in bs]
               for k, bs in loaded.items()}
    model = AutoModelForCausalLM.from_pretrained(args.cache / "model", dtype=torch.float32).to(args.device)
    model.config.use_cache = False
    fix = preference.masked_attention_kernels
    variants = [("shared, any SDPA kernel (before)", "shared", lambda _d: contextlib.nullcontext(), False),
                ("shared, cuDNN kept off (now)", "shared", fix, False),
                ("shared, now + TF32 head matmul", "shared", fix, True),
                ("separate rows", "separate", fix, False)]
    rows = []
    for name, layout, kernels, tf32 in variants:
        preference.masked_attention_kernels = kernels
        torch.backends.cuda.matmul.allow_tf32 = tf32
        fixed_ms, peak = timed(model, batches[layout][0], 256, args.device, args.repeats)
        varying_ms = varying(model, batches[layout], args.device)
        tokens = statistics.fmean(int(b["input_ids"].numel()) for b in batches[layout])
        rows.append({"variant": name, "fixed_shape_ms": fixed_ms, "varying_shapes_ms": varying_ms,
                     "peak_mib": peak, "token_slots": tokens})
        print(f"{name:34s} same batch {fixed_ms:7.1f} ms | {len(batches[layout]) - 1} batches of other widths "
              f"{varying_ms:7.1f} ms | peak {peak:7.0f} MiB | {tokens:,.0f} token slots", flush=True)
    preference.masked_attention_kernels = fix
    torch.backends.cuda.matmul.allow_tf32 = False
    print("\n".join(top_kernels(model, batches["shared"][1], 256, args.device)), flush=True)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
