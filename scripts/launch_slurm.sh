#!/usr/bin/env bash
#SBATCH --job-name=dblocks
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
# SLURM multi-node launcher: one torchrun per node (srun), c10d rendezvous on the allocation's first
# node. Submit with `sbatch scripts/launch_slurm.sh CONFIG [overrides...]` (edit the #SBATCH lines
# above, or override them on the sbatch command line), or run it with bash inside an allocation.
# DRY_RUN=1 prints the command instead of running it, also outside an allocation; --help lists the
# env vars (also in scripts/README.md).
set -euo pipefail

usage() {
    cat <<'EOF'
usage: sbatch scripts/launch_slurm.sh CONFIG [--section.key value ...]
       (or, inside an allocation: bash scripts/launch_slurm.sh CONFIG [...])

Runs, once per node:
  srun --nodes=NNODES --ntasks=NNODES --ntasks-per-node=1 --kill-on-bad-exit=1 [SRUN_ARGS] \
    TORCHRUN --nnodes=NNODES --nproc_per_node=GPUS_PER_NODE --rdzv_backend=c10d \
    --rdzv_endpoint=HEAD:MASTER_PORT --rdzv_id=$SLURM_JOB_ID --max-restarts=MAX_RESTARTS \
    -m MODULE --job.config_file CONFIG [overrides...]

env vars (default):
  NNODES            nodes ($SLURM_NNODES; outside an allocation 1)
  HEAD_NODE         rendezvous host (first of `scontrol show hostnames $SLURM_JOB_NODELIST`;
                    outside an allocation localhost)
  HEAD_NODE_IP      use this address instead of HEAD_NODE's name in the endpoint (unset)
  MASTER_PORT       rendezvous port (29500)
  GPUS_PER_NODE     processes per node ($SLURM_GPUS_ON_NODE, else $SLURM_GPUS_PER_NODE, else 8)
  MAX_RESTARTS      torchrun restarts of the whole job after a failure (0; use with
                    --checkpoint.enable so that a restart resumes from the last checkpoint)
  MODULE            entry point (dblocks_titan.train; dblocks_titan.eval evaluates a checkpoint)
  TORCHRUN          torchrun executable (<repo>/.venv/bin/torchrun if present, else torchrun)
  SRUN_ARGS         extra srun arguments, split on spaces (unset)
  OMP_NUM_THREADS   threads per process ($SLURM_CPUS_PER_TASK / GPUS_PER_NODE, at least 1)
  NCCL_DEBUG        NCCL log level (WARN)
  PYTHONUNBUFFERED  unbuffered Python output, so logs reach the job's output file promptly (1)
  DRY_RUN           1: print the command (with its env vars) and run nothing (0)
read from SLURM: SLURM_JOB_ID, SLURM_NNODES, SLURM_JOB_NODELIST, SLURM_GPUS_ON_NODE,
  SLURM_GPUS_PER_NODE, SLURM_CPUS_PER_TASK (also passed to srun as --cpus-per-task), SLURM_SUBMIT_DIR
EOF
}

die() { echo "launch_slurm.sh: $*" >&2; exit 1; }

