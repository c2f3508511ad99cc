"""What every online-RL stage (GRPO, RLOO, PPO) shares: sampling and scoring rollouts, the
batches of completions they train on, and the held-out reward before and after.

A rollout is P prompts × G completions sampled from the current policy by a rollout engine
(`rollout.engines`: the policy itself through transformers, or vLLM with the policy's weights
pushed into it before each rollout), decoded and scored by the configured reward
(`build_reward`). `RolloutStage` holds the loop hooks the stages have in common; each stage
turns a `Rollout` into micro-batches its own way (group-relative advantages for GRPO, a critic
and GAE for PPO).

Positions: in a (prompt + completion) row, completion token t is predicted by the hidden
state just before it. `collate_completions` records those positions (`predictor`) so log-
probs, entropies and values are read from them only, laid out (B, T) like `response_mask`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.data.prompts import PromptRecord
from posttrain.errors import ConfigError, DataError
from posttrain.files import write_atomically

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


def regroup_completions(batches: list[dict], order: list[int], size: int, pad_id: int) -> list[dict]:
    """The rows of `collate_completions` batches, numbered batch by batch, collated again in
    `order`, `size` rows a batch. Every other (B, T) per-token tensor a batch carries (advantages,
    old log-probs, ...) moves with its row, zero on the new padding."""
    own = {"input_ids", "attention_mask", "predictor", "targets", "token_row", "token_col", "response_mask"}
    rows = []  # (prompt ids, completion ids, {key: the row's per-token values})
    for batch in batches:
        extra = [key for key in batch if key not in own]
        for b, (length, width) in enumerate(zip(batch["attention_mask"].sum(1).tolist(),
                                                batch["response_mask"].sum(1).long().tolist())):
            ids = batch["input_ids"][b, :length].tolist()
            rows.append((ids[: length - width], ids[length - width :], {key: batch[key][b, :width] for key in extra}))
    out = []
    for start in range(0, len(order), size):
        chosen = [rows[i] for i in order[start : start + size]]
        batch = collate_completions([p for p, _, _ in chosen], [c for _, c, _ in chosen], pad_id)
        for key, first in chosen[0][2].items():
            grid = first.new_zeros(batch["response_mask"].shape)
            for b, (_, _, values) in enumerate(chosen):
                grid[b, : len(values[key])] = values[key]
            batch[key] = grid
        out.append(batch)
    return out


def to_grid(flat: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token values (N,) → (B, T) like `response_mask`, 0 on padding."""
    grid = flat.new_zeros(batch["response_mask"].shape)
    return grid.index_put((batch["token_row"], batch["token_col"]), flat)


def completion_inputs(model, batch: dict) -> tuple[dict, torch.Tensor]:
    """(model inputs, predictor) for a `collate_completions` batch: the rows as they are (right
    padding: causality hides the tail), or, for a model that takes padding-free batches
    (`models.attention.padding_free`), their real tokens only, `predictor` then indexing those."""
    from posttrain.models.attention import pack_for

    packed = pack_for(model, batch["input_ids"], batch["attention_mask"])
    if packed is not None:
        return packed, torch.searchsorted(packed["packed_slots"], batch["predictor"])
    return {"input_ids": batch["input_ids"], "attention_mask": None}, batch["predictor"]


def completion_logps(model, batch: dict, chunk_size: int = 256, temperature: float = 1.0) -> torch.Tensor:
    """log π(token) of every completion token, laid out (B, T) like `response_mask` (0 on padding),
    at the sampling `temperature` (see `completion_forward`)."""
    from posttrain.train.preference import selected_token_logps

    inputs, predictor = completion_inputs(model, batch)
    return to_grid(selected_token_logps(model, inputs, predictor, batch["targets"], chunk_size, temperature), batch)


def completion_forward(model, batch: dict, chunk_size: int = 256, value_head: torch.nn.Module | None = None,
                       entropy_grad: bool = True, temperature: float = 1.0, entropy: bool = True) -> dict:
    """One forward of the policy over the completions: {"logps", "entropy"} and, with a
    `value_head` on the final hidden states, "values" — each (B, T) like `response_mask`.
    The logits are formed a chunk of tokens at a time, never as [B, L, V]. With
    `entropy_grad=False` the entropy is a value only (a metric), which makes the backward
    cheaper (`token_logps_with_entropy_value`); with `entropy=False` it is not computed at all
    (no "entropy": a pass whose caller would discard it, such as PPO's rollout-time one).
    Log-probs and entropy are those of softmax(logits / `temperature`), the distribution the
    rollouts sampled from (so the importance ratio and the KL estimators are taken against the
    policy that drew the tokens; the reference is read at the same temperature)."""
    from posttrain.losses.language_modeling import (tempered, token_logps, token_logps_and_entropy,
                                                    token_logps_with_entropy_value)
    from posttrain.models.attention import masked_attention_kernels
    from posttrain.models.loading import final_hidden_and_head, supports_hidden_path
    from posttrain.models.readout import reading

    inputs, predictor = completion_inputs(model, batch)
    targets = batch["targets"]
    # a padding-free batch's attention has a 4-D mask: on CUDA, not cuDNN's kernel (see there)
    kernels = masked_attention_kernels(predictor.device) if "packed_slots" in inputs else contextlib.nullcontext()
    if supports_hidden_path(model):
        hidden_inputs, pick = reading(model, inputs, predictor)
        with kernels:
            hidden, weight, bias = final_hidden_and_head(model, **hidden_inputs)
        selected = pick(hidden)
        scaled, scaled_bias = tempered(selected, bias, temperature)  # the value head reads `selected` itself
        if entropy:
            both = token_logps_and_entropy if entropy_grad else token_logps_with_entropy_value
            logps, entropies = both(scaled, weight, targets, scaled_bias, chunk_size)
        else:
            logps = token_logps(scaled, weight, targets, scaled_bias, chunk_size)
    else:  # heads with logit scaling: the model's own logits
        with kernels:
            out = model(**inputs, use_cache=False, output_hidden_states=value_head is not None)
        log_probs = (out.logits.float().flatten(0, 1)[predictor] / temperature).log_softmax(-1)
        logps = log_probs.gather(1, targets[:, None])[:, 0]
        entropies = -(log_probs.exp() * log_probs).sum(-1) if entropy else None
        selected = out.hidden_states[-1].flatten(0, 1)[predictor] if value_head is not None else None
    out = {"logps": to_grid(logps, batch)}
    if entropy:
        out["entropy"] = to_grid(entropies, batch)
    if value_head is not None:
        out["values"] = to_grid(value_head(selected).squeeze(-1).float(), batch)
    return out


