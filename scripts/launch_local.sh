#!/usr/bin/env bash
# Single-node launcher: torchrun --standalone over every visible GPU (or NPROC processes; one CPU
# process when there is no GPU). Extra arguments are CLI overrides. DRY_RUN=1 prints the command
# instead of running it; --help lists the env vars (also in scripts/README.md). Example:
#   scripts/launch_local.sh train_configs/owt_dblocks.toml --training.steps 1000
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/launch_local.sh CONFIG [--section.key value ...]

Runs on this node:
  OMP_NUM_THREADS=T TORCHRUN --standalone --nproc_per_node=NPROC -m MODULE --job.config_file CONFIG [overrides...]

env vars (default):
  NPROC            processes (the visible GPUs: torch.cuda.device_count(), which honours
                   CUDA_VISIBLE_DEVICES; 1 CPU process when there is none)
  MODULE           entry point (dblocks_titan.train; dblocks_titan.eval evaluates a checkpoint)
  PYTHON           interpreter that counts the GPUs (<repo>/.venv/bin/python if present, else python)
  TORCHRUN         torchrun executable (<repo>/.venv/bin/torchrun if present, else torchrun)
  OMP_NUM_THREADS  threads per process (CPU cores / NPROC, at least 1)
  DRY_RUN          1: print the command (with its env vars) and run nothing (0)
EOF
}

if [[ $# -eq 0 ]]; then usage >&2; exit 1; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi
CONFIG=$1
shift
[[ -f $CONFIG ]] || { echo "launch_local.sh: config file not found: $CONFIG" >&2; exit 1; }

VENV="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin"
if [[ -x $VENV/python ]]; then
    PYTHON=${PYTHON:-$VENV/python}
    TORCHRUN=${TORCHRUN:-$VENV/torchrun}
fi
PYTHON=${PYTHON:-python}
TORCHRUN=${TORCHRUN:-torchrun}
MODULE=${MODULE:-dblocks_titan.train}

if [[ -n ${NPROC:-} ]]; then
    NOTE="NPROC=$NPROC processes"
else
    NGPU=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')
    NPROC=$(( NGPU > 0 ? NGPU : 1 ))
    NOTE="GPUs visible: $NGPU"
    [[ $NGPU -gt 0 ]] || NOTE="no GPU visible: 1 CPU process"
fi
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || { echo "launch_local.sh: NPROC must be a positive integer, got '$NPROC'" >&2; exit 1; }
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}

ENV=("OMP_NUM_THREADS=$OMP_NUM_THREADS")
CMD=("$TORCHRUN" --standalone "--nproc_per_node=$NPROC"
     -m "$MODULE" --job.config_file "$CONFIG" "$@")

if [[ ${DRY_RUN:-0} != 0 ]]; then
    echo "# 1 node, $NOTE"
    line=$(printf '%q ' "${ENV[@]}" "${CMD[@]}")
    echo "${line% }"
    exit 0
fi
exec env "${ENV[@]}" "${CMD[@]}"
