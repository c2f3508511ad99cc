"""Online RL, posttrain vs TRL: one child process per measured run.

    python benchmarks/rl/bench.py --tool trl|posttrain --case grpo|grpo_kl|rloo --variant V --out result.json ...

Trains --steps optimizer steps of GRPO or RLOO (`CASES`: TRL's `GRPOTrainer` / `RLOOTrainer`,
posttrain's `run_grpo` with `grpo.advantage=grpo` / `rloo`, which is what `posttrain rloo`
runs), each step one rollout of P prompts × G completions
sampled from the current policy (μ = 1, no gradient accumulation), on CPU in float32, and
writes as JSON, per step:

    step_times_s        wall time from the end of step k-1 to the end of step k, read by the
                        same kind of hook in both tools (see `StepClock`)
    generate_s          the generation call alone (see `Timers`): TRL's
                        `GRPOTrainer._generate_single_turn` / `RLOOTrainer._generate_single_turn`
                        (left-pad, `model.generate`, cut at EOS), posttrain's `rollout.generate.generate_token_ids` (left-pad,
                        prefill and KV-cache decode, cut at EOS)
    rollout_phase_s     the whole rollout phase, i.e. producing the step's training batch
                        from its prompts: TRL's `_prepare_inputs` (chat template, generation,
                        decode, reference log-probs, rewards, advantages, padding, splitting;
                        `RLOOTrainer` also runs a no-grad forward of the policy for the
                        rollout log-probs its sequence ratio needs, even at μ = 1, β = 0); on the posttrain side, the time spent inside
                        the stage's micro-batch generator (`GRPOStage.micro_batches_after`:
                        generation, decode, rewards, advantages, collation, reference
                        log-probs), which the loop draws from inside the step
    generated_tokens    completion tokens that call returned (EOS included where sampled)
    completions         completions that call returned
    prompts_sha256      a hash of the prompt token ids that call generated from, in order

plus the process's peak RSS, the RSS after imports, each tool's own logged metrics (loss,
KL, TRL's `step_time`, posttrain's `rollout/rollout_s`) and the top-level packages first
imported during the run (to show the up-front import list is complete).

Both tools see the same prompts in the same order: posttrain shuffles its prompts with its
own seeded order (`GRPOStage.micro_batches_after`: random.Random(f"posttrain-grpo-{seed}-0")),
so the TRL side writes its dataset in that very order and reads it with
`shuffle_dataset=False` (TRL's `RepeatSampler` then yields each prompt G times in a row,
as posttrain does). The driver compares `prompts_sha256` of every rollout across runs.

Run `benchmarks/run_rl_bench.sh` rather than this file directly: it owns the venv and the
interleaving of repeats. Nothing here is imported by posttrain.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

T_PROCESS_START = time.perf_counter()
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (  # noqa: E402  (a sibling script)
    StepClock, clock_posttrain_steps, current_rss_mib, import_modules, peak_rss_mib, posttrain_step_records,
    process_facts, read_rows, trainer_hooks, write_result)

# case -> algorithm and β (the KL coefficient); --beta overrides the β of a case whose β > 0.
# No rloo_kl: TRL's RLOOTrainer subtracts β·Σ_t (log π_old − log π_ref) from the reward,
# before the leave-one-out baseline, while posttrain adds β·KL to the per-token loss; no
# posttrain option moves the KL into the reward, so the two objectives cannot be matched.
CASES = {"grpo": {"algo": "grpo", "beta": 0.0}, "grpo_kl": {"algo": "grpo", "beta": 0.04},
         "rloo": {"algo": "rloo", "beta": 0.0}}  # room for "ppo" later
# TRL's trainer per algorithm, the config arguments that match it to posttrain's loss, and how to
# read the completion ids from its `_generate_single_turn` (GRPO's returns (ids, logprobs)).
TRL_ALGOS = {
    "grpo": {"trainer": "GRPOTrainer", "config": "GRPOConfig", "first_of_output": True,
             "kwargs": {"loss_type": "dapo", "scale_rewards": "group",
                        # TRL 1.16's default True weights the KL by the (value-1) ratio: another gradient
                        "use_bias_correction_kl": False}},
    # RLOO has one loss (sequence-level ratio, mean over sequences) and no KL options to set.
    "rloo": {"trainer": "RLOOTrainer", "config": "RLOOConfig", "first_of_output": False,
             "kwargs": {"normalize_advantages": False}},  # TRL's default; posttrain does not normalise
}
VARIANTS = {
    # TRL: its defaults (gradient checkpointing on), then the closer match to posttrain.
    "trl": {"default": {}, "gc_off": {"gradient_checkpointing": False}},
    # padded: the prompt + completion rows keep their padding (model.padding_free=false), the layout before it
    "posttrain": {"default": [], "padded": ["model.padding_free=false"]},
}
# Everything each tool imports during a run, imported up front so that "RSS after imports" is
# the libraries' share of the peak for both tools alike. The JSON lists what was imported
# after this anyway (`late_imports`), so the list can be checked.
IMPORTS = {
    "posttrain": ["posttrain.train.grpo", "posttrain.train.loop", "posttrain.train.sft", "posttrain.train.preference",
                  "posttrain.train.grouped", "posttrain.rollout.generate", "posttrain.data.prompts",
                  "posttrain.models.loading", "posttrain.rewards", "accelerate", "peft", "safetensors.torch"],
    "trl": ["datasets", "accelerate", "peft", "posttrain.rewards"],  # + the case's trainer module (import_tool)
}
COMMON_IMPORTS = ["transformers.models.llama.modeling_llama", "transformers.trainer_callback"]


def import_tool(tool: str, algo: str) -> float:
    """Import the tool's whole run-time module set for the algorithm; returns the RSS afterwards (MiB)."""
    return import_modules(IMPORTS[tool] + COMMON_IMPORTS + ([f"trl.trainer.{algo}_trainer"] if tool == "trl" else []))


