"""Reward models: a backbone with a one-output head that scores a whole (prompt, response).

The model is Hugging Face's `AutoModelForSequenceClassification` with `num_labels=1`, so a
trained reward model is a plain HF directory any tool can load. Loading a causal-LM
directory (an SFT model) that way keeps its decoder and adds a fresh linear `score` head
on the final hidden state — an LM backbone with a value head.

Which position is scored:
  decoder backbones (Llama, Qwen2, GPT-2, ...): the last non-padding token, found from the
      attention mask, so left and right padding score alike and a pad token that equals
      eos cannot move it (transformers' own pooling searches for pad_token_id, which is why a
      tokenizer without a pad gets one the data never carries: `loading.pad_fallback`);
  encoder backbones (BERT-like): the model's own pooling (the [CLS] head), as trained.

`load_reward_model(path)` also reads a LoRA reward model (a peft adapter directory whose
`modules_to_save` holds the head) on top of its base.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import UserError


# the settings that score with a trained reward model as it is; the others (posttrain rm's model.path,
# ppo.value_model_path) name a model that training starts from
_SCORING = ("reward.models", "score")
_TRAIN_ONE = "train one with posttrain rm and give its run directory or final/"


def load_reward_model(path: str | os.PathLike, dtype: str = "float32", trust_remote_code: bool = False,
                      pad_token_id: int | None = None, setting: str = "reward.models"):
    """A sequence-classification model with one output from a model, preset or adapter directory.
    `setting` is the option `path` came from, named where a message says what to set instead:
    model.path (posttrain rm starts from it) or ppo.value_model_path (a PPO critic does), or
    reward.models / score (the default: a trained reward model is asked for)."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.models.adapters.io import is_adapter_dir, peft_task
    from posttrain.models.loading import _check_weights, _torch_dtype, load_failure, resolve_model_path

    if is_adapter_dir(path):
        if (Path(path) / "adapter_config.json").is_file() and peft_task(path) in (None, "SEQ_CLS"):
            return _load_lora_reward_model(Path(path), dtype, trust_remote_code, pad_token_id)
        raise UserError(_not_a_reward_adapter(Path(path), setting))
    directory = resolve_model_path(path, setting)
    _check_weights(directory)
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype), "use_safetensors": True, "num_labels": 1,
                              "trust_remote_code": trust_remote_code is True}  # never asked on stdin
    try:
        model, info = _quiet_from_pretrained(AutoModelForSequenceClassification, directory, output_loading_info=True,
                                             **kwargs)
    except Exception as exc:
        error = load_failure(exc, "a reward model (sequence classification)", directory)
        if error is None:
            raise
        raise error from None
    if pad_token_id is not None and model.config.pad_token_id != pad_token_id:
        # the tokenizer's pad (the one batches are padded with, saved beside the model): plain
        # transformers' pooling finds a row's last token by it (`pad_fallback`)
        model.config.pad_token_id = pad_token_id
    # modules the checkpoint did not hold, drawn at random here (the head; an encoder's pooler when
    # the checkpoint was a masked LM): LoRA must train and save them too (`add_lora`)
    model.newly_initialized = sorted({key.rsplit(".", 1)[0] for key in info.get("missing_keys", [])})
    return model


def note_pad_is_eos(tokenizer, log) -> None:
    """Say so when the reward model's pad token is its eos: posttrain scores the last real token
    (from the attention mask), but plain transformers' AutoModelForSequenceClassification scores
    the last token that is not pad_token_id, so it reads the token before a row's final eos."""
    eos = getattr(tokenizer, "eos_token", None)
    if eos is not None and tokenizer.pad_token_id == tokenizer.eos_token_id:
        log(f"note: the pad token is the eos token {eos!r}, so plain transformers' "
            f"AutoModelForSequenceClassification will score the token before a row's final {eos!r}, not the last "
            "token posttrain trains and scores; give the tokenizer another pad token (tokenizer_config.json) for "
            "the saved reward model to score alike in both")


def _quiet_from_pretrained(cls, directory, **kwargs):
    """from_pretrained without the "newly initialized score head" warning: a fresh head is the point."""
    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return cls.from_pretrained(directory, **kwargs)
    finally:
        logging.set_verbosity(level)


def _not_a_reward_adapter(directory: Path, setting: str) -> str:
    """The one line for an adapter directory that is not a LoRA reward model (a policy's) given as
    `setting`: where a reward model is asked for, train one; where one is started from, how to
    start from this policy (`loading.adapter_advice`: merge it, or say it cannot be)."""
    from posttrain.models.adapters.io import peft_task
    from posttrain.models.loading import adapter_advice

    task = peft_task(directory)
    kind = f"a {task} adapter" if task not in (None, "CAUSAL_LM") else "a policy (causal LM) adapter"
    if setting in _SCORING:
        advice = _TRAIN_ONE
    else:
        start = "a PPO critic" if setting == "ppo.value_model_path" else "a reward model"
        advice = f"to start {start} from this policy: {adapter_advice(directory, setting)}"
    return (f"{directory} is {kind}, not a reward model (a reward model's adapter is SEQ_CLS, from posttrain rm); "
            f"{advice}")


