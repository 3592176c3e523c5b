"""Pre-training and SFT on megatron-core: packed sequences, pipeline schedules, DDP, megatron's optimizer.

One iteration = ``global_batch_size`` packs (one pack per micro-batch, ``thd`` packed attention), split evenly
over data-parallel ranks; gradients are accumulated over micro-batches by megatron's schedule (1F1B, interleaved
with virtual stages). The loss is a sum over target tokens and ``finalize_model_grads`` divides by the number of
target tokens in the whole global batch (``calculate_per_token_loss``), so the update does not depend on how the
batch is split over micro-batches and ranks.
"""
from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from functools import partial
from typing import Dict, List, Optional

import psutil
import torch

from megatron_onereason.checkpoint.mcore_io import RELEASE, committed_iteration
from megatron_onereason.cli import EXIT_REQUEUE, UserError
from megatron_onereason.config import to_dict
from megatron_onereason.metrics_log import MetricsLogger, format_eta
from megatron_onereason.model.forward import pack_to_device
from megatron_onereason.training import checkpointing
from megatron_onereason.training.checkpointing import NonFiniteError
from megatron_onereason.training.config import (
    DATA_ORDER,
    TrainConfig,
    config_fingerprint,
    config_yaml,
    resume_differences,
)
from megatron_onereason.training.flops import default_peak_tflops, training_flops
from megatron_onereason.training.loss import breakdown_metrics, loss_breakdown
from megatron_onereason.training.memory_plan import check_run_fits
from megatron_onereason.training.numerics import optimizer_step
from megatron_onereason.training.run_dir import RunDirectory, rank0_decides
from megatron_onereason.training.setup import (
    apply_optimizer_settings,
    check_training_inputs,
    device,
    install_grad_hooks,
    setup_model_and_optimizer,
    setup_training_data,
)

log = logging.getLogger("megatron_onereason.train")
PAD_TOKEN_ID = 0  # padding sits in its own attention segment with no loss, so its id never matters


class _StopFlag:
    """An early stop, agreed by all ranks: SIGTERM (SLURM's pre-emption / time-limit signal) or the wall-clock budget
    ``train.exit_after_minutes`` ran out. The trainer saves at the end of the iteration and exits with 75."""

    def __init__(self, budget_minutes: Optional[float]):
        self.requested = False
        self.deadline = time.time() + budget_minutes * 60 if budget_minutes else None
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def any_rank(self) -> bool:
        out_of_time = self.deadline is not None and time.time() >= self.deadline
        flag = torch.tensor([1 if self.requested or out_of_time else 0], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(flag)
        return bool(flag.item())


def _forward_step(itemic_ranges, num_sources, data_iterator, model):
    batch = pack_to_device(next(data_iterator), device())  # no device->host sync: see model/forward.py
    output = model(batch["tokens"][None], batch["position_ids"][None], None, labels=batch["labels"][None],
                   packed_seq_params=batch["packed_seq_params"])

    def loss_func(per_token_loss):
        mask = batch["loss_mask"]
        loss_sum = (per_token_loss.view(-1).float() * mask).sum()
        report = loss_breakdown(per_token_loss.detach(), mask, batch["labels"], batch["source_ids"],
                                itemic_ranges, num_sources)
        return loss_sum, mask.sum().to(torch.int), {"breakdown": report}

    return output, loss_func


@dataclass
class TrainingResult:
    history: List[Dict[str, float]]  # logged metrics (on the logging rank; empty elsewhere)
    iteration: int
    completed: bool  # reached train.iters (False: stopped early after saving; requeue to continue)


def run_training(cfg: TrainConfig) -> TrainingResult:
    """Train as configured. User errors (bad paths, damaged or foreign checkpoints, changed settings on resume,
    non-finite numbers) raise ``UserError`` on every rank."""
    from megatron.core import parallel_state

    from megatron_onereason.platform import initialize_distributed

    p = cfg.parallel
    if p.context_parallel_size > 1:
        # thd packs would have to be padded per document to 2×CP and split with TE's partitioned indices.
        raise UserError("parallel.context_parallel_size > 1 is not supported yet for packed sequences; "
                        "use tensor/pipeline parallelism with sequence_parallel and activation recomputation")
    check_training_inputs(cfg)  # every path and blend prefix, before any process group or model exists
    initialize_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                           p.virtual_pipeline_model_parallel_size, p.context_parallel_size, seed=cfg.train.seed)
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.train.global_batch_size % dp:
        raise UserError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by DP={dp}")
    resolved = config_yaml(cfg)
    if torch.distributed.get_rank() == 0:
        log.info("resolved config:\n%s", resolved.rstrip())
        if not cfg.checkpoint.save:
            log.warning("checkpoint.save is not set: nothing will be saved")
    run_dir: Optional[RunDirectory] = None
    save_root = cfg.checkpoint.save

    def claim():
        nonlocal run_dir
        same = bool(cfg.checkpoint.load) and os.path.abspath(cfg.checkpoint.load) == os.path.abspath(save_root)
        run_dir = RunDirectory.claim(save_root, resuming_it=same)
        return run_dir.run_id

    run_id = rank0_decides(claim) if save_root else None
    try:
        result = _train(cfg, resolved, run_id, run_dir)
    finally:
        if run_dir is not None:
            run_dir.release()
    torch.distributed.barrier()  # all ranks done (lock released) before any exits: torchrun stops the rest then
    return result