def top_level_modules() -> set[str]:
    return {name.split(".")[0] for name in sys.modules}


def digest(prompt_ids) -> str:
    return hashlib.sha256(json.dumps([list(map(int, p)) for p in prompt_ids]).encode()).hexdigest()


class Timers:
    """Wraps a tool's generation call and its rollout phase with perf_counter timers; with
    μ = 1 and no accumulation every step samples exactly one rollout, so entry k is step k's."""

    def __init__(self):
        self.generate: list[dict] = []
        self.phase: list[float] = []

    def wrap_generate(self, fn, prompts_of, completions_of):
        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            spent = time.perf_counter() - t
            prompts, completions = prompts_of(a, k), completions_of(out)
            self.generate.append({"s": spent, "completions": len(completions),
                                  "tokens": sum(len(c) for c in completions),
                                  "prompts_sha256": digest(prompts),
                                  "lengths": [len(c) for c in completions]})
            return out

        return timed

    def wrap_phase(self, fn):
        @functools.wraps(fn)
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.phase.append(time.perf_counter() - t)

        return timed

    def wrap_batch_generator(self, fn):
        """The time spent inside each next() of the generator fn returns (one micro-batch per step here)."""
        @functools.wraps(fn)
        def timed(*a, **k):
            source = fn(*a, **k)
            while True:
                t = time.perf_counter()
                try:
                    item = next(source)
                except StopIteration:
                    return
                self.phase.append(time.perf_counter() - t)
                yield item

        return timed

    def per_step(self, steps: int, max_new_tokens: int) -> dict:
        g = self.generate[:steps]
        return {"generate_s": [x["s"] for x in g], "rollout_phase_s": self.phase[:steps],
                "generated_tokens": [x["tokens"] for x in g], "completions": [x["completions"] for x in g],
                "full_length_fraction": [sum(n == max_new_tokens for n in x["lengths"]) / max(1, len(x["lengths"]))
                                         for x in g],
                "prompts_sha256": [x["prompts_sha256"] for x in g]}


def prompt_order(n: int, seed: int) -> list[int]:
    """posttrain's epoch-0 prompt order (GRPOStage.micro_batches_after); the driver checks
    the TRL side really samples from the same prompt ids in the same order."""
    order = list(range(n))
    random.Random(f"posttrain-grpo-{seed}-0").shuffle(order)
    return order


# --------------------------------------------------------------------------- TRL


def exact_match_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """TRL reward function around posttrain's own `rewards.exact_match`: the same verifier on both sides."""
    from posttrain.rewards import exact_match

    return [exact_match(p, c[-1]["content"] if isinstance(c, list) else c, {"answer": a})
            for p, c, a in zip(prompts, completions, answer)]


