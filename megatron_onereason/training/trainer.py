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
from functools import partial
from typing import Dict, List, Optional

import psutil
import torch

from megatron_onereason.checkpoint.mcore_io import HF_ASSETS, CheckpointModelInfo
from megatron_onereason.metrics_log import MetricsLogger, format_eta
from megatron_onereason.model.builder import FP8Config, ModelBuildConfig, build_qwen3_model
from megatron_onereason.model.forward import packed_seq_params
from megatron_onereason.model.qwen3_config import load_qwen3_config, padded_vocab_size
from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON, ItemicVocab
from megatron_onereason.training import checkpointing
from megatron_onereason.training.config import TrainConfig
from megatron_onereason.training.flops import default_peak_tflops, training_flops
from megatron_onereason.training.freezing import (
    apply_trainable,
    mask_frozen_row_grads,
    no_weight_decay_for_row_frozen,
    row_frozen_params,
)
from megatron_onereason.training.loss import breakdown_metrics, loss_breakdown

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
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=_device())
        torch.distributed.all_reduce(flag)
        return bool(flag.item())


def _device():
    from megatron_onereason.platform import device

    return device()


def _model_source(cfg: TrainConfig):
    """(CheckpointModelInfo, hf assets dir or None, weights-only dir or None, resume dir or None)."""
    tp = cfg.parallel.tensor_model_parallel_size
    if checkpointing.has_checkpoint(cfg.checkpoint.load):
        root = cfg.checkpoint.load
        return CheckpointModelInfo.load(root), os.path.join(root, HF_ASSETS), None, root
    if cfg.model.load:
        return CheckpointModelInfo.load(cfg.model.load), os.path.join(cfg.model.load, HF_ASSETS), cfg.model.load, None
    if cfg.model.init_from:
        qwen3 = load_qwen3_config(cfg.model.init_from)
        assets = cfg.model.init_from if os.path.isdir(cfg.model.init_from) else None
        return CheckpointModelInfo(qwen3, padded_vocab_size(qwen3.vocab_size, tp)), assets, None, None
    raise ValueError("nothing to train: set model.load (a converted checkpoint), model.init_from (a preset), "
                     "or checkpoint.load (a checkpoint to resume)")


def _itemic_vocab(cfg: TrainConfig, assets: Optional[str]) -> Optional[ItemicVocab]:
    directory = cfg.model.itemic_vocab or assets
    if directory and os.path.exists(os.path.join(directory, ITEMIC_JSON)):
        return ItemicVocab.load(directory)
    if cfg.model.itemic_vocab:
        raise FileNotFoundError(f"model.itemic_vocab={cfg.model.itemic_vocab}: no {ITEMIC_JSON} there")
    return None


def _build_config(cfg: TrainConfig, info: CheckpointModelInfo) -> ModelBuildConfig:
    p, prec = cfg.parallel, cfg.precision
    return ModelBuildConfig(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        params_dtype=torch.bfloat16 if prec.bf16 else torch.float32,
        bf16=prec.bf16,
        fp8=FP8Config(prec.fp8, prec.fp8_recipe, prec.fp8_amax_history_len) if prec.fp8 else None,
        layer_spec=cfg.model.layer_spec,
        padded_vocab_size=info.padded_vocab_size,
        recompute_granularity=cfg.model.recompute_granularity,
        calculate_per_token_loss=True,
    )


def _build_optimizer(cfg: TrainConfig, model, row_mode: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    o = cfg.optim
    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=cfg.precision.bf16,
        params_dtype=torch.bfloat16 if cfg.precision.bf16 else torch.float32,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
    )
    overrides = get_standard_config_overrides(opt_config)
    if row_mode:
        overrides.update(no_weight_decay_for_row_frozen())
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=overrides)
    decay = o.decay_iters or cfg.train.iters
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(decay, o.warmup_iters + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(cfg.train.iters, 1),
        wd_incr_style="constant",
    )
    return optimizer, scheduler


