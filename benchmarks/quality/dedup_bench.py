"""Near-duplicate detection: posttrain's `near_duplicates` vs datasketch's MinHashLSH.

Both tools see the same synthetic corpus, the same word 5-gram shingles (posttrain's
`shingle_set`), threshold 0.8 and 128 permutations. Each tool runs in a child process of its own
(one warm-up, then the best of 3 wall times; peak RSS above the RSS before the warm-up). Quality
is scored against exact Jaccard on the shingle sets of every pair that shares a shingle (all other
pairs have Jaccard 0, so this is the brute force, without its n² cost). datasketch returns LSH
candidates with no exact re-check: its candidates are clustered as they are. datasketch is not a
posttrain dependency; it lives only in the benchmark venv.

    PYTHONPATH=src benchmarks/.venv-trl/bin/python benchmarks/quality/dedup_bench.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import time
from collections import defaultdict
from importlib import metadata
from pathlib import Path

from posttrain.data.quality.dedup import _clusters, jaccard, near_duplicates, shingle_set

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import current_rss_mib, git_describe  # a sibling script

THRESHOLD, NUM_PERM, NGRAM = 0.8, 128, 5


def corpus(seed: int, rows: int, dup_fraction: float) -> list[str]:
    """Rows of 45–75 made-up words (3,000-word vocabulary); `dup_fraction` of the rows are copies of
    earlier rows (copies of copies too) with 0–3 words replaced / inserted / deleted, so their
    Jaccard to the source spreads over ~0.5–1.0. Shuffled."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    vocab: set[str] = set()
    while len(vocab) < 3000:
        vocab.add("".join(rng.choice(syllables) for _ in range(rng.randint(2, 4))))
    words = sorted(vocab)
    copies = round(rows * dup_fraction)
    out = [[rng.choice(words) for _ in range(rng.randint(45, 75))] for _ in range(rows - copies)]
    for _ in range(copies):
        row = list(rng.choice(out))
        for _ in range(rng.randint(0, 3)):
            op, at = rng.choice("rid"), rng.randrange(len(row))
            if op == "r":
                row[at] = rng.choice(words)
            elif op == "i":
                row.insert(at, rng.choice(words))
            else:
                del row[at]
        out.append(row)
    rng.shuffle(out)
    return [" ".join(row) for row in out]


def union_find(n: int, pairs) -> list[int]:
    """Each row's cluster root, the smallest index of the cluster (as near_duplicates keeps)."""
    return _clusters(n, list(pairs))


def run_posttrain(texts: list[str]) -> tuple[list[int], dict]:
    result, stats = near_duplicates(texts, threshold=THRESHOLD, ngram=NGRAM, num_perm=NUM_PERM)
    return [i if d is None else d.of for i, d in enumerate(result)], stats


def run_datasketch(texts: list[str], weights: tuple[float, float] = (0.5, 0.5)) -> tuple[list[int], dict]:
    """Shingle, MinHash.bulk (its default sha1_hash32 and affine32 scheme), insert every row into
    MinHashLSH, query every row; the candidates it returns are the duplicate pairs. `weights`
    (false positive, false negative) picks its bands: (0.5, 0.5) is its default, (0.1, 0.9)
    the weighting posttrain's lsh_bands uses."""
    from datasketch import MinHash, MinHashLSH

    sets = [shingle_set(t, NGRAM) for t in texts]
    hashes = MinHash.bulk([["\x1f".join(s).encode() for s in shingles] for shingles in sets], num_perm=NUM_PERM)
    lsh = MinHashLSH(threshold=THRESHOLD, num_perm=NUM_PERM, weights=weights)
    with lsh.insertion_session() as session:
        for i, m in enumerate(hashes):
            if sets[i]:
                session.insert(i, m)
    pairs = {(min(i, j), max(i, j)) for i, m in enumerate(hashes) if sets[i] for j in lsh.query(m) if j != i}
    return union_find(len(texts), pairs), {"candidate_pairs": len(pairs), "bands": lsh.b, "rows": lsh.r,
                                           "pairs": sorted(pairs)}


TOOLS = ("posttrain", "datasketch", "datasketch-0.1/0.9")


def child(tool: str, rows: int) -> dict:
    """One tool in this process: corpus, warm-up (peak RSS measured on it), 3 timed runs."""
    texts = corpus(0, rows, 0.15)
    run = {"posttrain": run_posttrain, "datasketch": run_datasketch,
           "datasketch-0.1/0.9": lambda t: run_datasketch(t, (0.1, 0.9))}[tool]
    before = current_rss_mib()
    kept, stats = run(texts)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    walls = []
    for _ in range(3):
        start = time.perf_counter()
        run(texts)
        walls.append(time.perf_counter() - start)
    return {"tool": tool, "walls": walls, "best_s": min(walls), "rss_delta_mib": peak - before,
            "kept": kept, "stats": stats}


def truth(texts: list[str]) -> dict[tuple[int, int], float]:
    """Exact Jaccard of every pair sharing at least one shingle (an inverted index finds them)."""
    sets = [shingle_set(t, NGRAM) for t in texts]
    index: dict[tuple, list[int]] = defaultdict(list)
    for i, s in enumerate(sets):
        for g in s:
            index[g].append(i)
    pairs = {(a, b) for ids in index.values() for x, a in enumerate(ids) for b in ids[x + 1:]}
    return {p: jaccard(sets[p[0]], sets[p[1]]) for p in pairs}


