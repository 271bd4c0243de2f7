#!/usr/bin/env bash
# One GPU check (scripts/README.md "GPU check"): on a machine with one CUDA GPU and its own torch, install
# the project's missing packages from the wheels in .whl/ (scripts/gpu_wheels.sh fetches them), then run,
# each step under `timeout` and inside one overall budget, its output kept in results/gpu_check/ whatever
# a later step does:
#   pytest -m gpu tests/test_gpu.py; a 200-step training run of the owt_dblocks 125M shape on the embedded
#   corpus; the same shape 30 steps with dblocks.offload none / block / block with block_step host (step time
#   and device memory of the offload modes); bench_throughput.py and bench_memory.py for 125M at seq 1024 (bf16, compile off and on); the
#   1B throughput if time is left.
# It ends by writing results/gpu_<card>.md, .json and _artifacts.tar.gz (every log and benchmark file).
#
# env vars (default):
#   PYTHON              interpreter with the machine's torch (python3)
#   GPU_CHECK_BUDGET_S  wall-clock budget of all steps; a step gets at most what is left (525)
#   GPU_CHECK_SITE      where the wheels are installed, put first on PYTHONPATH (/tmp/site)
#   GPU_CHECK_WORK      step logs and outputs (results/gpu_check)
#   GPU_CHECK_RESULTS   where the report goes (results; in a dry run GPU_CHECK_WORK)
#   GPU_CHECK_DRY_RUN   1: install and run nothing; print each step's command, and probe its entry point
#                       instead (all probes in one Python process: the wheel list, imports of the scripts and
#                       test module, the training config with its overrides, the environment); the report is
#                       gpu_dry_run.md
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-525}
SITE=${GPU_CHECK_SITE:-/tmp/site}
WORK=${GPU_CHECK_WORK:-results/gpu_check}
DRY=${GPU_CHECK_DRY_RUN:-0}
if [[ $DRY == 1 ]]; then RESULTS=${GPU_CHECK_RESULTS:-$WORK}; else RESULTS=${GPU_CHECK_RESULTS:-results}; fi
export GPU_CHECK_BUDGET_S=$BUDGET GPU_CHECK_DRY_RUN=$DRY PYTHONUNBUFFERED=1
if [[ $DRY == 1 ]]; then  # nothing is installed: do not pick up an old $SITE
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
else
    export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
fi
T0=$(date +%s)
rm -rf "$WORK"
mkdir -p "$WORK"
: > "$WORK/steps.tsv"

record() {  # name rc seconds limit command
    printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$WORK/steps.tsv"
}

# step NAME LIMIT_S PROBE CMD...: run CMD under `timeout` (at most what is left of the budget) with its
# output in $WORK/NAME.log; in a dry run print CMD and queue PROBE (gpu_check_tools.py probe's syntax).
step() {
    local name=$1 limit=$2 probe=$3
    shift 3
    local start rc left
    start=$(date +%s)
    if [[ $DRY == 1 ]]; then
        echo "[$name] would run (timeout ${limit}s): $*"
        printf '%s\t%s\t%s\t%s\n' "$name" "$limit" "$probe" "$(printf '%q ' "$@")" >> "$WORK/probes.tsv"
        return
    fi
    left=$(( BUDGET - (start - T0) ))
    if (( left < 30 )); then
        echo "[$name] skipped: ${left}s of the budget left"
        record "$name" -1 0 "$limit" "$(printf '%q ' "$@")"
        return
    fi
    (( limit > left )) && limit=$left
    echo "[$name] $(date +%T) timeout ${limit}s: $*"
    timeout -k 10 "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    echo "[$name] rc=$rc after $(( $(date +%s) - start ))s"
    record "$name" "$rc" "$(( $(date +%s) - start ))" "$limit" "$(printf '%q ' "$@")"
}

