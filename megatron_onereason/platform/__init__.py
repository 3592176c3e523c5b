"""Where the code runs: CUDA detection, the CPU patches for megatron-core, and distributed set-up.

Call :func:`setup` once before using megatron-core (every entry point does); on a CUDA machine it changes nothing.
"""
import torch

from megatron_onereason.platform.cpu_patches import apply_cpu_patches, enter_cpu_device_mode
from megatron_onereason.platform.distributed import (
    LaunchEnv,
    destroy_distributed,
    detect_launch_env,
    initialize_distributed,
)


def has_cuda() -> bool:
    return torch.cuda.is_available()


def setup() -> None:
    """Make megatron-core usable on this machine (idempotent)."""
    apply_cpu_patches()


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if has_cuda() else torch.device("cpu")


__all__ = [
    "LaunchEnv",
    "apply_cpu_patches",
    "destroy_distributed",
    "detect_launch_env",
    "device",
    "enter_cpu_device_mode",
    "has_cuda",
    "initialize_distributed",
    "setup",
]
