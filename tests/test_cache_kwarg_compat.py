"""The KV cache goes to the model under the name its forward takes: `cache` from transformers 5.24
on (where `past_key_values` is deprecated, warns, and goes away in 5.40), `past_key_values` before
and in models whose own code still uses it. Generation and the adapter wrapper must neither warn
nor change a single token."""

from __future__ import annotations

import contextlib
import copy
import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from posttrain.config import AdapterConfig  # noqa: E402
from posttrain.models.adapters import AdaptedModel, apply_adapters  # noqa: E402
from posttrain.models.adapters.model import cache_argument, output_cache  # noqa: E402
from posttrain.models.loading import load_model, load_tokenizer  # noqa: E402
from posttrain.models.presets import preset_path  # noqa: E402
from posttrain.rollout.generate import generate, generate_token_ids  # noqa: E402
from posttrain.rollout.sampling import SamplingSettings  # noqa: E402

PROMPTS = ["Reverse: q m t x y z w", "Copy: a b", "Hello there"]
NEW_TOKENS = 8
GREEDY = SamplingSettings(max_new_tokens=NEW_TOKENS, temperature=0.0)
DEPRECATED = ("past_key_values", "cache_params")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(preset_path("tiny"))


def _plain():
    return load_model(preset_path("tiny")).eval()


