#!/bin/bash
# Multi-node GRPO with the actor-rollout engine: Ray head on node 0, workers join, the driver runs on the head.
#   bash examples/grpo_multinode.sh --dry-run    the resolved commands, no cluster needed
#   sbatch examples/grpo_multinode.sh            from the repository root (CONFIG: the RL YAML; ALGO_ARGS: overrides)
# WORK, IMAGE, MOUNTS, logs: as in examples/pretrain_8b.sh (examples/slurm_lib.sh).
#SBATCH --job-name=onereason-grpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}  # sbatch runs a spooled copy of this file
[ -f "$REPO/examples/slurm_lib.sh" ] || { echo "$0: error: $REPO/examples/slurm_lib.sh not found: submit from the repository root or set REPO=" >&2; exit 1; }
source "$REPO/examples/slurm_lib.sh"

CONFIG=${CONFIG:-examples/configs/grpo_8b.yaml}
NAME=${SLURM_JOB_NAME:-${JOB_NAME:-onereason-grpo}}
read -r -a ALGO_ARGS <<< "${ALGO_ARGS:-}"
HEAD=$MASTER_ADDR
PORT=$((6379 + ${SLURM_JOB_ID:-0} % 1000))
# Ray 2.60 turns on token authentication for `ray start`: one token for the head, the workers and the driver
# (srun passes the environment on). Without it the workers and the driver are refused (InvalidAuthToken).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c "import secrets; print(secrets.token_hex(32))")}

# Ray head on the first node, one worker per other node (each offers its 8 GPUs), all in the background.
background "${SRUN[@]}" --nodes=1 --ntasks=1 -w "$HEAD" ray start --head --port=$PORT --num-gpus=$GPUS_PER_NODE --block
if [ "$NODES" -gt 1 ]; then
  background "${SRUN[@]}" --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --exclude="$HEAD" \
    ray start --address="$HEAD:$PORT" --num-gpus=$GPUS_PER_NODE --block
fi
# The driver joins the cluster (ray.address=auto: no resource arguments) and places the actor (TP x PP x DP ranks,
# one GPU each), the rollout engines and the teachers/reference with one placement group; the GPU counts per role
# are in the config (actor.gpus_per_rank, rollout.gpus/replicas, teachers.gpus, reference.gpus).
run "${SRUN[@]}" --overlap --nodes=1 --ntasks=1 -w "$HEAD" env RAY_ADDRESS="$HEAD:$PORT" \
  python -m megatron_onereason.rl.run --config "$CONFIG" ray.address=auto \
  save="$WORK/ckpt/$NAME" metrics_jsonl="$WORK/metrics/$NAME.jsonl" tensorboard_dir="$WORK/tb/$NAME" \
  ${ALGO_ARGS[@]+"${ALGO_ARGS[@]}"}
