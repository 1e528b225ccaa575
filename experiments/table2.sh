#!/usr/bin/env bash
# Table 2 of the paper on the real data sets: the ablations, all trained on the five domains:
# full PromptReg (configs/all_domains.py), w/o RPG (configs/ablation_no_rpg.py: plain RDP) and
# w/o R. Cons. (configs/ablation_no_constraints.py: L_ort and L_ts weighted 0); each evaluated at
# original resolution, then one markdown table.
#
#   experiments/table2.sh DATA_ROOT [RUNS_DIR] [extra training flags...]
#
# RUNS_DIR defaults to runs/table2. Set FULL_RUN=runs/table1/all_domains to reuse the Table 1
# training for the "full" row instead of training it again. Rerunning resumes unfinished runs.
set -euo pipefail
DATA_ROOT=${1:?usage: experiments/table2.sh DATA_ROOT [RUNS_DIR] [extra training flags...]}
shift
RUNS=runs/table2
if [[ $# -gt 0 && $1 != --* ]]; then RUNS=$1; shift; fi
PY=${PYTHON:-python}
FULL=${FULL_RUN:-$RUNS/full}

train_and_eval() {  # config workdir label [flags...]
    local config=$1 workdir=$2 label=$3
    shift 3
    "$PY" -m promptreg_jax.train --config "$config" --workdir "$workdir" \
        --config.data.root="$DATA_ROOT" "$@"
    "$PY" -m promptreg_jax.evaluate --workdir "$workdir" --name "$label"
}

train_and_eval configs/all_domains.py "$FULL" "PromptReg (full)" "$@"
train_and_eval configs/ablation_no_rpg.py "$RUNS/no_rpg" "w/o RPG" "$@"
train_and_eval configs/ablation_no_constraints.py "$RUNS/no_constraints" "w/o R. Cons." "$@"
"$PY" experiments/make_table.py --initial --out "$RUNS/table2.md" \
    --title "Table 2: ablations (Dice per domain)" \
    "PromptReg (full)=$FULL/eval" "w/o RPG=$RUNS/no_rpg/eval" \
    "w/o R. Cons.=$RUNS/no_constraints/eval"
echo "wrote $RUNS/table2.md"
