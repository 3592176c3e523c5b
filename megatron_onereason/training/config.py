"""The trainer's typed configuration (YAML + ``section.field=value`` overrides; see ``examples/configs/``).

Defaults follow OneReason §4.4 / Table 4 and OpenOneRec §4.2: AdamW β = (0.9, 0.95), weight decay 0.1, cosine
decay with linear warm-up, 48K packed sequences with a 4K per-sample cap (32K in stage 3). Every section checks its
values when built, so a nonsense value (``train.iters=0``, ``optim.min_lr`` above ``optim.lr``) stops the run at
start-up with the field named.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple, Union

import yaml

from megatron_onereason.config import to_dict
from megatron_onereason.metrics_log import WandbLogging


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _at_least(obj, minimum, *names: str) -> None:
    """Each named field is None or >= minimum."""
    for name in names:
        value = getattr(obj, name)
        _require(value is None or value >= minimum, f"{name}={value} must be >= {minimum}")


@dataclass
class ModelSection:
    # Starting weights (weights only, like Megatron's --finetune): a checkpoint written by
    # checkpoints_convert/hf_to_mcore.py or by an earlier stage. Or, for random weights, init_from: a Qwen3
    # preset name or HF config.json. Ignored when checkpoint.load holds a checkpoint to resume.
    load: Optional[str] = None
    init_from: Optional[str] = None
    itemic_vocab: Optional[str] = None  # dir with itemic_tokens.json; default: the checkpoint's hf/ assets
    # Data and itemic vocabularies must have been made with the model's tokenizer (their recorded fingerprint is
    # compared with the checkpoint's hf/ tokenizer); true accepts another one whose ids mean the same tokens.
    allow_other_tokenizer: bool = False
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

    def __post_init__(self):
        _at_least(self, 1, "tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                  "virtual_pipeline_model_parallel_size")


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
    clip_grad: float = 1.0  # global grad-norm clipping; 0 turns it off

    def __post_init__(self):
        _require(self.lr > 0, f"lr={self.lr} must be > 0")
        _require(0 <= self.min_lr <= self.lr, f"min_lr={self.min_lr} must be between 0 and lr={self.lr} (the "
                                              "schedule decays from lr down to min_lr)")
        _at_least(self, 0, "warmup_iters", "weight_decay", "clip_grad")
        _at_least(self, 1, "decay_iters")
        for name in ("adam_beta1", "adam_beta2"):
            _require(0 <= getattr(self, name) < 1, f"{name}={getattr(self, name)} must be in [0, 1)")
        _require(self.adam_eps > 0, f"adam_eps={self.adam_eps} must be > 0")


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

    def __post_init__(self):
        _at_least(self, 2, "seq_length")
        _at_least(self, 1, "max_sample_length", "total_tokens")
        _at_least(self, 0, "seed", "num_workers")  # numpy's generators take non-negative seeds only
        _require(self.max_sample_length is None or self.max_sample_length <= self.seq_length,
                 f"max_sample_length={self.max_sample_length} is larger than seq_length={self.seq_length} (a sample "
                 "is cut to max_sample_length, then packed into seq_length-token packs)")


@dataclass
class TrainSection:
    iters: int = 10
    global_batch_size: int = 8  # packs per iteration (one pack per micro-batch)
    seed: int = 1234
    # "itemic_rows": only the new vocabulary rows of the embedding / untied output layer (stage 1);
    # "all"; or a list of regular expressions over parameter names.
    trainable: List[str] = field(default_factory=lambda: ["all"])
    # Early stops: save, then exit with code 75 ("requeue me"; see megatron_onereason.cli.EXIT_REQUEUE). SIGTERM
    # does the same at the end of the current iteration.
    exit_at_iteration: Optional[int] = None
    exit_after_minutes: Optional[float] = None  # wall-clock budget of this process (Megatron's --exit-duration-in-mins)
    # A non-finite loss or gradient: "stop" the run before the update (nothing is saved), or "skip" the update
    # (at most max_nonfinite_skips times over the run; one more stops it).
    nonfinite: Literal["stop", "skip"] = "stop"
    max_nonfinite_skips: int = 10
    # Before building anything, the memory planner (python -m megatron_onereason.plan) checks every pipeline stage
    # fits the device: "refuse" stops a layout that does not, "warn" only logs it, "off" skips the check.
    memory_check: Literal["refuse", "warn", "off"] = "refuse"

    def __post_init__(self):
        _at_least(self, 1, "iters", "global_batch_size", "exit_at_iteration")
        _at_least(self, 0, "seed")
        _at_least(self, 0, "max_nonfinite_skips")
        _require(self.exit_after_minutes is None or self.exit_after_minutes > 0,
                 f"exit_after_minutes={self.exit_after_minutes} must be > 0")
        _require(self.exit_at_iteration is None or self.exit_at_iteration <= self.iters,
                 f"exit_at_iteration={self.exit_at_iteration} is beyond iters={self.iters}: it would never stop there")
        _require(bool(self.trainable), "trainable is empty: give [all], [itemic_rows] or parameter-name patterns")


@dataclass
class CheckpointSection:
    # One run per directory: `save` holds a run id and a lock (onereason_run.json / .lock); a second training
    # saving there is refused unless it resumes that run (load = save).
    save: Optional[str] = None
    save_interval: Optional[int] = None  # also saved at the end and on an early stop
    # Resume (optimizer, scheduler, iteration, data position, RNG) from here if it holds a checkpoint; usually
    # the same directory as `save`, so a re-queued SLURM job continues where it stopped.
    load: Optional[str] = None
    keep_last_n: Optional[int] = None  # delete older iterations once a newer one is saved (None: keep all)
    # The latest checkpoint fails its checksums: refuse and name the previous good iteration (false), or resume
    # from that iteration (true; the damaged directory is kept as iter_N.damaged).
    fallback_to_previous: bool = False
    # Resuming with other optimizer / schedule / iteration settings than the checkpoint's is refused with the
    # differences listed; true uses the new values (and logs them): Megatron-LM's --override-opt_param-scheduler.
    override_changed_settings: bool = False
    # Distributed-optimizer state format: "fully_reshardable" resumes at any TP/PP/DP (gathered on DP rank 0 at
    # save); "dp_reshardable" saves in parallel but resumes only at the same TP/PP.
    distopt_format: Literal["fully_reshardable", "dp_reshardable"] = "fully_reshardable"

    def __post_init__(self):
        _at_least(self, 1, "save_interval", "keep_last_n")


@dataclass
class LoggingSection(WandbLogging):
    """Metrics sinks: JSONL, TensorBoard and W&B (``wandb_*``: Weights & Biases beside TensorBoard, the wandb extra;
    a resumed run, same ``checkpoint.save``, continues its W&B run)."""

    log_interval: int = 1
    tensorboard_dir: Optional[str] = None
    metrics_jsonl: Optional[str] = None
    peak_tflops_per_device: Optional[float] = None  # for MFU; default: 989 on H100/H200 (bf16 dense), none on CPU

    def __post_init__(self):
        super().__post_init__()
        _at_least(self, 1, "log_interval")
        _require(self.peak_tflops_per_device is None or self.peak_tflops_per_device > 0,
                 f"peak_tflops_per_device={self.peak_tflops_per_device} must be > 0")


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


# Settings that decide which packs the restored data position points at: changing one on resume reshuffles or
# re-packs the data, so the position is meaningless (with the override the data starts again from its beginning).
DATA_ORDER = ("data.blend", "data.seed", "data.seq_length", "data.max_sample_length", "data.overlong_policy",
              "data.total_tokens")
# Settings a resumed run must share with its checkpoint (or override explicitly): they define the optimizer, the
# LR/WD schedule, what an iteration is and the data order. Layout, logging, paths and data workers may change freely.
RESUME_CHECKED = ("optim.", "train.iters", "train.global_batch_size", "train.trainable") + DATA_ORDER
# Not part of what a run trains (fingerprint): where it writes, how it logs, when this process stops.
_NOT_FINGERPRINTED = ("checkpoint.", "logging.", "train.exit_at_iteration", "train.exit_after_minutes")


def flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """``{"optim": {"lr": 1}}`` → ``{"optim.lr": 1}``."""
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_differences(saved: Dict[str, Any], current: Dict[str, Any]) -> List[Tuple[str, Any, Any]]:
    """``(field, checkpoint value, current value)`` of every :data:`RESUME_CHECKED` setting that differs."""
    old, new = flatten(saved), flatten(current)
    keys = sorted(k for k in set(old) | set(new) if k.startswith(RESUME_CHECKED))
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def config_yaml(cfg: "TrainConfig") -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=120)


def config_fingerprint(cfg: "TrainConfig") -> str:
    """SHA-256 of what the run trains (model, data, optimizer, schedule, layout), not of paths or logging."""
    kept = {k: v for k, v in flatten(to_dict(cfg)).items() if not k.startswith(_NOT_FINGERPRINTED)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()
