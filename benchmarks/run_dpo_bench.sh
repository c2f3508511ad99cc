#!/usr/bin/env bash
# One command: DPO (full and LoRA) and reward-model training on CPU, posttrain vs TRL's
# DPOTrainer / RewardTrainer.
#
#   bash benchmarks/run_dpo_bench.sh
#
# Creates (or reuses) benchmarks/.venv-trl through venv.sh, as run_sft_bench.sh does
# (torch==2.13.0 CPU wheel first, then trl and posttrain in editable mode under a torch
# constraint), plus peft for TRL's LoRA run; builds the model, the reward-model start and
# the preference data under benchmarks/.cache/dpo_cpu/ if missing; runs the interleaved repeats; writes
# benchmarks/results/dpo_cpu.md and dpo_cpu.json.
#
# Knobs (environment): BENCH_ROUNDS (2), BENCH_STEPS (20; the data holds 16 x steps pairs,
# one epoch), BENCH_RUNS (case:tool:variant list, see benchmarks/dpo/report.py),
# BENCH_PROFILE (cpu; cpu32k: the same model with a 32,768-token vocabulary; cpulong: the cpu32k
# model on the GPU profile's ~650-token rows, batch 8, max_length 1024), BENCH_NAME
# (results/NAME.md; dpo_PROFILE), BENCH_TENSOR_MEMORY (1: one untimed peak-tensor run per row;
# 0: none), PYTHON (python3), TRL_SPEC (trl).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE="${BENCH_PROFILE:-cpu}"  # cpu: vocab 1,024 (the tiny preset's); cpu32k: the same model with 32,768
NAME="${BENCH_NAME:-dpo_$PROFILE}"
CACHE="$HERE/.cache/dpo_$PROFILE"
STEPS="${BENCH_STEPS:-20}"
BATCH=16
MAX_LENGTH=128
if [ "$PROFILE" = cpulong ]; then BATCH=8; MAX_LENGTH=1024; fi
# shellcheck source=benchmarks/venv.sh
source "$HERE/venv.sh"
bench_venv "torch, trl, peft, posttrain" peft

rows=$(( STEPS * BATCH ))
if [ ! -f "$CACHE/model/model.safetensors" ] || [ ! -f "$CACHE/rm_init/model.safetensors" ] \
   || [ "$(wc -l < "$CACHE/prefs.jsonl" 2>/dev/null || echo 0)" -ne "$rows" ]; then
  echo "[setup] building model, reward-model start and $rows preference pairs in $CACHE"
  HF_HUB_OFFLINE=1 "$PY" "$HERE/dpo/make_assets.py" --out "$CACHE" --rows "$rows" --profile "$PROFILE"
fi

mkdir -p "$HERE/results"
rm -rf "$HERE/.cache/dpo_work"
start=$(date +%s)
DPO_BENCH_CMD="${BENCH_PROFILE:+BENCH_PROFILE=$PROFILE }${BENCH_NAME:+BENCH_NAME=$NAME }${BENCH_ROUNDS:+BENCH_ROUNDS=$BENCH_ROUNDS }${BENCH_STEPS:+BENCH_STEPS=$BENCH_STEPS }${BENCH_TENSOR_MEMORY:+BENCH_TENSOR_MEMORY=$BENCH_TENSOR_MEMORY }${BENCH_RUNS:+BENCH_RUNS=$BENCH_RUNS }bash benchmarks/run_dpo_bench.sh" HF_HUB_OFFLINE=1 \
  "$PY" "$HERE/dpo/report.py" --cache "$CACHE" --results "$HERE/results" --steps "$STEPS" --batch-size "$BATCH" \
  --max-length "$MAX_LENGTH" --name "$NAME"
echo "[done] $(( $(date +%s) - start )) s; see benchmarks/results/$NAME.md"