def _check_resume_settings(cfg: TrainConfig, iter_dir: str) -> bool:
    """Refuse a resume whose optimizer / schedule / iteration / data-order settings differ from the checkpoint's,
    unless ``checkpoint.override_changed_settings`` (then the new values are used and listed). Returns whether the
    data order changed (then the saved data position means nothing and the data starts from its beginning)."""
    saved = checkpointing.saved_config(iter_dir)
    if saved is None:
        log.warning("%s holds no config.yaml (saved by an older version): settings not compared", iter_dir)
        return False
    diffs = resume_differences(saved, to_dict(cfg))
    if not diffs:
        return False
    listed = "; ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in diffs)
    if not cfg.checkpoint.override_changed_settings:
        raise UserError(f"resuming {iter_dir} with changed settings: {listed}. Resume with the checkpoint's values, "
                        "or set checkpoint.override_changed_settings=true to continue with the new ones")
    data_changed = any(k.startswith(DATA_ORDER) for k, _, _ in diffs)
    if torch.distributed.get_rank() == 0:
        log.warning("checkpoint.override_changed_settings: continuing %s with the new values: %s%s", iter_dir, listed,
                    "; the data order changed, so the data starts again from its first pack (the saved position "
                    "indexes the old order)" if data_changed else "")
    return data_changed