def trl_classes(algo: str):
    """(trainer class, config class, config kwargs matching posttrain) of TRL for the algorithm."""
    import trl

    spec = TRL_ALGOS[algo]
    return getattr(trl, spec["trainer"]), getattr(trl, spec["config"]), spec["kwargs"]


def train_trl(args) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer

    rss_after_import = import_tool("trl", args.algo)
    modules_before = top_level_modules()
    clock, timers = StepClock(), Timers()
    logged: list[dict] = []  # TRL's log records that carry a training loss
    Trainer, Config, matched = trl_classes(args.algo)

    # GRPO: _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations) -> (ids, logprobs);
    # RLOO: _generate_single_turn(self, prompt_ids, images, multimodal_fields) -> ids
    Trainer._generate_single_turn = timers.wrap_generate(
        Trainer._generate_single_turn, lambda a, k: a[1] if len(a) > 1 else k["prompt_ids"],
        (lambda out: out[0]) if TRL_ALGOS[args.algo]["first_of_output"] else (lambda out: out))
    Trainer._prepare_inputs = timers.wrap_phase(Trainer._prepare_inputs)  # once per step: no accumulation

    t_setup = time.perf_counter()
    rows = read_rows(args.data)
    order = prompt_order(len(rows), args.seed)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": rows[i]["prompt"]}],
                                  "answer": rows[i]["answer"]} for i in order])
    batch = args.prompts_per_step * args.num_generations
    config = Config(
        output_dir=str(Path(args.workdir) / "trl_out"), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=args.num_generations,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        beta=args.beta, num_iterations=1, epsilon=0.2, **matched,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        max_steps=args.steps, logging_steps=1, report_to="none", save_strategy="no", use_cpu=True, bf16=False,
        fp16=False, seed=args.seed, data_seed=args.seed, disable_tqdm=True, shuffle_dataset=False,
        dataloader_num_workers=0, log_completions=False, model_init_kwargs={"dtype": "float32"},
        **VARIANTS["trl"][args.variant])
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    trainer = Trainer(model=args.model, reward_funcs=exact_match_reward, args=config, train_dataset=dataset,
                      processing_class=tokenizer, callbacks=[trainer_hooks(clock, logged)])
    setup_s = time.perf_counter() - t_setup
    rss_before_train, peak_before_train = current_rss_mib(), peak_rss_mib()
    trainer.train()
    step_times, step_cpu = clock.step_times()
    return {
        "versions": {"trl": trl.__version__, "torch": torch.__version__}, "trainer": type(trainer).__name__,
        "gradient_checkpointing": bool(config.gradient_checkpointing),
        "reference": ("none (β = 0)" if args.beta == 0 else
                      "second model loaded from the path" if trainer.ref_model is not None else "adapters disabled"),
        "optimizer": str(config.optim),
        "generation_batch_size": config.generation_batch_size,
        "step_times_s": step_times, "step_cpu_s": step_cpu,
        **timers.per_step(len(step_times), args.max_new_tokens),
        "losses": [r["loss"] for r in logged],
        "kl": [r.get("kl") for r in logged],
        "tool_step_time_s": [r.get("step_time") for r in logged],
        "tool_mean_length": [r.get("completions/mean_length") for r in logged],
        "rewards": [r.get("reward") for r in logged],
        "logs_first_steps": logged[:2],
        "setup_s": setup_s,
        "rss_after_import_mib": rss_after_import,
        "rss_before_train_mib": rss_before_train, "peak_rss_before_train_mib": peak_before_train,
        "late_imports": sorted(top_level_modules() - modules_before),
    }


# --------------------------------------------------------------------------- posttrain


def posttrain_overrides(args, run_dir: Path) -> list[str]:
    batch = args.prompts_per_step * args.num_generations
    return [f"output_dir={run_dir}", f"model.path={args.model}", f"data.train_files=[{args.data}]",
            "data.format=prompt", "data.eval_fraction=0", f"rollout.num_generations={args.num_generations}",
            f"rollout.max_new_tokens={args.max_new_tokens}", f"rollout.temperature={args.temperature}",
            "rollout.top_p=1.0", "rollout.top_k=0", f"rollout.batch_size={batch}",
            "reward.functions=[exact_match=posttrain.rewards:exact_match]", f"grpo.beta={args.beta}",
            f"grpo.advantage={args.algo}", "grpo.scale_rewards=true", "grpo.kl_estimator=k3", "grpo.clip_eps=0.2",
            "grpo.aggregation=token", "grpo.updates_per_rollout=1", "eval.prompts=0", "eval.sample_every=0",
            f"train.max_steps={args.steps}", f"train.batch_size={batch}", "train.grad_accum=1", f"train.lr={args.lr}",
            "train.schedule=constant", "train.warmup_steps=0", "train.weight_decay=0", "train.max_grad_norm=1.0",
            f"train.seed={args.seed}", "train.progress_bar=false", "train.log_every=1", "train.resume=never",
            "train.save_every=0", *VARIANTS["posttrain"][args.variant]]


