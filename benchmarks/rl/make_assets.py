"""Build the RL benchmark's policy and prompt file offline.

    python benchmarks/rl/make_assets.py --out benchmarks/.cache/rl_cpu [--prompts 256] [--seed 0]

writes
    OUT/model/        the DPO benchmark's CPU model (`benchmarks/dpo/make_assets.py`,
                      `build_model`): a Llama with hidden 256, 4 layers, 4 heads,
                      intermediate 688 and tied embeddings over posttrain's `tiny` preset
                      tokenizer (byte-level BPE, 1,024 tokens, ChatML template). It is
                      randomly initialised with seed 0 and stored in float32.
    OUT/prompts.jsonl {"prompt", "answer"} rows from posttrain's synthetic "smallest" task
                      ("Smallest letter: q m t" -> "m"). Both tools read this file: posttrain
                      as prompt rows, TRL as conversational prompts with an `answer` column.
    OUT/assets.json   sizes, prompt token lengths, and how often the untrained model emits
                      EOS (see below).

The policy is untrained on purpose. It samples close to uniformly over 1,024 tokens, so a
completion almost never ends before `max_new_tokens`, and both tools generate and train on
completions of the full length. The file records the model's EOS probability after a
prompt, and the benchmark counts the generated tokens of every step on both sides. The
price is that the exact-match reward is 0 for (almost) every completion, so most groups
have zero advantage. That changes none of the work: both tools still generate, score,
take the reference forward (β > 0), and run the policy forward and backward on every token.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "dpo"))
from make_assets import PROFILES, build_model  # noqa: E402  (the DPO benchmark's model, reused as is)

TASK = "smallest"


def build_prompts(path: Path, model_dir: Path, n: int, seed: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.data.synthetic import make_examples

    examples = make_examples([TASK], n, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = []
    with path.open("w") as fh:
        for e in examples:
            fh.write(json.dumps({"prompt": e.instruction, "answer": e.output}) + "\n")
            lengths.append(len(tokenizer.apply_chat_template([{"role": "user", "content": e.instruction}],
                                                             add_generation_prompt=True, tokenize=True)["input_ids"]))
    # The untrained model's chance of ending a completion right away: P(EOS) after each prompt.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    eos = tokenizer.eos_token_id
    probs = []
    with torch.no_grad():
        for e in examples[:64]:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": e.instruction}], add_generation_prompt=True,
                                                tokenize=True)["input_ids"]
            probs.append(float(model(input_ids=torch.tensor([ids])).logits[0, -1].softmax(-1)[eos]))
    lengths.sort()
    return {"prompts": n, "task": TASK, "prompt_tokens_min": lengths[0], "prompt_tokens_max": lengths[-1],
            "prompt_tokens_mean": sum(lengths) / n, "eos_token": tokenizer.eos_token,
            "p_eos_after_prompt_mean": sum(probs) / len(probs), "p_eos_after_prompt_max": max(probs),
            "tokenizer_vocab": len(tokenizer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/.cache/rl_cpu")
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", choices=["cpu", "cpu32k"], default="cpu",
                        help="cpu: vocab 1,024 (the tiny tokenizer's), tied; cpu32k: vocab 32,768, untied")
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out / "model", ignore_errors=True)
    (out / "model").mkdir(parents=True)
    info = {"params": build_model(out / "model", args.seed, args.profile), "seed": args.seed, "profile": args.profile}
    info.update(build_prompts(out / "prompts.jsonl", out / "model", args.prompts, args.seed))
    info["vocab"] = PROFILES[args.profile]["vocab_size"] or info["tokenizer_vocab"]
    info["tied_embeddings"] = PROFILES[args.profile]["tie_word_embeddings"]
    (out / "assets.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info))


if __name__ == "__main__":
    main()
