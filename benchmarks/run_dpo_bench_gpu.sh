#!/usr/bin/env bash
# The DPO / reward-model benchmark on a CUDA GPU, posttrain vs TRL (see benchmarks/README.md).
#
#   bash benchmarks/run_dpo_bench_gpu.sh
#
# Uses the Python it is given (PYTHON, default python3), which must already hold torch with
# CUDA, transformers, peft, accelerate, trl and datasets; posttrain is taken from src/.
# Builds the GPU assets under benchmarks/.cache/dpo_gpu/ if missing, runs every row once (or
# the case:tool:variant rows listed in BENCH_RUNS, comma-separated), writes
# benchmarks/results/dpo_gpu.md and dpo_gpu.json.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="${PYTHON:-python3}"
CACHE="$HERE/.cache/dpo_gpu"
STEPS="${BENCH_STEPS:-20}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU: use run_dpo_bench.sh on CPU'"
rows=$(( STEPS * 16 ))
if [ ! -f "$CACHE/assets.json" ] || [ "$(wc -l < "$CACHE/prefs.jsonl")" -ne "$rows" ]; then
  "$PY" "$HERE/dpo/make_assets.py" --out "$CACHE" --rows "$rows" --profile gpu
fi
"$PY" "$HERE/dpo/gpu.py" --cache "$CACHE" --results "$HERE/results" --steps "$STEPS" ${BENCH_RUNS:+--runs "$BENCH_RUNS"}
