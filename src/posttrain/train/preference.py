"""Direct preference optimisation — DPO and its relatives: batch of response groups → loss.

Per micro-batch, every response of every prompt (chosen and rejected alike) goes through
the policy in ONE forward; `losses.language_modeling.sequence_logps` turns the final
hidden states into per-sequence log π(y|x) chunk by chunk, so [batch, seq, vocab] logits
are never held. The loss itself is a pure function in `losses.preference`, picked by
`dpo.loss` from `PAIR_LOSSES` (or KTO).

Reference model π_ref (dpo, cdpo, ipo, hinge, kto; simpo and orpo need none):
  precompute  one pass of the starting model before training over the micro-batches the run
              reads (its train.max_steps of the first epoch, and the held-out set), in those
              batches, cached in the run directory as reference_logps.safetensors (reused on
              resume while data and model match; a longer run adds only what it lacks);
              during training no reference forward runs at all.
  live        every step, without gradients: the same weights with adapters disabled
              (no second copy) or, for full / freeze tuning, a frozen copy. Not with prompt
              or prefix tuning, whose starting policy holds its randomly drawn virtual tokens.
              The held-out batches, whose reference never changes, are precomputed (in memory).
Either way π_ref is the starting model, so at step 0 every implicit reward is 0: the evaluation
before training reads the policy's held-out log-probs from the reference's, with no forward
(`PreferenceLoss.policy_is_reference`).

K-way rankings train on every ordered pair of a prompt, each weighted 1/#pairs, so a
prompt counts once; the NLL term (RPO's `dpo.nll_weight`, ORPO's L_SFT) is the best response's
alone (`pair_extras`, `chosen_nll`): SFT on the preferred answer, as for a pair, never on one
that merely beats a worse one. KTO takes unpaired rows, or pairs/rankings split into a desirable
best response and an undesirable worst one (a ranking's middle is left out, counted; `kto_items`);
its KL estimate z₀ is the mean of log π/π_ref over the mismatched (prompt, other prompt's completion) sequences — built once — of the whole
optimizer step (every micro-batch and process; `PreferenceLoss.estimate_kl`), or of the
held-out set when evaluating.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from posttrain.config import DPOConfig, DPOLossConfig, validate_dpo
from posttrain.errors import DataError
from posttrain.models.attention import block_masks_allowed, masked_attention_kernels, padding_free, window_allows
from posttrain.train.grouped import (
    GroupedStage,
    Item,
    collate_items,
    collate_shared_prompt,
    first_label,
    items_from_examples,
    on_device,
    shares_prompt,
)
from posttrain.train.loop import to_device

REFERENCE_FREE = ("simpo", "orpo")


# --------------------------------------------------------------------------- log-probs


def policy_logps(model, input_ids, labels, attention_mask=None, chunk_size: int = 256):
    """Per-sequence (summed log-probs (R,), response token counts (R,)) under `model`; padded
    rows go to a model that takes padding-free batches as one row of their real tokens."""
    from posttrain.data.batching import padded_inputs
    from posttrain.losses.language_modeling import sequence_logps
    from posttrain.models.attention import pack_for, unpack_hidden
    from posttrain.models.loading import final_hidden_and_head, supports_hidden_path
    from posttrain.models.readout import reading

    labels = _predicted(labels, attention_mask)
    packed = pack_for(model, input_ids, attention_mask) if supports_hidden_path(model) else None
    if packed is not None:  # the hidden states that predict a label, back in the (B, T) grid
        rows, width = input_ids.shape
        predicts = (labels[:, 1:] != -100) & attention_mask[:, :-1].bool()
        row, col = predicts.nonzero(as_tuple=True)
        at = torch.searchsorted(packed["packed_slots"], row * width + col)
        inputs, pick = reading(model, packed, at)
        with masked_attention_kernels(input_ids.device):
            hidden, weight, bias = final_hidden_and_head(model, **inputs)
        hidden = unpack_hidden(pick(hidden)[None], packed["packed_slots"][at], input_ids.shape)
        return sequence_logps(hidden, weight, labels, bias, chunk_size)
    inputs = padded_inputs(input_ids, attention_mask)
    if supports_hidden_path(model):
        hidden, weight, bias = final_hidden_and_head(model, **inputs)
        return sequence_logps(hidden, weight, labels, bias, chunk_size)
    logits = model(**inputs, use_cache=False).logits.float()  # heads with logit scaling: the plain path
    mask = labels[:, 1:] != -100
    token_logps = logits[:, :-1].log_softmax(-1).gather(2, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    return (token_logps * mask).sum(1), mask.sum(1)


def selected_token_logps(model, inputs: dict, predictor, targets, chunk_size: int = 256, temperature: float = 1.0):
    """log π(targets) (N,) predicted from the hidden states at flat positions `predictor` (N,)
    of the (B·T) batch `inputs`; chunked, never the whole [B, T, V] log-softmax. With a
    `temperature`, of softmax(logits / temperature): the distribution sampling drew from."""
    from posttrain.losses.language_modeling import tempered, token_logps
    from posttrain.models.loading import final_hidden_and_head, supports_hidden_path
    from posttrain.models.readout import reading

    with masked_attention_kernels(inputs["input_ids"].device):
        if supports_hidden_path(model):
            inputs, pick = reading(model, inputs, predictor)
            hidden, weight, bias = final_hidden_and_head(model, **inputs)
            hidden, bias = tempered(pick(hidden), bias, temperature)
            return token_logps(hidden, weight, targets, bias, chunk_size)
        logits = model(**inputs, use_cache=False).logits.float().flatten(0, 1)[predictor] / temperature
        return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def shared_prompt_logps(model, input_ids, attention_mask, position_ids, predictor, targets, sequence, num_sequences,
                        chunk_size: int = 256, packed_slots=None, packed_blocks=None):
    """Per-sequence (log-probs, token counts) from `grouped.collate_shared_prompt` rows
    (padding-free ones carry `packed_slots` and `packed_blocks`)."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if packed_slots is not None:
        inputs |= {"packed_slots": packed_slots, "packed_blocks": packed_blocks}
    n = int(num_sequences)
    per_token = selected_token_logps(model, inputs, predictor, targets, chunk_size)
    return per_token.new_zeros(n).index_add(0, sequence, per_token), _sequence_counts(sequence, n)