def summed(per_token: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """The numerator of a micro-batch's loss, which the loop divides by the step's weight
    (`RolloutStage.weight`): Σ over tokens (token aggregation, weight = tokens), or Σ over
    responses of each one's token mean (sequence aggregation, weight = responses)."""
    if aggregation == "token":
        return (per_token * mask).sum()
    return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1)).sum()


def summed_figure(per_token: torch.Tensor, token_mean: torch.Tensor, mask: torch.Tensor,
                  aggregation: str) -> torch.Tensor:
    """A figure's numerator (a clip fraction, an approximate KL), weighted as the loss is, so the
    step's figure does not depend on how micro-batches split the rollout: under sequence
    aggregation Σ over responses of each one's token mean (`summed`); under token aggregation
    the micro-batch's token mean × its tokens (that is Σ over tokens, rounded as it always was)."""
    if aggregation == "token":
        return token_mean * summed(torch.ones_like(mask), mask, aggregation)
    return summed(per_token, mask, aggregation)


def no_grad_eval(model, autocast, fn, *args):
    """fn(model, *args) in eval mode, without gradients, under `autocast`; the training mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast():
            return fn(model, *args)
    finally:
        model.train(was_training)


# --------------------------------------------------------------------------- sampling and scoring


@dataclass
class RolloutStats:
    # of the rewards after the no-EOS penalty, before reward.normalize and reward.clip (TRL's
    # objective/scores); the rewards trained on are `Rollout.rewards`
    reward_mean: float
    reward_std: float
    response_tokens_mean: float
    ended_fraction: float
    rollout_s: float
    reward_s: float
    rollout_tokens_per_s: float
    # fraction of prompts whose G samples all got the same reward, right or wrong alike: no
    # group-relative signal; None for G = 1, where every group agrees with itself
    flat_groups: float | None
    rollout_tokens: int = 0  # the completions' tokens: over several steps, the rate is their sum over rollout_s's


@dataclass
class Rollout:
    """P prompts × G completions, prompt by prompt (sample k of prompt i at i·G + k)."""
    prompt_ids: list[list[int]]
    completions: list[list[int]]  # token ids, ending with EOS when the model ended
    texts: list[str]
    records: list[PromptRecord]
    rewards: torch.Tensor  # (P·G,) trained on: after the no-EOS penalty, normalising and clipping
    stats: RolloutStats
    components: dict[str, float] = field(default_factory=dict)  # each reward's raw mean, when several
    scored: torch.Tensor | None = None  # (P·G,) float64: the reward as scored, before the penalty (None: `rewards`)


def sample_and_score(engine, tokenizer, prompts: list[list[int]], records: list[PromptRecord], chosen: list[int],
                     cfg, score: Callable, seed: int) -> Rollout:
    """Sample `cfg.rollout.num_generations` completions for each chosen prompt with `engine` (a
    `rollout.engines.RolloutEngine`) and score them. A reward failing on a completion (raising,
    or returning NaN) is said with its prompt row's file:line."""
    from posttrain.rewards import reward_seed, rows_named
    from posttrain.rollout.generate import (_make_stop_check, completion_text, eos_token_ids, pad_token_id,
                                            stop_strings, stop_token_ids)
    from posttrain.rollout.sampling import SamplingSettings

    r, group = cfg.rollout, cfg.rollout.num_generations
    stop = stop_strings(tokenizer, r.stop)  # and the chat template's end-of-turn marker when it is several tokens
    settings = SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, min_p=r.min_p, stop=stop, seed=seed)
    prompt_ids = [prompts[i] for i in chosen for _ in range(group)]
    eos = eos_token_ids(engine, tokenizer)  # the tokenizer's and the policy's generation_config's
    # a stop string spelled as one special token ('<|im_start|>') ends a row as an EOS does
    ends = eos | stop_token_ids(tokenizer, stop)
    started = time.perf_counter()
    completions = engine.generate(prompt_ids, settings, eos_token_ids=ends, pad_token_id=pad_token_id(tokenizer, eos),
                                  stop_check=_make_stop_check(tokenizer, stop) if stop else None)
    rollout_s = time.perf_counter() - started
    raw, completions = completions, [c if c else [next(iter(eos))] for c in completions]  # at least one token
    full = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    # cut at the stop strings as the row was ended: one led by a special token ('<|im_start|>user') at that token
    texts = [completion_text(tokenizer, c, stop) for c in completions]
    # ended: by an EOS token or at a stop string (cut off by max_new_tokens otherwise)
    ended = torch.tensor([bool(c) and (c[-1] in ends or len(cut) < len(text)) for c, cut, text in zip(raw, texts, full)])
    chosen_records = [records[i] for i in chosen for _ in range(group)]
    started = time.perf_counter()
    prompts_, rows = [rec.prompt for rec in chosen_records], [rec.reward_row() for rec in chosen_records]
    # a reward's failure is named by its prompt row's file:line (not its place in a rollout of random
    # prompts); a reward drawing random numbers draws by the rollout's seed (rewards.reward_seed)
    with rows_named([rec.source for rec in chosen_records]), reward_seed(seed):
        totals, components = scored_with_components(score, prompts_, texts, rows)
    # float64 until the rewards are final: float32's round-off in a mean and a std of equal
    # rewards, divided by that std, gave them non-zero z-scores
    scored = torch.tensor(totals, dtype=torch.float64)
    rewards = scored - cfg.reward.no_eos_penalty * (~ended).double()
    penalised = rewards  # the figures logged: normalised rewards' mean is ~0 whatever the policy does
    if cfg.reward.normalize and len(rewards) > 1:  # a reward model's scale means nothing to the step size
        rewards = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    if cfg.reward.clip > 0:
        rewards = rewards.clamp(-cfg.reward.clip, cfg.reward.clip)
    rewards = rewards.float()
    if not torch.isfinite(rewards).all():  # each component is in range (rewards.py); a weighted sum may not be
        bad = int((~torch.isfinite(rewards)).nonzero()[0])
        raise DataError(f"{chosen_records[bad].source}: the total reward of response {bad + 1} (of {len(rewards)}) "
                        f"is {totals[bad]:g}, beyond float32's range: lower reward.weights, or set reward.clip")
    reward_s = time.perf_counter() - started
    grouped = rewards.view(-1, group)
    generated = sum(len(c) for c in completions)
    stats = RolloutStats(
        reward_mean=float(penalised.mean()), reward_std=float(penalised.std()) if len(penalised) > 1 else 0.0,
        response_tokens_mean=generated / len(completions), ended_fraction=float(ended.float().mean()),
        rollout_s=rollout_s, reward_s=reward_s, rollout_tokens_per_s=generated / max(rollout_s, 1e-9),
        # with one sample a prompt (PPO's default) every "group" agrees with itself: not a figure
        flat_groups=float((grouped.max(1).values == grouped.min(1).values).float().mean()) if group > 1 else None,
        rollout_tokens=generated)
    return Rollout(prompt_ids, completions, texts, chosen_records, rewards, stats, components, scored)


