#!/usr/bin/env bash
# One command: every parameter-efficient method on the same tiny model and task, on CPU.
#
#   bash benchmarks/run_peft_bench.sh [extra run.py arguments, e.g. --steps 100 --methods lora,ia3]
#
# Creates (or reuses) the repo's .venv through scripts/setup.sh (torch==2.13.0 + posttrain
# editable); builds the base model under benchmarks/.cache/peft/ if missing or its config
# changed; trains each method in its own child process; writes
# benchmarks/results/peft_cpu.md and peft_cpu.json.
#
# Knobs (environment): BENCH_STEPS (300), BENCH_SEED (0), PYTHON (python3, used by setup.sh).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PY="$ROOT/.venv/bin/python"

bash "$ROOT/scripts/setup.sh"
torch_version="$("$PY" -c 'import torch; print(torch.__version__)')"
case "$torch_version" in
  2.13.0*) ;;
  *) echo "warning: .venv has torch $torch_version; the published numbers used 2.13.0" >&2 ;;
esac

cd "$ROOT"
PEFT_BENCH_CMD="bash benchmarks/run_peft_bench.sh${*:+ $*}" HF_HUB_OFFLINE=1 "$PY" benchmarks/peft/run.py \
  --steps "${BENCH_STEPS:-300}" --seed "${BENCH_SEED:-0}" --out benchmarks/results "$@"
