"""Optimizer parameter groups and learning-rate schedules.

Differential learning rates by layer depth (layer-wise LR decay) and frozen-parameter
selection by name pattern live here; the loop only asks for groups and a factor.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
from typing import Callable

import torch
from torch.optim.adam import adam as adam_update
from torch.optim.optimizer import _default_to_fused_or_foreach

from posttrain.errors import ConfigError

# `model.layers.3.` (Llama, Qwen2, Mistral), `transformer.h.3.` (GPT-2); a bottleneck adapter's
# own name spells its layer's path with "__" (`bottlenecks.adapters.model__layers__3__mlp...`)
_LAYER_INDEX = re.compile(r"(?:\.|__)(?:layers|h|blocks)(?:\.|__)(\d+)(?:\.|__)")
_EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "embed_positions")


def freeze_by_pattern(model: torch.nn.Module, patterns: list[str]) -> int:
    """Set requires_grad=False on parameters whose name matches any glob pattern.

    A pattern that matches nothing is almost always a typo, so it is an error.
    Returns the number of parameters frozen.
    """
    frozen = 0
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        matched = [n for n in names if fnmatch.fnmatch(n, pattern)]
        if not matched:
            example = names[0] if names else "(no parameters)"
            raise ConfigError(f"train.freeze pattern {pattern!r} matches no parameter name (names look like {example!r})")
    for name, param in model.named_parameters():
        if any(fnmatch.fnmatch(name, p) for p in patterns) and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def layer_depth(name: str, num_layers: int) -> int:
    """0 for embeddings, i + 1 for transformer layer i, num_layers + 1 for the rest (final norm, head)."""
    match = _LAYER_INDEX.search(name)
    if match:
        return int(match.group(1)) + 1
    if any(part in name for part in _EMBEDDING_NAMES):
        return 0
    return num_layers + 1


def input_embedding_parameters(model: torch.nn.Module) -> set[int]:
    """ids of the input embedding's parameters (and of an adapter on it), found by the model's
    own `get_input_embeddings` wherever the transformers model sits in `model`: GPT-NeoX's
    `embed_in` or Bloom's `word_embeddings` are embeddings whatever `_EMBEDDING_NAMES` lists."""
    for module in model.modules():
        getter = getattr(module, "get_input_embeddings", None)
        if getter is None:
            continue
        try:
            embedding = getter()
        except (NotImplementedError, AttributeError):
            continue
        if isinstance(embedding, torch.nn.Module):
            return {id(p) for p in embedding.parameters()}
    return set()


def count_layers(model: torch.nn.Module) -> int:
    indices = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER_INDEX.search(name))}
    return max(indices) + 1 if indices else 0


