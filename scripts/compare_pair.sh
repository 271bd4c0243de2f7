#!/usr/bin/env bash
# A CPU AR comparison, trained, evaluated and reported (results/compare_<pair>/):
#   bash scripts/compare_pair.sh debug   the default pair: debug_dblocks.toml (600 steps, B = 4) and its titan
#                                        twin (150 steps: equal layer-updates); samples scored by the twin.
#   bash scripts/compare_pair.sh long    the same shapes trained 10x longer: the twin 1500 steps, DB 2647 steps
#                                        (equal layer-FLOPs: a DB step costs 340/600 of a twin step; its step
#                                        1500 is the equal-token point); samples scored by a reference that is
#                                        neither model (train_configs/reference_llama_12l.toml, trained first).
# Each run is evaluated by `python -m dblocks_titan.eval` the same way (held-out CE; DB: CE at sigma_max and
# the sampler CE; generation scored by the reference: gen-ppl, distinct-n, repetition, MAUVE), then
# scripts/compare_runs.py. Runs that already have a checkpoint are not retrained.
# Env: PY (default .venv/bin/python), OUT (run folders, default outputs/compare_<pair>), RESULTS, EVAL_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=${1:-debug}
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/compare_$PAIR}
RESULTS=${RESULTS:-results/compare_$PAIR}
EVAL_FLAGS=${EVAL_FLAGS:---eval.prompts 200 --eval.continuations 5 --eval.new_tokens 50 --validator.steps 20}
CKPT="--checkpoint.enable --checkpoint.interval 100000"
E2E=train_configs/debug_llama_baseline.toml
DB=train_configs/debug_dblocks.toml
case "$PAIR" in
  debug)
    E2E_FLAGS="" DB_FLAGS=""
    REF_CONFIG=$E2E REF_DUMP=$OUT/llama3 REF_NAME="the e2e twin's checkpoint" ;;
  long)
    E2E_FLAGS="--training.steps 1500 --lr_scheduler.warmup_steps 100 --validator.freq 100"
    DB_FLAGS="--training.steps 2647 --lr_scheduler.warmup_steps 176 --validator.freq 250"
    REF_CONFIG=train_configs/reference_llama_12l.toml REF_DUMP=$OUT/reference
    REF_NAME="titan llama3 12 x 128 trained 3000 steps ($REF_CONFIG), neither of the compared models" ;;
  *) echo "usage: bash scripts/compare_pair.sh [debug | long]" >&2; exit 2 ;;
esac
REF="--eval.reference_config $REF_CONFIG --eval.reference_dump $REF_DUMP"
trained() { compgen -G "$1/checkpoint/step-*/.metadata" > /dev/null; }
train() { local dump=$1; shift; trained "$dump" || $PY -m dblocks_titan.train "$@" --dump_folder "$dump" $CKPT; }
set -x
[ "$REF_DUMP" = "$OUT/llama3" ] || train "$REF_DUMP" --job.config_file "$REF_CONFIG"
train "$OUT/llama3" --job.config_file $E2E $E2E_FLAGS
train "$OUT/dblocks" --job.config_file $DB $DB_FLAGS
$PY -m dblocks_titan.eval --job.config_file $E2E $E2E_FLAGS --dump_folder "$OUT/llama3" $REF $EVAL_FLAGS
$PY -m dblocks_titan.eval --job.config_file $DB $DB_FLAGS --dump_folder "$OUT/dblocks" $REF $EVAL_FLAGS
$PY scripts/compare_runs.py "$OUT/llama3" "$OUT/dblocks" --labels "titan e2e" "DiffusionBlocks B=4" --out $RESULTS
set +x
cat >> $RESULTS/report.md <<NOTE

## How this report was made

\`bash scripts/compare_pair.sh $PAIR\` on $(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc) CPU cores, no GPU ($(date -u +%Y-%m-%d)), which runs
(a run with a checkpoint in its folder is not retrained):

\`\`\`bash
$([ "$REF_DUMP" = "$OUT/llama3" ] || echo "$PY -m dblocks_titan.train --job.config_file $REF_CONFIG --dump_folder $REF_DUMP $CKPT")
$PY -m dblocks_titan.train --job.config_file $E2E $E2E_FLAGS --dump_folder $OUT/llama3 $CKPT
$PY -m dblocks_titan.train --job.config_file $DB $DB_FLAGS --dump_folder $OUT/dblocks $CKPT
$PY -m dblocks_titan.eval --job.config_file $E2E $E2E_FLAGS --dump_folder $OUT/llama3 $REF $EVAL_FLAGS
$PY -m dblocks_titan.eval --job.config_file $DB $DB_FLAGS --dump_folder $OUT/dblocks $REF $EVAL_FLAGS
$PY scripts/compare_runs.py $OUT/llama3 $OUT/dblocks --labels "titan e2e" "DiffusionBlocks B=4" --out $RESULTS
\`\`\`

Generation: $EVAL_FLAGS (the paper's protocol is 1000 prompts × 5 continuations of 50 tokens), DB sampler
with the eval command's default chain, temperature 1, top-p 1; gen-ppl and MAUVE under $REF_NAME as the
reference model (MAUVE features: its final hidden states mean-pooled over the continuation).
NOTE