def _load_lora_reward_model(directory: Path, dtype: str, trust_remote_code: bool, pad_token_id: int | None):
    import json

    from peft import PeftModel

    from posttrain.models.loading import check_adapter_weights

    config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{directory}/adapter_config.json names no base model (base_model_name_or_path)")
    check_adapter_weights(directory)
    model = load_reward_model(base, dtype, trust_remote_code, pad_token_id)
    return PeftModel.from_pretrained(model, directory)


def untrained_modules(model) -> list[str]:
    """The modules of a loaded reward model its checkpoint did not hold (drawn at random by the
    loader: the score head of a causal LM, an encoder's classifier), less those a LoRA reward
    model's adapter saves (`modules_to_save`); [] for a trained reward model."""
    from peft import PeftModel

    missing = list(getattr(_classifier(model), "newly_initialized", []))
    if isinstance(model, PeftModel):
        config = model.peft_config.get(model.active_adapter)
        saved = list(getattr(config, "modules_to_save", None) or [])
        missing = [name for name in missing
                   if not any(name == s or name.endswith("." + s) or s.endswith("." + name) for s in saved)]
    return missing


def check_trained_head(model, path) -> None:
    """A UserError when `model` (from `load_reward_model(path)`) has no trained score head: its
    scores would be a fresh random draw at every load. For scoring (posttrain score, RL and
    evaluate's reward.models), never for training one (`posttrain rm`, a PPO critic)."""
    missing = untrained_modules(model)
    if missing:
        raise UserError(f"{path} is not a reward model: it has no trained reward head (the checkpoint lacks "
                        f"{', '.join(missing)}, which would be drawn at random: every score would be noise); "
                        f"{_TRAIN_ONE}")


def add_lora(model, lora_cfg):
    """Wrap a reward model with LoRA (peft, task SEQ_CLS: the new head trains in full and is saved)."""
    from peft import LoraConfig, TaskType

    from posttrain.models.adapters.build import inject, peft_targets

    # the head (peft's SEQ_CLS default) and any other module the checkpoint lacked, which would
    # otherwise stay at its random draw, untrained and unsaved: a new draw at every reload
    fresh = [name for name in getattr(model, "newly_initialized", []) if name not in ("score", "classifier")]
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                        lora_dropout=lora_cfg.dropout, use_rslora=lora_cfg.rslora, use_dora=lora_cfg.dora,
                        target_modules=peft_targets(lora_cfg.target_modules),
                        modules_to_save=["classifier", "score", *fresh] if fresh else None)
    return inject(model, config, "adapter.lora.target_modules", lora_cfg.target_modules)


def _classifier(model):
    """The transformers *ForSequenceClassification module inside a plain or PEFT-wrapped model."""
    from peft import PeftModel

    return model.get_base_model() if isinstance(model, PeftModel) else model


def is_decoder_scorer(model) -> bool:
    """True when the head is a linear `score` on a decoder's hidden states (pooled by us)."""
    return hasattr(_classifier(model), "score")


def encoder_positions(model) -> int | None:
    """How many tokens an encoder reward model can read (`loading.position_limit`: its absolute
    position table, less RoBERTa's offset past the padding index); None for a decoder scorer."""
    from posttrain.models.loading import position_limit

    classifier = _classifier(model)
    return None if is_decoder_scorer(classifier) else position_limit(classifier)


def scores_at(classifier, inputs: dict, at: torch.Tensor) -> torch.Tensor:
    """The score head (float32, (len(at),)) on the final hidden states at flat positions `at` of
    the batch `inputs` — plain, shared-prompt or padding-free rows; with the last layer computed
    only there when the model trims it (`models.readout`). `classifier`: a decoder scorer."""
    from posttrain.models.attention import masked_attention_kernels
    from posttrain.models.readout import reading

    inputs, pick = reading(classifier, inputs, at)
    with masked_attention_kernels(inputs["input_ids"].device):
        hidden = classifier.base_model(**inputs, use_cache=False, return_dict=True).last_hidden_state
    return head_in_own_precision(classifier.score, pick(hidden))[:, 0].float()


