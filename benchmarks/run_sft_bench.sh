#!/usr/bin/env bash
# One command: SFT on CPU, posttrain vs TRL's SFTTrainer.
#
#   bash benchmarks/run_sft_bench.sh
#
# Creates (or reuses) benchmarks/.venv-trl with torch==2.13.0 (CPU wheel, installed
# first so nothing pulls CUDA), trl, and posttrain in editable mode; builds the tiny
# model, tokenizer and data under benchmarks/.cache/ if missing; runs the interleaved
# repeats; writes benchmarks/results/sft_cpu.md and sft_cpu.json.
#
# Knobs (environment): BENCH_ROUNDS (2), BENCH_STEPS (6), BENCH_RUNS (tool:variant list,
# see sft_report.py), PYTHON (python3), TRL_SPEC (trl).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
VENV="$HERE/.venv-trl"
CACHE="$HERE/.cache/sft_cpu"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="torch==2.13.0"
TRL_SPEC="${TRL_SPEC:-trl}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)

if ! "$PY" -c "import torch, trl, posttrain" >/dev/null 2>&1; then
  echo "[setup] installing $TORCH_SPEC, then $TRL_SPEC, then posttrain (editable)"
  "${PIP[@]}" "$TORCH_SPEC"
  # The constraint keeps trl's and posttrain's requirements from swapping the CPU wheel for a CUDA build.
  echo "$TORCH_SPEC" > "$VENV/torch-constraint.txt"
  "${PIP[@]}" -c "$VENV/torch-constraint.txt" "$TRL_SPEC"
  "${PIP[@]}" -c "$VENV/torch-constraint.txt" -e "$ROOT"
fi
torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
  2.13.0*) ;;
  *) echo "benchmark venv has torch $torch_version, expected 2.13.0 (delete $VENV and rerun)" >&2; exit 1 ;;
esac

if [ ! -f "$CACHE/train.jsonl" ] || [ ! -f "$CACHE/model/model.safetensors" ]; then
  echo "[setup] building tiny model, tokenizer and data in $CACHE"
  HF_HUB_OFFLINE=1 "$PY" "$HERE/make_assets.py" --out "$CACHE"
fi

mkdir -p "$HERE/results"
rm -rf "$HERE/.cache/work"
start=$(date +%s)
HF_HUB_OFFLINE=1 "$PY" "$HERE/sft_report.py" --cache "$CACHE" --results "$HERE/results"
echo "[done] $(( $(date +%s) - start )) s; see benchmarks/results/sft_cpu.md"
