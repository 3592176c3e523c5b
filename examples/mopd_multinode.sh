#!/bin/bash
# Multi-teacher on-policy distillation (MOPD) on a multi-node Ray cluster: the same launcher as GRPO with the
# MOPD config, whose mopd.teachers maps each domain to its GRPO teacher (exported with mcore_to_hf.py).
#   sbatch examples/mopd_multinode.sh
#SBATCH --job-name=onereason-mopd
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
export CONFIG=${CONFIG:-examples/configs/mopd_8b.yaml}
exec bash "${SLURM_SUBMIT_DIR:-.}/examples/grpo_multinode.sh"  # sbatch runs a spooled copy of this file
