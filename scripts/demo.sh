#!/usr/bin/env bash
# Set up (first time only) and run the demo: SFT, reward model, DPO and a report on the tiny preset.
# Arguments go to `posttrain demo`: --output-dir DIR, KEY=value (every stage), STAGE.KEY=value (sft, rm, dpo, report).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/posttrain demo "$@"