def scored_with_components(score: Callable, prompts, texts: list[str], rows) -> tuple[list[float], dict[str, float]]:
    """The total rewards of `texts` and, when `score` combines several rewards (a
    `rewards.CombinedReward`), each component's raw mean (before weights and floors); else {}."""
    if not hasattr(score, "score"):
        return score(prompts, texts, rows), {}
    totals, raw = score.score(prompts, texts, rows)
    return totals, ({name: sum(values) / len(values) for name, values in raw.items()} if len(raw) > 1 else {})


def _sample_position(line: str) -> tuple[int, int]:
    """(epoch, rollout) of a samples.jsonl row; a torn or foreign line sorts last (dropped)."""
    try:
        row = json.loads(line)
        return int(row["epoch"]), int(row["rollout"])
    except (ValueError, KeyError, TypeError):
        return (2**62, 0)


def batches_state(batches: list[dict]) -> dict[str, torch.Tensor]:
    """A rollout's micro-batches as flat tensors for a checkpoint (`restore_batches` reads them)."""
    return {f"{i}.{key}": value.contiguous() for i, batch in enumerate(batches) for key, value in batch.items()}


def restore_batches(count: int, tensors: dict[str, torch.Tensor]) -> list[dict]:
    batches: list[dict] = [{} for _ in range(count)]
    for name, value in tensors.items():
        i, key = name.split(".", 1)
        batches[int(i)][key] = value
    return batches


EPOCH_PLAN = 2
"""How an online-RL run lays its epochs out in rollouts and seeds them, kept in each checkpoint's
stage state (`epoch_plan`) so that a resume reads and samples as the run it continues did:
  1  checkpoints written before it was kept: ⌊N / P⌋ rollouts an epoch, the N mod P prompts at the
     end of the epoch's order unread; rollout seeds seed·1,000,003 + epoch·10,007 + index (which
     repeat: epoch 0's rollout 10,007 is epoch 1's rollout 0);
  2  ⌈N / P⌉ rollouts an epoch, the last topped up from the start of the same order, so every prompt
     is read each epoch (`RolloutStage.rollout_prompts`); rollout seeds seed·1,000,003 + the
     rollout's number in the run (epoch · rollouts an epoch + index), one per rollout."""


