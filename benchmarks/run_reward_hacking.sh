#!/usr/bin/env bash
# Reward hacking, shown: SFT, a flawed reward model, GRPO with KL off and on; see benchmarks/reward_hacking/run.py.
set -euo pipefail; cd "$(dirname "$0")/.." && HF_HUB_OFFLINE=1 nice -n 5 .venv/bin/python benchmarks/reward_hacking/run.py --out benchmarks/results --command "bash benchmarks/run_reward_hacking.sh${*:+ $*}" "$@"
