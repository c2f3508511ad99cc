"""PPO for language models — RLHF stage 3 (Schulman et al. 2017; Ziegler et al. 2019;
InstructGPT, Ouyang et al. 2022).

One rollout: P prompts, `rollout.num_generations` completions each, sampled from the policy
and scored once per completion. Then, per response token t, with the rollout-time policy
π_old, the frozen reference π_ref and the value model V:

    r_t = −β · KL_t(π_old ‖ π_ref)   (+ the completion's score on its last token)
    A_t = GAE(γ, λ) over r and V,    R_t = A_t + V_old(s_t),   A whitened over the rollout

and `ppo.epochs` passes over the rollout, each split into `ppo.minibatches` optimizer steps,
minimise the clipped surrogate + vf_coef · clipped value loss − entropy_coef · entropy
(`losses.policy_gradient`). A pass stops early once the approximate KL between π_old and
the policy being trained exceeds `ppo.early_stop_kl`. With `ppo.kl_control=adaptive`, β
follows the controller of Ziegler et al. after every rollout, towards `ppo.kl_target` nats
per response.

The value model is either a linear head on the policy's final hidden state (one trunk, one
forward: `ppo.value_model=head`) or a separate critic — a decoder with a linear head,
started from `ppo.value_model_path` (a reward model's directory, as InstructGPT does, or
by default the policy's own weights). The reference is the starting policy, as GRPO's (its
adapters switched off, its virtual tokens at their starting draw, or a frozen copy for full
fine-tuning); with β = 0 and fixed control there is none, and no rollout/kl is logged.

Resume is exact: a checkpoint carries β, the position inside the current rollout and the
rollout itself (`state_dict`), besides the weights, optimizer and RNG the loop saves.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import torch

from posttrain.config import PPOConfig, PPOLossConfig, validate_ppo
from posttrain.losses import policy_gradient as pg
from posttrain.train.rollouts import (RolloutStage, batches_state, collate_completions, completion_forward,
                                      completion_inputs, no_grad_eval, regroup_completions, restore_batches,
                                      start_rl_run, summed, summed_figure, to_grid)

# --------------------------------------------------------------------------- value models


class ValueHead(torch.nn.Module):
    """V(s_t) = w·h_t + b on the policy's final hidden state h_t (the state before token t)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.normal_(self.linear.weight, std=1.0 / (hidden_size + 1))
        torch.nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        from posttrain.models.reward_model import head_in_own_precision

        return head_in_own_precision(self.linear, hidden)


class Critic(torch.nn.Module):
    """A separate value model: a decoder backbone and a linear `score` head read at every
    completion position (an `AutoModelForSequenceClassification` with one label, as
    `posttrain rm` saves them)."""

    def __init__(self, classifier):
        super().__init__()
        from posttrain.models.reward_model import is_decoder_scorer

        if not is_decoder_scorer(classifier):
            raise ValueError("ppo.value_model=separate needs a decoder backbone (per-token values); "
                             "an encoder reward model cannot be the critic")
        self.classifier = classifier

    def forward(self, batch: dict) -> torch.Tensor:
        """Values (B, T) like `response_mask`; padding-free (and read at the completion tokens
        only) when the critic takes such batches, as the policy's forward is."""
        from posttrain.models.reward_model import _classifier, scores_at

        inner = _classifier(self.classifier)
        return to_grid(scores_at(inner, *completion_inputs(inner, batch)), batch)


# --------------------------------------------------------------------------- the loss