def train_posttrain(args) -> dict:
    import torch

    import posttrain
    from posttrain.config import GRPOConfig
    from posttrain.rollout import generate as pt_generate
    from posttrain.train import grpo

    rss_after_import = import_tool("posttrain", args.algo)
    modules_before = top_level_modules()
    clock, timers = StepClock(), Timers()
    # The same clock as on the TRL side (run_grpo). The rollout is sampled inside the step
    # (the loop's micro-batch generator), as TRL samples inside training_step.
    state = clock_posttrain_steps(clock)
    # generate_token_ids(model, prompt_ids, settings, ...) -> completion ids; _rollout imports it at call time.
    pt_generate.generate_token_ids = timers.wrap_generate(
        pt_generate.generate_token_ids, lambda a, k: a[1] if len(a) > 1 else k["prompt_ids"], lambda out: out)
    grpo.GRPOStage.micro_batches_after = timers.wrap_batch_generator(grpo.GRPOStage.micro_batches_after)

    run_dir = Path(args.workdir) / "posttrain_out"
    shutil.rmtree(run_dir, ignore_errors=True)
    t_total = time.perf_counter()
    cfg = GRPOConfig.load(None, posttrain_overrides(args, run_dir))
    grpo.run_grpo(cfg)
    total_s = time.perf_counter() - t_total
    steps = posttrain_step_records(run_dir)
    step_times, step_cpu = clock.step_times()
    return {
        "versions": {"posttrain": getattr(posttrain, "__version__", "?"), "torch": torch.__version__},
        "gradient_checkpointing": bool(cfg.model.gradient_checkpointing),
        "reference": "none (β = 0)" if args.beta == 0 else "frozen in-memory copy",
        "optimizer": "torch.optim.AdamW (posttrain default)",
        "generation_batch_size": cfg.rollout.batch_size,
        "step_times_s": step_times, "step_cpu_s": step_cpu,
        **timers.per_step(len(step_times), args.max_new_tokens),
        "losses": [r["loss"] for r in steps],
        "kl": [r.get("kl") for r in steps],
        "tool_step_time_s": [r["step_time_s"] for r in steps],
        "tool_rollout_s": [r.get("rollout/rollout_s") for r in steps],
        "tool_mean_length": [r.get("rollout/response_tokens_mean") for r in steps],
        "rewards": [r.get("rollout/reward_mean") for r in steps],
        "peak_mem_mb_tool_reported": [r.get("peak_mem_mb") for r in steps],
        "logs_first_steps": steps[:2],
        "run_total_s": total_s,
        "rss_after_import_mib": rss_after_import,
        "rss_before_train_mib": state.get("rss_before_train"),
        "peak_rss_before_train_mib": state.get("peak_before_train"),
        "late_imports": sorted(top_level_modules() - modules_before),
    }


# --------------------------------------------------------------------------- same batch: parity and cost breakdown


def fixed_batch(args, tokenizer):
    """The P × G (prompt, completion) pairs of `same_batch`, and the seeded generator that drew
    them (the caller draws its advantages or rewards from it next)."""
    import torch

    rows = read_rows(args.data)
    first = [rows[i] for i in prompt_order(len(rows), args.seed)[: args.prompts_per_step]]
    turns = [[{"role": "user", "content": r["prompt"]}] for r in first]
    prompts = [tokenizer.apply_chat_template(t, add_generation_prompt=True, tokenize=True)["input_ids"] for t in turns]
    prompt_ids = [p for p in prompts for _ in range(args.num_generations)]
    g = torch.Generator().manual_seed(args.seed + 1)
    eos, T = tokenizer.eos_token_id, args.max_new_tokens
    lengths = torch.randint(1, T + 1, (len(prompt_ids),), generator=g).tolist()
    completions = []
    for length in lengths:
        ids = torch.randint(4, len(tokenizer), (length,), generator=g).tolist()  # ids 0-3 are the special tokens
        completions.append(ids[:-1] + [eos] if length < T else ids)
    return first, turns, prompt_ids, completions, g


