"""The only place in the code base that patches torch / megatron-core: lets megatron-core run on CPU.

megatron-core assumes CUDA in many places (device="cuda" tensors, the CUDA RNG tracker, synchronize calls,
``Tensor.type()`` checks in the optimizer). On a machine without CUDA, :func:`apply_cpu_patches` maps each of
those onto the CPU (the list and why each is needed is in ``shared/DESIGN.md``). With CUDA present it does
nothing. It is idempotent and must run before megatron code executes; :func:`megatron_onereason.platform.setup`
calls it.

The ``cuda``→``cpu`` device rewrite is a :class:`torch.overrides.TorchFunctionMode`, which is thread-local:
call :func:`enter_cpu_device_mode` in every extra thread that runs megatron code.

megatron-core releases these patches are tested with: 0.16.1 (the lock: CI's whole suite) and 0.19.2 (its sources
on CPU, once: the GPU check's dry run — conversion, bf16 logits, stage-1 freezing, the trainer, the RL actor — and
tests/training/test_freezing.py; 0.19 needed the ``current_stream`` patch). 0.17 and 0.18 are untested.
"""
from __future__ import annotations

import contextlib
import threading

import torch

_APPLIED = False
_CPU = torch.device("cpu")
_thread_state = threading.local()


def _to_cpu_device(device):
    if isinstance(device, torch.device) and device.type == "cuda":
        return _CPU
    if isinstance(device, str) and device.startswith("cuda"):
        return _CPU
    if isinstance(device, int) and not isinstance(device, bool):
        return _CPU  # megatron passes torch.cuda.current_device() (an int on GPU) as a device
    return device


class _CudaToCpuDeviceMode(torch.overrides.TorchFunctionMode):
    """Rewrites ``device=cuda`` arguments of torch calls (factories, ``.to``) to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func in (torch.Tensor.to, torch.Tensor.cuda) and len(args) > 1:
            args = (args[0], _to_cpu_device(args[1])) + tuple(args[2:])
        return func(*args, **kwargs)


def enter_cpu_device_mode() -> None:
    """Enter the device-rewrite mode in the calling thread (idempotent per thread; no-op with CUDA)."""
    if torch.cuda.is_available() or getattr(_thread_state, "mode", None) is not None:
        return
    mode = _CudaToCpuDeviceMode()
    mode.__enter__()
    _thread_state.mode = mode


def _cpu_rng_state(*_args, **_kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *_args, **_kwargs):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed, *_args, **_kwargs):
    # Not torch.manual_seed: that calls torch.cuda.manual_seed_all, which must stay the (lazy, no-op) original.
    torch.default_generator.manual_seed(int(seed))


class _NoStream:
    """``torch.cuda.current_stream()`` on CPU. megatron-core 0.19 asks for it on every gradient sync
    (``param_and_grad_buffer.start_grad_sync``: the current stream waits for CUDA-graph gradient events, and the
    communication stream for the current one); on CPU there is nothing to wait for."""

    def wait_event(self, event) -> None:
        pass

    def wait_stream(self, stream) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_NO_STREAM = _NoStream()

_TENSOR_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


def apply_cpu_patches() -> bool:
    """Patch torch and megatron-core for CPU execution. Returns True if patches are (now) applied."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        enter_cpu_device_mode()
        return True

    # 1. Devices: "the current CUDA device" is the CPU; .cuda() is a no-op.
    torch.cuda.current_device = lambda: _CPU
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self

    # 2. CUDA RNG → the CPU generator, so megatron's RNG tracker (model_parallel_cuda_manual_seed, fork) works.
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = _cpu_manual_seed
    torch.cuda.random.get_rng_state = _cpu_rng_state
    torch.cuda.random.set_rng_state = _set_cpu_rng_state
    torch.cuda.random.manual_seed = _cpu_manual_seed

    import megatron.core.tensor_parallel.random as mcore_random

    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    mcore_random.device_ctx_manager = lambda *_a, **_k: contextlib.nullcontext()

    # 3. Synchronisation, streams and cache management have nothing to do on CPU.
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.empty_cache = lambda *a, **k: None
    torch.cuda.current_stream = lambda *a, **k: _NO_STREAM

    # 5. The optimizer checks Tensor.type() strings for CUDA tensor types.
    original_type = torch.Tensor.type

    def _type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu" and self.dtype in _TENSOR_TYPE_NAMES:
            return _TENSOR_TYPE_NAMES[self.dtype]
        return original_type(self, dtype, non_blocking, **kwargs) if dtype is not None else original_type(self)

    torch.Tensor.type = _type

    _APPLIED = True
    # 4. device="cuda" arguments → CPU (thread-local mode; entered here for the calling thread).
    enter_cpu_device_mode()
    return True
