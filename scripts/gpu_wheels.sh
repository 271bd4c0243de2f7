#!/usr/bin/env bash
# Download the wheels of scripts/gpu_wheels.txt for the GPU machine (CPython 3.12, manylinux x86-64)
# into .whl/ (git-ignored; it travels with the working tree through the device tool's `carry`).
# Pure-Python wheels come as py3-none-any. No dependencies are resolved (--no-deps): the list names
# every package the machine lacks. Re-running replaces .whl/. GPU_WHEELS_DRY_RUN=1 prints the
# commands and downloads nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
mapfile -t PINS < <(grep -v '^\s*#' scripts/gpu_wheels.txt | grep -v '^\s*$')
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$p")
done
CMD=("$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
     "${PLATFORMS[@]}" -d "$DEST")
if [[ ${GPU_WHEELS_DRY_RUN:-0} == 1 ]]; then
    echo "rm -rf $DEST"
    for pin in "${PINS[@]}"; do echo "${CMD[*]} $pin"; done
    exit 0
fi
rm -rf "$DEST"
mkdir -p "$DEST"
for pin in "${PINS[@]}"; do
    "${CMD[@]}" -q "$pin"
done
ls -l "$DEST"
du -sh "$DEST"
