#!/usr/bin/env bash
# OneReason's RL ablations at tiny scale (§6: Figs. 13-16, 19-21, thinking vs non-thinking), 5 seeds each, on the
# learnable world with the project's reward / advantage / GRPO-loss / MOPD code and a small log-linear policy
# (megatron_onereason/tools/world_ablations.py; not the Megatron/vLLM engine: tools/run_ablations.py runs the engine).
#   bash examples/reproduce_ablations.sh [OUT_DIR]     (default runs/ablations; under a minute on 2 cores)
# Writes OUT_DIR/table.md (mean ± std per variant, one verdict per claim: agrees / disagrees / inside noise),
# OUT_DIR/results.json and OUT_DIR/{grpo_curves,recall_by_variant}.png.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ablations}
export OMP_NUM_THREADS=1 PYTHONWARNINGS=ignore
start=$(date +%s)
.venv/bin/python tools/world_ablations.py --out "$OUT" --seeds "${SEEDS:-0,1,2,3,4}" --steps "${STEPS:-100}" \
  --mopd-steps "${MOPD_STEPS:-60}"
echo "reproduce_ablations: done in $(( $(date +%s) - start ))s"
