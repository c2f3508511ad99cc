"""Group-relative policy optimisation — GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

Every optimizer step starts from a rollout: P prompts, G completions sampled for each by
the policy being trained, a reward per completion, and an advantage per completion relative
to the other G−1 samples of its prompt (`losses.policy_gradient.group_advantages` or
`rloo_advantages`). The step then minimises PPO's clipped surrogate on those completions'
tokens, plus β times a per-token KL penalty to the reference when β > 0 (`kl_penalty`: k1 and
k2 pull along ∇KL(π‖π_ref), k3, GRPO's, along ∇KL(π_ref‖π)). With `grpo.updates_per_rollout`
= μ > 1 the same rollout feeds μ steps and the ratio to the rollout-time policy is clipped;
with μ = 1 (the default) the ratio is exactly 1 and the loss is the plain policy gradient.

How it fits THE loop: `micro_batches(epoch)` is a generator that samples a rollout from the
current weights whenever it needs one, so the loop's accumulation, clipping, checkpoints
and logging apply unchanged. A step's micro-batches are one rollout (train.batch_size ×
grad_accum × processes completions = that / G prompts). Resume skips whole rollouts without
generating them, and sampling is seeded per (seed, epoch, rollout), so a resumed run samples
what the uninterrupted one did.

The reference policy (β > 0 only) is the starting model exactly: adapters switched off (they
start as the identity), with prompt or prefix tuning the virtual tokens at their starting draw
swapped back in (`preference.StartingVirtualTokens`), or a frozen copy for full fine-tuning
(`preference.reference_weights`).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from posttrain.config import GRPOConfig, GRPOLossConfig, validate_grpo
from posttrain.losses import policy_gradient as pg
from posttrain.train.rollouts import (RolloutStage, batches_state, collate_completions, completion_forward,
                                      restore_batches, start_rl_run, summed, summed_figure)


# --------------------------------------------------------------------------- the loss


class GroupPolicyLoss(torch.nn.Module):
    """forward(batch) → (summed clipped-surrogate (+ β·KL) loss, summed metrics), normalised
    by the loop with the batch's weight: response tokens (token aggregation) or responses."""

    def __init__(self, model: torch.nn.Module, cfg: GRPOLossConfig, chunk_size: int = 256, temperature: float = 1.0):
        super().__init__()
        self.model, self.cfg, self.chunk_size = model, cfg, chunk_size
        self.temperature = temperature  # the rollouts': log-probs of the distribution they sampled from

    def _sum(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return summed(per_token, mask, self.cfg.aggregation)

    def forward(self, advantages, old_logps=None, ref_logps=None, **batch):
        mask = batch["response_mask"]
        forward = completion_forward(self.model, batch, self.chunk_size, entropy_grad=False,  # entropy: a metric
                                     temperature=self.temperature)
        logps = forward["logps"]
        old = logps.detach() if old_logps is None else old_logps  # μ = 1: the rollout policy is this one
        per_token, clip_metrics = pg.clipped_policy_loss(logps, old, advantages[:, None], mask, self.cfg.clip_eps)
        metrics = {"clip_fraction": summed_figure(clip_metrics["clipped_tokens"], clip_metrics["clip_fraction"],
                                                  mask, self.cfg.aggregation),
                   "entropy": self._sum(forward["entropy"].detach(), mask)}
        if self.cfg.beta > 0:
            kl = pg.kl_penalty(logps, ref_logps, self.cfg.kl_estimator)
            per_token = per_token + self.cfg.beta * kl * mask
            metrics["kl"] = self._sum(kl.detach(), mask)
        return self._sum(per_token, mask), metrics


# --------------------------------------------------------------------------- rollouts


class GRPOStage(RolloutStage):
    """The loop's Stage: rollouts sampled on demand, group advantages, clipped-surrogate batches."""

    def __init__(self, module: GroupPolicyLoss, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        self.aggregation = self.cfg.grpo.aggregation
        # One rollout feeds one step on every process: batch_size × grad_accum × processes completions.
        self.prompts_per_rollout = self.cfg.train.batch_size * self.batches_per_update // self.group
        # The rollout being trained on and its (epoch, index): a checkpoint inside it (μ > 1) resumes
        # on these batches, as sampled then, not on a new sample from the later weights.
        self.batches: list[dict] = []
        self.position = (-1, -1)
        self._restored = False

    def rollouts_per_epoch(self) -> int:
        return len(self.prompts) // self.prompts_per_rollout

    def micro_batches_per_epoch(self) -> int:
        return self.rollouts_per_epoch() * self.cfg.grpo.updates_per_rollout * self.batches_per_update

    def micro_batches_after(self, epoch: int, skip: int) -> Iterator[dict]:
        """The epoch's micro-batches from the `skip`-th on; skipped rollouts are never sampled."""
        order = list(range(len(self.prompts)))
        random.Random(f"posttrain-grpo-{self.cfg.train.seed}-{epoch}").shuffle(order)
        first, offset = divmod(skip, self.cfg.grpo.updates_per_rollout * self.batches_per_update)
        restored, self._restored = self._restored and offset and self.position == (epoch, first), False
        for index in range(first, self.rollouts_per_epoch()):
            if not (restored and index == first):
                chosen = order[index * self.prompts_per_rollout : (index + 1) * self.prompts_per_rollout]
                self.batches, self.position = self._batches(self._sample(chosen, epoch, index)), (epoch, index)
            batches = self.batches
            for _ in range(self.cfg.grpo.updates_per_rollout):
                for batch in batches:
                    if offset:
                        offset -= 1
                        continue
                    yield batch

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The position, counts and figures; and the rollout's batches when a resume can read them:
        with μ = 1 a checkpoint (at a step's end) falls between rollouts, and the resumed run samples
        the next one, so the batches would never be read and are not written."""
        batches = self.batches if self.cfg.grpo.updates_per_rollout > 1 else []
        return {"position": list(self.position), "rollouts_done": self.rollouts_done,
                "prompts_per_rollout": self.prompts_per_rollout,
                "micro_batches": len(batches), "rollout_metrics": self.rollout_metrics}, batches_state(batches)

    def load_state_dict(self, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.check_rollout_size(plain)
        self.position, self.rollouts_done = tuple(plain["position"]), plain["rollouts_done"]
        self.rollout_metrics = plain["rollout_metrics"]
        self.batches = restore_batches(plain["micro_batches"], tensors)
        self._restored = True

    def _batches(self, rollout) -> list[dict]:
        """Group advantages, then the rollout in micro-batches with the rollout-time and
        reference log-probs where the loss needs them."""
        from posttrain.train.preference import reference_weights

        advantages = (pg.rloo_advantages(rollout.rewards, self.group) if self.cfg.grpo.advantage == "rloo" else
                      pg.group_advantages(rollout.rewards, self.group, scale_by_std=self.cfg.grpo.scale_rewards))
        size, out = self.cfg.train.batch_size, []
        model = self._policy()
        device = next(model.parameters()).device
        for start in range(0, len(rollout.completions), size):
            batch = collate_completions(rollout.prompt_ids[start : start + size], rollout.completions[start : start + size],
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


# --------------------------------------------------------------------------- the run


def run_grpo(cfg: GRPOConfig) -> Path:
    """Optimise the policy on sampled, scored completions per `cfg`; returns the run directory."""
    from posttrain.train.loop import finish_run, run_fingerprint, train

    cfg = GRPOConfig.for_run(cfg, "run_grpo")
    validate_grpo(cfg)
    run = start_rl_run(cfg, needs_reference=cfg.grpo.beta > 0)
    stage = GRPOStage(GroupPolicyLoss(run.model, cfg.grpo, cfg.train.loss_chunk_size, cfg.rollout.temperature), *run.stage_args())
    run.check_enough_prompts(stage)
    control = run.attach_forgetting(stage)
    run.attach_evaluation(stage)
    summary: dict = {"advantage": cfg.grpo.advantage, "train_prompts": len(run.train_ids),
                     "eval_prompts": len(run.eval_ids), "data": run.data_report,
                     "held_out_before": run.held_out(run.model, "before")}
    summary.update(run.forgetting_report(control, run.model, "before"))
    result = train(stage, cfg.train, run.run_dir, run.accelerator, run_fingerprint(cfg))
    trained = result.module.model
    summary.update(result.summary(), rollouts=stage.rollouts_done,
                   held_out_after=run.held_out(trained, "after", result.step))
    summary.update(run.forgetting_report(control, trained, "after"))
    return finish_run(run.run_dir, run.accelerator, run.main, trained, run.tokenizer, summary)
