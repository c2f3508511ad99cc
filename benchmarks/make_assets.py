"""Build the benchmark's model, tokenizer and data offline (no hub, fixed seeds).

    python benchmarks/make_assets.py --out benchmarks/.cache/sft_cpu

writes
    OUT/model/   tiny Llama (hidden 256, 4 layers, 4 heads, intermediate 688, vocab 32000),
                 random init with seed 0, float32, safetensors, plus a fast WordLevel tokenizer
    OUT/train.jsonl  {"text": ...} rows; token lengths lognormal (median ~350), capped at 1024

The tokenizer maps each whitespace-separated pseudo-word to one id, so the token length
of a row is its word count + 2 (BOS added by the tokenizer, EOS added by the trainers).
Nothing here depends on posttrain or TRL.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

VOCAB_SIZE = 32000
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3
MAX_TOKENS = 1024
MEDIAN_TOKENS = 350
SIGMA = 0.85  # lognormal shape: mean ~ median * exp(sigma^2 / 2) ~ 500 before the cap


def pseudo_words(n: int, seed: int) -> list[str]:
    """n distinct lowercase pseudo-words built from consonant-vowel syllables."""
    rng = random.Random(seed)
    onsets = "b c d f g h j k l m n p r s t v w z br cr dr gr pl st tr sh ch".split()
    vowels = "a e i o u ai ea ou".split()
    words: set[str] = set()
    while len(words) < n:
        syllables = rng.randint(1, 4)
        words.add("".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(syllables)))
    return sorted(words)


def build_tokenizer(model_dir: Path, words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + words)}
    assert len(vocab) == VOCAB_SIZE
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=2048,
    )
    fast.save_pretrained(model_dir)
    return fast


def build_model(model_dir: Path, seed: int) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(model_dir, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def build_data(path: Path, words: list[str], rows: int, seed: int) -> list[int]:
    """Rows of pseudo-words; words drawn Zipf-like so the text is not uniform noise."""
    rng = random.Random(seed + 1)
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    cumulative = []
    total = 0.0
    for w in weights:
        total += w
        cumulative.append(total)
    lengths = []
    with path.open("w") as fh:
        for _ in range(rows):
            n_tokens = int(round(math.exp(rng.gauss(math.log(MEDIAN_TOKENS), SIGMA))))
            n_tokens = max(8, min(MAX_TOKENS, n_tokens))
            n_words = n_tokens - 2  # BOS + EOS
            text = " ".join(rng.choices(words, cum_weights=cumulative, k=n_words))
            fh.write(json.dumps({"text": text}) + "\n")
            lengths.append(n_tokens)
    return lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/.cache/sft_cpu")
    parser.add_argument("--rows", type=int, default=800)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    out = Path(args.out)
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    words = pseudo_words(VOCAB_SIZE - len(SPECIALS), args.seed)
    build_tokenizer(model_dir, words)
    n_params = build_model(model_dir, args.seed)
    lengths = build_data(out / "train.jsonl", words, args.rows, args.seed)
    lengths_sorted = sorted(lengths)
    info = {
        "params": n_params,
        "rows": len(lengths),
        "tokens_median": lengths_sorted[len(lengths) // 2],
        "tokens_mean": sum(lengths) / len(lengths),
        "tokens_max": max(lengths),
        "rows_at_cap": sum(1 for n in lengths if n >= MAX_TOKENS),
        "seed": args.seed,
    }
    (out / "assets.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
