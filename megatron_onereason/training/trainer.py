"""Pre-training and SFT on megatron-core: packed sequences, pipeline schedules, DDP, megatron's optimizer.

One iteration = ``global_batch_size`` packs (one pack per micro-batch, ``thd`` packed attention), split evenly
over data-parallel ranks; gradients are accumulated over micro-batches by megatron's schedule (1F1B, interleaved
with virtual stages). The loss is a sum over target tokens and ``finalize_model_grads`` divides by the number of
target tokens in the whole global batch (``calculate_per_token_loss``), so the update does not depend on how the
batch is split over micro-batches and ranks.
"""
from __future__ import annotations

import logging
import signal
import time
from functools import partial
from typing import Dict, List

import psutil
import torch

from megatron_onereason.metrics_log import MetricsLogger, format_eta
from megatron_onereason.model.packed_attention import document_params
from megatron_onereason.training import checkpointing
from megatron_onereason.training.config import TrainConfig
from megatron_onereason.training.flops import default_peak_tflops, training_flops
from megatron_onereason.training.freezing import mask_frozen_row_grads
from megatron_onereason.training.loss import breakdown_metrics, loss_breakdown
from megatron_onereason.training.setup import device, install_grad_hooks, setup_model_and_optimizer

log = logging.getLogger("megatron_onereason.train")
PAD_TOKEN_ID = 0  # padding sits in its own attention segment with no loss, so its id never matters


class _StopFlag:
    """Set by SIGTERM (SLURM's pre-emption / time-limit signal): save at the end of the iteration and exit."""

    def __init__(self):
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def any_rank(self) -> bool:
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device())
        torch.distributed.all_reduce(flag)
        return bool(flag.item())


def _micro_batches(dataset, first_sample: int, global_batch: int) -> List[Dict]:
    """This DP rank's packs of the global batch ``[first_sample, first_sample + global_batch)``."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = global_batch // dp
    start = first_sample + rank * per_rank
    return [dataset[(start + i) % len(dataset)] for i in range(per_rank)]


def _forward_step(itemic_ranges, num_sources, data_iterator, model):
    batch = next(data_iterator)
    dev = device()
    tokens = batch["tokens"].to(dev)[None]
    output = model(tokens, batch["position_ids"].to(dev)[None], None, labels=batch["labels"].to(dev)[None],
                   packed_seq_params=document_params(batch["cu_seqlens"], dev))

    def loss_func(per_token_loss):
        mask = batch["loss_mask"].to(dev)
        loss_sum = (per_token_loss.view(-1).float() * mask).sum()
        report = loss_breakdown(per_token_loss.detach(), mask, batch["labels"].to(dev), batch["source_ids"].to(dev),
                                itemic_ranges, num_sources)
        return loss_sum, mask.sum().to(torch.int), {"breakdown": report}

    return output, loss_func


def run_training(cfg: TrainConfig) -> List[Dict[str, float]]:
    """Train as configured; returns the logged metrics (on the logging rank; empty elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_onereason.data.blending import BlendConfig, parse_blend
    from megatron_onereason.data.packed_dataset import build_packed_dataset
    from megatron_onereason.data.packing import PackingConfig
    from megatron_onereason.platform import initialize_distributed

    p = cfg.parallel
    if p.context_parallel_size > 1:
        # thd packs would have to be padded per document to 2×CP and split with TE's partitioned indices.
        raise ValueError("parallel.context_parallel_size > 1 is not supported yet for packed sequences; "
                         "use tensor/pipeline parallelism with sequence_parallel and activation recomputation")
    initialize_distributed(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                           p.virtual_pipeline_model_parallel_size, p.context_parallel_size, seed=cfg.train.seed)
    world, rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
    logging_rank = rank == world - 1  # in the last pipeline stage, where the losses are
    dp = parallel_state.get_data_parallel_world_size()
    if cfg.train.global_batch_size % dp:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by DP={dp}")
    if not cfg.data.blend:
        raise ValueError("data.blend is empty: give [weight, prefix, ...] of tools/preprocess_data.py outputs")

    state = setup_model_and_optimizer(cfg.model, p, cfg.precision, cfg.optim, cfg.train.trainable, cfg.train.iters,
                                      resume_from=cfg.checkpoint.load)
    chunks, model, optimizer, scheduler = state.chunks, state.model, state.optimizer, state.scheduler
    info, itemic, row_params = state.info, state.itemic, state.row_params
    iteration, consumed = state.iteration, state.consumed_samples

    dataset = build_packed_dataset(
        BlendConfig(parse_blend([str(x) for x in cfg.data.blend]), cfg.data.total_tokens, cfg.data.seed),
        PackingConfig(cfg.data.seq_length, cfg.data.max_sample_length, cfg.data.overlong_policy,
                      seed=cfg.data.seed),
        pad_id=PAD_TOKEN_ID,
    )
    install_grad_hooks(state, p)
    forward_step = partial(_forward_step, itemic.id_ranges if itemic else [], len(dataset.source_names))
    forward_backward = get_forward_backward_func()
    peak = cfg.logging.peak_tflops_per_device or default_peak_tflops()
    logger = MetricsLogger(cfg.logging.tensorboard_dir, cfg.logging.metrics_jsonl, enabled=logging_rank)
    stop = _StopFlag()
    history: List[Dict[str, float]] = []
    gbs = cfg.train.global_batch_size
    start_iteration, run_start = iteration, time.time()

    def save():
        if cfg.checkpoint.save:
            checkpointing.save_checkpoint(cfg.checkpoint.save, iteration, chunks, optimizer, scheduler, consumed, info,
                                          state.assets, p.use_distributed_optimizer)

    while iteration < cfg.train.iters:
        step_start = time.time()
        micro = _micro_batches(dataset, consumed, gbs)
        iterators = [iter(micro) for _ in model] if len(model) > 1 else iter(micro)
        for m in model:
            m.zero_grad_buffer()
        optimizer.zero_grad()
        losses = forward_backward(forward_step_func=forward_step, data_iterator=iterators,
                                  model=model if len(model) > 1 else model[0], num_microbatches=len(micro),
                                  seq_length=cfg.data.seq_length, micro_batch_size=1, forward_only=False)
        mask_frozen_row_grads(row_params)
        updated, grad_norm, _ = optimizer.step()
        if updated:
            scheduler.step(increment=1)
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
                     "%.2f TFLOP/s/dev | %.2fs/it | ETA %s", iteration, cfg.train.iters, metrics.get("loss", 0.0),
                     metrics.get("loss_itemic", float("nan")), metrics.get("loss_text", float("nan")),
                     metrics["lr"], metrics["grad_norm"], metrics["tokens_per_sec"], tflops, elapsed,
                     format_eta(rate * (cfg.train.iters - iteration)))
        interval = cfg.checkpoint.save_interval
        stopping = stop.any_rank() or iteration == cfg.train.exit_at_iteration
        if stopping or iteration == cfg.train.iters or (interval and iteration % interval == 0):
            save()
        if stopping:
            if rank == 0:
                log.info("stopping at iteration %d (SIGTERM or train.exit_at_iteration)", iteration)
            break
    logger.close()
    return history