TOOLS="$PY scripts/gpu_check_tools.py"
OWT="$WORK/owt_embedded.toml"
$TOOLS owt-config "$OWT"
TRAIN_ARGS=(--training.steps 200 --training.local_batch_size 32 --training.global_batch_size 32
            --lr_scheduler.warmup_steps 20 --validator.no-enable --checkpoint.no-enable --metrics.log_freq 10
            --metrics.no-enable-tensorboard --dump_folder "$WORK/train_125M")
OFFLOAD_ARGS=(--training.steps 30 --training.local_batch_size 8 --training.global_batch_size 8
              --lr_scheduler.warmup_steps 5 --validator.no-enable --checkpoint.no-enable --metrics.log_freq 1
              --metrics.no-enable-tensorboard)
BENCH=(--flavor 125M --seq 1024 --batch 8)

step install 120 "wheels" \
    bash -c "$TOOLS wheels .whl && $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE .whl/*.whl"
step env 60 "env $WORK/env.json" \
    $TOOLS env "$WORK/env.json"
step pytest_gpu 270 "import tests/test_gpu.py" \
    $PY -m pytest -v -rA -m gpu tests/test_gpu.py tests/test_offload.py --continue-on-collection-errors \
        --junitxml="$WORK/pytest_gpu.xml"
step train_125M 150 "config $OWT ${TRAIN_ARGS[*]}" \
    $PY -m dblocks_titan.train --job.config_file "$OWT" "${TRAIN_ARGS[@]}"
for variant in none block host; do  # offload_<variant>: the step time and memory of each offload mode
    case $variant in
        none) flags=(--dblocks.offload none) ;;
        block) flags=(--dblocks.offload block) ;;
        host) flags=(--dblocks.offload block --dblocks.block_step host) ;;
    esac
    step "offload_$variant" 75 "config $OWT ${OFFLOAD_ARGS[*]} ${flags[*]}" \
        $PY -m dblocks_titan.train --job.config_file "$OWT" "${OFFLOAD_ARGS[@]}" "${flags[@]}" \
            --dump_folder "$WORK/offload_$variant"
done
step throughput_125M 90 "import scripts/bench_throughput.py" \
    $PY scripts/bench_throughput.py "${BENCH[@]}" --variants B=4 --mdlm-flavor owt --mdlm-layers 12 --warmup 4 \
        --steps 12 --profile-steps 4 --amp bf16 --out "$WORK/throughput_125M.md" --png "$WORK/throughput_125M.png"
step throughput_125M_compile 150 "import scripts/bench_throughput.py" \
    $PY scripts/bench_throughput.py "${BENCH[@]}" --variants "DB AR" --warmup 4 --steps 12 --profile-steps 0 \
        --amp bf16 --compile --out "$WORK/throughput_125M_compile.md" --png ""
step memory_125M 90 "import scripts/bench_memory.py" \
    $PY scripts/bench_memory.py "${BENCH[@]}" --rows B=4 --blocks first --no-peak-tracker --amp bf16 \
        --mdlm-flavor owt --mdlm-layers 12 --out "$WORK/memory_125M.md" --png "$WORK/memory_125M.png"
step memory_125M_compile 120 "import scripts/bench_memory.py" \
    $PY scripts/bench_memory.py "${BENCH[@]}" --rows B=4 --blocks first --no-peak-tracker --amp bf16 --compile \
        --out "$WORK/memory_125M_compile.md" --png ""
step throughput_1B 90 "import scripts/bench_throughput.py" \
    $PY scripts/bench_throughput.py --flavor 1B --seq 1024 --batch 4 --variants "DB AR" --warmup 4 --steps 10 \
        --profile-steps 0 --amp bf16 --out "$WORK/throughput_1B.md" --png ""

if [[ $DRY == 1 ]]; then
    $TOOLS probe "$WORK"  # runs the queued probes, records each step's status in steps.tsv
fi
echo "steps done after $(( $(date +%s) - T0 ))s; writing the report"
timeout 60 $TOOLS report "$WORK" "$RESULTS"
