#!/usr/bin/env bash
# Set up (first time only) and run the demo: SFT of the tiny preset on synthetic tasks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/posttrain demo "$@"