class RolloutStage:
    """Loop hooks shared by the online-RL stages; subclasses sample rollouts in `micro_batches_after`.

    `engine` samples the rollouts (default: the policy itself through transformers). An engine
    with its own copy of the weights (vLLM) is synced lazily: the loop's `after_optimizer_step`
    marks the copy stale, and the next rollout pushes the policy's weights first. That is once
    per rollout however many steps it feeds (PPO's epochs x minibatches, GRPO's μ), and once
    before the first rollout, which also covers a resumed run's restored weights."""

    # a log line over several steps: the rollouts' tokens over their generation time, not a mean of rates
    rates = {"rollout/rollout_tokens_per_s": ("rollout/rollout_tokens", "rollout/rollout_s")}
    # what generating the rollout cost (seconds, tokens): on the line of the step that generated it
    # alone, not repeated by the steps that reuse it (PPO's epochs, GRPO's μ), so summed over
    # lines they count each rollout once; its descriptive figures (reward_mean, ...) are on every step
    generation_figures = frozenset({"rollout_s", "reward_s", "rollout_tokens", "rollout_tokens_per_s",
                                    "weight_sync_s"})
    epoch_plan = EPOCH_PLAN  # a resumed run's: its checkpoint's (`RLRun.keep_checkpoint_plan`)
    shuffle_name = ""  # the stage's name in its epochs' shuffle seeds ("grpo", "ppo")
    _order: tuple[int, list[int]] | None = None  # (epoch, its shuffled order): the last one drawn

    def __init__(self, module: torch.nn.Module, prompts: list[list[int]], records: list[PromptRecord], cfg,
                 tokenizer, score: Callable, run_dir: Path | None, autocast=contextlib.nullcontext,
                 adapter_training=None, frozen_reference=None, world: int = 1, engine=None):
        from posttrain.rollout.engines import TransformersEngine

        self.module, self.prompts, self.records, self.cfg = module, prompts, records, cfg
        self.tokenizer, self.score, self.run_dir, self.autocast = tokenizer, score, run_dir, autocast
        self.frozen_reference = frozen_reference
        self.group = cfg.rollout.num_generations
        self.batches_per_update = cfg.train.grad_accum * world  # micro-batches of one optimizer step, all processes
        self.rollout_metrics: dict[str, float] = {}
        self.rollout_fresh = False  # a rollout generated since the last step's figures: its cost not yet logged
        self.rollouts_done = 0
        self._samples_trimmed = False
        self.engine = engine if engine is not None else TransformersEngine(self._policy(), cfg.rollout.batch_size,
                                                                           autocast)
        self.engine_stale = not self.engine.is_policy  # built from the checkpoint; the policy may differ already
        if adapter_training is not None:
            self.lr_scale = adapter_training.lr_scale
            self.inactive_parameters = adapter_training.inactive_parameters

    def check_resumable(self, plain: dict) -> None:
        """A checkpoint's rollouts must hold as many prompts as this run's: its position (which
        rollout, which update) counts them, and a rollout is the algorithm's batch. Processes ×
        train.grad_accum (and PPO's minibatches) set the size; resuming with another is refused.
        Its epochs must be laid out and seeded as this stage's (`EPOCH_PLAN`): a checkpoint of
        another plan is refused (`RLRun.keep_checkpoint_plan` has a run take its checkpoint's)."""
        saved = plain.get("prompts_per_rollout", self.prompts_per_rollout)
        if saved != self.prompts_per_rollout:
            raise ConfigError(f"this checkpoint's rollouts hold {saved} prompts, this run's {self.prompts_per_rollout}: "
                              "resume with the processes x train.grad_accum x train.batch_size it was written with")
        plan = plain.get("epoch_plan", 1)
        if plan != self.epoch_plan:
            raise ConfigError(f"this checkpoint lays its epochs out by plan {plan} (rollouts.EPOCH_PLAN), this stage by "
                              f"plan {self.epoch_plan}: set the stage's epoch_plan to the checkpoint's before training "
                              "(posttrain grpo and ppo do: RLRun.keep_checkpoint_plan), or start afresh")

    def plan_state(self) -> dict:
        """What `check_resumable` reads of a checkpoint's stage state."""
        return {"prompts_per_rollout": self.prompts_per_rollout, "epoch_plan": self.epoch_plan}

    # -- an epoch's rollouts (`EPOCH_PLAN`)

    def rollouts_per_epoch(self) -> int:
        """Rollouts reading an epoch of N prompts, P a rollout: ⌈N / P⌉, the last topped up
        (`rollout_prompts`); ⌊N / P⌋ under plan 1. 0 without prompts."""
        whole, left = divmod(len(self.prompts), self.prompts_per_rollout)
        return whole + (1 if left and self.epoch_plan >= 2 else 0)

    def rollout_prompts(self, epoch: int, index: int) -> list[int]:
        """The prompts (their indices) rollout `index` of `epoch` samples: the next P of the epoch's
        order, a fresh shuffle seeded by (train.seed, epoch). The last rollout's short end is topped
        up from the start of the same order (round again should N < P), as the loop tops up an
        epoch's last step (`loop._steps`): every prompt is read each epoch, those first P − N mod P
        twice."""
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.prompts)))
            random.Random(f"posttrain-{self.shuffle_name}-{self.cfg.train.seed}-{epoch}").shuffle(order)
            self._order = (epoch, order)
        order, size = self._order[1], self.prompts_per_rollout
        return [order[(index * size + i) % len(order)] for i in range(size)]

    def rollout_seed(self, epoch: int, index: int) -> int:
        """The sampling seed of rollout `index` of `epoch` (`EPOCH_PLAN`): from train.seed and the
        rollout's place in the run, so a resumed run samples what the uninterrupted one did."""
        seed = self.cfg.train.seed * 1_000_003 + index
        if epoch:  # (epoch 0's are the same under both plans)
            seed += epoch * (10_007 if self.epoch_plan == 1 else self.rollouts_per_epoch())
        return seed % (2**31)

    def epoch_figures(self) -> dict[str, int]:
        """How an epoch reads the prompts: N, P, the rollouts, the prompts read twice (topped up)
        and those left unread (plan 1's N mod P)."""
        n, size, rollouts = len(self.prompts), self.prompts_per_rollout, self.rollouts_per_epoch()
        return {"prompts": n, "prompts_per_rollout": size, "rollouts": rollouts,
                "topped_up": max(rollouts * size - n, 0), "unread": max(n - rollouts * size, 0)}

    def after_optimizer_step(self, step: int) -> None:
        if not self.engine.is_policy:
            self.engine_stale = True

    def micro_batches(self, epoch: int):
        return self.micro_batches_after(epoch, 0)

    def weight(self, batch) -> float:
        if self.aggregation == "token":
            return float(batch["response_mask"].sum())
        return float(batch["response_mask"].shape[0])

    def tokens(self, batch) -> int:
        return int(batch["attention_mask"].sum())

    def eval_micro_batches(self) -> list[dict]:
        return []  # held-out figures come from generation (`held_out_reward`), not from a loss

    def finish_metrics(self, metrics: dict) -> dict:
        """The step's metrics and its rollout's figures; its generation figures only for the step that
        generated it (`generation_figures`: a resumed run's restored rollout is not fresh either)."""
        fresh, self.rollout_fresh = self.rollout_fresh, False
        return metrics | {f"rollout/{k}": v for k, v in self.rollout_metrics.items()
                          if fresh or k not in self.generation_figures}

    def _policy(self):
        return self.module.model

    def _sample(self, chosen: list[int], epoch: int, index: int) -> Rollout:
        sync_s = self._sync_engine()
        seed = self.rollout_seed(epoch, index)
        rollout = sample_and_score(self.engine, self.tokenizer, self.prompts, self.records, chosen, self.cfg,
                                   self.score, seed)
        self.rollout_metrics = {k: v for k, v in rollout.stats.__dict__.items() if v is not None} | {f"reward/{n}": v for n, v in rollout.components.items()}
        if not self.engine.is_policy:
            self.rollout_metrics["weight_sync_s"] = sync_s
        self._write_samples(epoch, index, rollout)
        self.rollouts_done += 1
        self.rollout_fresh = True
        return rollout

    def _sync_engine(self) -> float:
        """Push the policy's weights into a separate engine if they changed since the last push;
        returns the seconds it took."""
        if not self.engine_stale:
            return 0.0
        started = time.perf_counter()
        self.engine.sync(self._policy())
        self.engine_stale = False
        return time.perf_counter() - started

    def _write_samples(self, epoch: int, index: int, rollout: Rollout) -> None:
        """Every eval.sample_every-th rollout's first two prompts, all their samples, to samples.jsonl:
        each completion's `reward` as the reward scored it and, when the no-EOS penalty,
        reward.normalize or reward.clip changed it, the value trained on as `trained_reward`."""
        every = self.cfg.eval.sample_every
        if self.run_dir is None:
            return
        path = self.run_dir / "samples.jsonl"
        if not self._samples_trimmed:
            # This run's first rollout: rows of this rollout or later are an earlier run's (a fresh
            # start, or what a killed run sampled after its last checkpoint), and are dropped.
            self._samples_trimmed = True
            if path.is_file():
                lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
                write_atomically(path, "".join(line for line in lines if _sample_position(line) < (epoch, index)))
        if not every or self.rollouts_done % every:
            return
        scored = rollout.rewards if rollout.scored is None else rollout.scored
        with path.open("a", encoding="utf-8") as fh:
            for i in range(min(2 * self.group, len(rollout.texts))):  # two prompts, all their samples
                row = {"epoch": epoch, "rollout": index, "prompt": rollout.records[i].prompt[-1]["content"],
                       "completion": rollout.texts[i], "reward": float(scored[i])}
                if float(rollout.rewards[i]) != float(scored[i].float()):  # (the rewards trained on are float32)
                    row["trained_reward"] = float(rollout.rewards[i])
                fh.write(json.dumps(row) + "\n")

    def _logps(self, model, batch) -> torch.Tensor:
        return no_grad_eval(model, self.autocast, completion_logps, batch, self.cfg.train.loss_chunk_size,
                            self.cfg.rollout.temperature).float()


