#!/usr/bin/env bash
# Reproduce results/compare_debug/ on CPU: the DiffusionBlocks debug run (600 steps, B = 4) and its titan
# e2e twin (150 steps), each evaluated by `python -m dblocks_titan.eval` the same way (held-out CE,
# generation scored by the twin as reference model: gen-ppl, distinct-n, repetition, MAUVE), then
# scripts/compare_runs.py. Env: PY (default .venv/bin/python), OUT (run folders), EVAL_FLAGS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-outputs/compare_debug}
EVAL_FLAGS=${EVAL_FLAGS:---eval.prompts 200 --eval.continuations 5 --eval.new_tokens 50 --validator.steps 20}
CKPT="--checkpoint.enable --checkpoint.interval 100000"
E2E=train_configs/debug_llama_baseline.toml
DB=train_configs/debug_dblocks.toml
REF="--eval.reference_config $E2E --eval.reference_dump $OUT/llama3"
set -x
$PY -m dblocks_titan.train --job.config_file $E2E --dump_folder "$OUT/llama3" $CKPT
$PY -m dblocks_titan.train --job.config_file $DB --dump_folder "$OUT/dblocks" $CKPT
$PY -m dblocks_titan.eval --job.config_file $E2E --dump_folder "$OUT/llama3" $REF $EVAL_FLAGS
$PY -m dblocks_titan.eval --job.config_file $DB --dump_folder "$OUT/dblocks" $REF $EVAL_FLAGS
$PY scripts/compare_runs.py "$OUT/llama3" "$OUT/dblocks" --labels "titan e2e" "DiffusionBlocks B=4" --out results/compare_debug
set +x
cat >> results/compare_debug/report.md <<NOTE

## How this report was made

\`bash scripts/compare_debug.sh\` on $(nproc) CPU cores, no GPU ($(date -u +%Y-%m-%d)), which runs:

\`\`\`bash
$PY -m dblocks_titan.train --job.config_file $E2E --dump_folder $OUT/llama3 $CKPT
$PY -m dblocks_titan.train --job.config_file $DB --dump_folder $OUT/dblocks $CKPT
$PY -m dblocks_titan.eval --job.config_file $E2E --dump_folder $OUT/llama3 $REF $EVAL_FLAGS
$PY -m dblocks_titan.eval --job.config_file $DB --dump_folder $OUT/dblocks $REF $EVAL_FLAGS
$PY scripts/compare_runs.py $OUT/llama3 $OUT/dblocks --labels "titan e2e" "DiffusionBlocks B=4" --out results/compare_debug
\`\`\`

Generation: $EVAL_FLAGS (the paper's protocol is 1000 prompts × 5 continuations of 50 tokens), DB sampler
with the soft bridge and N = B levels, temperature 1, top-p 1; gen-ppl and MAUVE under the e2e twin's
checkpoint as the reference model (MAUVE features: its final hidden states mean-pooled over the continuation).
NOTE
