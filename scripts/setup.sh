#!/usr/bin/env bash
# Create (or reuse) .venv and install posttrain with its test extras.
# torch is pinned to 2.13.0 here (a local CPU wheel on our machines; pyproject keeps a range).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.posttrain-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1) torch==${TORCH_VERSION:-2.13.0}"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
  .venv/bin/python -m pip install -q -e ".[test]"
  echo "$want" > "$stamp"
fi
