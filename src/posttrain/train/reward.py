"""Reward models (RLHF stage 2): batch of ranked responses → Bradley-Terry / ranking loss.

Every response of a micro-batch is scored in one forward (`models.reward_model.score`:
the last real token of a decoder, or an encoder's own pooling). With a decoder and
`reward.share_prompt` (the default) an item is one block, its prompt computed once for all its
responses, short blocks sharing a row (`grouped.collate_shared_prompt`, as DPO does). Pairs train with the
Bradley-Terry loss, with the row's margin (Llama 2) and reward centering when asked; data
with K-way rankings train with the InstructGPT ranking loss over all ordered pairs of a
prompt, each prompt weighted once (`losses.preference`).

Metrics, per prompt then averaged: accuracy (fraction of ordered pairs the model orders
right; a tie counts one half), margin (mean r_better − r_worse), reward mean and std.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import torch

from posttrain.config import RMConfig, validate_rm
from posttrain.train.grouped import GroupedStage, Item, items_from_examples, on_device


def reward_table(rewards: torch.Tensor, group: torch.Tensor, slot: torch.Tensor, shape) -> torch.Tensor:
    """Per-row rewards (R,) → (P, K) by item and slot (zeros where an item has fewer responses)."""
    return rewards.new_zeros(shape).index_put((group, slot), rewards)


def ranking_metrics(table: torch.Tensor, ranks: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over prompts of per-prompt accuracy, margin, reward mean and mean square. table: (P, K).
    In float64: the std is later sqrt(E[r²] − E[r]²), which float32 loses for rewards far from 0."""
    table = table.double()
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]  # (P, K, K)
    diff = table[:, :, None] - table[:, None, :]
    correct = (diff > 0).to(table.dtype) + 0.5 * (diff == 0).to(table.dtype)
    pairs = better.sum(dim=(1, 2)).clamp(min=1)
    present = valid.to(table.dtype)
    count = present.sum(dim=1).clamp(min=1)
    return {
        "accuracy": ((correct * better).sum(dim=(1, 2)) / pairs).sum(),
        "margin": ((diff * better).sum(dim=(1, 2)) / pairs).sum(),
        "reward_mean": ((table * present).sum(dim=1) / count).sum(),
        "reward_sq_mean": ((table**2 * present).sum(dim=1) / count).sum(),
    }


