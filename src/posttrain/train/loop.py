"""THE training loop. Every stage (SFT, reward, DPO, ...) runs through `train()`.

A stage supplies a `Stage`: its micro-batches and a module mapping a batch to a summed
loss. Everything else lives here, once: gradient accumulation with exact normalisation,
data-parallel sharding, clipping, AdamW with per-layer learning rates, schedules, mixed
precision, the non-finite guard, evaluation with early stopping, crash-safe checkpoints
with bitwise resume, and logging.

Normalisation: a global step covers `world_size * grad_accum` micro-batches. Each
micro-batch's summed loss is divided by the summed weight (label tokens for SFT, prompts
for reward models and the DPO family) of the WHOLE global step, so batch 8 × accumulation
1, batch 1 × accumulation 8 and 2 processes × batch 4 all take the same gradient.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from posttrain.errors import ConfigError, Stopped, TrainingAborted
from posttrain.models.attention import training_attention_kernels
from posttrain.train import checkpoint
from posttrain.train.metrics import (AT_STEP, RATES, RunLogger, add_to_interval, close_interval, peak_memory_mb,
                                     strict_json)
from posttrain.train.optim import clip_grad_norm, lr_factor, make_optimizer, set_lr, sparse_embedding_gradients

Batch = dict[str, torch.Tensor]


class Stage(Protocol):
    """What a training stage gives the loop."""

    # forward(**batch) -> summed loss (0-dim tensor), or (summed loss, {name: summed metric}):
    # metrics are sums over the batch, normalised by the loop like the loss (÷ step weight).
    module: torch.nn.Module

    def micro_batches(self, epoch: int) -> Iterator[Batch]:
        """All micro-batches of one epoch in order, the same on every process."""

    def micro_batches_per_epoch(self) -> int | None:
        """Length of `micro_batches(epoch)`, or None when unknown (streaming)."""

    def weight(self, batch: Batch) -> float:
        """The loss normaliser this batch contributes (label tokens, prompts, ...)."""

    def tokens(self, batch: Batch) -> int:
        """Real (non-padding) tokens in the batch, for throughput."""

    def eval_micro_batches(self) -> list[Batch]:
        """Held-out micro-batches (may be empty)."""

    # Optional: micro_batches_after(epoch, skip) -> the epoch's micro-batches from the skip-th on, for
    # stages whose batches are costly to produce (RL rollouts): resume then skips without producing;
    # lr_scale(param_name) -> float multiplies a parameter's learning rate (LoRA+);
    # inactive_parameters(step) -> parameters not updated at that step (staged unfreezing);
    # finish_metrics(averaged metrics) -> metrics to log (e.g. a std from a mean square);
    # metrics_at_step: names of those metrics a log line takes from its own step rather than
    # averaging over train.log_every steps (a position or a setting: PPO's ppo_update);
    # rates: {rate: (count, seconds)}: metrics a log line over several steps takes as the steps'
    # summed count over their summed seconds, not as a mean of the steps' rates (rollout tokens/s);
    # state_dict() -> (plain values, tensors) saved in every checkpoint, and load_state_dict(plain,
    # tensors) called on resume before the first micro-batch is asked for (PPO's KL coefficient and
    # the rollout it is part-way through);
    # prepare_forwards(batches, accelerator, count) -> a context entered around the forwards of this
    # process's micro-batches of a step, or of the held-out set, on every process (KTO's z₀);
    # after_optimizer_step(step) -> called after each optimizer step that updated the weights (not
    # after a skipped non-finite one): a separate rollout engine then knows its copy is stale;
    # begin(module, accelerator) -> {name: figure} logged at step 0, called once before the first
    # step of a fresh run (not on resume: load_state_dict restores what it set up);
    # regularize(module, grad_scale, accelerator, step) -> {name: figure}: changes the trained
    # parameters' gradients after each step's backward, before clipping (a penalty's gradient added,
    # A-GEM's projection; `grad_scale`: the fp16 GradScaler's scale, which the gradients carry until
    # clipping unscales them; `step`: the 0-based optimizer step);
    # dense_gradients: True when `regularize` needs dense gradients (no sparse embedding gradients);
    # monitor(module, accelerator) -> ({name: figure}, reason to stop or None), at each evaluation;
    # held_out_figures(module, accelerator, step) -> {name: figure}: held-out figures measured otherwise
    # than by a loss (the RL stages' reward of held-out prompts, by generation), at each evaluation,
    # logged as eval_<name>; they stop nothing;
    # monitor_stop: the summary's stop_reason when the monitor stops the run (default "monitor";
    # the forgetting monitor's is "forgetting");
    # on_checkpoint() -> called as each checkpoint is saved (streamed SFT's counts of the rows read);
    # epoch_ended() -> asked after each step of a stage whose epochs may end before
    # micro_batches_per_epoch, then a most (PPO: ppo.early_stop_kl cuts rollouts' updates): True when
    # the micro-batches handed out so far end the epoch (its generator has none left). The epoch
    # then counts as read (`epochs_read` 1.0), and under train.epochs the run ends once that many
    # are read (`_passes_done`), short of its planned steps; epochs_cut_by: the setting that cuts
    # them, as the line saying so names it.


STOP_REASONS = ("max_steps", "epochs", "patience", "forgetting", "monitor")


@dataclass
class LoopResult:
    """How a run ended. `stop_reason` is one of STOP_REASONS: max_steps / epochs (every planned
    step ran: train.max_steps, or train.epochs when max_steps is 0), patience (early stopping:
    train.early_stopping_patience evaluations without improvement), or a stage monitor's stop
    (forgetting: forgetting.max_retain_increase; monitor: another stage's); `stop_detail` says
    why an early stop was made. A run stopped by a signal or by too many non-finite steps raises
    instead of returning. `wall_seconds`: the seconds `train` ran, summed over the segments of a
    resumed run (each up to the checkpoint the next one resumed from: steps a crash lost after
    its last checkpoint are not counted)."""

    step: int
    stopped_early: bool
    eval_loss: float | None
    skipped_steps: int
    module: torch.nn.Module  # unwrapped
    eval_metrics: dict[str, float] = field(default_factory=dict)  # the stage's, at the last evaluation
    stop_reason: str = "max_steps"
    stop_detail: str | None = None
    wall_seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The run's entries of summary.json."""
        return {"steps": self.step, "stopped_early": self.stopped_early, "stop_reason": self.stop_reason,
                "stop_detail": self.stop_detail, "wall_seconds": round(self.wall_seconds, 3),
                "skipped_steps": self.skipped_steps}


def _steps(stage: Stage, group: int, epoch: int, consumed: int) -> Iterator[tuple[int, int, list[Batch]]]:
    """Yield (epoch, micro-batches of that epoch used so far, the step's micro-batches) forever,
    starting `consumed` micro-batches into `epoch` (a resume: counted in micro-batches, so a run
    resumed with other processes × grad_accum neither repeats nor skips data).

    An epoch whose length is not a multiple of `group` tops its last step up from the
    start of the same epoch's order (round again if the epoch is shorter than a step), so no
    example is skipped and every step is full.
    """
    while True:
        skip_to = getattr(stage, "micro_batches_after", None)  # a stage that can skip without producing (RL)
        if skip_to is not None:
            source = skip_to(epoch, consumed)
        else:
            source = stage.micro_batches(epoch)
            for _ in range(consumed):  # resume: skip what earlier steps consumed
                next(source, None)
        while True:
            batches = [b for _, b in zip(range(group), source)]
            if not batches and consumed == 0:
                raise ConfigError("the training data produced no batches: is the dataset empty?")
            if not batches:
                break
            if len(batches) < group:  # an epoch shorter than a step goes round again
                refill = itertools.chain.from_iterable(stage.micro_batches(epoch) for _ in itertools.count())
                batches += itertools.islice(refill, group - len(batches))
                yield epoch + 1, 0, batches
                break
            consumed += len(batches)
            yield epoch, consumed, batches
        epoch, consumed = epoch + 1, 0


def plan_total_steps(stage: Stage, cfg, group: int, state: dict | None = None) -> int:
    """The optimizer steps a run plans (the learning-rate schedule's length): train.max_steps when
    set, else train.epochs passes of `stage.micro_batches_per_epoch()` at `group` (processes ×
    grad_accum) micro-batches a step, an epoch's last step topped up (`_steps`):
    max(1, ⌈epochs × ⌈per_epoch / group⌉⌉).

    A resume (`state`: the checkpoint's loop state) plans from its data position: its step + the
    steps of the rest of its epoch at this run's group, ⌈(per_epoch − read) / group⌉, + the epochs
    after it by the same rule (a fraction of an epoch as ⌈fraction × steps an epoch⌉). A run resumed
    with another train.grad_accum or number of processes (README allows it: the position counts
    micro-batches) thus reads the rest of its epochs once. Under the plan the checkpoint was saved
    with (`state["planned"]`: the same group, epochs and epoch length) it keeps that plan's steps,
    which an uninterrupted run takes: a resume continues its schedule bit for bit (an epoch cut
    short by the stage, `_passes_done`, leaves its step behind its position)."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = stage.micro_batches_per_epoch()
    if per_epoch is None:
        raise ConfigError("streaming data has no known length: set train.max_steps")
    per_step = math.ceil(per_epoch / group)
    planned = max(1, math.ceil(cfg.epochs * per_step))
    if not state or not state.get("step"):
        return planned
    earlier = state.get("planned")
    if earlier is not None and earlier[:3] == [group, cfg.epochs, per_epoch]:
        return earlier[3]
    epoch, read = _position(state, group)
    at = (epoch + 1) * per_step - math.ceil(max(per_epoch - read, 0) / group)  # in steps of this group
    return state["step"] + planned - at


def _replanned(state: dict, cfg, group: int, per_epoch: int | None, total_steps: int) -> str:
    """The line a resume under train.epochs says when its plan is not the checkpoint's run's
    (another group, processes × train.grad_accum, or other epochs: `plan_total_steps`); else ""."""
    earlier = state.get("planned")
    if cfg.max_steps > 0 or earlier is None or earlier[:3] == [group, cfg.epochs, per_epoch]:
        return ""
    return (f"train.epochs={cfg.epochs:g} at {group} micro-batch(es) a step (the checkpoint's run: train.epochs="
            f"{earlier[1]:g} at {earlier[0]}, {earlier[3]} steps planned): {max(total_steps - state['step'], 0)} more "
            f"step(s) from the checkpoint's data position, to step {total_steps}")


def _position(state: dict, group: int) -> tuple[int, int]:
    """The data position of a loop state: (epoch, its micro-batches read). A checkpoint written
    before micro_in_epoch was kept counted steps of this run's size (step_in_epoch)."""
    return state["epoch"], state.get("micro_in_epoch", state.get("step_in_epoch", 0) * group)


def _passes_done(stage: Stage, cfg, state: dict, per_epoch: int | None) -> bool:
    """Whether a run under train.epochs (max_steps 0) has read its passes over a stage whose epochs
    may end short of `micro_batches_per_epoch`, then a most (`epoch_ended`: PPO, whose
    ppo.early_stop_kl cuts a rollout's updates): its planned steps are a most too, and the run
    ends here. A fraction of an epoch counts the epoch's most micro-batches (`epochs_read`)."""
    return (cfg.max_steps <= 0 and getattr(stage, "epoch_ended", None) is not None and bool(per_epoch)
            and epochs_read(state, per_epoch) >= cfg.epochs)


def evaluate(module, stage: Stage, accelerator, batches: list[Batch] | None = None
             ) -> tuple[float, dict[str, float]] | None:
    """(held-out loss, the stage's held-out metrics), in eval mode without gradients; None
    when there is no eval data. The module must already be on `accelerator.device`.
    batches: the held-out micro-batches, collated once by a caller that evaluates again and again
    (`train`); by default `stage.eval_micro_batches()`."""
    batches = stage.eval_micro_batches() if batches is None else batches
    if not batches:
        return None
    mine = batches[accelerator.process_index :: accelerator.num_processes]
    # A process left without a batch (fewer batches than processes) still computes one and
    # adds it times 0: every process must bring the same metric names to the reduction.
    idle = not mine
    mine = mine or batches[:1]
    sums = _Sums(accelerator)
    weight = sum(stage.weight(b) for b in batches)
    model = accelerator.unwrap_model(module)  # no DDP forward: its buffer broadcast would wait for idle ranks
    model.eval()
    # autocast here too: before training the module is not yet wrapped by accelerate, and
    # held-out figures must be computed in the precision training uses.
    with torch.no_grad(), accelerator.autocast(), _prepared(stage, mine, accelerator, count=not idle):
        for batch in mine:
            output = model(**to_device(batch, accelerator.device))
            sums.add(_times(output, 0.0) if idle else output)
    model.train()
    loss, metrics = sums.reduce(weight)
    return loss, getattr(stage, "finish_metrics", dict)(metrics)


def _prepared(stage: Stage, batches: list[Batch], accelerator, count: bool = True):
    """The context of the forwards of this process's micro-batches of a step (or of the held-out
    set): the stage's `prepare_forwards` if it has one (KTO's z₀ over the whole step). Every
    process enters it: it may reduce across them."""
    prepare = getattr(stage, "prepare_forwards", None)
    return contextlib.nullcontext() if prepare is None else prepare(batches, accelerator, count)


def _times(output, factor: float):
    """A forward's output (summed loss, or (summed loss, metrics)) scaled by `factor`."""
    if isinstance(output, tuple):
        loss, metrics = output
        return loss * factor, {name: value * factor for name, value in metrics.items()}
    return output * factor


class _Sums:
    """This process's running sums of the loss and of a stage's metrics over micro-batches."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
        self.metrics: dict[str, torch.Tensor] = {}

    def add(self, output) -> torch.Tensor:
        """Record one forward's output; returns its summed loss (still attached to the graph)."""
        loss_sum, metrics = output if isinstance(output, tuple) else (output, {})
        self.loss += loss_sum.detach().double()
        for name, value in metrics.items():
            self.metrics[name] = self.metrics.get(name, 0.0) + value.detach().double()
        return loss_sum

    def reduce(self, weight: float) -> tuple[float, dict[str, float]]:
        """Sums over all processes, divided by the step's (or eval set's) total weight."""
        names = sorted(self.metrics)  # every process has the same names: same stage, same code
        packed = torch.stack([self.loss] + [torch.as_tensor(self.metrics[n], device=self.loss.device) for n in names])
        totals = self.accelerator.reduce(packed, "sum") / max(weight, 1e-12)
        return float(totals[0]), {name: float(v) for name, v in zip(names, totals[1:])}


def to_device(batch: Batch, device) -> Batch:
    """The batch's tensors on `device`; the rest (a padding-free batch's `packed_blocks`) as it is."""
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _train_step(module, stage: Stage, micro: list[Batch], accelerator, cfg, inactive=(), step: int = 0
                ) -> tuple[float, float, dict]:
    """Forward/backward over this process's share of one global step; returns (loss, grad norm, metrics).

    Gradients of `inactive` parameters are dropped, so the optimizer leaves them alone. A
    micro-batch without labels (a summed loss of 0) still runs its forward and backward, as every
    process must take part in DDP's reduction; only a step with no label at all stops the run."""
    world = accelerator.num_processes
    total_weight = sum(stage.weight(b) for b in micro)
    if total_weight <= 0:
        raise TrainingAborted(
            "a step has no label tokens (every label of its batches is masked): the run would train on nothing; "
            "check the chat template and data.format"
        )
    mine = micro[accelerator.process_index :: world]
    sums = _Sums(accelerator)
    with _prepared(stage, mine, accelerator):
        for i, batch in enumerate(mine):
            last = i == len(mine) - 1
            sync = contextlib.nullcontext() if last else accelerator.no_sync(module)
            with sync:
                loss_sum = sums.add(module(**to_device(batch, accelerator.device)))
                # DDP averages gradients over processes; multiplying by world makes that a sum.
                accelerator.backward(loss_sum * (world / total_weight))
    for param in inactive:
        param.grad = None
    loss, metrics = sums.reduce(total_weight)
    metrics = getattr(stage, "finish_metrics", dict)(metrics)
    regularize = getattr(stage, "regularize", None)
    if regularize is not None:  # a penalty on the weights: its gradient, once per step, before clipping
        grad_scale = accelerator.scaler.get_scale() if accelerator.scaler is not None else 1.0
        metrics = metrics | regularize(module, grad_scale, accelerator, step)
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    trained = [p for p in module.parameters() if p.requires_grad]
    if any(p.grad is not None and p.grad.is_sparse for p in trained):  # see sparse_embedding_gradients
        grad_norm = clip_grad_norm(trained, max_norm)
    else:
        grad_norm = accelerator.clip_grad_norm_(trained, max_norm)
    return loss, float(grad_norm), metrics


def train(stage: Stage, cfg, run_dir: Path, accelerator, fingerprint: dict[str, Any] | None = None) -> LoopResult:
    """Run the optimisation described by `cfg` (a TrainConfig) on `stage`; checkpoints in run_dir.

    fingerprint: the settings the run's results depend on (`run_fingerprint`): kept in every
    checkpoint, and a resume from a checkpoint of other settings is refused, naming them.
    The held-out micro-batches are collated once, at the start, and kept for every evaluation.
    A run that fails or is stopped here releases its lock on run_dir (`start_run`)."""
    with released_on_failure(run_dir):
        return _train(stage, cfg, run_dir, accelerator, fingerprint)


@torch.enable_grad()  # the loop owns its steps: a caller's torch.set_grad_enabled(False) is put back after
def _train(stage: Stage, cfg, run_dir: Path, accelerator, fingerprint: dict[str, Any] | None) -> LoopResult:
    """`train`'s work."""
    segment_started = time.perf_counter()
    optimizer = make_optimizer(stage.module, cfg, getattr(stage, "lr_scale", None))
    inactive_at = getattr(stage, "inactive_parameters", lambda step: [])
    after_optimizer_step = getattr(stage, "after_optimizer_step", lambda step: None)
    at_step = AT_STEP | frozenset(getattr(stage, "metrics_at_step", ()))
    rates = RATES | getattr(stage, "rates", {})
    module, optimizer = accelerator.prepare(stage.module, optimizer)
    rank, world = accelerator.process_index, accelerator.num_processes
    group = world * cfg.grad_accum
    per_epoch = stage.micro_batches_per_epoch()
    ckpt_root = run_dir / "checkpoints"
    state: dict[str, Any] = {"step": 0, "epoch": 0, "micro_in_epoch": 0, "skipped_steps": 0,
                             "consecutive_nonfinite": 0, "best_eval": None, "evals_without_improvement": 0,
                             "stopped_early": False, "fingerprint": fingerprint}
    # damaged checkpoints (a file cut short or missing), which a resume passes over and removes, as
    # does a fresh start: each is named with what is wrong with it, once the log is open
    damaged = checkpoint.incomplete(ckpt_root) if accelerator.is_main_process else {}
    resume_from = _resume_path(cfg.resume, ckpt_root)
    if resume_from is not None:
        state = _restore(resume_from, ckpt_root, fingerprint, stage, accelerator, module, optimizer)
        fresh_start = ""
    else:  # what of an earlier run a fresh start removed, said once the log is open
        fresh_start = _clear_earlier_run(run_dir, len(damaged)) if accelerator.is_main_process else ""
    total_steps = plan_total_steps(stage, cfg, group, state if resume_from is not None else None)
    replanned = _replanned(state, cfg, group, per_epoch, total_steps) if resume_from is not None else ""
    state.pop("planned", None)
    if cfg.max_steps <= 0:  # what this plan was made of, for a resume to keep (`plan_total_steps`)
        state["planned"] = [group, cfg.epochs, per_epoch, total_steps]
    accelerator.wait_for_everyone()
    log = RunLogger(run_dir, enabled=accelerator.is_main_process, accelerator=accelerator,
                    trackers=cfg.report_to, total_steps=total_steps, initial_step=state["step"],
                    progress_bar=cfg.progress_bar)
    # a resume forgets the steps after its checkpoint; a fresh start, every line of an earlier run
    log.truncate_after(state["step"] if resume_from is not None else -1)
    for path, found in damaged.items():
        log.message(f"{path} is an incomplete checkpoint ({'; '.join(found)}): "
                    f"{'passed over and ' if resume_from is not None else ''}removed")
    if resume_from is not None:
        log.message(f"resumed from {resume_from} at step {state['step']}")
        if replanned:
            log.message(replanned)
        if state["step"] > total_steps:
            plan = f"train.max_steps={cfg.max_steps}" if cfg.max_steps > 0 else f"train.epochs={cfg.epochs}"
            log.message(f"note: the checkpoint is at step {state['step']}, past the {total_steps} step(s) this run "
                        f"plans ({plan}): nothing is trained")
    if fresh_start:
        log.message(fresh_start)
    warmup = _warmup_steps(cfg, total_steps, state, log)
    earlier_seconds = state.get("wall_seconds", 0.0)  # the segments before this resume

    def wall_seconds() -> float:
        return earlier_seconds + time.perf_counter() - segment_started
    coarse = sum(p.numel() for p in stage.module.parameters() if p.requires_grad and p.dtype == torch.bfloat16)
    if coarse:  # AdamW's moments and update are float32, rounded onto these weights: no float32 master copy
        log.message(f"note: {coarse:,} trained parameters are bfloat16 (AdamW's moments are float32): an update "
                    "below ~1/256 of a weight rounds away (at lr 2e-5 most do). For bf16 speed with float32 "
                    "weights, load model.dtype=float32 and set train.mixed_precision=bf16")

    def save() -> None:
        if getattr(stage, "on_checkpoint", None) is not None:
            stage.on_checkpoint()
        if accelerator.scaler is not None:  # fp16: the loss scale found so far, and its growth count
            state["grad_scaler"] = accelerator.scaler.state_dict()
        state["wall_seconds"] = wall_seconds()
        checkpoint.save(ckpt_root, state["step"], model=accelerator.unwrap_model(module), optimizer=optimizer,
                        loop_state=state, rank=rank, world_size=world, barrier=accelerator.wait_for_everyone,
                        keep_last=cfg.keep_last, stage_state=stage.state_dict() if hasattr(stage, "state_dict") else None)

    stopped_early, eval_loss, eval_metrics = _stopped_before(state, cfg.early_stopping_patience), None, {}
    state["stopped_early"] = stopped_early
    held_out = stage.eval_micro_batches()
    if cfg.early_stopping_patience and not held_out:
        log.message("note: train.early_stopping_patience has no held-out data to evaluate, so it cannot stop the run")
    if (cfg.eval_every and not held_out and getattr(stage, "held_out_figures", None) is None
            and getattr(stage, "monitor", None) is None):
        log.message(f"note: train.eval_every={cfg.eval_every} has no held-out data to evaluate (none was set "
                    "aside): nothing is evaluated during the run")
    module.train()
    steps = _steps(stage, group, *_position(state, group))
    epoch_ended = getattr(stage, "epoch_ended", None)
    passes_done = _passes_done(stage, cfg, state, per_epoch)
    # One process without a GradScaler: untied embeddings take sparse gradients (see optim.py).
    sparse_ok = (world == 1 and accelerator.distributed_type == "NO" and accelerator.scaler is None
                 and getattr(cfg, "optimizer", "adamw") in ("adamw", "adamw_fused")
                 and not getattr(stage, "dense_gradients", False))
    begin = getattr(stage, "begin", None)
    if begin is not None and resume_from is None:
        figures = begin(module, accelerator)
        if figures:
            log.log({"step": 0} | figures)
            log.message("step 0: " + _shown(figures))
    with sparse_embedding_gradients(accelerator.unwrap_model(module), enabled=sparse_ok), \
            training_attention_kernels(accelerator.device), _interrupt_at_step_end(world == 1) as interrupted:
        try:
            while state["step"] < total_steps and not stopped_early and not passes_done:
                started = time.perf_counter()
                epoch, micro_in_epoch, micro = next(steps)
                lr = cfg.lr * lr_factor(state["step"], total_steps, cfg.schedule, warmup, cfg.min_lr_ratio)
                set_lr(optimizer, lr / cfg.lr)
                inactive = inactive_at(state["step"])
                loss, grad_norm, metrics = _train_step(module, stage, micro, accelerator, cfg, inactive, state["step"])
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                overflow_scale = None
                if finite:
                    optimizer.step()
                    after_optimizer_step(state["step"] + 1)
                else:
                    overflow_scale = _skipped_step(accelerator, loss)
                optimizer.zero_grad(set_to_none=True)
                if epoch_ended is not None and per_epoch and micro_in_epoch < per_epoch and epoch_ended():
                    epoch, micro_in_epoch = epoch + 1, 0  # cut short: read, as `_steps` will find next
                state.update(step=state["step"] + 1, epoch=epoch, micro_in_epoch=micro_in_epoch)
                passes_done = _passes_done(stage, cfg, state, per_epoch)
                state.pop("step_in_epoch", None)
                abort = _count_nonfinite(state, finite, cfg, log, overflow_scale)
                record = _step_record(state, loss, lr, grad_norm, stage, micro, started, world, per_epoch) | metrics
                interval = state.setdefault("log_interval", {})  # see metrics.py: lines hold interval means
                if finite:
                    add_to_interval(interval, record, at_step)
                if (state["step"] % cfg.log_every == 0 or state["step"] == total_steps or not finite) and interval:
                    log.log(close_interval(interval, rates))
                if not finite:
                    log.log(record | {"steps_averaged": 1})
                log.advance(record)
                if abort:
                    raise TrainingAborted(abort)
                at_end = state["step"] == total_steps or passes_done
                if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or at_end:
                    evaluated = _evaluate_step(module, stage, accelerator, held_out, state, cfg, log, at_end)
                    if evaluated is not None:
                        eval_loss, eval_metrics = evaluated
                    stopped_early = state["stopped_early"]
                signalled = interrupted() and not (at_end or stopped_early)
                # a run that stops logs the steps since its last line, before the checkpoint that
                # holds the interval: the resumed run starts its next line afresh
                last_line = close_interval(interval, rates) if (stopped_early or signalled) and interval else None
                if last_line is not None:
                    log.log(last_line)
                if (cfg.save_every and state["step"] % cfg.save_every == 0) or at_end or stopped_early or signalled:
                    save()
                if signalled:
                    said = "" if last_line is None else (f" (loss {last_line['loss']:.4f} over the last "
                                                         f"{last_line['steps_averaged']} step(s))")
                    how = ("the same command with train.resume=auto resumes from it (with train.resume=never "
                           "it starts afresh)") if cfg.resume == "never" else "the same command resumes from it"
                    log.message(f"interrupted: checkpoint saved at step {state['step']} of {total_steps}; "
                                f"{how}{said}")
                    raise Stopped(interrupted())
        finally:
            log.close()
    if resume_from is not None and eval_loss is None and (state["step"] >= total_steps or stopped_early
                                                          or passes_done):
        # A resumed run that was already finished trains nothing, but its caller still reports the
        # final evaluation (a pipeline rerun, say): evaluate the restored weights once.
        evaluated = evaluate(module, stage, accelerator, held_out)
        if evaluated is not None:
            eval_loss, eval_metrics = evaluated
        if hasattr(stage, "monitor"):
            stage.monitor(module, accelerator)  # its figures of the restored weights; nothing left to stop
    if passes_done and state["step"] < total_steps:
        log.message(f"train.epochs={cfg.epochs:g}: the passes over the data ended at step {state['step']} of the "
                    f"{total_steps} planned, as epochs cut short ({getattr(stage, 'epochs_cut_by', 'the stage')}) "
                    f"allow; the learning-rate schedule was planned on the uncut most of {total_steps} steps and "
                    f"stopped at step {state['step']} of them")
    stop_reason, detail = "max_steps" if cfg.max_steps > 0 else "epochs", None
    if stopped_early:
        detail = state.get("stop_reason") or f"no eval improvement in {state['evals_without_improvement']} evals"
        stop_reason = state.get("stopped_by", "monitor") if state.get("stop_reason") else "patience"
        log.message(f"early stop at step {state['step']}: {detail}")
    return LoopResult(state["step"], stopped_early, eval_loss, state["skipped_steps"], accelerator.unwrap_model(module),
                      eval_metrics, stop_reason, detail, wall_seconds())


def _restore(resume_from: Path, ckpt_root: Path, fingerprint: dict[str, Any] | None, stage: Stage, accelerator,
             module, optimizer) -> dict[str, Any]:
    """A resume: the checkpoint's weights, optimizer, fp16 loss scale and stage state loaded, the
    run's checkpoints after it (in `ckpt_root`) dropped: the continuation this resume replaces.
    Returns its loop state.
    A checkpoint of other settings is refused, naming them."""
    _check_same_run(resume_from, fingerprint)
    state = checkpoint.load(resume_from, model=accelerator.unwrap_model(module), optimizer=optimizer,
                            rank=accelerator.process_index)
    if accelerator.scaler is not None and state.get("grad_scaler"):
        accelerator.scaler.load_state_dict(state["grad_scaler"])  # else it starts again at 2^16
    stage_state = checkpoint.load_stage_state(resume_from)
    if stage_state is not None and hasattr(stage, "load_state_dict"):
        stage.load_state_dict(*stage_state)
    if accelerator.is_main_process:
        checkpoint.drop_after(ckpt_root, state["step"])
    if fingerprint is not None:  # the checkpoints this run writes hold its own (an older one's may lack keys)
        state["fingerprint"] = fingerprint
    return state


def _clear_earlier_run(run_dir: Path, damaged: int = 0) -> str:
    """A fresh start (main process): an earlier run's checkpoints and results removed (stopped, this
    run would leave them beside its own config.yaml); returns the line that says what went, or "".
    damaged: how many of the checkpoints are incomplete."""
    import shutil

    cleared = checkpoint.clear(run_dir / "checkpoints")
    removed = [f"{cleared} checkpoint(s)" + (f" ({damaged} incomplete)" if damaged else "")] if cleared else []
    for path in (run_dir / "final", run_dir / "summary.json", run_dir / "metrics.jsonl"):
        if path.is_dir():
            shutil.rmtree(path)
            removed.append(f"{path.name}/")
        elif path.exists():
            path.unlink()
            removed.append(path.name)
    return f"fresh start: removed {', '.join(removed)} of an earlier run from {run_dir}" if removed else ""


def _evaluate_step(module, stage: Stage, accelerator, held_out: list[Batch], state: dict, cfg, log: RunLogger,
                   at_end: bool) -> tuple[float, dict[str, float]] | None:
    """An evaluation after a step, logged and said: the held-out loss and metrics (early stopping
    counts them), the stage's monitor (which may stop the run) and its held-out figures. Sets
    state["stopped_early"] (never after the last step: nothing is left to stop); returns (eval
    loss, metrics), or None without held-out batches."""
    step = state["step"]
    evaluated = evaluate(module, stage, accelerator, held_out)
    if evaluated is not None:
        eval_loss, eval_metrics = evaluated
        log.log({"step": step, "eval_loss": eval_loss} | {f"eval_{k}": v for k, v in eval_metrics.items()})
        log.message(f"step {step}: eval " + _shown({"loss": eval_loss} | eval_metrics))
        state["stopped_early"] = _early_stop(state, eval_loss, cfg.early_stopping_patience, log) and not at_end
    monitor = getattr(stage, "monitor", None)
    if monitor is not None:  # a stage's own held-out figures, and whether they stop the run
        figures, stop_reason = monitor(module, accelerator)
        log.log({"step": step} | figures)
        log.message(f"step {step}: " + _shown(figures))
        if stop_reason is not None and not at_end:
            state["stopped_early"] = True
            state["stop_reason"] = stop_reason
            state["stopped_by"] = getattr(stage, "monitor_stop", "monitor")
    held_out_figures = getattr(stage, "held_out_figures", None)
    figures = held_out_figures(module, accelerator, step) if held_out_figures is not None else None
    if figures:
        log.log({"step": step} | {f"eval_{k}": v for k, v in figures.items()})
        log.message(f"step {step}: eval " + _shown(figures))
    return evaluated


def _warmup_steps(cfg, total_steps: int, state: dict, log: RunLogger) -> int:
    """The run's warmup: train.warmup_steps, else train.warmup_ratio × its planned steps, rounded
    up (as transformers does, but not for a float product's last bit: 0.07 × 100 =
    7.000000000000001). A ratio's warmup is fixed when the run starts and kept in the checkpoint:
    a run resumed with more (or fewer) planned steps and the same ratio keeps the warmup it took,
    where ratio × the new total would move the end of a warmup already under way or done (and
    pull the learning rate back down mid-run). A changed ratio, or warmup steps given, apply."""
    ratio = None if cfg.warmup_steps else cfg.warmup_ratio  # the ratio the warmup comes from, if any
    planned = cfg.warmup_steps or math.ceil(round(cfg.warmup_ratio * total_steps, 9))
    started = state.get("warmup_steps")
    kept = ratio is not None and started is not None and state.get("warmup_ratio") == ratio and started != planned
    if kept:
        log.message(f"note: train.warmup_ratio={ratio} of {total_steps} steps would be {planned} warmup steps; "
                    f"the run keeps the {started} it started with (set train.warmup_steps to change them)")
    state["warmup_steps"], state["warmup_ratio"] = (started if kept else planned), ratio
    return state["warmup_steps"]


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _interrupt_at_step_end(enabled: bool):
    """Ctrl-C (SIGINT) or SIGTERM during training (`kill`, `docker stop`, Kubernetes, SLURM's
    scancel and preemption): the step under way finishes, the loop saves a checkpoint there (the
    one a periodic save at that step would write, so a resume continues bit for bit) and stops
    with `Stopped`. A second signal stops at once, unsaved. Yields a function giving the pending
    signal's number (0: none). One process only (the main thread's handlers): several processes
    would stop at different steps, so they keep Python's own handling."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: 0
        return
    pending: list[int] = []
    previous = {}
    for signum in _STOP_SIGNALS:
        handler = signal.getsignal(signum)
        # installed outside Python (None): put Python's default back afterwards
        previous[signum] = handler if handler is not None else (
            signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

    def on_signal(signum, frame):
        if pending:
            restore()
            raise Stopped(signum)
        pending.append(signum)
        name = "interrupt" if signum == signal.SIGINT else signal.Signals(signum).name
        print(f"\n{name}: finishing this step to save a checkpoint (a second signal stops at once, unsaved)",
              file=sys.stderr, flush=True)

    for signum in _STOP_SIGNALS:
        signal.signal(signum, on_signal)
    try:
        yield lambda: pending[0] if pending else 0
    finally:
        restore()


def _shown(figures: dict[str, float]) -> str:
    """A console line's figures: every one, in the order metrics.jsonl holds them (the loss to 4
    decimals, the rest to 4 significant digits)."""
    return ", ".join(f"{name} {value:.4f}" if name == "loss" else f"{name} {value:.4g}"
                     for name, value in figures.items())


def epochs_read(state: dict, per_epoch: int | None) -> float:
    """The `epoch` a step logs: the epochs read so far, in micro-batches (state's epoch + its
    micro-batches read / an epoch's), to 4 decimals: 1.0 once the first epoch is read, whether
    it ended exactly at a step's end, its last step was topped up (`_steps`) or the stage cut it
    short (`epoch_ended`: the loop then moves the state to the next epoch's start). Streamed data
    (no known length): the passes over it completed, an integer (a pass's end is known once a
    step read past it)."""
    if not per_epoch:
        return state["epoch"]
    return round(state["epoch"] + state["micro_in_epoch"] / per_epoch, 4)


def _step_record(state: dict, loss: float, lr: float, grad_norm: float, stage: Stage, micro: list[Batch],
                 started: float, world: int, per_epoch: int | None = None) -> dict:
    elapsed = time.perf_counter() - started
    tokens = sum(stage.tokens(b) for b in micro)
    return {"step": state["step"], "epoch": epochs_read(state, per_epoch), "loss": loss, "lr": lr,
            "grad_norm": grad_norm, "tokens": tokens, "tokens_per_s": tokens / elapsed, "step_time_s": elapsed,
            "peak_mem_mb": peak_memory_mb(), "skipped_steps": state["skipped_steps"],
            "world_size": world}


def _skipped_step(accelerator, loss: float) -> float | None:
    """A step not taken (non-finite loss or gradient norm). A GradScaler (fp16) must still close
    it: clipping has unscaled the gradients, and until `update()` the next step's unscaling
    raises; an overflow should also lower the scale, as the scaler's own skipped step would.

    Returns the loss scale the gradients overflowed at when this is the scaler's own business
    (a finite loss, non-finite gradients, a scale above 1): fp16 training starts at a scale of
    2^16 and halves it on each overflow until the gradients fit, so a run's first steps are
    often skipped by design. None otherwise."""
    scaler = accelerator.scaler
    if scaler is None:
        return None
    scale = scaler.get_scale()
    scaler.update(scale * scaler.get_backoff_factor())
    return scale if math.isfinite(loss) and scale > 1.0 else None


def _count_nonfinite(state: dict, finite: bool, cfg, log: RunLogger, overflow_scale: float | None = None) -> str | None:
    """Count a skipped (non-finite) step, never hidden; after too many in a row, return why to stop.

    An fp16 overflow at a loss scale above 1 (`overflow_scale`) is counted as skipped and logged,
    but not toward `max_consecutive_nonfinite`: lowering the scale is how the GradScaler finds a
    scale that fits, and a model needing a scale of 2^10 overflows six times in a row at the
    start. Gradients that stay non-finite reach a scale of 1 within 16 halvings and count from
    there."""
    if finite:
        state["consecutive_nonfinite"] = 0
        return None
    state["skipped_steps"] += 1
    if overflow_scale is not None:
        state["scaler_overflows"] = state.get("scaler_overflows", 0) + 1
        log.message(f"step {state['step']}: fp16 gradient overflow at loss scale {overflow_scale:g}; the update "
                    f"was skipped and the scale lowered")
        return None
    state["consecutive_nonfinite"] += 1
    log.message(f"step {state['step']}: non-finite loss or gradient norm; the update was skipped")
    if state["consecutive_nonfinite"] < cfg.max_consecutive_nonfinite:
        return None
    return (f"{state['consecutive_nonfinite']} non-finite steps in a row (last at step {state['step']}): "
            "lower train.lr, keep train.max_grad_norm > 0, or check the data for extreme rows")


def _early_stop(state: dict, eval_loss: float, patience: int, log: RunLogger) -> bool:
    """Count evals without improvement; True once `patience` of them ran in a row.

    A non-finite eval loss is no improvement and never the best: a NaN stored as the best would
    compare False against every later loss and stop a run that is still improving."""
    best = state["best_eval"]
    if not math.isfinite(eval_loss):
        log.message(f"step {state['step']}: eval loss is {eval_loss}; counted as no improvement for early stopping")
    elif best is None or eval_loss < best:
        state["best_eval"], state["evals_without_improvement"] = eval_loss, 0
        return False
    state["evals_without_improvement"] += 1
    return patience > 0 and state["evals_without_improvement"] >= patience


def _stopped_before(state: dict, patience: int) -> bool:
    """Whether the run being resumed is finished by a stop it made: its rerun trains no further.
    A stage monitor's stop (its reason kept) stands; an early stop is judged again with this run's
    `patience` (a resumed run takes its own config's `train` settings), so a raised patience trains
    on until that many evaluations in a row have not improved. Checkpoints before `stopped_early`
    was saved read as not stopped."""
    if not state.get("stopped_early", False):
        return False
    if state.get("stop_reason"):
        return True
    return patience > 0 and state["evals_without_improvement"] >= patience


def start_run(cfg) -> tuple[Path, Any, bool, Any]:
    """What every stage does first: (run_dir, accelerator, is_main_process, log). Refuses an
    output_dir over a model the run reads (`_check_not_over_its_models`) and one another training
    run is writing (`_lock_run_dir`: the lock is held until `finish_run`, or until the run fails:
    each stage releases it, `released_on_failure`, when it fails between start_run and train);
    writes the resolved config to run_dir/config.yaml, starts the trackers of train.report_to and
    seeds everything; `log` prints (flushed) on the main process only."""
    import functools

    import yaml
    from accelerate.utils import set_seed

    from posttrain.files import write_atomically
    from posttrain.models.loading import run_final_model

    run_dir = _checked_run_dir(cfg.output_dir)
    _check_input_files(cfg)  # before minutes of model loading, not after
    _check_not_over_its_models(cfg, run_dir)
    accelerator = make_accelerator(cfg.train, run_dir)
    main = accelerator.is_main_process
    if main:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file on the way (output_dir=a/file/run), no permission, ...
            raise ConfigError(f"output_dir {run_dir}: cannot create the run directory "
                              f"({exc.strerror or type(exc).__name__})") from None
        _lock_run_dir(run_dir)  # held until finish_run, or until the run fails
    try:
        # a resume from a checkpoint of other settings is refused before anything of the new run is
        # written over the existing run's (its config.yaml) or loaded (train() checks it again)
        resume_from = _resume_path(cfg.train.resume, run_dir / "checkpoints")
        if resume_from is not None:
            _check_same_run(resume_from, run_fingerprint(cfg))
        # flushed at once: a script's stdout in a log file is block-buffered (the command line makes it
        # line-buffered; run_sft called from a script does not touch the caller's stdout)
        log = functools.partial(print, flush=True) if main else (lambda *_: None)
        recorded = cfg.to_dict()
        model_path = getattr(getattr(cfg, "model", None), "path", None)
        final = run_final_model(model_path) if isinstance(model_path, str) else None
        if final is not None:  # a run directory: its final model, as generate and merge take it
            recorded["model"]["path"] = str(final)
            log(f"model.path {model_path} is a run directory: starting from its final model {final}")
        if main:
            write_atomically(run_dir / "config.yaml", yaml.safe_dump(recorded, sort_keys=False))
        if cfg.train.report_to:
            _start_trackers(accelerator, run_dir, recorded, resume_from)
        set_seed(cfg.train.seed)
    except BaseException:
        release_run_dir(run_dir)
        raise
    return run_dir, accelerator, main, log


def _check_not_over_its_models(cfg, run_dir: Path) -> None:
    """A run's output_dir must not be, or hold, a model the run reads (model.path, a run directory's
    as its final model; reward.models; ppo.value_model_path): a fresh start removes the run
    directory's final/ and checkpoints/, and the run writes its own final/ there, over the model it
    starts from (a DPO run's reference, too); a model directory would take the run's files beside
    its own. Refused before anything is written, as `posttrain merge` refuses the adapter's own base
    as its OUT_DIR. An output_dir inside a model directory (/models/m/runs/lora) leaves the model's
    own files alone and is taken. A path not there yet is the loader's to refuse; presets live in
    posttrain's cache."""
    from posttrain.models.loading import run_final_model
    from posttrain.models.presets import is_preset

    target = run_dir.resolve()
    for setting, path in _models_read(cfg):
        if is_preset(path) or not Path(path).expanduser().is_dir():
            continue
        model = (run_final_model(path) or Path(path).expanduser()).resolve()
        if target == model:
            where = f"is the directory of {setting} {path}"
        elif target in model.parents:
            where = f"holds {setting} {path}" + (f" (its final model {model})" if model.name == "final" else "")
        else:
            continue
        raise ConfigError(f"output_dir {run_dir} {where}: the run would write over the model it reads; give "
                          "another output_dir")


def _models_read(cfg) -> list[tuple[str, str]]:
    """(setting, path) of each model a run reads from disk: model.path, each of reward.models (a
    'NAME=DIR' as its DIR), ppo.value_model_path; those set."""
    from posttrain.rewards import model_component

    models = getattr(getattr(cfg, "reward", None), "models", None) or []
    found = [("model.path", getattr(getattr(cfg, "model", None), "path", None))]
    found += [("reward.models", model_component(i, item, len(models))[1]) for i, item in enumerate(models)
              if isinstance(item, str)]
    found.append(("ppo.value_model_path", getattr(getattr(cfg, "ppo", None), "value_model_path", None)))
    return [(setting, path) for setting, path in found if isinstance(path, str) and path]


# The run directories this process holds locked (`_lock_run_dir`): resolved path -> (open lock file,
# the thread whose run holds it). Guarded by _HELD_LOCK (runs in threads: a notebook's, a test's).
_HELD: dict[Path, tuple[Any, threading.Thread]] = {}
_HELD_LOCK = threading.Lock()
LOCK_FILE = ".lock"


def _lock_run_dir(run_dir: Path) -> None:
    """Lock run_dir against a second training run (main process; `files.lock_exclusively` on
    run_dir/.lock): a job relaunched while its first copy still runs would resume from the live
    run's checkpoint, and both would write metrics.jsonl, checkpoints/ and final/. Refused, naming
    the directory. Released by finish_run, or when the run fails (train, start_run, and each stage
    between the two); a lock this thread's earlier run left, or a finished thread's, is released
    here first. Without flock (not POSIX), no lock."""
    from posttrain.files import lock_exclusively

    key = run_dir.resolve()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None and (held[1] is threading.current_thread() or not held[1].is_alive()):
            _HELD.pop(key)[0].close()
        try:
            file = open(run_dir / LOCK_FILE, "a", encoding="utf-8")
        except OSError:  # a directory this process cannot write: writing the run says so, naming the file
            return
        if lock_exclusively(file, f"{run_dir} is being written by another training run; wait for it to finish, "
                                  "or use another output_dir"):
            _HELD[key] = (file, threading.current_thread())
        else:
            file.close()


@contextlib.contextmanager
def released_on_failure(run_dir: Path):
    """Run the body holding run_dir's lock (`_lock_run_dir`); if it raises (the model fails to load,
    a reward function is missing, Ctrl-C), release the lock and re-raise. Each stage wraps what it
    does between start_run and finish_run (which releases it on success) in this."""
    try:
        yield
    except BaseException:
        release_run_dir(run_dir)
        raise


def release_run_dir(run_dir: Path) -> None:
    """Release `_lock_run_dir`'s lock on run_dir, if this thread's run holds it (the lock file stays).
    Every stage calls it when it fails after start_run (the model fails to load, say), besides
    train and finish_run: a second call does nothing, and never frees another thread's run that
    took the directory meanwhile."""
    key = Path(run_dir).resolve()
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is None or held[1] is not threading.current_thread():
            return
        del _HELD[key]
    held[0].close()


def _start_trackers(accelerator, run_dir: Path, recorded: dict, resume_from: Path | None) -> None:
    """Start train.report_to's trackers (main process; `finish_run` ends them): project `run_dir`'s
    name, the resolved config as their hyperparameters (the scalar settings, keys dotted:
    "train.lr"; lists and unset values left out, as trackers take scalars only). TensorBoard hides
    its events from the step this run logs first on (purge_step): a resumed run's steps after its
    checkpoint, or all of an earlier run a fresh start replaces, as metrics.jsonl drops them."""
    import json

    from posttrain.config.schema import flatten

    scalars = {key: value for key, value in flatten(recorded).items() if isinstance(value, (bool, int, float, str))}
    first_step = 0 if resume_from is None else \
        json.loads((resume_from / checkpoint.LOOP_STATE).read_text())["step"] + 1
    accelerator.init_trackers(run_dir.name, config=scalars,
                              init_kwargs={"tensorboard": {"purge_step": first_step}})


def _check_input_files(cfg) -> None:
    """Every data file a config lists (a key ending in `files`: data.train_files, data.eval_files,
    forgetting.retain_files, ...) must exist, be of a type a reader takes, and (data.format auto)
    open with rows in a format the stage reads: said before minutes of model loading, not after.
    'synthetic' is the bundled generator."""
    import dataclasses
    import os

    from posttrain.data.formats import check_readable
    from posttrain.data.readers import missing_hint
    from posttrain.errors import DataError

    def walk(node, prefix: str = ""):
        for name in (f.name for f in dataclasses.fields(node)):
            value = getattr(node, name)
            if dataclasses.is_dataclass(value):
                yield from walk(value, f"{prefix}{name}.")
            elif name.endswith("files") and isinstance(value, list):
                yield from ((prefix + name, node, path) for path in value)

    for key, section, path in walk(cfg):
        if not isinstance(path, str) or path == "synthetic":
            continue
        if not os.path.exists(os.path.expanduser(path)):
            parts = [p.strip() for p in path.split(",")]
            hint = (f"; for several files write {key}=[{','.join(parts)}]"
                    if len(parts) > 1 and all(os.path.exists(os.path.expanduser(p)) for p in parts if p)
                    else missing_hint(path))
            raise DataError(f"{key}: {path}: no such file or directory{hint}")
        detect, fmt = _row_formats(key, section)
        try:
            check_readable(os.path.expanduser(path), detect, fmt)
        except DataError as exc:
            raise DataError(f"{key}: {exc}") from None


def _row_formats(key: str, section) -> tuple[Any, str]:
    """(the format detector, the format set) of the reader that takes the files under `key`."""
    from posttrain.config.preference import PreferenceDataConfig
    from posttrain.config.rl import PromptDataConfig
    from posttrain.data.formats import detect_format
    from posttrain.data.preferences import detect_preference_format
    from posttrain.data.prompts import detect_prompt_format

    fmt = getattr(section, "format", "auto")
    if key.endswith("retain_files"):  # rows in sft's formats, in every stage
        return detect_format, "auto"
    if isinstance(section, PreferenceDataConfig):
        return detect_preference_format, fmt
    if isinstance(section, PromptDataConfig) or key.endswith("prompt_files"):
        return detect_prompt_format, fmt
    return detect_format, fmt


def _checked_run_dir(output_dir: str) -> Path:
    """output_dir as a Path (~ is the home directory); an empty one (the current directory) or one
    that is a file is refused."""
    from posttrain.config.schema import user_path

    if not str(output_dir).strip():
        raise ConfigError("output_dir is empty (it would write the run into the current directory); name a directory")
    run_dir = user_path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir {run_dir} is a file, not a directory; name a directory for the run")
    return run_dir


def finish_run(run_dir: Path, accelerator, main: bool, model, tokenizer, summary: dict, save=None) -> Path:
    """What every stage does last: the final model in run_dir/final (replaced whole; `save(model,
    tokenizer, directory)`, by default `loading.save_model`; transformers' progress bar hidden
    meanwhile) and summary.json, which begins with the posttrain version (main process); then wait
    for every process and close the trackers. A full disk is said naming the file or directory that
    did not fit (`errors.NoRoom`). The run directory's lock (`start_run`) is released, whatever
    happens."""
    import json

    from posttrain import __version__
    from posttrain.errors import NoRoom
    from posttrain.models.loading import save_model
    from posttrain.models.presets import quiet_progress_bars

    try:
        if main:
            save = save or save_model
            with quiet_progress_bars():  # transformers' shard-writing bar, in a script's or notebook's output
                checkpoint.write_whole(run_dir / "final", lambda final: save(model, tokenizer, final))
            summary = {"posttrain_version": __version__} | summary
            path = run_dir / "summary.json"
            try:
                path.write_text(json.dumps(strict_json(summary), indent=1, allow_nan=False))
            except OSError as exc:
                raise (NoRoom.of(exc, path) or exc) from exc
        accelerator.wait_for_everyone()
        accelerator.end_training()
    finally:
        release_run_dir(run_dir)  # start_run's lock
    return run_dir


def make_accelerator(cfg, run_dir: Path):
    """An Accelerator for this run: mixed precision and trackers from `cfg` (a TrainConfig)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import is_cuda_available

    for tracker in cfg.report_to:
        try:
            __import__(tracker)
        except ImportError:
            raise ConfigError(f"train.report_to: {tracker} is not installed (pip install 'posttrain[{tracker}]')") from None
    # accelerate keeps its settings in a process-wide singleton; a second run in the same
    # process (notebooks, tests) may ask for different mixed precision.
    AcceleratorState._reset_state(reset_partial_state=False)
    try:
        # cpu=True on CPU-only hosts: without it accelerate ignores torchrun's WORLD_SIZE
        # and every process trains alone.
        accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with=cfg.report_to or None,
                                  project_dir=str(run_dir), cpu=not is_cuda_available())
    except ValueError as exc:  # e.g. fp16 on a CPU, in older accelerate
        raise ConfigError(f"train.mixed_precision={cfg.mixed_precision}: {exc}") from None
    if cfg.mixed_precision != "no" and not accelerator.native_amp:
        # accelerate ≥ 1.x accepts fp16 on a CPU and then runs in float32, without a word
        raise ConfigError(f"train.mixed_precision={cfg.mixed_precision} is not available on "
                          f"{accelerator.device.type} (accelerate would run in float32); use bf16 or no")
    return accelerator


def run_fingerprint(cfg) -> dict[str, Any]:
    """The settings that decide what a checkpoint holds, flat ({"data.max_length": 64, ...}): model,
    data, adapters, the stage's own loss sections; of `train`, those that decide the data and the
    weights trained (`_TRAIN_FINGERPRINTED`); and the identity of the starting model's files and of
    the data files (`_file_identity`: rows edited under the same name are other data).
    Kept in every checkpoint; a resume under other values is refused, naming them. Left out: what
    a resume may change (the rest of `train` — the README lets a resumed run take a new lr, steps,
    cadences —, `eval`, `output_dir`, and `_RESUME_MAY_CHANGE`)."""
    import json

    from posttrain.models.loading import model_files
    from posttrain.models.presets import is_preset, preset_path

    knobs = {section for section, _ in _RESUME_MAY_CHANGE}
    settings: dict[str, Any] = {}
    for section, values in cfg.to_dict().items():
        if section in ("eval", "output_dir"):
            continue
        if not isinstance(values, dict):
            settings[section] = values
            continue
        for key, value in values.items():
            if section == "train" and key not in _TRAIN_FINGERPRINTED:
                continue
            if section in knobs and ((section, key) in _RESUME_MAY_CHANGE or key.startswith("vllm_")):
                continue  # how, not what: memory and speed knobs, the rollout engine
            settings[f"{section}.{key}"] = value
    path = getattr(getattr(cfg, "model", None), "path", None)
    if isinstance(path, str) and path:
        # a preset is built from code, the same at every build: its directory's name (version and
        # definition) says what it is, where a rebuilt cache would have new times
        settings[MODEL_FILES] = preset_path(path).name if is_preset(path) else _digest(model_files(path))
    data_files = {name: _file_identity(name) for key, value in settings.items()
                  if key.endswith("files") and isinstance(value, list) for name in value
                  if isinstance(name, str) and name != "synthetic"}
    if data_files:  # rows edited under the same name are other data: the position counts the old file's batches
        settings[DATA_FILES] = data_files
    return json.loads(json.dumps(settings, default=str))  # as a checkpoint's JSON reads back (tuples as lists)


def _file_identity(name: str) -> list | str | None:
    """A data file as the fingerprint knows it: [size, digest of its contents (`_content_digest`)];
    a directory (a datasets save_to_disk) a digest of its files' names, sizes and contents; None
    when it is not there. Contents, not modification times: a copy of the same rows (to a node's
    scratch disk after a preemption, or written again by a script) is the same data."""
    import os

    path = Path(os.path.expanduser(name))
    try:
        if path.is_dir():
            return _digest([[str(f.relative_to(path)), (size := f.stat().st_size), _content_digest(f, size)]
                            for f in sorted(path.rglob("*")) if f.is_file()])
        size = path.stat().st_size
        return [size, _content_digest(path, size)]
    except OSError:
        return None


_WHOLE_FILE_BYTES = 64 << 20  # files up to this size are digested whole; larger ones by BLOCKS spread evenly
_BLOCKS, _BLOCK_BYTES = 64, 256 << 10


def _content_digest(path: Path, size: int) -> str:
    """A digest of a file's bytes: all of them up to _WHOLE_FILE_BYTES (about 0.1 s at 64 MiB),
    else _BLOCKS blocks of _BLOCK_BYTES from its start to its end (a resume of a 100 GB file
    reads 16 MiB; an edit that keeps the size and misses every block goes unseen)."""
    import hashlib

    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as f:
        if size <= _WHOLE_FILE_BYTES:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        else:
            for k in range(_BLOCKS):
                f.seek((size - _BLOCK_BYTES) * k // (_BLOCKS - 1))
                digest.update(f.read(_BLOCK_BYTES))
    return digest.hexdigest()


# seed: the synthetic rows, the held-out split and the data order; batch_size: what the data
# position counts (micro-batches); freeze: which weights (and moments) the checkpoint holds
_TRAIN_FINGERPRINTED = ("seed", "batch_size", "freeze")
MODEL_FILES = "model.files"  # the fingerprint's key for `model_files`
DATA_FILES = "data.file_identities"  # the fingerprint's key for the data files' `_file_identity`, by name

_RESUME_MAY_CHANGE = (("model", "gradient_checkpointing"), ("model", "lean_activations"), ("model", "padding_free"),
                      ("dpo", "share_prompt"), ("reward", "share_prompt"), ("rollout", "engine"),
                      ("rollout", "batch_size"), ("forgetting", "max_retain_increase"),
                      ("forgetting", "retain_exact_match"))


def _digest(value) -> str:
    import hashlib
    import json

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _legacy_digest(settings: dict[str, Any]) -> str:
    """The fingerprint a checkpoint held before it kept the settings themselves: a digest of the
    sections, without `train` and the model's files."""
    nested: dict[str, Any] = {}
    for key, value in settings.items():
        section, _, name = key.partition(".")
        if section == "train" or key in (MODEL_FILES, DATA_FILES):
            continue
        if name:
            nested.setdefault(section, {})[name] = value
        else:
            nested[section] = value
    return _digest(nested)


def _check_same_run(resume_from: Path, fingerprint: dict[str, Any] | None) -> None:
    """Refuse a resume from a checkpoint whose fingerprint (`run_fingerprint`) differs from this
    run's, naming the settings changed (`_change`). A value an older version recorded otherwise for
    the same training (`config.preference.same_as_recorded_earlier`: cdpo's ε recorded null) is
    no change."""
    import json

    from posttrain.config.preference import same_as_recorded_earlier

    saved = json.loads((resume_from / checkpoint.LOOP_STATE).read_text()).get("fingerprint")
    if fingerprint is None or saved is None:
        return
    if isinstance(saved, str):  # an older checkpoint: the digest alone, which cannot say what changed
        changed = [] if saved == _legacy_digest(fingerprint) else ["model, data, adapter, loss or forgetting"]
    else:
        changed = [said for key in sorted(saved.keys() | fingerprint.keys())
                   if (then := saved.get(key, _UNSET)) != (now := fingerprint.get(key, _UNSET))
                   and not same_as_recorded_earlier(key, then, now) and (said := _change(key, saved, fingerprint))]
    if changed:
        shown = "; ".join(changed[:4]) + (f"; and {len(changed) - 4} more" if len(changed) > 4 else "")
        raise ConfigError(f"{resume_from} was written by a run with other settings ({shown}); resuming would mix "
                          "the two. Set train.resume=never to start afresh, or another output_dir")


_UNSET = "(unset)"  # a setting one side lacks (a section added since the checkpoint was written)


def _change(key: str, saved: dict, now: dict) -> str:
    """A setting that differs between the checkpoint's fingerprint and this run's, as the refusal
    names it; "" when there is nothing to say (data files a checkpoint written before they were
    kept lacks, or files only added or removed: the list of files names them). Lists show the items
    removed and added (`-"a.jsonl" +"b.jsonl"`); other values cut to 60 characters after their
    common beginning, so two long values show where they differ. Values are JSON with their
    characters as written (数据.jsonl, not \\u escapes a cut could land inside)."""
    import json
    import os

    if key == MODEL_FILES:
        return f"the model at model.path {now.get('model.path', '')} changed since the checkpoint (its files)"
    before, after = saved.get(key, _UNSET), now.get(key, _UNSET)
    if key == DATA_FILES:
        if not isinstance(before, dict) or not isinstance(after, dict):
            return ""
        return "; ".join(f"the file {name} changed since the checkpoint ({_file_change(before[name], after[name])})"
                         for name in sorted(before.keys() & after.keys()) if before[name] != after[name])
    if isinstance(before, list) and isinstance(after, list):
        removed, added = [x for x in before if x not in after], [x for x in after if x not in before]
        if removed or added:
            items = [f"-{json.dumps(x, ensure_ascii=False)}" for x in removed] + \
                [f"+{json.dumps(x, ensure_ascii=False)}" for x in added]
            return f"{key}: " + " ".join(items[:6]) + (f" and {len(items) - 6} more" if len(items) > 6 else "")
    texts = [value if value is _UNSET else json.dumps(value, ensure_ascii=False) for value in (before, after)]
    common = len(os.path.commonprefix(texts))
    if max(map(len, texts)) > 60 and common > 20:  # keep a little of the common part for context
        texts = ["…" + text[common - 10:] for text in texts]
    shown = [text if len(text) <= 60 else text[:57] + "..." for text in texts]
    return f"{key}: {shown[0]} → {shown[1]}"


def _file_change(before, after) -> str:
    """How a data file's `_file_identity` changed, in words."""
    if isinstance(before, list) and isinstance(after, list) and before[0] != after[0]:
        return f"{before[0]} → {after[0]} bytes"
    if isinstance(before, list) and isinstance(after, list):
        return "the same size, other contents"
    return "gone" if after is None else "its files"


def _resume_path(resume: str, ckpt_root: Path) -> Path | None:
    """The checkpoint train.resume names: none (never), the newest complete one in `ckpt_root` (auto;
    none there is a fresh start, but damaged ones alone are refused, naming each and what is wrong:
    a fresh start would remove what may be a long run's only checkpoint), or the path given, which
    must be a complete checkpoint (refused naming the file cut short or missing)."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoint.latest_complete(ckpt_root)
        damaged = checkpoint.incomplete(ckpt_root) if found is None else {}
        if damaged:  # a fresh start would remove them: a preempted job's whole progress, maybe one copy away
            named = "; ".join(f"{path.name}: {', '.join(said)}" for path, said in damaged.items())
            raise ConfigError(f"train.resume=auto: {ckpt_root} holds no complete checkpoint, only damaged ones "
                              f"({named}); a fresh start would remove them. Restore the files named to resume, "
                              "or set train.resume=never to start afresh")
        return found
    path = Path(resume)
    found = checkpoint.problems(path)
    if found:
        raise ConfigError(f"train.resume={resume}: not a complete checkpoint directory ({'; '.join(found)})")
    return path
