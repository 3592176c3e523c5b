"""Model, DDP wrapper, optimizer and scheduler from the typed config sections: shared by the pre-training / SFT
trainer and the RL actor, so both run the same megatron-core stack."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from megatron_onereason.checkpoint.mcore_io import HF_ASSETS, CheckpointModelInfo
from megatron_onereason.fileio import check_writable
from megatron_onereason.model.builder import FP8Config, ModelBuildConfig, build_qwen3_model
from megatron_onereason.model.qwen3_config import load_qwen3_config, padded_vocab_size
from megatron_onereason.data.indexed import MAX_TOKEN_ID_KEY
from megatron_onereason.tokenizer.fingerprint import (
    FINGERPRINT_KEY,
    check_same_tokenizer,
    has_tokenizer_files,
    tokenizer_fingerprint,
)
from megatron_onereason.tokenizer.itemic_tokens import ITEMIC_JSON, ItemicVocab
from megatron_onereason.training import checkpointing
from megatron_onereason.training.config import (
    DataSection,
    ModelSection,
    OptimSection,
    ParallelSection,
    PrecisionSection,
    TrainConfig,
)
from megatron_onereason.training.freezing import apply_trainable, no_weight_decay_for_row_frozen, row_frozen_params

log = logging.getLogger("megatron_onereason.train")


@dataclass
class ModelAndOptimizer:
    chunks: List[torch.nn.Module]  # this rank's model chunks (one per virtual pipeline stage)
    model: List[torch.nn.Module]  # the same chunks wrapped in megatron DDP
    optimizer: object
    scheduler: object
    info: CheckpointModelInfo
    assets: Optional[str]  # HF config/tokenizer files carried into saved checkpoints
    itemic: Optional[ItemicVocab]
    row_params: List[torch.nn.Parameter]  # row-frozen vocabulary matrices (stage 1)
    iteration: int = 0
    consumed_samples: int = 0


def device():
    from megatron_onereason.platform import device

    return device()


def model_source(model: ModelSection, resume_from: Optional[str], tp: int):
    """(CheckpointModelInfo, hf assets dir or None, weights-only dir or None, resume dir or None)."""
    if checkpointing.has_checkpoint(resume_from):
        return CheckpointModelInfo.load(resume_from), os.path.join(resume_from, HF_ASSETS), None, resume_from
    if model.load:
        return CheckpointModelInfo.load(model.load), os.path.join(model.load, HF_ASSETS), model.load, None
    if model.init_from:
        qwen3 = load_qwen3_config(model.init_from)
        assets = model.init_from if os.path.isdir(model.init_from) else None
        return CheckpointModelInfo(qwen3, padded_vocab_size(qwen3.vocab_size, tp)), assets, None, None
    raise ValueError("nothing to train: set model.load (a converted checkpoint), model.init_from (a preset), "
                     "or checkpoint.load (a checkpoint to resume)")


def itemic_vocab(model: ModelSection, assets: Optional[str]) -> Optional[ItemicVocab]:
    directory = model.itemic_vocab or assets
    if directory and os.path.exists(os.path.join(directory, ITEMIC_JSON)):
        return ItemicVocab.load(directory)
    if model.itemic_vocab:
        raise FileNotFoundError(f"model.itemic_vocab={model.itemic_vocab}: no {ITEMIC_JSON} there")
    return None


def build_config(model: ModelSection, p: ParallelSection, prec: PrecisionSection, info: CheckpointModelInfo,
                 **overrides) -> ModelBuildConfig:
    return ModelBuildConfig(
        tensor_model_parallel_size=p.tensor_model_parallel_size,
        pipeline_model_parallel_size=p.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=p.virtual_pipeline_model_parallel_size,
        sequence_parallel=p.sequence_parallel,
        context_parallel_size=p.context_parallel_size,
        params_dtype=torch.bfloat16 if prec.bf16 else torch.float32,
        bf16=prec.bf16,
        fp8=FP8Config(prec.fp8, prec.fp8_recipe, prec.fp8_amax_history_len) if prec.fp8 else None,
        layer_spec=model.layer_spec,
        padded_vocab_size=info.padded_vocab_size,
        recompute_granularity=model.recompute_granularity,
        fused_kernels=model.fused_kernels,
        calculate_per_token_loss=True,
        **overrides,
    )


def build_optimizer(o: OptimSection, prec: PrecisionSection, p: ParallelSection, iters: int, model, row_mode: bool):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer, get_standard_config_overrides
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt_config = OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad, bf16=prec.bf16,
        params_dtype=torch.bfloat16 if prec.bf16 else torch.float32,
        use_distributed_optimizer=p.use_distributed_optimizer,
    )
    overrides = get_standard_config_overrides(opt_config)
    if row_mode:
        overrides.update(no_weight_decay_for_row_frozen())
    optimizer = get_megatron_optimizer(opt_config, model, config_overrides=overrides)
    decay = o.decay_iters or iters
    # The schedule always follows the config (megatron's override_opt_param_scheduler); a resumed run whose
    # settings differ from its checkpoint's is refused before this unless told to override (trainer).
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if o.warmup_iters else o.lr, max_lr=o.lr, min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters, lr_decay_steps=max(decay, o.warmup_iters + 1), lr_decay_style=o.decay_style,
        start_wd=o.weight_decay, end_wd=o.weight_decay, wd_incr_steps=max(iters, 1),
        wd_incr_style="constant", use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=True,
    )
    return optimizer, scheduler


def apply_optimizer_settings(optimizer, o: OptimSection) -> None:
    """Adam's betas and eps from the config on every parameter group (a loaded optimizer state carries the
    checkpoint's; LR and weight decay are set by the scheduler at every step, clipping is read from the config)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            group["betas"] = (o.adam_beta1, o.adam_beta2)
            group["eps"] = o.adam_eps


