#!/usr/bin/env bash
# Table 1 of the paper on the real data sets: PromptReg trained on all five domains, and the five
# leave-one-out trainings (the held-out domain evaluated zero-shot); then every run is evaluated
# at original resolution and the rows are assembled into one markdown table.
#
#   experiments/table1.sh DATA_ROOT [RUNS_DIR] [extra training flags...]
#
# DATA_ROOT holds Abdominal/ Brain/ Hippocampus/ Cardiac/ Hip/ in the authors' layout (see
# configs/all_domains.py); RUNS_DIR defaults to runs/table1. Extra flags go to every training,
# e.g. --config.train.epochs=100 or --config.model.dtype=bfloat16. Rerunning resumes unfinished
# trainings from their checkpoints and re-evaluates. Expect days per training on one GPU.
set -euo pipefail
DATA_ROOT=${1:?usage: experiments/table1.sh DATA_ROOT [RUNS_DIR] [extra training flags...]}
shift
RUNS=runs/table1
if [[ $# -gt 0 && $1 != --* ]]; then RUNS=$1; shift; fi
PY=${PYTHON:-python}
DOMAINS=(abdominal brain hippocampus cardiac hip)
NAMES=(Abdominal Brain Hippocampus Cardiac Hip)

"$PY" -m promptreg_jax.train --config configs/all_domains.py --workdir "$RUNS/all_domains" \
    --config.data.root="$DATA_ROOT" "$@"
"$PY" -m promptreg_jax.evaluate --workdir "$RUNS/all_domains" --name "all domains"
ROWS=("all domains=$RUNS/all_domains/eval")
for i in "${!DOMAINS[@]}"; do
    d=${DOMAINS[$i]}
    "$PY" -m promptreg_jax.train --config "configs/leave_one_out.py:$d" --workdir "$RUNS/loo_$d" \
        --config.data.root="$DATA_ROOT" "$@"
    "$PY" -m promptreg_jax.evaluate --workdir "$RUNS/loo_$d" --name "w/o ${NAMES[$i]}"
    ROWS+=("w/o ${NAMES[$i]}=$RUNS/loo_$d/eval")
done
"$PY" experiments/make_table.py --initial --out "$RUNS/table1.md" \
    --title "Table 1: Dice per domain, all domains vs leave one out" "${ROWS[@]}"
echo "wrote $RUNS/table1.md"