def finish_reward_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Mean square → std, once the loop has averaged over prompts."""
    out = dict(metrics)
    if "reward_sq_mean" in out:
        sq = out.pop("reward_sq_mean")
        out["reward_std"] = math.sqrt(max(sq - out.get("reward_mean", 0.0) ** 2, 0.0))
    return out


class RewardModelLoss(torch.nn.Module):
    """forward(batch) → (summed loss over prompts, summed metrics)."""

    def __init__(self, model: torch.nn.Module, centering: float = 0.0, use_margins: bool = True):
        super().__init__()
        self.model = model
        self.centering = centering
        self.use_margins = use_margins

    def forward(self, input_ids, attention_mask, group, slot, ranks, valid, margins=None, position_ids=None,
                last_token=None, packed_slots=None, packed_blocks=None, **_unused):
        from posttrain.losses.preference import bradley_terry_loss, ranking_loss
        from posttrain.models.reward_model import score, score_shared_prompt

        if last_token is not None:  # shared-prompt rows (grouped.collate_shared_prompt)
            rewards = score_shared_prompt(self.model, input_ids, attention_mask, position_ids, last_token, packed_slots,
                                          packed_blocks)
        else:
            rewards = score(self.model, input_ids, attention_mask)  # (R,)
        table = reward_table(rewards, group, slot, ranks.shape)  # (P, K)
        margins = margins if self.use_margins else None
        if ranks.shape[1] == 2 and bool(valid.all()):  # pairs: Bradley-Terry with margin and centering
            first_better = ranks[:, 0] < ranks[:, 1]
            chosen = torch.where(first_better, table[:, 0], table[:, 1])
            rejected = torch.where(first_better, table[:, 1], table[:, 0])
            losses = bradley_terry_loss(chosen, rejected, 0.0 if margins is None else margins, self.centering)
        else:  # the same for the pairs among them, margins included
            losses = ranking_loss(table, ranks, valid, self.centering, margins)
        return losses.sum(), ranking_metrics(table.detach(), ranks, valid)


def reward_extras(items: list[Item]) -> dict[str, torch.Tensor]:
    """ranks / valid (P, K) padded to the largest K in the batch, and margins (P,)."""
    k = max(len(item.sequences) for item in items)
    ranks = torch.zeros((len(items), k), dtype=torch.long)
    valid = torch.zeros((len(items), k), dtype=torch.bool)
    for p, item in enumerate(items):
        ranks[p, : len(item.ranks)] = torch.tensor(item.ranks)
        valid[p, : len(item.ranks)] = True
    margins = torch.tensor([item.margin or 0.0 for item in items], dtype=torch.float32)
    return {"ranks": ranks, "valid": valid, "margins": margins}


def build_reward_model(cfg: RMConfig, tokenizer, log, run_dir: Path | None = None):
    """The reward model to train (full, or LoRA with its head trained in full); prints the
    parameter report and saves it as run_dir/params.json, as every stage does."""
    from posttrain.models.adapters import format_report, parameter_report
    from posttrain.models.lean import lean_activations
    from posttrain.models.reward_model import add_lora, load_reward_model, note_pad_is_eos

    note_pad_is_eos(tokenizer, log)
    model = load_reward_model(cfg.model.path, cfg.model.dtype, cfg.model.trust_remote_code,
                              pad_token_id=tokenizer.pad_token_id, setting="model.path")
    lean_activations(model, cfg.model.lean_activations)
    if cfg.model.gradient_checkpointing:
        from posttrain.models.loading import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    if cfg.adapter.method == ["lora"]:
        model = add_lora(model, cfg.adapter.lora)
        lean_activations(model, cfg.model.lean_activations)  # again: the LoRA linears
    report = parameter_report(_ByMethod(model), cfg.train.optimizer)
    log(f"reward model {type(_scorer(model)).__name__}: " + format_report(report))
    if run_dir is not None:
        (run_dir / "params.json").write_text(json.dumps(report, indent=1), encoding="utf-8")
    return model


class _ByMethod:
    """A peft-wrapped reward model's parameters, named by method for the parameter report: its
    LoRA weights `lora`, the rest (the head it trains in full, the frozen base) `base`."""

    _LORA = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")

    def __init__(self, model):
        self.model = model

    def named_parameters(self):  # peft's trained copy of the head, score.modules_to_save.default, as score
        return ((name.replace(".modules_to_save.default.", "."), param) for name, param in self.model.named_parameters())

    def method_of(self, name: str) -> str:
        return "lora" if any(part in self._LORA for part in name.split(".")) else "base"


def _scorer(model):
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def run_rm(cfg: RMConfig) -> Path:
    """Train a reward model per `cfg`; returns the run directory (model in run_dir/final)."""
    from posttrain.data.preferences import prepare_preference_data
    from posttrain.models.adapters import plan_adapters
    from posttrain.models.adapters.schedule import AdapterTraining
    from posttrain.models.attention import block_masks_allowed, padding_free, window_allows
    from posttrain.models.loading import check_positions, load_tokenizer
    from posttrain.models.reward_model import encoder_positions, is_decoder_scorer
    from posttrain.train.loop import evaluate, train
    from posttrain.train.runs import finish_run, released_on_failure, run_fingerprint, start_run

    cfg = RMConfig.for_run(cfg, "run_rm")
    validate_rm(cfg)
    run_dir, accelerator, main, log = start_run(cfg)
    with released_on_failure(run_dir):
        tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
        model = build_reward_model(cfg, tokenizer, log, run_dir if main else None)
        data_cfg, limit = cfg.data, encoder_positions(model)
        if limit is not None and data_cfg.max_length > limit:  # an encoder's rows are cut at its table (README)
            log(f"note: data.max_length {data_cfg.max_length} → {limit}, the encoder's position table")
            data_cfg = dataclasses.replace(data_cfg, max_length=limit)
        elif is_decoder_scorer(model):  # a decoder's, as every decoder stage's (sft.build_model): refused
            check_positions(model, {"data.max_length": data_cfg.max_length})
        # an encoder reads its own [CLS] ... [SEP] around the text; a decoder's template has its BOS
        data = prepare_preference_data(data_cfg, tokenizer, run_dir if main else None, cfg.train.seed, log,
                                       special_tokens=not is_decoder_scorer(model))
        train_items, eval_items = items_from_examples(data.train), items_from_examples(data.eval)
        _check_comparisons(train_items + eval_items, cfg, log)
        module = RewardModelLoss(model, cfg.reward.centering, cfg.reward.use_margins)
        share = cfg.reward.share_prompt and is_decoder_scorer(model)
        if cfg.reward.share_prompt and not share:
            log("note: reward.share_prompt is off for an encoder backbone (its attention is bidirectional)")
        share = (share and window_allows(model, cfg.data.max_length, "reward.share_prompt", log)
                 and block_masks_allowed(model, "reward.share_prompt", log))
        unpadded = is_decoder_scorer(model) and padding_free(model, cfg.model.padding_free, log,
                                                             cfg.data.max_length)  # any padded rows
        stage = GroupedStage(module, train_items, eval_items, cfg.train, tokenizer.pad_token_id, reward_extras,
                             AdapterTraining(model, plan_adapters(cfg.adapter), cfg.adapter.lora.lr_ratio_b, log),
                             share_prompt=share, padding_free=share and unpadded)  # LoRA+'s rate for lora_B
        stage.finish_metrics = finish_reward_metrics
        before = evaluate(on_device(module, accelerator.device), stage, accelerator)
        result = train(stage, cfg.train, run_dir, accelerator, run_fingerprint(cfg))
        summary = result.summary() | {"train_items": len(train_items), "eval_items": len(eval_items),
                                      "eval_before": before[1] if before else {}, "eval_after": result.eval_metrics,
                                      "eval_loss_before": before[0] if before else None, "eval_loss": result.eval_loss}
        if before:
            log(f"held-out pairwise accuracy: {before[1]['accuracy']:.1%} before → "
                f"{result.eval_metrics.get('accuracy', float('nan')):.1%} after ({len(eval_items)} prompts)")
        return finish_run(run_dir, accelerator, main, result.module.model, tokenizer,
                          summary, save=_save_final)


def _save_final(model, tokenizer, final: Path) -> None:
    from posttrain.models.loading import as_checkpoint

    with as_checkpoint(model):  # the checkpoint's use_cache and dropout rates, not training's
        model.save_pretrained(final)
    if (final / "adapter_config.json").is_file():  # a LoRA reward model
        from posttrain.models.adapters.io import sort_module_sets

        sort_module_sets(final / "adapter_config.json")
    tokenizer.save_pretrained(final)


def _check_comparisons(items: list[Item], cfg: RMConfig, log) -> None:
    from posttrain.errors import DataError

    if any(item.ranks is None for item in items):
        raise DataError("a reward model learns from comparisons; the data holds unpaired (KTO) rows")
