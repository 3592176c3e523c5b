"""torchrun worker: the real memory of a training layout, for the planner's tests.

    torchrun --nproc_per_node N tests/dist_workers/memory_worker.py CASE.json OUT_DIR

CASE: {"model_dir": HF dir with config.json (init_from), "tp", "pp", "distopt", "bf16", "trainable", "seq",
"recompute"}. Each rank writes OUT_DIR/rank{r}.json: its parameters (name, elements), weight bytes, the DDP grad
buffers' bytes, the optimizer's state bytes after one step (Adam moments and fp32 master copies) and, on PP=1, the
bytes the forward pass keeps for the backward of one pack (saved-tensor hooks, parameters excluded, storages counted
once and whole) and the peak bytes allocated during a forward-backward (the profiler's allocation trace).
"""
import json
import os
import sys

import numpy as np
import torch

from megatron_onereason.data.packed_dataset import pack_item
from megatron_onereason.data.packing import assemble_pack
from megatron_onereason.model.forward import pack_to_device
from megatron_onereason.platform import device, initialize_distributed
from megatron_onereason.training.config import ModelSection, OptimSection, ParallelSection, PrecisionSection
from megatron_onereason.training.setup import install_grad_hooks, setup_model_and_optimizer


def a_pack(seq, vocab):
    rng = np.random.default_rng(0)
    lengths = [seq // 4] * 3 + [seq - 3 * (seq // 4)]
    pack = assemble_pack([rng.integers(0, vocab, n) for n in lengths], [np.ones(n, np.uint8) for n in lengths],
                         [0] * 4, seq, 0)
    return pack_item(pack)


def saved_bytes(model, batch):
    """Bytes of the distinct storages autograd keeps for the backward (parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack_hook(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen.setdefault(ptr, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        loss = model(batch["tokens"][None], batch["position_ids"][None], None, labels=batch["labels"][None],
                     packed_seq_params=batch["packed_seq_params"])
    return sum(seen.values()), loss


def peak_bytes(model, batch, trace_path):
    """Peak of the bytes allocated during one forward-backward (the profiler's allocation trace on CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = model(batch["tokens"][None], batch["position_ids"][None], None, labels=batch["labels"][None],
                     packed_seq_params=batch["packed_seq_params"])
        (loss.float() * batch["loss_mask"][None]).sum().backward()
        del loss
    os.makedirs(os.path.dirname(trace_path), exist_ok=True)
    prof.export_chrome_trace(trace_path)
    with open(trace_path) as f:
        events = [e["args"] for e in json.load(f)["traceEvents"] if e.get("name") == "[memory]"]
    os.remove(trace_path)
    return max(e["Total Allocated"] for e in events)


def main(case_path, out_dir):
    from megatron.core import parallel_state

    case = json.load(open(case_path))
    initialize_distributed(case["tp"], case["pp"])
    parallel = ParallelSection(tensor_model_parallel_size=case["tp"], pipeline_model_parallel_size=case["pp"],
                               use_distributed_optimizer=case["distopt"])
    state = setup_model_and_optimizer(
        ModelSection(init_from=case["model_dir"], layer_spec="local", recompute_granularity=case["recompute"]),
        parallel, PrecisionSection(bf16=case["bf16"]), OptimSection(), case["trainable"], 10)
    install_grad_hooks(state, parallel)
    params = [(name, p.numel()) for name, p in state.chunks[0].named_parameters()]
    weights = sum(p.numel() * p.element_size() for p in state.chunks[0].parameters())
    grads = sum(b.grad_data.numel() * b.grad_data.element_size() for m in state.model
                for b in m.buffers + m.expert_parallel_buffers)
    result = {"rank": torch.distributed.get_rank(), "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
              "params": params, "weights": weights, "grads": grads}
    if case["pp"] == 1:
        batch = pack_to_device(a_pack(case["seq"], 500), device())
        result["stored_activations"], loss = saved_bytes(state.chunks[0], batch)
        (loss.float() * batch["loss_mask"][None]).sum().backward()
        result["peak_activations"] = peak_bytes(state.chunks[0], batch,
                                                  os.path.join(out_dir, f"trace_rank{torch.distributed.get_rank()}.json"))
    else:
        for p in state.chunks[0].parameters():  # the optimizer needs a gradient to create its states
            if p.requires_grad:
                p.main_grad.fill_(1e-3)
    state.optimizer.step()
    optimizer = 0
    for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
        tensors = {}
        for group_state in opt.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                tensors[group_state[key].untyped_storage().data_ptr()] = group_state[key]
        for groups in ("shard_fp32_from_float16_groups", "fp32_from_float16_groups"):
            for group in getattr(opt, groups, []) or []:
                for t in group:
                    tensors[t.untyped_storage().data_ptr()] = t
        optimizer += sum(t.numel() * t.element_size() for t in tensors.values())
    result["optimizer"] = optimizer
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
        json.dump(result, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
