"""Rollout engines: what samples the completions online RL learns from.

    TransformersEngine  the policy itself through `generate_token_ids` (batched, left-padded,
                        KV cache); any device; nothing to sync
    VLLMEngine          a vLLM engine inside the training process, on the same CUDA GPU, built
                        once from the policy's starting checkpoint; `sync(policy)` copies the
                        policy's current weights into it in place
    build_engine        the one `rollout.engine` asks for

Both keep one contract (`RolloutEngine.generate`): the completion token ids of each prompt,
without padding, ending with the EOS id when the model ended, at the token where a stop
string was completed when one was, and at most `settings.max_new_tokens` long. The caller
decodes them and cuts the text before the stop string (`generate.truncate_at_stop`). Both
sample completion i of a call seeded with `settings.seed` with seed `request_seed(seed, i)`, so a
completion does not depend on how the rows are batched (`rollout.batch_size`).

vLLM API relied on (documented in vLLM's `LLM` class, `SamplingParams` and its
reproducibility notes): `LLM(model, tokenizer, dtype, gpu_memory_utilization, enforce_eager,
max_model_len, seed, trust_remote_code)`, `LLM.generate(list of TokensPrompt, list of
SamplingParams, use_tqdm=False)` returning outputs in prompt order, `CompletionOutput.token_ids
/ .stop_reason` (the stop string, when one ended the output), `LLM.apply_model(fn)` (fn runs on
the model inside each worker), the model's `load_weights(iterable of (checkpoint name,
tensor))`, `LLM.reset_prefix_cache()`, and `VLLM_ENABLE_V1_MULTIPROCESSING=0`, which keeps
vLLM's engine core in this process.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from typing import Protocol

import torch

from posttrain.errors import UserError
from posttrain.rollout.generate import generate_token_ids
from posttrain.rollout.sampling import SamplingSettings, request_seed

StopCheck = Callable[[list[int]], bool]  # `generate.StopCheck`: its `token_ids` and `special_text` reach vLLM


class RolloutEngine(Protocol):
    """Samples completions for online RL."""

    generation_config: object  # the policy's: its EOS ids end completions too (`generate.eos_token_ids`)
    is_policy: bool  # True when it samples with the policy's own weights (sync has nothing to do)

    def generate(self, prompt_ids: list[list[int]], settings: SamplingSettings, *, eos_token_ids: set[int],
                 pad_token_id: int, stop_check: StopCheck | None = None) -> list[list[int]]:
        """Completion ids per prompt, in prompt order (the contract in the module docstring)."""

    def sync(self, model: torch.nn.Module) -> None:
        """Make the engine sample from `model`'s current weights (after an optimizer step)."""


class TransformersEngine:
    """The policy samples its own completions: `generate_token_ids` under the run's autocast."""

    is_policy = True

    def __init__(self, model: torch.nn.Module, batch_size: int = 64, autocast=contextlib.nullcontext):
        self.model, self.batch_size, self.autocast = model, batch_size, autocast

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        with self.autocast():
            return generate_token_ids(self.model, prompt_ids, settings, pad_token_id=pad_token_id,
                                      eos_token_ids=eos_token_ids, batch_size=self.batch_size, stop_check=stop_check)

    def sync(self, model) -> None:
        pass  # it generates with the policy's weights, which the optimizer updates in place


# --------------------------------------------------------------------------- vLLM


VLLM_MISSING = ("rollout.engine=vllm needs the vllm package: pip install 'posttrain[vllm]' on a Linux machine with "
                "a CUDA GPU, or use rollout.engine=transformers")
NO_CUDA = "rollout.engine=vllm needs a CUDA GPU and torch sees none on this machine; use rollout.engine=transformers"


def cuda_available() -> bool:
    return torch.cuda.is_available()