def setup_model_and_optimizer(model_sec: ModelSection, parallel: ParallelSection, precision: PrecisionSection,
                              optim: OptimSection, trainable: Sequence[str], iters: int,
                              resume_from: Optional[str] = None, **build_overrides) -> ModelAndOptimizer:
    """Build this rank's model chunks, load starting weights or resume, wrap in DDP, build the optimizer.

    Needs initialised parallel state. ``resume_from`` restores optimizer, scheduler and iteration when it holds
    a checkpoint; otherwise ``model_sec.load`` gives weights only (or ``init_from`` random weights).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    info, assets, weights_dir, resume_dir = model_source(model_sec, resume_from, parallel.tensor_model_parallel_size)
    itemic = itemic_vocab(model_sec, assets)
    build = build_config(model_sec, parallel, precision, info, **build_overrides)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = [build_qwen3_model(info.config, build, vp_stage=i if vpp else None).to(device())
              for i in range(vpp or 1)]
    summary = apply_trainable(chunks, trainable, itemic)
    if weights_dir:
        checkpointing.load_weights(weights_dir, chunks)
    counts = torch.tensor([summary.trainable_params, summary.total_params], dtype=torch.float64, device=device())
    torch.distributed.all_reduce(counts, group=parallel_state.get_model_parallel_group())
    if torch.distributed.get_rank() == 0:
        log.info("parameters: %.4gM trainable of %.4gM (trainable=%s)", counts[0] / 1e6, counts[1] / 1e6,
                 list(trainable))
    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True,
                                               overlap_grad_reduce=parallel.overlap_grad_reduce,
                                               use_distributed_optimizer=parallel.use_distributed_optimizer)
    model = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c, disable_bucketing=i > 0)
             for i, c in enumerate(chunks)]
    row_params = row_frozen_params(chunks)
    optimizer, scheduler = build_optimizer(optim, precision, parallel, iters, model, bool(row_params))
    state = ModelAndOptimizer(chunks, model, optimizer, scheduler, info, assets, itemic, row_params)
    if resume_dir:
        state.iteration, state.consumed_samples = checkpointing.resume(
            resume_dir, chunks, optimizer, scheduler, parallel.use_distributed_optimizer)
    return state


def install_grad_hooks(state: ModelAndOptimizer, parallel: ParallelSection) -> None:
    """Tell megatron's schedules how to scale, sync and finalise gradients of this model and optimizer."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.utils import get_model_config

    model = state.model
    model_config = get_model_config(model[0])
    model_config.grad_scale_func = state.optimizer.scale_loss
    model_config.finalize_model_grads_func = finalize_model_grads
    if parallel.overlap_grad_reduce:
        model_config.no_sync_func = [m.no_sync for m in model] if len(model) > 1 else model[0].no_sync
        model_config.grad_sync_func = ([m.start_grad_sync for m in model] if len(model) > 1
                                       else model[0].start_grad_sync)


