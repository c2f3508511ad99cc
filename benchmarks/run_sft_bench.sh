#!/usr/bin/env bash
# One command: SFT on CPU, posttrain vs TRL's SFTTrainer.
#
#   bash benchmarks/run_sft_bench.sh
#
# Creates (or reuses) benchmarks/.venv-trl through venv.sh: torch==2.13.0 (CPU wheel,
# installed first so nothing pulls CUDA), trl, and posttrain in editable mode; builds the
# tiny model, tokenizer and data under benchmarks/.cache/ if missing; runs the interleaved
# repeats; writes benchmarks/results/sft_cpu.md and sft_cpu.json.
#
# Knobs (environment): BENCH_ROUNDS (2), BENCH_STEPS (6), BENCH_RUNS (tool:variant list,
# see sft_report.py), PYTHON (python3), TRL_SPEC (trl).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
CACHE="$HERE/.cache/sft_cpu"
# shellcheck source=benchmarks/venv.sh
source "$HERE/venv.sh"
bench_venv "torch, trl, posttrain"

if [ ! -f "$CACHE/train.jsonl" ] || [ ! -f "$CACHE/model/model.safetensors" ]; then
  echo "[setup] building tiny model, tokenizer and data in $CACHE"
  HF_HUB_OFFLINE=1 "$PY" "$HERE/make_assets.py" --out "$CACHE"
fi

mkdir -p "$HERE/results"
rm -rf "$HERE/.cache/work"
start=$(date +%s)
HF_HUB_OFFLINE=1 "$PY" "$HERE/sft_report.py" --cache "$CACHE" --results "$HERE/results"
echo "[done] $(( $(date +%s) - start )) s; see benchmarks/results/sft_cpu.md"
