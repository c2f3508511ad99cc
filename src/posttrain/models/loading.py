"""Load and save causal language models and tokenizers from local directories.

A model path is either a preset name (`tiny`, `tiny-2l`; see `presets.py`) or a local
Hugging Face model directory. Write `./tiny` for a local directory that happens to be
called like a preset. Weights are read from safetensors only: posttrain never unpickles
`.bin` files, which can run arbitrary code.

The trainer computes logits itself from the final hidden state (so a chunked loss never
builds the full [B, T, V] logits tensor): `final_hidden_and_head` returns that hidden state
and the output projection. It is only valid when the model's logits are exactly
`hidden @ W.T (+ b)`; `supports_hidden_path` says whether that holds.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from posttrain.errors import ConfigError, UserError
from posttrain.models.presets import is_preset, preset_path

if TYPE_CHECKING:
    import torch

_DTYPES = ("float32", "bfloat16", "float16")

# Config fields whose presence (non-empty) means logits != lm_head(hidden):
# Gemma 2/3 soft-cap, Cohere multiplies by logit_scale, Granite divides by logits_scaling,
# Falcon-H1 multiplies by lm_head_multiplier, RecurrentGemma caps with logits_soft_cap.
_LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_logits_scale",
                           "lm_head_multiplier", "logits_soft_cap")


class HiddenPathUnsupported(RuntimeError):
    """The model's logits are not a plain linear map of its final hidden state."""


# --------------------------------------------------------------------------- paths


def resolve_model_path(path: str | os.PathLike, setting: str = "model.path") -> Path:
    """A preset name → its built directory; a directory → itself (absolute), after checking it is
    usable; a run directory (no config.json of its own, a model in final/) → its final/, as
    generate and merge take it. An adapter directory is refused with how to make a model of it
    (and which setting to point at the result: `setting`), a training checkpoint with its run's final/."""
    if is_preset(path):
        return preset_path(str(path))
    directory = Path(path).expanduser()
    if not directory.exists():
        raise UserError(f"model path {directory} does not exist; give a local Hugging Face model directory or a preset name (tiny, tiny-2l)")
    if not directory.is_dir():
        raise UserError(f"model path {directory} is a file; give the directory that holds config.json and the weights")
    if (directory / "config.json").is_file():
        return directory.resolve()  # absolute: it is recorded in saved adapters and configs
    final = directory / "final"
    if _is_adapter_dir(directory):
        raise UserError(_adapter_message(directory, setting=setting))
    from posttrain.train.checkpoint import is_checkpoint

    if is_checkpoint(directory):
        raise UserError(checkpoint_message(directory))
    if final.is_dir():
        if (final / "config.json").is_file():
            return final.resolve()  # a run directory: its final model
        if _is_adapter_dir(final):
            raise UserError(_adapter_message(final, run=directory, setting=setting))
    raise UserError(f"{directory} has no config.json: it is not a Hugging Face model directory (the one "
                    "save_pretrained writes), nor a run directory with a model in final/")


def run_final_model(path: str | os.PathLike) -> Path | None:
    """RUN/final when `path` is a run directory whose final/ holds a model (the model
    resolve_model_path takes for it); None for anything else."""
    if is_preset(path):
        return None
    directory = Path(path).expanduser()
    final = directory / "final"
    if directory.is_dir() and not (directory / "config.json").is_file() and not _is_adapter_dir(directory) \
            and (final / "config.json").is_file():
        return final
    return None


def model_identity(path: str | os.PathLike) -> Any:
    """Which model is at `path`: the one rule a resume checks a local model by (training's
    fingerprint, the feedback jobs' and the red team's recorded settings). A preset: its built
    directory's name (built from code, the same at every build: its version and definition say
    what it is). A directory (a run directory: its final/, as the loaders take it): a digest of
    the names, sizes and contents of the files a loader reads, those at its top (an adapter's also
    in the subdirectories its posttrain_adapters.json names; a run or an eval writing inside the
    directory changes nothing) — contents by `files.file_identity` (a file over 64 MiB is
    sampled, 16 MiB read) —, so a copy or a touch is the same model and one retrained in place is
    not. An adapter whose config names a local base model (a preset, or a directory there):
    [its own, the base's], so a base retrained in place is another model too. None when nothing
    is there."""
    from posttrain.files import file_identity, short_digest

    if is_preset(path):
        return preset_path(str(path)).name
    directory = _loaded_directory(path)
    if not directory.is_dir():
        return None
    files = [f for part in _model_parts(directory) for f in sorted(part.iterdir()) if f.is_file()]
    own = short_digest([[str(f.relative_to(directory)), *(file_identity(str(f)) or [None])] for f in files])
    base = _adapter_base(directory)
    base_identity = model_identity(base) if base is not None and Path(base).expanduser().resolve() != \
        directory.resolve() else None
    return own if base_identity is None else [own, base_identity]


