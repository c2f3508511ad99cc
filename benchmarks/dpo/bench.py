"""DPO and reward models, posttrain vs TRL: one child process per measured run.

    python benchmarks/dpo/bench.py --tool trl|posttrain --case dpo_full|dpo_lora|rm --variant V --out result.json ...

On CPU (the default) both tools train in float32. With --device cuda both train with fp32
weights under bf16 autocast (TRL's bf16=True, posttrain's train.mixed_precision=bf16), the
step clock synchronises the GPU before reading the time, and the peak GPU memory
(torch.cuda.max_memory_allocated over the whole process) is recorded as well.

Trains --steps optimizer steps and writes, as JSON: the wall and CPU time of every step
(end of step k-1 to end of step k, read by the same kind of hook for both tools), the
real (non-padding) tokens of every step's batch, the loss logged for every step, the time
spent precomputing reference log-probs (outside the steps), a digest of the first batch's
token ids, and the process's peak RSS.

Both tools see the same batches in the same order: posttrain shuffles its items with its
own seeded plan (`posttrain.data.batching.plan_batches`), so the TRL side writes its
dataset in that very order and reads it with `train_sampling_strategy="sequential"`. The
driver checks per-step token counts and the first batch's ids agree.

Run `benchmarks/run_dpo_bench.sh` rather than this file directly: it owns the venv and
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
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402  (a sibling script)
    StepClock, TensorMemory, clock_posttrain_steps, current_rss_mib, import_modules, peak_rss_mib,
    posttrain_step_records, process_facts, read_rows, trainer_hooks, write_result)
ON_CUDA = False  # set by main() from --device
TENSORS = TensorMemory()  # started by main() with --tensor-memory; inert otherwise

WHOLE_LAST_LAYER = "_whole_last_layer"  # posttrain variants: keep models.readout from trimming the last layer
VARIANTS = {
    # TRL: its defaults (gradient checkpointing on; reference = a second model for full
    # fine-tuning, the adapters switched off for LoRA), then the closer matches to posttrain.
    "trl": {"default": {}, "gc_off": {"gradient_checkpointing": False},
            "gc_off+precompute": {"gradient_checkpointing": False, "precompute_ref_log_probs": True}},
    # posttrain: its defaults (dpo.share_prompt / reward.share_prompt on: one row per prompt, the
    # prompt computed once), the live reference, and separate rows per response, as TRL lays them out.
    "posttrain": {"precompute": {"dpo.reference": "precompute"}, "live": {"dpo.reference": "live"},
                  "precompute+separate_rows": {"dpo.reference": "precompute", "dpo.share_prompt": "false"},
                  "default": {}, "separate_rows": {"reward.share_prompt": "false"},
                  "fused": {"train.optimizer": "adamw_fused"},
                  # gradient checkpointing on, as in TRL's default rows (the GPU table's memory rows)
                  "precompute+gc": {"dpo.reference": "precompute", "model.gradient_checkpointing": "true"},
                  "gc": {"model.gradient_checkpointing": "true"},
                  "gc+lean": {"model.gradient_checkpointing": "true", "model.lean_activations": "true"},
                  # posttrain's lean RMSNorm / SwiGLU forced off (the GPU default is on) or on (the
                  # CPU default, model.lean_activations=auto, is off)
                  "precompute+not_lean": {"dpo.reference": "precompute", "model.lean_activations": "false"},
                  "not_lean": {"model.lean_activations": "false"},
                  "precompute+lean": {"dpo.reference": "precompute", "model.lean_activations": "true"},
                  "lean": {"model.lean_activations": "true"},
                  # shared-prompt batches with their padding, as before model.padding_free
                  "precompute+padded": {"dpo.reference": "precompute", "model.padding_free": "false"},
                  "padded": {"model.padding_free": "false"},
                  "precompute+separate_rows+padded": {"dpo.reference": "precompute", "dpo.share_prompt": "false",
                                                      "model.padding_free": "false"},
                  "separate_rows+padded": {"reward.share_prompt": "false", "model.padding_free": "false"},
                  # padding-free batches with the last layer computed at every token (models/readout.py off;
                  # a switch of this harness, not a posttrain option)
                  "precompute+whole_last_layer": {"dpo.reference": "precompute", WHOLE_LAST_LAYER: "true"},
                  "whole_last_layer": {WHOLE_LAST_LAYER: "true"}},
}

# Everything each tool imports during a run, imported up front so that "RSS after imports"
# is the libraries' share of the peak for both tools alike (both import lazily; posttrain
# pulls in peft even for full fine-tuning, TRL also datasets). Nothing here is extra: a run
# imports all of it anyway.
IMPORTS = {
    "posttrain": ["posttrain.train.preference", "posttrain.train.reward", "posttrain.train.sft", "posttrain.train.loop",
                  "posttrain.data.preferences", "posttrain.models.loading", "posttrain.models.reward_model",
                  "posttrain.models.adapters", "accelerate", "peft", "safetensors.torch"],
    "trl": ["trl.trainer.dpo_trainer", "trl.trainer.reward_trainer", "datasets", "accelerate", "peft"],
}
COMMON_IMPORTS = ["transformers.models.llama.modeling_llama", "transformers.trainer_callback"]


def import_tool(tool: str) -> float:
    """Import the tool's whole run-time module set; returns the RSS afterwards (MiB)."""
    return import_modules(IMPORTS[tool] + COMMON_IMPORTS)