def _train(cfg: TrainConfig, resolved: str, run_id: Optional[str], run_dir: Optional[RunDirectory]) -> TrainingResult:
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    p = cfg.parallel
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    logging_rank = rank == world - 1  # in the last pipeline stage, where the losses are
    check_run_fits(cfg, world, rank)  # the memory planner refuses a layout that cannot fit (train.memory_check)
    skips = 0  # non-finite steps skipped over the whole run (train.nonfinite=skip)
    fresh_data = False  # the data order changed on resume (overridden): the data position restarts at 0
    if checkpointing.has_checkpoint(cfg.checkpoint.load):
        iter_dir = checkpointing.select_resume_iteration(cfg.checkpoint.load, cfg.checkpoint.fallback_to_previous)
        if os.path.basename(iter_dir) != RELEASE:
            fresh_data = _check_resume_settings(cfg, iter_dir)
            skips = int(checkpointing.saved_common(iter_dir).get("nonfinite_skips", 0))

    state = setup_model_and_optimizer(cfg.model, p, cfg.precision, cfg.optim, cfg.train.trainable, cfg.train.iters,
                                      resume_from=cfg.checkpoint.load)
    chunks, model, optimizer, scheduler = state.chunks, state.model, state.optimizer, state.scheduler
    info, itemic, row_params = state.info, state.itemic, state.row_params
    iteration, consumed = state.iteration, 0 if fresh_data else state.consumed_samples
    apply_optimizer_settings(optimizer, cfg.optim)  # betas / eps of a resumed optimizer follow the config too
    if run_dir is not None and iteration < cfg.train.iters:
        run_dir.clear_complete()

    peak = cfg.logging.peak_tflops_per_device or default_peak_tflops()
    logger = MetricsLogger(cfg.logging.tensorboard_dir, cfg.logging.metrics_jsonl, enabled=logging_rank,
                           wandb=cfg.logging.wandb(run_id, to_dict(cfg)))
    data = setup_training_data(cfg.data, cfg.train.global_batch_size, consumed, PAD_TOKEN_ID)  # its workers: close
    dataset = data.dataset
    install_grad_hooks(state, p)
    forward_step = partial(_forward_step, itemic.id_ranges if itemic else [], len(dataset.source_names))
    forward_backward = get_forward_backward_func()
    stop = _StopFlag(cfg.train.exit_after_minutes)
    history: List[Dict[str, float]] = []
    gbs = cfg.train.global_batch_size
    start_iteration, run_start = iteration, time.time()
    empty_batches = 0
    fingerprint = config_fingerprint(cfg)
    if iteration >= cfg.train.iters and rank == 0:
        log.info("resumed at iteration %d: train.iters=%d already reached", iteration, cfg.train.iters)

    def save():  # a second save of the same iteration is a no-op
        if not cfg.checkpoint.save:
            return
        checkpointing.save_checkpoint(
            cfg.checkpoint.save, iteration, chunks, optimizer, scheduler, consumed, info, state.assets,
            p.use_distributed_optimizer, config_yaml=f"# run {run_id}, iteration {iteration}\n{resolved}",
            common={"run_id": run_id, "nonfinite_skips": skips, "config_fingerprint": fingerprint},
            keep_last_n=cfg.checkpoint.keep_last_n, distopt_format=cfg.checkpoint.distopt_format,
            may_commit=run_dir.still_ours if run_dir is not None else None)

    try:
        while iteration < cfg.train.iters:
            step_start = time.time()
            micro = data.next_global_batch()
            iterators = [iter(micro) for _ in model] if len(model) > 1 else iter(micro)
            step = optimizer_step(
                model, chunks, optimizer, scheduler,
                lambda: forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                         model=model if len(model) > 1 else model[0], num_microbatches=len(micro),
                                         seq_length=cfg.data.seq_length, micro_batch_size=1, forward_only=False),
                lambda losses: [x["breakdown"][0] for x in losses], sum(int(mb["loss_mask"].sum()) for mb in micro),
                row_params, device(), f"iteration {iteration + 1}")
            losses, health, grad_norm, skipped = step.losses, step.health, step.grad_norm, not step.updated
            if not health.has_loss_tokens:
                empty_batches += 1
                if rank == 0:
                    log.warning("iteration %d: the global batch has no loss tokens (its %d packs are fully "
                                "loss-masked); update skipped (%d such batches in this run)", iteration + 1, gbs,
                                empty_batches)
            elif not health.ok:
                what = "loss" if health.loss_nonfinite else "gradients"
                if cfg.train.nonfinite == "stop" or skips >= cfg.train.max_nonfinite_skips:
                    why = ("" if cfg.train.nonfinite == "stop" else
                           f" after {skips} skipped non-finite steps (train.max_nonfinite_skips)")
                    raise NonFiniteError(
                        f"iteration {iteration + 1}: non-finite (NaN/inf) {what}{why}; stopped before the update, "
                        f"nothing saved (last committed checkpoint: {_committed(cfg.checkpoint.save)}). Lower "
                        "optim.lr, raise warmup or check the data; train.nonfinite=skip skips up to "
                        "train.max_nonfinite_skips such steps")
                skips += 1
                if rank == 0:
                    log.warning("iteration %d: non-finite %s; update skipped (%d of at most %d)", iteration + 1,
                                what, skips, cfg.train.max_nonfinite_skips)
            iteration += 1
            consumed += gbs

            # Reduce what this DP rank saw: loss breakdown (last stage only) and real tokens / model FLOPs.
            work = torch.zeros(2, dtype=torch.float64, device=device())
            for mb in micro:
                docs = (mb["cu_seqlens"][1:] - mb["cu_seqlens"][:-1])[: mb["num_documents"]].tolist()
                work += torch.tensor([sum(docs), training_flops(info.config, docs, info.padded_vocab_size)],
                                     dtype=torch.float64, device=device())
            torch.distributed.all_reduce(work, group=parallel_state.get_data_parallel_group())
            if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
                totals = torch.stack([x["breakdown"] for x in losses]).sum(0)
                torch.distributed.all_reduce(totals, group=parallel_state.get_data_parallel_group())
            elapsed = time.time() - step_start
            if logging_rank and (iteration % cfg.logging.log_interval == 0 or iteration == cfg.train.iters):
                metrics = breakdown_metrics(totals, dataset.source_names)
                tflops = work[1].item() / elapsed / world / 1e12
                metrics.update({
                    "lr": scheduler.get_lr(optimizer.param_groups[0]),
                    "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                    "skipped": int(skipped),
                    "tokens_per_sec": work[0].item() / elapsed,
                    "tflops_per_device": tflops,
                    "iteration_time": elapsed,
                    "consumed_samples": consumed,
                    "memory_gib": (torch.cuda.max_memory_allocated() if torch.cuda.is_available()
                                   else psutil.Process().memory_info().rss) / 2**30,
                })
                if peak:
                    metrics["mfu"] = tflops / peak
                logger.log(iteration, metrics)
                history.append({"iteration": iteration, **metrics})
                rate = (time.time() - run_start) / (iteration - start_iteration)
                log.info("iter %d/%d | loss %.4f | itemic %.4f | text %.4f | lr %.3g | grad %.3f | %.0f tok/s | "
                         "%.2f TFLOP/s/dev | %.2fs/it | ETA %s%s", iteration, cfg.train.iters,
                         metrics.get("loss", float("nan")), metrics.get("loss_itemic", float("nan")),
                         metrics.get("loss_text", float("nan")), metrics["lr"], metrics["grad_norm"],
                         metrics["tokens_per_sec"], tflops, elapsed,
                         format_eta(rate * (cfg.train.iters - iteration)), " | skipped" if skipped else "")
            interval = cfg.checkpoint.save_interval
            stopping = stop.any_rank() or iteration == cfg.train.exit_at_iteration
            if stopping or iteration == cfg.train.iters or (interval and iteration % interval == 0):
                save()
            if stopping and iteration < cfg.train.iters:
                if rank == 0:
                    log.info("stopping early at iteration %d of %d (SIGTERM, train.exit_at_iteration or "
                             "train.exit_after_minutes)%s; exit code %d: requeue to continue", iteration,
                             cfg.train.iters, f", saved in {cfg.checkpoint.save}" if cfg.checkpoint.save else "",
                             EXIT_REQUEUE)
                return TrainingResult(history, iteration, completed=False)
        save()  # a run resumed at its end has nothing new; a fresh one saved in the loop
        if run_dir is not None:
            run_dir.mark_complete(iteration, fingerprint)
        if rank == 0 and (empty_batches or skips):
            log.warning("run summary: %d iterations without loss tokens, %d non-finite steps skipped", empty_batches,
                        skips)
        return TrainingResult(history, iteration, completed=True)
    finally:
        logger.close()
        data.close()


def _committed(root: Optional[str]) -> str:
    if not root:
        return "none (checkpoint.save is not set)"
    it = committed_iteration(root)
    return f"{root} iteration {it}" if it is not None else f"none in {root}"