# --------------------------------------------------------------------------- rewards and held-out evaluation


def build_reward(cfg, device=None, log=None):
    """The configured reward: functions, reward models and a format check, combined with weights
    and floors (`rewards.CombinedReward`'s rule, reward.floor_penalty its penalty). Reward models
    run on `device`, read at most reward.max_length tokens (0: their position table) and read each
    conversation with their own saved template (the one they trained with), whatever the policy's
    `data.template`; `log` hears their notes."""
    from posttrain.rewards import RewardComponent, build_combined, format_reward, set_by_name

    extra = [RewardComponent("format", format_reward(cfg.reward.format_regex))] if cfg.reward.format_regex else []
    combined = build_combined(cfg.reward.models, cfg.reward.functions, [], [], device=device, log=log,
                              functions_option="reward.functions", extra=extra,
                              max_length=cfg.reward.max_length or None, floor_penalty=cfg.reward.floor_penalty)
    set_by_name(combined.components, cfg.reward.weights, "reward.weights", "weight")
    set_by_name(combined.components, cfg.reward.floors, "reward.floors", "floor")
    return combined


def check_reward_functions(cfg) -> dict:
    """What can be checked of the reward before any model loads: every reward.functions entry
    (NAME=module:function) imports and names a function posttrain can call, format_regex
    compiles, the components' names differ (a function named `format` beside format_regex, a
    function and a reward model both named `judge`: `CombinedReward`'s rule), and each
    reward.weights and reward.floors entry names a component with a finite number. (The reward
    models are checked when they load.) Raises ConfigError naming the setting; returns the
    functions by name, for `check_prompt_rows`."""
    from posttrain.rewards import (CombinedReward, RewardComponent, _pairs_option, format_reward, function_reward,
                                   model_component, set_by_name)

    functions = _pairs_option(cfg.reward.functions, "reward.functions", repeat=False)
    rewards = {name: function_reward(spec) for name, spec in functions.items()}
    if cfg.reward.format_regex:
        format_reward(cfg.reward.format_regex)
    names = [model_component(i, item, len(cfg.reward.models))[0] for i, item in enumerate(cfg.reward.models)]
    names += [*functions, *(["format"] if cfg.reward.format_regex else [])]
    if not names:
        raise ConfigError("no reward: set reward.functions, reward.models or reward.format_regex")
    components = CombinedReward([RewardComponent(name, None) for name in names]).components  # distinct names
    set_by_name(components, cfg.reward.weights, "reward.weights", "weight")
    set_by_name(components, cfg.reward.floors, "reward.floors", "floor")
    return rewards


def check_prompt_rows(rewards: dict, records: list[PromptRecord]) -> None:
    """Every prompt row has what the reward functions read of it (exact_match: its 'answer'),
    checked once the rows are read, before the policy loads; else a DataError naming the first
    row lacking it by file:line (it would fail at the first rollout otherwise, without one)."""
    from posttrain.errors import DataError
    from posttrain.rewards import missing_row_key

    problem = missing_row_key(rewards, records)
    if problem is not None:
        raise DataError(problem)


