"""Forgetting control that needs a forward pass on retain rows every step (`forgetting.*`).

Each optimizer step takes one batch of rows from the retain pool (`forgetting.retain_batch_size`,
by default the step's global batch: train.batch_size × grad_accum × processes, so how a step is
split changes nothing; drawn in a seeded order that is a pure function of the step, so a resumed
run takes the same batches; run through the model train.batch_size rows at a time) and, on the
policy as it stands after the step's backward:

  - `lm_coef` γ: adds γ·∇ of the token-mean LM loss on it. InstructGPT's PPO-ptx (Ouyang et al.
    2022, Eq. 2) mixes pretraining gradients into PPO this way; here it works in every stage, and
    is how DPO and the RL stages replay (their rows are not text to train on).
  - `distill` λ: adds λ·∇ of the token mean of the distillation loss on it (Learning without
    Forgetting, Li & Hoiem 2017): the model is held to the outputs it gave as the run started, not
    to the labels. At temperature T (`distill_temperature`; LwF uses T = 2), per label position,

        L = T² · KL(q_T ‖ p_T),   q_T = softmax(z_θ₀ / T),   p_T = softmax(z_θ / T),

    z the logits: T > 1 softens both distributions so that the teacher's less likely tokens weigh
    more; T² (Hinton et al. 2015, "Distilling the Knowledge in a Neural Network", §2) keeps the
    gradient's size as T changes (it scales as 1/T²). T = 1 is the plain KL(p_θ₀ ‖ p_θ).
    q_T is kept as its top-k tokens per label position of every pool row, computed once in one
    pass before step 0 (8·k bytes per position, on every process and in checkpoints), so no second model stays
    in memory (`losses.regularization.topk_distillation_kl`).
  - `project`: A-GEM (`losses.regularization.agem_project`): where the step's gradient points
    against the gradient of that batch's LM loss, the conflicting component is removed (from the
    gradient: AdamW's update is not along it, so the retain loss can still rise).

Projection acts on the data gradient first; the LM and distillation gradients are added after it.
The extra forward and backward cost about one micro-batch of retain rows per step. With several
processes each takes its share of the batch and the gradients are summed across them.
"""

from __future__ import annotations

import random

import torch

from posttrain.data.records import IGNORE_INDEX, Example
from posttrain.errors import ConfigError


