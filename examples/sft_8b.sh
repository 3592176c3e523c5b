#!/bin/bash
# SFT of the pre-trained OneReason-8B (thinking + non-thinking chat data, loss on assistant turns only).
#   bash examples/sft_8b.sh --dry-run     the resolved commands, config and memory plan, no cluster needed
#   sbatch examples/sft_8b.sh             from the repository root, after examples/pretrain_8b.sh completed stage 3
# Prepare the data first, on any node:
#   python tools/preprocess_data.py --input sft.jsonl --tokenizer $WORK/models/Qwen3-8B-itemic \
#       --output-prefix $WORK/data/sft --workers 32
# WORK, IMAGE, MOUNTS, logs, requeue: as in examples/pretrain_8b.sh (examples/slurm_lib.sh).
#SBATCH --job-name=onereason-sft-8b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}  # sbatch runs a spooled copy of this file
[ -f "$REPO/examples/slurm_lib.sh" ] || { echo "$0: error: $REPO/examples/slurm_lib.sh not found: submit from the repository root or set REPO=" >&2; exit 1; }
source "$REPO/examples/slurm_lib.sh"

DATA=${DATA:-"[1.0, $WORK/data/sft]"}
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_AVOID_RECORD_STREAMS=1 NVTE_FUSED_ATTN=1 PYTHONUNBUFFERED=1

require_complete "$WORK/ckpt/stage3" "SFT"          # never fine-tune a partly pre-trained model
train_stage sft sft.yaml "$WORK/ckpt/stage3" "data.blend=$DATA"
export_hf "$WORK/ckpt/sft" "$WORK/models/OneReason-8B-sft"
