#!/bin/bash
# Multi-node GRPO with the actor-rollout engine: Ray head on node 0, workers join, the driver runs on the head, inside
# the head's container (enroot gives every container its own /tmp: the driver must see the head's /tmp/ray).
#   bash examples/grpo_multinode.sh --dry-run    the resolved commands and the validated RL config, no cluster needed
#   sbatch examples/grpo_multinode.sh            from the repository root (CONFIG: the RL YAML; ALGO_ARGS: overrides)
# Lineage as for the training stages (examples/slurm_lib.sh): starts only after SFT's training_complete.json
# (INIT, default WORK/ckpt/sft; ROLLOUT_MODEL: its HF export); writes WORK/ckpt/NAME/training_complete.json when the
# run finishes, so a resubmission skips it; exit 75 requeues. BENCHMARK, CATALOG: the RL data (data.benchmark,
# data.catalog). WORK, IMAGE, MOUNTS, logs: as in examples/pretrain_8b.sh.
#SBATCH --job-name=onereason-grpo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}  # sbatch runs a spooled copy of this file
[ -f "$REPO/examples/slurm_lib.sh" ] || { echo "$0: error: $REPO/examples/slurm_lib.sh not found: submit from the repository root or set REPO=" >&2; exit 1; }
source "$REPO/examples/slurm_lib.sh"

CONFIG=${CONFIG:-examples/configs/grpo_8b.yaml}
NAME=${SLURM_JOB_NAME:-${JOB_NAME:-onereason-grpo}}
INIT=${INIT:-$WORK/ckpt/sft}
ROLLOUT_MODEL=${ROLLOUT_MODEL:-$WORK/models/OneReason-8B-sft}
BENCHMARK=${BENCHMARK:-$WORK/data/rl/train.jsonl}
CATALOG=${CATALOG:-$WORK/models/Qwen3-8B-itemic}
SAVE=$WORK/ckpt/$NAME
read -r -a ALGO_ARGS <<< "${ALGO_ARGS:-}"
RL_ARGS=(--config "$CONFIG" ray.address=auto actor.model.load="$INIT" rollout.model_dir="$ROLLOUT_MODEL"
         data.benchmark="$BENCHMARK" data.catalog="$CATALOG" save="$SAVE" metrics_jsonl="$WORK/metrics/$NAME.jsonl"
         tensorboard_dir="$WORK/tb/$NAME" ${ALGO_ARGS[@]+"${ALGO_ARGS[@]}"})
show_rl_config "${RL_ARGS[@]}"
if [ "$DRY_RUN" = 0 ] && [ -f "$SAVE/$COMPLETE_MARKER" ]; then
  echo "$NAME: complete ($SAVE/$COMPLETE_MARKER), skipped"
  exit 0
fi
require_complete "$INIT" "$NAME"

HEAD=$MASTER_ADDR
PORT=$((6379 + ${SLURM_JOB_ID:-0} % 1000))
# Ray 2.60 turns on token authentication for `ray start`: one token for the head, the workers and the driver
# (srun passes the environment on). Without it the workers and the driver are refused (InvalidAuthToken).
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN=${RAY_AUTH_TOKEN:-$(python3 -c "import secrets; print(secrets.token_hex(32))")}
# The head's container is named, so that the driver runs in it (pyxis reuses a named container of the job).
HEAD_CONTAINER=onereason-ray-head-$JOB_ID

# Ray head on the first node, one worker per other node (each offers its 8 GPUs), all in the background.
background "${SRUN[@]}" --container-name="$HEAD_CONTAINER" --nodes=1 --ntasks=1 -w "$HEAD" \
  ray start --head --port=$PORT --num-gpus=$GPUS_PER_NODE --block
if [ "$NODES" -gt 1 ]; then
  background "${SRUN[@]}" --nodes=$((NODES - 1)) --ntasks=$((NODES - 1)) --exclude="$HEAD" \
    ray start --address="$HEAD:$PORT" --num-gpus=$GPUS_PER_NODE --block
fi
# The driver joins the cluster (ray.address=auto: no resource arguments) and places the actor (TP x PP x DP ranks,
# one GPU each), the rollout engines and the teachers/reference with one placement group; the GPU counts per role
# are in the config (actor.gpus_per_rank, rollout.gpus/replicas, teachers.gpus, reference.gpus).
rc=0
run srun --overlap --container-name="$HEAD_CONTAINER" "--container-mounts=$MOUNTS" "--container-workdir=$CODE" \
  --nodes=1 --ntasks=1 -w "$HEAD" env RAY_ADDRESS="$HEAD:$PORT" python -m megatron_onereason.rl.run "${RL_ARGS[@]}" \
  || rc=$?
if [ "$DRY_RUN" = 1 ]; then
  echo "# then: exit 0 -> $SAVE/$COMPLETE_MARKER; exit $EXIT_REQUEUE -> scontrol requeue $JOB_ID; else the job fails"
elif [ "$rc" = "$EXIT_REQUEUE" ]; then
  requeue "$NAME"
elif [ "$rc" != 0 ]; then
  die "$NAME failed (exit $rc); see the log above"
else
  mark_complete "$SAVE" "$NAME"
fi