def held_out_reward(model, tokenizer, prompts: list[list[int]], records: list[PromptRecord], score, cfg,
                    autocast=contextlib.nullcontext, frozen_reference=None, policy_is_reference: bool = False) -> dict:
    """The policy on held-out prompts:

    reward            mean reward of `eval.samples` completions per prompt, sampled as in the
                      rollouts (E_{y~π}[r(x, y)]), with a fixed seed: the combined reward, before
                      the rollouts' no-EOS penalty, normalising and clipping
    greedy_reward     mean reward of the greedy answer (sharpening alone does not move it)
    reward/<name>     with several rewards (a `rewards.CombinedReward`), each component's raw
    greedy_reward/<name>  mean (before weights and floors) over the sampled / greedy answers
    kl_to_reference   mean over the sampled completions of Σ_t (log π − log π_ref), a sampled
                      estimate of KL(π‖π_ref) per response; None when no reference is kept
                      (full fine-tuning without a KL term); 0.0 without a forward when
                      `policy_is_reference` (before any step: the reference is the starting
                      policy, `RLRun.held_out`)
    kl_se             its standard error s/√n over the sampled responses (None below two), when
                      measured: a negative mean is then said as noise or not (`report.kl_figure`)"""
    from posttrain.rewards import rows_named
    from posttrain.rollout.generate import (_make_stop_check, completion_text, eos_token_ids, generate_token_ids,
                                            pad_token_id, stop_strings)
    from posttrain.rollout.sampling import SamplingSettings

    n = min(cfg.eval.prompts, len(prompts))
    if n <= 0:
        return {}
    r, k = cfg.rollout, cfg.eval.samples
    eos = eos_token_ids(model, tokenizer)
    stop = stop_strings(tokenizer, r.stop)  # as the rollouts'

    def answer(ids: list[list[int]], settings) -> list[list[int]]:
        with autocast():
            out = generate_token_ids(model, ids, settings, pad_token_id=pad_token_id(tokenizer, eos),
                                     eos_token_ids=eos, batch_size=r.batch_size,
                                     stop_check=_make_stop_check(tokenizer, stop) if stop else None)
        return [c if c else [next(iter(eos))] for c in out]

    def rewards(completions, recs, name: str) -> float:  # cut at the stop strings, as the rollouts' are
        texts = [completion_text(tokenizer, c, stop) for c in completions]
        with rows_named([x.source for x in recs]):  # a reward failing on one: its prompt row, by file:line
            totals, means = scored_with_components(score, [x.prompt for x in recs], texts,
                                                   [x.reward_row() for x in recs])
        components.update({f"{name}/{component}": mean for component, mean in means.items()})
        return sum(totals) / len(totals)

    greedy = answer(prompts[:n], SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=0.0))
    sampled_ids = [p for p in prompts[:n] for _ in range(k)]
    sampled_recs = [x for x in records[:n] for _ in range(k)]
    sampled = answer(sampled_ids, SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature,
                                                   top_p=r.top_p, top_k=r.top_k, min_p=r.min_p,
                                                   seed=cfg.train.seed + 7919))
    components: dict[str, float] = {}
    out = {"reward": rewards(sampled, sampled_recs, "reward"),
           "greedy_reward": rewards(greedy, records[:n], "greedy_reward"), "prompts": n, "samples": k,
           "response_tokens": sum(map(len, sampled)) / len(sampled), "kl_to_reference": None} | components
    if (frozen_reference is not None or hasattr(model, "adapters_disabled")) and policy_is_reference:
        out["kl_to_reference"] = 0.0
    elif frozen_reference is not None or hasattr(model, "adapters_disabled"):
        from posttrain.eval.alignment import mean_and_se

        kl = mean_and_se(_sequence_kl(model, tokenizer, sampled_ids, sampled, autocast, frozen_reference, r.temperature,
                                      cfg.train.loss_chunk_size))
        out["kl_to_reference"], out["kl_se"] = kl["mean"], kl["se"]  # the same mean: Σ values / n
    return out


def _sequence_kl(model, tokenizer, prompt_ids, completions, autocast, frozen_reference,
                 temperature: float = 1.0, chunk_size: int = 256) -> list[float]:
    """Σ_t log π(y_t) − log π_ref(y_t) of each sampled response, at `temperature`: one value per
    response, whose mean over responses sampled from π estimates KL(π‖π_ref) per response."""
    from posttrain.train.preference import reference_weights

    values, device = [], next(model.parameters()).device
    for start in range(0, len(completions), 64):
        batch = collate_completions(prompt_ids[start : start + 64], completions[start : start + 64],
                                    tokenizer.pad_token_id)
        batch = {key: v.to(device) for key, v in batch.items()}
        logps = no_grad_eval(model, autocast, completion_logps, batch, chunk_size, temperature)
        with reference_weights(model, frozen_reference) as reference:
            ref = no_grad_eval(reference, autocast, completion_logps, batch, chunk_size, temperature)
        values += ((logps.float() - ref.float()) * batch["response_mask"]).sum(-1).tolist()
    return values


def _kl_said(figures: dict) -> str:
    """The held-out KL as evaluate's report says it (`report.kl_figure`: ± its standard error over
    the sampled responses, and a negative mean said as sampling noise or not, KL itself never
    being below 0); measured without one (0 before training, or one response), the mean alone."""
    from posttrain.eval.report import kl_figure

    if figures.get("kl_se") is None:
        return f"{figures['kl_to_reference']:.3f} per response"
    return kl_figure(figures | {"kl_responses": figures["prompts"] * figures["samples"]})


def log_held_out(figures: dict, when: str, log) -> None:
    if figures:
        kl = figures["kl_to_reference"]
        parts = [f"{name.split('/', 1)[1]} {value:.3f}/{figures['greedy_' + name]:.3f}"
                 for name, value in figures.items() if name.startswith("reward/")]
        log(f"held-out reward {when} training: {figures['reward']:.3f} sampled ({figures['samples']} per prompt), "
            f"{figures['greedy_reward']:.3f} greedy, on {figures['prompts']} prompts"
            + ("" if kl is None else f"; KL to reference {_kl_said(figures)}")
            + (f"; per reward, sampled/greedy: {', '.join(parts)}" if parts else ""))


