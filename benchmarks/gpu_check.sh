#!/bin/bash
# The GPU checks of promptreg-jax in one command: the paper's training step and inference on a real
# GPU, beside the authors' PyTorch code on the same card, and the step's memory/time trade-offs.
#
#   OUT=gpu_out REFERENCE_DIR=/path/to/PromptReg bash benchmarks/gpu_check.sh
#
# Environment: OUT (folder for log.txt and the JSON files; default ./gpu_check_out), REFERENCE_DIR
# (a checkout of https://github.com/xiehousheng/PromptReg; without it the port is measured alone),
# PY (an interpreter with jax[cuda], flax, optax, ml_collections, grain, nibabel and torch; default
# python3), SIZE (default 160), REPEATS (timed steps per process, default 5), DEVICE (gpu; cpu
# runs the same stages on the CPU, e.g. SIZE=16 DEVICE=cpu as a dry run), LIMIT_SCALE (multiplies
# every stage's time limit, a decimal; default 1 on a GPU, 4 on a CPU), DEADLINE (seconds: no stage runs past
# this many seconds after the start, each stage's limit is cut to what is left; default none),
# PARITY (0 skips the same-loss check of stage 1; default 1), STAGES (the stages to run, e.g. 3,4,5;
# default all).
# Stages, most important first, each under its own time limit so that one slow stage cannot
# stop the rest: (1) benchmarks/compare_reference.py, training step and inference, port against
# the authors' code (parity checked at 16^3); (2) benchmarks/run.py training step with
# model.remat=levels; (3) the same in bfloat16, without remat; (4) the trainer itself,
# python -m promptreg_jax.train on configs/demo.py:tiny; (5) the training step in float32 with the
# scatter-add sampler (PROMPTREG_SAMPLER).
set -u -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-gpu_check_out}; PY=${PY:-python3}; S=${SIZE:-160}; R=${REPEATS:-5}; DEV=${DEVICE:-gpu}
# Stage time limits are sized for a GPU (its 160^3 compile: minutes); a CPU at 16^3 needs more (x4).
X=${LIMIT_SCALE:-$([ "$DEV" = cpu ] && echo 4 || echo 1)}
DEADLINE=${DEADLINE:-0}
T0=$(date +%s)
# A stage's limit: its own (times X), cut to what is left before DEADLINE (at least 1 s).
lim() {
  local l; l=$(awk -v a="$1" -v x="$X" 'BEGIN { print int(a * x) }')
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$(( DEADLINE - ($(date +%s) - T0) ))
    [ "$left" -lt "$l" ] && l=$left
    [ "$l" -lt 1 ] && l=1
  fi
  echo "$l"
}
STAGES=${STAGES:-1,2,3,4,5}
want() { [[ ",$STAGES," == *",$1,"* ]]; }
mkdir -p "$OUT"
LOG=$OUT/log.txt
stamp() { echo "=== [$(( $(date +%s) - T0 )) s] $*" | tee -a "$LOG"; }
stamp "environment"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true; nproc; } | tee -a "$LOG"
timeout 120 "$PY" - <<'PY' 2>&1 | tee -a "$LOG"
import jax, jaxlib, flax, optax
from promptreg_jax import conv, memory, sampling
d = jax.devices()[0]
print(f"jax {jax.__version__} jaxlib {jaxlib.__version__} flax {flax.__version__} "
      f"optax {optax.__version__}; devices {jax.devices()}")
budget = memory.device_budget_bytes(d)
print(f"trainer's memory budget per device: {memory.fmt_gib(budget) if budget else 'unknown'}; "
      f"sampler auto -> {sampling.resolve_sampler('auto')}; platform {conv.current_platform(None)}")
try:
    import torch
    print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
          f"sees a GPU: {torch.cuda.is_available()}")
except ImportError:
    print("torch not installed: the authors' code will not run")
PY
REF=()
[ -n "${REFERENCE_DIR:-}" ] && REF=(--reference-dir "$REFERENCE_DIR")
[ "${PARITY:-1}" = 0 ] && REF+=(--no-parity)
if want 1; then
  stamp "1. compare_reference.py: training step and inference at ${S}^3, port and authors' code"
  timeout $(lim 420) "$PY" benchmarks/compare_reference.py ${REF[@]+"${REF[@]}"} --device "$DEV" \
    --sizes "$S" --modes train,infer --rounds 1 --repeats "$R" --parity-size 16 \
    --child-timeout $(lim 240) --json "$OUT/compare_$S.json" 2>&1 | tee -a "$LOG"
fi
# The training step alone in one variant, if its stage is wanted:
#   train_variant STAGE LABEL FILE [VAR=VALUE ...] -- [run.py options]
train_variant() {
  want "$1" || return 0
  local label="$1. $2" file=$3; shift 3
  local envs=(); while [ "$1" != "--" ]; do envs+=("$1"); shift; done; shift
  stamp "$label"
  env ${envs[@]+"${envs[@]}"} timeout $(lim 240) "$PY" benchmarks/run.py --sizes "$S" --what train \
    --repeats 3 --child-timeout $(lim 230) --json "$OUT/${file}_$S.json" "$@" 2>&1 | tee -a "$LOG"
}
train_variant 2 "run.py: training step, model.remat=levels" remat -- --remat
train_variant 3 "run.py: training step, bfloat16" bf16 -- --dtype bfloat16
if want 4; then
  stamp "4. the trainer end to end: configs/demo.py:tiny (synthetic data written first, 40 steps, Dice)"
  WD=$(mktemp -d)
  timeout $(lim 180) "$PY" -m promptreg_jax.train --config configs/demo.py:tiny --workdir "$WD/run" \
    --config.data.root="$WD/data" 2>&1 | tee -a "$LOG"
  rm -rf "$WD"
fi
train_variant 5 "run.py: training step, the scatter-add sampler" scatter PROMPTREG_SAMPLER=scatter --
stamp "done"