class RetainTerms:
    """lm_coef, distill and project on the retain pool (see the module docstring)."""

    def __init__(self, cfg, pool: list[Example], policy: torch.nn.Module, pad_id: int, batch_size: int, seed: int,
                 chunk_size: int = 256, step_batch_size: int | None = None):
        self.cfg = cfg  # ForgettingConfig
        self.pool, self.policy, self.pad_id = pool, policy, pad_id
        self.micro_batch_size = batch_size  # rows per forward (train.batch_size)
        # rows per step: retain_batch_size, else `step_batch_size` (the step's global batch), else batch_size
        self.batch_size = min(cfg.retain_batch_size or step_batch_size or batch_size, len(pool))
        self.seed, self.chunk_size = seed, chunk_size
        self.temperature = float(cfg.distill_temperature)  # validated > 0 with the config
        # per pool example: (teacher log-probs (n, k) float32, token ids (n, k) int64) at its label positions
        self.teacher: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def active(self) -> bool:
        return self.cfg.lm_coef > 0 or self.cfg.distill > 0 or self.cfg.project

    def batch_at(self, step: int) -> list[int]:
        """Pool indices of step `step`'s retain batch: consecutive slices of a seeded permutation,
        a new permutation each pass over the pool."""
        per_pass = max(1, len(self.pool) // self.batch_size)
        cycle, slot = divmod(step, per_pass)
        order = list(range(len(self.pool)))
        random.Random(self.seed * 1_000_003 + 7_907 + cycle).shuffle(order)
        return order[slot * self.batch_size : (slot + 1) * self.batch_size]

    # -- the teacher (distill)

    @torch.no_grad()
    def compute_teacher(self, accelerator) -> None:
        """q_T's top-k (p_θ₀ at temperature T) at every label position of every pool row, from the
        policy as it is now."""
        from posttrain.data.batching import collate

        was_training = self.policy.training
        self.policy.eval()
        teacher = []
        try:
            with accelerator.autocast():
                for start in range(0, len(self.pool), self.micro_batch_size):
                    examples = self.pool[start : start + self.micro_batch_size]
                    batch = {k: v.to(accelerator.device) for k, v in collate(examples, self.pad_id).items()}
                    logps, ids = _top_k(self.policy, batch, self.cfg.distill_top_k, self.chunk_size,
                                        self.temperature)
                    counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(1).tolist()
                    teacher += list(zip(logps.split(counts), ids.to(torch.int32).split(counts)))
        finally:
            self.policy.train(was_training)
        self.teacher = teacher

    def teacher_tensors(self) -> dict[str, torch.Tensor]:
        if self.teacher is None:
            return {}
        return {"teacher.logps": torch.cat([t[0] for t in self.teacher]).cpu(),
                "teacher.ids": torch.cat([t[1] for t in self.teacher]).cpu(),
                "teacher.counts": torch.tensor([len(t[0]) for t in self.teacher], dtype=torch.int64)}

    def load_teacher(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.cfg.distill <= 0:
            return
        if "teacher.logps" not in tensors:
            raise ConfigError("this checkpoint holds no distillation targets (it was written without "
                              "forgetting.distill); start afresh with train.resume=never")
        counts = tensors["teacher.counts"].tolist()
        if len(counts) != len(self.pool):
            raise ConfigError("the checkpoint's distillation targets do not match the retain pool")
        self.teacher = list(zip(tensors["teacher.logps"].split(counts), tensors["teacher.ids"].to(torch.int32).split(counts)))

    # -- every step

    def apply(self, params: list[torch.nn.Parameter], grad_scale: float, accelerator, step: int) -> dict[str, float]:
        """Project the step's gradients (A-GEM), then add γ·∇LM and λ·∇KL of the step's retain batch
        to `params`' gradients (those with a gradient this step: the others are not being trained)."""
        from posttrain.losses.regularization import agem_project

        live = [p for p in params if p.grad is not None]
        if not live:
            return {}
        indices = self.batch_at(step)
        mine = indices[accelerator.process_index :: accelerator.num_processes]
        total = sum(self.pool[i].num_label_tokens for i in indices)
        adds = self.cfg.lm_coef > 0 or self.cfg.distill > 0
        # γ·LM + λ·KL (what joins the data loss), and the LM loss alone (A-GEM's reference). Without
        # λ the first is γ × the second: one backward gives both (`added` is taken from it at the end).
        reference = [torch.zeros_like(p, dtype=torch.float32) for p in live] if self.cfg.project else None
        own = adds and (reference is None or self.cfg.distill > 0)  # `added` needs a backward of its own
        added = [torch.zeros_like(p, dtype=torch.float32) for p in live] if own else None
        sums = torch.zeros(2, dtype=torch.float64, device=accelerator.device)  # Σ NLL, Σ KL over my rows
        for start in range(0, len(mine), self.micro_batch_size):
            nll, kl = self._losses(mine[start : start + self.micro_batch_size], accelerator.device, accelerator)
            sums += torch.stack([nll.detach().double(), kl.detach().double()])
            if reference is not None:
                _accumulate(reference, nll / total, live, keep=own)
            if own:
                _accumulate(added, (self.cfg.lm_coef * nll + self.cfg.distill * kl) / total, live)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum")
            added = _summed(added, accelerator) if own else None
            reference = _summed(reference, accelerator) if reference is not None else None
        if adds and not own:
            added = [self.cfg.lm_coef * r for r in reference]
        figures = {"retain_lm_loss": float(sums[0]) / total}
        if self.cfg.distill > 0:
            figures["distill_kl"] = float(sums[1]) / total
        if reference is not None:  # against ∇ of the retain LM loss alone, before anything is added
            figures["agem_projected"] = float(agem_project([p.grad for p in live], reference) < 0)
        if adds:
            for p, g in zip(live, added):
                p.grad.add_(g.to(p.grad.dtype), alpha=grad_scale)
        return figures

    def _losses(self, rows: list[int], device, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ NLL, Σ T²·KL(q_T ‖ p_T)) over the label tokens of pool rows `rows`, with their graph."""
        from posttrain.data.batching import collate
        from posttrain.losses.regularization import topk_distillation_kl

        batch = {k: v.to(device) for k, v in collate([self.pool[i] for i in rows], self.pad_id).items()}
        distill = self.cfg.distill > 0
        extra = torch.cat([self.teacher[i][1] for i in rows]).to(device).long() if distill else None
        with accelerator.autocast():
            logps = _position_logps(self.policy, batch, extra, self.chunk_size, self.temperature)  # (N, 1 [+ k + 1])
        nll = -logps[:, 0].sum()
        if not distill:
            return nll, torch.zeros((), device=device)
        teacher = torch.cat([self.teacher[i][0] for i in rows]).to(device)
        return nll, self.temperature ** 2 * topk_distillation_kl(logps[:, 1:-1], teacher, logps[:, -1]).sum()


def _accumulate(totals: list[torch.Tensor], loss: torch.Tensor, params: list[torch.Tensor], keep: bool = False) -> None:
    """totals += ∂loss/∂params (float32; a parameter the loss does not reach adds nothing)."""
    if not loss.requires_grad:
        return
    for total, grad in zip(totals, torch.autograd.grad(loss, params, retain_graph=keep, allow_unused=True)):
        if grad is not None:
            total += grad.float()


def _summed(grads: list[torch.Tensor], accelerator) -> list[torch.Tensor]:
    """Each process's share summed across processes (one reduction for all tensors)."""
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), "sum")
    return [f.view_as(g) for f, g in zip(flat.split([g.numel() for g in grads]), grads)]