# ----------------------------------------------------------------------------------------------------- data
def data_configs(data: DataSection):
    """The blend and packing settings of ``data`` (megatron_onereason.data configs)."""
    from megatron_onereason.data.blending import BlendConfig, parse_blend
    from megatron_onereason.data.packing import PackingConfig

    blend = BlendConfig(parse_blend([str(x) for x in data.blend]), data.total_tokens, data.seed)
    return blend, PackingConfig(data.seq_length, data.max_sample_length, data.overlong_policy, seed=data.seed)


def setup_training_data(data: DataSection, global_batch_size: int, consumed_samples: int, pad_id: int):
    """This rank's prefetching pack loader, positioned at ``consumed_samples``.

    Rank 0 finds the saved plan of these inputs (or plans and saves it: ``data.plan_cache``); the other ranks wait
    for it and memory-map the same files, so the blend is planned once per job, not once per rank.
    """
    from megatron.core import parallel_state

    from megatron_onereason.data.loader import TrainingPacks
    from megatron_onereason.data.packed_dataset import (
        build_packed_dataset,
        cached_plans,
        default_plan_cache,
        open_sources,
    )

    blend, packing = data_configs(data)
    found = [None]
    if torch.distributed.get_rank() == 0:
        try:
            cache = data.plan_cache or default_plan_cache(blend)
            found[0], built = cached_plans(open_sources(blend), blend, packing, cache)
            log.info("pack plan %s: %s", "built and saved" if built else "found", found[0])
        except (OSError, ValueError) as e:  # every rank stops with rank 0's reason
            found[0] = e
    torch.distributed.broadcast_object_list(found, src=0)
    if isinstance(found[0], Exception):
        raise found[0]
    dataset = build_packed_dataset(blend, packing, pad_id, plan_dir=found[0])
    return TrainingPacks(dataset, global_batch_size, parallel_state.get_data_parallel_rank(),
                         parallel_state.get_data_parallel_world_size(), consumed_samples, data.num_workers)


# ------------------------------------------------------------------------------------------- input validation
@dataclass
class ModelTokenizer:
    """The tokenizer a run's model was made with (its checkpoint's ``hf/`` files), to check inputs against."""

    where: str  # the config field naming the model, with its value
    vocab_size: int  # tokens of the model's vocabulary (before padding)
    assets: Optional[str]  # the model's tokenizer directory, when it has one
    allow_other: bool
    _fingerprint: Optional[dict] = None

    @classmethod
    def of(cls, cfg: "TrainConfig", resuming: bool) -> "ModelTokenizer":
        root, name = (cfg.checkpoint.load, "checkpoint.load") if resuming else (cfg.model.load, "model.load")
        if root:
            vocab, assets = CheckpointModelInfo.load(root).config.vocab_size, os.path.join(root, HF_ASSETS)
        else:
            name, root = "model.init_from", cfg.model.init_from
            vocab, assets = load_qwen3_config(root).vocab_size, root if os.path.isdir(root) else None
        return cls(f"{name}={root}", vocab, assets if has_tokenizer_files(assets) else None,
                   cfg.model.allow_other_tokenizer)

    @property
    def fingerprint(self) -> Optional[dict]:
        if self._fingerprint is None and self.assets is not None:
            self._fingerprint = tokenizer_fingerprint(self.assets)
        return self._fingerprint

    def check(self, field_name: str, value: str, theirs: dict, remedy: str, made_by: Optional[str] = None) -> None:
        """Refuse ``value`` (made with the tokenizer of fingerprint ``theirs``) unless it is the model's tokenizer
        or ``model.allow_other_tokenizer`` is set."""
        if self.fingerprint is not None:
            check_same_tokenizer(field_name, value, theirs, self.fingerprint, self.where, remedy,
                                 "model.allow_other_tokenizer", self.allow_other, made_by)


