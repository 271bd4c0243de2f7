#!/usr/bin/env bash
# Create .venv (once) and install dblocks_titan with its test extra, editable.
# `pip install torch==2.13.0` takes the CPU build lying on these machines' disk when present.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import dblocks_titan, torchtitan, pytest, xdist, mauve, matplotlib" 2>/dev/null; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q torch==2.13.0
    .venv/bin/python -m pip install -q -e ".[test]"
fi