def step_clock() -> StepClock:
    """The step clock; on a GPU it synchronises before each reading (GPU work is asynchronous:
    the step ends when its kernels have)."""
    marks = {"on_start": lambda: TENSORS.mark("train_begin"), "on_tick": lambda: TENSORS.mark("step_end")}
    if ON_CUDA:
        import torch

        return StepClock(sync=torch.cuda.synchronize, **marks)
    return StepClock(**marks)


def pairs_digest(chosen: list[list[int]], rejected: list[list[int]]) -> str:
    """sha256 over the (chosen ids, rejected ids) of every pair in order, padding removed."""
    return hashlib.sha256(json.dumps([chosen, rejected]).encode()).hexdigest()


def unpadded(input_ids, attention_mask) -> list[list[int]]:
    return [[t for t, m in zip(ids, mask) if m] for ids, mask in zip(input_ids.tolist(), attention_mask.tolist())]


# --------------------------------------------------------------------------- TRL


def posttrain_order(n: int, batch_size: int, seed: int) -> list[int]:
    """The order in which posttrain's GroupedStage visits n items in epoch 0 (no length grouping)."""
    from posttrain.data.batching import plan_batches

    return [i for batch in plan_batches([0] * n, batch_size, seed=seed, epoch=0, shuffle=True, group_by_length=False)
            for i in batch]


def trl_dataset(args):
    from datasets import Dataset

    rows = read_rows(args.data)
    order = posttrain_order(len(rows), args.batch_size, args.seed)
    conversational = [{"prompt": [{"role": "user", "content": rows[i]["prompt"]}],
                       "chosen": [{"role": "assistant", "content": rows[i]["chosen"]}],
                       "rejected": [{"role": "assistant", "content": rows[i]["rejected"]}]} for i in order]
    return Dataset.from_list(conversational), order