def check_training_inputs(cfg: "TrainConfig") -> None:
    """Check every path the config names before anything is built: one ``UserError`` naming the field.

    Rank-independent (every rank reaches the same verdict from the same files), so it runs before the process
    group exists and is reported once.
    """
    from megatron_onereason.cli import UserError
    from megatron_onereason.data.blending import parse_blend
    from megatron_onereason.data.indexed import check_prefix

    def fail(field: str, value, problem: str):
        raise UserError(f"{field}={value}: {problem}")

    c = cfg.checkpoint
    for field_name, path in (("checkpoint.save", c.save), ("checkpoint.load", c.load)):
        if path and os.path.exists(path) and not os.path.isdir(path):
            fail(field_name, path, "is a file; it names a checkpoint directory")
    if c.save:
        check_writable(c.save, "checkpoint.save=")
    resuming = checkpointing.has_checkpoint(c.load)
    if c.load and not resuming and os.path.abspath(c.load) != os.path.abspath(c.save or "") \
            and os.path.exists(c.load):
        fail("checkpoint.load", c.load, "holds no checkpoint (no latest_checkpointed_iteration.txt): nothing to "
             "resume. For starting weights use model.load; to resume a run point it at that run's checkpoint.save")
    if not resuming:
        if cfg.model.load:
            if not os.path.isdir(cfg.model.load):
                fail("model.load", cfg.model.load, "no such directory (a checkpoint written by "
                     "checkpoints_convert/hf_to_mcore.py or by an earlier stage)")
            try:
                CheckpointModelInfo.load(cfg.model.load)
                checkpointing.checkpoint_iteration_dir(cfg.model.load)
            except (FileNotFoundError, ValueError) as e:
                fail("model.load", cfg.model.load, str(e))
        elif cfg.model.init_from:
            try:
                load_qwen3_config(cfg.model.init_from)
            except (FileNotFoundError, ValueError, KeyError) as e:
                fail("model.init_from", cfg.model.init_from, str(e))
        else:
            raise UserError("nothing to train: set model.load (a converted checkpoint), model.init_from (a preset), "
                            "or checkpoint.load (a checkpoint to resume)")
    if cfg.model.itemic_vocab and not os.path.exists(os.path.join(cfg.model.itemic_vocab, ITEMIC_JSON)):
        fail("model.itemic_vocab", cfg.model.itemic_vocab, f"no {ITEMIC_JSON} there")
    tokenizer = ModelTokenizer.of(cfg, resuming)
    if cfg.model.itemic_vocab:
        tokenizer.check("model.itemic_vocab", cfg.model.itemic_vocab, tokenizer_fingerprint(cfg.model.itemic_vocab),
                        f"point model.itemic_vocab at {tokenizer.assets or 'the tokenizer the model was made with'}")
    if not cfg.data.blend:
        raise UserError("data.blend is empty: give [weight, prefix, ...] of tools/preprocess_data.py outputs")
    try:
        components = parse_blend([str(x) for x in cfg.data.blend])
    except ValueError as e:
        fail("data.blend", cfg.data.blend, str(e))
    loss_tokens = []
    for i, component in enumerate(components):
        if component.weight <= 0:
            fail(f"data.blend[{2 * i}]", component.weight, "blend weights must be > 0 (drop the source instead)")
        try:
            stats = check_prefix(component.prefix)
        except (FileNotFoundError, ValueError) as e:
            fail(f"data.blend[{2 * i + 1}]", component.prefix, str(e).split(": ", 1)[-1])
        field_name = f"data.blend[{2 * i + 1}]"
        max_id = stats.get(MAX_TOKEN_ID_KEY)
        if max_id is not None and max_id >= tokenizer.vocab_size:
            fail(field_name, component.prefix, f"holds token ids up to {max_id}, but the model ({tokenizer.where}) has "
                 f"{tokenizer.vocab_size} tokens: the data was made with another tokenizer; preprocess it again with "
                 f"--tokenizer {tokenizer.assets or 'the tokenizer of the model'}")
        if stats.get(FINGERPRINT_KEY):
            tokenizer.check(field_name, component.prefix, stats[FINGERPRINT_KEY],
                            f"preprocess it again with --tokenizer {tokenizer.assets}", made_by=stats.get("tokenizer"))
        loss_tokens.append(stats.get("loss_tokens"))
        if stats.get("loss_tokens") == 0:
            log.warning("data.blend[%d]=%s: no loss tokens (every token is loss-masked): it adds no training "
                        "signal", 2 * i + 1, component.prefix)
    if loss_tokens and all(n == 0 for n in loss_tokens):
        fail("data.blend", cfg.data.blend, "no source has any loss token (every document is fully loss-masked): "
             "nothing to learn; check the loss masks of tools/preprocess_data.py (chat data trains on assistant "
             "turns only)")
