#!/usr/bin/env bash
# README command 2 (and CI): set up, then run the whole test suite on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# one worker per core (pytest-xdist; a test file stays on one worker, so its module fixtures are built once),
# one thread per process: the 2-rank tests start two processes each. The cores are counted before
# OMP_NUM_THREADS is set: GNU nproc reports OMP_NUM_THREADS when it is set (so it said 1 worker).
workers="$(nproc)"
export OMP_NUM_THREADS=1
.venv/bin/python -m pytest -q -n "$workers" --dist loadfile "$@"
