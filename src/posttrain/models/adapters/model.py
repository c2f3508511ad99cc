"""`AdaptedModel`: one causal LM carrying any mix of posttrain's PEFT methods.

    weight adapters  LoRA / DoRA / rsLoRA / QLoRA / IA3 — a `peft.PeftModel`, layers injected in place
    virtual tokens   prompt or prefix tuning — peft's prompt encoder, driven from here
    bottlenecks      Houlsby adapters after attention / FFN — `bottleneck.py`, forward hooks

It behaves like a transformers causal LM towards the rest of posttrain: `forward` takes
input_ids / attention_mask / position_ids / the KV cache (as `cache` or `past_key_values`; it is
passed down under the name the wrapped model takes, see `cache_argument`) and returns logits for the real
tokens only, so the trainer, the chunked loss and the generation engine need no special
cases. Virtual tokens occupy positions 0..n-1 and real tokens are shifted to n.., as in
peft's own `PeftModelForCausalLM` (a test checks the outputs agree). A left-padded row's soft
prompt (prompt tuning) sits after its padding, right before its first token, as in the row alone.

`adapters_disabled()` runs the bare base model without a second copy of it (the
reference model of DPO/PPO).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any

import torch
from torch import nn

from posttrain.models.adapters.bottleneck import BottleneckSet

# The KV-cache argument of a causal LM's forward: `cache` from transformers 5.24 on (the old name still
# works there, with a deprecation warning, until 5.40), `past_key_values` before (and in remote code).
NEW_CACHE_NAME, OLD_CACHE_NAME = "cache", "past_key_values"


def cache_argument(model) -> str:
    """The name under which `model.forward` takes the KV cache: 'cache' or 'past_key_values'.

    Read from the forward's signature (transformers' decorators keep the wrapped signature). A forward
    taking neither (only **kwargs: peft, DDP, torch.compile wrappers) is answered for the model it wraps;
    failing that, 'past_key_values', which every transformers version before 5.40 accepts.
    """
    seen = set()
    while model is not None and id(model) not in seen:
        seen.add(id(model))
        try:
            parameters = inspect.signature(model.forward).parameters
        except (AttributeError, TypeError, ValueError):
            parameters = {}
        if NEW_CACHE_NAME in parameters:
            return NEW_CACHE_NAME
        if OLD_CACHE_NAME in parameters:
            return OLD_CACHE_NAME
        model = _wrapped_model(model)
    return OLD_CACHE_NAME


def _wrapped_model(model):
    get_base_model = getattr(model, "get_base_model", None)  # peft
    if callable(get_base_model):
        try:
            return get_base_model()
        except Exception:  # a wrapper that cannot say: try the other attributes
            pass
    for name in ("module", "_orig_mod"):  # DDP / FSDP, torch.compile
        inner = getattr(model, name, None)
        if isinstance(inner, nn.Module):
            return inner
    return None


def output_cache(out):
    """The KV cache a forward returned: `out.cache` on transformers >= 5.24 outputs, `out.past_key_values`
    on older ones (reading the old name on new outputs would log a deprecation warning)."""
    fields = getattr(type(out), "__dataclass_fields__", None) or {}
    for name in (NEW_CACHE_NAME, OLD_CACHE_NAME):
        if name in fields:
            return getattr(out, name)
    for name in (NEW_CACHE_NAME, OLD_CACHE_NAME):  # a plain object (a stub or remote code)
        if hasattr(out, name):
            return getattr(out, name)
    return None


def _one_cache(cache, past_key_values):
    """The cache a caller gave under either name (both at once is an error, as in transformers)."""
    if past_key_values is None:
        return cache
    if cache is not None:
        raise ValueError("give the KV cache as `cache` or as `past_key_values`, not both")
    return past_key_values


def _pads_first(attention_mask: torch.Tensor, n: int) -> torch.Tensor | None:
    """For (B, n + T) columns laid out [n virtual][T inputs]: the source column of each output column
    when every row's leading padding (its left padding: the 0s before its first 1) moves in front of
    the virtual tokens; None when no row is left-padded (the layout stays as it is).

    The last T columns then still hold each row's tokens from its first real one on, where the
    outputs are read (`_strip`); the columns before them hold the pads and virtual tokens."""
    lead = (attention_mask.cumsum(dim=1) == 0).sum(dim=1, keepdim=True)  # (B, 1) left pads per row
    if not bool(lead.any()):
        return None
    column = torch.arange(n + attention_mask.shape[1], device=attention_mask.device).expand(attention_mask.shape[0], -1)
    return torch.where(column < lead, column + n, torch.where(column < lead + n, column - lead, column))


def _reordered(tensor: torch.Tensor, order: torch.Tensor | None) -> torch.Tensor:
    """`tensor` (B, n + T, ...) with its columns taken in `order` (B, n + T); as is when None."""
    if order is None:
        return tensor
    index = order.view(*order.shape, *([1] * (tensor.dim() - 2))).expand(*order.shape, *tensor.shape[2:])
    return tensor.gather(1, index)


class AdaptedModel(nn.Module):
    def __init__(self, lm: nn.Module, methods: tuple[str, ...], *, weight_peft=None, virtual_peft=None,
                 bottlenecks: BottleneckSet | None = None):
        super().__init__()
        self.methods = tuple(methods)
        # Exactly one registered path to the base weights, so parameter names are stable.
        self.base = weight_peft if weight_peft is not None else lm
        self.virtual_encoder = virtual_peft.prompt_encoder if virtual_peft is not None else None
        self.bottlenecks = bottlenecks
        object.__setattr__(self, "lm", lm)  # the transformers model (adapters injected), not re-registered
        object.__setattr__(self, "weight_peft", weight_peft)
        object.__setattr__(self, "virtual_peft", virtual_peft)
        self.config = lm.config
        self.generation_config = getattr(lm, "generation_config", None)
        self._virtual_on = True
        # Detected once: the names the causal LM and its decoder (final_hidden) take the KV cache under.
        self._cache_name = cache_argument(lm)
        self._decoder_cache_name = cache_argument(getattr(lm, "base_model", lm))

    # ------------------------------------------------------------------ virtual tokens

    @property
    def virtual_kind(self) -> str | None:
        """'prompt', 'prefix' or None."""
        if self.virtual_peft is None or not self._virtual_on:
            return None
        return "prefix" if self.virtual_peft.active_peft_config.peft_type.value == "PREFIX_TUNING" else "prompt"

    @property
    def num_virtual_tokens(self) -> int:
        return self.virtual_peft.active_peft_config.num_virtual_tokens if self.virtual_kind else 0

    def decoder_inputs(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                       inputs_embeds=None, labels=None, *, past_key_values=None) -> dict[str, Any]:
        """Model inputs with the virtual tokens put in front (prefill) or accounted for (decoding).
        The KV cache comes as `cache` or `past_key_values` and goes out under the wrapped model's name."""
        cache = _one_cache(cache, past_key_values)
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  self._cache_name: cache, "inputs_embeds": inputs_embeds}
        kind, n = self.virtual_kind, self.num_virtual_tokens
        if kind is None:
            return {**inputs, "labels": labels} if labels is not None else inputs
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, device = reference.shape[0], reference.device
        # Prompt tuning: each row's left padding goes before its soft prompt ([pads][virtual][tokens]), so its
        # tokens follow the virtual ones at once, as they do in the row alone: under a sliding window the pad
        # slots would otherwise take window places the row gives to the virtual tokens. A prefix lives in the
        # KV cache, before every input column, so it stays in front (generate batches such rows by length).
        order = _pads_first(attention_mask, n) if kind == "prompt" and attention_mask is not None else None
        if attention_mask is not None:
            ones = attention_mask.new_ones(batch, n)
            inputs["attention_mask"] = _reordered(torch.cat([ones, attention_mask], dim=1), order)
        if position_ids is not None:
            position_ids = position_ids + n
        prefill = cache is None or cache.get_seq_length() == 0
        if prefill and kind == "prefix":
            inputs[self._cache_name] = self.virtual_peft.get_prompt(batch_size=batch)
        elif prefill:  # prompt tuning: prepend the soft prompt to the input embeddings
            embeds = inputs_embeds if inputs_embeds is not None else self.lm.get_input_embeddings()(input_ids)
            prompt = self.virtual_peft.get_prompt(batch_size=batch).to(embeds.dtype)
            inputs.update(input_ids=None, inputs_embeds=_reordered(torch.cat([prompt, embeds], dim=1), order))
            if position_ids is not None:
                virtual = torch.arange(n, device=device).expand(batch, n)
                position_ids = _reordered(torch.cat([virtual, position_ids], dim=1), order)
            if labels is not None:
                labels = _reordered(torch.cat([labels.new_full((batch, n), -100), labels], dim=1), order)
        inputs["position_ids"] = position_ids
        return {**inputs, "labels": labels} if labels is not None else inputs

    def _strip(self, tensor: torch.Tensor, length: int) -> torch.Tensor:
        """Drop the soft-prompt positions from a (B, n + T, ...) output."""
        return tensor[:, -length:] if tensor.shape[1] > length else tensor

    # ------------------------------------------------------------------ forward

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep: int = 0, *, past_key_values=None,
                **kwargs):
        length = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        cache = _one_cache(cache, past_key_values)
        inputs = self.decoder_inputs(input_ids, attention_mask, position_ids, cache, inputs_embeds, labels)
        out = self.lm(**inputs, use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
        if logits_to_keep == 0:
            out.logits = self._strip(out.logits, length)
        return out

    def final_hidden(self, input_ids=None, attention_mask=None, position_ids=None, packed_slots=None,
                     packed_blocks=None, read_at=None, **_) -> torch.Tensor:
        """Last hidden states (B, T, H) of the real tokens; the head is applied by the caller.
        `packed_slots`, `packed_blocks`: a padding-free batch (`models.attention.padding_free`; no virtual tokens),
        `read_at`: of its tokens, those to compute the last layer at (`models.readout`)."""
        inputs = self.decoder_inputs(input_ids, attention_mask, position_ids)
        if self._decoder_cache_name != self._cache_name:
            inputs[self._decoder_cache_name] = inputs.pop(self._cache_name)
        if packed_slots is not None:
            inputs["packed_slots"] = packed_slots
            inputs["packed_blocks"] = packed_blocks
        if read_at is not None:
            inputs["read_at"] = read_at
        # use_cache=False stops the decoder from creating a cache; a prefix cache passed in is still read
        hidden = self.lm.base_model(**inputs, use_cache=False, return_dict=True).last_hidden_state
        return self._strip(hidden, input_ids.shape[1])

    def get_input_embeddings(self):
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()

    # ------------------------------------------------------------------ switches

    @contextlib.contextmanager
    def adapters_disabled(self, keep_virtual_tokens: bool = False):
        """Run the plain base model inside this block (no adapter, no virtual token); with
        `keep_virtual_tokens`, the base and the virtual tokens (RL's reference with prompt or
        prefix tuning: `train.preference.StartingVirtualTokens`)."""
        weight = self.weight_peft.disable_adapter() if self.weight_peft is not None else contextlib.nullcontext()
        self._virtual_on = keep_virtual_tokens
        if self.bottlenecks is not None:
            self.bottlenecks.enabled = False
        try:
            with weight:
                yield self
        finally:
            self._virtual_on = True
            if self.bottlenecks is not None:
                self.bottlenecks.enabled = True

    @property
    def active_adapter(self) -> str | None:
        """Name of the active weight adapter (None without LoRA / IA3)."""
        return self.weight_peft.active_adapter if self.weight_peft is not None else None

    def adapter_names(self) -> list[str]:
        return list(self.weight_peft.peft_config) if self.weight_peft is not None else []

    def use_adapter(self, name: str) -> None:
        """Switch the active weight adapter (several LoRA/IA3 adapters loaded by name)."""
        from posttrain.errors import UserError

        if name not in self.adapter_names():
            raise UserError(f"no adapter named {name!r}; loaded: {', '.join(self.adapter_names()) or 'none'}")
        self.weight_peft.set_adapter(name)

    # ------------------------------------------------------------------ parameters by method

    def method_of(self, param_name: str) -> str:
        if param_name.startswith("virtual_encoder."):
            return self.virtual_peft.active_peft_config.peft_type.value.split("_")[0].lower()  # prompt | prefix
        if param_name.startswith("bottlenecks."):
            return "bottleneck"
        if "lora_" in param_name:
            return "lora"
        if "ia3_" in param_name:
            return "ia3"
        return "base"

    def mark_trainable(self) -> None:
        """Adapters train, the base stays frozen (peft unfreezes only its own layers)."""
        for name, param in self.named_parameters():
            if self.method_of(name) == "base":
                param.requires_grad_(False)
            elif param.is_floating_point():
                param.requires_grad_(True)

    def parameters_of(self, methods) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if self.method_of(n) in methods]
