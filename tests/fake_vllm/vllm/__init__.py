"""A stand-in for the `vllm` package, for tests on machines without a GPU or vLLM.

Only the parts posttrain's `VLLMEngine` uses, with the behaviour vLLM documents for them:
`LLM(model, **engine args)`, `LLM.generate(prompts, sampling params, use_tqdm)` returning one
`RequestOutput` per prompt in prompt order, `LLM.apply_model(fn)`, `LLM.reset_prefix_cache()`,
`SamplingParams`, and a model whose `load_weights` takes (checkpoint name, tensor) pairs and
rejects names the model does not have (KeyError), as vLLM's models do.

The "engine" is the transformers model in the directory it is given, on the CPU, sampling one
token at a time (no cache), seeded per request. Stopping follows vLLM: a stop token id or the
EOS ends the output and stays in its token ids; a stop string ends it once the detokenized text
holds it, the text is cut before it, the token ids are kept, and `stop_reason` is the string;
otherwise it ends after max_tokens ("length"). Tests may script the tokens instead
(`LLM.script`) and let extra tokens follow a stop string (`LLM.overshoot`), as a step that
emits several tokens can. Everything it is given is recorded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

_SAMPLING_EPS = 1e-5


class SamplingParams:
    """The fields VLLMEngine sets, checked as vLLM checks them (top_k: -1 = off, or >= 1; the
    older rule, which newer versions still accept)."""

    def __init__(self, *, n=1, temperature=1.0, top_p=1.0, top_k=-1, min_p=0.0, repetition_penalty=1.0,
                 frequency_penalty=0.0, presence_penalty=0.0, max_tokens=16, stop=None, stop_token_ids=None, seed=None,
                 skip_special_tokens=True, ignore_eos=False):
        if n < 1 or max_tokens is None or max_tokens < 1:
            raise ValueError(f"n and max_tokens must be >= 1, got {n}, {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError(f"bad temperature {temperature} or top_p {top_p}")
        if top_k != -1 and top_k < 1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {top_k}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {min_p}")
        self.n, self.temperature, self.top_p, self.top_k, self.min_p = n, temperature, top_p, top_k, min_p
        self.repetition_penalty, self.frequency_penalty = repetition_penalty, frequency_penalty
        self.presence_penalty, self.max_tokens, self.seed = presence_penalty, max_tokens, seed
        self.stop = [stop] if isinstance(stop, str) else list(stop or [])
        self.stop_token_ids = list(stop_token_ids or [])
        self.skip_special_tokens, self.ignore_eos = skip_special_tokens, ignore_eos


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    stop_reason: int | str | None = None  # the stop token id or stop string; None for EOS or length


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = True


@dataclass
class FakeModel:
    """What `apply_model` hands its function: the weights, loadable by checkpoint name."""

    hf: torch.nn.Module
    loads: list[dict[str, torch.Tensor]] = field(default_factory=list)  # a copy of what each load_weights got

    def load_weights(self, weights) -> set[str]:
        params = self.hf.state_dict(keep_vars=True)  # the checkpoint's names (tied weights under both)
        received = {}
        with torch.no_grad():
            for name, tensor in weights:
                param = params[name]  # KeyError for a name the model does not have, as in vLLM
                if param.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                param.copy_(tensor)
                received[name] = tensor.detach().clone()
        self.loads.append(received)
        return set(received)


class LLM:
    created: list["LLM"] = []  # every engine built, in order
    script = None  # tests: fn(prompt_token_ids, params, request index) -> token ids to emit, instead of the model
    overshoot = 0  # tests: tokens the output keeps after the one that completed a stop string

    def __init__(self, model: str, **kwargs):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model_path, self.kwargs = model, kwargs
        self.tokenizer = AutoTokenizer.from_pretrained(kwargs.get("tokenizer") or model)
        self.model = FakeModel(AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval())
        self.events: list[str] = []  # apply_model, load_weights, reset_prefix_cache, generate, in call order
        self.requests: list[tuple[dict, SamplingParams]] = []
        self.weights_at_generate: list[dict[str, torch.Tensor]] = []
        LLM.created.append(self)

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        self.events.append("generate")
        self.weights_at_generate.append({k: v.detach().clone() for k, v in self.model.hf.state_dict().items()})
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError("The lengths of prompts and params must be the same.")
        outputs = []
        for index, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(prompt, dict) or "prompt_token_ids" not in prompt:
                raise TypeError(f"the fake takes token prompts only, got {prompt!r}")
            self.requests.append((prompt, p))
            ids = list(prompt["prompt_token_ids"])
            completion = self._complete(ids, p, index)
            outputs.append(RequestOutput(str(len(self.requests) - 1), ids, [completion]))
        return outputs

    def apply_model(self, func):
        if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") != "0":
            raise RuntimeError("fake vLLM: with the engine core in another process, apply_model would have to "
                               "pickle the function and its tensors; set VLLM_ENABLE_V1_MULTIPROCESSING=0")
        self.events.append("apply_model")
        before = len(self.model.loads)
        result = [func(self.model)]
        self.events.extend(["load_weights"] * (len(self.model.loads) - before))
        return result

    def reset_prefix_cache(self) -> bool:
        self.events.append("reset_prefix_cache")
        return True

    # ------------------------------------------------------------------ the "engine"

    def _tokens(self, prompt_ids, params, index):
        """The token stream of one request: scripted, or sampled from the model with its seed."""
        if LLM.script is not None:
            yield from LLM.script(prompt_ids, params, index)
            return
        generator = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        ids = list(prompt_ids)
        while True:
            with torch.no_grad():
                logits = self.model.hf(input_ids=torch.tensor([ids])).logits[0, -1].float()
            if params.temperature < _SAMPLING_EPS:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / params.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            ids.append(token)
            yield token

    def _complete(self, prompt_ids, params, index) -> CompletionOutput:
        out: list[int] = []
        stream = self._tokens(prompt_ids, params, index)
        eos = self.tokenizer.eos_token_id
        for token in stream:
            out.append(token)
            if token in params.stop_token_ids or (token == eos and not params.ignore_eos):
                text = self.tokenizer.decode(out, skip_special_tokens=params.skip_special_tokens)
                return CompletionOutput(0, text, out, "stop", None if token == eos else token)
            text = self.tokenizer.decode(out, skip_special_tokens=params.skip_special_tokens)
            hits = [(text.find(s), s) for s in params.stop if s in text]
            if hits:
                at, stop = min(hits)
                out.extend(next(stream) for _ in range(LLM.overshoot))
                return CompletionOutput(0, text[:at], out, "stop", stop)
            if len(out) >= params.max_tokens:
                return CompletionOutput(0, text, out, "length", None)
        return CompletionOutput(0, self.tokenizer.decode(out), out, "length", None)  # a script that ran out
