#!/bin/bash
# Multi-teacher on-policy distillation (MOPD) on a multi-node Ray cluster: the same launcher as GRPO with the
# MOPD config, whose mopd.teachers maps each domain to its GRPO teacher (exported with mcore_to_hf.py).
#   bash examples/mopd_multinode.sh --dry-run | sbatch examples/mopd_multinode.sh (from the repository root)
#SBATCH --job-name=onereason-mopd
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
export CONFIG=${CONFIG:-examples/configs/mopd_8b.yaml} JOB_NAME=onereason-mopd  # JOB_NAME: for a dry run
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}  # sbatch runs a spooled copy of this file
exec bash "$REPO/examples/grpo_multinode.sh" "$@"
