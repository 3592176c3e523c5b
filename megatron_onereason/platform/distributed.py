"""Process-group set-up for torchrun, SLURM (``srun``), mpirun and plain single-process runs.

All distributed plumbing of the project starts here: :func:`initialize_distributed` creates the default process
group (NCCL on GPU, gloo on CPU) and megatron-core's model-parallel groups, then seeds megatron's RNG tracker.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
import sys
from dataclasses import dataclass
from typing import Mapping, Optional

import torch


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun" | "slurm" | "openmpi" | "mpich" | "single"


def _this_command() -> str:
    """How torchrun would start this program: ``-m package.module``, ``script.py`` or ``--no-python console-script``."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name:
        return f"-m {spec.name.removesuffix('.__main__')}"
    program = sys.argv[0] if sys.argv and sys.argv[0] else "PROGRAM"
    return program if program.endswith(".py") else f"--no-python {os.path.basename(program)}"


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list: ``"gpu[03-05,9],cpu1"`` → ``"gpu03"``."""
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


# Rendezvous ports derived from the SLURM job id stay below Linux's ephemeral range (32768-60999 by default), where
# the kernel hands out the source ports of outgoing connections: a port there can be taken by any process's socket.
# examples/slurm_lib.sh exports the same MASTER_PORT.
JOB_PORT_BASE, JOB_PORT_SPAN = 20000, 10000


def job_port(job_id: int) -> int:
    """The rendezvous port of SLURM job ``job_id``: concurrent jobs on shared nodes get different ones."""
    return JOB_PORT_BASE + job_id % JOB_PORT_SPAN


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """The CUDA device of this rank among those ``CUDA_VISIBLE_DEVICES`` shows: ``local_rank`` when the node's GPUs
    are all visible (torchrun; srun without GPU binding), 0 when SLURM binds one GPU per task (each task sees one)."""
    if visible_devices == 1:
        return 0
    if 0 <= local_rank < visible_devices:
        return local_rank
    raise ValueError(f"local rank {local_rank} but this process sees {visible_devices} CUDA devices "
                     f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start one task per "
                     "GPU, and either bind one GPU per task (srun --gpus-per-task=1) or show each task all of them")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_launch_env(environ: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """Rank, world size and rendezvous address from whichever launcher started this process.

    torchrun's variables win (``srun torchrun ...`` is common); then SLURM's ``srun`` one-task-per-GPU layout,
    then OpenMPI and MPICH/Intel MPI. With none of them it is a single process on a free local port.
    """
    env = os.environ if environ is None else environ

    def port(default: int) -> int:
        return int(env.get("MASTER_PORT", default))

    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port(29500), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_STEP_NODELIST")
                                                          or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port(job_port(int(env.get("SLURM_JOB_ID", "0")))), "slurm")
    if "OMPI_COMM_WORLD_RANK" in env:
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"]),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)), env.get("MASTER_ADDR", "127.0.0.1"),
                         port(29500), "openmpi")
    if "PMI_RANK" in env and "PMI_SIZE" in env:
        return LaunchEnv(int(env["PMI_RANK"]), int(env["PMI_SIZE"]), int(env.get("MPI_LOCALRANKID", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port(29500), "mpich")
    # Alone: a fresh local port, whatever MASTER_PORT a parent process may have left in the environment.
    return LaunchEnv(0, 1, 0, "127.0.0.1", _free_port(), "single")


def initialize_distributed(
    tensor_model_parallel_size: int = 1,
    pipeline_model_parallel_size: int = 1,
    virtual_pipeline_model_parallel_size: Optional[int] = None,
    context_parallel_size: int = 1,
    seed: int = 1234,
    timeout_minutes: int = 30,
) -> LaunchEnv:
    """Create the default process group and megatron-core's parallel groups (idempotent per process)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_onereason.platform import setup

    setup()
    launch = detect_launch_env()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size * context_parallel_size
    if launch.world_size % model_parallel:
        from megatron_onereason.cli import UserError

        # one process per rank: without a launcher there is one process, which TP×PP×CP > 1 cannot be split over
        remedy = (f"launch one process per rank: torchrun --nproc_per_node {model_parallel} (or a multiple: data "
                  f"parallel) {_this_command()} ..." if launch.launcher == "single" else
                  f"start a multiple of {model_parallel} ranks, or change the parallel sizes")
        raise UserError(
            f"world size {launch.world_size} is not divisible by TP×PP×CP = {tensor_model_parallel_size}×"
            f"{pipeline_model_parallel_size}×{context_parallel_size}: {remedy}"
        )
    if not torch.distributed.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_device_index(launch.local_rank, torch.cuda.device_count()))
        if launch.launcher == "single":
            # Not through the environment: child processes (converters, tests) must not inherit this port.
            init_method = f"tcp://{launch.master_addr}:{launch.master_port}"
        else:
            # env:// rather than tcp://: under torchrun the agent may already host the store on MASTER_PORT.
            os.environ.setdefault("MASTER_ADDR", launch.master_addr)
            os.environ.setdefault("MASTER_PORT", str(launch.master_port))
            init_method = "env://"
        torch.distributed.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            init_method=init_method,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_model_parallel_size,
            pipeline_model_parallel_size=pipeline_model_parallel_size,
            virtual_pipeline_model_parallel_size=virtual_pipeline_model_parallel_size,
            context_parallel_size=context_parallel_size,
            distributed_timeout_minutes=timeout_minutes,
        )
    model_parallel_cuda_manual_seed(seed)
    return launch


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