def identified_earlier(recorded: Any, path: str | os.PathLike) -> bool:
    """True when `recorded` is what an earlier rule recorded for the model now at `path` and still
    says of it: a training checkpoint's digest of its top-level files' names, sizes and modification
    times (`model_files`), a feedback job's of every file under it, or an adapter's own files
    before its base counted. A resume takes it as the same model (nothing newer was recorded to
    compare)."""
    from posttrain.files import file_identity, short_digest

    if is_preset(path) or recorded is None:
        return False
    now = model_identity(path)
    if isinstance(now, list) and recorded == now[0]:
        return True
    if recorded == file_identity(str(_loaded_directory(path))):
        return True
    try:
        return recorded == short_digest(model_files(str(path)))
    except (UserError, OSError):
        return False


def _loaded_directory(path: str | os.PathLike) -> Path:
    """The directory a loader reads for `path` (not a preset): a run directory's final/, else itself."""
    directory = Path(path).expanduser()
    final = directory / "final"
    return final if final.is_dir() and not (directory / "config.json").is_file() else directory


def _model_parts(directory: Path) -> list[Path]:
    """The directories whose files a loader reads: `directory`, and an adapter's component
    subdirectories its posttrain_adapters.json names."""
    from posttrain.models.adapters.io import MANIFEST

    try:
        components = json.loads((directory / MANIFEST).read_text(encoding="utf-8")).get("components", {})
        subs = [directory / sub for sub in components.values() if isinstance(sub, str) and sub not in (".", "")]
    except (OSError, ValueError, AttributeError):
        subs = []
    return [directory, *(sub for sub in subs if sub.is_dir())]


