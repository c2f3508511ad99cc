"""Catastrophic-forgetting control for every training stage: measure what the model keeps, replay
it, anchor the weights, distil, project, unfreeze gradually.

`forgetting.retain_files` names data the model already handles and must keep handling (rows in
sft's formats, whatever the stage trains on). Its rows are split once (by `train.seed`; rows that
train an answer from the same turns, `data.pipeline.trained_prompt_keys`, on one side together) into
  - a held-out share (`forgetting.retain_eval_fraction`), only ever measured: the token-mean loss
    on it (`retain_loss`, nats per token) is logged at step 0 and at every evaluation, and the run
    can stop when it rises too far, or is no longer finite (`forgetting.max_retain_increase`);
  - the pool, which is replayed (sft's `replay_ratio` mixes pool rows into the training rows;
    `lm_coef` adds an LM loss on a pool batch every step, in any stage), on a seeded sample of
    which (`fisher_examples` rows) EWC's Fisher is estimated, and from which distillation and
    A-GEM take their batches (`train.retain_terms`).
Measuring on rows that are also replayed would flatter replay, hence the split.

Two penalties anchor the trained parameters at θ₀, their values when the run starts
(`losses.regularization.anchored_penalty`): L2-SP (`forgetting.l2sp`, every weight alike) and EWC
(`forgetting.ewc`, each weight by its diagonal empirical Fisher on the pool). Their gradient is
added once per optimizer step, before clipping; θ₀ (and F) cost one more copy (two) of the
trained parameters, on their device, and travel in every checkpoint so that a resumed run keeps
the original anchor. Only the policy's parameters are anchored (not PPO's value head).

`forgetting.unfreeze_every` (gradual unfreezing, `train.unfreezing`) needs no retain data.
`attach` gives a stage these hooks of the loop, keeping the stage's own.
"""

from __future__ import annotations

import functools
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from posttrain.data.records import IGNORE_INDEX, Example, Record
from posttrain.errors import ConfigError


@dataclass
class RetainData:
    pool: list[Example]  # replayed, and EWC's Fisher
    held_out: list[Example]  # measured only
    held_out_records: list[Record] = field(default_factory=list)  # for exact match: held_out's rows with an answer


def retain_data_config(cfg):
    """The sft data settings retain rows are read with: the stage's template, bad-row rules and
    length (sft's and dpo's max_length, sft's overlength; the RL stages' longest prompt plus the
    longest completion), in any sft format, detected per file (format auto: the rows of what the
    model must keep need not be in the new task's `data.format`)."""
    import dataclasses

    from posttrain.config.sections import DataConfig

    d = cfg.data
    if isinstance(d, DataConfig):
        return dataclasses.replace(d, train_files=list(cfg.forgetting.retain_files), format="auto")
    max_length = getattr(d, "max_length", 0) or d.max_prompt_length + cfg.rollout.max_new_tokens
    return DataConfig(train_files=list(cfg.forgetting.retain_files), format="auto", template=d.template,
                      max_length=max_length, overlength=getattr(d, "overlength", "truncate"), bad_rows=d.bad_rows,
                      max_bad_fraction=d.max_bad_fraction)


def _length_settings(cfg, d) -> str:
    """The settings that bound a retain row's length, as the user wrote them."""
    if hasattr(cfg.data, "max_length"):  # sft, dpo
        return f"data.max_length={d.max_length}, data.overlength={d.overlength}"
    return (f"data.max_prompt_length + rollout.max_new_tokens = {cfg.data.max_prompt_length} + "
            f"{cfg.rollout.max_new_tokens} tokens, longer rows cut at the end")


