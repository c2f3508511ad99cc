"""Built-in tiny models: random-init Llama-style configs with a tokenizer trained offline.

Nothing here downloads anything. A preset is built from the bundled `assets/corpus.txt`
(the tokenizer) and a fixed seed (the weights), so every build is bitwise identical.
`preset_path(name)` builds once into a cache directory and returns a normal Hugging Face
model directory (config.json, model.safetensors, tokenizer files, generation_config.json)
that `AutoModelForCausalLM` / `AutoTokenizer.from_pretrained` load like any other.

Cache location: `$POSTTRAIN_CACHE/presets/` when the variable is set, else
`~/.cache/posttrain/presets/`. The directory name carries a format version and a short
hash of the corpus and the preset spec, so an edited corpus never reuses a stale build.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from posttrain.errors import UserError

if TYPE_CHECKING:  # heavy imports stay out of import time
    from transformers import PreTrainedTokenizerFast

PRESET_FORMAT_VERSION = 1
VOCAB_SIZE = 1024  # includes the 4 special tokens

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, PAD]  # ids 0..3, in this order

# ChatML. The {% generation %} markers let `apply_chat_template(return_assistant_tokens_mask=True)`
# find the assistant tokens; they do not change the rendered text.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- generation %}{{- message['content'] + '<|im_end|>' }}{%- endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class PresetSpec:
    """Shape of a tiny Llama-style model (all presets share the bundled tokenizer)."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int = 1024
    seed: int = 0
    description: str = ""


PRESETS: dict[str, PresetSpec] = {
    "tiny": PresetSpec(128, 4, 4, 4, 344, seed=0, description="~0.92M params, for demos and outcome tests"),
    "tiny-2l": PresetSpec(64, 2, 4, 4, 172, seed=0, description="~0.17M params, for fast unit tests"),
}


def is_preset(name: object) -> bool:
    """True when `name` is the name of a built-in preset (not a path)."""
    return isinstance(name, str) and name in PRESETS


def preset_names() -> list[str]:
    return sorted(PRESETS)


def corpus_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "corpus.txt"


def _spec(name: str) -> PresetSpec:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; built-in presets are: {', '.join(preset_names())}")
    return PRESETS[name]


# --------------------------------------------------------------------------- tokenizer


def train_bpe():
    """The raw `tokenizers.Tokenizer`: byte-level BPE on the bundled corpus (needs only `tokenizers`).

    Digits are split off one by one before BPE, so every digit is a single token. The
    corpus carries lines of space-separated letters, so " a" ... " z" are single tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus_path().read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer


def build_tokenizer() -> "PreTrainedTokenizerFast":
    """The preset tokenizer: `train_bpe()` wrapped for transformers, with a ChatML template.

    eos is <|im_end|> (generation stops at the end of an assistant turn), pad is <|pad|>,
    no bos is added.
    """
    from transformers import PreTrainedTokenizerFast

    tokenizer = train_bpe()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        extra_special_tokens=[IM_START, ENDOFTEXT],
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------- model


def _model_config(spec: PresetSpec, tokenizer: "PreTrainedTokenizerFast"):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(ENDOFTEXT),
        eos_token_id=tokenizer.convert_tokens_to_ids(IM_END),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD),
    )


def build_preset(name: str, out_dir: str | os.PathLike) -> Path:
    """Build preset `name` into `out_dir` (created; existing files are overwritten).

    Same name → same bytes: the tokenizer is trained deterministically and the weights
    come from a fixed seed under a forked RNG (the caller's global RNG is untouched).
    """
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    spec = _spec(name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    config = _model_config(spec, tokenizer)
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        torch.set_default_dtype(torch.float32)  # the same bytes whatever the caller's default
        try:
            model = LlamaForCausalLM(config)
        finally:
            torch.set_default_dtype(default_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    with quiet_progress_bars():
        model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {"preset": name, "format_version": PRESET_FORMAT_VERSION, "spec": asdict(spec)}
    (out / "posttrain_preset.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out


@contextlib.contextmanager
def quiet_progress_bars():
    """Hide transformers' progress bars (a preset this small, a saved final/); restore the setting after."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _fingerprint(name: str) -> str:
    digest = hashlib.sha256()
    digest.update(corpus_path().read_bytes())
    digest.update(json.dumps([PRESET_FORMAT_VERSION, VOCAB_SIZE, CHAT_TEMPLATE, asdict(_spec(name))]).encode())
    return digest.hexdigest()[:8]


def cache_root() -> Path:
    root = os.environ.get("POSTTRAIN_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "posttrain"
    return base / "presets"


def preset_path(name: str = "tiny") -> Path:
    """The directory of preset `name`, built on first use (safe under concurrent callers).

    The build goes to a temporary sibling directory and is renamed into place, so a
    directory at the final path is always complete; a process that loses the race
    discards its own copy and uses the winner's.
    """
    _spec(name)
    final = cache_root() / f"{name}-v{PRESET_FORMAT_VERSION}-{_fingerprint(name)}"
    if (final / "config.json").is_file():
        return final
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    except OSError as exc:
        raise UserError(
            f"cannot write the preset cache at {final.parent} ({exc.strerror}); set POSTTRAIN_CACHE to a writable directory"
        ) from None
    try:
        build_preset(name, tmp)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