class PPOLoss(torch.nn.Module):
    """forward(batch) → (summed PPO loss, summed metrics); the loop normalises by the weight."""

    def __init__(self, model: torch.nn.Module, cfg: PPOLossConfig, value_head: ValueHead | None = None,
                 critic: Critic | None = None, chunk_size: int = 256, temperature: float = 1.0):
        super().__init__()
        if (value_head is None) == (critic is None):
            raise ValueError("PPOLoss needs exactly one of value_head and critic")
        self.model, self.cfg, self.chunk_size = model, cfg, chunk_size
        self.value_head, self.critic = value_head, critic
        self.temperature = temperature  # the rollouts': log-probs of the distribution they sampled from

    def evaluate(self, batch: dict, entropy: bool = True) -> dict:
        """Log-probs, entropies (unless `entropy` is False: the rollout-time pass, which reads the
        log-probs and values only) and values of the batch's completion tokens, (B, T) each."""
        out = completion_forward(self.model, batch, self.chunk_size, self.value_head,
                                 entropy_grad=self.cfg.entropy_coef != 0,  # else the entropy is a metric only
                                 temperature=self.temperature, entropy=entropy)
        if self.critic is not None:
            out["values"] = self.critic(batch)
        return out

    def forward(self, advantages, returns, old_logps, old_values, **batch):
        mask, c = batch["response_mask"], self.cfg
        out = self.evaluate(batch)
        policy, policy_metrics = pg.clipped_policy_loss(out["logps"], old_logps, advantages, mask, c.clip_eps)
        value, value_metrics = pg.clipped_value_loss(out["values"], old_values, returns, mask, c.value_clip)
        per_token = policy + c.vf_coef * value - c.entropy_coef * out["entropy"] * mask
        # every figure summed as the loss is, so the step's figure (÷ the step's weight) is the same
        # whatever the micro-batch split; `approx_kl` decides ppo.early_stop_kl
        metrics = {"policy_loss": summed(policy.detach(), mask, c.aggregation),
                   "value_loss": summed(value.detach(), mask, c.aggregation),
                   "entropy": summed(out["entropy"].detach(), mask, c.aggregation),
                   "clip_fraction": summed_figure(policy_metrics["clipped_tokens"], policy_metrics["clip_fraction"],
                                                  mask, c.aggregation),
                   "approx_kl": summed_figure(policy_metrics["approx_kl_tokens"], policy_metrics["approx_kl"],
                                              mask, c.aggregation),
                   "value_clip_fraction": summed_figure(value_metrics["value_clipped_tokens"],
                                                        value_metrics["value_clip_fraction"], mask, c.aggregation)}
        return summed(per_token, mask, c.aggregation), metrics


# --------------------------------------------------------------------------- rollouts and updates


