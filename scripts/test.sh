#!/usr/bin/env bash
# Set up (first time only) and run the test suite. Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh || exit 1
# One pytest worker per core (pytest-xdist), a test file per worker at a time (its fixtures are built
# once), one torch thread per worker: tiny models gain nothing from a second thread, and two workers
# with two threads each would fight over the cores. POSTTRAIN_TEST_WORKERS=0 runs in one process.
# Files go out longest first (tests/conftest.py orders them by tests/durations.json; xdist's own
# reorder, by number of tests, is switched off): a long file handed out last idles the other workers.
cores=$(nproc 2>/dev/null || echo 2)
workers=${POSTTRAIN_TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}  # capped: each worker holds its own torch
if [ "$workers" -gt 1 ]; then
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} .venv/bin/python -m pytest -q -n "$workers" --dist loadfile --no-loadscope-reorder --durations=10 "$@"
else
  .venv/bin/python -m pytest -q "$@"
fi
status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$status"