def _adapted(method: str, seed: int = 1):
    """Adapters on the tiny preset with every trained tensor nudged, so they change the output."""
    model = apply_adapters(load_model(preset_path("tiny")), AdapterConfig(method=[method]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


MODELS = {"plain": _plain, "lora": lambda: _adapted("lora"), "prefix": lambda: _adapted("prefix"),
          "prompt": lambda: _adapted("prompt")}


@contextlib.contextmanager
def deprecation_messages():
    """Every cache-name deprecation message transformers gives inside the block: FutureWarnings from
    `deprecate_kwarg` on the forward and `logger.warning_once` from the outputs' old attribute. The
    once-cache is cleared first and the transformers logger let through at WARNING, so a message an
    earlier test already triggered (or a quieter verbosity) cannot hide one here."""
    from transformers.utils import logging as hf_logging

    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logger = logging.getLogger("transformers")
    handler, level = Collect(level=logging.DEBUG), logger.level
    hf_logging.warning_once.cache_clear()
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        hf_logging.warning_once.cache_clear()


def _about_cache_names(messages: list[str]) -> list[str]:
    return [m for m in messages if any(name in m for name in DEPRECATED)]


def _greedy_without_cache(model, prompt_ids: list[int], steps: int) -> list[int]:
    """Greedy decoding the slow way: the whole sequence forwarded again every step, no KV cache."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def _prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]


# --------------------------------------------------------------------------- no deprecation warning

@pytest.mark.parametrize("kind", ["plain", "lora", "prefix"])
def test_generation_gives_no_cache_name_deprecation_warning(kind, tokenizer):
    model = MODELS[kind]()
    with deprecation_messages() as messages:
        texts = generate(model, tokenizer, PROMPTS, GREEDY, batch_size=2)
    assert len(texts) == len(PROMPTS)
    assert _about_cache_names(messages) == []


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_adapted_training_forwards_give_no_cache_name_deprecation_warning(kind, tokenizer):
    """The wrapper's own forward and final_hidden (trainer, chunked loss) pass the cache slot too."""
    model = MODELS[kind]()
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    with deprecation_messages() as messages, torch.no_grad():
        model(**batch, use_cache=False)
        model.final_hidden(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert _about_cache_names(messages) == []


def test_the_capture_sees_the_deprecated_name_when_it_is_used(tokenizer):
    """The check above is not vacuous: on a transformers that renamed the argument, passing and
    reading `past_key_values` is reported by the same capture."""
    model = _plain()
    if cache_argument(model) != "cache":
        pytest.skip("this transformers still takes past_key_values")
    ids = torch.tensor([_prompt_ids(tokenizer)[1]])
    with deprecation_messages() as messages, torch.no_grad():
        out = model(input_ids=ids, use_cache=True)
        model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True)
    assert len(_about_cache_names(messages)) >= 2  # the argument's FutureWarning and the attribute's log line


# --------------------------------------------------------------------------- same tokens as without a cache

@pytest.mark.parametrize("kind", ["plain", "lora", "prefix", "prompt"])
def test_greedy_completions_equal_decoding_without_the_cache(kind, tokenizer):
    model = MODELS[kind]()
    prompt_ids = _prompt_ids(tokenizer)
    expected = [_greedy_without_cache(model, ids, NEW_TOKENS) for ids in prompt_ids]
    batched = generate_token_ids(model, prompt_ids, GREEDY, pad_token_id=0, eos_token_ids=set(), batch_size=3)
    alone = [generate_token_ids(model, [ids], GREEDY, pad_token_id=0, eos_token_ids=set(), batch_size=1)[0]
             for ids in prompt_ids]
    assert alone == expected
    assert batched == expected


# --------------------------------------------------------------------------- models that still say past_key_values

class OldStyleLM(nn.Module):
    """A causal LM as transformers < 5.24 (or remote code) shapes it: the forward takes the cache as
    `past_key_values` only, and the output carries it as `.past_key_values`. It runs the tiny model
    inside, translating to whatever that one takes, and records the length of each cache it was given
    (None: no cache)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config
        self.given: list[int | None] = []

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
        assert "cache" not in kwargs, "the cache came under a name this forward does not take"
        self.given.append(None if past_key_values is None else past_key_values.get_seq_length())
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                         logits_to_keep=logits_to_keep, **{cache_argument(self.inner): past_key_values}, **kwargs)
        return SimpleNamespace(logits=out.logits, past_key_values=output_cache(out))

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()


def test_an_old_style_model_gets_and_returns_the_cache_as_past_key_values(tokenizer):
    model = _plain()
    old = OldStyleLM(model).eval()
    assert cache_argument(old) == "past_key_values"
    prompt_ids = _prompt_ids(tokenizer)
    expected = generate_token_ids(model, prompt_ids, GREEDY, pad_token_id=0, eos_token_ids=set(), batch_size=3)
    got = generate_token_ids(old, prompt_ids, GREEDY, pad_token_id=0, eos_token_ids=set(), batch_size=3)
    assert got == expected
    width = max(len(ids) for ids in prompt_ids)  # prefill without a cache, then one token more each step
    assert old.given == [None] + [width + step for step in range(NEW_TOKENS - 1)]


@pytest.mark.parametrize("kind", ["lora", "prefix"])
def test_the_adapter_wrapper_passes_past_key_values_to_an_old_style_model(kind, tokenizer):
    """Generation hands the wrapper `cache`; the wrapper hands an old-style model `past_key_values`
    (for prefix tuning, the virtual prompt's cache too)."""
    adapted = MODELS[kind]()
    old = OldStyleLM(adapted.lm).eval()
    wrapped = AdaptedModel(old, adapted.methods, virtual_peft=adapted.virtual_peft)
    assert cache_argument(wrapped) == "cache" and wrapped._cache_name == "past_key_values"
    prompt_ids = _prompt_ids(tokenizer)
    expected = generate_token_ids(adapted, prompt_ids, GREEDY, pad_token_id=0, eos_token_ids=set(), batch_size=3)
    got = generate_token_ids(wrapped, prompt_ids, GREEDY, pad_token_id=0, eos_token_ids=set(), batch_size=3)
    assert got == expected
    n = adapted.num_virtual_tokens  # prefix: prefill already gets the virtual tokens' keys and values
    width = max(len(ids) for ids in prompt_ids)
    assert old.given == [n if kind == "prefix" else None] + [n + width + step for step in range(NEW_TOKENS - 1)]


# --------------------------------------------------------------------------- the name, both names, wrappers

def test_the_wrapper_takes_the_cache_under_either_name_and_not_both(tokenizer):
    model = _adapted("prefix")
    ids = torch.tensor([_prompt_ids(tokenizer)[0]])
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        step = torch.tensor([[int(first.logits[0, -1].argmax())]])
        old_name = model(input_ids=step, past_key_values=_copy(output_cache(first)), use_cache=True).logits
        new_name = model(input_ids=step, cache=_copy(output_cache(first)), use_cache=True).logits
        positional = model(step, None, None, _copy(output_cache(first)), use_cache=True).logits
        assert torch.equal(old_name, new_name) and torch.equal(new_name, positional)
        with pytest.raises(ValueError, match="not both"):
            model(input_ids=step, cache=output_cache(first), past_key_values=output_cache(first), use_cache=True)


def _copy(cache):
    return copy.deepcopy(cache)  # the forward extends the cache it is given


def test_the_name_is_read_through_wrappers_whose_forward_takes_only_kwargs():
    class Takes(nn.Module):
        def forward(self, input_ids=None, **kwargs):
            return kwargs

    class New(nn.Module):
        def forward(self, input_ids=None, cache=None, **kwargs):
            return cache

    class Wrapper(nn.Module):  # like DDP: forward(*inputs, **kwargs), the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *inputs, **kwargs):
            return self.module(*inputs, **kwargs)

    class Old(nn.Module):
        def forward(self, input_ids=None, past_key_values=None):
            return past_key_values

    assert cache_argument(New()) == "cache"
    assert cache_argument(Old()) == "past_key_values"
    assert cache_argument(Wrapper(New())) == "cache"
    assert cache_argument(Wrapper(Old())) == "past_key_values"
    assert cache_argument(Takes()) == "past_key_values"  # nothing to go by: the name every version takes
    assert cache_argument(_plain()) in ("cache", "past_key_values")


def test_output_cache_reads_new_and_old_outputs_without_a_warning():
    from transformers.modeling_outputs import CausalLMOutputWithPast

    marker = object()
    field = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
    with deprecation_messages() as messages:
        assert output_cache(SimpleNamespace(logits=None, past_key_values=marker)) is marker
        assert output_cache(SimpleNamespace(logits=None, cache=marker)) is marker
        assert output_cache(CausalLMOutputWithPast(logits=torch.zeros(1), **{field: marker})) is marker
    assert _about_cache_names(messages) == []