class PPOStage(RolloutStage):
    """The loop's Stage: a rollout, then ppo.epochs × ppo.minibatches optimizer steps on it."""

    metrics_at_step = ("ppo_update", "rollout/kl_coef")  # a position and a setting: no mean over log_every
    shuffle_name = "ppo"

    def __init__(self, module: PPOLoss, *args, **kwargs):
        super().__init__(module, *args, **kwargs)
        p = self.cfg.ppo
        self.aggregation = p.aggregation
        self.updates_per_rollout = p.epochs * p.minibatches
        self.prompts_per_rollout = self.cfg.train.batch_size * self.batches_per_update * p.minibatches // self.group
        self.kl_coef = p.kl_coef
        self.uses_reference = p.kl_coef > 0
        self.batches: list[dict] = []  # the current rollout's micro-batches
        self.position = (0, 0, 0)  # (epoch, rollout, next update) of the batches handed out so far
        self.stop_rollout = False  # set by finish_metrics once approx KL passes ppo.early_stop_kl
        self._resumed = False

    epochs_cut_by = "ppo.early_stop_kl"  # what makes an epoch end before micro_batches_per_epoch

    def micro_batches_per_epoch(self) -> int:
        """At most this many; early stopping on approximate KL makes epochs shorter (`epoch_ended`)."""
        return self.rollouts_per_epoch() * self.updates_per_rollout * self.batches_per_update

    def epoch_ended(self) -> bool:
        """Whether the update just trained ends its epoch: the epoch's last rollout has no update
        left, run or cut by ppo.early_stop_kl (`finish_metrics`, during the step). The loop then
        counts the epoch as read, and ends a train.epochs run once it has read that many."""
        _, index, update = self.position
        return index == self.rollouts_per_epoch() - 1 and (update >= self.updates_per_rollout or self.stop_rollout)

    def micro_batches_after(self, epoch: int, skip: int) -> Iterator[dict]:
        first, update = 0, 0
        continuing = self._resumed and self.position[0] == epoch  # the checkpoint's rollout, restored
        self._resumed = False
        if continuing:
            first, update = self.position[1], self.position[2]
        elif skip:  # no stage state: assume no early stop
            first, rest = divmod(skip, self.updates_per_rollout * self.batches_per_update)
            update = rest // self.batches_per_update
        for index in range(first, self.rollouts_per_epoch()):
            if not (continuing and index == first):
                chosen = self.rollout_prompts(epoch, index)
                self.batches, self.stop_rollout = self._batches(self._sample(chosen, epoch, index)), False
            drawn = None  # (PPO epoch, its micro-batches in order)
            while update < self.updates_per_rollout and not self.stop_rollout:
                ppo_epoch, minibatch = divmod(update, self.cfg.ppo.minibatches)
                if drawn is None or drawn[0] != ppo_epoch:
                    drawn = (ppo_epoch, self._epoch_batches(epoch, index, ppo_epoch))
                update += 1
                self.position = (epoch, index, update)
                yield from drawn[1][minibatch * self.batches_per_update : (minibatch + 1) * self.batches_per_update]
            update = 0

    def _epoch_batches(self, epoch: int, index: int, ppo_epoch: int) -> list[dict]:
        """The current rollout's micro-batches for one PPO epoch, in the order they are trained.
        Each PPO epoch draws new minibatches, as PPO's reference code does: the first takes the
        rollout's micro-batches (their prompts a random draw already, and the batches its old
        log-probs were taken on, so its first update sees ratio 1 exactly) in a shuffled order;
        each later one regroups the completions themselves in a shuffled order
        (`rollouts.regroup_completions`). Drawn from train.seed and the position in the run,
        so a resumed run draws the same."""
        rng = random.Random(f"posttrain-ppo-{self.cfg.train.seed}-{epoch}-{index}-{ppo_epoch}")
        if ppo_epoch == 0:
            shuffled = list(range(len(self.batches)))
            rng.shuffle(shuffled)
            return [self.batches[i] for i in shuffled]
        rows = list(range(sum(len(batch["input_ids"]) for batch in self.batches)))
        rng.shuffle(rows)
        return regroup_completions(self.batches, rows, self.cfg.train.batch_size, self.tokenizer.pad_token_id)

    def finish_metrics(self, metrics: dict) -> dict:
        limit = self.cfg.ppo.early_stop_kl
        if limit > 0 and metrics.get("approx_kl", 0.0) > limit:
            self.stop_rollout = True  # the rollout's remaining updates are skipped
        return super().finish_metrics(metrics) | {"ppo_update": self.position[2]}

    # -- checkpoint

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """The position, β, counts and figures; and the rollout's batches while a resume reads them: a
        checkpoint (at a step's end) after the rollout's last update (always, with ppo.epochs ×
        ppo.minibatches = 1), or after approx KL stopped it, is followed by a new rollout."""
        remaining = self.position[2] < self.updates_per_rollout and not self.stop_rollout
        batches = self.batches if remaining else []
        return {"kl_coef": self.kl_coef, "position": list(self.position), "stop_rollout": self.stop_rollout,
                "rollouts_done": self.rollouts_done, "micro_batches": len(batches), **self.plan_state(),
                "rollout_metrics": self.rollout_metrics}, batches_state(batches)

    def load_state_dict(self, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
        self.check_resumable(plain)
        self.kl_coef, self.position = plain["kl_coef"], tuple(plain["position"])
        self.stop_rollout, self.rollouts_done = plain["stop_rollout"], plain["rollouts_done"]
        self.rollout_metrics = plain["rollout_metrics"]
        self.batches = restore_batches(plain["micro_batches"], tensors)
        self._resumed = True

    # -- one rollout → micro-batches with advantages and returns

    def _batches(self, rollout) -> list[dict]:
        from posttrain.train.preference import reference_weights

        p, size = self.cfg.ppo, self.cfg.train.batch_size
        model = self._policy()
        device = next(model.parameters()).device
        batches, kl_per_response = [], []
        for start in range(0, len(rollout.completions), size):
            batch = collate_completions(rollout.prompt_ids[start : start + size], rollout.completions[start : start + size],
                                        self.tokenizer.pad_token_id)
            on_device = {k: v.to(device) for k, v in batch.items()}
            # policy and critic in eval mode; no entropy: the rollout keeps log-probs and values only
            old = no_grad_eval(self.module, self.autocast, PPOLoss.evaluate, on_device, False)
            old_logps, old_values = old["logps"].float().cpu(), old["values"].float().cpu()
            mask = batch["response_mask"]
            kl = torch.zeros_like(mask)
            if self.uses_reference:
                with reference_weights(model, self.frozen_reference) as reference:
                    ref_logps = self._logps(reference, on_device).cpu()
                kl = pg.KL_ESTIMATORS[p.kl_estimator](old_logps, ref_logps) * mask
            rewards = pg.shaped_rewards(rollout.rewards[start : start + size], kl, mask, self.kl_coef)
            advantages, returns = pg.gae(rewards, old_values, mask, p.gamma, p.lam)
            batch.update(advantages=advantages, returns=returns, old_logps=old_logps, old_values=old_values)
            batches.append(batch)
            kl_per_response.append(kl.sum(1))
        self._finish_rollout(batches, torch.cat(kl_per_response))
        return batches

    def _finish_rollout(self, batches: list[dict], kl_per_response: torch.Tensor) -> None:
        """Whiten the advantages over the whole rollout, record its figures, adapt β."""
        p = self.cfg.ppo
        masks = [b["response_mask"].bool() for b in batches]
        advantages = torch.cat([b["advantages"][m] for b, m in zip(batches, masks)])
        values = torch.cat([b["old_values"][m] for b, m in zip(batches, masks)])
        returns = torch.cat([b["returns"][m] for b, m in zip(batches, masks)])
        if p.whiten_advantages:
            mean, std = advantages.mean(), advantages.std(unbiased=False)
            for b in batches:
                b["advantages"] = (b["advantages"] - mean) / (std + 1e-8) * b["response_mask"]
        self.rollout_metrics.update(kl_coef=self.kl_coef, value_mean=float(values.mean()),
                                    return_mean=float(returns.mean()), advantage_std=float(advantages.std()),
                                    explained_variance=pg.explained_variance(values, returns, torch.ones_like(values)))
        if not self.uses_reference:  # no reference, nothing measured: no KL figure (0 would read as "not moved")
            return
        observed = float(kl_per_response.mean())
        self.rollout_metrics["kl"] = observed
        if p.kl_control == "adaptive":
            self.kl_coef = pg.adaptive_kl_coef(self.kl_coef, observed, p.kl_target, p.kl_horizon, len(kl_per_response))


# --------------------------------------------------------------------------- the run


def build_value_model(cfg: PPOConfig, model, tokenizer, log,
                      prompt_ids: list[list[int]] | None = None) -> tuple[ValueHead | None, Critic | None]:
    """A value head sized to the policy, or a separate critic loaded from ppo.value_model_path.
    The critic reads every rollout row as the policy does: with `prompt_ids` (the prompts kept,
    train and held out), the longest and rollout.max_new_tokens after it must fit its positions
    too (`rollouts.check_rollout_positions`), else a ConfigError naming its setting."""
    if cfg.ppo.value_model == "head":
        lm = getattr(model, "lm", model)  # AdaptedModel keeps the Hugging Face model in .lm
        return ValueHead(lm.config.hidden_size), None
    from posttrain.models.attention import padding_free
    from posttrain.models.loading import disable_dropout
    from posttrain.models.reward_model import is_decoder_scorer

    path = cfg.ppo.value_model_path or cfg.model.path
    log(f"critic: a separate value model from {path}")
    # trained in full: float16 weights would go NaN under AdamW (see config's float16 check)
    dtype = "float32" if cfg.model.dtype == "float16" else cfg.model.dtype
    setting = "ppo.value_model_path" if cfg.ppo.value_model_path else "model.path"
    classifier = _load_critic(path, dtype, cfg.model.trust_remote_code, tokenizer.pad_token_id, setting, log)
    disable_dropout(classifier, log, "its values must match those the rollout took")
    if is_decoder_scorer(classifier):  # padding-free batches as for the policy (models/attention.py)
        padding_free(classifier, cfg.model.padding_free, log,
                     cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
    from posttrain.errors import ConfigError

    try:
        critic = Critic(classifier)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if prompt_ids is not None:
        from posttrain.train.rollouts import check_rollout_positions

        try:
            check_rollout_positions(classifier, cfg, prompt_ids)
        except ConfigError as exc:
            raise ConfigError(f"the critic ({setting}={path}): {exc}") from None
    return None, critic


def _load_critic(path: str, dtype: str, trust_remote_code: bool, pad_token_id: int | None, setting: str, log):
    """The critic's starting model, as reward.models loads one (a run directory means its final/; a
    LoRA reward model is its base with the adapter). The critic trains in full, so a LoRA reward
    model's adapter is merged into its base (in float32, cast once to `dtype`, as posttrain merge does)."""
    from peft import PeftModel

    from posttrain.inference import resolve_model_dir
    from posttrain.models.loading import _torch_dtype
    from posttrain.models.presets import is_preset
    from posttrain.models.reward_model import load_reward_model

    if not is_preset(path):
        path = resolve_model_dir(path)
    adapter = (Path(path) / "adapter_config.json").is_file()
    model = load_reward_model(path, "float32" if adapter else dtype, trust_remote_code, pad_token_id, setting)
    if isinstance(model, PeftModel):
        log(f"critic: the LoRA reward model {path} merged into its base, trained in full")
        # peft leaves the base's weights frozen after the merge: the critic's must train too
        model = model.merge_and_unload().to(_torch_dtype(dtype)).requires_grad_(True)
    return model


def report_value_model(run, values: torch.nn.Module, optimizer: str) -> dict:
    """The start-of-run parameter report (params.json) with the value model PPO trains and saves
    beside the policy: its parameters under method and module "critic", added to the counts and
    the memory estimate; logged as one line after the policy's. Returns the report."""
    import json

    from posttrain.models.adapters.report import parameter_report

    report, critic = parameter_report(run.model, optimizer), parameter_report(values, optimizer)
    for key in ("trainable", "total"):
        report[key] += critic[key]
    report["percent"] = 100.0 * report["trainable"] / report["total"] if report["total"] else 0.0
    for section in ("by_method", "by_module"):
        report[section]["critic"] = {"trainable": critic["trainable"], "total": critic["total"]}
    for key, mib in critic["memory_mib"].items():
        report["memory_mib"][key] += mib
    kind = "a value head" if isinstance(values, ValueHead) else "a separate value model"
    run.log(f"critic ({kind}): trainable {critic['trainable']:,} params, memory estimate "
            f"+{critic['memory_mib']['total']:.1f} MiB; with the policy: trainable {report['trainable']:,} / "
            f"{report['total']:,} params ({report['percent']:.3f}%), memory estimate {report['memory_mib']['total']:.1f} MiB")
    if run.main:
        (run.run_dir / "params.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return report


def _value_lr(adapter_training, ratio: float):
    """lr scale per parameter name: the value model's at `ratio`, the policy's as its adapters say."""
    policy = adapter_training.lr_scale if adapter_training is not None else (lambda name: 1.0)
    return lambda name: ratio if name.startswith(("value_head.", "critic.")) else policy(name)


def run_ppo(cfg: PPOConfig) -> Path:
    """Optimise the policy with PPO on sampled, scored completions per `cfg`; returns the run directory."""
    from posttrain.train.grouped import on_device
    from posttrain.train.runs import finish_run, released_on_failure

    cfg = PPOConfig.for_run(cfg, "run_ppo")
    validate_ppo(cfg)
    run = start_rl_run(cfg, needs_reference=cfg.ppo.kl_coef > 0)
    with released_on_failure(run.run_dir):
        value_head, critic = build_value_model(cfg, run.model, run.tokenizer, run.log, run.train_ids + run.eval_ids)
        on_device(value_head if value_head is not None else critic, run.accelerator.device)
        report_value_model(run, value_head if value_head is not None else critic, cfg.train.optimizer)
        stage = PPOStage(PPOLoss(run.model, cfg.ppo, value_head, critic, cfg.train.loss_chunk_size, cfg.rollout.temperature), *run.stage_args())
        stage.lr_scale = _value_lr(run.adapter_training, cfg.ppo.value_lr_ratio)
        result, summary = run.train(stage, {"value_model": cfg.ppo.value_model})
        summary["final_kl_coef"] = stage.kl_coef
        if run.main:  # the value model too, to continue training later
            from safetensors.torch import save_file

            values = result.module.value_head if result.module.value_head is not None else result.module.critic
            save_file({k: v.detach().contiguous() for k, v in values.state_dict().items()},
                      str(run.run_dir / "value_model.safetensors"))
        return finish_run(run.run_dir, run.accelerator, run.main, result.module.model, run.tokenizer, summary)
