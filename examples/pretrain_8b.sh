#!/bin/bash
# OneReason pre-training of Qwen3-8B, stages 1 -> 2 -> 3 chained, on a SLURM cluster with pyxis/enroot.
#   sbatch examples/pretrain_8b.sh        (re-submitting, or --requeue, resumes where the job stopped)
# Set IMAGE (docker build -t ... from this repo's Dockerfile), WORK (shared filesystem) and DATA (blend) below.
#SBATCH --job-name=onereason-pretrain-8b
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@300            # SIGTERM 5 min before the limit: the trainer saves and exits cleanly
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

IMAGE=${IMAGE:-megatron-onereason:latest}
WORK=${WORK:-/lustre/$USER/onereason}               # checkpoints, TensorBoard, metrics
CODE=${CODE:-/opt/megatron_onereason}               # the package inside the image
HF_BASE=${HF_BASE:-$WORK/models/Qwen3-8B}           # a downloaded Qwen3-8B HF directory
# Megatron-style blend of tools/preprocess_data.py outputs (token ratios as in OneReason appendix C.2).
DATA=${DATA:-"[0.35, $WORK/data/item_caption, 0.25, $WORK/data/user_history, 0.15, $WORK/data/relational, 0.25, $WORK/data/general_text]"}

export CUDA_DEVICE_MAX_CONNECTIONS=1                # TP/SP communication overlap needs in-order kernels
export NCCL_IB_TIMEOUT=22 NCCL_IB_QPS_PER_CONNECTION=4 NCCL_NVLS_ENABLE=0 TORCH_NCCL_AVOID_RECORD_STREAMS=1
export NVTE_FUSED_ATTN=1 NVTE_FLASH_ATTN=1 NVTE_BIAS_GELU_NVFUSION=0
export PYTHONUNBUFFERED=1
# Rendezvous for the trainer's srun launch: first node, a port derived from the job id.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
mkdir -p logs "$WORK"
RUN="srun --container-image=$IMAGE --container-mounts=$WORK:$WORK --container-workdir=$CODE --kill-on-bad-exit=1"

# 0. Once: extend the vocabulary (5 domains + 3 x 8192 codes) and convert to megatron (vocab padded for TP=4).
if [ ! -f "$WORK/ckpt/qwen3-8b-itemic/latest_checkpointed_iteration.txt" ]; then
  $RUN --nodes=1 --ntasks=1 bash -c "python tools/extend_vocab.py --hf-dir $HF_BASE --out-dir $WORK/models/Qwen3-8B-itemic --overwrite \
    && python checkpoints_convert/hf_to_mcore.py --hf-dir $WORK/models/Qwen3-8B-itemic --out-dir $WORK/ckpt/qwen3-8b-itemic --tp 4 --pp 2 --overwrite"
fi

stage() {  # name config starting-weights; resumes from its own directory if it has a checkpoint
  local name=$1 config=$2 init=$3
  $RUN python -m megatron_onereason.train --config "examples/configs/$config" \
    model.load="$init" checkpoint.save="$WORK/ckpt/$name" checkpoint.load="$WORK/ckpt/$name" \
    "data.blend=$DATA" logging.tensorboard_dir="$WORK/tb/$name" logging.metrics_jsonl="$WORK/metrics/$name.jsonl"
}
stage stage1 stage1.yaml "$WORK/ckpt/qwen3-8b-itemic"
stage stage2 stage2.yaml "$WORK/ckpt/stage1"       # weights only from stage 1: a new optimizer and schedule
stage stage3 stage3.yaml "$WORK/ckpt/stage2"

# Export the result to Hugging Face format (tokenizer with itemic tokens travels with it).
$RUN --nodes=1 --ntasks=1 python checkpoints_convert/mcore_to_hf.py --mcore-dir "$WORK/ckpt/stage3" \
  --out-dir "$WORK/models/OneReason-8B-pretrain" --overwrite
