"""Group-relative policy optimisation — GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

Every optimizer step starts from a rollout: P prompts, G completions sampled for each by
the policy being trained, a reward per completion, and an advantage per completion relative
to the other G−1 samples of its prompt (`losses.policy_gradient.group_advantages` or
`rloo_advantages`). The step then minimises PPO's clipped surrogate on those completions'
tokens, plus β·KL(π‖π_ref) per token when β > 0. With `grpo.updates_per_rollout` = μ > 1 the
same rollout feeds μ steps and the ratio to the rollout-time policy is clipped; with μ = 1
(the default) the ratio is exactly 1 and the loss is the plain policy gradient.

How it fits THE loop: `micro_batches(epoch)` is a generator that samples a rollout from the
current weights whenever it needs one, so the loop's accumulation, clipping, checkpoints
and logging apply unchanged. A step's micro-batches are one rollout (train.batch_size ×
grad_accum × processes completions = that / G prompts). Resume skips whole rollouts without
generating them, and sampling is seeded per (seed, epoch, rollout), so a resumed run samples
what the uninterrupted one did.

The reference policy (β > 0 only) is the starting model: adapters switched off, or a frozen
copy for full fine-tuning (`preference.reference_weights`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from posttrain.config import GRPOConfig, GRPOLossConfig, validate_grpo
from posttrain.data.prompts import PromptRecord
from posttrain.losses import policy_gradient as pg

# --------------------------------------------------------------------------- batches of completions


def collate_completions(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int) -> dict:
    """Right-padded prompt + completion rows, and where each completion token is predicted:
    predictor (N,) flat index into the (B·L) hidden states, targets (N,), and its (row, col)
    in the (B, T) grid of completion tokens whose mask is `response_mask`."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    length, width = max(map(len, rows)), max(map(len, completion_ids))
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    predictor, targets, token_row, token_col = [], [], [], []
    for b, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        input_ids[b, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[b, : len(p) + len(c)] = 1
        for j, token in enumerate(c):
            predictor.append(b * length + len(p) + j - 1)  # the hidden state before the token predicts it
            targets.append(token)
            token_row.append(b)
            token_col.append(j)
    response_mask = torch.zeros((len(rows), width))
    response_mask[token_row, token_col] = 1.0
    return {"input_ids": input_ids, "attention_mask": attention_mask, "predictor": torch.tensor(predictor),
            "targets": torch.tensor(targets), "token_row": torch.tensor(token_row), "token_col": torch.tensor(token_col),
            "response_mask": response_mask}


def completion_logps(model, batch: dict, chunk_size: int = 256) -> torch.Tensor:
    """log π(token) of every completion token, laid out (B, T) like `response_mask` (0 on padding)."""
    from posttrain.train.preference import selected_token_logps

    inputs = {"input_ids": batch["input_ids"], "attention_mask": None}  # right padding: causality hides the tail
    flat = selected_token_logps(model, inputs, batch["predictor"], batch["targets"], chunk_size)
    grid = flat.new_zeros(batch["response_mask"].shape)
    return grid.index_put((batch["token_row"], batch["token_col"]), flat)


# --------------------------------------------------------------------------- the loss


class GroupPolicyLoss(torch.nn.Module):
    """forward(batch) → (summed clipped-surrogate (+ β·KL) loss, summed metrics), normalised
    by the loop with the batch's weight: response tokens (token aggregation) or responses."""

    def __init__(self, model: torch.nn.Module, cfg: GRPOLossConfig, chunk_size: int = 256):
        super().__init__()
        self.model, self.cfg, self.chunk_size = model, cfg, chunk_size

    def _sum(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The aggregation's numerator: Σ tokens, or Σ_b of each response's token mean."""
        if self.cfg.aggregation == "token":
            return (per_token * mask).sum()
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()

    def forward(self, advantages, old_logps=None, ref_logps=None, **batch):
        mask = batch["response_mask"]
        logps = completion_logps(self.model, batch, self.chunk_size)
        old = logps.detach() if old_logps is None else old_logps  # μ = 1: the rollout policy is this one
        per_token, clip_metrics = pg.clipped_policy_loss(logps, old, advantages[:, None], mask, self.cfg.clip_eps)
        metrics = {"clip_fraction": clip_metrics["clip_fraction"] * self._sum(torch.ones_like(mask), mask)}
        if self.cfg.beta > 0:
            kl = pg.KL_ESTIMATORS[self.cfg.kl_estimator](logps, ref_logps)
            per_token = per_token + self.cfg.beta * kl * mask
            metrics["kl"] = self._sum(kl.detach(), mask)
        return self._sum(per_token, mask), metrics


# --------------------------------------------------------------------------- rollouts


@dataclass
class RolloutStats:
    reward_mean: float
    reward_std: float
    response_tokens_mean: float
    ended_fraction: float
    rollout_s: float
    reward_s: float
    rollout_tokens_per_s: float
    solved_groups: float  # fraction of prompts whose G samples all got the same reward (no signal)


class GRPOStage:
    """The loop's Stage: rollouts sampled on demand, group advantages, clipped-surrogate batches."""

    def __init__(self, module: GroupPolicyLoss, prompts: list[list[int]], records: list[PromptRecord], cfg: GRPOConfig,
                 tokenizer, score: Callable, run_dir: Path | None, autocast=contextlib.nullcontext,
                 adapter_training=None, frozen_reference=None, world: int = 1):
        self.module, self.prompts, self.records, self.cfg = module, prompts, records, cfg
        self.tokenizer, self.score, self.run_dir, self.autocast = tokenizer, score, run_dir, autocast
        self.frozen_reference = frozen_reference
        self.group = cfg.rollout.num_generations
        # One rollout feeds one step on every process: batch_size × grad_accum × processes completions.
        self.batches_per_update = cfg.train.grad_accum * world
        self.prompts_per_rollout = cfg.train.batch_size * self.batches_per_update // self.group
        self.last_stats: RolloutStats | None = None
        self.rollouts_done = 0
        if adapter_training is not None:
            self.lr_scale = adapter_training.lr_scale
            self.inactive_parameters = adapter_training.inactive_parameters

    # -- what the loop calls

    def rollouts_per_epoch(self) -> int:
        return len(self.prompts) // self.prompts_per_rollout

    def micro_batches_per_epoch(self) -> int:
        return self.rollouts_per_epoch() * self.cfg.grpo.updates_per_rollout * self.batches_per_update

    def micro_batches(self, epoch: int) -> Iterator[dict]:
        return self.micro_batches_after(epoch, 0)

    def micro_batches_after(self, epoch: int, skip: int) -> Iterator[dict]:
        """The epoch's micro-batches from the `skip`-th on; skipped rollouts are never sampled."""
        order = list(range(len(self.prompts)))
        random.Random(f"posttrain-grpo-{self.cfg.train.seed}-{epoch}").shuffle(order)
        first, offset = divmod(skip, self.cfg.grpo.updates_per_rollout * self.batches_per_update)
        for index in range(first, self.rollouts_per_epoch()):
            chosen = order[index * self.prompts_per_rollout : (index + 1) * self.prompts_per_rollout]
            batches = self._rollout(chosen, epoch, index)
            for update in range(self.cfg.grpo.updates_per_rollout):
                for batch in batches:
                    if offset:
                        offset -= 1
                        continue
                    yield batch

    def weight(self, batch) -> float:
        if self.cfg.grpo.aggregation == "token":
            return float(batch["response_mask"].sum())
        return float(batch["response_mask"].shape[0])

    def tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def eval_micro_batches(self) -> list[dict]:
        return []  # held-out figures come from generation (run_grpo), not from a loss

    def finish_metrics(self, metrics: dict) -> dict:
        stats = self.last_stats.__dict__ if self.last_stats is not None else {}
        return metrics | {f"rollout/{k}": v for k, v in stats.items()}

    # -- one rollout

    def _policy(self):
        return self.module.model

    def _rollout(self, chosen: list[int], epoch: int, index: int) -> list[dict]:
        from posttrain.rollout.generate import (_make_stop_check, eos_token_ids, generate_token_ids, pad_token_id,
                                                truncate_at_stop)
        from posttrain.rollout.sampling import SamplingSettings

        r, model = self.cfg.rollout, self._policy()
        seed = (self.cfg.train.seed * 1_000_003 + epoch * 10_007 + index) % (2**31)
        settings = SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                    top_k=r.top_k, stop=list(r.stop), seed=seed)
        prompt_ids = [self.prompts[i] for i in chosen for _ in range(self.group)]  # prompt by prompt, G each
        eos = eos_token_ids(model, self.tokenizer)
        started = time.perf_counter()
        with self.autocast():
            completions = generate_token_ids(model, prompt_ids, settings, pad_token_id=pad_token_id(self.tokenizer, eos),
                                             eos_token_ids=eos, batch_size=r.batch_size,
                                             stop_check=_make_stop_check(self.tokenizer, r.stop) if r.stop else None)
        rollout_s = time.perf_counter() - started
        ended = [bool(c) and c[-1] in eos for c in completions]
        completions = [c if c else [next(iter(eos))] for c in completions]  # a completion has at least one token
        texts = [truncate_at_stop(self.tokenizer.decode(c, skip_special_tokens=True), r.stop) for c in completions]
        records = [self.records[i] for i in chosen for _ in range(self.group)]
        started = time.perf_counter()
        rewards = torch.tensor(self.score([rec.prompt for rec in records], texts, [rec.reward_row() for rec in records]),
                               dtype=torch.float32)
        rewards = rewards - self.cfg.reward.no_eos_penalty * (~torch.tensor(ended)).float()
        if self.cfg.reward.clip > 0:
            rewards = rewards.clamp(-self.cfg.reward.clip, self.cfg.reward.clip)
        reward_s = time.perf_counter() - started
        advantages = (pg.rloo_advantages(rewards, self.group) if self.cfg.grpo.advantage == "rloo" else
                      pg.group_advantages(rewards, self.group, scale_by_std=self.cfg.grpo.scale_rewards))
        batches = self._batches(prompt_ids, completions, advantages)
        grouped = rewards.view(-1, self.group)
        generated = sum(len(c) for c in completions)
        self.last_stats = RolloutStats(
            reward_mean=float(rewards.mean()), reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
            response_tokens_mean=generated / len(completions), ended_fraction=sum(ended) / len(ended),
            rollout_s=rollout_s, reward_s=reward_s, rollout_tokens_per_s=generated / max(rollout_s, 1e-9),
            solved_groups=float((grouped.max(1).values == grouped.min(1).values).float().mean()))
        self._write_samples(epoch, index, records, texts, rewards)
        self.rollouts_done += 1
        return batches

    def _batches(self, prompt_ids, completions, advantages) -> list[dict]:
        """Split the rollout into micro-batches; add rollout-time log-probs where the loss needs them."""
        from posttrain.train.preference import reference_weights

        size, out = self.cfg.train.batch_size, []
        model = self._policy()
        device = next(model.parameters()).device
        for start in range(0, len(completions), size):
            batch = collate_completions(prompt_ids[start : start + size], completions[start : start + size],
                                        self.tokenizer.pad_token_id)
            batch["advantages"] = advantages[start : start + size]
            on_device = {k: v.to(device) for k, v in batch.items()}
            if self.cfg.grpo.updates_per_rollout > 1:
                batch["old_logps"] = self._logps(model, on_device).cpu()
            if self.cfg.grpo.beta > 0:
                with reference_weights(model, self.frozen_reference) as reference:
                    batch["ref_logps"] = self._logps(reference, on_device).cpu()
            out.append(batch)
        return out

    def _logps(self, model, batch) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), self.autocast():
                return completion_logps(model, batch, self.cfg.train.loss_chunk_size).float()
        finally:
            model.train(was_training)

    def _write_samples(self, epoch, index, records, texts, rewards) -> None:
        every = self.cfg.eval.sample_every
        if self.run_dir is None or not every or self.rollouts_done % every:
            return
        with (self.run_dir / "samples.jsonl").open("a") as fh:
            for g in range(min(2, len(texts) // self.group)):  # two prompts, all their samples
                for k in range(self.group):
                    i = g * self.group + k
                    fh.write(json.dumps({"epoch": epoch, "rollout": index, "prompt": records[i].prompt[-1]["content"],
                                         "completion": texts[i], "reward": float(rewards[i])}) + "\n")


# --------------------------------------------------------------------------- rewards and held-out evaluation


def build_reward(cfg: GRPOConfig):
    """The configured reward: functions, reward models and a format check, combined with weights."""
    from posttrain.rewards import CombinedReward, RewardComponent, _pairs_option, build_combined, format_reward

    combined = build_combined(cfg.reward.models, cfg.reward.functions, [], [], template=cfg.data.template)
    if cfg.reward.format_regex:
        combined.components.append(RewardComponent("format", format_reward(cfg.reward.format_regex)))
    by_name = {c.name: c for c in combined.components}
    for name, value in _pairs_option(cfg.reward.weights, "reward.weights").items():
        if name not in by_name:
            from posttrain.errors import ConfigError

            raise ConfigError(f"reward.weights {name}=...: no reward named {name} (have {', '.join(by_name)})")
        by_name[name].weight = float(value)
    return CombinedReward(combined.components)


def held_out_reward(model, tokenizer, prompts: list[list[int]], records: list[PromptRecord], score, cfg: GRPOConfig,
                    autocast=contextlib.nullcontext, frozen_reference=None) -> dict:
    """The policy on held-out prompts:

    reward            mean reward of `eval.samples` completions per prompt, sampled as in the
                      rollouts (the quantity RL maximises: E_{y~π}[r(x, y)]), with a fixed seed
    greedy_reward     mean reward of the greedy answer (sharpening alone does not move it)
    kl_to_reference   mean over the sampled completions of Σ_t (log π − log π_ref), a sampled
                      estimate of KL(π‖π_ref) per response; None when no reference is kept
                      (full fine-tuning with β = 0)"""
    from posttrain.rollout.generate import eos_token_ids, generate_token_ids, pad_token_id
    from posttrain.rollout.sampling import SamplingSettings

    n = min(cfg.eval.prompts, len(prompts))
    if n <= 0:
        return {}
    r, k = cfg.rollout, cfg.eval.samples
    eos = eos_token_ids(model, tokenizer)

    def answer(ids: list[list[int]], settings) -> list[list[int]]:
        with autocast():
            out = generate_token_ids(model, ids, settings, pad_token_id=pad_token_id(tokenizer, eos),
                                     eos_token_ids=eos, batch_size=r.batch_size)
        return [c if c else [next(iter(eos))] for c in out]

    def rewards(completions, recs) -> list[float]:
        texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        return score([x.prompt for x in recs], texts, [x.reward_row() for x in recs])

    greedy = answer(prompts[:n], SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=0.0))
    sampled_ids = [p for p in prompts[:n] for _ in range(k)]
    sampled_recs = [x for x in records[:n] for _ in range(k)]
    sampled = answer(sampled_ids, SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                                   top_p=r.top_p, top_k=r.top_k, seed=cfg.train.seed + 7919))
    out = {"reward": sum(rewards(sampled, sampled_recs)) / len(sampled),
           "greedy_reward": sum(rewards(greedy, records[:n])) / n, "prompts": n, "samples": k,
           "response_tokens": sum(map(len, sampled)) / len(sampled), "kl_to_reference": None}
    if frozen_reference is not None or hasattr(model, "adapters_disabled"):
        out["kl_to_reference"] = _sequence_kl(model, tokenizer, sampled_ids, sampled, autocast, frozen_reference)
    return out