def prepare_retain_data(cfg, tokenizer, run_dir: Path | None, seed: int, log) -> RetainData:
    """Read `cfg.forgetting.retain_files` in any sft format (detected per file) with the training
    data's template, length and bad-row rules (`retain_data_config`; bad rows go to
    run_dir/rejects-retain.jsonl), and split off the held-out share by prompt (a prompt that
    appears more than once is measured or replayed, never both). Exact match scores held-out rows
    the retain loss reads: those the length rules drop, or that keep no token to train on, are in
    neither."""
    from posttrain.data import formats
    from posttrain.data.pipeline import _labelled_only, encode_all, rejects_file, split_eval, trained_prompt_keys
    from posttrain.data.templates import adopt_template

    f, d = cfg.forgetting, retain_data_config(cfg)
    records, _ = formats.load_records(f.retain_files, fmt=d.format, bad_rows=d.bad_rows,
                                      max_bad_fraction=d.max_bad_fraction, rejects_path=rejects_file(run_dir, "retain"),
                                      log=log)
    if len(records) < 2:
        raise ConfigError(f"forgetting.retain_files: {len(records)} row(s); at least 2 are needed, one to measure "
                          "forgetting on and one to replay or estimate the Fisher from")
    pool_records, held_records = split_eval(records, f.retain_eval_fraction, seed, keys=trained_prompt_keys)
    template = adopt_template(tokenizer, d.template)
    pool, _ = encode_all(pool_records, tokenizer, template, d, log, "retain pool")
    held, _ = encode_all(held_records, tokenizer, template, d, log, "retain held-out")
    (pool, _), (held, _) = _labelled_only(pool, log, "retain pool"), _labelled_only(held, log, "retain held-out")
    if not pool or not held:
        raise ConfigError("forgetting.retain_files: no retain example with a token to train on is left in the "
                          + ("pool" if not pool else "held-out share")
                          + f" (after {_length_settings(cfg, d)} and empty answers)")
    measured = {example.source for example in held}  # the rows the retain loss reads
    answered = [r for r in held_records
                if r.source in measured and any(m["role"] == "assistant" for m in r.messages or [])]
    if f.retain_exact_match > 0 and not answered:
        raise ConfigError("forgetting.retain_exact_match scores answers, and the held-out retain rows have none "
                          "(text rows); set it to 0 and read retain_loss")
    held_records = answered
    uses = [name for name, on in (("replay", getattr(f, "replay_ratio", 0) > 0), ("Fisher", f.ewc > 0),
                                  ("lm_coef", f.lm_coef > 0), ("distill", f.distill > 0), ("project", f.project))
            if on]
    log(f"retain: {len(records)} rows: {len(pool)} in the pool" + (f" ({', '.join(uses)})" if uses else "")
        + f", {len(held)} held out to measure forgetting on; each at most {d.max_length} tokens "
        f"({_length_settings(cfg, d)})")
    return RetainData(pool, held, held_records)


def mix_replay(train: list[Example], pool: list[Example], ratio: float, seed: int, log) -> list[Example]:
    """`train` plus m = round(n·ratio/(1−ratio)) pool examples, so that they are `ratio` of the mix;
    drawn in a seeded order, going round the pool again (and saying so) when m exceeds it. The
    same examples are replayed every epoch; the batch plan shuffles the mix."""
    if ratio <= 0:
        return train
    m = round(len(train) * ratio / (1.0 - ratio))
    order = list(range(len(pool)))
    random.Random(seed + 7_919).shuffle(order)
    replayed = [pool[order[i % len(pool)]] for i in range(m)]
    repeats = f"; the pool holds {len(pool)}, so some are repeated" if m > len(pool) else ""
    log(f"replay: {m} retain examples mixed into {len(train)} training examples "
        f"({m / max(1, len(train) + m):.1%} of the mix){repeats}")
    return train + replayed