def _predicted(labels, attention_mask):
    """`labels` less those right after padding (left-padded rows without a prompt): no position predicts them."""
    if attention_mask is None:
        return labels
    after_padding = torch.zeros_like(attention_mask, dtype=torch.bool)
    after_padding[:, 1:] = ~attention_mask[:, :-1].bool()
    return labels.masked_fill(after_padding, -100)


def _sequence_counts(sequence, n: int):
    """Tokens per sequence of a shared-prompt batch, from each target's sequence index."""
    return torch.zeros(n, dtype=torch.long, device=sequence.device).index_add(0, sequence, torch.ones_like(sequence))


def batch_logps(model, batch: dict, chunk_size: int = 256):
    """Per-sequence (log-probs, token counts) for either batch layout."""
    if "predictor" in batch:
        keys = ("input_ids", "attention_mask", "position_ids", "predictor", "targets", "sequence", "num_sequences")
        return shared_prompt_logps(model, *(batch[k] for k in keys), chunk_size=chunk_size,
                                   packed_slots=batch.get("packed_slots"), packed_blocks=batch.get("packed_blocks"))
    return policy_logps(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk_size)


def token_counts(batch: dict):
    """Per-sequence response token counts of either batch layout, as `batch_logps` counts them,
    read from the labels alone (no forward)."""
    if "predictor" in batch:
        return _sequence_counts(batch["sequence"], int(batch["num_sequences"]))
    return (_predicted(batch["labels"], batch["attention_mask"])[:, 1:] != -100).sum(1)


class StartingVirtualTokens:
    """What RL keeps of a policy with prompt or prefix tuning to run its reference, the starting
    policy: the virtual-token encoder's starting weights (a random draw, not the base; n tokens
    × the hidden size, or × the layers' keys and values for a prefix: small). The reference is
    `model` with its other adapters off (they start as the identity) and these swapped in, so
    no second copy of the model is kept."""

    def __init__(self, model):
        self.weights = {k: v.detach().clone() for k, v in model.virtual_encoder.state_dict().items()}

    @contextlib.contextmanager
    def as_reference(self, model):
        """`model` (the policy these weights were taken from) as its starting policy, within."""
        encoder = model.virtual_encoder
        trained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        with model.adapters_disabled(keep_virtual_tokens=True):
            encoder.load_state_dict(self.weights)  # copies in place, without gradient
            try:
                yield model
            finally:
                encoder.load_state_dict(trained)


@contextlib.contextmanager
def reference_weights(model, frozen_copy=None, starting: bool = False):
    """The reference policy, in eval mode without gradients: `frozen_copy` if given (a frozen
    copy of the model, or a `StartingVirtualTokens` of it); `model` as it is when it is still the
    `starting` model (the precomputed pass, before any step: adapters included, which is the
    starting policy exactly — a soft prompt or prefix starts at a random draw, not at the base);
    else `model` with its adapters off (LoRA, DoRA, IA3 and bottleneck adapters start as the
    identity, so that is the starting model)."""
    if isinstance(frozen_copy, StartingVirtualTokens):
        target, context = model, frozen_copy.as_reference(model)
    else:
        target = frozen_copy if frozen_copy is not None else model
        disable = None if starting else getattr(model, "adapters_disabled", None)
        context = disable() if frozen_copy is None and disable is not None else contextlib.nullcontext()
    was_training = target.training
    target.eval()
    try:
        with context, torch.no_grad():
            yield target
    finally:
        target.train(was_training)


# --------------------------------------------------------------------------- the losses


@dataclasses.dataclass
class PairLogps:
    """A batch's pairs, each side's log-probs as the losses read them: summed over the response's
    tokens (policy, reference) and averaged per token (`avg_*`: SimPO, ORPO, IPO)."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    avg_chosen: torch.Tensor
    avg_rejected: torch.Tensor
    ref_avg_chosen: torch.Tensor
    ref_avg_rejected: torch.Tensor

    @classmethod
    def of(cls, logps, counts, ref, chosen, rejected) -> "PairLogps":
        """From per-sequence log-probs and token counts (`ref` None: a reference-free loss, zeros)."""
        tokens = counts.clamp(min=1)
        ref = torch.zeros_like(logps) if ref is None else ref
        avg, ref_avg = logps / tokens, ref / tokens
        return cls(logps[chosen], logps[rejected], ref[chosen], ref[rejected], avg[chosen], avg[rejected],
                   ref_avg[chosen], ref_avg[rejected])

    def sums(self) -> tuple[torch.Tensor, ...]:
        return self.chosen, self.rejected, self.ref_chosen, self.ref_rejected


def chosen_nll(chosen_avg_logps, pair_weight=None, nll_pair_weight=None):
    """Each pair's term of the NLL its prompt trains (RPO's `dpo.nll_weight`, ORPO's L_SFT), on
    the pair's `pair_weight`: −avg log π(chosen) · nll_pair_weight / pair_weight, so that the
    stage's Σ pair_weight · term = Σ nll_pair_weight · (−avg log π(chosen)), the mean token NLL of
    the prompt's best response(s) (`pair_extras`). A pair (K = 2) has both weights 1: its chosen
    NLL, bit for bit. Without `nll_pair_weight`, every pair's own chosen NLL."""
    nll = -chosen_avg_logps
    if nll_pair_weight is None:
        return nll
    share = (nll_pair_weight / pair_weight).to(nll.dtype)
    return torch.where(share > 0, nll * share, torch.zeros_like(nll))  # 0, not 0 · inf, for a share of 0


