#!/bin/bash
# SFT of the pre-trained OneReason-8B (thinking + non-thinking chat data, loss on assistant turns only).
#   sbatch examples/sft_8b.sh     Prepare the data first, on any node:
#   python tools/preprocess_data.py --input sft.jsonl --tokenizer $WORK/models/Qwen3-8B-itemic \
#       --output-prefix $WORK/data/sft --workers 32
#SBATCH --job-name=onereason-sft-8b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=TERM@300
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

IMAGE=${IMAGE:-megatron-onereason:latest}
WORK=${WORK:-/lustre/$USER/onereason}
CODE=${CODE:-/opt/megatron_onereason}
DATA=${DATA:-"[1.0, $WORK/data/sft]"}

export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_AVOID_RECORD_STREAMS=1 NVTE_FUSED_ATTN=1 PYTHONUNBUFFERED=1
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
mkdir -p logs
RUN="srun --container-image=$IMAGE --container-mounts=$WORK:$WORK --container-workdir=$CODE --kill-on-bad-exit=1"

$RUN python -m megatron_onereason.train --config examples/configs/sft.yaml \
  model.load="$WORK/ckpt/stage3" checkpoint.save="$WORK/ckpt/sft" checkpoint.load="$WORK/ckpt/sft" \
  "data.blend=$DATA" logging.tensorboard_dir="$WORK/tb/sft" logging.metrics_jsonl="$WORK/metrics/sft.jsonl"
$RUN --nodes=1 --ntasks=1 python checkpoints_convert/mcore_to_hf.py --mcore-dir "$WORK/ckpt/sft" \
  --out-dir "$WORK/models/OneReason-8B-sft" --overwrite