def train_trl(args) -> dict:
    import torch
    import trl
    from transformers import AutoTokenizer

    rss_after_import = import_tool("trl")
    clock = step_clock()
    logged: list[dict] = []  # TRL's log records that carry a training loss

    t_setup = time.perf_counter()
    dataset, order = trl_dataset(args)
    extra = dict(VARIANTS["trl"][args.variant])
    common = dict(
        output_dir=str(Path(args.workdir) / "trl_out"), per_device_train_batch_size=args.batch_size,
        max_length=args.max_length, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, max_steps=args.steps, logging_steps=1, report_to="none",
        save_strategy="no", use_cpu=not ON_CUDA, bf16=ON_CUDA, fp16=False, seed=args.seed, data_seed=args.seed,
        disable_tqdm=True, train_sampling_strategy="sequential", dataloader_num_workers=0,
        model_init_kwargs={"dtype": "float32"},
    )
    precompute_s = None
    if args.case == "rm":
        from trl import RewardConfig, RewardTrainer

        tokenizer = AutoTokenizer.from_pretrained(args.rm_model)
        config = RewardConfig(**common, **extra)
        trainer = RewardTrainer(model=args.rm_model, args=config, train_dataset=dataset, processing_class=tokenizer,
                                callbacks=[trainer_hooks(clock, logged)])
    else:
        from trl import DPOConfig, DPOTrainer

        peft_config = None
        if args.case == "dpo_lora":
            from peft import LoraConfig

            peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                     task_type="CAUSAL_LM")
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        config = DPOConfig(**common, beta=0.1, loss_type=["sigmoid"], **extra)
        # Time TRL's reference pass (it runs inside the constructor when precompute_ref_log_probs=True).
        original = DPOTrainer._precompute_ref_logps
        spent = []

        def timed_precompute(self, *a, **k):
            t = time.perf_counter()
            try:
                return original(self, *a, **k)
            finally:
                spent.append(time.perf_counter() - t)

        DPOTrainer._precompute_ref_logps = timed_precompute
        trainer = DPOTrainer(model=args.model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=peft_config, callbacks=[trainer_hooks(clock, logged)])
        precompute_s = sum(spent) if spent else None

    # Count the real tokens of every batch the collator builds for training (the k-th call is step k's).
    inner = trainer.data_collator
    batches: list[dict] = []

    def counting_collator(features):
        batch = inner(features)
        info = {"tokens": int(batch["attention_mask"].sum()), "padded_len": batch["input_ids"].shape[1]}
        if not batches:  # only the first batch is hashed (as on the posttrain side)
            ids = unpadded(batch["input_ids"], batch["attention_mask"])
            half = len(ids) // 2  # TRL stacks [chosen..., rejected...]
            info["digest"] = pairs_digest(ids[:half], ids[half:])
            if "completion_mask" in batch:
                info["label_tokens"] = int(batch["completion_mask"].sum())
        batches.append(info)
        return batch

    trainer.data_collator = counting_collator
    setup_s = time.perf_counter() - t_setup
    rss_before_train = current_rss_mib()
    peak_before_train = peak_rss_mib()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    step_times, step_cpu = clock.step_times()
    return {
        "versions": {"trl": trl.__version__, "torch": torch.__version__},
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "precompute_ref_log_probs": bool(getattr(config, "precompute_ref_log_probs", False)),
        "reference": ("none (reward model)" if args.case == "rm" else
                      "precomputed" if getattr(config, "precompute_ref_log_probs", False) else
                      "adapters disabled" if args.case == "dpo_lora" else "second model loaded from the path"),
        "optimizer": str(config.optim),
        "trainable_params": trainable,
        "step_times_s": step_times,
        "step_cpu_s": step_cpu,
        "tokens": [b["tokens"] for b in batches[: len(step_times)]],
        "tokens_processed": [b["tokens"] for b in batches[: len(step_times)]],
        "padded_len": [b["padded_len"] for b in batches[: len(step_times)]],
        "first_batch_digest": batches[0]["digest"],
        "first_batch_label_tokens": batches[0].get("label_tokens"),
        "losses": [r["loss"] for r in logged],
        "grad_norms": [r.get("grad_norm") for r in logged],
        "logs_first_steps": logged[:2],
        "order_sha256": hashlib.sha256(json.dumps(order).encode()).hexdigest(),
        "precompute_s": precompute_s,
        "setup_s": setup_s,
        "rss_after_import_mib": rss_after_import,
        "rss_before_train_mib": rss_before_train,
        "peak_rss_before_train_mib": peak_before_train,
    }


# --------------------------------------------------------------------------- posttrain


def posttrain_overrides(args, run_dir: Path) -> list[str]:
    model = args.rm_model if args.case == "rm" else args.model
    out = [f"output_dir={run_dir}", f"model.path={model}", f"data.train_files=[{args.data}]", "data.eval_fraction=0",
           f"data.max_length={args.max_length}", f"train.max_steps={args.steps}", f"train.batch_size={args.batch_size}",
           f"train.lr={args.lr}", "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0",
           "train.max_grad_norm=1.0", f"train.seed={args.seed}", "train.progress_bar=false", "train.log_every=1",
           "train.resume=never", "train.save_every=0"] + (["train.mixed_precision=bf16"] if ON_CUDA else [])
    if args.case == "rm":
        out += ["reward.centering=0"]
    else:
        out += ["dpo.loss=dpo", "dpo.beta=0.1", "dpo.nll_weight=0"]
    if args.case == "dpo_lora":
        out += ["adapter.method=[lora]", "adapter.lora.r=8", "adapter.lora.alpha=16", "adapter.lora.dropout=0",
                "adapter.lora.target_modules=[all-linear]"]
    return out + [f"{k}={v}" for k, v in VARIANTS["posttrain"][args.variant].items() if k != WHOLE_LAST_LAYER]