def score(kept: list[int], candidates, all_j: dict) -> dict:
    """Recall: true pairs (J >= threshold) whose rows share a cluster. Drop precision: dropped rows
    connected to their kept row through true pairs. Strict: J(row, kept row) >= threshold itself.
    Candidate precision: LSH candidate pairs that are true pairs."""
    true = [p for p, j in all_j.items() if j >= THRESHOLD]
    true_root = union_find(len(kept), true)
    dropped = [i for i, k in enumerate(kept) if k != i]
    out = {"true_pairs": len(true), "recall": sum(kept[a] == kept[b] for a, b in true) / len(true),
           "dropped": len(dropped), "true_dropped": sum(r != i for i, r in enumerate(true_root)),
           "drop_precision": sum(true_root[i] == true_root[kept[i]] for i in dropped) / max(len(dropped), 1),
           "strict_precision": sum(all_j.get((kept[i], i), 0.0) >= THRESHOLD for i in dropped) / max(len(dropped), 1)}
    if candidates is not None:
        out["candidate_precision"] = sum(all_j.get(p, 0.0) >= THRESHOLD for p in candidates) / max(len(candidates), 1)
    return out


NOTES = [
    ("- *candidate precision*: LSH candidate pairs with exact Jaccard >= threshold (posttrain re-checks "
     "every candidate and keeps only those; datasketch returns them as they are)."),
    "- *pair recall*: true pairs (exact Jaccard >= threshold) whose two rows end up in one cluster.",
    ("- *drop precision*: dropped rows joined to their kept row through true pairs; *strict precision*: "
     "dropped rows whose own Jaccard with the kept row is >= threshold (a row joined through a chain can "
     "be below it)."),
    ("- Clusters: union-find over the pairs each tool reports, smallest index kept (for datasketch, over "
     "its unverified candidates)."),
]


def markdown(rows: int, results: list[dict], truth_s: float, total_s: float) -> str:
    header = (f"Generated by `PYTHONPATH=src benchmarks/.venv-trl/bin/python benchmarks/quality/dedup_bench.py` "
              f"on {time.strftime('%Y-%m-%d')} in {total_s / 60:.1f} min; posttrain {git_describe()}, "
              f"datasketch {metadata.version('datasketch')}, numpy {metadata.version('numpy')}, "
              f"Python {platform.python_version()}; {platform.machine()}, {os.cpu_count()} CPUs "
              f"(1-min load average {os.getloadavg()[0]:.1f} at the end: the cores are shared).")
    setup = (f"Corpus: {rows:,} rows of 45–75 made-up words, 15% near-duplicate copies (0–3 word edits); "
             f"word {NGRAM}-gram shingles, threshold {THRESHOLD}, {NUM_PERM} permutations. Quality against "
             f"exact Jaccard of every pair sharing a shingle ({truth_s:.1f} s; all other pairs have "
             f"Jaccard 0): {results[0]['score']['true_pairs']:,} true pairs, "
             f"{results[0]['score']['true_dropped']:,} rows to drop.")
    columns = ["tool", "bands × rows", "wall s, best of 3 (runs)", "peak RSS Δ MiB", "candidate pairs",
               "candidate precision", "pair recall", "rows dropped", "drop precision", "strict precision"]
    lines = ["# Near-duplicate detection: posttrain vs datasketch MinHashLSH", "", header, "", setup, "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in results:
        s, st = r["score"], r["stats"]
        runs = ", ".join(f"{w:.2f}" for w in r["walls"])
        lines.append(f"| {r['tool']} | {st['bands']} × {st['rows']} | {r['best_s']:.2f} ({runs}) | "
                     f"{r['rss_delta_mib']:.0f} | {st['candidate_pairs']:,} | {s['candidate_precision']:.3f} | "
                     f"{s['recall']:.3f} | {s['dropped']:,} | {s['drop_precision']:.3f} | "
                     f"{s['strict_precision']:.3f} |")
    lines += ["", *NOTES, ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--child", choices=TOOLS)
    args = parser.parse_args()
    if args.child:
        json.dump(child(args.child, args.rows), sys.stdout)
        return
    start = time.perf_counter()
    results = []
    for tool in TOOLS:
        out = subprocess.run([sys.executable, __file__, "--child", tool, "--rows", str(args.rows)],
                             capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        results.append(json.loads(out.stdout))
        print(f"{tool}: best {results[-1]['best_s']:.2f} s of {results[-1]['walls']}", file=sys.stderr)
    texts = corpus(0, args.rows, 0.15)
    truth_start = time.perf_counter()
    all_j = truth(texts)
    truth_s = time.perf_counter() - truth_start
    for r in results:
        pairs = r["stats"].pop("pairs", None)
        r["score"] = score(r["kept"], [tuple(p) for p in pairs] if pairs is not None else None, all_j)
        if pairs is None:  # posttrain: verified / candidate pairs is its candidate precision
            r["score"]["candidate_precision"] = r["stats"]["verified_pairs"] / max(r["stats"]["candidate_pairs"], 1)
    page = markdown(args.rows, results, truth_s, time.perf_counter() - start)
    out_path = HERE.parent / "results" / "quality_dedup.md"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(page)
    print(page)


if __name__ == "__main__":
    main()
