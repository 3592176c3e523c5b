"""Training checkpoints: model, optimizer, LR scheduler, iteration, data position and RNG, in ``torch_dist``.

Same directory layout as converted checkpoints (:mod:`megatron_onereason.checkpoint.mcore_io`), with
``iter_XXXXXXX/`` per save. A save commits in this order, so a job killed at any point resumes from the previous
complete checkpoint: the weights are checked to be finite (a diverged state is never saved), every rank writes its
shards, rank 0 adds ``config.yaml`` (the resolved run config), the files' checksums
(:mod:`megatron_onereason.checkpoint.integrity`) and finally rewrites ``latest_checkpointed_iteration.txt``.
``keep_last_n`` then deletes older iterations. Before a load the files are checked against their checksums; a
damaged latest checkpoint is refused with the previous good iteration named (or, with ``fallback``, resumed from it).

Model weights are stored in model space (global tensors), so they load at any TP/PP/DP. The distributed optimizer's
state is saved in megatron-core's ``fully_reshardable`` format by default (gathered per DP group at save; resumes
at any TP/PP/DP), or ``dp_reshardable`` (parallel save, resumes at the same TP/PP only). The RNG states are restored
only when the layout is unchanged.
"""
from __future__ import annotations

import logging
import os
import random
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import yaml

from megatron_onereason.checkpoint.integrity import (
    SAVED_WITH_CHECKSUMS,
    damaged_message,
    has_manifest,
    read_manifest,
    verify_directory,
    write_manifest,
)
from megatron_onereason.checkpoint.mcore_io import (
    HF_ASSETS,
    RELEASE,
    TRACKER_FILE,
    CheckpointModelInfo,
    checkpoint_iteration_dir,
    committed_iteration,
    iteration_dir_name,
    load_into_model,
    saved_iterations,
)
from megatron_onereason.cli import UserError
from megatron_onereason.fileio import atomic_write_text, human_bytes, is_no_space, no_space_message, remove_tree
from megatron_onereason.training.numerics import nonfinite
from megatron_onereason.training.run_dir import rank0_decides

log = logging.getLogger(__name__)

CONFIG_YAML = "config.yaml"
DISTOPT_FORMATS = ("fully_reshardable", "dp_reshardable")
_VERIFIED: set = set()  # iteration directories verified by this process (a resume checks once)


class NonFiniteError(UserError):
    """The training state holds NaN/inf: the run stops and nothing is saved."""