def _sequence_kl(model, tokenizer, prompt_ids, completions, autocast, frozen_reference) -> float:
    from posttrain.train.preference import reference_weights

    total, device = 0.0, next(model.parameters()).device
    for start in range(0, len(completions), 64):
        batch = collate_completions(prompt_ids[start : start + 64], completions[start : start + 64],
                                    tokenizer.pad_token_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        with torch.no_grad(), autocast():
            was_training = model.training
            model.eval()
            logps = completion_logps(model, batch).float()
            with reference_weights(model, frozen_reference) as reference:
                ref = completion_logps(reference, batch).float()
            model.train(was_training)
        total += float(((logps - ref) * batch["response_mask"]).sum())
    return total / len(completions)


# --------------------------------------------------------------------------- the run


def run_grpo(cfg: GRPOConfig) -> Path:
    """Optimise the policy on sampled, scored completions per `cfg`; returns the run directory."""
    from posttrain.data.prompts import encode_prompts, prepare_prompts
    from posttrain.data.templates import resolve_template
    from posttrain.train.grouped import on_device
    from posttrain.train.loop import finish_run, start_run, train
    from posttrain.train.sft import build_model

    validate_grpo(cfg)
    run_dir, accelerator, main, log = start_run(cfg)
    tokenizer, model, adapter_training = build_model(cfg, log, run_dir if main else None)
    train_records, eval_records, data_report = prepare_prompts(cfg.data, run_dir, cfg.train.seed, log)
    template = resolve_template(tokenizer, cfg.data.template)
    train_ids, train_records = encode_prompts(train_records, tokenizer, template, cfg.data.max_prompt_length, log)
    eval_ids, eval_records = encode_prompts(eval_records, tokenizer, template, cfg.data.max_prompt_length, log, "eval")
    score = build_reward(cfg)
    # Full / freeze tuning has no adapters to switch off: the reference is a frozen copy.
    needs_copy = not hasattr(model, "adapters_disabled") and cfg.grpo.beta > 0
    frozen = copy.deepcopy(model).requires_grad_(False).eval() if needs_copy else None
    on_device(model, accelerator.device)
    if frozen is not None:
        on_device(frozen, accelerator.device)
    module = GroupPolicyLoss(model, cfg.grpo, cfg.train.loss_chunk_size)
    stage = GRPOStage(module, train_ids, train_records, cfg, tokenizer, score, run_dir if main else None,
                      accelerator.autocast, adapter_training, frozen, accelerator.num_processes)
    if stage.rollouts_per_epoch() == 0:
        from posttrain.errors import DataError

        raise DataError(f"{len(train_ids)} training prompts are fewer than the {stage.prompts_per_rollout} one rollout needs")
    evaluate = lambda m: held_out_reward(m, tokenizer, eval_ids, eval_records, score, cfg,  # noqa: E731
                                         accelerator.autocast, frozen) if main else {}
    summary: dict = {"advantage": cfg.grpo.advantage, "train_prompts": len(train_ids), "eval_prompts": len(eval_ids),
                     "data": data_report, "held_out_before": evaluate(model)}
    _log_held_out(summary["held_out_before"], "before", log)
    result = train(stage, cfg.train, run_dir, accelerator)
    trained = result.module.model
    summary.update(steps=result.step, rollouts=stage.rollouts_done, held_out_after=evaluate(trained))
    _log_held_out(summary["held_out_after"], "after", log)
    return finish_run(run_dir, accelerator, main, trained, tokenizer, summary)


def _log_held_out(figures: dict, when: str, log) -> None:
    if figures:
        kl = figures["kl_to_reference"]
        log(f"held-out reward {when} training: {figures['reward']:.3f} sampled ({figures['samples']} per prompt), "
            f"{figures['greedy_reward']:.3f} greedy, on {figures['prompts']} prompts"
            + ("" if kl is None else f"; KL to reference {kl:.3f} per response"))