def train_posttrain(args) -> dict:
    import torch

    import posttrain
    from posttrain.train import grouped

    rss_after_import = import_tool("posttrain")
    clock = step_clock()
    state = clock_posttrain_steps(clock)  # the same clock as on the TRL side (run_dpo / run_rm)
    batches: list[dict] = []
    original_collate = grouped.GroupedStage.collate

    def recording_collate(self, items):
        # Read from the items, not the collated batch: with dpo.share_prompt the batch holds
        # one row per prompt, while the data check needs each (prompt + response) sequence.
        batch = original_collate(self, items)
        info = {"tokens": sum(len(seq.input_ids) for item in items for seq in item.sequences)}
        if not batches:  # only the first batch is hashed (as on the TRL side)
            better = [0 if item.ranks[0] < item.ranks[1] else 1 for item in items]
            info["digest"] = pairs_digest([item.sequences[b].input_ids for item, b in zip(items, better)],
                                          [item.sequences[1 - b].input_ids for item, b in zip(items, better)])
            info["label_tokens"] = sum(t != -100 for item in items for seq in item.sequences for t in seq.labels)
        batches.append(info)
        return batch

    grouped.GroupedStage.collate = recording_collate
    if WHOLE_LAST_LAYER in VARIANTS["posttrain"][args.variant]:
        from posttrain.models import readout

        readout.trim_last_layer = lambda model, enabled=True: False
    precompute_s = None
    run_dir = Path(args.workdir) / "posttrain_out"
    shutil.rmtree(run_dir, ignore_errors=True)  # never reuse an earlier run's cached reference log-probs
    t_setup = time.perf_counter()
    if args.case == "rm":
        from posttrain.config import RMConfig
        from posttrain.train.reward import run_rm

        cfg = RMConfig.load(None, posttrain_overrides(args, run_dir))
        run_rm(cfg)
    else:
        from posttrain.config import DPOConfig
        from posttrain.train import preference

        spent = []
        original_pre = preference.precompute_reference

        def timed_precompute(*a, **k):
            t = time.perf_counter()
            try:
                return original_pre(*a, **k)
            finally:
                spent.append(time.perf_counter() - t)

        preference.precompute_reference = timed_precompute
        cfg = DPOConfig.load(None, posttrain_overrides(args, run_dir))
        preference.run_dpo(cfg)
        precompute_s = sum(spent) if spent else None
    total_s = time.perf_counter() - t_setup
    steps = posttrain_step_records(run_dir)
    step_times, step_cpu = clock.step_times()
    trainable = json.loads((run_dir / "params.json").read_text()) if (run_dir / "params.json").is_file() else None
    return {
        "versions": {"posttrain": getattr(posttrain, "__version__", "?"), "torch": torch.__version__},
        "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "reference": ("none (reward model)" if args.case == "rm" else
                      "precomputed" if cfg.dpo.reference == "precompute" else
                      "adapters disabled" if args.case == "dpo_lora" else "frozen in-memory copy"),
        "optimizer": "torch.optim.AdamW (posttrain default)",
        "params_json": trainable,
        "step_times_s": step_times,
        "step_times_tool_reported_s": [r["step_time_s"] for r in steps],
        "peak_mem_mb_tool_reported": [r.get("peak_mem_mb") for r in steps],
        "step_cpu_s": step_cpu,
        "tokens": [b["tokens"] for b in batches[: len(steps)]],
        "tokens_processed": [int(r["tokens"]) for r in steps],  # posttrain's own count: a shared prompt once
        "share_prompt": bool(getattr(getattr(cfg, "reward" if args.case == "rm" else "dpo", None), "share_prompt", False)),
        "first_batch_digest": batches[0]["digest"],
        "first_batch_label_tokens": batches[0]["label_tokens"],
        "losses": [r["loss"] for r in steps],
        "grad_norms": [r.get("grad_norm") for r in steps],
        "logs_first_steps": steps[:2],
        "order_sha256": hashlib.sha256(json.dumps(posttrain_order(len(read_rows(args.data)), args.batch_size,
                                                                  args.seed)).encode()).hexdigest(),
        "precompute_s": precompute_s,
        "run_total_s": total_s,
        "rss_after_import_mib": rss_after_import,
        "rss_before_train_mib": state.get("rss_before_train"),
        "peak_rss_before_train_mib": state.get("peak_before_train"),
    }