def trained_parameters(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the loop clips and the optimizer steps, in the same order."""
    return [p for p in module.parameters() if p.requires_grad]


def fisher_rows(pool: list[Example], n: int, seed: int) -> list[Example]:
    """The pool rows EWC's Fisher is estimated on: min(n, pool) of them drawn by `seed` (a seeded
    sample of the whole pool, as replay and the held-out split draw theirs: a retain file is often
    old tasks one after another, and its head would hold only the first), in pool order."""
    chosen = random.Random(seed + 7_927).sample(range(len(pool)), min(n, len(pool)))
    return [pool[i] for i in sorted(chosen)]


def fisher_diagonal(model: torch.nn.Module, examples: list[Example], params: list[torch.Tensor], pad_id: int,
                    accelerator) -> list[torch.Tensor]:
    """The empirical Fisher's diagonal (EWC, Kirkpatrick et al. 2017: F = E[(∇ log p(y|x))²]),

        F_i = mean over examples e of (∂ℓ_e/∂θ_i)²,   ℓ_e = −log p(y_e|x_e) = −Σ_t log p(y_t | y_<t, x_e),

    the SUM of e's token losses under its own labels: a sequence is one sample of the model's
    distribution, so a row is not down-weighted by its length (a token-mean ℓ_e would weigh a row
    of n tokens by 1/n²). One example per backward (squaring a batch's summed gradient would count
    cross terms between examples). Float32, without autocast; the processes split the examples
    and sum. Then scaled to mean 1 over all trained elements, so that `forgetting.ewc` reads
    on L2-SP's scale (the scaling also removes the sum's growth with the rows' lengths).
    Worked example: a bigram table W (2×2) at zero (p = ½, ½), a row predicting 1 after 0 and 0
    after 1 (∇W = ±½ everywhere) and a row predicting 0 after 0 three times (∇W₀ = (−1.5, 1.5),
    ∇W₁ = 0) give F = (1.25, 1.25 | 0.125, 0.125), scaled: (20/11, 20/11 | 2/11, 2/11)."""
    from posttrain.data.batching import collate

    sums = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    was_training = model.training
    model.eval()  # no dropout: the Fisher of the model as it predicts
    # the class's forward: accelerate wraps the instance's in autocast under mixed precision
    forward = type(model).forward
    try:
        for example in mine:
            batch = {k: v.to(accelerator.device) for k, v in collate([example], pad_id).items()}
            loss = forward(model, **batch)  # −log p(y|x): the summed token loss
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for total, grad in zip(sums, grads):
                if grad is not None:
                    total += grad.float().to_dense() ** 2
    finally:
        model.train(was_training)
    sums = [accelerator.reduce(s, "sum") / len(examples) for s in sums]
    mean = sum(float(s.double().sum()) for s in sums) / max(1, sum(s.numel() for s in sums))
    if not mean > 0:
        raise ConfigError("forgetting.ewc: the Fisher is zero on every trained parameter (the retain examples give "
                          "no gradient); use forgetting.l2sp instead")
    return [(s / mean).to(p.dtype) for s, p in zip(sums, params)]


def check_anchoring(cfg, accelerator) -> None:
    """L2-SP and EWC hold θ₀ (and F) beside whole parameters, and lm_coef, distill and project take
    gradients of the unwrapped policy: refuse sharded parameters (FSDP, DeepSpeed), on a fresh
    start and on a resume alike."""
    uses = [name for name, on in (("l2sp", cfg.l2sp > 0), ("ewc", cfg.ewc > 0), ("lm_coef", cfg.lm_coef > 0),
                                  ("distill", cfg.distill > 0), ("project", cfg.project)) if on]
    if uses and accelerator.distributed_type not in ("NO", "MULTI_GPU", "MULTI_CPU", "MULTI_XPU"):
        raise ConfigError(f"forgetting.{uses[0]} needs whole parameters on every process; "
                          f"{accelerator.distributed_type} shards them")


class ForgettingControl:
    """What the loop calls for `forgetting.*` (see loop.Stage and `attach`): begin, regularize,
    monitor, inactive_parameters, and the checkpointed anchor and distillation targets."""

    def __init__(self, cfg, retain: RetainData | None, policy: torch.nn.Module, pad_id: int, batch_size: int,
                 seed: int, loss: str = "auto", chunk_size: int = 256, log=print, step_batch_size: int | None = None):
        from posttrain.data.batching import collate
        from posttrain.train.retain_terms import RetainTerms

        self.cfg = cfg  # ForgettingConfig
        self.retain, self.policy, self.pad_id = retain, policy, pad_id
        self.seed, self.log = seed, log
        self.measures = retain is not None
        self._lm_args = (loss, chunk_size)
        self._lm: torch.nn.Module | None = None
        held = retain.held_out if retain is not None else []
        self.held_out = [collate(held[i : i + batch_size], pad_id) for i in range(0, len(held), batch_size)]
        self.anchored = cfg.l2sp > 0 or cfg.ewc > 0
        self.terms = (RetainTerms(cfg, retain.pool, policy, pad_id, batch_size, seed, chunk_size, step_batch_size)
                      if retain else None)
        self.unfreezing = None
        if cfg.unfreeze_every > 0:
            from posttrain.train.unfreezing import GradualUnfreezing

            self.unfreezing = GradualUnfreezing(policy, cfg.unfreeze_every, log)
        self.params: list[torch.nn.Parameter] | None = None
        self.anchors: list[torch.Tensor] = []
        self.fisher: list[torch.Tensor] | None = None
        self.start_loss: float | None = None
        self.last_loss: float | None = None

    @property
    def lm(self) -> torch.nn.Module:
        """The policy behind sft's loss module: the retain loss and EWC's Fisher, in whatever stage."""
        if self._lm is None:
            from posttrain.train.sft import CausalLMLoss

            self._lm = CausalLMLoss(self.policy, *self._lm_args)
        return self._lm

    @property
    def regularizes(self) -> bool:
        return self.anchored or (self.terms is not None and self.terms.active)

    # -- the loop's hooks

    def begin(self, module, accelerator) -> dict[str, float]:
        """θ₀ (and F, and the distillation targets) from the weights as training starts; the
        retain loss at step 0."""
        self.params = trained_parameters(self.policy)
        if self.anchored:
            self.anchors = [p.detach().clone() for p in self.params]
        if self.cfg.ewc > 0:
            rows = fisher_rows(self.retain.pool, self.cfg.fisher_examples, self.seed)
            self.log(f"EWC: the Fisher on {len(rows)} of the {len(self.retain.pool)} pool rows (drawn by train.seed)")
            self.fisher = fisher_diagonal(self.lm, rows, self.params, self.pad_id, accelerator)
        if self.cfg.distill > 0:
            self.terms.compute_teacher(accelerator)
        if not self.measures:  # L2-SP alone needs no retain rows
            return {}
        self.start_loss = self._retain_loss(accelerator)
        self.last_loss = self.start_loss
        return {"retain_loss": self.start_loss}

    def regularize(self, module, grad_scale: float, accelerator, step: int) -> dict[str, float]:
        """A-GEM's projection, then ∂Ω/∂θ of the penalties and the LM / distillation gradients
        (times the fp16 loss scale the gradients still carry) added to each gradient; a parameter
        without a gradient this step (staged or gradual unfreezing's inactive ones) is left alone."""
        from posttrain.losses.regularization import anchored_penalty

        if self.params is None:  # resumed: the anchor came from the checkpoint
            self._place(trained_parameters(self.policy))
        figures = {}
        if self.terms is not None and self.terms.active:
            figures |= self.terms.apply(self.params, grad_scale, accelerator, step)
        if not self.anchored:
            return figures
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        anchors = [self.anchors[i] for i in live]
        for name, strength, importance in (("l2sp", self.cfg.l2sp, None), ("ewc", self.cfg.ewc, self.fisher)):
            if strength <= 0:
                continue
            weights = None if importance is None else [importance[i] for i in live]
            value, grads = anchored_penalty(params, anchors, strength, weights)
            for p, g in zip(params, grads):
                p.grad.add_(g, alpha=grad_scale)
            figures[f"{name}_penalty"] = float(value)
        return figures

    def monitor(self, module, accelerator) -> tuple[dict[str, float], str | None]:
        """The retain loss now and its rise since step 0; a reason to stop when the rise is above
        `max_retain_increase` (> 0), a loss that is not finite counting as above it."""
        self.last_loss = self._retain_loss(accelerator)
        increase = self.last_loss - self.start_loss if self.start_loss is not None else 0.0
        limit = self.cfg.max_retain_increase
        reason = None
        if limit > 0 and not math.isfinite(increase):  # NaN > limit is False: it would never stop
            reason = (f"the retain loss is {self.last_loss} (at the start {self.start_loss}): not finite, which "
                      f"forgetting.max_retain_increase={limit} counts as a rise above it")
        elif limit > 0 and increase > limit:
            reason = (f"the retain loss rose {increase:.4f} above its start ({self.start_loss:.4f} -> "
                      f"{self.last_loss:.4f}), more than forgetting.max_retain_increase={limit}")
        return {"retain_loss": self.last_loss, "retain_loss_increase": increase}, reason

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        tensors = {f"anchor.{i}": t.cpu() for i, t in enumerate(self.anchors)}
        tensors |= {f"fisher.{i}": t.cpu() for i, t in enumerate(self.fisher or [])}
        tensors |= self.terms.teacher_tensors() if self.terms is not None else {}
        return {"start_loss": self.start_loss, "anchors": len(self.anchors),
                "fisher": len(self.fisher or []), "retain_rows": self._retain_digest}, tensors

    def load_state_dict(self, plain: dict, tensors: dict[str, torch.Tensor]) -> None:
        saved = plain.get("retain_rows")
        if saved is not None and saved != self._retain_digest:
            # the start loss, the Fisher and the distillation targets belong to the checkpoint's rows
            raise ConfigError("the retain rows, or their split into pool and held-out share (train.seed), differ from "
                              "the checkpoint's; resume with the same forgetting.retain_files and train.seed, or start "
                              "afresh with train.resume=never")
        self.start_loss = self.last_loss = plain["start_loss"]
        self.anchors = [tensors[f"anchor.{i}"] for i in range(plain["anchors"])]
        self.fisher = [tensors[f"fisher.{i}"] for i in range(plain["fisher"])] or None
        if self.anchored and not self.anchors:
            raise ConfigError("this checkpoint holds no forgetting anchor (it was written without forgetting.l2sp / "
                              "forgetting.ewc); start afresh with train.resume=never")
        if self.terms is not None:
            self.terms.load_teacher(tensors)

    # -- helpers

    def _place(self, params: list[torch.nn.Parameter]) -> None:
        if self.anchored and (len(params) != len(self.anchors)
                              or any(p.shape != a.shape for p, a in zip(params, self.anchors))):
            raise ConfigError("the checkpoint's forgetting anchor does not match the trained parameters")
        self.params = params
        self.anchors = [a.to(p.device, p.dtype) for p, a in zip(params, self.anchors)]
        if self.fisher is not None:
            self.fisher = [f.to(p.device, p.dtype) for p, f in zip(params, self.fisher)]

    @functools.cached_property
    def _retain_digest(self) -> str | None:
        """A digest of the pool and held-out rows' tokens and labels, in order (they never change
        during a run: hashed once, at the first checkpoint)."""
        if self.retain is None:
            return None
        import hashlib

        digest = hashlib.sha256()
        for part in (self.retain.pool, self.retain.held_out):
            for example in part:
                digest.update(repr((example.input_ids, example.labels)).encode())
            digest.update(b"|")
        return digest.hexdigest()[:16]

    def _retain_loss(self, accelerator) -> float:
        from posttrain.train.loop import evaluate

        loss, _ = evaluate(self.lm, _HeldOut(self.held_out), accelerator)
        return loss

    def summary(self) -> dict:
        if self.start_loss is None:
            return {}
        return {"retain_loss_before": self.start_loss, "retain_loss_after": self.last_loss,
                "retain_loss_increase": self.last_loss - self.start_loss}


class _HeldOut:
    """The retain held-out batches in the shape `loop.evaluate` reads a stage's held-out set."""

    def __init__(self, batches: list[dict]):
        self.batches = batches

    def eval_micro_batches(self) -> list[dict]:
        return self.batches

    @staticmethod
    def weight(batch) -> float:
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def build_control(cfg, tokenizer, policy: torch.nn.Module, accelerator, run_dir: Path | None, log,
                  loss: str = "auto") -> ForgettingControl | None:
    """The run's ForgettingControl from `cfg.forgetting` (any stage's config), or None when the
    section is off. Reads the retain rows (`prepare_retain_data`) when it names any."""
    f, t = cfg.forgetting, cfg.train
    if not f.retain_files and f.unfreeze_every <= 0 and f.l2sp <= 0:
        return None
    check_anchoring(f, accelerator)
    retain = prepare_retain_data(cfg, tokenizer, run_dir, t.seed, log) if f.retain_files else None
    # the retain batch of a step: by default the step's global batch, however it is split
    step_batch = t.batch_size * t.grad_accum * accelerator.num_processes
    return ForgettingControl(f, retain, policy, tokenizer.pad_token_id, t.batch_size, t.seed, loss,
                             t.loss_chunk_size, log, step_batch)


def retain_exact_match(cfg, model, tokenizer, control: ForgettingControl | None, when: str,
                       max_new_tokens: int) -> dict:
    """Exact match on held-out retain prompts (`forgetting.retain_exact_match`; rows with an
    answer, see prepare_retain_data), before or after training; {} when off. The generation budget
    is `max_new_tokens` or the longest held-out retain answer (+1), whichever is larger: an RL
    stage's budget is its own task's, and a cut answer would count as forgotten."""
    if control is None or control.retain is None:
        return {}
    from posttrain.train.sft import exact_match_report

    longest = max((e.num_label_tokens for e in control.retain.held_out), default=0)
    return exact_match_report(model, tokenizer, control.retain.held_out_records, cfg.forgetting.retain_exact_match,
                              retain_data_config(cfg).template, max(max_new_tokens, longest + 1), when,
                              name="retain_exact_match", prompts="held-out retain prompts")


def report(cfg, control: ForgettingControl | None, model, tokenizer, when: str, max_new_tokens: int,
           main: bool) -> dict:
    """The forgetting figures for summary.json, before or after training: the retain loss's
    (after) and retain exact match (main process only); {} when forgetting is off."""
    if control is None:
        return {}
    figures = control.summary() if when == "after" else {}
    return figures | (retain_exact_match(cfg, model, tokenizer, control, when, max_new_tokens) if main else {})


def attach(stage, control: ForgettingControl | None) -> None:
    """Give `stage` the loop hooks of `control` (see loop.Stage), composed with any it has of its
    own: the stage's checkpoint state and inactive parameters (an adapter schedule) stay."""
    if control is None:
        return
    stage.forgetting = control
    if control.unfreezing is not None:
        own = getattr(stage, "inactive_parameters", None)
        gradual = control.unfreezing.inactive_parameters
        stage.inactive_parameters = gradual if own is None else (lambda step: _union(own(step), gradual(step)))
    if not control.measures and not control.anchored:
        return
    stage.begin = control.begin
    if control.measures:
        stage.monitor, stage.monitor_stop = control.monitor, "forgetting"  # its stop's name in summary.json
    if control.regularizes:
        stage.regularize, stage.dense_gradients = control.regularize, True
    own_state, own_load = getattr(stage, "state_dict", None), getattr(stage, "load_state_dict", None)
    if own_state is None:
        stage.state_dict, stage.load_state_dict = control.state_dict, control.load_state_dict
        return

    def state_dict():
        (plain, tensors), (mine, my_tensors) = own_state(), control.state_dict()
        return plain | {"forgetting": mine}, tensors | {f"forgetting.{k}": v for k, v in my_tensors.items()}

    def load_state_dict(plain: dict, tensors: dict) -> None:
        if "forgetting" not in plain:
            raise ConfigError("this checkpoint was written without forgetting.retain_files or forgetting.l2sp; "
                              "start afresh with train.resume=never")
        own_load({k: v for k, v in plain.items() if k != "forgetting"},
                 {k: v for k, v in tensors.items() if not k.startswith("forgetting.")})
        control.load_state_dict(plain["forgetting"], {k[len("forgetting."):]: v for k, v in tensors.items()
                                                      if k.startswith("forgetting.")})

    stage.state_dict, stage.load_state_dict = state_dict, load_state_dict


def _union(first: list, second: list) -> list:
    seen = {id(p) for p in first}
    return first + [p for p in second if id(p) not in seen]
