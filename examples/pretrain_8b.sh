#!/bin/bash
# OneReason pre-training of Qwen3-8B, stages 1 -> 2 -> 3 chained, on a SLURM cluster with pyxis/enroot.
#   bash examples/pretrain_8b.sh --dry-run    the resolved commands, configs and memory plans, no cluster needed
#   sbatch examples/pretrain_8b.sh            from the repository root; the log goes to ./onereason-pretrain-8b-JOBID.out
#                                             (or: mkdir -p logs && sbatch --output=logs/%x-%j.out examples/pretrain_8b.sh)
# Set WORK (shared filesystem), IMAGE (an enroot .sqsh, see examples/slurm_lib.sh), HF_BASE and DATA. A stage starts
# only after its predecessor wrote training_complete.json; a stage stopped early (time limit: SIGTERM 5 min before,
# the trainer saves and exits 75) requeues the job, which resumes it; a resubmission skips completed stages.
#SBATCH --job-name=onereason-pretrain-8b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}  # sbatch runs a spooled copy of this file
[ -f "$REPO/examples/slurm_lib.sh" ] || { echo "$0: error: $REPO/examples/slurm_lib.sh not found: submit from the repository root or set REPO=" >&2; exit 1; }
source "$REPO/examples/slurm_lib.sh"

HF_BASE=${HF_BASE:-$WORK/models/Qwen3-8B}           # a downloaded Qwen3-8B HF directory
# Megatron-style blend of tools/preprocess_data.py outputs (token ratios as in OneReason appendix C.2).
DATA=${DATA:-"[0.35, $WORK/data/item_caption, 0.25, $WORK/data/user_history, 0.15, $WORK/data/relational, 0.25, $WORK/data/general_text]"}
BASE=$WORK/ckpt/qwen3-8b-itemic

export CUDA_DEVICE_MAX_CONNECTIONS=1                # TP/SP communication overlap needs in-order kernels
export NCCL_IB_TIMEOUT=22 NCCL_IB_QPS_PER_CONNECTION=4 NCCL_NVLS_ENABLE=0 TORCH_NCCL_AVOID_RECORD_STREAMS=1
export NVTE_FUSED_ATTN=1 NVTE_FLASH_ATTN=1 NVTE_BIAS_GELU_NVFUSION=0
export PYTHONUNBUFFERED=1

# 0. Once: extend the vocabulary (5 domains + 3 x 8192 codes) and convert to megatron (vocab padded for TP=4);
# hf_to_mcore.py renames its output into place when complete, so its iteration file marks a finished conversion.
if [ "$DRY_RUN" = 1 ] || [ ! -f "$BASE/latest_checkpointed_iteration.txt" ]; then
  echo "# conversion (skipped when $BASE/latest_checkpointed_iteration.txt exists)"
  run "${SRUN[@]}" --nodes=1 --ntasks=1 bash -c "python tools/extend_vocab.py --hf-dir $HF_BASE --out-dir $WORK/models/Qwen3-8B-itemic --overwrite \
&& python checkpoints_convert/hf_to_mcore.py --hf-dir $WORK/models/Qwen3-8B-itemic --out-dir $BASE --tp 4 --pp 2 --overwrite"
fi

# 1-3. One srun per stage; each resumes from its own directory and starts from the previous stage's weights only
# (model.load: a new optimizer and schedule).
train_stage stage1 stage1.yaml "$BASE" "data.blend=$DATA"
require_complete "$WORK/ckpt/stage1" "stage 2"
train_stage stage2 stage2.yaml "$WORK/ckpt/stage1" "data.blend=$DATA"
require_complete "$WORK/ckpt/stage2" "stage 3"
train_stage stage3 stage3.yaml "$WORK/ckpt/stage2" "data.blend=$DATA"

# Export the result to Hugging Face format (the tokenizer with itemic tokens travels with it).
export_hf "$WORK/ckpt/stage3" "$WORK/models/OneReason-8B-pretrain"
