"""Training checkpoints: model, optimizer, LR scheduler, iteration, data position and RNG, in ``torch_dist``.

Same directory layout as converted checkpoints (:mod:`megatron_onereason.checkpoint.mcore_io`), with
``iter_XXXXXXX/`` per save. A save is complete only once ``latest_checkpointed_iteration.txt`` points at it: the
tracker is rewritten last, after every rank finished writing, so a job killed mid-save resumes from the previous
complete checkpoint. Model and optimizer states are stored in model space (global tensors), so a checkpoint loads
at a different TP/PP/DP; the RNG states are restored only when the layout is unchanged.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from megatron_onereason.checkpoint.mcore_io import (
    HF_ASSETS,
    RELEASE,
    TRACKER_FILE,
    CheckpointModelInfo,
    checkpoint_iteration_dir,
    load_into_model,
)

log = logging.getLogger(__name__)


def _model_state(model_chunks) -> Dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}


def _optimizer_metadata(use_distributed_optimizer: bool) -> Optional[Dict]:
    # The canonical (per-parameter) layout makes the distributed optimizer's state loadable at another TP/PP/DP;
    # it is gathered on DP rank 0 at save. ("dp_reshardable" saves in parallel but reshards only in DP;
    # "fully_sharded_model_space" is deprecated and fails in megatron-core 0.16.)
    return {"distrib_optim_sharding_type": "dp_reshardable"} if use_distributed_optimizer else None


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its (zero-step) states before its sharded state dict is built.

    Without apex/TE, megatron-core's DistributedOptimizer reads the torch optimizer's ``step`` when building the
    sharded state dict; megatron initialises dummy states itself only on its FSDP path. Loading overwrites them.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _adam_step(optimizer) -> Optional[float]:
    """The torch Adam ``step`` of the (chained) optimizer's parameters, when it keeps one per parameter."""
    steps = {float(state["step"]) for opt in getattr(optimizer, "chained_optimizers", [optimizer])
             for state in opt.optimizer.state.values() if torch.is_tensor(state.get("step"))}
    return steps.pop() if len(steps) == 1 else None


def _restore_adam_step(optimizer, step: Optional[float]) -> None:
    """Set every parameter's Adam ``step`` after a load, each its own tensor.

    Without apex/TE, megatron-core 0.16's DistributedOptimizer neither persists torch Adam's ``step`` (it takes
    it from the runtime param groups) nor gives parameters separate ``step`` tensors (torch increments them in
    place, once per parameter); either corrupts the bias correction of every later update. So the checkpoint
    records the step and it is restored here.
    """
    if step is None:
        return
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)


def _rng_state() -> Dict:
    from megatron.core import tensor_parallel

    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: Dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_sharded_object():
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing import ShardedObject

    pp, tp = parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()
    return ShardedObject("rng_state", _rng_state(), (pp, tp),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank()),
                         replica_id=parallel_state.get_data_parallel_rank())


def _layout() -> Dict[str, int]:
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def save_checkpoint(save_root: str, iteration: int, model_chunks: List[torch.nn.Module], optimizer, scheduler,
                    consumed_samples: int, info: CheckpointModelInfo, hf_assets: Optional[str],
                    use_distributed_optimizer: bool) -> str:
    from megatron.core import dist_checkpointing

    rank = torch.distributed.get_rank()
    iter_dir = os.path.join(save_root, f"iter_{iteration:07d}")
    if rank == 0:
        if os.path.exists(iter_dir):  # a stale partial save of the same iteration (the tracker never named it)
            shutil.rmtree(iter_dir)
        os.makedirs(iter_dir)
    torch.distributed.barrier()
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=False,
                                                      metadata=_optimizer_metadata(use_distributed_optimizer))
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["layout"] = _layout()
    state["use_distributed_optimizer"] = use_distributed_optimizer
    state["adam_step"] = _adam_step(optimizer)
    state["rng_state"] = _rng_sharded_object()
    dist_checkpointing.save(state, iter_dir)
    torch.distributed.barrier()
    if rank == 0:
        info.save(save_root)
        if hf_assets and os.path.isdir(hf_assets) and not os.path.isdir(os.path.join(save_root, HF_ASSETS)):
            shutil.copytree(hf_assets, os.path.join(save_root, HF_ASSETS))
        tmp = os.path.join(save_root, TRACKER_FILE + ".tmp")
        with open(tmp, "w") as f:
            f.write(str(iteration))
        os.replace(tmp, os.path.join(save_root, TRACKER_FILE))  # written last: the save is complete
    torch.distributed.barrier()
    return iter_dir


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, TRACKER_FILE))


def load_weights(root: str, model_chunks: List[torch.nn.Module]) -> str:
    """Weights only (a converted HF checkpoint, or an earlier stage: megatron's ``--finetune``)."""
    return load_into_model(model_chunks, root)


def resume(root: str, model_chunks: List[torch.nn.Module], optimizer, scheduler,
           use_distributed_optimizer: bool) -> Tuple[int, int]:
    """Restore a training checkpoint; returns ``(iteration, consumed_samples)``."""
    from megatron.core import dist_checkpointing

    iter_dir = checkpoint_iteration_dir(root)
    if os.path.basename(iter_dir) == RELEASE:
        raise ValueError(f"{root}: a converted (release) checkpoint has no training state; use model.load for it")
    common = dist_checkpointing.load_common_state_dict(iter_dir)
    if common.get("use_distributed_optimizer", use_distributed_optimizer) != use_distributed_optimizer:
        raise ValueError(
            f"{iter_dir} was saved with parallel.use_distributed_optimizer={common['use_distributed_optimizer']}: "
            "resume with the same setting (megatron-core cannot convert optimizer states between the two), or "
            "start from its weights only with model.load")
    same_layout = common.get("layout") == _layout()
    _materialise_optimizer_state(optimizer)
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=True,
                                                      metadata=_optimizer_metadata(use_distributed_optimizer))
    if same_layout:
        state["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(state, iter_dir)
    for i, chunk in enumerate(model_chunks):
        result = chunk.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ValueError(f"{iter_dir}: model state mismatch: missing {missing[:3]}, "
                             f"unexpected {result.unexpected_keys[:3]}")
    with torch.no_grad():  # in fp32 the distributed optimizer's main params alias the (grad-requiring) weights
        optimizer.load_state_dict(loaded["optimizer"])
    _restore_adam_step(optimizer, common.get("adam_step"))
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        log.warning("resuming %s saved at %s under %s: RNG states not restored", iter_dir, common.get("layout"),
                    _layout())
    log.info("resumed %s at iteration %d", iter_dir, loaded["iteration"])
    return int(loaded["iteration"]), int(loaded["consumed_samples"])