def _dpo(c: DPOLossConfig, p: PairLogps, nll=None):
    from posttrain.losses.preference import dpo_loss

    return *dpo_loss(*p.sums(), c.beta), {}


def _cdpo(c, p, nll=None):
    from posttrain.losses.preference import dpo_loss

    return *dpo_loss(*p.sums(), c.beta, label_smoothing=c.label_smoothing), {}  # unset: resolved by the config


def _ipo(c, p, nll=None):
    from posttrain.losses.preference import ipo_loss

    return *ipo_loss(p.avg_chosen, p.avg_rejected, p.ref_avg_chosen, p.ref_avg_rejected, c.beta), {}


def _hinge(c, p, nll=None):
    from posttrain.losses.preference import hinge_loss

    return *hinge_loss(*p.sums(), c.beta), {}


def _simpo(c, p, nll=None):
    from posttrain.losses.preference import simpo_loss

    return *simpo_loss(p.avg_chosen, p.avg_rejected, c.beta, c.simpo_gamma), {}


def _orpo(c, p, nll=None):
    from posttrain.losses.preference import orpo_loss

    ac, ar = p.avg_chosen, p.avg_rejected
    nll = -ac if nll is None else nll
    losses, ratio = orpo_loss(ac, ar, nll, c.orpo_lambda)
    rewards_c, rewards_r = (c.beta * ac).detach(), (c.beta * ar).detach()
    return losses, rewards_c, rewards_r, {"log_odds_ratio": ratio, "nll": nll.detach()}


# name → f(config, the pairs' log-probs (`PairLogps`), each pair's share of its prompt's chosen
#          NLL (`chosen_nll`; None: the chosen side's own))
#        → (per-pair losses, chosen rewards, rejected rewards, extra per-pair metrics)
PAIR_LOSSES = {"dpo": _dpo, "cdpo": _cdpo, "ipo": _ipo, "hinge": _hinge, "simpo": _simpo, "orpo": _orpo}


