"""What `model.padding_free` saves on online-RL batches whose completions end at different lengths.

    .venv/bin/python benchmarks/rl/padding_free.py [--cache benchmarks/.cache/rl_cpu]

The RL benchmark's untrained policy runs nearly every completion to the token limit, so its
rows hold almost no padding. Here 32 rows of 20-23 prompt tokens and 1-32 completion tokens
(random ids, seeded) go through `completion_forward` and its backward, as a GRPO update does,
on the benchmark's policy (`run_rl_bench.sh` builds it), with the rows padded and padding-free,
alternating: six rounds of five timed steps after one warm-up each. Prints the real tokens and
slots of the batch and the ms per forward + backward of each round and their medians.
Nothing here is imported by posttrain.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from posttrain.models.attention import padding_free
from posttrain.models.loading import load_model
from posttrain.train.rollouts import collate_completions, completion_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(__file__).resolve().parents[1] / ".cache" / "rl_cpu")
    args = parser.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    model = load_model(str(args.cache / "model"))
    vocab = model.config.vocab_size
    prompts = [[rng.randrange(4, vocab) for _ in range(rng.randint(20, 23))] for _ in range(32)]
    completions = [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 32))] for _ in range(32)]
    batch = collate_completions(prompts, completions, pad_id=3)
    print(f"{int(batch['attention_mask'].sum())} real tokens in {batch['attention_mask'].numel()} slots")

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = completion_forward(model, batch, 256, entropy_grad=False)
        (out["logps"] * batch["response_mask"]).sum().backward()

    times: dict[str, list[float]] = {"padded": [], "padding-free": []}
    for _ in range(6):
        for mode in times:
            padding_free(model, mode == "padding-free")
            step()
            start = time.perf_counter()
            for _ in range(5):
                step()
            times[mode].append((time.perf_counter() - start) / 5 * 1000)
    for mode, values in times.items():
        print(f"{mode:>12}: {', '.join(f'{v:.1f}' for v in values)} ms; median {statistics.median(values):.1f}")


if __name__ == "__main__":
    main()