@dataclass
class RLRun:
    """What an online-RL run sets up before its stage: the run directory and accelerator, the
    policy, prompts, reward and (when a KL term needs one) the reference copy."""
    cfg: object
    run_dir: Path
    accelerator: object
    main: bool
    log: Callable
    tokenizer: object
    model: torch.nn.Module
    adapter_training: object
    train_ids: list[list[int]]
    train_records: list[PromptRecord]
    eval_ids: list[list[int]]
    eval_records: list[PromptRecord]
    data_report: dict
    score: Callable
    frozen_reference: object  # a frozen copy, a StartingVirtualTokens or None (`preference.reference_weights`)
    engine: object  # the rollout engine (`rollout.engines`)
    evaluated: tuple[int, dict] | None = None  # (step, held-out figures) of the loop's latest evaluation

    def stage_args(self) -> tuple:
        """The arguments every RolloutStage takes after its module."""
        return (self.train_ids, self.train_records, self.cfg, self.tokenizer, self.score,
                self.run_dir if self.main else None, self.accelerator.autocast, self.adapter_training,
                self.frozen_reference, self.accelerator.num_processes, self.engine)

    def train(self, stage, summary: dict) -> tuple[object, dict]:
        """`stage` through THE loop as every online-RL run trains it: its prompts checked to fill a
        rollout, forgetting.* and the held-out figures at each evaluation attached. Returns the
        loop's result and the run's summary: `summary` (the algorithm's own keys), the prompts and
        data report, the held-out figures and forgetting report before and after training, the
        loop's summary and the rollouts done."""
        from posttrain.train.loop import train
        from posttrain.train.runs import run_fingerprint

        self.keep_checkpoint_plan(stage)
        self.check_enough_prompts(stage)
        self.report_epochs(stage)
        control = self.attach_forgetting(stage)
        self.attach_evaluation(stage)
        summary = summary | {"train_prompts": len(self.train_ids), "eval_prompts": len(self.eval_ids),
                             "data": self.data_report, "held_out_before": self.held_out(self.model, "before")}
        summary.update(self.forgetting_report(control, self.model, "before"))
        result = train(stage, self.cfg.train, self.run_dir, self.accelerator, run_fingerprint(self.cfg))
        trained = result.module.model
        summary.update(result.summary(), rollouts=stage.rollouts_done,
                       held_out_after=self.held_out(trained, "after", result.step))
        summary.update(self.forgetting_report(control, trained, "after"))
        return result, summary

    def attach_forgetting(self, stage):
        """`forgetting.*` on the policy (train.forgetting): returns the control, or None when off.
        The retain rows are cut at data.max_prompt_length + rollout.max_new_tokens, which the
        prompts kept need not reach: the longest must fit the policy's positions too
        (`check_retain_positions`)."""
        from posttrain.train.forgetting import attach, build_control

        control = build_control(self.cfg, self.tokenizer, self.model, self.accelerator,
                                self.run_dir if self.main else None, self.log)
        if control is not None and control.retain is not None:
            check_retain_positions(self.model, control.retain.pool + control.retain.held_out)
        attach(stage, control)
        return control

    def forgetting_report(self, control, model, when: str) -> dict:
        """forgetting.report with this run's tokenizer and generation budget."""
        from posttrain.train.forgetting import report

        return report(self.cfg, control, model, self.tokenizer, when, self.cfg.rollout.max_new_tokens, self.main)

    def keep_checkpoint_plan(self, stage) -> None:
        """A run resuming a checkpoint (the one train.resume names, `runs._resume_path`) keeps the
        epoch plan it was written under (`EPOCH_PLAN`; 1 when it kept none): the resumed run reads,
        samples and plans its steps as the run it continues (the loop keeps the checkpoint's planned
        steps, `loop.plan_total_steps`), where the current plan's longer epochs would add steps to
        a run part-way through its learning-rate schedule, or to a finished one."""
        from posttrain.train import checkpoint
        from posttrain.train.runs import _resume_path

        found = _resume_path(self.cfg.train.resume, self.run_dir / "checkpoints")
        saved = checkpoint.load_stage_state(found) if found is not None else None
        if saved is not None:
            stage.epoch_plan = saved[0].get("epoch_plan", 1)

    def report_epochs(self, stage) -> None:
        """How an epoch reads the training prompts (`RolloutStage.epoch_figures`), in data_report.json
        (`rl_epoch`) and, when P does not divide N, said in one line: the last rollout topped up
        from the epoch's start or, under a checkpoint's plan 1 (`keep_checkpoint_plan`), the
        prompts each epoch leaves unread."""
        from posttrain.data.pipeline import write_report

        figures = stage.epoch_figures()
        self.data_report = self.data_report | {"rl_epoch": figures}
        write_report(self.run_dir if self.main else None, self.data_report)
        said = (f"train: {_counted(figures['prompts'], 'prompt')}, {figures['prompts_per_rollout']} a rollout: "
                f"{_counted(figures['rollouts'], 'rollout')} an epoch")
        if figures["topped_up"]:
            self.log(f"{said}, the last topped up with {_counted(figures['topped_up'], 'prompt')} from the epoch's "
                     "start (read twice that epoch)")
        elif figures["unread"]:
            self.log(f"{said}, {_counted(figures['unread'], 'prompt')} at the end of each epoch's order unread: "
                     "the plan of the checkpoint resumed from, written before an epoch's last rollout was topped "
                     "up (a fresh start reads every prompt each epoch)")

    def check_enough_prompts(self, stage) -> None:
        if len(self.train_ids) < stage.prompts_per_rollout:
            from posttrain.errors import DataError

            raise DataError(f"{len(self.train_ids)} training prompts are fewer than the {stage.prompts_per_rollout} "
                            "one rollout needs")

    def held_out(self, model, when: str, step: int | None = None) -> dict:
        """`held_out_reward` on the eval prompts (main process only), logged. "before" is before
        any step (a resume loads its weights later, in the loop): the policy is then its own
        reference, and its KL to it 0 without a forward. "after" the loop's last `step`: the
        figures its evaluation at that step measured (`attach_evaluation`), not measured twice."""
        if not self.main:
            return {}
        if when == "after" and self.evaluated is not None and self.evaluated[0] == step:
            figures = self.evaluated[1]
        else:
            figures = held_out_reward(model, self.tokenizer, self.eval_ids, self.eval_records, self.score, self.cfg,
                                      self.accelerator.autocast, self.frozen_reference,
                                      policy_is_reference=when == "before")
        log_held_out(figures, when, self.log)
        return figures

    def attach_evaluation(self, stage) -> None:
        """The held-out reward at each of the loop's evaluations (train.eval_every, and the last
        step), as its `held_out_figures` hook: eval_reward, eval_greedy_reward, eval_kl_to_reference
        (when a reference is kept) and eval_response_tokens in metrics.jsonl. Measured on the main
        process (the others wait for it at the next step's reduction); nothing without held-out
        prompts (eval.prompts 0, or none set aside). With several rewards, each component's
        held-out means too: eval_reward/<name>, eval_greedy_reward/<name>."""
        if min(self.cfg.eval.prompts, len(self.eval_ids)) <= 0:
            return

        def held_out_figures(module, accelerator, step: int) -> dict[str, float]:
            if not self.main:
                return {}
            figures = held_out_reward(stage._policy(), self.tokenizer, self.eval_ids, self.eval_records, self.score,
                                      self.cfg, self.accelerator.autocast, self.frozen_reference)
            self.evaluated = (step, figures)
            return {name: value for name, value in figures.items() if value is not None and (
                name in ("reward", "greedy_reward", "kl_to_reference", "response_tokens") or "/" in name)}

        stage.held_out_figures = held_out_figures


