"""THE training loop. Every stage (SFT, reward, DPO, ...) runs through `train()`.

A stage supplies a `Stage`: its micro-batches and a module mapping a batch to a summed
loss. Everything else lives here, once: gradient accumulation with exact normalisation,
data-parallel sharding, clipping, AdamW with per-layer learning rates, schedules, mixed
precision, the non-finite guard, evaluation with early stopping, crash-safe checkpoints
with bitwise resume, and logging. The run directory around it (start_run, finish_run, its lock,
which checkpoint a run resumes from and whether it may) is `runs.py`'s.

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
from posttrain.train.metrics import AT_STEP, RATES, RunLogger, add_to_interval, close_interval, peak_memory_mb
from posttrain.train.optim import clip_grad_norm, lr_factor, make_optimizer, set_lr, sparse_embedding_gradients
from posttrain.train.runs import _check_same_run, _clear_earlier_run, _resume_path, released_on_failure

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
    """`train`'s work, in outline: the optimizer and the prepared module; a resume or a fresh start,
    the plan and the log (`_open`); the notes the run's settings call for; the stage's `begin` on a
    fresh start; then one step after another (`_Run.step`) until the planned steps, an early stop or
    the passes over the data end the run, the progress rate counted from the first of them
    (`RunLogger.start_clock`); how it ended (`_Run.result`)."""
    segment_started = time.perf_counter()
    optimizer = make_optimizer(stage.module, cfg, getattr(stage, "lr_scale", None))
    module, optimizer = accelerator.prepare(stage.module, optimizer)
    world = accelerator.num_processes
    group = world * cfg.grad_accum
    per_epoch = stage.micro_batches_per_epoch()
    state, resume_from, total_steps, log = _open(stage, cfg, run_dir, accelerator, module, optimizer, fingerprint,
                                                 group, per_epoch)
    try:  # the progress bar closed however the run ends, a failing `begin` too
        warmup = _warmup_steps(cfg, total_steps, state, log)
        _note_bfloat16_weights(stage, log)
        state["stopped_early"] = _stopped_before(state, cfg.early_stopping_patience)
        held_out = stage.eval_micro_batches()
        _note_nothing_held_out(stage, cfg, held_out, log)
        run = _Run(stage, cfg, accelerator, module, optimizer, run_dir / "checkpoints", state, log, total_steps, warmup,
                   per_epoch, held_out, segment_started, earlier_seconds=state.get("wall_seconds", 0.0))
        module.train()
        steps = _steps(stage, group, *_position(state, group))
        run.passes_done = _passes_done(stage, cfg, state, per_epoch)
        sparse_ok = _sparse_gradients_ok(stage, cfg, accelerator)
        if resume_from is None:
            _begin(stage, module, accelerator, log)
        with sparse_embedding_gradients(accelerator.unwrap_model(module), enabled=sparse_ok), \
                training_attention_kernels(accelerator.device), _interrupt_at_step_end(world == 1) as interrupted:
            log.start_clock()  # the rate and ETA count the steps' time, not the one-off start above
            while state["step"] < total_steps and not state["stopped_early"] and not run.passes_done:
                run.step(steps, interrupted)
    finally:
        log.close()
    if resume_from is not None and run.eval_loss is None and (state["step"] >= total_steps or state["stopped_early"]
                                                              or run.passes_done):
        run.evaluate_restored()
    return run.result()


def _open(stage: Stage, cfg, run_dir: Path, accelerator, module, optimizer, fingerprint: dict[str, Any] | None,
          group: int, per_epoch: int | None) -> tuple[dict[str, Any], Path | None, int, RunLogger]:
    """Where a run starts, said in its log: resumed from train.resume's checkpoint (`_restore`), or
    afresh (an earlier run's checkpoints and results removed: `_clear_earlier_run`); the steps it
    plans (`plan_total_steps`; under train.epochs what the plan was made of is kept in the state, for
    a resume to keep); its log opened (a resume forgets the lines after its checkpoint, a fresh start
    every line of an earlier run), naming the damaged checkpoints removed, the resume, a changed
    plan, a checkpoint past the plan, what a fresh start removed. Returns (loop state, the checkpoint
    resumed from or None, planned steps, log)."""
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
    return state, resume_from, total_steps, log


def _note_bfloat16_weights(stage: Stage, log: RunLogger) -> None:
    """Say when trained weights are bfloat16: AdamW's float32 update is rounded onto them, and
    small updates vanish."""
    coarse = sum(p.numel() for p in stage.module.parameters() if p.requires_grad and p.dtype == torch.bfloat16)
    if coarse:  # AdamW's moments and update are float32, rounded onto these weights: no float32 master copy
        log.message(f"note: {coarse:,} trained parameters are bfloat16 (AdamW's moments are float32): an update "
                    "below ~1/256 of a weight rounds away (at lr 2e-5 most do). For bf16 speed with float32 "
                    "weights, load model.dtype=float32 and set train.mixed_precision=bf16")


def _note_nothing_held_out(stage: Stage, cfg, held_out: list[Batch], log: RunLogger) -> None:
    """Say when train.early_stopping_patience or train.eval_every has nothing to evaluate."""
    if cfg.early_stopping_patience and not held_out:
        log.message("note: train.early_stopping_patience has no held-out data to evaluate, so it cannot stop the run")
    if (cfg.eval_every and not held_out and getattr(stage, "held_out_figures", None) is None
            and getattr(stage, "monitor", None) is None):
        log.message(f"note: train.eval_every={cfg.eval_every} has no held-out data to evaluate (none was set "
                    "aside): nothing is evaluated during the run")


def _sparse_gradients_ok(stage: Stage, cfg, accelerator) -> bool:
    """One process without a GradScaler: untied embeddings take sparse gradients (see optim.py)."""
    return (accelerator.num_processes == 1 and accelerator.distributed_type == "NO" and accelerator.scaler is None
            and getattr(cfg, "optimizer", "adamw") in ("adamw", "adamw_fused")
            and not getattr(stage, "dense_gradients", False))


def _begin(stage: Stage, module, accelerator, log: RunLogger) -> None:
    """A fresh run's start: the stage's `begin`, if it has one, and its figures logged at step 0."""
    begin = getattr(stage, "begin", None)
    if begin is not None:
        figures = begin(module, accelerator)
        if figures:
            log.log({"step": 0} | figures)
            log.message("step 0: " + _shown(figures))


@dataclass
class _Run:
    """One call of `train` as its steps see it: what is fixed when it starts, `state` (the loop state
    each step advances and each checkpoint holds: step, data position, counters, early stopping),
    whether the passes over the data are done (`_passes_done`), and the last evaluation's figures."""

    stage: Stage
    cfg: Any  # a TrainConfig
    accelerator: Any
    module: torch.nn.Module  # as accelerate prepared it
    optimizer: Any
    ckpt_root: Path
    state: dict[str, Any]
    log: RunLogger
    total_steps: int
    warmup: int
    per_epoch: int | None
    held_out: list[Batch]  # collated once, for every evaluation
    segment_started: float  # when this call of `train` began
    earlier_seconds: float = 0.0  # the segments before this resume
    passes_done: bool = False
    eval_loss: float | None = None
    eval_metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:  # the stage's optional hooks (see Stage), looked up once
        stage = self.stage
        self.inactive_at = getattr(stage, "inactive_parameters", lambda step: [])
        self.after_optimizer_step = getattr(stage, "after_optimizer_step", lambda step: None)
        self.epoch_ended = getattr(stage, "epoch_ended", None)
        self.at_step = AT_STEP | frozenset(getattr(stage, "metrics_at_step", ()))
        self.rates = RATES | getattr(stage, "rates", {})

    def wall_seconds(self) -> float:
        """The seconds `train` ran: this segment's, after those before its resume."""
        return self.earlier_seconds + time.perf_counter() - self.segment_started

    def step(self, steps: Iterator[tuple[int, int, list[Batch]]], interrupted) -> None:
        """One global step: the update (`_update`), the data position advanced (`_advance`), the step
        counted if non-finite and logged (`_log_step`), then an evaluation, a checkpoint and a
        signal's stop when due (`_checkpoint_when_due`). Raises TrainingAborted after too many
        non-finite steps in a row (`_count_nonfinite`)."""
        state, cfg = self.state, self.cfg
        started = time.perf_counter()
        epoch, micro_in_epoch, micro = next(steps)
        lr, loss, grad_norm, metrics, finite, overflow_scale = self._update(micro)
        self._advance(epoch, micro_in_epoch)
        abort = _count_nonfinite(state, finite, cfg, self.log, overflow_scale)
        record = _step_record(state, loss, lr, grad_norm, self.stage, micro, started, self.accelerator.num_processes,
                              self.per_epoch) | metrics
        interval = self._log_step(record, finite)
        if abort:
            raise TrainingAborted(abort)
        at_end = state["step"] == self.total_steps or self.passes_done
        if (cfg.eval_every and state["step"] % cfg.eval_every == 0) or at_end:
            evaluated = _evaluate_step(self.module, self.stage, self.accelerator, self.held_out, state, cfg, self.log,
                                       at_end)
            if evaluated is not None:
                self.eval_loss, self.eval_metrics = evaluated
        self._checkpoint_when_due(interval, at_end, interrupted)

    def _update(self, micro: list[Batch]) -> tuple[float, float, float, dict, bool, float | None]:
        """The step's update: the learning rate set (schedule and warmup), forward and backward
        (`_train_step`), then the optimizer's step, or none when the loss or the gradient norm is not
        finite (`_skipped_step`). Returns (lr, loss, grad norm, metrics, finite, the fp16 loss scale
        the gradients overflowed at or None)."""
        state, cfg = self.state, self.cfg
        lr = cfg.lr * lr_factor(state["step"], self.total_steps, cfg.schedule, self.warmup, cfg.min_lr_ratio)
        set_lr(self.optimizer, lr / cfg.lr)
        inactive = self.inactive_at(state["step"])
        loss, grad_norm, metrics = _train_step(self.module, self.stage, micro, self.accelerator, cfg, inactive,
                                               state["step"])
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        overflow_scale = None
        if finite:
            self.optimizer.step()
            self.after_optimizer_step(state["step"] + 1)
        else:
            overflow_scale = _skipped_step(self.accelerator, loss)
        self.optimizer.zero_grad(set_to_none=True)
        return lr, loss, grad_norm, metrics, finite, overflow_scale

    def _advance(self, epoch: int, micro_in_epoch: int) -> None:
        """The step counted and the data position moved past its micro-batches; an epoch the stage
        cut short (`epoch_ended`) counts as read, its position the next epoch's start."""
        state, per_epoch = self.state, self.per_epoch
        if self.epoch_ended is not None and per_epoch and micro_in_epoch < per_epoch and self.epoch_ended():
            epoch, micro_in_epoch = epoch + 1, 0  # cut short: read, as `_steps` will find next
        state.update(step=state["step"] + 1, epoch=epoch, micro_in_epoch=micro_in_epoch)
        self.passes_done = _passes_done(self.stage, self.cfg, state, per_epoch)
        state.pop("step_in_epoch", None)

    def _log_step(self, record: dict, finite: bool) -> dict:
        """A step's figures join the interval a line averages (see metrics.py), whose line is logged
        every train.log_every steps, at the last step (the plan's, or the one ending the passes over
        the data short of it) and before a non-finite step's own line. Returns the interval."""
        state = self.state
        interval = state.setdefault("log_interval", {})  # see metrics.py: lines hold interval means
        if finite:
            add_to_interval(interval, record, self.at_step)
        last = state["step"] == self.total_steps or self.passes_done
        if (state["step"] % self.cfg.log_every == 0 or last or not finite) and interval:
            self.log.log(close_interval(interval, self.rates))
        if not finite:
            self.log.log(record | {"steps_averaged": 1})
        self.log.advance(record)
        return interval

    def _checkpoint_when_due(self, interval: dict, at_end: bool, interrupted) -> None:
        """A checkpoint every train.save_every steps, at the end, at an early stop and on a signal
        (`_interrupt_at_step_end`), after which the run stops with `Stopped`, saying how to resume.
        A signal in the run's last step (or its evaluation, or one that stopped it early) stops it
        too: the caller's after-training work (its evaluation, final/) is left to the same command,
        whose resume has nothing left to train (`_train` evaluates the restored weights)."""
        state, cfg = self.state, self.cfg
        stopped_early = state["stopped_early"]
        signalled = bool(interrupted())
        # a run that stops logs the steps since its last line, before the checkpoint that
        # holds the interval: the resumed run starts its next line afresh
        last_line = close_interval(interval, self.rates) if (stopped_early or signalled) and interval else None
        if last_line is not None:
            self.log.log(last_line)
        if (cfg.save_every and state["step"] % cfg.save_every == 0) or at_end or stopped_early or signalled:
            self.save()
        if signalled:
            said = "" if last_line is None else (f" (loss {last_line['loss']:.4f} over the last "
                                                 f"{last_line['steps_averaged']} step(s))")
            last = at_end or stopped_early
            does = "finishes the run from it (the after-training evaluation and final/)" if last else "resumes from it"
            how = "the same command " + (does if cfg.resume == "auto" else f"with train.resume=auto {does}")
            if cfg.resume == "never":
                how += " (with train.resume=never it starts afresh)"
            where = f"step {state['step']} of {self.total_steps}" + (", the run's last step" if last else "")
            self.log.message(f"interrupted: checkpoint saved at {where}; {how}{said}")
            raise Stopped(interrupted())

    def save(self) -> None:
        """A checkpoint at this step (`checkpoint.save`): weights, optimizer, the loop state with
        fp16's loss scale and the seconds run so far, and the stage's own state."""
        stage, accelerator, state = self.stage, self.accelerator, self.state
        if getattr(stage, "on_checkpoint", None) is not None:
            stage.on_checkpoint()
        if accelerator.scaler is not None:  # fp16: the loss scale found so far, and its growth count
            state["grad_scaler"] = accelerator.scaler.state_dict()
        state["wall_seconds"] = self.wall_seconds()
        checkpoint.save(self.ckpt_root, state["step"], model=accelerator.unwrap_model(self.module),
                        optimizer=self.optimizer, loop_state=state, rank=accelerator.process_index,
                        world_size=accelerator.num_processes, barrier=accelerator.wait_for_everyone,
                        keep_last=self.cfg.keep_last,
                        stage_state=stage.state_dict() if hasattr(stage, "state_dict") else None)

    def evaluate_restored(self) -> None:
        """A resumed run that was already finished trains nothing, but its caller still reports the
        final evaluation (a pipeline rerun, say): the restored weights evaluated once, and shown to
        the stage's monitor (its figures; nothing is left to stop)."""
        evaluated = evaluate(self.module, self.stage, self.accelerator, self.held_out)
        if evaluated is not None:
            self.eval_loss, self.eval_metrics = evaluated
        if hasattr(self.stage, "monitor"):
            self.stage.monitor(self.module, self.accelerator)

    def result(self) -> LoopResult:
        """How the run ended (`LoopResult`), said in the log when the passes over the data ended it
        short of its plan or it stopped early."""
        state, cfg, log = self.state, self.cfg, self.log
        if self.passes_done and state["step"] < self.total_steps:
            log.message(f"train.epochs={cfg.epochs:g}: the passes over the data ended at step {state['step']} of "
                        f"the {self.total_steps} planned, as epochs cut short "
                        f"({getattr(self.stage, 'epochs_cut_by', 'the stage')}) allow; the learning-rate schedule "
                        f"was planned on the uncut most of {self.total_steps} steps and stopped at step "
                        f"{state['step']} of them")
        stop_reason, detail = "max_steps" if cfg.max_steps > 0 else "epochs", None
        if state["stopped_early"]:
            detail = state.get("stop_reason") or f"no eval improvement in {state['evals_without_improvement']} evals"
            stop_reason = state.get("stopped_by", "monitor") if state.get("stop_reason") else "patience"
            log.message(f"early stop at step {state['step']}: {detail}")
        return LoopResult(state["step"], state["stopped_early"], self.eval_loss, state["skipped_steps"],
                          self.accelerator.unwrap_model(self.module), self.eval_metrics, stop_reason, detail,
                          self.wall_seconds())


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
