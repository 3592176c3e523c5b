"""The trainer's typed configuration (YAML + ``section.field=value`` overrides; see ``examples/configs/``).

Defaults follow OneReason §4.4 / Table 4 and OpenOneRec §4.2: AdamW β = (0.9, 0.95), weight decay 0.1, cosine
decay with linear warm-up, 48K packed sequences with a 4K per-sample cap (32K in stage 3).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal, Optional, Union


@dataclass
class ModelSection:
    # Starting weights (weights only, like Megatron's --finetune): a checkpoint written by
    # checkpoints_convert/hf_to_mcore.py or by an earlier stage. Or, for random weights, init_from: a Qwen3
    # preset name or HF config.json. Ignored when checkpoint.load holds a checkpoint to resume.
    load: Optional[str] = None
    init_from: Optional[str] = None
    itemic_vocab: Optional[str] = None  # dir with itemic_tokens.json; default: the checkpoint's hf/ assets
    layer_spec: Literal["auto", "te", "local"] = "auto"
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    # Every fused kernel the machine has (model/builder.py: fused_kernel_flags); false: unfused torch ops.
    fused_kernels: bool = True


@dataclass
class ParallelSection:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    context_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    overlap_grad_reduce: bool = False


@dataclass
class PrecisionSection:
    bf16: bool = False
    fp8: Optional[Literal["e4m3", "hybrid"]] = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    fp8_amax_history_len: int = 1024


@dataclass
class OptimSection:
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_iters: int = 0
    decay_iters: Optional[int] = None  # default: train.iters
    decay_style: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class DataSection:
    # Megatron-style blend: [weight, prefix, weight, prefix, ...] of tools/preprocess_data.py outputs.
    blend: List[Union[float, str]] = field(default_factory=list)
    seq_length: int = 49152
    max_sample_length: Optional[int] = 4096
    overlong_policy: Literal["split", "truncate", "drop"] = "split"
    total_tokens: Optional[int] = None  # tokens drawn by the blend; default: all of the smallest-ratio source
    seed: int = 1234
    # Where the blend + pack plan is saved once and memory-mapped by every rank (keyed by the inputs' lengths and
    # these settings; tools/plan_packs.py builds it ahead of a job); default: pack_plans/ beside the first prefix.
    plan_cache: Optional[str] = None
    num_workers: int = 2  # background processes per rank assembling packs ahead of the step (0: in the step)


@dataclass
class TrainSection:
    iters: int = 10
    global_batch_size: int = 8  # packs per iteration (one pack per micro-batch)
    seed: int = 1234
    # "itemic_rows": only the new vocabulary rows of the embedding / untied output layer (stage 1);
    # "all"; or a list of regular expressions over parameter names.
    trainable: List[str] = field(default_factory=lambda: ["all"])
    exit_at_iteration: Optional[int] = None  # save and stop there (what SIGTERM does at the next iteration)
    # Before building anything, the memory planner (python -m megatron_onereason.plan) checks every pipeline stage
    # fits the device: "refuse" stops a layout that does not, "warn" only logs it, "off" skips the check.
    memory_check: Literal["refuse", "warn", "off"] = "refuse"


@dataclass
class CheckpointSection:
    save: Optional[str] = None
    save_interval: Optional[int] = None  # also saved at the end and on SIGTERM
    # Resume (optimizer, scheduler, iteration, data position, RNG) from here if it holds a checkpoint; usually
    # the same directory as `save`, so a re-queued SLURM job continues where it stopped.
    load: Optional[str] = None


@dataclass
class LoggingSection:
    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None
    peak_tflops_per_device: Optional[float] = None  # for MFU; default: 989 on H100/H200 (bf16 dense), none on CPU


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    optim: OptimSection = field(default_factory=OptimSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
