#!/usr/bin/env bash
# README command 1: set up, then train the default model (train_configs/debug_dblocks.toml) on
# the embedded corpus. Uses every GPU when there are some, else one CPU process.
# Extra arguments are passed on as CLI overrides, e.g. `--training.steps 400`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NGPU=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count())")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)}
.venv/bin/torchrun --standalone --nproc_per_node=$(( NGPU > 0 ? NGPU : 1 )) \
    -m dblocks_titan.train --job.config_file train_configs/debug_dblocks.toml "$@" 2>&1 | tee outputs_debug_dblocks.log
grep -E "dblocks summary|validate step" outputs_debug_dblocks.log | sed 's/\x1b\[[0-9;]*m//g'
