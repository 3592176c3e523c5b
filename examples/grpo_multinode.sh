#!/bin/bash
# Multi-node GRPO with the actor-rollout engine: Ray head on node 0, workers join, the driver runs on the head.
#   sbatch examples/grpo_multinode.sh      (IMAGE, WORK as in pretrain_8b.sh; CONFIG: the RL YAML)
#SBATCH --job-name=onereason-grpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
set -euo pipefail
IMAGE=${IMAGE:-megatron-onereason:latest}
WORK=${WORK:-/lustre/$USER/onereason}
CODE=${CODE:-/opt/megatron_onereason}
CONFIG=${CONFIG:-examples/configs/grpo_8b.yaml}
ALGO_ARGS=${ALGO_ARGS:-}
RUN="srun --container-image=$IMAGE --container-mounts=$WORK:$WORK --container-workdir=$CODE"
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
PORT=$((6379 + SLURM_JOB_ID % 1000))
mkdir -p logs
# Ray 2.60 turns on token authentication for `ray start`: one token for the head, the workers and the driver
# (srun passes the environment on). Without it the workers and the driver are refused (InvalidAuthToken).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c "import secrets; print(secrets.token_hex(32))")}

# Ray head on the first node, one worker per other node (each offers its 8 GPUs), all in the background.
$RUN --nodes=1 --ntasks=1 -w "$HEAD" ray start --head --port=$PORT --num-gpus=8 --block &
sleep 20
if [ "$SLURM_NNODES" -gt 1 ]; then
  $RUN --nodes=$((SLURM_NNODES - 1)) --ntasks=$((SLURM_NNODES - 1)) --exclude="$HEAD" \
    ray start --address="$HEAD:$PORT" --num-gpus=8 --block &
  sleep 20
fi
# The driver joins the cluster (ray.address=auto: no resource arguments) and places the actor (TP x PP x DP ranks,
# one GPU each), the rollout engines and the teachers/reference with one placement group; the GPU counts per role
# are in the config (actor.gpus_per_rank, rollout.gpus/replicas, teachers.gpus, reference.gpus).
$RUN --overlap --nodes=1 --ntasks=1 -w "$HEAD" env RAY_ADDRESS="$HEAD:$PORT" \
  python -m megatron_onereason.rl.run --config "$CONFIG" ray.address=auto \
  save="$WORK/ckpt/${SLURM_JOB_NAME}" metrics_jsonl="$WORK/metrics/${SLURM_JOB_NAME}.jsonl" \
  tensorboard_dir="$WORK/tb/${SLURM_JOB_NAME}" $ALGO_ARGS
