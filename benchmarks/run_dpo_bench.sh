#!/usr/bin/env bash
# One command: DPO (full and LoRA) and reward-model training on CPU, posttrain vs TRL's
# DPOTrainer / RewardTrainer.
#
#   bash benchmarks/run_dpo_bench.sh
#
# Creates (or reuses) benchmarks/.venv-trl exactly as run_sft_bench.sh does (torch==2.13.0
# CPU wheel first, then trl and posttrain in editable mode under a torch constraint), plus
# peft for TRL's LoRA run; builds the model, the reward-model start and the preference data
# under benchmarks/.cache/dpo_cpu/ if missing; runs the interleaved repeats; writes
# benchmarks/results/dpo_cpu.md and dpo_cpu.json.
#
# Knobs (environment): BENCH_ROUNDS (2), BENCH_STEPS (20; the data holds 16 x steps pairs,
# one epoch), BENCH_RUNS (case:tool:variant list, see benchmarks/dpo/report.py),
# PYTHON (python3), TRL_SPEC (trl).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="$HERE/.venv-trl"
CACHE="$HERE/.cache/dpo_cpu"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
TRL_SPEC="${TRL_SPEC:-trl}"
STEPS="${BENCH_STEPS:-20}"
BATCH=16

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch, trl, peft, posttrain" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC, then $TRL_SPEC and peft, then posttrain (editable)"
  "${PIP[@]}" "$TORCH_SPEC"
  # The constraint keeps trl's, peft's and posttrain's requirements from swapping the CPU wheel for a CUDA build.
  echo "$TORCH_SPEC" > "$VENV/torch-constraint.txt"
  "${PIP[@]}" -c "$VENV/torch-constraint.txt" "$TRL_SPEC" peft
  "${PIP[@]}" -c "$VENV/torch-constraint.txt" -e "$ROOT"
fi
torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
  2.13.0*) ;;
  *) echo "benchmark venv has torch $torch_version, expected 2.13.0 (delete $VENV and rerun)" >&2; exit 1 ;;
esac

rows=$(( STEPS * BATCH ))
if [ ! -f "$CACHE/model/model.safetensors" ] || [ ! -f "$CACHE/rm_init/model.safetensors" ] \
   || [ "$(wc -l < "$CACHE/prefs.jsonl" 2>/dev/null || echo 0)" -ne "$rows" ]; then
  echo "[setup] building model, reward-model start and $rows preference pairs in $CACHE"
  HF_HUB_OFFLINE=1 "$PY" "$HERE/dpo/make_assets.py" --out "$CACHE" --rows "$rows"
fi

mkdir -p "$HERE/results"
rm -rf "$HERE/.cache/dpo_work"
start=$(date +%s)
DPO_BENCH_CMD="bash benchmarks/run_dpo_bench.sh" HF_HUB_OFFLINE=1 "$PY" "$HERE/dpo/report.py" \
  --cache "$CACHE" --results "$HERE/results" --steps "$STEPS" --batch-size "$BATCH"
echo "[done] $(( $(date +%s) - start )) s; see benchmarks/results/dpo_cpu.md"