def vllm_installed() -> bool:
    """Whether `import vllm` can find the package (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _import_vllm():
    try:
        import vllm
        from vllm.inputs import TokensPrompt
    except Exception as exc:  # not installed, or a build that does not match this torch / CUDA
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{VLLM_MISSING} (import vllm failed: {detail})") from None
    return vllm, TokensPrompt


class VLLMEngine:
    """A vLLM engine beside the policy on one CUDA GPU.

    Built once from the checkpoint the policy started from (`model_dir`: for an adapter-trained
    policy, its base model); `sync(policy)` then pushes the policy's current weights, with
    LoRA / DoRA / IA3 merged in (`models.adapters.merged_weights`, which leaves the training
    weights as they were), straight into vLLM's model through `LLM.apply_model`, and drops vLLM's
    prefix cache, whose KV blocks the old weights computed. For that the engine core must live
    in this process, so `VLLM_ENABLE_V1_MULTIPROCESSING` is set to 0.

    Requests: one per completion (n = 1), each with its own seed (`request_seed`, the rule the
    transformers engine seeds its rows with), so a rollout repeats whatever way vLLM batches it,
    up to vLLM's batch-dependent numerics; n = G would save little, as vLLM's prefix caching
    lets the G copies of a prompt share its full KV blocks.
    """

    is_policy = False

    def __init__(self, model_dir: str, policy: torch.nn.Module, *, gpu_memory_utilization: float = 0.3,
                 dtype: str = "auto", enforce_eager: bool = False, max_model_len: int | None = None, seed: int = 0,
                 trust_remote_code: bool = False):
        vllm, self._tokens_prompt = _import_vllm()
        if not cuda_available():
            raise UserError(NO_CUDA)
        self._sampling_params = vllm.SamplingParams
        self.generation_config = getattr(unwrap(policy), "generation_config", None)
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # sync hands tensors to the model in this process
        with _random_state_kept():  # vLLM seeds the global generators; training keeps its own stream
            self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype=dtype,
                                gpu_memory_utilization=gpu_memory_utilization, enforce_eager=enforce_eager,
                                max_model_len=max_model_len, seed=seed, trust_remote_code=trust_remote_code)

    def generate(self, prompt_ids, settings, *, eos_token_ids, pad_token_id, stop_check=None):
        del pad_token_id  # vLLM does not pad
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty after tokenization; give it at least one token")
        if settings.max_new_tokens == 0 or not prompt_ids:
            return [[] for _ in prompt_ids]  # vLLM needs max_tokens >= 1
        prompts = [self._tokens_prompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        params = [self._sampling_params(**vllm_sampling_kwargs(settings, eos_token_ids, stop_check, i))
                  for i in range(len(prompt_ids))]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [_completion_ids(out.outputs[0], stop_check) for out in outputs]

    def sync(self, model) -> None:
        from posttrain.models.adapters import merged_weights

        weights = merged_weights(unwrap(model))  # a generator: vLLM copies one tensor at a time
        self.llm.apply_model(lambda vllm_model: vllm_model.load_weights(weights))
        self.llm.reset_prefix_cache()


def vllm_sampling_kwargs(settings: SamplingSettings, eos_token_ids: set[int], stop_check: StopCheck | None,
                         index: int) -> dict:
    """posttrain's sampling settings as the keyword arguments of vLLM's SamplingParams for request
    `index`, ending where the transformers engine ends a row: at the EOS ids and at the stop check's
    ids (`generate.StopCheck.token_ids`: a stop string that is one special token), and at the stop
    strings, looked for in text that keeps special tokens when one starts with a special token
    (`StopCheck.special_text`; the caller decodes the ids itself)."""
    stop_ids = set(eos_token_ids) | set(getattr(stop_check, "token_ids", ()))
    return dict(
        n=1, max_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
        top_k=settings.top_k if settings.top_k > 0 else -1,  # -1 means off in every vLLM version (0 only in newer)
        min_p=settings.min_p, repetition_penalty=settings.repetition_penalty,
        frequency_penalty=settings.frequency_penalty, presence_penalty=settings.presence_penalty,
        stop=[s for s in settings.stop if s] or None, stop_token_ids=sorted(stop_ids),
        skip_special_tokens=not getattr(stop_check, "special_text", False),
        seed=None if settings.seed is None else request_seed(settings.seed, index))


def build_engine(cfg, model: torch.nn.Module, accelerator, log):
    """The configured rollout engine: the policy itself (transformers), or a vLLM engine built
    from the checkpoint the policy started from (for adapters: the base model)."""
    r = cfg.rollout
    if r.engine == "transformers":
        return TransformersEngine(model, r.batch_size, accelerator.autocast)
    from posttrain.models.loading import resolve_model_path

    if accelerator.num_processes > 1:
        raise UserError(f"rollout.engine=vllm runs one vLLM engine inside a single training process (one GPU); this "
                        f"run has {accelerator.num_processes} processes. Use rollout.engine=transformers for them")
    model_dir = resolve_model_path(cfg.model.path)
    log(f"rollout engine: vLLM from {model_dir} (gpu_memory_utilization {r.vllm_gpu_memory_utilization}, "
        f"dtype {r.vllm_dtype}); the policy's weights are pushed into it before each rollout")
    return VLLMEngine(str(model_dir), model, gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                      dtype=r.vllm_dtype, enforce_eager=r.vllm_enforce_eager,
                      max_model_len=cfg.data.max_prompt_length + r.max_new_tokens, seed=cfg.train.seed,
                      trust_remote_code=cfg.model.trust_remote_code)


def _completion_ids(output, stop_check: StopCheck | None) -> list[int]:
    """vLLM's token ids, cut where `stop_check` first fires when a stop string ended the output.

    vLLM finds stop strings in its detokenized text and keeps the token ids as generated; a
    step that emits several tokens (speculative decoding) can leave some after the stop. The
    transformers engine ends at the first token whose tail text holds the stop string, so the
    same rule is applied here, scanning back from the end (usually one check)."""
    ids = list(output.token_ids)
    if stop_check is None or not isinstance(getattr(output, "stop_reason", None), str) or not stop_check(ids):
        return ids
    end = len(ids)
    while end > 1 and stop_check(ids[: end - 1]):
        end -= 1
    return ids[:end]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _random_state_kept():
    """Restore Python's, NumPy's and torch's global random state (CPU and CUDA) afterwards."""
    python_state = random.getstate()
    try:
        import numpy

        numpy_state = numpy.random.get_state()
    except ImportError:
        numpy = numpy_state = None
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            if numpy is not None:
                numpy.random.set_state(numpy_state)