def _selected(model, batch: dict, chunk_size: int):
    """(hidden states at label positions (N, H), head weight, bias, targets (N,)), or, for a model
    whose logits are not a plain linear head, (log-probs (N, V), None, None, targets)."""
    from posttrain.data.batching import padded_inputs
    from posttrain.losses.language_modeling import shift_for_causal_lm
    from posttrain.models.loading import final_hidden_and_head, supports_hidden_path

    inputs = padded_inputs(batch["input_ids"], batch["attention_mask"])
    if supports_hidden_path(model):
        hidden, weight, bias = final_hidden_and_head(model, **inputs)
        selected, targets = shift_for_causal_lm(hidden, batch["labels"])
        return selected, weight, bias, targets
    logits = model(**inputs, use_cache=False).logits
    selected, targets = shift_for_causal_lm(logits, batch["labels"])
    return selected.float().log_softmax(-1), None, None, targets


def _position_logps(model, batch: dict, extra: torch.Tensor | None, chunk_size: int,
                    temperature: float = 1.0) -> torch.Tensor:
    """log p_θ of each label token: (N, 1); with `extra` (N, k) tokens at its position, also their
    log-probs at `temperature` (softmax(z / T)) and the log-mass of every other token there:
    (N, 1 + k + 1). The label's column is at T = 1 whatever `temperature`."""
    selected, weight, bias, targets = _selected(model, batch, chunk_size)
    if extra is not None and temperature != 1.0:  # the label at T = 1, the rest at T: two passes over the head
        label = _position_logps_of(selected, weight, bias, targets[:, None], None, chunk_size)
        soft = _position_logps_of(*_at_temperature(selected, weight, bias, temperature), extra, 0, chunk_size)
        return torch.cat([label, soft], dim=1)
    indices = targets[:, None] if extra is None else torch.cat([targets[:, None], extra], dim=1)
    return _position_logps_of(selected, weight, bias, indices, None if extra is None else 1, chunk_size)


def _position_logps_of(selected, weight, bias, indices: torch.Tensor, rest_from: int | None,
                       chunk_size: int) -> torch.Tensor:
    """`token_logps_at` of what `_selected` returned: the log-probs at `indices` (N, M), and with
    `rest_from` = j the log-mass outside indices[:, j:] as one more column."""
    from posttrain.losses.language_modeling import token_logps_at

    if weight is not None:
        return token_logps_at(selected, weight, indices, bias, chunk_size, rest_from)
    out = selected.gather(1, indices)  # `selected` holds full log-probs here
    if rest_from is None:
        return out
    rest = torch.logsumexp(selected.scatter(1, indices[:, rest_from:], float("-inf")), dim=-1, keepdim=True)
    return torch.cat([out, rest], dim=1)


def _at_temperature(selected, weight, bias, temperature: float):
    """What `_selected` returned, for softmax(z / T): z / T = (h / T)·W + b / T on the hidden path;
    log_softmax(log p / T) when `selected` holds log-probs (log p = z − const)."""
    if temperature == 1.0:
        return selected, weight, bias
    if weight is None:
        return (selected / temperature).log_softmax(-1), None, None
    return selected / temperature, weight, None if bias is None else bias / temperature


def _top_k(model, batch: dict, k: int, chunk_size: int, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens per label position and their log-probs under softmax(z / T)."""
    from posttrain.losses.language_modeling import top_k_logps

    selected, weight, bias = _at_temperature(*_selected(model, batch, chunk_size)[:3], temperature)
    if weight is None:
        top = selected.topk(min(k, selected.shape[-1]), dim=-1)
        return top.values, top.indices
    return top_k_logps(selected, weight, k, bias, chunk_size)