def _adapter_base(directory: Path) -> str | None:
    """The base model an adapter directory's config names (`posttrain_adapters.json`, else
    adapter_config.json), None for anything else. A relative base is as the loader reads it (from
    the working directory)."""
    from posttrain.models.adapters.io import MANIFEST

    for name in (MANIFEST, "adapter_config.json"):
        try:
            base = json.loads((directory / name).read_text(encoding="utf-8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        return base if isinstance(base, str) and base else None
    return None


def model_files(path: str) -> list:
    """What is at model.path (a directory, or a run directory's final/): each file's name, size
    and modification time. The reference log-prob cache keys on it; training checkpoints kept a
    digest of it before `model_identity` (`identified_earlier`)."""
    directory = resolve_model_path(path)
    return [[f.name, stat.st_size, stat.st_mtime_ns] for f in sorted(directory.iterdir())
            if f.is_file() and (stat := f.stat())]


def _is_adapter_dir(directory: Path) -> bool:
    from posttrain.models.adapters.io import MANIFEST

    return (directory / MANIFEST).is_file() or (directory / "adapter_config.json").is_file()


def checkpoint_message(checkpoint: Path) -> str:
    """What a training checkpoint (`train.checkpoint.is_checkpoint`) given as a model is, naming its
    run's final/ to use instead."""
    absolute = Path(os.path.abspath(checkpoint))  # RUN/checkpoints/step-N, also when given as "."
    if absolute.parent.name != "checkpoints":
        return (f"{checkpoint} is a training checkpoint (trainable weights, optimizer and loop state), not a model; "
                "start from its run's final/, or rerun that run's command to resume it")
    run = absolute.parent.parent
    return (f"{checkpoint} is a training checkpoint of {run}; start from {run / 'final'}, or rerun {run}'s command "
            "to resume it")


def unfinished_run_message(directory: str | os.PathLike) -> str | None:
    """What a run directory without final/ is (a run stopped before it saved its model: it has the
    config.yaml or checkpoints/ a run writes first, and no config.json of a model), and what
    rerunning its command does; None for any other path."""
    directory = Path(directory)
    if (directory / "final").exists() or (directory / "config.json").is_file() or not (
            (directory / "config.yaml").is_file() or (directory / "checkpoints").is_dir()):
        return None
    from posttrain.train.checkpoint import latest_complete

    newest = latest_complete(directory / "checkpoints")
    rerun = f"resumes it from {newest.name}" if newest is not None else "trains it again (it saved no checkpoint)"
    return (f"{directory} is a run directory without final/: the run stopped before it saved its model; "
            f"rerunning its command {rerun} and writes {directory / 'final'}")


def _adapter_message(adapter: Path, run: Path | None = None, setting: str = "model.path") -> str:
    where = f"{run} is a run directory whose final/ is an adapter" if run is not None else f"{adapter} is an adapter directory"
    advice = adapter_advice(adapter, setting, run)
    return f"{where} (adapter weights, not a model): training starts from a full model; {advice}"


def adapter_advice(adapter: Path, setting: str, given: Path | None = None) -> str:
    """How to start from an adapter directory given where a model to start from is asked for
    (`setting`): fold it into its base with `posttrain merge` (named by `given`, the run directory
    the user wrote, or the adapter) and set `setting` to the result; or, when it holds adapters no
    merge folds in (prompt, prefix, bottleneck), say so and name them, not send them to a merge
    that refuses them."""
    from posttrain.models.adapters.io import adapter_kinds, cannot_start_from, unmergeable

    kinds = adapter_kinds(adapter)
    if unmergeable(kinds):
        return f"it holds {cannot_start_from(kinds)}"
    return (f"fold the adapter into its base with `posttrain merge {given or adapter} OUT_DIR` (LoRA, DoRA, IA3) "
            f"and set {setting}=OUT_DIR")


def _check_weights(directory: Path) -> None:
    index = directory / "model.safetensors.index.json"
    if index.is_file():  # every shard it names must be a safetensors file (transformers would unpickle a .bin)
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise UserError(f"{index} is not a safetensors index (no weight_map)") from None
        pickled = sorted(str(s) for s in shards if not str(s).endswith(".safetensors"))
        if pickled:
            raise UserError(f"{index} names {', '.join(pickled[:3])}: posttrain loads safetensors only and does not "
                            "unpickle; convert the shards with save_pretrained in a trusted environment")
        return
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")) or any(directory.glob("*.pth")):
        raise UserError(
            f"{directory} has only pickle weights (.bin/.pt); posttrain loads safetensors only and does not unpickle. "
            "Convert once in a trusted environment: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir)"
        )
    if (directory / "adapter_config.json").is_file():
        raise UserError(f"{directory} is a PEFT adapter, not a full model; load its base model and the adapter with peft.PeftModel.from_pretrained")
    raise UserError(f"{directory} has no model weights (*.safetensors); save the model with save_pretrained into that directory")


def check_adapter_weights(directory: Path) -> None:
    """A peft adapter directory must hold adapter_model.safetensors: peft would unpickle a .bin."""
    directory = Path(directory)
    if (directory / "adapter_config.json").is_file() and not (directory / "adapter_model.safetensors").is_file():
        found = " (it has adapter_model.bin, a pickle, which posttrain does not load)" if (
            directory / "adapter_model.bin").is_file() else ""
        raise UserError(f"{directory} has no adapter_model.safetensors{found}; save the adapter with "
                        "save_pretrained(..., safe_serialization=True)")


def load_failure(exc: BaseException, what: str, directory: Path, hint: str = "") -> UserError | None:
    """The one-line error for a from_pretrained failure caused by the user's files — unreadable or
    truncated weights, a config.json that does not match them — or None for anything else."""
    from safetensors import SafetensorError

    message = str(exc).strip()
    first_line = message.splitlines()[0] if message else type(exc).__name__
    if isinstance(exc, SafetensorError):
        return UserError(f"could not load {what} from {directory}: a weights file is truncated or not safetensors "
                         f"({first_line})")
    if isinstance(exc, RuntimeError) and ("ignore_mismatched_sizes" in message or "size mismatch" in message):
        mismatch = next((line.strip() for line in message.splitlines() if "shape" in line.lower()), first_line)
        return UserError(f"could not load {what} from {directory}: config.json does not match the weights ({mismatch})")
    if isinstance(exc, (OSError, ValueError, KeyError)):
        return UserError(f"could not load {what} from {directory}: {first_line}{hint}")
    return None


def _torch_dtype(dtype: Any) -> "torch.dtype":
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"model.dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    return getattr(torch, dtype)


def _model_args(config_or_path: Any, overrides: dict[str, Any]) -> dict[str, Any]:
    """Merge a ModelConfig (or anything with the same attributes), a path, and keyword overrides."""
    from posttrain.config import ModelConfig, section_values

    if isinstance(config_or_path, (str, os.PathLike)):
        config_or_path = ModelConfig(path=str(config_or_path))
    return section_values(ModelConfig, config_or_path, overrides, caller="load_model")


# --------------------------------------------------------------------------- loading


def load_model(config_or_path: Any = None, *, quantization: Any = None, **overrides: Any):
    """Load a causal LM for training.

    config_or_path: a `ModelConfig`, a path / preset name, or None (the `tiny` preset).
    overrides: path, dtype ("float32" | "bfloat16" | "float16" or a torch.dtype),
               trust_remote_code (passed to transformers only when True),
               gradient_checkpointing (also sets use_cache=False),
               lean_activations (`posttrain.models.lean`).
    quantization: a `posttrain.config.QuantizationConfig` loads the weights in 4 bits
               (bitsandbytes NF4/FP4, QLoRA; CUDA only).
    """
    from transformers import AutoModelForCausalLM

    args = _model_args(config_or_path, overrides)
    directory = resolve_model_path(args["path"])
    _check_weights(directory)
    _refuse_reward_model(directory)
    # trust_remote_code always given: left out, transformers would ask on stdin and run the code on a "y"
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(args["dtype"]), "use_safetensors": True,
                              "trust_remote_code": args["trust_remote_code"] is True}
    if quantization is not None:
        kwargs.update(_four_bit(quantization))
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except Exception as exc:
        hint = "" if args["trust_remote_code"] else " (if it ships its own modelling code and you trust it, set model.trust_remote_code=true)"
        error = load_failure(exc, "a causal LM", directory, hint)
        if error is None:
            raise
        raise error from None
    from posttrain.models.lean import lean_activations

    lean_activations(model, args["lean_activations"])
    if args["gradient_checkpointing"]:
        enable_gradient_checkpointing(model)
    return model


def _refuse_reward_model(directory: Path) -> None:
    """A reward model's directory (posttrain rm's final/: a *ForSequenceClassification with a score
    head) loaded as a causal LM would get an untrained or embedding-tied LM head on a backbone
    trained to score, and train or generate from it without a word."""
    try:
        architectures = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return  # from_pretrained says what is wrong with the file
    if architectures and all(str(a).endswith("ForSequenceClassification") for a in architectures):
        raise UserError(reward_model_message(directory, architectures[0]))


def reward_model_message(directory: str | os.PathLike, what: str) -> str:
    """The one line for a reward model given where a policy (a causal LM) is loaded; `what` names
    its kind (a *ForSequenceClassification architecture, or a LoRA reward model's adapter)."""
    return (f"{directory} is a reward model ({what}: a score head, no trained language-model head); a policy "
            "starts from a causal LM, usually the SFT model the reward model was trained from. A reward model goes "
            "where a reward is asked for (reward.models, posttrain score)")


def _four_bit(quantization: Any) -> dict[str, Any]:
    """from_pretrained arguments for a 4-bit base (QLoRA, Dettmers et al. 2023)."""
    import torch
    from transformers import BitsAndBytesConfig

    from posttrain.models.adapters.spec import require_cuda_bitsandbytes

    require_cuda_bitsandbytes("adapter.method=qlora")
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization.quant_type,
                             bnb_4bit_use_double_quant=quantization.double_quant,
                             bnb_4bit_compute_dtype=getattr(torch, quantization.compute_dtype))
    return {"quantization_config": bnb, "device_map": {"": torch.cuda.current_device()}}


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward; the KV cache is useless (and wasteful) while training."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(f"{type(model).__name__} does not support gradient checkpointing; set model.gradient_checkpointing=false")
    checkpoint_kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5 name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)
    if getattr(model.config, "use_cache", False):  # the checkpoint's, written back by `save_model`
        _keep_for_saving(model, model.config, "use_cache", model.config.use_cache, False)
    model.config.use_cache = False