class PreferenceLoss(torch.nn.Module):
    """forward(batch) → (Σ weighted losses, Σ weighted metrics) for any `dpo.loss`."""

    def __init__(self, model: torch.nn.Module, cfg: DPOLossConfig, chunk_size: int = 256, live_reference: bool = False):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.chunk_size = chunk_size
        self.live_reference = live_reference and cfg.loss not in REFERENCE_FREE
        # Full / freeze tuning has no adapters to switch off: keep a frozen copy, out of the
        # module tree so neither the optimizer nor DDP sees it.
        needs_copy = self.live_reference and not hasattr(model, "adapters_disabled")
        self._frozen = [copy.deepcopy(model).requires_grad_(False)] if needs_copy else []
        self.z0: torch.Tensor | None = None  # KTO: the KL estimate of the step being taken (estimate_kl)
        self._policy_is_reference = False  # policy_is_reference

    @contextlib.contextmanager
    def policy_is_reference(self):
        """Within: the policy is its reference exactly — the very model its reference log-probs were
        precomputed from, in these batches, before any step (`run_dpo`'s evaluation before
        training) — so a batch that carries them is read without a policy forward: log π =
        log π_ref, token counts from the labels (`token_counts`), KTO's mismatched log-ratios 0.
        The figures are the forwards' own (every implicit reward 0); a batch without them (a
        reference-free loss) still runs its forward."""
        self._policy_is_reference = True
        try:
            yield
        finally:
            self._policy_is_reference = False

    def _policy(self, batch: dict, index: torch.Tensor | None = None):
        """(log π, token counts) per sequence of `batch`; with `index` (a plain KTO batch's rows)
        log π of those rows alone, from a pass over them alone. See `policy_is_reference`."""
        known = self._policy_is_reference and batch.get("reference_logps") is not None
        if index is not None:
            return (batch["reference_logps"][index] if known
                    else policy_logps(self.model, *_rows(batch, index), self.chunk_size)[0])
        if known:
            return batch["reference_logps"], token_counts(batch)
        return batch_logps(self.model, batch, self.chunk_size)

    def _reference(self, batch: dict):
        """log π_ref per sequence: precomputed where the batch carries it (every batch of a
        precomputed reference; the held-out ones of a live reference), else a live pass."""
        if self.cfg.loss in REFERENCE_FREE:
            return None
        if batch.get("reference_logps") is not None:
            return batch["reference_logps"]
        if not self.live_reference:
            raise RuntimeError("reference log-probs were not precomputed for this batch")
        frozen = self._frozen[0].to(batch["input_ids"].device) if self._frozen else None
        with reference_weights(self.model, frozen) as reference:
            return batch_logps(reference, batch, self.chunk_size)[0]

    def forward(self, chosen_row=None, rejected_row=None, pair_weight=None, nll_pair_weight=None, completion_row=None,
                kl_row=None, desirable=None, **batch):
        if self.cfg.loss == "kto":
            return self._kto(batch, completion_row, kl_row, desirable)
        logps, counts = self._policy(batch)
        ref = self._reference(batch)
        pairs = PairLogps.of(logps, counts, ref, chosen_row, rejected_row)
        nll = chosen_nll(pairs.avg_chosen, pair_weight, nll_pair_weight)
        losses, rewards_c, rewards_r, extra = PAIR_LOSSES[self.cfg.loss](self.cfg, pairs, nll)
        if self.cfg.nll_weight and self.cfg.loss != "orpo":  # RPO: keep the best answers likely
            losses = losses + self.cfg.nll_weight * nll
            extra = extra | {"nll": nll.detach()}
        margins = rewards_c - rewards_r
        per_pair = {"rewards/chosen": rewards_c, "rewards/rejected": rewards_r, "rewards/margins": margins,
                    "rewards/accuracy": (margins > 0).float() + 0.5 * (margins == 0).float(),
                    "logps/chosen": pairs.chosen.detach(), "logps/rejected": pairs.rejected.detach()} | extra
        return (losses * pair_weight).sum(), {k: (v * pair_weight).sum() for k, v in per_pair.items()}

    def _row_reference(self, batch: dict, index: torch.Tensor) -> torch.Tensor:
        """log π_ref of the rows `index` of a plain (KTO) batch: looked up, or a live pass over them alone."""
        if not self.live_reference or batch.get("reference_logps") is not None:
            return self._reference(batch)[index]
        frozen = self._frozen[0].to(batch["input_ids"].device) if self._frozen else None
        with reference_weights(self.model, frozen) as reference:
            return policy_logps(reference, *_rows(batch, index), self.chunk_size)[0]

    def _kl_ratios(self, batch: dict, kl_row) -> torch.Tensor:
        """log π − log π_ref of a KTO batch's mismatched rows, without gradient."""
        with torch.no_grad():  # z0 carries no gradient: no activations kept for the mismatched rows
            return self._policy(batch, kl_row) - self._row_reference(batch, kl_row)

    def prepare_forwards(self, batches: list[dict], accelerator, count: bool = True):
        """The context of a step's (or the held-out set's) forwards (`train.loop`): KTO's z₀."""
        return self.estimate_kl(batches, accelerator, count) if self.cfg.loss == "kto" else contextlib.nullcontext()

    @contextlib.contextmanager
    def estimate_kl(self, batches: list[dict], accelerator, count: bool = True):
        """Within: KTO's z₀ over all `batches` — this process's share of an optimizer step, or of
        the held-out set — and over every process, for each of their forwards. Estimated per
        micro-batch instead, z₀ would change with how a step is split (batch 8 vs 1 × 8
        accumulated; one mismatched row at batch size 1). `count=False`: this process only joins
        the reduction (it holds no batch of its own)."""
        totals = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
        with accelerator.autocast():  # in training's precision
            for batch in batches if count else []:
                batch = to_device(batch, accelerator.device)
                ratios = self._kl_ratios(batch, batch["kl_row"]).double()
                totals += torch.stack([ratios.sum(), torch.full_like(ratios[0], len(ratios))])
        totals = accelerator.reduce(totals, "sum")
        self.z0 = (totals[0] / totals[1].clamp(min=1)).float()
        try:
            yield
        finally:
            self.z0 = None

    def _kto(self, batch: dict, completion_row, kl_row, desirable):
        from posttrain.losses.preference import kto_loss

        logps = self._policy(batch, completion_row)
        ref = self._row_reference(batch, completion_row)
        # the step's z₀ (estimate_kl), else this batch's own
        kl = self._kl_ratios(batch, kl_row).mean() if self.z0 is None else self.z0.to(logps.device)
        c = self.cfg
        losses, rewards = kto_loss(logps, ref, desirable, kl, c.beta, c.kto_desirable_weight, c.kto_undesirable_weight)
        signed = torch.where(desirable, rewards, -rewards)
        metrics = {"kl": kl.detach().clamp(min=0) * len(logps), "rewards/signed": signed.sum(),
                   "logps": logps.detach().sum()}
        for side, members in (("chosen", desirable), ("rejected", ~desirable)):  # sums and counts: finish_metrics
            metrics |= {f"rewards/{side}": torch.where(members, rewards, 0).sum(),
                        f"logps/{side}": torch.where(members, logps.detach(), 0).sum(),
                        f"{_CLASS_COUNT}{side}": members.sum().float()}
        return losses.sum(), metrics

    @staticmethod
    def finish_metrics(metrics: dict[str, float]) -> dict[str, float]:
        """KTO's per-class figures, as TRL logs them: rewards/chosen (rejected) the mean implied
        reward β·(log π − log π_ref) of the desirable (undesirable) items, logps/chosen (rejected)
        their mean log π — over the whole step (or held-out set): each a sum over the class ÷ the
        loop's step weight, over the class's count ÷ the same weight, never a mean of micro-batch
        means. A class the step lacks logs nothing (not NaN, not 0). Other figures pass through."""
        out = dict(metrics)
        for side in ("chosen", "rejected"):
            count = out.pop(f"{_CLASS_COUNT}{side}", None)
            if count is None:  # a pair loss: its own rewards/chosen, per pair already
                continue
            for name in (f"rewards/{side}", f"logps/{side}"):
                total = out.pop(name)
                if count > 0:
                    out[name] = total / count
        return out


_CLASS_COUNT = "_items/"  # KTO's per-class item counts, read by finish_metrics, never logged


def _rows(batch: dict, index: torch.Tensor) -> list[torch.Tensor]:
    return [batch[k][index] for k in ("input_ids", "labels", "attention_mask")]


# --------------------------------------------------------------------------- batches