def _micro_batches(dataset, first_sample: int, global_batch: int) -> List[Dict]:
    """This DP rank's packs of the global batch ``[first_sample, first_sample + global_batch)``."""
    from megatron.core import parallel_state

    dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = global_batch // dp
    start = first_sample + rank * per_rank
    return [dataset[(start + i) % len(dataset)] for i in range(per_rank)]


def _forward_step(itemic_range, num_sources, data_iterator, model):
    batch = next(data_iterator)
    dev = _device()
    tokens = batch["tokens"].to(dev)[None]
    output = model(tokens, batch["position_ids"].to(dev)[None], None, labels=batch["labels"].to(dev)[None],
                   packed_seq_params=packed_seq_params(batch["cu_seqlens"].to(dev)))

    def loss_func(per_token_loss):
        mask = batch["loss_mask"].to(dev)
        loss_sum = (per_token_loss.view(-1).float() * mask).sum()
        report = loss_breakdown(per_token_loss.detach(), mask, batch["labels"].to(dev), batch["source_ids"].to(dev),
                                itemic_range, num_sources)
        return loss_sum, mask.sum().to(torch.int), {"breakdown": report}

    return output, loss_func


def run_training(cfg: TrainConfig) -> List[Dict[str, float]]:
    """Train as configured; returns the logged metrics (on the logging rank; empty elsewhere)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.utils import get_model_config

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

    info, assets, weights_dir, resume_dir = _model_source(cfg)
    itemic = _itemic_vocab(cfg, assets)
    build = _build_config(cfg, info)
    vpp = p.virtual_pipeline_model_parallel_size
    chunks = [build_qwen3_model(info.config, build, vp_stage=i if vpp else None).to(_device())
              for i in range(vpp or 1)]
    summary = apply_trainable(chunks, cfg.train.trainable, itemic)
    if weights_dir:
        checkpointing.load_weights(weights_dir, chunks)
    counts = torch.tensor([summary.trainable_params, summary.total_params], dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    if rank == 0:
        log.info("parameters: %.4gM trainable of %.4gM (trainable=%s)", counts[0] / 1e6, counts[1] / 1e6,
                 cfg.train.trainable)

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=p.overlap_grad_reduce,
                                               use_distributed_optimizer=p.use_distributed_optimizer)
    model = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    row_params = row_frozen_params(chunks)
    optimizer, scheduler = _build_optimizer(cfg, model, bool(row_params))
    iteration, consumed = 0, 0
    if resume_dir:
        iteration, consumed = checkpointing.resume(resume_dir, chunks, optimizer, scheduler,
                                                   p.use_distributed_optimizer)

    dataset = build_packed_dataset(
        BlendConfig(parse_blend([str(x) for x in cfg.data.blend]), cfg.data.total_tokens, cfg.data.seed),
        PackingConfig(cfg.data.seq_length, cfg.data.max_sample_length, cfg.data.overlong_policy,
                      seed=cfg.data.seed),
        pad_id=PAD_TOKEN_ID,
    )
    model_config = get_model_config(model[0])
    model_config.grad_scale_func = optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    if p.overlap_grad_reduce:
        model_config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        model_config.grad_sync_func = [m.start_grad_sync for m in model] if len(model) > 1 else model[0].start_grad_sync
    itemic_range = (itemic.first_id, itemic.end_id) if itemic else (0, 0)
    forward_step = partial(_forward_step, itemic_range, len(dataset.source_names))
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
                                          assets, p.use_distributed_optimizer)

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
        work = torch.zeros(2, dtype=torch.float64, device=_device())
        for mb in micro:
            docs = (mb["cu_seqlens"][1:] - mb["cu_seqlens"][:-1])[: mb["num_documents"]].tolist()
            work += torch.tensor([sum(docs), training_flops(info.config, docs, info.padded_vocab_size)],
                                 dtype=torch.float64, device=_device())
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