def perturbed(model, seed: int):
    """The model's weights moved off the reference by the same seeded noise in both tools."""
    import torch

    noise = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=noise))
    return model.train()


def grad_agreement(names, ours, theirs, scale: float = 1.0) -> dict:
    """posttrain's gradients (× scale) against TRL's, parameter by parameter."""
    import torch

    pairs = [(scale * a, b) for a, b in zip(ours, theirs)]
    flat_a, flat_b = (torch.cat([x.flatten().double() for x in xs]) for xs in zip(*pairs))
    return {"grad_scale": scale,
            "grad_max_abs_diff": max(float((a - b).abs().max()) for a, b in pairs),
            "grad_rel_diff": float((flat_a - flat_b).norm() / flat_b.norm()),
            "grad_cosine": float(torch.nn.functional.cosine_similarity(flat_a, flat_b, dim=0)),
            "worst_param": max(zip(names, pairs), key=lambda x: float((x[1][0] - x[1][1]).abs().max()))[0]}


def same_batch(args) -> dict:
    """Both tools on ONE fixed batch, in one process, one thread: loss parity, then (GRPO only)
    where the time goes. Nothing here is part of the timed runs.

    The measured runs sample with different random streams, so their losses cannot be
    compared. Here both tools get the same P × G (prompt, completion) pairs: the first P
    prompts in the run's order, templated as TRL templates them; completions of random
    tokens with random lengths 1..max_new_tokens (the shorter ones ending in EOS, so padding
    and masking are exercised); and a policy whose weights are moved off the reference by
    the same seeded noise, so the KL term and its gradient are not zero. Then per algorithm:

    GRPO (`grpo_same_batch`): the same advantages (standard normal, seeded) and β = --beta.
    Each tool computes the reference log-probs, the loss and its gradient with its own code:
    TRL's `GRPOTrainer._get_per_token_logps_and_entropies` and `_compute_loss` (loss_type
    "dapo"), posttrain's `completion_logps` and `GroupPolicyLoss` divided by the response
    tokens, as its loop does for token aggregation. TRL runs with
    `use_bias_correction_kl=False` (posttrain's KL gradient) and, for information, with its
    default True.

    RLOO (`rloo_same_batch`, β = 0): the same rewards (standard normal, seeded). TRL's side
    runs its whole `RLOOTrainer._generate_and_score_completions` (chat template, rollout
    log-probs, leave-one-out advantages) with the fixed completions handed in for its
    generation call and the fixed rewards as its reward function, then its `_compute_loss`;
    posttrain's side computes `rloo_advantages` and `GroupPolicyLoss` as its loop does, with
    token and, for information, sequence aggregation. See `rloo_same_batch` for what is
    expected to agree."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import GRPOLossConfig
    from posttrain.train.grpo import GroupPolicyLoss
    from posttrain.train.rollouts import collate_completions

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    first, turns, prompt_ids, completions, g = fixed_batch(args, tokenizer)
    policy = perturbed(AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32), args.seed)
    batch = collate_completions(prompt_ids, completions, tokenizer.pad_token_id)
    fixed = {"tokenizer": tokenizer, "first": first, "turns": turns, "prompt_ids": prompt_ids,
             "completions": completions, "g": g, "policy": policy, "batch": batch,
             "loss": lambda aggregation: GroupPolicyLoss(policy, GRPOLossConfig(
                 advantage=args.algo, beta=args.beta, aggregation=aggregation))}
    out = {"algo": args.algo, "pairs": len(prompt_ids), "beta": args.beta,
           "response_tokens": sum(map(len, completions))}
    out.update((rloo_same_batch if args.algo == "rloo" else grpo_same_batch)(args, **fixed))
    return out


def trl_same_batch_config(args, n: int, **kwargs):
    """TRL's config for the fixed batch: the timed runs' matched settings, one batch of n, no checkpointing."""
    _, Config, matched = trl_classes(args.algo)
    return Config(output_dir=str(Path(args.workdir) / "trl_same_batch"), per_device_train_batch_size=n,
                  num_generations=args.num_generations, max_completion_length=args.max_new_tokens,
                  temperature=args.temperature, top_p=1.0, top_k=0, beta=args.beta, epsilon=0.2,
                  **{**matched, **kwargs}, use_cpu=True, bf16=False, report_to="none", gradient_checkpointing=False,
                  learning_rate=args.lr, model_init_kwargs={"dtype": "float32"}, disable_tqdm=True)


def rloo_same_batch(args, tokenizer, first, turns, prompt_ids, completions, g, policy, batch, loss) -> dict:
    """RLOO parity on the fixed batch (see `same_batch`). What agrees and what cannot, by definition:

    - advantages: posttrain's `rloo_advantages` and TRL's leave-one-out baseline (β = 0, no
      normalisation) are the same formula, so they must agree to float precision;
    - gradient: TRL's loss is a sequence-level ratio exp(Σ_t log π − Σ_t log π_old), clipped,
      −min(ρA, clip(ρ)A) averaged over sequences; posttrain's is the per-token ratio, summed
      over tokens, divided by the response tokens (token aggregation). At μ = 1 every ratio is
      1 in value and its gradient is ∇(Σ_t log π) either way, so TRL's gradient is
      −(1/B) Σ_i A_i Σ_t ∇log π_it and posttrain's is the same × B / tokens: the same
      direction, scaled by the batch's 1 / mean completion length. posttrain's gradient ×
      tokens / B must equal TRL's. Sequence aggregation (mean over each completion's tokens
      first) weighs completion i by 1/L_i: another direction, reported for information;
    - loss value: TRL's is −mean_i A_i, which is 0 for leave-one-out advantages (they sum to
      zero within each group); posttrain's is −Σ_i A_i L_i / tokens. Neither is compared; each
      is checked against its closed form instead."""
    import torch

    from posttrain.losses.policy_gradient import rloo_advantages

    n = len(prompt_ids)
    rewards = torch.randn(n, generator=g)
    advantages = rloo_advantages(rewards, args.num_generations)
    tokens = batch["response_mask"].sum()
    lengths = torch.tensor([len(c) for c in completions], dtype=torch.float32)
    names = [name for name, _ in policy.named_parameters()]
    posttrain = {}
    for aggregation, weight in (("token", tokens), ("sequence", n)):  # the loop's divisor for each aggregation
        policy.zero_grad(set_to_none=True)
        loss_sum, _ = loss(aggregation)(advantages=advantages, **batch)
        (loss_sum / weight).backward()
        posttrain[aggregation] = (float(loss_sum.detach() / weight), [p.grad.clone() for p in policy.parameters()])

    handed = {}

    def fixed_rewards(completion_ids, **kwargs) -> list[float]:
        handed["completion_ids"] = completion_ids
        return rewards.tolist()

    def fixed_completions(prompt_ids_seen, images, multimodal_fields):
        handed["prompt_ids"] = prompt_ids_seen
        return [list(c) for c in completions]

    from datasets import Dataset

    Trainer, _, _ = trl_classes(args.algo)
    dataset = Dataset.from_list([{"prompt": t, "answer": r["answer"]} for t, r in zip(turns, first)])
    trainer = Trainer(model=args.model, reward_funcs=fixed_rewards, args=trl_same_batch_config(args, n),
                      train_dataset=dataset, processing_class=tokenizer)
    perturbed(trainer.model, args.seed)
    trainer._generate_single_turn = fixed_completions  # the instance's generation call: hand in the fixed batch
    inputs = trainer._generate_and_score_completions(
        [{"prompt": t, "answer": r["answer"]} for t, r in zip(turns, first) for _ in range(args.num_generations)])
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    trl_loss.backward()
    trl_grads = [p.grad for p in trainer.model.parameters()]
    return {
        "same_inputs": handed["prompt_ids"] == prompt_ids and list(map(list, handed["completion_ids"])) == completions,
        "advantages_max_abs_diff": float((inputs["advantages"] - advantages).abs().max()),
        "posttrain_loss": posttrain["token"][0], "posttrain_loss_closed_form": float(-(advantages * lengths).sum() / tokens),
        "posttrain_sequence_loss": posttrain["sequence"][0],
        "trl": {"loss": float(trl_loss.detach()), "loss_closed_form": float(-inputs["advantages"].mean()),
                **grad_agreement(names, posttrain["token"][1], trl_grads, float(tokens) / n)},
        "trl_vs_sequence_aggregation": grad_agreement(names, posttrain["sequence"][1], trl_grads),
    }


def grpo_same_batch(args, tokenizer, first, turns, prompt_ids, completions, g, policy, batch, loss) -> dict:
    """GRPO parity on the fixed batch, then the cost breakdown (see `same_batch`)."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM

    from posttrain.config import TrainConfig
    from posttrain.rollout.generate import eos_token_ids, generate_token_ids
    from posttrain.rollout.sampling import SamplingSettings
    from posttrain.train.optim import make_optimizer, param_groups
    from posttrain.train.rollouts import completion_logps

    advantages = torch.randn(len(prompt_ids), generator=g)
    reference = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    module = loss("token")
    with torch.no_grad():
        pt_ref = completion_logps(reference, batch) if args.beta > 0 else None

    def pt_loss_fn():
        loss_sum, _ = module(advantages=advantages, ref_logps=pt_ref, **batch)
        return loss_sum / batch["response_mask"].sum()

    pt_loss = pt_loss_fn()
    pt_loss.backward()
    # TRL's batch layout: left-padded prompts, right-padded completions
    pad, n, T = tokenizer.pad_token_id, len(prompt_ids), args.max_new_tokens
    width = max(map(len, prompt_ids))
    p_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompt_ids])
    p_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])
    c_ids = torch.tensor([c + [pad] * (T - len(c)) for c in completions])
    c_mask = torch.tensor([[1] * len(c) + [0] * (T - len(c)) for c in completions])
    names = [name for name, _ in policy.named_parameters()]
    out = {"posttrain_loss": float(pt_loss.detach())}
    trainers = {}
    Trainer, _, _ = trl_classes(args.algo)
    for correction in (False, True):
        dataset = Dataset.from_list([{"prompt": t, "answer": r["answer"]} for t, r in zip(turns, first)])
        trainer = Trainer(model=args.model, reward_funcs=exact_match_reward, train_dataset=dataset,
                          args=trl_same_batch_config(args, n, use_bias_correction_kl=correction),
                          processing_class=tokenizer)
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(); the loss normaliser reads it
        perturbed(trainer.model, args.seed)
        trl_ref = None
        if args.beta > 0:
            with torch.no_grad():
                trl_ref, _, _ = trainer._get_per_token_logps_and_entropies(
                    trainer.ref_model, torch.cat([p_ids, c_ids], 1), torch.cat([p_mask, c_mask], 1), T, batch_size=n)
        inputs = {"prompt_ids": p_ids, "prompt_mask": p_mask, "completion_ids": c_ids, "completion_mask": c_mask,
                  "advantages": advantages, "old_per_token_logps": None, "ref_per_token_logps": trl_ref,
                  "num_items_in_batch": c_mask.sum()}
        trl_loss = trainer._compute_loss(trainer.model, inputs)
        trl_loss.backward()
        out["trl_bias_corrected_kl" if correction else "trl"] = {
            "use_bias_correction_kl": correction, "loss": float(trl_loss.detach()),
            "loss_abs_diff": abs(float(pt_loss.detach()) - float(trl_loss.detach())),
            "ref_logps_max_abs_diff": (None if trl_ref is None else
                                       float((pt_ref[c_mask.bool()] - trl_ref[c_mask.bool()]).abs().max())),
            **grad_agreement(names, [p.grad for p in policy.parameters()],
                             [p.grad for p in trainer.model.parameters()])}
        trainers[correction] = (trainer, inputs)
        if args.beta == 0:
            break  # no KL term: the correction changes nothing
    out["breakdown"] = breakdown(args, policy, module, pt_loss_fn, prompt_ids, trainers[False], tokenizer,
                                 generate_token_ids, eos_token_ids, SamplingSettings, make_optimizer, param_groups,
                                 TrainConfig)
    return out