if [[ $# -eq 0 ]]; then usage >&2; exit 1; fi
if [[ $1 == -h || $1 == --help ]]; then usage; exit 0; fi
CONFIG=$1
shift
[[ -f $CONFIG ]] || die "config file not found: $CONFIG"
DRY=${DRY_RUN:-0}

# sbatch runs a copy of this script from its spool folder: find the repo from the submit dir then.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[[ -d $ROOT/dblocks_titan ]] || ROOT=${SLURM_SUBMIT_DIR:-$PWD}
if [[ -x $ROOT/.venv/bin/torchrun ]]; then TORCHRUN=${TORCHRUN:-$ROOT/.venv/bin/torchrun}; fi
TORCHRUN=${TORCHRUN:-torchrun}
MODULE=${MODULE:-dblocks_titan.train}
MASTER_PORT=${MASTER_PORT:-29500}
MAX_RESTARTS=${MAX_RESTARTS:-0}

DEFAULTED=""  # values neither given nor found in SLURM's env, named in the dry run's comment
if [[ -n ${SLURM_JOB_ID:-} ]]; then
    NNODES=${NNODES:-${SLURM_NNODES:?}}
    if [[ -z ${HEAD_NODE:-} ]]; then
        # = `scontrol show hostnames ... | head -n1`, without a pipe that SIGPIPE + pipefail can fail
        HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}") || die "scontrol failed on $SLURM_JOB_NODELIST"
        HEAD_NODE=${HOSTS%%$'\n'*}
        [[ -n $HEAD_NODE ]] || die "scontrol gave no host for SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
    fi
    NOTE="SLURM job $SLURM_JOB_ID (${SLURM_JOB_NODELIST:-nodes not listed})"
else
    [[ $DRY != 0 ]] || die "not inside a SLURM allocation (no SLURM_JOB_ID): submit with sbatch, run inside salloc, or set DRY_RUN=1"
    NOTE="not inside a SLURM allocation"
    [[ -n ${NNODES:-} ]] || { NNODES=1; DEFAULTED+="${DEFAULTED:+, }NNODES=1"; }
    [[ -n ${HEAD_NODE:-} ]] || { HEAD_NODE=localhost; DEFAULTED+="${DEFAULTED:+, }HEAD_NODE=localhost"; }
fi

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}
GPUS_PER_NODE=${GPUS_PER_NODE##*:}  # SLURM_GPUS_PER_NODE may read "h100:8"
[[ -n $GPUS_PER_NODE ]] || { GPUS_PER_NODE=8; DEFAULTED+="${DEFAULTED:+, }GPUS_PER_NODE=8"; }
for v in NNODES GPUS_PER_NODE MASTER_PORT; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || die "$v must be a positive integer, got '${!v}'"
done
[[ $MAX_RESTARTS =~ ^[0-9]+$ ]] || die "MAX_RESTARTS must be a non-negative integer, got '$MAX_RESTARTS'"
CPUS=${SLURM_CPUS_PER_TASK:-$(nproc)}
OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CPUS / GPUS_PER_NODE > 0 ? CPUS / GPUS_PER_NODE : 1 ))}

ENV=("OMP_NUM_THREADS=$OMP_NUM_THREADS" "NCCL_DEBUG=${NCCL_DEBUG:-WARN}"
     "PYTHONUNBUFFERED=${PYTHONUNBUFFERED:-1}")
read -r -a EXTRA <<< "${SRUN_ARGS:-}"
SRUN=(srun "--nodes=$NNODES" "--ntasks=$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1
      ${SLURM_CPUS_PER_TASK:+"--cpus-per-task=$SLURM_CPUS_PER_TASK"} "${EXTRA[@]}")
CMD=("$TORCHRUN" "--nnodes=$NNODES" "--nproc_per_node=$GPUS_PER_NODE" --rdzv_backend=c10d
     "--rdzv_endpoint=${HEAD_NODE_IP:-$HEAD_NODE}:$MASTER_PORT" "--rdzv_id=${SLURM_JOB_ID:-none}"
     "--max-restarts=$MAX_RESTARTS" -m "$MODULE" --job.config_file "$CONFIG" "$@")

if [[ $DRY != 0 ]]; then
    echo "# $NOTE: $NNODES node(s) x $GPUS_PER_NODE processes, rendezvous at" \
         "${HEAD_NODE_IP:-$HEAD_NODE}:$MASTER_PORT${DEFAULTED:+ (not given, so defaulted: $DEFAULTED)}"
    line=$(printf '%q ' "${ENV[@]}" "${SRUN[@]}" "${CMD[@]}")
    echo "${line% }"
    exit 0
fi
exec env "${ENV[@]}" "${SRUN[@]}" "${CMD[@]}"
