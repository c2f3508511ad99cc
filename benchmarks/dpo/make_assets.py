"""Build the DPO / reward-model benchmark's model, reward-model start and data offline.

    python benchmarks/dpo/make_assets.py --out benchmarks/.cache/dpo_cpu [--rows 320] [--profile cpu|cpu32k|gpu]

writes
    OUT/model/      a small Llama (hidden 256, 4 layers, 4 heads, intermediate 688, tied
                    embeddings) over posttrain's `tiny` preset tokenizer (byte-level BPE,
                    1,024 tokens, ChatML template), random init with seed 0, float32
    OUT/rm_init/    OUT/model loaded as AutoModelForSequenceClassification(num_labels=1)
                    with seed 0 and saved: ONE reward-model start, fresh `score` head
                    included, that both tools load, so their step-0 losses can match
    OUT/prefs.jsonl {"prompt", "chosen", "rejected"} strings from posttrain's synthetic
                    verifiable preferences (tasks smallest, copy, reverse; seed 0)
    OUT/assets.json sizes and token-length statistics

The model is the `tiny` preset's shape scaled up (hidden 128 -> 256, intermediate 344 ->
688), so a step is not all framework overhead, while both tools still tokenise with the
very tokenizer and chat template the preset ships.

--profile cpu32k is the CPU model with a 32,768-row vocabulary, untied (the tokenizer still uses
its first 1,024 ids): the logits then weigh what they do in real models.

--profile cpulong is the cpu32k model with the GPU profile's long rows (below): what the GPU
table measures, at a size a 2-core CPU can step through, for the peak-tensor comparison.

--profile gpu builds the GPU case instead: a 0.22B-parameter Llama (hidden 1024, 12
layers, 16 heads, intermediate 2816, untied embeddings) with a 32,768-row vocabulary, the
size of real models' (the tokenizer still uses its first 1,024 ids), and long rows cut
from the bundled corpus: a ~1,300-character passage as the prompt, ~450-character
passages as chosen and rejected (~400 + ~130 tokens once templated). That is where the
[batch, seq, vocab] logits and a prompt computed twice cost real memory and time.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

TASKS = ["smallest", "copy", "reverse"]


PROFILES = {
    "cpu": {"vocab_size": None, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
            "num_attention_heads": 4, "tie_word_embeddings": True},
    # The CPU model with a real model's vocabulary (untied, like the GPU profile): the [batch,
    # seq, vocab] logits then cost what they cost in practice (ANCHORS.md: ~384 KB a token).
    "cpu32k": {"vocab_size": 32768, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
               "num_attention_heads": 4, "tie_word_embeddings": False},
    "gpu": {"vocab_size": 32768, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 12,
            "num_attention_heads": 16, "tie_word_embeddings": False},
}
PROFILES["cpulong"] = PROFILES["cpu32k"]
LONG_ROWS = {"gpu", "cpulong"}  # corpus passages (~650 tokens a sequence), not the synthetic tasks


def build_model(model_dir: Path, seed: int, profile: str = "cpu") -> int:
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from posttrain.models.presets import preset_path

    preset = preset_path("tiny")
    tokenizer = AutoTokenizer.from_pretrained(preset)
    shape = dict(PROFILES[profile])
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    config = LlamaConfig(
        **shape,
        num_key_value_heads=shape["num_attention_heads"],
        max_position_embeddings=1024,
        attention_dropout=0.0,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
                                               pad_token_id=config.pad_token_id)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return sum(p.numel() for p in model.parameters())


def build_reward_start(model_dir: Path, rm_dir: Path, seed: int) -> dict:
    """The causal LM as a 1-output sequence classifier; its fresh head is drawn once, here."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    model.save_pretrained(rm_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(rm_dir)
    head = model.score.weight.detach()
    return {"class": type(model).__name__, "params": sum(p.numel() for p in model.parameters()),
            "score_weight_norm": float(head.norm())}


def passage_rows(rows: int, seed: int) -> list[dict]:
    """Long rows for the GPU profile: corpus passages as prompt, chosen and rejected."""
    import random
    from importlib import resources

    text = " ".join(resources.files("posttrain").joinpath("assets/corpus.txt").read_text().split())
    rng = random.Random(seed)

    def passage(chars: int) -> str:
        start = rng.randrange(0, len(text) - chars)
        return text[start : start + chars]

    return [{"prompt": "Continue this passage in the same style.\n\n" + passage(1300), "chosen": passage(450),
             "rejected": passage(450)} for _ in range(rows)]


def build_data(path: Path, model_dir: Path, rows: int, seed: int, profile: str = "cpu") -> dict:
    from transformers import AutoTokenizer

    from posttrain.data.synthetic import make_preference_rows

    synthetic = profile not in LONG_ROWS
    data = make_preference_rows(TASKS, rows, seed=seed, kind="pairs") if synthetic else passage_rows(rows, seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    with path.open("w") as fh:
        for row in data:
            fh.write(json.dumps({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}) + "\n")
            for side in ("chosen", "rejected"):
                messages = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row[side]}]
                lengths.append(len(tokenizer.apply_chat_template(messages, tokenize=True)["input_ids"]))
    lengths.sort()
    return {"rows": len(data), "tasks": TASKS if synthetic else "corpus passages", "profile": profile,
            "vocab_size": PROFILES[profile]["vocab_size"] or len(tokenizer),
            "tied_embeddings": PROFILES[profile]["tie_word_embeddings"], "sequence_tokens_min": lengths[0],
            "sequence_tokens_median": lengths[len(lengths) // 2], "sequence_tokens_max": lengths[-1],
            "sequence_tokens_mean": sum(lengths) / len(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/.cache/dpo_cpu")
    parser.add_argument("--rows", type=int, default=320)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    args = parser.parse_args()
    out = Path(args.out)
    for sub in ("model", "rm_init"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    info = {"params": build_model(out / "model", args.seed, args.profile), "seed": args.seed}
    info["reward_start"] = build_reward_start(out / "model", out / "rm_init", args.seed)
    info.update(build_data(out / "prefs.jsonl", out / "model", args.rows, args.seed, args.profile))
    (out / "assets.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