# --------------------------------------------------------------------------- reference


def reference_logps(args) -> dict:
    """Float64 log-probs of the first batch's responses, no tool code: plain chat-template ids,
    the model's own forward, log_softmax, sums over two label sets:

    assistant turn  the response and its <|im_end|> (what posttrain labels)
    completion      every token after the generation prompt, i.e. also the newline the
                    template writes after <|im_end|> (what TRL's DPOTrainer labels)
    Returned as means over the batch's pairs, the form both tools log as logps/chosen|rejected.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float64).eval()
    rows = read_rows(args.data)
    first = [rows[i] for i in posttrain_order(len(rows), args.batch_size, args.seed)[: args.batch_size]]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    sums = {(side, labels): 0.0 for side in ("chosen", "rejected") for labels in ("assistant_turn", "completion")}
    with torch.no_grad():
        for row in first:
            user = [{"role": "user", "content": row["prompt"]}]
            start = len(tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=True)["input_ids"])
            for side in ("chosen", "rejected"):
                ids = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": row[side]}],
                                                    tokenize=True)["input_ids"]
                logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
                token_logps = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
                stop = ids.index(end_of_turn, start) + 1  # through <|im_end|>
                sums[(side, "assistant_turn")] += float(token_logps[start - 1 : stop - 1].sum())
                sums[(side, "completion")] += float(token_logps[start - 1 :].sum())
    n = len(first)
    return {"pairs": n, **{f"logps/{side}[{labels}]": value / n for (side, labels), value in sums.items()}}


# --------------------------------------------------------------------------- entry


def main() -> None:
    parser = argparse.ArgumentParser(description="one measured child run (see run_dpo_bench.sh)")
    parser.add_argument("--tool", choices=["trl", "posttrain", "reference"], required=True,
                        help="reference: float64 log-probs of the first batch, no tool code (no training)")
    parser.add_argument("--case", choices=["dpo_full", "dpo_lora", "rm"], required=True)
    parser.add_argument("--variant", default="default")
    parser.add_argument("--model", required=True, help="causal LM directory (DPO)")
    parser.add_argument("--rm-model", required=True, help="sequence-classification start (reward model)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tensor-memory", action="store_true",
                        help="track the bytes of live CPU tensors from before the model loads to the end "
                             "(common.TensorMemory; slows the run: its times are not step times to report)")
    args = parser.parse_args()
    global ON_CUDA
    ON_CUDA = args.device == "cuda"
    if args.tool == "reference":
        Path(args.out).write_text(json.dumps(reference_logps(args), indent=1) + "\n")
        return
    if args.variant not in VARIANTS[args.tool]:
        raise SystemExit(f"unknown {args.tool} variant {args.variant!r}; choose from {sorted(VARIANTS[args.tool])}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)

    import torch

    load_before = os.getloadavg()[0]
    if args.tensor_memory:
        if ON_CUDA:
            raise SystemExit("--tensor-memory tracks CPU tensors; on a GPU peak_cuda_mib is the measure")
        TENSORS.start()
    result = (train_trl if args.tool == "trl" else train_posttrain)(args)
    result.update(tool=args.tool, case=args.case, variant=args.variant,
                  **process_facts(load_before, T_PROCESS_START), device=args.device)
    if args.tensor_memory:
        result.update(TENSORS.result())
    if ON_CUDA:
        result.update(peak_cuda_mib=torch.cuda.max_memory_allocated() / 2**20,
                      peak_cuda_reserved_mib=torch.cuda.max_memory_reserved() / 2**20,
                      gpu=torch.cuda.get_device_name())
    write_result(args.out, result)


if __name__ == "__main__":
    main()
