"""SFT on CPU, posttrain vs TRL's SFTTrainer: one child process per measured run.

    python benchmarks/sft_bench.py train --tool trl|posttrain [--variant ...] --out result.json
    python benchmarks/sft_bench.py fixed --tool trl|posttrain --out fixed.json

`train` trains for --steps optimizer steps and writes, as JSON: the wall time of every
step (end of step k-1 to end of step k, measured the same way for both tools, so data
loading, the optimizer and per-step logging are inside), the real (non-padding) tokens of
every step's batch, the logged loss of every step, and the process's peak RSS.

`fixed` builds each tool's own training batch from the SAME first 8 rows of the data (its
own tokenisation and collator), computes the step-0 loss through the tool's own training
loss code, and, in the same process, a plain float64 reference loss on the very same ids
(decoder → hidden @ lm_head.T → cross-entropy). It also hashes the token ids so the
driver can check both tools fed the model identical tokens.

Run `benchmarks/run_sft_bench.sh` rather than this file directly: it owns the venv and
the interleaving of repeats. Nothing here is imported by posttrain.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

T_PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_seconds, current_rss_mib, peak_rss_mib, read_rows  # noqa: E402  (a sibling script)










def ids_digest(input_ids, attention_mask) -> str:
    """sha256 over the real (unpadded) token ids of each row, in row order."""
    h = hashlib.sha256()
    for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
        h.update(json.dumps([t for t, m in zip(ids, mask) if m]).encode())
    return h.hexdigest()


def reference_loss(model_dir: str, batch: dict) -> float:
    """Mean next-token cross-entropy over labelled positions, float64, no tool code involved."""
    import torch
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64)
    ref.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        hidden = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        for row in range(hidden.shape[0]):  # one row's logits at a time keeps this process small
            targets = batch["labels"][row, 1:]
            logits = hidden[row, :-1] @ ref.lm_head.weight.T
            total += float(torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100, reduction="sum"))
            count += int((targets != -100).sum())
    return total / count


# --------------------------------------------------------------------------- TRL


def _trl_trainer(args, callbacks=()):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    dataset = Dataset.from_list(read_rows(args.data))
    extra = {}
    if args.variant in ("group_by_length", "gc_off+group_by_length"):
        extra["train_sampling_strategy"] = "group_by_length"
    if args.variant.startswith("gc_off"):
        extra["gradient_checkpointing"] = False
    config = SFTConfig(
        output_dir=str(Path(args.workdir) / "trl_out"),
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        max_steps=args.steps,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        bf16=False,  # TRL defaults to bf16=True; this benchmark is float32 on both sides
        fp16=False,
        packing=False,
        seed=args.seed,
        disable_tqdm=True,
        **extra,
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         callbacks=list(callbacks))
    return trainer, config


def train_trl(args) -> dict:
    import trl
    from transformers import TrainerCallback

    rss_after_import = current_rss_mib()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.train_begin = None
            self.step_ends: list[float] = []
            self.logs: list[dict] = []

        def on_train_begin(self, *a, **k):
            self.train_begin = time.perf_counter()
            self.cpu_begin = cpu_seconds()
            self.cpu_ends: list[float] = []

        def on_step_end(self, *a, **k):
            self.step_ends.append(time.perf_counter())
            self.cpu_ends.append(cpu_seconds())

        def on_log(self, _args, state, control, logs=None, **k):
            if logs and "loss" in logs:
                self.logs.append({"step": state.global_step, **logs})

    clock = StepClock()
    t_load = time.perf_counter()
    trainer, config = _trl_trainer(args, callbacks=[clock])
    # Count the real tokens of every batch the collator builds (the k-th call is step k's batch).
    collated_tokens: list[int] = []
    inner = trainer.data_collator

    def counting_collator(features):
        batch = inner(features)
        collated_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    trainer.data_collator = counting_collator
    setup_s = time.perf_counter() - t_load
    rss_before_train = current_rss_mib()
    trainer.train()
    ends = clock.step_ends
    step_times = [ends[0] - clock.train_begin] + [b - a for a, b in zip(ends, ends[1:])]
    cpu = clock.cpu_ends
    step_cpu = [cpu[0] - clock.cpu_begin] + [b - a for a, b in zip(cpu, cpu[1:])]
    # TRL logs a running total of attention-mask tokens; its per-step differences are the batch sizes.
    totals = [int(log["num_tokens"]) for log in clock.logs if "num_tokens" in log]
    trl_tokens = [b - a for a, b in zip([0] + totals, totals)]
    return {
        "tool": "trl",
        "variant": args.variant,
        "versions": {"trl": trl.__version__},
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "sampler": getattr(config, "train_sampling_strategy", "random"),
        "optimizer": str(config.optim),
        "step_times_s": step_times,
        "step_cpu_s": step_cpu,
        "tokens": collated_tokens[: len(step_times)],
        "tokens_tool_reported": trl_tokens,
        "losses": [log["loss"] for log in clock.logs],
        "setup_s": setup_s,
        "rss_after_import_mib": rss_after_import,
        "rss_before_train_mib": rss_before_train,
    }


def fixed_trl(args) -> dict:
    import torch

    trainer, _ = _trl_trainer(args)
    features = [trainer.train_dataset[i] for i in range(args.batch_size)]
    batch = trainer.data_collator(features)
    # The same call the training step makes: SFTTrainer.compute_loss (its fused LM head, mean over tokens).
    inputs = trainer._prepare_inputs(dict(batch))
    with torch.no_grad():
        loss = float(trainer.compute_loss(trainer.model, inputs))
    return {"tool": "trl", "loss": loss, "reference_loss": reference_loss(args.model, batch),
            "ids_sha256": ids_digest(batch["input_ids"], batch["attention_mask"]),
            "real_tokens": int(batch["attention_mask"].sum()), "padded_shape": list(batch["input_ids"].shape)}


# --------------------------------------------------------------------------- posttrain


def _posttrain_config(args, out_dir: str):
    from posttrain.config import SFTConfig

    data = {"train_files": [args.data], "format": "text", "max_length": args.max_length, "eval_fraction": 0.0}
    train = {"batch_size": args.batch_size, "max_steps": args.steps, "lr": args.lr, "schedule": "constant",
             "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": args.seed,
             "progress_bar": False, "save_every": 0}
    if args.variant == "group_by_length":
        data["group_by_length"] = True
    return SFTConfig.from_dict({"output_dir": out_dir, "model": {"path": args.model}, "data": data, "train": train})


def train_posttrain(args) -> dict:
    import posttrain
    from posttrain.train import metrics as pt_metrics
    from posttrain.train.sft import run_sft

    rss_after_import = current_rss_mib()
    # Time steps exactly as on the TRL side: a clock read at the end of every optimizer step
    # (RunLogger.advance runs once per step, after the step's metrics are logged).
    step_ends: list[float] = []
    cpu_ends: list[float] = []
    original_advance = pt_metrics.RunLogger.advance

    def timed_advance(self, record):
        step_ends.append(time.perf_counter())
        cpu_ends.append(cpu_seconds())
        return original_advance(self, record)

    pt_metrics.RunLogger.advance = timed_advance
    run_dir = Path(args.workdir) / "posttrain_out"
    # A leftover run directory would make run_sft resume from its final checkpoint (resume=auto).
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = _posttrain_config(args, str(run_dir))
    t_start = time.perf_counter()
    run_sft(cfg)
    total_s = time.perf_counter() - t_start
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "loss" in r and "step_time_s" in r]
    own = [r["step_time_s"] for r in steps]
    # Step 1 has no previous step end: take posttrain's own figure for it (it is discarded anyway).
    step_times = [own[0]] + [b - a for a, b in zip(step_ends, step_ends[1:])]
    step_cpu = [float("nan")] + [b - a for a, b in zip(cpu_ends, cpu_ends[1:])]
    return {
        "tool": "posttrain",
        "variant": args.variant,
        "versions": {"posttrain": getattr(posttrain, "__version__", "?")},
        "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "sampler": "group_by_length" if cfg.data.group_by_length else "random",
        "optimizer": "torch.optim.AdamW (posttrain default)",
        "loss_impl": cfg.train.loss,
        "step_times_s": step_times,
        "step_times_tool_reported_s": own,
        "step_cpu_s": step_cpu,
        "tokens": [int(r["tokens"]) for r in steps],
        "losses": [r["loss"] for r in steps],
        "run_sft_total_s": total_s,
        "rss_after_import_mib": rss_after_import,
    }


def fixed_posttrain(args) -> dict:
    import torch
    from posttrain.data.batching import collate
    from posttrain.data.pipeline import prepare_sft_data
    from posttrain.models.loading import load_model, load_tokenizer
    from posttrain.train.sft import CausalLMLoss

    cfg = _posttrain_config(args, str(Path(args.workdir) / "posttrain_fixed"))
    tokenizer = load_tokenizer(cfg.model.path)
    model = load_model(cfg.model)
    data = prepare_sft_data(cfg.data, tokenizer, Path(cfg.output_dir), cfg.train.seed, log=lambda *_: None)
    batch = collate(data.train[: args.batch_size], tokenizer.pad_token_id)
    # The module the training loop calls (summed loss), divided the way the loop divides it.
    module = CausalLMLoss(model, cfg.train.loss, cfg.train.loss_chunk_size)
    with torch.no_grad():
        summed = float(module(**batch))
    label_tokens = float((batch["labels"][:, 1:] != -100).sum())
    return {"tool": "posttrain", "loss": summed / label_tokens, "loss_impl": module.loss_kind,
            "reference_loss": reference_loss(args.model, batch),
            "ids_sha256": ids_digest(batch["input_ids"], batch["attention_mask"]),
            "real_tokens": int(batch["attention_mask"].sum()), "padded_shape": list(batch["input_ids"].shape)}


# --------------------------------------------------------------------------- entry


def main() -> None:
    parser = argparse.ArgumentParser(description="one measured child run (see run_sft_bench.sh)")
    parser.add_argument("mode", choices=["train", "fixed"])
    parser.add_argument("--tool", choices=["trl", "posttrain"], required=True)
    parser.add_argument("--variant", default="default")
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    import torch

    runner = {("train", "trl"): train_trl, ("train", "posttrain"): train_posttrain,
              ("fixed", "trl"): fixed_trl, ("fixed", "posttrain"): fixed_posttrain}[(args.mode, args.tool)]
    load_before = os.getloadavg()[0]
    result = runner(args)
    result.update(
        loadavg_1min_before=load_before,
        loadavg_1min_after=os.getloadavg()[0],
        mode=args.mode,
        peak_rss_mib=peak_rss_mib(),
        torch_threads=torch.get_num_threads(),
        process_wall_s=time.perf_counter() - T_PROCESS_START,
        python=sys.version.split()[0],
    )
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, list)}))


if __name__ == "__main__":
    main()