def param_groups(model: torch.nn.Module, lr: float, weight_decay: float, layer_lr_decay: float,
                 lr_scale: Callable[[str], float] | None = None) -> list[dict]:
    """AdamW groups: no decay on biases and norms; lr * decay^(depth below the top) per layer,
    times `lr_scale(name)` when given (LoRA+ gives the B matrices a higher rate)."""
    num_layers = count_layers(model)
    embedding = input_embedding_parameters(model)
    groups: dict[tuple[int, bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        depth = 0 if id(param) in embedding else layer_depth(name, num_layers)
        scale = layer_lr_decay ** (num_layers + 1 - depth) * (lr_scale(name) if lr_scale else 1.0)
        decay = param.ndim >= 2 and "norm" not in name.lower()
        group = groups.setdefault(
            (depth, decay, scale),
            {"params": [], "names": [], "lr": lr * scale, "weight_decay": weight_decay if decay else 0.0},
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ConfigError("no trainable parameters: check train.freeze and the adapter settings")
    ordered = [groups[key] for key in sorted(groups)]
    for group in ordered:
        group["base_lr"] = group["lr"]
    return ordered


def untied_embeddings(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """Trainable nn.Embedding modules whose matrix no other module shares (a tied output head
    gives every row a gradient, so a tied matrix is not row-sparse)."""
    embedding = {id(m.weight): m for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    shared = {id(p) for m in model.modules() if not isinstance(m, torch.nn.Embedding)
              for p in m.parameters(recurse=False)}
    return [m for key, m in embedding.items() if key not in shared and m.weight.requires_grad and m.weight.dim() == 2]


def untied_embedding_weights(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [m.weight for m in untied_embeddings(model)]


@contextlib.contextmanager
def sparse_embedding_gradients(model: torch.nn.Module, enabled: bool = True):
    """Within the block, untied embeddings produce a sparse gradient: the rows of the batch's
    tokens, not a [vocab, width] matrix that is zero almost everywhere.

    At a 32k vocabulary the dense gradient is allocated, zero-filled, scanned, clipped and freed
    at every step, for the few hundred rows a batch touches. The sparse one goes straight to
    `AdamW`'s reached-rows update; `clip_grad_norm` reads it. Torch's own clipping, optimizers
    and DDP/FSDP reducers take dense gradients only, so the caller enables this for a single
    process without a GradScaler. The modules are switched back on exit.
    """
    switched = [m for m in untied_embeddings(model) if not m.sparse] if enabled else []
    for module in switched:
        module.sparse = True
    try:
        yield switched
    finally:
        for module in switched:
            module.sparse = False


def clip_grad_norm(parameters: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_ (2-norm over every gradient, scaled by min(1, max_norm / (norm + 1e-6))),
    also over sparse gradients, which torch's refuses: a coalesced sparse gradient's norm is its
    values' norm. Returns the norm before clipping."""
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()  # duplicate rows summed once, here, for the norm and the optimizer
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for grad in grads:
        by_device.setdefault(grad.device, []).append(grad)
    for device, same_device in by_device.items():
        torch._foreach_mul_(same_device, scale.to(device))
    return total


# Weights whose AdamW moments and update are kept in float32 (`AdamW._adam`)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


class AdamW(torch.optim.AdamW):
    """torch's AdamW, except that a bfloat16 or float16 weight's moments are float32, and an
    untied embedding matrix keeps moments only for the rows a gradient has reached, and is
    updated on those rows only.

    torch keeps a weight's moments in the weight's dtype. In bfloat16, v ← β2·v + (1 − β2)·g²
    with β2 = 0.999 cannot go down (0.999·v rounds back to v), so one large gradient shrinks
    that weight's steps for the rest of the run. Here a low-precision weight's moments are
    float32 and its update is computed in float32 from a float32 copy of the weight, then
    rounded once onto the weight (which stays in its dtype: there is no float32 master copy).
    Checkpoints hold these moments in float32, and `load_state_dict` keeps them so (torch's
    would cast them to the weight's dtype).

    A token absent from every batch so far has a zero gradient row and zero moments, and AdamW
    leaves such a row at p·(1 − lr·wd): the moment update is 0 and m̂/(√v̂ + ε) is 0. So the
    update below is AdamW's, row for row, while a 32k-token vocabulary of which a data set uses a
    few thousand tokens costs the optimizer a few thousand rows, in time and in memory: its state
    holds `reached` (the sorted row ids) and the moments of those rows (`exp_avg_reached`,
    `exp_avg_sq_reached`), not two [vocab, width] matrices of zeros. `state_dict()` writes torch's
    full moments (built on the CPU), so checkpoints stay interchangeable with torch's AdamW, and
    `load_state_dict` keeps the reached rows of what it loads. Once the reached rows are over half
    the matrix, the matrix goes back to torch's state and update of every row. The embedding's
    gradient may be dense or sparse (`sparse_embedding_gradients`); torch's step gets a sparse one
    made dense. The rows go through the kernel torch would use (single-tensor loop, foreach) and
    equal its update bit for bit; with the fused kernel (`adamw_fused`) they equal it to the last
    bit of rounding only, since that kernel rounds an element by where it sits in the tensor.
    """

    def __init__(self, params, row_sparse: list[torch.Tensor] = (), **kwargs) -> None:
        super().__init__(params, **kwargs)
        in_groups = {id(p) for group in self.param_groups for p in group["params"]}
        self._embeddings = [p for p in row_sparse if id(p) in in_groups]
        self._row_sparse = list(self._embeddings)  # those not yet handed back to torch's step
        # first of the post hooks, so that any other one sees torch's format
        self.register_state_dict_post_hook(AdamW._torch_format, prepend=True)

    def __getstate__(self) -> dict:  # torch's keeps defaults, state and param_groups only (deepcopy, pickle)
        return super().__getstate__() | {"_embeddings": self._embeddings, "_row_sparse": self._row_sparse}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.register_state_dict_post_hook(AdamW._torch_format, prepend=True)

    @staticmethod
    def _torch_format(optimizer: "AdamW", state_dict: dict) -> dict:
        """torch's state dict: the reached rows' moments written out as [vocab, width] matrices (on the CPU)."""
        index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
        for p in optimizer._embeddings:
            state = optimizer.state.get(p, {})
            if "reached" in state:
                full = optimizer._full_moments(p, torch.device("cpu"))
                state_dict["state"][index[id(p)]] = {"step": state["step"], **full}
        return state_dict

    def load_state_dict(self, state_dict) -> None:
        super().load_state_dict(state_dict)  # torch's full moments, on the parameters' devices
        self._float32_moments_from(state_dict)
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        # every plain matrix outside an amsgrad group starts again from its reached rows (a sharded,
        # DTensor, one stays torch's)
        self._row_sparse = [p for p in self._embeddings
                            if not group_of[id(p)]["amsgrad"] and type(p.detach()) is torch.Tensor]
        for p in list(self._row_sparse):
            if "exp_avg" in self.state.get(p, {}):
                self._keep_reached_rows(p)

    def step(self, closure=None):
        loss = None
        if closure is not None:  # evaluated first, as torch does; then its gradients are stepped on
            with torch.enable_grad():
                loss = closure()
        # (Groups looked up each step: load_state_dict replaces the group dicts.)
        group_of = {id(p): group for group in self.param_groups for p in group["params"]}
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            # A GradScaler drives the fused kernel (unscaling, skipping on inf — found_inf alone once
            # the gradients were unscaled for clipping): torch's AdamW, every row.
            held = []
        else:
            # A plain dense 2-D gradient or a sparse one (`sparse_embedding_gradients`); a sharded one
            # (FSDP, DTensor) takes torch's path, and so does a group with amsgrad (its running max of
            # v̂ has no reached-rows form here), set at construction or restored by load_state_dict.
            held = [(p, p.grad) for p in self._row_sparse if p.grad is not None and p.grad.shape == p.shape
                    and not group_of[id(p)]["amsgrad"]
                    and ((p.grad.is_sparse and p.grad.sparse_dim() == 1)
                         or (type(p.grad) is torch.Tensor and p.grad.layout == torch.strided))]
        held_ids = {id(p) for p, _ in held}
        self._densify([p for p in self._embeddings if id(p) not in held_ids])
        for p in self._embeddings:
            if p.grad is not None and id(p) not in held_ids:
                self._to_torch_state(p)  # stepped whole below
        # bfloat16 / float16 weights: float32 moments and update, by `_adam` (torch's would keep
        # the moments in the weight's dtype)
        low = [(p, p.grad) for group in self.param_groups for p in group["params"]
               if p.grad is not None and id(p) not in held_ids and p.dtype in _LOW_PRECISION]
        apart = held + low
        for p, _ in apart:
            p.grad = None  # torch's step skips a parameter without a gradient
        try:
            _torch_step(self)
        finally:
            for p, grad in apart:
                p.grad = grad
        if apart:
            with torch.no_grad():
                for p, grad in held:
                    self._row_step(p, grad, group_of[id(p)])
                by_group: dict[int, tuple[dict, list]] = {}
                for p, grad in low:  # one kernel call a group, as torch's foreach step makes
                    by_group.setdefault(id(group_of[id(p)]), (group_of[id(p)], []))[1].append((p, grad))
                for group, pairs in by_group.values():
                    self._whole_matrix_steps(pairs, group)
        return loss

    def _float32_moments_from(self, state_dict: dict) -> None:
        """After torch's load_state_dict, which casts every moment to its weight's dtype: a
        bfloat16 / float16 weight's moments again as the checkpoint holds them, in float32."""
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in zip(saved_ids, params):
            saved = state_dict["state"].get(index)
            if p.dtype not in _LOW_PRECISION or saved is None:
                continue
            for key, value in saved.items():
                if key != "step" and torch.is_tensor(value) and value.is_floating_point():
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32)

    @staticmethod
    def _new_state(p: torch.Tensor, group: dict) -> dict:
        """torch's step counter (its dtype and device as torch's AdamW makes it)."""
        scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        return {"step": (torch.zeros((), dtype=torch.float32, device=p.device) if group["fused"] or group["capturable"]
                         else torch.tensor(0.0, dtype=scalar))}

    @staticmethod
    def _densify(params: list[torch.Tensor]) -> None:
        """torch's AdamW refuses sparse gradients: give it the dense matrix."""
        for p in params:
            if p.grad is not None and p.grad.is_sparse:
                p.grad = p.grad.to_dense()

    @staticmethod
    def _gradient_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The gradient's `rows` (sorted); a coalesced sparse gradient's rows are placed among them."""
        if not grad.is_sparse:
            return grad.index_select(0, rows)
        gathered = grad._values().new_zeros((rows.numel(), grad.shape[1]))
        return gathered.index_copy_(0, torch.searchsorted(rows, grad._indices()[0]), grad._values())

    def _full_moments(self, p: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        """torch's [vocab, width] moments of a reached-rows state: zero on the rows never reached."""
        state = self.state[p]
        rows = state["reached"].to(device)
        full = {}
        for key in ("exp_avg", "exp_avg_sq"):
            part = state[f"{key}_reached"]
            full[key] = torch.zeros(p.shape, dtype=part.dtype, device=device).index_copy_(0, rows, part.to(device))
        return full

    def _to_torch_state(self, p: torch.Tensor) -> None:
        """Give a reached-rows state back torch's form, for a step or a load of torch's."""
        state = self.state.get(p, {})
        if "reached" in state:
            full = self._full_moments(p, p.device)
            for key in ("reached", "exp_avg_reached", "exp_avg_sq_reached"):
                del state[key]
            state.update(full)

    def _keep_reached_rows(self, p: torch.Tensor) -> bool:
        """torch's full moments → the reached rows' (rows with a nonzero moment; any other row's
        moments are zero); False, and torch's state and step from now on, when over half are reached."""
        state = self.state[p]
        moments = state["exp_avg"], state["exp_avg_sq"]
        rows = (moments[0].any(dim=1) | moments[1].any(dim=1)).nonzero().squeeze(1)
        if rows.numel() * 2 > p.shape[0]:
            self._hand_back(p)
            return False
        state["reached"] = rows
        state["exp_avg_reached"], state["exp_avg_sq_reached"] = (m.index_select(0, rows) for m in moments)
        del state["exp_avg"], state["exp_avg_sq"]
        return True

    def _row_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:  # torch's step counter; moments for no row yet
            state.update(self._new_state(p, group))
            state["reached"] = torch.zeros(0, dtype=torch.long, device=p.device)
            state["exp_avg_reached"] = p.new_zeros((0, *p.shape[1:]), dtype=_moment_dtype(p))
            state["exp_avg_sq_reached"] = p.new_zeros((0, *p.shape[1:]), dtype=_moment_dtype(p))
        elif "exp_avg" in state and not self._keep_reached_rows(p):  # full moments from torch's step
            self._whole_matrix_step(p, grad, group)
            return
        if grad.is_sparse:
            grad = grad.coalesce()  # a no-op after clip_grad_norm
            new = grad._indices()[0]
        else:
            new = grad.any(dim=1).nonzero().squeeze(1)  # one pass over the gradient; no [rows, width] temporary
        rows = state["reached"]
        merged = torch.unique(torch.cat([rows, new]))
        if merged.numel() > rows.numel():  # new rows reached: their moments start at zero
            at = torch.searchsorted(merged, rows)
            for key in ("exp_avg_reached", "exp_avg_sq_reached"):
                grown = state[key].new_zeros((merged.numel(), *p.shape[1:]))
                state[key] = grown.index_copy_(0, at, state[key])
            state["reached"] = rows = merged
        if rows.numel() * 2 > p.shape[0]:  # over half the matrix: torch's state and step from now on
            self._hand_back(p)
            self._whole_matrix_step(p, grad, group)
            return
        part = p.index_select(0, rows)
        self._adam([part], [self._gradient_rows(grad, rows)], [state["exp_avg_reached"]],
                   [state["exp_avg_sq_reached"]], [state], group)
        p.index_copy_(0, rows, part)
        if group["weight_decay"] != 0:  # the rows never reached: p·(1 − lr·wd), as AdamW does
            idle = torch.ones(p.shape[0], dtype=torch.bool, device=p.device)
            idle[rows] = False
            idle = idle.nonzero().squeeze(1)
            decayed, factor = p.index_select(0, idle), 1 - group["lr"] * group["weight_decay"]
            # rounded as torch's foreach kernel rounds it (which rounds the factor to a bfloat16 /
            # float16 weight's dtype; mul_ rounds only the product, as the float32 update above does)
            if _foreach(group, p) and p.dtype not in _LOW_PRECISION:
                torch._foreach_mul_([decayed], factor)
            else:
                decayed.mul_(factor)
            p.index_copy_(0, idle, decayed)

    def _whole_matrix_step(self, p: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        self._whole_matrix_steps([(p, grad)], group)

    def _whole_matrix_steps(self, pairs: list[tuple[torch.Tensor, torch.Tensor]], group: dict) -> None:
        """AdamW on every element of each (weight, gradient) of one group, in torch's state, in one
        kernel call (a matrix handed back; the group's low-precision weights)."""
        states = []
        for p, _ in pairs:
            state = self.state[p]
            if not state:
                state.update(self._new_state(p, group))
                for key in ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if group["amsgrad"] else ()):
                    state[key] = torch.zeros_like(p, dtype=_moment_dtype(p), memory_format=torch.preserve_format)
            states.append(state)
        self._adam([p for p, _ in pairs], [g.to_dense() if g.is_sparse else g for _, g in pairs],
                   [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states], states, group)

    def _hand_back(self, p: torch.Tensor) -> None:
        """torch's full state and step for `p` from now on (until a load starts it again)."""
        self._to_torch_state(p)
        self._row_sparse = [q for q in self._row_sparse if q is not p]

    def _adam(self, params, grads, exp_avgs, exp_avg_sqs, states, group) -> None:
        """torch's Adam update with decoupled weight decay, in place, by the kernel torch's AdamW
        would pick for the parameter: fused if asked, else foreach if asked or by torch's default
        (on CUDA), else the single-tensor loop. A bfloat16 / float16 weight is updated through a
        float32 copy (its moments are float32), rounded once back onto it; a GradScaler's scale and
        inf flag, when set, go to the (fused) kernel as torch's step passes them."""
        low = params[0].dtype in _LOW_PRECISION  # (a call's weights are all low-precision or none)
        targets = [p.float() for p in params] if low else params
        amsgrad = all("max_exp_avg_sq" in state for state in states)  # low-precision weights of an amsgrad group
        adam_update(
            targets, [g.float() for g in grads] if low else grads, exp_avgs, exp_avg_sqs,
            [state["max_exp_avg_sq"] for state in states] if amsgrad else [], [state["step"] for state in states],
            amsgrad=amsgrad, has_complex=False, beta1=group["betas"][0], beta2=group["betas"][1], lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
            foreach=_foreach(group, params[0]), capturable=group["capturable"], differentiable=False,
            fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
            found_inf=getattr(self, "found_inf", None), decoupled_weight_decay=True)
        if low:
            for p, updated in zip(params, targets):
                p.copy_(updated)


def _moment_dtype(p: torch.Tensor) -> torch.dtype:
    """float32 for a bfloat16 / float16 weight (see `AdamW`), else the weight's own dtype, as torch's."""
    return torch.float32 if p.dtype in _LOW_PRECISION else p.dtype


def _foreach(group: dict, p: torch.Tensor) -> bool:
    """Whether torch's AdamW steps `p` with its foreach kernel: as the group says, or by torch's
    default (CUDA tensors), and never next to the fused kernel."""
    if group["fused"]:
        return False
    if group["foreach"] is not None:
        return bool(group["foreach"])
    return _default_to_fused_or_foreach([p], differentiable=False, use_fused=False)[1]


def _torch_step(optimizer: AdamW) -> None:
    """torch's AdamW.step without its hook wrapper: once torch has built any AdamW it wraps the
    class's step to run the optimizer's step hooks, which our own (wrapped) step already ran."""
    step = torch.optim.AdamW.step
    if getattr(step, "hooked", False):  # torch's hook wrapper; beneath it, the no-grad step itself
        step = step.__wrapped__
    step(optimizer)


def make_optimizer(model: torch.nn.Module, cfg, lr_scale: Callable[[str], float] | None = None) -> torch.optim.Optimizer:
    """AdamW over `param_groups`; cfg.optimizer picks torch's (its fused kernel, or its per-tensor
    loop), with untied embeddings updated on their reached rows only (`AdamW` above), or
    bitsandbytes' (paged) 8-bit one."""
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.layer_lr_decay, lr_scale)
    for group in groups:
        del group["names"]  # optimizer state dicts must stay plain
    kwargs = {"lr": cfg.lr, "betas": tuple(cfg.adam_betas), "eps": cfg.adam_eps}
    optimizer = getattr(cfg, "optimizer", "adamw")
    if optimizer in ("adamw", "adamw_fused"):
        # The fused kernel updates every tensor of a group in one pass: the same AdamW, 3-5x faster
        # a step on CPU (benchmarks/results/rl_cpu32k.md), rounded differently in the last bits.
        return AdamW(groups, row_sparse=untied_embedding_weights(model), fused=optimizer == "adamw_fused" or None,
                     **kwargs)
    from posttrain.models.adapters.spec import require_cuda_bitsandbytes

    require_cuda_bitsandbytes(f"train.optimizer={optimizer}")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if optimizer == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(groups, **kwargs)


def lr_factor(step: int, total_steps: int, schedule: str, warmup_steps: int, min_lr_ratio: float) -> float:
    """Multiplier on the peak LR for optimizer step `step` (0-based): linear warmup, then decay.

    constant: 1; linear: 1 → min_lr_ratio; cosine: min + (1 - min) · ½(1 + cos(π · progress)).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        shape = 1.0 - progress
    else:
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * shape


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Every group at its own base rate (layer-wise decay included) times the schedule factor."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