def breakdown(args, policy, module, pt_loss_fn, prompt_ids, trl, tokenizer, generate_token_ids, eos_token_ids,
              SamplingSettings, make_optimizer, param_groups, TrainConfig) -> dict:
    """CPU time (one thread) and aten-op counts of each piece, both tools on the same inputs; see `same_batch`."""
    import statistics

    import torch
    from torch.profiler import ProfilerActivity, profile

    trainer, inputs = trl
    trl_model = trainer.model
    eos = eos_token_ids(policy, tokenizer)
    settings = SamplingSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    generated = {}

    def pt_generate():
        generated["posttrain"] = generate_token_ids(policy, prompt_ids, settings, pad_token_id=tokenizer.pad_token_id,
                                                    eos_token_ids=eos, batch_size=len(prompt_ids))

    unique = prompt_ids[:: args.num_generations]  # TRL's sampler hands over every prompt G times, as here

    def trl_generate():
        generated["trl"], _ = trainer._generate_single_turn([p for p in unique for _ in range(args.num_generations)],
                                                             None, {}, args.num_generations)

    def fwd_bwd(loss_fn, model):
        def run():
            model.zero_grad(set_to_none=True)
            loss_fn().backward()
        return run

    pt_update = fwd_bwd(pt_loss_fn, policy)
    trl_update = fwd_bwd(lambda: trainer._compute_loss(trl_model, inputs), trl_model)
    pt_update(), trl_update()  # gradients for the optimizers below
    optimizers = {"posttrain": make_optimizer(policy, TrainConfig(lr=args.lr)),
                  "trl": trainer.create_optimizer(),
                  "posttrain_groups_fused": torch.optim.AdamW(
                      [{k: v for k, v in group.items() if k != "names"}
                       for group in param_groups(policy, args.lr, 0.0, 1.0)], lr=args.lr, fused=True)}
    pieces = {"generation": {"posttrain": pt_generate, "trl": trl_generate},
              "forward_backward": {"posttrain": pt_update, "trl": trl_update},
              "optimizer_step": {name: opt.step for name, opt in optimizers.items()}}
    out = {"threads": torch.get_num_threads(), "reps": args.breakdown_reps}
    for piece, fns in pieces.items():
        cpu = {name: [] for name in fns}
        for rep in range(args.breakdown_reps + 1):  # the first round is warm-up
            for name, fn in fns.items():
                t = time.process_time()
                fn()
                if rep:
                    cpu[name].append(time.process_time() - t)
        ops = {}
        for name, fn in fns.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            ops[name] = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
        out[piece] = {name: {"cpu_ms_median": 1000 * statistics.median(v), "cpu_ms": [1000 * x for x in v],
                             "aten_ops": ops[name]} for name, v in cpu.items()}
    out["generation"]["posttrain"]["tokens"] = sum(map(len, generated["posttrain"]))
    out["generation"]["trl"]["tokens"] = sum(map(len, generated["trl"]))
    out["optimizer_implementations"] = {
        name: ("fused" if opt.defaults.get("fused") else "foreach" if opt.defaults.get("foreach") else
               "for-loop (torch's CPU default)") for name, opt in optimizers.items()}
    return out