def _model_state(model_chunks) -> Dict:
    if len(model_chunks) == 1:
        return {"model": model_chunks[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(model_chunks)}


def _optimizer_metadata(use_distributed_optimizer: bool, distopt_format: str) -> Optional[Dict]:
    # "fully_reshardable" gathers each DP group's state on its DP rank 0 (gloo, memory-efficient variant) into a
    # per-parameter layout that loads at any TP/PP/DP. ("fully_sharded_model_space" is deprecated and fails in
    # megatron-core 0.16; "dp_reshardable" reshards only in DP.)
    if not use_distributed_optimizer:
        return None
    return {"distrib_optim_sharding_type": distopt_format,
            "distrib_optim_fully_reshardable_mem_efficient": True}


def _optimizers(optimizer) -> List:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _materialise_optimizer_state(optimizer) -> None:
    """Give a fresh distributed optimizer its (zero-step) states before its sharded state dict is built.

    Without apex/TE, megatron-core's DistributedOptimizer reads the torch optimizer's ``step`` when building the
    sharded state dict; megatron initialises dummy states itself only on its FSDP path. Loading overwrites them.
    """
    for opt in _optimizers(optimizer):
        if hasattr(opt, "_init_optimizer_states_with_dummy_values") and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _adam_step(optimizer) -> Optional[float]:
    """The torch Adam ``step`` of the (chained) optimizer's parameters, when it keeps one per parameter."""
    steps = {float(state["step"]) for opt in _optimizers(optimizer)
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
    for opt in _optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = torch.tensor(step, dtype=state["step"].dtype, device=state["step"].device)


def fully_reshardable_supported() -> Optional[str]:
    """None where this megatron-core loads ``fully_reshardable`` optimizer states; else why not (naming it)."""
    import megatron.core
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if hasattr(DistributedOptimizer, "load_parameter_state_from_fully_reshardable"):
        return None
    return (f"megatron-core {megatron.core.__version__} has no fully reshardable distributed-optimizer format "
            "(0.16-0.19 have it)")


def _load_optimizer(optimizer, loaded) -> None:
    """``optimizer.load_state_dict(loaded)``, loading ``fully_reshardable`` parameter states without ``step``.

    On the torch-optimizer fallback (no apex/TE), megatron-core 0.16-0.19's
    ``DistributedOptimizer._set_main_param_and_optimizer_states`` looks up torch Adam's per-parameter ``step`` in
    the loaded tensors, which that format never holds (KeyError). Its parameter states are therefore loaded here
    with ``step`` set aside; :func:`_restore_adam_step` sets it afterwards.
    """
    chained = _optimizers(optimizer)
    if len(chained) == 1:
        parts = [(chained[0], loaded)]
    else:
        parts = list(zip(chained, (v for _, v in sorted(loaded.items())) if isinstance(loaded, dict) else loaded))
    for opt, state in parts:
        if not (isinstance(state, dict) and state.get("param_state_sharding_type") == "fully_reshardable"):
            opt.load_state_dict(state)
            continue
        state = dict(state)
        param_state = state.pop("param_state")
        state.pop("param_state_sharding_type")
        opt.load_state_dict(state)
        steps = {k: s.pop("step") for k, s in opt.optimizer.state.items() if "step" in s}
        opt.load_parameter_state_from_fully_reshardable(param_state)
        for k, step in steps.items():
            opt.optimizer.state[k]["step"] = step
    if len(chained) > 1 and hasattr(optimizer, "_synchronize_steps"):
        optimizer._synchronize_steps()


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


def weights_finite(model_chunks: List[torch.nn.Module]) -> bool:
    """Collective: whether every rank's weights are free of NaN/inf (one reduction per parameter, no copies)."""
    bad = nonfinite(p for m in model_chunks for p in m.parameters()).to(_device())
    torch.distributed.all_reduce(bad)
    return bad.item() == 0


def save_checkpoint(save_root: str, iteration: int, model_chunks: List[torch.nn.Module], optimizer, scheduler,
                    consumed_samples: int, info: CheckpointModelInfo, hf_assets: Optional[str],
                    use_distributed_optimizer: bool, *, config_yaml: Optional[str] = None,
                    common: Optional[Dict[str, Any]] = None, keep_last_n: Optional[int] = None,
                    distopt_format: str = "fully_reshardable",
                    may_commit: Optional[Callable[[], bool]] = None) -> str:
    """Save and commit iteration ``iteration`` (collective). See the module docstring for the order.

    ``config_yaml`` is stored as ``iter_XXXXXXX/config.yaml``; ``common`` entries go into the common state;
    ``may_commit`` (rank 0) confirms the run still owns the directory before the tracker moves.
    """
    from megatron.core import dist_checkpointing

    if distopt_format not in DISTOPT_FORMATS:
        raise ValueError(f"distopt_format={distopt_format!r} is not one of {DISTOPT_FORMATS}")
    committed = committed_iteration(save_root)
    iter_dir = os.path.join(save_root, iteration_dir_name(iteration))
    if committed == iteration:  # already saved (an interval save at the last iteration; a run resumed at its end)
        return iter_dir
    if not weights_finite(model_chunks):
        raise NonFiniteError(
            f"iteration {iteration}: the model weights hold NaN/inf; not saved ({save_root} stays at iteration "
            f"{committed}). Lower optim.lr or check the data, and resume from the last good checkpoint")
    if committed is not None and iteration < committed:
        raise UserError(f"{save_root}: refusing to save iteration {iteration} where iteration {committed} is already "
                        "committed (the tracker only moves forward)")
    rank = torch.distributed.get_rank()
    start = time.time()
    rank0_decides(lambda: _check_free_space(save_root, committed, iteration))
    if rank == 0:
        if os.path.exists(iter_dir):  # a stale partial save of the same iteration (the tracker never named it)
            remove_tree(iter_dir)
        os.makedirs(iter_dir)
    torch.distributed.barrier()
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=False, metadata=_optimizer_metadata(use_distributed_optimizer, distopt_format))
    state["scheduler"] = scheduler.state_dict()
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    state["layout"] = _layout()
    state["use_distributed_optimizer"] = use_distributed_optimizer
    state["distopt_format"] = distopt_format if use_distributed_optimizer else None
    state["adam_step"] = _adam_step(optimizer)
    state["rng_state"] = _rng_sharded_object()
    state.update(common or {})
    state[SAVED_WITH_CHECKSUMS] = True
    try:
        dist_checkpointing.save(state, iter_dir)
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        full = torch.tensor([float(is_no_space(e))], device=_device())  # every rank raises; rank 0 has the details
        torch.distributed.all_reduce(full, op=torch.distributed.ReduceOp.MAX)
        if not full.item():
            raise
        if rank == 0:
            remove_tree(iter_dir)
        kept = f"the committed checkpoint (iteration {committed}) is intact" if committed is not None else \
            "no checkpoint was committed yet"
        raise UserError(no_space_message(iter_dir, f"checkpoint iteration {iteration}") +
                        f"; the partial save was removed, {kept}") from None
    torch.distributed.barrier()
    written = time.time()
    try:
        if rank == 0 and config_yaml is not None:
            atomic_write_text(os.path.join(iter_dir, CONFIG_YAML), config_yaml)
        torch.distributed.barrier()
        files = write_manifest(iter_dir)
        if rank == 0:
            info.save(save_root)
            if hf_assets and os.path.isdir(hf_assets) and not os.path.isdir(os.path.join(save_root, HF_ASSETS)):
                shutil.copytree(hf_assets, os.path.join(save_root, HF_ASSETS))
            if may_commit is not None and not may_commit():
                raise UserError(f"{save_root}: another process took this run's lock; iteration {iteration} was "
                                "written but not committed")
            atomic_write_text(os.path.join(save_root, TRACKER_FILE), str(iteration))  # the commit point
            log.info("saved %s: %.1f MB in %.1fs (writing %.1fs, checksums %.1fs)", iter_dir,
                     sum(size for size, _ in files.values()) / 1e6, time.time() - start, written - start,
                     time.time() - written)
            if keep_last_n:
                _apply_retention(save_root, iteration, keep_last_n)
    except OSError as e:
        if is_no_space(e):
            raise UserError(no_space_message(iter_dir, f"checkpoint iteration {iteration}") +
                            f" (the committed checkpoint, iteration {committed}, is intact)") from None
        raise
    torch.distributed.barrier()
    return iter_dir


def _check_free_space(save_root: str, committed: Optional[int], iteration: int) -> None:
    """Refuse a save that cannot fit, judged by the size of the last committed one (rank 0, before any write: a
    write failing on one rank only could leave the others waiting in a collective)."""
    if committed is None:
        return
    manifest = read_manifest(os.path.join(save_root, iteration_dir_name(committed))) or {}
    needed = sum(entry.get("bytes", 0) for entry in manifest.values())
    free = shutil.disk_usage(save_root).free
    if needed and free < needed * 1.05:
        raise UserError(f"{save_root}: {human_bytes(free)} free, but checkpoint iteration {committed} took "
                        f"{human_bytes(needed)}: free space (or set checkpoint.keep_last_n) before saving "
                        f"iteration {iteration}; the committed checkpoint is intact")


def _device():
    from megatron_onereason.platform import device

    return device()


def _apply_retention(save_root: str, iteration: int, keep_last_n: int) -> None:
    older = [it for it in saved_iterations(save_root) if it < iteration]
    for it in older[: max(len(older) - (keep_last_n - 1), 0)]:
        remove_tree(os.path.join(save_root, iteration_dir_name(it)))
        log.info("checkpoint.keep_last_n=%d: removed %s", keep_last_n, iteration_dir_name(it))


def has_checkpoint(root: Optional[str]) -> bool:
    return bool(root) and os.path.exists(os.path.join(root, TRACKER_FILE))


def saved_config(iter_dir: str) -> Optional[Dict[str, Any]]:
    """The resolved config a training checkpoint was saved with (None for checkpoints older than that)."""
    path = os.path.join(iter_dir, CONFIG_YAML)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def saved_common(iter_dir: str) -> Dict[str, Any]:
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(iter_dir)


def load_weights(root: str, model_chunks: List[torch.nn.Module]) -> str:
    """Weights only (a converted HF checkpoint, or an earlier stage: megatron's ``--finetune``)."""
    return load_into_model(model_chunks, root)


def select_resume_iteration(root: str, fallback: bool = False) -> str:
    """Collective: the iteration directory to resume, checked against its checksums.

    A damaged latest checkpoint is refused naming its damaged files and the newest earlier iteration that
    verifies; with ``fallback`` that one is resumed instead (the damaged directory is renamed ``iter_N.damaged``
    and the tracker moved back to the good iteration).
    """
    iter_dir = checkpoint_iteration_dir(root)
    if iter_dir in _VERIFIED:
        return iter_dir
    problems = verify_directory(iter_dir)
    if problems is None:
        log.warning("%s predates checksums (saved by an older version): not verified", iter_dir)
    if not problems:
        _VERIFIED.add(iter_dir)
        return iter_dir
    message = damaged_message(iter_dir, problems)
    latest = committed_iteration(root)
    good = None
    for it in reversed(saved_iterations(root)):
        candidate = os.path.join(root, iteration_dir_name(it))
        if latest is not None and it < latest and has_manifest(candidate) and verify_directory(candidate) == []:
            good = it
            break
    if good is None:
        raise UserError(f"{message}; no earlier checkpoint in {root} verifies: restore the damaged files from a "
                        "backup, or start from weights with model.load")
    if not fallback:
        again = f"iteration {latest} is" if latest == good + 1 else f"iterations {good + 1}-{latest} are"
        raise UserError(f"{message}; the previous checkpoint, iteration {good}, verifies: set "
                        f"checkpoint.fallback_to_previous=true to resume from it ({again} trained again)")
    good_dir = os.path.join(root, iteration_dir_name(good))
    if torch.distributed.get_rank() == 0:
        os.rename(iter_dir, iter_dir + ".damaged")
        atomic_write_text(os.path.join(root, TRACKER_FILE), str(good))
        log.warning("%s; resuming from iteration %d instead (checkpoint.fallback_to_previous); the damaged "
                    "directory is kept as %s.damaged", message, good, os.path.basename(iter_dir))
    torch.distributed.barrier()
    _VERIFIED.add(good_dir)
    return good_dir


def resume(root: str, model_chunks: List[torch.nn.Module], optimizer, scheduler,
           use_distributed_optimizer: bool) -> Tuple[int, int]:
    """Restore a training checkpoint (verified first); returns ``(iteration, consumed_samples)``."""
    from megatron.core import dist_checkpointing

    iter_dir = select_resume_iteration(root)
    if os.path.basename(iter_dir) == RELEASE:
        raise UserError(f"{root}: a converted (release) checkpoint has no training state; use model.load for it")
    common = dist_checkpointing.load_common_state_dict(iter_dir)
    if common.get("use_distributed_optimizer", use_distributed_optimizer) != use_distributed_optimizer:
        raise UserError(
            f"{iter_dir} was saved with parallel.use_distributed_optimizer={common['use_distributed_optimizer']}: "
            "resume with the same setting (megatron-core cannot convert optimizer states between the two), or "
            "start from its weights only with model.load")
    saved_layout, layout = common.get("layout"), _layout()
    same_layout = saved_layout == layout
    distopt_format = common.get("distopt_format") or "dp_reshardable"  # checkpoints before the field: dp_reshardable
    if use_distributed_optimizer:
        _check_optimizer_resharding(iter_dir, distopt_format, saved_layout, layout)
    _materialise_optimizer_state(optimizer)
    state = _model_state(model_chunks)
    state["optimizer"] = optimizer.sharded_state_dict(
        state, is_loading=True, metadata=_optimizer_metadata(use_distributed_optimizer, distopt_format))
    if same_layout:
        state["rng_state"] = _rng_sharded_object()
    loaded = dist_checkpointing.load(state, iter_dir)
    for i, chunk in enumerate(model_chunks):
        result = chunk.load_state_dict(loaded["model" if len(model_chunks) == 1 else f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise UserError(f"{iter_dir}: model state mismatch: missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]}")
    lr_bounds = [(g.get("max_lr"), g.get("min_lr")) for g in optimizer.param_groups]
    with torch.no_grad():  # in fp32 the distributed optimizer's main params alias the (grad-requiring) weights
        _load_optimizer(optimizer, loaded["optimizer"])
    # The scheduler reads each group's max_lr / min_lr, which the load just replaced by the checkpoint's: keep the
    # config's (they differ only when the trainer was told checkpoint.override_changed_settings).
    for group, (max_lr, min_lr) in zip(optimizer.param_groups, lr_bounds):
        group.update({k: v for k, v in (("max_lr", max_lr), ("min_lr", min_lr)) if v is not None})
    _restore_adam_step(optimizer, common.get("adam_step"))
    scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    else:
        log.warning("resuming %s saved at %s under %s: RNG states not restored", iter_dir, saved_layout, layout)
    log.info("resumed %s at iteration %d", iter_dir, loaded["iteration"])
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


def _check_optimizer_resharding(iter_dir: str, distopt_format: str, saved: Optional[Dict], now: Dict) -> None:
    """The distributed optimizer's state can follow a TP/PP change only in the fully reshardable format."""
    if saved is None or (saved["tp"], saved["pp"]) == (now["tp"], now["pp"]):
        return
    where = f"{iter_dir} was saved at TP{saved['tp']} PP{saved['pp']} and is resumed at TP{now['tp']} PP{now['pp']}"
    if distopt_format != "fully_reshardable":
        raise UserError(f"{where}, but its distributed-optimizer state is {distopt_format} (reshards only in DP): "
                        f"resume at TP{saved['tp']} PP{saved['pp']} (any DP), or start from its weights only with "
                        "model.load")
    reason = fully_reshardable_supported()
    if reason:
        raise UserError(f"{where}: {reason}; resume at the saved layout or with another megatron-core")