def pair_extras(items: list[Item]) -> dict[str, torch.Tensor]:
    """Row indices of every ordered (chosen, rejected) pair in the batch, each weighted 1/#pairs of its
    prompt (`pair_weight`), and the weight of its chosen side's NLL (`nll_pair_weight`, for RPO's
    `dpo.nll_weight` and ORPO's L_SFT): 1/#pairs whose chosen is of the prompt's best rank for those,
    0 for the others — the NLL term is SFT on the preferred response, never on the 2nd of a ranking
    because it beats the 3rd (`chosen_nll`). A pair's (K = 2) weights are both 1."""
    chosen, rejected, weights, nll_weights, offset = [], [], [], [], 0
    for item in items:
        pairs = item.ordered_pairs()
        top = [item.ranks[better] == min(item.ranks) for better, _ in pairs]  # the chosen is of the best rank
        for (better, worse), best in zip(pairs, top):
            chosen.append(offset + better)
            rejected.append(offset + worse)
            weights.append(1.0 / len(pairs))
            nll_weights.append(1.0 / sum(top) if best else 0.0)
        offset += len(item.sequences)
    return {"chosen_row": torch.tensor(chosen, dtype=torch.long), "rejected_row": torch.tensor(rejected, dtype=torch.long),
            "pair_weight": torch.tensor(weights, dtype=torch.float32),
            "nll_pair_weight": torch.tensor(nll_weights, dtype=torch.float32)}


def kto_extras(items: list[Item]) -> dict[str, torch.Tensor]:
    """Each KTO item is [completion, mismatched sequence]: their rows and the labels."""
    return {"completion_row": torch.arange(0, 2 * len(items), 2), "kl_row": torch.arange(1, 2 * len(items), 2),
            "desirable": torch.tensor([bool(item.desirable) for item in items])}


def kto_items(items: list[Item], max_length: int, log: Callable[[str], None] = print,
              split: str = "training") -> list[Item]:
    """Unpaired items, each with its mismatched partner: its prompt + a response to another prompt.

    Pairs and rankings are split first into their ends: the best response desirable, the worst
    undesirable (ties at either end included), as KTO's paper splits a pair into its two sides
    (Ethayarajh et al. 2024) — so a K-way prompt weighs as a pair's, not K/2 times more, and an answer
    ranked second of four is never called undesirable. The middle responses left out are counted in
    the log. The items then come in runs that share a prompt (a pair's two sides, a ranking's K responses,
    repeated prompts), so the partner is taken from the next run whose prompt differs — the
    k-th item of a run gets that run's k-th response (cyclically) — never from its own prompt,
    whose log-ratio would pull KTO's KL estimate z₀ toward the matched one. With one prompt in
    the whole set there is no other: the next item's response is used and the log says so. A set
    of one item (a held-out set of one row) has no other item at all: its partner is its own
    sequence, so its z₀ is its own log π/π_ref — its reward ÷ β, not a KL estimate — and the log says
    that, naming the set (`split`). Taking a partner from the other set instead would tie the
    held-out figures to the training data; one held-out row is too few for a figure anyway.
    """
    from posttrain.data.records import Example

    single, middle, rankings = [], 0, 0
    for item in items:
        if item.ranks is None:
            single.append(Item([item.sequences[0]], desirable=item.desirable, source=item.source))
            continue
        best, worst = min(item.ranks), max(item.ranks)
        ends = [Item([seq], desirable=rank == best, source=item.source)
                for seq, rank in zip(item.sequences, item.ranks) if rank in (best, worst)]
        middle += len(item.sequences) - len(ends)
        rankings += len(ends) < len(item.sequences)
        single += ends
    if middle:
        log(f"kto: {middle} middle-ranked responses of {rankings} rankings left out: KTO takes a ranking's best "
            "as desirable and its worst as undesirable, as a pair's two sides, so each prompt weighs as a pair")
    partners = _mismatched_partners([item.sequences[0] for item in single], log, split)
    out = []
    for item, partner in zip(single, partners):
        own, other = item.sequences[0], single[partner].sequences[0]
        cut, start = first_label(own), first_label(other)
        mismatched = Example(input_ids=(own.input_ids[:cut] + other.input_ids[start:])[:max_length],
                             labels=([-100] * cut + other.labels[start:])[:max_length], source=own.source)
        out.append(Item([own, mismatched], desirable=item.desirable, source=item.source))
    return out


def _mismatched_partners(sequences: list, log: Callable[[str], None], split: str = "training") -> list[int]:
    """For each sequence, the index of one whose prompt (the tokens before its first label)
    differs: the next run of equal prompts, wrapping around, k-th item to k-th item. One prompt
    alone: the next item, of the same prompt; one item alone: itself (`kto_items`)."""
    prompts = [tuple(seq.input_ids[:first_label(seq)]) for seq in sequences]
    runs: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == prompt:
            runs[-1].append(i)
        else:
            runs.append([i])
    if len(sequences) == 1:
        log(f"kto: the {split} set has one item, so there is no other item's response to mismatch with: its z0 "
            "is log π/π_ref of the item's own sequence (the log-ratio its reward is β times), not a KL estimate")
        return [0]
    if len({prompts[run[0]] for run in runs}) < 2:
        log(f"kto: every {split} item has the same prompt, so the KL estimate z0 pairs each prompt with another "
            "item's response to that same prompt (there is no other prompt to mismatch with)")
        return [(i + 1) % len(sequences) for i in range(len(sequences))]
    partners = [0] * len(sequences)
    for r, run in enumerate(runs):
        step = 1  # consecutive runs differ; only the wrap from the last run to the first may not
        while prompts[runs[(r + step) % len(runs)][0]] == prompts[run[0]]:
            step += 1
        other = runs[(r + step) % len(runs)]
        for k, i in enumerate(run):
            partners[i] = other[k % len(other)]
    return partners