# --------------------------------------------------------------------------- entry


def main() -> None:
    parser = argparse.ArgumentParser(description="one measured child run (see run_rl_bench.sh)")
    parser.add_argument("--tool", choices=["trl", "posttrain", "same_batch"], required=True,
                        help="same_batch: both tools' loss and gradient on one fixed batch, then a one-thread cost "
                             "breakdown of each piece (no training; not part of the timed runs)")
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    parser.add_argument("--variant", default="default")
    parser.add_argument("--model", required=True, help="causal LM directory")
    parser.add_argument("--data", required=True, help='prompts.jsonl: {"prompt", "answer"} rows')
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=None, help="KL coefficient of the cases with β > 0 (grpo_kl: 0.04)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--breakdown-reps", type=int, default=5, help="same_batch: timed repeats of each piece")
    args = parser.parse_args()
    args.algo = CASES[args.case]["algo"]
    args.beta = CASES[args.case]["beta"] if args.beta is None or CASES[args.case]["beta"] == 0 else args.beta
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.tool == "same_batch":
        Path(args.out).write_text(json.dumps(same_batch(args), indent=1) + "\n")
        return
    if args.variant not in VARIANTS[args.tool]:
        raise SystemExit(f"unknown {args.tool} variant {args.variant!r}; choose from {sorted(VARIANTS[args.tool])}")

    import torch  # noqa: F401  (loaded before the first load-average reading, as the DPO and SFT children do)

    load_before = os.getloadavg()[0]
    result = (train_trl if args.tool == "trl" else train_posttrain)(args)
    result.update(tool=args.tool, case=args.case, variant=args.variant, beta=args.beta,
                  **process_facts(load_before, T_PROCESS_START))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