def _counted(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def start_rl_run(cfg, needs_reference: bool, extra_parts=()) -> RLRun:
    """start_run, the policy (with its adapters), prompts and reward; a frozen reference copy
    when `needs_reference` and the policy has no adapters to switch off, or with prompt or prefix
    tuning the virtual tokens' starting weights (`preference.StartingVirtualTokens`). The policy,
    the reference and `extra_parts` (e.g. a value model) go to the accelerator's device."""
    from posttrain.data.prompts import prepare_prompts
    from posttrain.models.attention import padding_free
    from posttrain.models.loading import disable_dropout, note_full_logits
    from posttrain.rollout.engines import build_engine
    from posttrain.train.grouped import on_device
    from posttrain.train.runs import released_on_failure, start_run
    from posttrain.train.sft import build_model

    run_dir, accelerator, main, log = start_run(cfg)
    with released_on_failure(run_dir):
        rewards = check_reward_functions(cfg)  # a typo in a module or function name: said before the policy loads
        records = prepare_prompts(cfg.data, run_dir if main else None, cfg.train.seed, log,  # bad rows too
                                  eval_prompts=cfg.eval.prompts)
        check_prompt_rows(rewards, records[0] + (records[1] if cfg.eval.prompts > 0 else []))  # the rows it will score
        tokenizer, model, adapter_training = build_model(cfg, log, run_dir if main else None)
        disable_dropout(model, log, "a rollout's first update must see the policy that sampled it")
        note_full_logits(model, log)
        # before the reference copy: it takes them too
        padding_free(model, cfg.model.padding_free, log, cfg.data.max_prompt_length + cfg.rollout.max_new_tokens)
        data = encode_prompt_data(cfg, tokenizer, *records, log, run_dir if main else None)
        longest = check_rollout_positions(model, cfg, data[0] + data[2])
        score = build_reward(cfg, accelerator.device, log)
        note_reward_model_cuts(score, longest, log)
        needs_copy = needs_reference and not hasattr(model, "adapters_disabled")
        frozen = copy.deepcopy(model).requires_grad_(False).eval() if needs_copy else None
        for part in (model, frozen):  # one by one: a 4-bit base placed by device_map refuses .to
            if part is not None:
                on_device(part, accelerator.device)
        if getattr(model, "virtual_kind", None) is not None:  # kept with β = 0 too: the held-out KL reads it
            from posttrain.train.preference import StartingVirtualTokens

            frozen = StartingVirtualTokens(model)  # their starting draw: the reference is the starting policy
        engine = build_engine(cfg, model, accelerator, log)
        return RLRun(cfg, run_dir, accelerator, main, log, tokenizer, model, adapter_training, *data, score, frozen,
                     engine)


def check_rollout_positions(model, cfg, prompt_ids: list[list[int]]) -> int:
    """A ConfigError, before the first rollout, when the longest prompt kept (train or held out)
    and rollout.max_new_tokens after it do not fit the policy's positions (`loading.check_positions`);
    else the longest row a rollout can make, in tokens."""
    from posttrain.models.loading import check_positions

    lengths = {"the longest prompt": max((len(ids) for ids in prompt_ids), default=0),
               "rollout.max_new_tokens": cfg.rollout.max_new_tokens}
    check_positions(model, lengths, lower=["data.max_prompt_length", "rollout.max_new_tokens"])
    return sum(lengths.values())


def check_retain_positions(model, examples) -> None:
    """A ConfigError, before the retain loss is first measured, when the longest forgetting.retain_files
    example (`forgetting.prepare_retain_data`: cut at data.max_prompt_length + rollout.max_new_tokens)
    does not fit the policy's positions (`loading.check_positions`)."""
    from posttrain.models.loading import check_positions

    longest = max((len(example) for example in examples), default=0)
    try:
        check_positions(model, {"the longest retain row": longest},
                        lower=["data.max_prompt_length", "rollout.max_new_tokens"])
    except ConfigError as exc:
        raise ConfigError(f"forgetting.retain_files (rows cut at data.max_prompt_length + rollout.max_new_tokens): "
                          f"{exc}") from None


def note_reward_model_cuts(reward, longest: int, log) -> None:
    """Say so when a reward model reads fewer tokens than a rollout's row can hold (`longest`, in the
    policy's tokens): a decoder scores such a row by its last tokens, an encoder (pooled at its
    first) by its first (`rewards.RewardModelScorer`)."""
    from posttrain.rewards import RewardModelScorer

    for component in getattr(reward, "components", []):
        scorer = component.reward
        if isinstance(scorer, RewardModelScorer) and scorer.max_length < longest:
            log(f"note: the reward model {component.name} reads at most {scorer.max_length} tokens and a rollout's "
                f"row can hold {longest} (the longest prompt + rollout.max_new_tokens, in the policy's tokens): "
                f"a longer row is scored by its {'last' if scorer.decoder else 'first'} ones")


def encode_prompt_data(cfg, tokenizer, train_records: list[PromptRecord], eval_records: list[PromptRecord],
                       data_report: dict, log, run_dir: Path | None = None):
    """Encode the read and split prompts (`data.prompts.prepare_prompts`): (train ids, train
    records, eval ids, eval records, the data report). The report — the rows read, and of the
    prompts how many were kept and which were dropped and why (`encode_prompts_report`) — is
    written to run_dir/data_report.json, as SFT's and DPO's are (`pipeline.write_report`; nothing
    when `run_dir` is None)."""
    from posttrain.data.pipeline import write_report
    from posttrain.data.prompts import encode_prompts_report
    from posttrain.data.templates import adopt_template

    template = adopt_template(tokenizer, cfg.data.template)
    length = cfg.data.max_prompt_length
    train_ids, train_records, train_length = encode_prompts_report(train_records, tokenizer, template, length, log,
                                                                   cfg=cfg.data)
    eval_ids, eval_records, eval_length = encode_prompts_report(eval_records, tokenizer, template, length, log,
                                                                "eval", cfg=cfg.data)
    report = data_report | {"train_length": train_length, "eval_length": eval_length,
                            "train_prompts": len(train_ids), "eval_prompts": len(eval_ids)}
    write_report(run_dir, report)
    return train_ids, train_records, eval_ids, eval_records, report