def head_in_own_precision(head: torch.nn.Module, hidden: torch.Tensor, *args, forward=None, **kwargs) -> torch.Tensor:
    """A one-output head (a reward model's score, PPO's value head, an encoder's pooler and
    classifier) in its weights' precision, not autocast's: under bf16 autocast it ran in bf16,
    and rewards and values kept ~3 significant digits (ties between close responses, coarse
    margins and advantages). `forward`: what to call instead of `head` itself (its own forward,
    where `head.forward` is this call: `_encoder_head_in_own_precision`), with any further
    arguments the model passes it."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return (forward or head)(hidden.to(next(head.parameters()).dtype), *args, **kwargs)


def _encoder_heads(classifier) -> list[torch.nn.Module]:
    """The modules of an encoder reward model that read its final hidden states: the body's
    pooler when it has one (BERT's, ALBERT's: a dense layer at [CLS]) and the classification
    model's own modules with weights beside the body (the classifier; DistilBERT's
    pre_classifier, DeBERTa's pooler, ModernBERT's head); none for a model with no transformers
    body (`base_model`) to tell them from."""
    body = getattr(classifier, "base_model", None)
    if not isinstance(body, torch.nn.Module) or body is classifier:
        return []
    pooler = getattr(body, "pooler", None)
    own = [module for module in classifier.children()
           if module is not body and next(module.parameters(), None) is not None]
    return ([pooler] if isinstance(pooler, torch.nn.Module) else []) + own


@contextlib.contextmanager
def _encoder_head_in_own_precision(classifier) -> Iterator[None]:
    """While inside, an encoder reward model's pooler and classifier (`_encoder_heads`) run in
    their weights' precision (`head_in_own_precision`) and its body as the caller runs it (bf16
    autocast, say), as a decoder's score head does in `scores_at`. Each module's own forward
    (an instance one too, such as accelerate's hook) is put back on leaving."""
    heads = _encoder_heads(classifier)
    saved = [head.__dict__.get("forward") for head in heads]
    for head in heads:
        head.forward = functools.partial(head_in_own_precision, head, forward=head.forward)
    try:
        yield
    finally:
        for head, forward in zip(heads, saved):
            if forward is None:
                del head.forward
            else:
                head.forward = forward


def heads_in_float32(model, directory: str | os.PathLike) -> None:
    """For scoring with a reward model loaded in bfloat16 or float16: its head (a decoder's
    `score`; an encoder's pooler and classifier, `_encoder_heads`) in float32, read again from
    the checkpoint in `directory` in the precision it was saved in (a float32 head is not rounded
    through bfloat16), so that under `head_in_own_precision` the body runs in the narrow dtype
    and the head in float32, as bf16 autocast runs a float32 model, and close rewards do not tie.
    A weight the checkpoint does not hold under the module's name (a LoRA reward model's head,
    saved in its adapter) is widened as loaded. Heads already float32 or wider are left as they
    are."""
    from safetensors import safe_open

    classifier = _classifier(model)
    heads = [classifier.score] if is_decoder_scorer(classifier) else _encoder_heads(classifier)
    narrow = (torch.bfloat16, torch.float16)
    heads = [h for h in heads if any(p.dtype in narrow for p in h.parameters())]
    if not heads:
        return
    names = {id(module): name for name, module in classifier.named_modules()}
    wanted = {f"{names[id(head)]}.{key}": tensor for head in heads for key, tensor in head.named_parameters()}
    directory = Path(directory)
    for file in sorted(directory.glob("*.safetensors")) if (directory / "config.json").is_file() else []:
        with safe_open(str(file), "pt") as saved:
            for key in set(saved.keys()) & set(wanted):
                stored = saved.get_tensor(key)
                if stored.is_floating_point() and stored.shape == wanted[key].shape:
                    wanted[key].data = stored.to(device=wanted[key].device, dtype=torch.float32)
    for head in heads:
        head.float()  # what the checkpoint did not give: widened as loaded


def score(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Rewards (B,) for a batch of full (prompt + response) sequences, the head in its weights'
    precision under autocast (`head_in_own_precision`): float32 (an encoder in float64 keeps it)."""
    classifier = _classifier(model)
    if not hasattr(classifier, "score"):  # encoder: its own pooling and classifier
        with _encoder_head_in_own_precision(classifier):
            rewards = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0]
        return rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    from posttrain.data.batching import padded_inputs
    from posttrain.models.attention import pack_for

    if not bool(attention_mask.bool().any(1).all()):  # it would read padding, or past the end of the real tokens
        raise ValueError("score: a row holds no real token; an empty sequence has no last token to score")
    rows, width = input_ids.shape
    positions = torch.arange(width, device=input_ids.device)
    last = (attention_mask.long() * positions).argmax(dim=1)  # index of the last real token, any padding side
    flat_last = torch.arange(rows, device=input_ids.device) * width + last
    packed = pack_for(classifier, input_ids, attention_mask)
    if packed is not None:  # the real tokens only
        return scores_at(classifier, packed, torch.searchsorted(packed["packed_slots"], flat_last))
    return scores_at(classifier, padded_inputs(input_ids, attention_mask), flat_last)


def score_shared_prompt(model, input_ids, attention_mask, position_ids, last_token, packed_slots=None,
                        packed_blocks=None) -> torch.Tensor:
    """Rewards (S,) from `train.grouped.collate_shared_prompt` rows: each item's prompt once,
    its responses behind a 4-D mask; the score is read at each response's last token
    (`last_token`, flat indices into the (B·T) hidden states, or into the N tokens of a
    padding-free batch, which carries `packed_slots` and `packed_blocks`). Decoder scorers only."""
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
    if packed_slots is not None:
        inputs |= {"packed_slots": packed_slots, "packed_blocks": packed_blocks}
    return scores_at(_classifier(model), inputs, last_token)
