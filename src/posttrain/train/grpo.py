"""Group-relative policy optimisation — GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024).

Every optimizer step starts from a rollout: P prompts, G completions sampled for each by
the policy being trained, a reward per completion, and an advantage per completion relative
to the other G−1 samples of its prompt (`losses.policy_gradient.group_advantages` or
`rloo_advantages`). The step then minimises PPO's clipped surrogate on those completions'
tokens. With β > 0, GRPO adds β times a per-token KL penalty to the reference to the loss
(`kl_penalty`: k1 and k2 pull along ∇KL(π‖π_ref), k3, GRPO's, along ∇KL(π_ref‖π)); RLOO, as
its paper, subtracts β·KL of each whole completion (k1, summed over its tokens) from its reward
before the leave-one-out baseline (`kl_penalised_rewards`). With `grpo.updates_per_rollout`
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

from collections.abc import Iterator
from pathlib import Path

import torch

from posttrain.config import GRPOConfig, GRPOLossConfig, validate_grpo
from posttrain.losses import policy_gradient as pg
from posttrain.train.rollouts import (RolloutStage, batches_state, collate_completions, completion_forward,
                                      restore_batches, start_rl_run, summed, summed_figure)


# --------------------------------------------------------------------------- the loss


class GroupPolicyLoss(torch.nn.Module):
    """forward(batch) → (summed clipped-surrogate (+ β·KL under grpo) loss, summed metrics),
    normalised by the loop with the batch's weight (`GRPOStage.weight`): response tokens (token
    aggregation), responses (sequence) or responses × max_new_tokens (constant, whose loss
    numerator is token's sum and whose figures are sequence's, × max_new_tokens: per-response
    means). Under rloo β acts in the rewards; the loss logs k1's value per token as `kl`."""

    def __init__(self, model: torch.nn.Module, cfg: GRPOLossConfig, chunk_size: int = 256, temperature: float = 1.0,
                 max_new_tokens: int | None = None):
        super().__init__()
        self.model, self.cfg, self.chunk_size = model, cfg, chunk_size
        self.temperature = temperature  # the rollouts': log-probs of the distribution they sampled from
        self.max_new_tokens = max_new_tokens  # constant aggregation's L
        if cfg.aggregation == "constant" and not max_new_tokens:
            raise ValueError("grpo.aggregation=constant needs max_new_tokens (rollout.max_new_tokens)")

    def _loss_sum(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return summed(per_token, mask, "token" if self.cfg.aggregation == "constant" else self.cfg.aggregation)

    def _sum(self, per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """A figure's numerator (entropy, kl)."""
        if self.cfg.aggregation == "constant":
            return self.max_new_tokens * summed(per_token, mask, "sequence")
        return summed(per_token, mask, self.cfg.aggregation)

    def forward(self, advantages, old_logps=None, ref_logps=None, **batch):
        mask = batch["response_mask"]
        forward = completion_forward(self.model, batch, self.chunk_size, entropy_grad=False,  # entropy: a metric
                                     temperature=self.temperature)
        logps = forward["logps"]
        old = logps.detach() if old_logps is None else old_logps  # μ = 1: the rollout policy is this one
        per_token, clip_metrics = pg.clipped_policy_loss(logps, old, advantages[:, None], mask, self.cfg.clip_eps)
        if self.cfg.aggregation == "constant":
            clip_fraction = self.max_new_tokens * summed(clip_metrics["clipped_tokens"], mask, "sequence")
        else:
            clip_fraction = summed_figure(clip_metrics["clipped_tokens"], clip_metrics["clip_fraction"], mask,
                                          self.cfg.aggregation)
        metrics = {"clip_fraction": clip_fraction, "entropy": self._sum(forward["entropy"].detach(), mask)}
        if self.cfg.beta > 0 and self.cfg.advantage == "rloo":  # β is in the rewards (kl_penalised_rewards)
            metrics["kl"] = self._sum(pg.kl_k1(logps.detach(), ref_logps), mask)
        elif self.cfg.beta > 0:
            kl = pg.kl_penalty(logps, ref_logps, self.cfg.kl_estimator)
            per_token = per_token + self.cfg.beta * kl * mask
            metrics["kl"] = self._sum(kl.detach(), mask)
        return self._loss_sum(per_token, mask), metrics


# --------------------------------------------------------------------------- rollouts


class GRPOStage(RolloutStage):
    """The loop's Stage: rollouts sampled on demand, group advantages, clipped-surrogate batches."""

    shuffle_name = "grpo"

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

    def weight(self, batch) -> float:
        """Constant aggregation divides by responses × rollout.max_new_tokens (Dr. GRPO's constant)."""
        if self.aggregation == "constant":
            return float(batch["response_mask"].shape[0] * self.cfg.rollout.max_new_tokens)
        return super().weight(batch)

    def micro_batches_per_epoch(self) -> int:
        return self.rollouts_per_epoch() * self.cfg.grpo.updates_per_rollout * self.batches_per_update

    def micro_batches_after(self, epoch: int, skip: int) -> Iterator[dict]:
        """The epoch's micro-batches from the `skip`-th on; skipped rollouts are never sampled."""
        first, offset = divmod(skip, self.cfg.grpo.updates_per_rollout * self.batches_per_update)
        restored, self._restored = self._restored and offset and self.position == (epoch, first), False
        for index in range(first, self.rollouts_per_epoch()):
            if not (restored and index == first):
                chosen = self.rollout_prompts(epoch, index)
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
        return {"position": list(self.position), "rollouts_done": self.rollouts_done, **self.plan_state(),
                "micro_batches": len(batches), "rollout_metrics": self.rollout_metrics}, batches_state(batches)

    def load_state_dict(self, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.check_resumable(plain)
        self.position, self.rollouts_done = tuple(plain["position"]), plain["rollouts_done"]
        self.rollout_metrics = plain["rollout_metrics"]
        self.batches = restore_batches(plain["micro_batches"], tensors)
        self._restored = True

    def _batches(self, rollout) -> list[dict]:
        """The rollout in micro-batches with the rollout-time and reference log-probs where the
        loss (or RLOO's KL-penalised reward) needs them, then the group advantages."""
        from posttrain.train.preference import reference_weights

        g = self.cfg.grpo
        kl_in_reward = g.advantage == "rloo" and g.beta > 0
        size, out, rewards = self.cfg.train.batch_size, [], []
        model = self._policy()
        device = next(model.parameters()).device
        for start in range(0, len(rollout.completions), size):
            batch = collate_completions(rollout.prompt_ids[start : start + size], rollout.completions[start : start + size],
                                        self.tokenizer.pad_token_id)
            on_device = {k: v.to(device) for k, v in batch.items()}
            old_logps = self._logps(model, on_device).cpu() if g.updates_per_rollout > 1 or kl_in_reward else None
            if g.updates_per_rollout > 1:
                batch["old_logps"] = old_logps
            if g.beta > 0:
                with reference_weights(model, self.frozen_reference) as reference:
                    batch["ref_logps"] = self._logps(reference, on_device).cpu()
            scores = rollout.rewards[start : start + size]
            rewards.append(pg.kl_penalised_rewards(scores, old_logps, batch["ref_logps"], batch["response_mask"], g.beta)
                           if kl_in_reward else scores)
            out.append(batch)
        scores = torch.cat(rewards)
        advantages = (pg.rloo_advantages(scores, self.group) if g.advantage == "rloo" else
                      pg.group_advantages(scores, self.group, scale_by_std=g.scale_rewards)).to(rollout.rewards.dtype)
        for start, batch in zip(range(0, len(rollout.completions), size), out):
            batch["advantages"] = advantages[start : start + size]
        return out


# --------------------------------------------------------------------------- the run


def run_grpo(cfg: GRPOConfig) -> Path:
    """Optimise the policy on sampled, scored completions per `cfg`; returns the run directory."""
    from posttrain.train.runs import finish_run, released_on_failure

    cfg = GRPOConfig.for_run(cfg, "run_grpo")
    validate_grpo(cfg)
    run = start_rl_run(cfg, needs_reference=cfg.grpo.beta > 0)
    with released_on_failure(run.run_dir):
        stage = GRPOStage(GroupPolicyLoss(run.model, cfg.grpo, cfg.train.loss_chunk_size, cfg.rollout.temperature,
                                           cfg.rollout.max_new_tokens), *run.stage_args())
        result, summary = run.train(stage, {"advantage": cfg.grpo.advantage})
        return finish_run(run.run_dir, run.accelerator, run.main, result.module.model, run.tokenizer, summary)