def load_tokenizer(path: str | os.PathLike = "tiny", trust_remote_code: bool = False):
    """Load the tokenizer of a preset or model directory.

    A tokenizer without a pad token gets one (`pad_fallback`): a special token the data never
    carries when it has one, else its eos. A tokenizer with neither raises UserError.
    """
    from transformers import AutoTokenizer

    directory = Path(path).expanduser()
    # A LoRA adapter directory carries the tokenizer but no config.json of a full model; one that
    # plain peft saved carries none, and its recorded base has it.
    has_tokenizer = directory.is_dir() and any((directory / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json"))
    if not has_tokenizer and (directory / "adapter_config.json").is_file():
        adapter_config = json.loads((directory / "adapter_config.json").read_text(encoding="utf-8"))
        base = adapter_config.get("base_model_name_or_path")
        if base:
            return load_tokenizer(base, trust_remote_code)
    if is_preset(path) or not has_tokenizer:
        directory = resolve_model_path(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code is True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not load a tokenizer from {directory}: {first_line}") from None
    if tokenizer.pad_token is None:
        fallback = pad_fallback(tokenizer)
        if fallback is None:
            raise UserError(f"the tokenizer in {directory} has no pad, eos or unk token, nor another special token to "
                            "pad with; add a pad token to tokenizer_config.json")
        tokenizer.pad_token = fallback
    return tokenizer


def pad_fallback(tokenizer) -> str | None:
    """The pad token for a tokenizer that has none: its unk, else a special token that no chat
    template writes (Llama-3's reserved tokens; one named like a pad first), else its eos.

    Padding is masked everywhere in posttrain, so any token would do for training; but a reward
    model saved with pad == eos misleads plain transformers, whose sequence-classification
    pooling scores the last token that is not pad_token_id: the token before a row's final eos
    (Llama-3's <|eot_id|>). A token the data never carries keeps that pooling on the last real
    token. None when the tokenizer has no special token at all."""
    from posttrain.data.templates import CHATML, written_tokens

    taken = {tokenizer.bos_token, tokenizer.eos_token} - {None}
    if tokenizer.unk_token is not None and tokenizer.unk_token not in taken:
        return tokenizer.unk_token
    for template in (getattr(tokenizer, "chat_template", None), CHATML):  # its own, and the fallback
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            taken |= written_tokens(tokenizer, template)
    free = [token.content for _, token in sorted(tokenizer.added_tokens_decoder.items())
            if token.special and token.content not in taken]
    named_pad = [token for token in free if "pad" in token.lower()]
    return (named_pad or free or [tokenizer.eos_token])[0]


# --------------------------------------------------------------------------- hidden-state path


def _causal_lm(model):
    """The transformers *ForCausalLM module inside a plain, PEFT-wrapped or adapted model."""
    from peft import PeftModel

    from posttrain.models.adapters.model import AdaptedModel

    if isinstance(model, AdaptedModel):
        return model.lm  # adapters are injected into it in place
    if isinstance(model, PeftModel):
        return model.get_base_model()  # LoRA layers are injected in place, so this still applies them
    return model


def _plain_head(lm):
    """The output layer as a linear map: an object with `.weight` (V, H) and `.bias`, or None.

    A plain nn.Linear (exact type: a ModulesToSaveWrapper is not one), or a peft LoRA layer on
    it (LoRA targeting lm_head) with plain LoRA adapters and no dropout, whose map is
    W + Σ s·B·A — formed here so the chunked log-probs still never hold whole logits."""
    import torch.nn as nn

    head = lm.get_output_embeddings()
    if type(head) is nn.Linear:
        return head
    return _LoraHead.of(head)


class _LoraHead:
    """W + Σ scaling·B·A of a peft lora.Linear (as its forward computes, without dropout)."""

    def __init__(self, layer):
        self.layer = layer

    @classmethod
    def of(cls, head):
        import torch.nn as nn

        base = getattr(head, "base_layer", None)
        if type(base) is not nn.Linear or not isinstance(getattr(head, "lora_A", None), nn.ModuleDict):
            return None
        from posttrain.models.lean import _plain_lora

        if getattr(head, "merged", False) or getattr(head, "disable_adapters", False):
            return cls(head)  # the base layer's map (merged: the sum is in it)
        if not _plain_lora(head) or any(head.lora_B[name].bias is not None
                                        for name in head.active_adapters if name in head.lora_A):
            return None  # DoRA and other variants, dropout, a LoRA bias: the layer's own forward
        return cls(head)

    @property
    def weight(self):
        layer = self.layer
        weight = layer.base_layer.weight
        if layer.merged or layer.disable_adapters:
            return weight
        for name in layer.active_adapters:
            if name in layer.lora_A:
                update = (layer.lora_B[name].weight @ layer.lora_A[name].weight) * layer.scaling[name]
                weight = weight + update.to(weight.dtype)
        return weight

    @property
    def bias(self):
        return self.layer.base_layer.bias


def _unsupported_reason(model) -> str | None:
    lm = _causal_lm(model)
    for field in _LOGIT_TRANSFORM_FIELDS:
        value = getattr(lm.config, field, None)
        if value not in (None, 0, 1, 1.0, False):
            return f"{type(lm).__name__} transforms its logits ({field}={value})"
    if lm.base_model is lm:
        return f"{type(lm).__name__} has no separate decoder module"
    if _plain_head(lm) is None:
        return f"{type(lm).__name__}'s output layer is neither a plain nn.Linear nor LoRA on one without dropout ({type(lm.get_output_embeddings()).__name__})"
    head = lm.get_output_embeddings()
    name = next((n for n, m in lm.named_modules() if m is head), "")
    if "." in name:  # BERT-like LM heads: a dense + norm transform before it
        return f"{type(lm).__name__}'s output layer sits inside {name.rsplit('.', 1)[0]}, which may transform the hidden state first"
    return None


def supports_hidden_path(model) -> bool:
    """True when logits == final_hidden @ head_weight.T (+ head_bias) for this model."""
    return _unsupported_reason(model) is None


# --------------------------------------------------------------------------- positions


def position_limit(model) -> int | None:
    """How many tokens one row may hold on `model` (a causal LM or a reward model; plain, adapted
    or PEFT-wrapped): its position table (`max_position_embeddings`, which GPT-2's `n_positions`
    answers to; a multimodal model's text_config's), less the virtual tokens prompt or prefix
    tuning puts before every row (they take the first positions), less RoBERTa's offset past its
    padding index (its positions start there). None when the config names no table (ALiBi:
    Bloom, MPT).

    A learned table indexed past its end is an IndexError; a rotary model computes any position,
    but was trained within its table, and past it reads positions it never saw: the table is the
    limit for both. Training refuses a `data.max_length` past it (`check_positions`), generation a
    prompt that fills it, scoring cuts rows at it. A rotary model whose config scales its
    positions reads further (`_rope_scaled`)."""
    from peft import PeftModel

    from posttrain.models.adapters.model import AdaptedModel

    config = getattr(model, "config", None)
    if getattr(config, "max_position_embeddings", None) is None:
        config = getattr(config, "text_config", None)
    table = getattr(config, "max_position_embeddings", None)
    if not isinstance(table, int) or isinstance(table, bool):
        return None
    table = _rope_scaled(config, table)
    inner = model.lm if isinstance(model, AdaptedModel) else model
    inner = inner.get_base_model() if isinstance(inner, PeftModel) else inner
    base = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    offset = getattr(getattr(base, "embeddings", None), "padding_idx", None)
    return table - getattr(model, "num_virtual_tokens", 0) - (offset + 1 if isinstance(offset, int) else 0)


_SCALED_ROPE = ("linear", "dynamic", "yarn")  # the RoPE types whose `factor` stretches the positions trained


def _rope_scaled(config, table: int) -> int:
    """The positions a rotary model reads when its config scales them: transformers'
    `rope_parameters` (a config.json's `rope_scaling`, read into it), whose `rope_type` linear
    (positions divided by `factor`), dynamic (NTK: the base stretched past the table) or yarn
    reads `factor` x its base `original_max_position_embeddings` (default: the table), or the
    table when that is larger (a config that writes the extended length there, as DeepSeek-V3's
    does). Per-layer parameters (Gemma 3's sliding and full attention) give the least of their
    layers. Any other type (default, llama3, longrope, ...) reads its table, which for those
    already says the extended length."""
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(parameters, dict) or not parameters:
        return table
    limits = []
    for rope in [value for value in parameters.values() if isinstance(value, dict)] or [parameters]:
        kind = rope.get("rope_type", rope.get("type"))
        factor, base = rope.get("factor"), rope.get("original_max_position_embeddings") or table
        scaled = (kind in _SCALED_ROPE and isinstance(factor, (int, float)) and not isinstance(factor, bool)
                  and factor > 1 and isinstance(base, int))
        limits.append(max(table, int(factor * base)) if scaled else table)
    return min(limits)


def check_positions(model, lengths: dict[str, int], lower: list[str] | None = None) -> None:
    """A ConfigError when rows as long as `lengths` ({what: tokens}; several add up: a prompt and
    the tokens generated after it) do not fit `model`'s positions (`position_limit`), naming them,
    the limit and the settings to lower (`lower`; default: the names in `lengths`): before a
    training step or a rollout, not an IndexError in the middle of one (a learned table) or a
    silent run past the positions trained (rotary). With one setting per length, a setting can fix
    it alone only when the other lengths leave it a position: when just one can, it is named with
    the value that fits; when none can, all are to be lowered together."""
    limit = position_limit(model)
    total = sum(lengths.values())
    if limit is None or total <= limit:
        return
    lower = list(lengths) if lower is None else lower
    virtual = getattr(model, "num_virtual_tokens", 0)
    kind = getattr(getattr(model, "config", None), "model_type", None) or type(model).__name__
    table = f"{kind}'s position table" + (f" less {virtual} virtual tokens" if virtual else "")
    asked = " + ".join(f"{name} {value}" for name, value in lengths.items())
    rest = {name: total - value for name, value in zip(lower, lengths.values())} if len(lower) == len(lengths) \
        else {}
    alone = [name for name in lower if rest.get(name, 0) < limit]
    if len(lower) == 1:
        fix = f"set {lower[0]} to {limit} or less"
    elif len(alone) == 1 and rest:
        fix = f"set {alone[0]} to {limit - rest[alone[0]]} or less"
    else:
        fix = (f"lower {' or '.join(lower)}" if alone else f"lower {' and '.join(lower)}") + \
            f" so that they add up to {limit} or less"
    raise ConfigError(f"{asked}{f' = {total}' if len(lengths) > 1 else ''} tokens: past the {limit} positions the "
                      f"model reads ({table}); {fix}")


# a dropout probability by its name: GPT-2's attn_pdrop, OPT's dropout / layerdrop, Falcon's
# hidden_dropout, BioGPT's hidden_dropout_prob, MPT's attn_dropout_p, ...
_DROPOUT_NAME = re.compile(r"dropout|pdrop|layerdrop")


def _is_rate(name: str, value: Any) -> bool:
    return (_DROPOUT_NAME.search(name) is not None and isinstance(value, (int, float))
            and not isinstance(value, bool) and value > 0)


def _configs(config) -> Iterator[Any]:
    """A model config and the configs nested in it (MPT's attn_config, a multimodal text_config)."""
    from transformers import PretrainedConfig

    yield config
    for value in vars(config).values():
        if isinstance(value, PretrainedConfig):
            yield from _configs(value)


def disable_dropout(model, log, why: str) -> None:
    """Switch every dropout in `model` off and say so if any was on: nn.Dropout modules, LoRA's
    dropout (made an identity, as peft builds it for p = 0), the float rates modules copy from
    their config for functional dropout (OPT's `dropout`, GPT-J's `attention_dropout`, layer
    drop), and the config's own rates, which some families read in forward (Falcon, GPT-Neo).

    The DPO family and online RL compare the policy with itself: π with π_ref at step 0, π with
    π_old at a rollout's first update. Reference and old log-probs are taken in eval mode, the
    updates in train mode, so with dropout on the two differ by the dropout noise alone (TRL
    turns dropout off in these trainers too). The checkpoint's config rates are kept aside on
    the model, so `save_model` writes them back (`as_checkpoint`)."""
    import torch.nn as nn
    from transformers import PreTrainedModel

    changed = 0
    for module in model.modules():
        lora_dropout = getattr(module, "lora_dropout", None)
        if isinstance(lora_dropout, nn.ModuleDict):
            for name, layer in list(lora_dropout.items()):
                if not isinstance(layer, nn.Identity):
                    lora_dropout[name] = nn.Identity()
                    changed += 1
        elif isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            changed += 1
        for name, value in list(vars(module).items()):
            if _is_rate(name, value):
                setattr(module, name, type(value)(0))
                changed += 1
        if isinstance(module, PreTrainedModel):
            for config in _configs(module.config):
                for name, value in list(vars(config).items()):
                    if _is_rate(name, value):
                        zero = type(value)(0)  # of its type: configs check field types
                        _keep_for_saving(module, config, name, value, zero)
                        setattr(config, name, zero)
                        changed += 1
    if changed:
        log(f"note: dropout switched off in {changed} places ({why})")


def _keep_for_saving(model, config, name: str, checkpoint_value: Any, training_value: Any) -> None:
    """Note a config setting training changes (dropout rates to 0, use_cache off under gradient
    checkpointing) so that `save_model` writes the checkpoint's value (`as_checkpoint`)."""
    model.__dict__.setdefault("_checkpoint_config", []).append((config, name, checkpoint_value, training_value))


@contextmanager
def as_checkpoint(model) -> Iterator[None]:
    """The config's settings that training changed, as the checkpoint had them, while `model` is
    saved (`_keep_for_saving`): training without dropout does not change what a later fine-tune of
    the saved model starts with, and training with gradient checkpointing leaves a saved causal LM
    that returns its KV cache (`use_cache`) as the checkpoint did."""
    kept = getattr(model, "_checkpoint_config", [])
    for config, name, checkpoint_value, _ in kept:
        setattr(config, name, checkpoint_value)
    try:
        yield
    finally:
        for config, name, _, training_value in kept:
            setattr(config, name, training_value)


def note_full_logits(model, log) -> None:
    """Say so when log-probs must come from the model's whole [rows, sequence, vocabulary] logits
    (a head that scales or soft-caps its logits, or one with an adapter on it, such as LoRA
    targeting lm_head), so the memory this costs is not a surprise."""
    reason = _unsupported_reason(model)
    if reason is not None:
        log(f"note: {reason}, so log-probs come from its full [rows, sequence, vocabulary] logits, "
            "not the chunked path (more memory at large vocabularies)")


def final_hidden_and_head(model, **batch: Any):
    """Run the decoder only; return (hidden (B, T, H), head_weight (V, H), head_bias (V,) or None).

    logits == hidden @ head_weight.T (+ head_bias) exactly as the model's own forward would
    compute them. `labels` in the batch are ignored. Raises HiddenPathUnsupported for models
    whose logits are scaled or soft-capped; check `supports_hidden_path` and fall back to
    `model(**batch).logits` there.
    """
    reason = _unsupported_reason(model)
    if reason is not None:
        raise HiddenPathUnsupported(f"{reason}; compute logits with model(**batch).logits instead")
    lm = _causal_lm(model)
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "logits_to_keep", "num_items_in_batch")}
    head = _plain_head(lm)
    if hasattr(model, "final_hidden"):  # AdaptedModel: virtual tokens go in front, come off the output
        return model.final_hidden(**inputs), head.weight, head.bias
    outputs = lm.base_model(**inputs, use_cache=False, return_dict=True)
    return outputs.last_hidden_state, head.weight, head.bias


# --------------------------------------------------------------------------- saving


def save_model(model, tokenizer, out_dir: str | os.PathLike, *, base_model_path: str | os.PathLike | None = None) -> Path:
    """Save in Hugging Face formats, with the tokenizer alongside.

    Full model → safetensors model directory (loads with AutoModelForCausalLM.from_pretrained).
    Adapted model → adapter directory (`models.adapters.io`): a single peft method is a plain
    peft directory that `peft.PeftModel.from_pretrained(base, dir)` loads. The base model's
    directory is recorded (for presets, the built preset directory) unless `base_model_path`
    overrides it.
    """
    from posttrain.models.adapters.io import save_adapted
    from posttrain.models.adapters.model import AdaptedModel

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(model, AdaptedModel):
        base = str(base_model_path or model.lm.config._name_or_path)
        # a preset's built directory; a local directory as an absolute path, so the adapter
        # loads from any working directory
        base = str(preset_path(base)) if is_preset(base) else str(Path(base).resolve()) if Path(base).is_dir() else base
        save_adapted(model, out, base)
    else:
        with as_checkpoint(model), _generation_stops(model, tokenizer):
            model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


@contextmanager
def _generation_stops(model, tokenizer) -> Iterator[None]:
    """generation_config's eos_token_id as every id posttrain's own generation stops at
    (`rollout.generate.eos_token_ids`: the tokenizer's EOS, the config's, and the chat template's
    end-of-turn token), sorted, while `model` is saved; the model keeps its own after. A model
    trained on ChatML answers ending in <|im_end|> under an EOS of <|endoftext|> (a Qwen base)
    otherwise runs on past every answer in transformers' `generate`, vLLM or TGI, which stop at
    generation_config's ids (Qwen's own instruct models list both). An end-of-turn marker the
    tokenizer spells in several tokens is not written as generation_config's `stop_strings`:
    transformers' `generate` then refuses to run unless it is handed the tokenizer."""
    from posttrain.rollout.generate import eos_token_ids

    config = getattr(model, "generation_config", None)
    before = getattr(config, "eos_token_id", None)
    stops = sorted(eos_token_ids(model, tokenizer)) if config is not None and tokenizer is not None else []
    had = set(before if isinstance(before, (list, tuple)) else [before]) - {None}
    if not stops or set(stops) == had:
        yield
        return
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    try:
        yield
    finally:
        config.eos_token_id = before
