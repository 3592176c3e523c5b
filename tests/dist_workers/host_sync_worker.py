"""Count host reads of tensors (device->host syncs on a GPU) during the trainer's forward-backward over packs.

    python tests/dist_workers/host_sync_worker.py OUT.json

Runs the trainer's own ``_forward_step`` through megatron's schedule on a tiny Qwen3 (full recompute, as the 8B
configs) for 1 and for 3 micro-batches, and writes ``{"1": {call site: count}, "3": {...}, "control": n}``.
On CPU every tensor is a host tensor, so a read is counted wherever it would read a device tensor on a GPU:
``item``/``tolist``/``bool``/``int``/``float``/``index``, ``cpu``/``numpy``, ``nonzero``, ``equal``, boolean-mask
indexing (except assigning a scalar, which torch turns into ``masked_fill_``), ``repeat_interleave`` with tensor
repeats but no ``output_size`` (their output size lives on the device) — and blocking copies to a device
(``.to(device)``/``.cuda()``/``copy_`` without ``non_blocking=True``), which wait for the GPU's queue to drain.
"""
import collections
import json
import os
import sys
import threading
from functools import partial

import numpy as np
import torch

READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero",
         "masked_select", "unique", "equal", "allclose")
COPIES = ("to", "cuda", "copy_")
HERE = os.path.abspath(__file__)


def _is_device(x):
    return isinstance(x, (torch.device, int)) and not isinstance(x, bool) or (
        isinstance(x, str) and x.split(":")[0] in ("cpu", "cuda"))


def _is_read(name, args, kwargs):
    if name in READS:
        return True
    if name in ("__getitem__", "__setitem__"):
        bool_index = torch.is_tensor(args[1]) and args[1].dtype == torch.bool
        scalar_fill = name == "__setitem__" and not torch.is_tensor(args[2])  # torch turns it into masked_fill_
        return bool_index and not scalar_fill
    if name == "repeat_interleave":
        return len(args) > 1 and torch.is_tensor(args[1]) and "output_size" not in kwargs
    if name in COPIES and not kwargs.get("non_blocking", False) and not (len(args) > 2 and args[2] is True):
        if name == "copy_":
            return torch.is_tensor(args[1]) and args[0].data_ptr() != args[1].data_ptr()
        return name == "cuda" or "device" in kwargs or any(_is_device(a) for a in args[1:2])
    return False


class HostReadCounter:
    """Counts host reads by call site (first frame outside torch and this file), in every thread: the methods are
    patched on ``torch.Tensor`` and ``torch`` (a TorchFunctionMode would miss the backward pass, where megatron
    recomputes checkpointed layers)."""

    def __init__(self, host_data=()):
        self.sites = collections.Counter()
        self._saved = []
        self._inside = threading.local()
        # Storages of the micro-batches as the loader yields them: host memory on a GPU machine too, so reading them
        # is no sync (copying them to the device without blocking is what the step must do).
        self._host = {t.untyped_storage().data_ptr() for t in host_data}

    def _wrap(self, owner, name):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            if getattr(self._inside, "flag", False):  # re-dispatched by a TorchFunctionMode: counted already
                return original(*args, **kwargs)
            host = name in READS and torch.is_tensor(args[0]) and args[0].untyped_storage().data_ptr() in self._host
            if _is_read(name, args, kwargs) and not host:
                frame = sys._getframe(1)
                torch_dir = os.path.dirname(torch.__file__)
                while frame and (frame.f_code.co_filename.startswith(torch_dir) or frame.f_code.co_filename == HERE
                                 or frame.f_code.co_filename.endswith("platform/cpu_patches.py")):
                    frame = frame.f_back
                site = f"{frame.f_code.co_filename.split('site-packages/')[-1]}:{frame.f_code.co_name}" if frame else "?"
                self.sites[f"{site}:{name}"] += 1
            self._inside.flag = True
            try:
                return original(*args, **kwargs)
            finally:
                self._inside.flag = False

        self._saved.append((owner, name, original))
        setattr(owner, name, wrapper)

    def __enter__(self):
        for name in READS + COPIES + ("__getitem__", "__setitem__", "repeat_interleave"):
            if hasattr(torch.Tensor, name):
                self._wrap(torch.Tensor, name)
        for name in ("nonzero", "masked_select", "unique", "equal", "allclose", "repeat_interleave"):
            self._wrap(torch, name)
        return self

    def __exit__(self, *exc):
        for owner, name, original in reversed(self._saved):
            setattr(owner, name, original)
        self._saved.clear()


def packs(count, seq_length=96):
    from megatron_onereason.data.packed_dataset import pack_item
    from megatron_onereason.data.packing import assemble_pack

    rng = np.random.default_rng(0)
    lengths = [40, 30, 20]
    return [pack_item(assemble_pack([rng.integers(0, 1000, n) for n in lengths],
                                    [np.ones(n, np.uint8) for n in lengths], [0, 1, 0], seq_length, 0))
            for _ in range(count)]


def main(out_path):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_onereason.platform import device, initialize_distributed
    from megatron_onereason.training.config import ModelSection, OptimSection, ParallelSection, PrecisionSection
    from megatron_onereason.training.setup import install_grad_hooks, setup_model_and_optimizer
    from megatron_onereason.training.trainer import _forward_step

    initialize_distributed()
    parallel = ParallelSection()
    state = setup_model_and_optimizer(ModelSection(init_from="tiny", recompute_granularity="full"), parallel,
                                      PrecisionSection(), OptimSection(), ["all"], 10)
    install_grad_hooks(state, parallel)
    step = partial(_forward_step, [(900, 1000)], 2)  # itemic id ranges, number of sources
    result = {}
    for micro in (1, 1, 3):  # the first run fills megatron's one-time caches (RoPE table) and is overwritten
        state.model[0].zero_grad_buffer()
        batches = packs(micro)
        counter = HostReadCounter([t for b in batches for t in b.values() if torch.is_tensor(t)])
        with counter:
            get_forward_backward_func()(forward_step_func=step, data_iterator=iter(batches),
                                        model=state.model[0], num_microbatches=micro, seq_length=96,
                                        micro_batch_size=1, forward_only=False)
        result[str(micro)] = dict(counter.sites)
    control = HostReadCounter()
    tokens = packs(1)[0]["tokens"]
    with control:  # what the counter must see: a blocking copy to the device and a read of a device value
        tokens.to(device()).max().item()
    result["control"] = dict(control.sites)
    with open(out_path, "w") as f:
        json.dump(result, f, indent=1)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
