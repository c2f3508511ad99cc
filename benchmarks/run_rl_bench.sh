#!/usr/bin/env bash
# One command: online RL on CPU, posttrain vs TRL: GRPO (β = 0 and β > 0) against GRPOTrainer,
# RLOO (β = 0) against RLOOTrainer.
#
#   bash benchmarks/run_rl_bench.sh
#
# Uses (or creates) benchmarks/.venv-trl through venv.sh, as run_dpo_bench.sh does
# (torch==2.13.0 CPU wheel first, then trl and peft, then posttrain in editable mode under a
# torch constraint); builds the policy and the prompt file under benchmarks/.cache/rl_cpu/ if
# missing; runs the interleaved repeats; writes benchmarks/results/rl_cpu.md and rl_cpu.json.
#
# Knobs (environment): BENCH_ROUNDS (2), BENCH_STEPS (6; the first is warm-up, not timed),
# BENCH_PROMPTS (4 prompts per step), BENCH_G (8 completions per prompt), BENCH_NEW_TOKENS
# (32), BENCH_BETA (0.04, the grpo_kl case), BENCH_RUNS (case:tool:variant list, see
# benchmarks/rl/report.py; cases grpo, grpo_kl, rloo), BENCH_PROFILE (cpu, or cpu32k: the same
# model with a 32,768-token vocabulary), BENCH_NAME (results/NAME.md; rl_PROFILE), PYTHON
# (python3), TRL_SPEC (trl).
# About 20 minutes with the defaults on 2 idle cores.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
PROFILE="${BENCH_PROFILE:-cpu}"  # cpu: vocab 1,024 (the tiny preset's); cpu32k: the same model with 32,768
CACHE="$HERE/.cache/rl_$PROFILE"
NAME="${BENCH_NAME:-rl_$PROFILE}"
PROMPTS=256
# shellcheck source=benchmarks/venv.sh
source "$HERE/venv.sh"
bench_venv "torch, trl, peft, datasets, posttrain" peft

if [ ! -f "$CACHE/model/model.safetensors" ] || [ "$(wc -l < "$CACHE/prompts.jsonl" 2>/dev/null || echo 0)" -ne "$PROMPTS" ]; then
  echo "[setup] building the policy and $PROMPTS prompts in $CACHE"
  HF_HUB_OFFLINE=1 "$PY" "$HERE/rl/make_assets.py" --out "$CACHE" --prompts "$PROMPTS" --profile "$PROFILE"
fi

mkdir -p "$HERE/results"
rm -rf "$HERE/.cache/rl_work"
start=$(date +%s)
RL_BENCH_CMD="${BENCH_PROFILE:+BENCH_PROFILE=$PROFILE }${BENCH_NAME:+BENCH_NAME=$NAME }${BENCH_ROUNDS:+BENCH_ROUNDS=$BENCH_ROUNDS }${BENCH_RUNS:+BENCH_RUNS=$BENCH_RUNS }bash benchmarks/run_rl_bench.sh" HF_HUB_OFFLINE=1 \
  "$PY" "$HERE/rl/report.py" --cache "$CACHE" --results "$HERE/results" --name "$NAME"
echo "[done] $(( $(date +%s) - start )) s; see benchmarks/results/$NAME.md"
