#!/usr/bin/env bash
# A CPU AR comparison, trained, evaluated and reported (results/compare_<pair>/):
#   bash scripts/compare_pair.sh debug   the default pair: debug_dblocks.toml (600 steps, B = 4) and its titan
#                                        twin (150 steps: equal layer-updates); samples scored by the twin.
#   bash scripts/compare_pair.sh long    the same shapes trained 10x longer: the twin 1500 steps, DB 2647 steps
#                                        (equal layer-FLOPs: a DB step costs 340/600 of a twin step; its step
#                                        1500 is the equal-token point); samples scored by a reference that is
#                                        neither model (train_configs/reference_llama_12l.toml, trained first).
# Each run is evaluated by `python -m dblocks_titan.eval` the same way (held-out CE; DB: CE at sigma_max and
# the sampler CE; generation scored by the reference: gen-ppl, distinct-n, repetition, MAUVE; the DB run
# also with the ancestral chain), then
# scripts/compare_runs.py. Runs that already have a checkpoint are not retrained.
# Env: SEED (training seed of both runs, default 0: results/compare_<pair>_s<SEED> otherwise), PY (default
# .venv/bin/python), OUT (run folders, default outputs/compare_<pair>[_s<SEED>]), RESULTS, REF_DUMP (long: the
# reference's folder, shared by every seed), EVAL_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=${1:-debug}
SEED=${SEED:-0}
TAG=$PAIR$([ "$SEED" = 0 ] || echo "_s$SEED")
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/compare_$TAG}
RESULTS=${RESULTS:-results/compare_$TAG}
EVAL_FLAGS=${EVAL_FLAGS:---eval.prompts 200 --eval.continuations 5 --eval.new_tokens 50 --validator.steps 20}
CKPT="--checkpoint.enable --checkpoint.interval 100000"
E2E=train_configs/debug_llama_baseline.toml
DB=train_configs/debug_dblocks.toml
case "$PAIR" in
  debug)
    E2E_FLAGS="--debug.seed $SEED" DB_FLAGS="--debug.seed $SEED --dblocks.seed $SEED"
    REF_CONFIG=$E2E REF_DUMP=$OUT/llama3 REF_NAME="the e2e twin's checkpoint" ;;
  long)
    E2E_FLAGS="--training.steps 1500 --lr_scheduler.warmup_steps 100 --validator.freq 100 --debug.seed $SEED"
    DB_FLAGS="--training.steps 2647 --lr_scheduler.warmup_steps 176 --validator.freq 250 --debug.seed $SEED --dblocks.seed $SEED"
    REF_CONFIG=train_configs/reference_llama_12l.toml REF_DUMP=${REF_DUMP:-outputs/compare_long/reference}
    REF_NAME="titan llama3 12 x 128 trained 3000 steps ($REF_CONFIG), neither of the compared models" ;;
  *) echo "usage: bash scripts/compare_pair.sh [debug | long]" >&2; exit 2 ;;
esac
REF="--eval.reference_config $REF_CONFIG --eval.reference_dump $REF_DUMP"
ANCESTRAL="--eval.bridge sample --eval.solver ancestral"
trained() { compgen -G "$1/checkpoint/step-*/.metadata" > /dev/null; }
# keep RUN [TAG]: the run's latest eval JSON into $RESULTS as eval_<RUN><TAG>_step<N>.json
keep() { local f; f=$(ls -v "$OUT/$1"/checkpoint/eval_step*.json | tail -1); mkdir -p "$RESULTS"
         cp "$f" "$RESULTS/eval_$1${2:-}_$(basename "$f" | sed 's/^eval_//')"; }
# every command goes into COMMANDS (the report's list), a training whether or not it runs
COMMANDS=()
note() { local c; printf -v c '%q ' "$@"; COMMANDS+=("${c% }"); }
run() { note "$@"; echo "+ ${COMMANDS[-1]}" >&2; "$@"; }
train() { local dump=$1; shift; set -- $PY -m dblocks_titan.train "$@" --dump_folder "$dump" $CKPT
          if trained "$dump"; then note "$@"; else run "$@"; fi; }
[ "$REF_DUMP" = "$OUT/llama3" ] || train "$REF_DUMP" --job.config_file "$REF_CONFIG"
train "$OUT/llama3" --job.config_file $E2E $E2E_FLAGS
train "$OUT/dblocks" --job.config_file $DB $DB_FLAGS
run $PY -m dblocks_titan.eval --job.config_file $E2E $E2E_FLAGS --dump_folder "$OUT/llama3" $REF $EVAL_FLAGS
keep llama3
run $PY -m dblocks_titan.eval --job.config_file $DB $DB_FLAGS --dump_folder "$OUT/dblocks" $REF $EVAL_FLAGS $ANCESTRAL
keep dblocks _ancestral
run $PY -m dblocks_titan.eval --job.config_file $DB $DB_FLAGS --dump_folder "$OUT/dblocks" $REF $EVAL_FLAGS
keep dblocks
run $PY scripts/compare_runs.py "$OUT/llama3" "$OUT/dblocks" --labels "titan e2e" "DiffusionBlocks B=4" --out $RESULTS
cat >> $RESULTS/report.md <<NOTE

## How this report was made

\`SEED=$SEED bash scripts/compare_pair.sh $PAIR\` on $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPU cores, no GPU ($(date -u +%Y-%m-%d)), which runs
(a run with a checkpoint in its folder is not retrained):

\`\`\`bash
$(printf '%s\n' "${COMMANDS[@]}")
\`\`\`

Generation: $EVAL_FLAGS (the paper's protocol is 1000 prompts × 5 continuations of 50 tokens), temperature 1,
top-p 1; the DB sampler with the eval command's default chain (the paper's: Euler, soft bridge, N = B levels: the
table above) and with the ancestral chain ($ANCESTRAL: \`eval_dblocks_ancestral_step*.json\`); gen-ppl and MAUVE
under $REF_NAME as the reference model (MAUVE features: its final hidden states mean-pooled over the
continuation). Each run's eval JSON is kept here as \`eval_<run>[_ancestral]_step<N>.json\`.
NOTE