# --------------------------------------------------------------------------- reference log-probs


def _fingerprint(cfg: DPOConfig, items: list[Item], share_prompt: bool = False, unpadded: bool = False) -> str:
    """What the reference log-probs depend on: the model — its path and what is at it
    (`loading.model_identity`, the resume fingerprint's rule: its files' contents, so an SFT stage
    that rewrites the directory changes it and a copy or a touch does not) —,
    its dtype, precision, adapter method and quantization (QLoRA's reference is the quantized
    base), with prompt or prefix tuning what draws the starting virtual tokens (their settings and
    train.seed: the reference is the starting policy, those tokens included), every sequence's
    tokens and labels in order, the layout the batches are read in (shared prompts, padding-free
    rows: a sequence's log-probs differ in the last bits with it, so a cache from another layout
    would break π = π_ref at step 0), and for KTO the step's layout of them (`_step_layout_logps`;
    a cache from before it, one batch at a time, is computed again)."""
    from posttrain.models.adapters import plan_adapters
    from posttrain.models.adapters.spec import VIRTUAL_METHODS
    from posttrain.models.loading import model_identity

    parts = [cfg.model.path, model_identity(cfg.model.path), cfg.model.dtype, cfg.adapter.method,
             dataclasses.asdict(cfg.adapter.quantization), cfg.train.mixed_precision]
    if any(m in VIRTUAL_METHODS for m in plan_adapters(cfg.adapter).methods):
        parts += [dataclasses.asdict(cfg.adapter.virtual_tokens), cfg.train.seed]
    parts += [{"share_prompt": share_prompt, "padding_free": unpadded}]
    digest = hashlib.sha256(json.dumps(parts + (["kto: step layout"] if cfg.dpo.loss == "kto" else [])).encode())
    for item in items:
        for seq in item.sequences:
            digest.update(torch.tensor(seq.input_ids + [-1] + seq.labels, dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _cached(cache: Path, fingerprint: str, count: int, log) -> tuple[list[float], list[bool]] | None:
    """(values, covered) of the cache, one per sequence, if the file is readable, matches and
    holds `count` values; `covered` says which were computed (a run reads only some micro-batches;
    a cache without the mask, from before, covers all). An unreadable file (a crash mid-write
    before writes were atomic, a copy gone wrong) is said and recomputed."""
    from safetensors import safe_open

    try:
        with safe_open(str(cache), framework="pt") as handle:
            if (handle.metadata() or {}).get("fingerprint") != fingerprint:
                log(f"reference log-probs: {cache} was computed for another model, data or batch layout; "
                    "computing them again")
                return None
            values = handle.get_tensor("logps").tolist()
            covered = (handle.get_tensor("covered").bool().tolist() if "covered" in handle.keys()
                       else [True] * len(values))
    except Exception as exc:  # safetensors raises its own error types for damaged files
        log(f"reference log-probs: {cache} is unreadable ({type(exc).__name__}: {exc}); computing them again")
        return None
    if len(values) != count or len(covered) != count:
        log(f"reference log-probs: {cache} holds {len(values)} values for {count} sequences; computing them again")
        return None
    return values, covered


def precompute_reference(model, items: list[Item], cfg: DPOConfig, pad_id: int, cache: Path | None, log,
                         share_prompt: bool = False, unpadded: bool = False,
                         plan: list[list[Item]] | None = None, rank: int = 0, world: int = 1) -> None:
    """Fill `item.reference_logps` for the items of `plan`: from the cache where it has them, the
    rest in one pass. Items outside the plan that the cache lacks get none (a batch of them would be
    refused).

    `plan`: the micro-batches (lists of `items`) the run reads, to compute them in — the first
    `train.max_steps` steps of the stage's first epoch (all of it when the run goes further) and
    its held-out batches (`reference_plan`). A sequence's log-probs differ in the last bits with
    the batch around it (padding-free rows change width, and the kernels with it); in the very
    batches training starts from and evaluation uses, π = π_ref exactly at step 0 and before
    training, so every implicit reward is 0 and accuracy is exactly one half, not the sign of
    rounding noise. Without a plan, every item in order, 2 × batch_size at a time.

    The cache (`cache`) is keyed by the model and every item's tokens, and records which
    sequences it holds: a resumed or longer run computes only the micro-batches it lacks, with
    `model` as it is here (the starting model: the loop loads a checkpoint later), and adds them.

    With several processes (`rank` of `world`, every one calling this) each computes every
    world-th missing micro-batch and they exchange the results, so the pass takes 1/world of the
    time; all of them read the cache, process 0 alone writes it."""
    from safetensors.torch import save_file

    fingerprint = _fingerprint(cfg, items, share_prompt, unpadded) if cache is not None else ""
    count = sum(len(item.sequences) for item in items)
    cached = _cached(cache, fingerprint, count, log) if cache is not None and cache.is_file() else None
    if world > 1:  # every process takes the same branch: the exchange below is collective
        from accelerate.utils import gather_object

        cached = cached if all(gather_object([cached is not None])) else None
    values, covered = cached if cached is not None else ([float("nan")] * count, [False] * count)
    _assign(items, values, covered)
    if plan is None:
        size = max(1, 2 * cfg.train.batch_size)
        plan = [items[start : start + size] for start in range(0, len(items), size)]
    missing = [index for index, chunk in enumerate(plan) if any(not item.reference_logps for item in chunk)]
    if not missing:
        log(f"reference log-probs: reused {cache}")
        return
    device = next(model.parameters()).device
    computed: dict[int, list[float]] = {}  # plan index -> its sequences' log-probs
    with reference_weights(model, starting=True) as reference:
        for index in missing[rank::world]:
            chunk = plan[index]
            shared = share_prompt and all(shares_prompt(item) for item in chunk)
            batch = collate_shared_prompt(chunk, pad_id, padding_free=unpadded) if shared else collate_items(chunk, pad_id)
            batch = to_device(batch, device)
            computed[index] = _step_layout_logps(reference, batch, chunk, cfg).float().cpu().tolist()
    if world > 1:
        for part in gather_object([computed]):
            computed.update(part)
    fresh = 0
    for index in missing:  # a micro-batch partly in the cache (another plan) keeps the values it has
        position = 0
        for item in plan[index]:
            if not item.reference_logps:
                item.reference_logps = computed[index][position : position + len(item.sequences)]
                fresh += len(item.sequences)
            position += len(item.sequences)
    if cache is not None and rank == 0:  # written beside, then renamed: a crash never leaves a partial cache
        held = [[float("nan")] * len(item.sequences) if not item.reference_logps else item.reference_logps
                for item in items]
        mask = [bool(item.reference_logps) for item in items for _ in item.sequences]
        partial = cache.with_name(cache.name + ".partial")
        save_file({"logps": torch.tensor([v for row in held for v in row], dtype=torch.float32),
                   "covered": torch.tensor(mask, dtype=torch.uint8)}, str(partial),
                  metadata={"fingerprint": fingerprint})  # one key: safetensors writes several in any order
        os.replace(partial, cache)
    kept = f", beside the {sum(covered)} it held" if any(covered) else ""
    where = f"cached in {cache}{kept}" if cache is not None else "kept in memory"
    log(f"reference log-probs: computed for {fresh} sequences once ({where})")


def reference_plan(stage: GroupedStage, train_cfg, world: int) -> list[list[Item]]:
    """The micro-batches a run reads, in order: the first `total steps × world × grad_accum` of
    the first epoch (all of it when the run is longer: later epochs reorder its items), then the
    held-out ones. With `train.max_steps` under an epoch the rest of the epoch is never read."""
    from posttrain.train.loop import plan_total_steps  # the loop's own count of its steps

    group = world * train_cfg.grad_accum
    read = plan_total_steps(stage, train_cfg, group) * group
    return stage.item_batches(0)[:read] + stage.eval_item_batches()


def _step_layout_logps(reference, batch: dict, chunk: list[Item], cfg: DPOConfig) -> torch.Tensor:
    """A batch's per-sequence reference log-probs, computed as the step reads the policy's: the
    whole batch at once, or for KTO its completions and its mismatched rows as two sub-batches
    (`PreferenceLoss._kto`, `_kl_ratios`), so their kernels, widths and packing are the same."""
    if cfg.dpo.loss != "kto":
        return batch_logps(reference, batch, cfg.train.loss_chunk_size)[0]
    extras = kto_extras(chunk)
    out = torch.zeros(batch["input_ids"].shape[0], device=batch["input_ids"].device)
    for rows in (extras["completion_row"], extras["kl_row"]):
        rows = rows.to(out.device)
        out[rows] = policy_logps(reference, *_rows(batch, rows), cfg.train.loss_chunk_size)[0].to(out.dtype)
    return out


def _assign(items: list[Item], values: list[float], covered: list[bool]) -> None:
    """Give each item its values where the cache covers all its sequences, else none."""
    position = 0
    for item in items:
        end = position + len(item.sequences)
        item.reference_logps = values[position:end] if all(covered[position:end]) else []
        position = end


# --------------------------------------------------------------------------- the run


KTO_BALANCE = (1.0, 4 / 3)  # λ_D·n_D / (λ_U·n_U), as KTO's paper recommends (Ethayarajh et al. 2024, §4)


def _say_kto_balance(items: list[Item], loss_cfg, log: Callable[[str], None]) -> None:
    """One line when the training items' class-weighted balance λ_D·n_D / (λ_U·n_U) leaves the
    paper's range KTO_BALANCE (1:10 feedback at the default weights is 0.1; rankings with three
    responses tied worst, 1/3), naming the dpo.kto_desirable_weight that brings it in."""
    n_d = sum(bool(item.desirable) for item in items)
    n_u = len(items) - n_d
    w_d, w_u = loss_cfg.kto_desirable_weight, loss_cfg.kto_undesirable_weight
    if not n_d or not n_u:
        return
    ratio = w_d * n_d / (w_u * n_u)
    low, high = KTO_BALANCE
    if not low <= ratio <= high:
        log(f"kto: {n_d} desirable and {n_u} undesirable training items give λ_D·n_D / (λ_U·n_U) = {ratio:.3g}, "
            f"outside the [1, 4/3] KTO's paper recommends; dpo.kto_desirable_weight="
            f"{low * w_u * n_u / n_d:.3g}–{high * w_u * n_u / n_d:.3g} (at dpo.kto_undesirable_weight={w_u:g}) "
            f"brings it in")


def _items(data, cfg: DPOConfig, log: Callable[[str], None] = print) -> tuple[list[Item], list[Item]]:
    train, evaluation = items_from_examples(data.train), items_from_examples(data.eval)
    margins = sum(item.margin is not None for item in train + evaluation)
    if margins:
        log(f"dpo: {margins} records carry a 'margin'; margin is read by the reward model's loss only "
            f"(posttrain rm), dpo.loss={cfg.dpo.loss} ignores it")
    if cfg.dpo.loss == "kto":
        train_items = kto_items(train, cfg.data.max_length, log)
        _say_kto_balance(train_items, cfg.dpo, log)
        return train_items, kto_items(evaluation, cfg.data.max_length, log, "held-out") if evaluation else []
    unpaired = [item.source for item in train + evaluation if item.ranks is None]
    if unpaired:
        raise DataError(f"dpo.loss={cfg.dpo.loss} needs pairs or rankings; {len(unpaired)} rows are unpaired "
                        f"(first: {unpaired[0]}); use dpo.loss=kto for unpaired feedback")
    return train, evaluation


def run_dpo(cfg: DPOConfig) -> Path:
    """Optimise the policy on preferences per `cfg`; returns the run directory (policy in run_dir/final)."""
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.train.loop import evaluate, train
    from posttrain.train.runs import finish_run, released_on_failure, run_fingerprint, start_run
    from posttrain.models.loading import disable_dropout, note_full_logits
    from posttrain.train.forgetting import attach, build_control, report
    from posttrain.train.sft import build_model

    cfg = DPOConfig.for_run(cfg, "run_dpo")
    validate_dpo(cfg)
    run_dir, accelerator, main, log = start_run(cfg)
    with released_on_failure(run_dir):
        tokenizer, model, adapter_training = build_model(cfg, log, run_dir if main else None)
        disable_dropout(model, log, "the policy is compared with its reference, which runs without it")
        note_full_logits(model, log)
        data = prepare_preference_data(cfg.data, tokenizer, run_dir if main else None, cfg.train.seed, log)
        train_items, eval_items = _items(data, cfg, log)
        live = cfg.dpo.reference == "live"
        share = (cfg.dpo.share_prompt and cfg.dpo.loss != "kto" and getattr(model, "virtual_peft", None) is None
                 and window_allows(model, cfg.data.max_length, "dpo.share_prompt", log)
                 and block_masks_allowed(model, "dpo.share_prompt", log))
        # shared-prompt and plain padded rows alike
        unpadded = padding_free(model, cfg.model.padding_free, log, cfg.data.max_length)
        module = PreferenceLoss(model, cfg.dpo, cfg.train.loss_chunk_size, live_reference=live)
        extras = kto_extras if cfg.dpo.loss == "kto" else pair_extras
        stage = GroupedStage(module, train_items, eval_items, cfg.train, tokenizer.pad_token_id, extras, adapter_training,
                             share_prompt=share, padding_free=share and unpadded)
        control = build_control(cfg, tokenizer, model, accelerator, run_dir if main else None, log)
        attach(stage, control)  # forgetting.*
        if cfg.dpo.loss not in REFERENCE_FREE and (eval_items or not live):
            # precompute: every batch the run reads, cached in the run; live: the held-out batches
            # alone, whose reference log-probs are the same at every evaluation
            items, plan = (eval_items, stage.eval_item_batches()) if live else (
                train_items + eval_items, reference_plan(stage, cfg.train, accelerator.num_processes))
            on_device(model, accelerator.device)
            with accelerator.autocast():  # in training's precision and batches, so π = π_ref exactly at step 0
                precompute_reference(model, items, cfg, tokenizer.pad_token_id,
                                     None if live else run_dir / "reference_logps.safetensors", log, share_prompt=share,
                                     unpadded=share and unpadded, plan=plan,
                                     rank=accelerator.process_index, world=accelerator.num_processes)
        summary: dict = {"loss": cfg.dpo.loss, "reference": "none" if cfg.dpo.loss in REFERENCE_FREE else cfg.dpo.reference,
                         "train_items": len(train_items), "eval_items": len(eval_items)}
        summary.update(_exact_match(cfg, model, tokenizer, data, "before") if main else {})
        summary.update(report(cfg, control, model, tokenizer, "before", cfg.eval.max_new_tokens, main))
        with module.policy_is_reference():  # nothing has changed the model since its reference pass
            before = evaluate(on_device(module, accelerator.device), stage, accelerator)
        result = train(stage, cfg.train, run_dir, accelerator, run_fingerprint(cfg))
        summary.update(result.summary(), eval_before=before[1] if before else {}, eval_after=result.eval_metrics,
                       eval_loss_before=before[0] if before else None, eval_loss=result.eval_loss)
        _log_accuracy(summary, log)
        trained = result.module.model
        summary.update(_exact_match(cfg, trained, tokenizer, data, "after") if main else {})
        summary.update(report(cfg, control, trained, tokenizer, "after", cfg.eval.max_new_tokens, main))
        return finish_run(run_dir, accelerator, main, trained, tokenizer, summary)


def _log_accuracy(summary: dict, log) -> None:
    before, after = summary["eval_before"], summary["eval_after"]
    if "rewards/accuracy" in before:
        log(f"held-out implicit-reward accuracy: {before['rewards/accuracy']:.1%} before → "
            f"{after.get('rewards/accuracy', float('nan')):.1%} after ({summary['eval_items']} prompts)")


def _exact_match(cfg: DPOConfig, model, tokenizer, data, when: str) -> dict:
    """Exact match of greedy answers against each held-out prompt's best response (an undesirable
    KTO row has none: its prompt stays without an answer, and is not scored)."""
    from posttrain.data.preferences import assistant_message
    from posttrain.data.records import Record
    from posttrain.train.sft import exact_match_report

    records = [Record(messages=r.prompt + ([assistant_message(r.responses[_best(r)])]
                                           if r.ranks is not None or r.desirable else []), source=r.source,
                      tools=r.tools)
               for r in data.eval_records]
    return exact_match_report(model, tokenizer, records, cfg.eval.exact_match_prompts, cfg.data.template,
                              cfg.eval.max_new_tokens, when)


def _best(record) -> int:
    return 0 if record.ranks is None else record.ranks.index(min(record.ranks))
