"""Typed configuration of the RL engine (``python -m megatron_onereason.rl.run --config X.yaml [overrides]``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from megatron_onereason.training.config import ModelSection, OptimSection, ParallelSection, PrecisionSection


@dataclass
class ActorSection:
    model: ModelSection = field(default_factory=ModelSection)  # model.load: the policy's megatron checkpoint
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, min_lr=1e-6, weight_decay=0.0,
                                                                     decay_style="constant"))
    pack_length: int = 2048  # positions per tree pack (several traces with their K completions each)
    mini_batches: int = 1  # optimizer steps per rollout batch (> 1: later ones are off-policy and clip)
    # Ranks = TP × PP × DP; the rollout batch's tree packs are split over the DP ranks and the loss is normalised
    # by the token (GRPO) or trajectory (MOPD) count of the whole mini-batch on all of them.
    data_parallel_size: int = 1
    gpus_per_rank: float = 0.0  # 1.0 on GPU nodes (a fraction in the colocated layout, which shares the GPU)


Dtype = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class ScorerSection:
    """An inference engine that scores given tokens (MOPD teachers, the KL reference): one HF model per process."""

    gpus: float = 0.0  # per process; 0 = CPU
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU, float32 on CPU


@dataclass
class RolloutSection:
    model_dir: Optional[str] = None  # HF directory of the policy (tokenizer + config); weights are synced from the actor
    backend: Literal["vllm", "hf"] = "vllm"  # hf: the transformers backend (the reference oracle)
    replicas: int = 1  # rollout engines; each step's prompts are split over them
    gpus: float = 0.0  # per engine (vLLM: its tensor_parallel_size GPUs); 0 = CPU
    tensor_parallel_size: int = 1  # vLLM workers per engine
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    engine_args: Dict[str, Any] = field(default_factory=dict)  # more vllm.LLM arguments (gpu_memory_utilization, ...)
    thinking: bool = True
    num_traces: int = 4  # N reasoning traces per prompt
    num_items: int = 8  # K item completions per trace
    temperature: float = 1.0
    item_temperature: float = 1.0
    max_think_tokens: int = 256


@dataclass
class DataSection:
    benchmark: Optional[str] = None  # training users (megatron_onereason.eval.benchmark JSONL)
    eval_benchmark: Optional[str] = None  # held-out users for Recall@K
    catalog: Optional[str] = None  # itemic tokenizer directory (catalog.parquet): legal items, rewards
    domains: Optional[List[str]] = None  # single-domain RL: only these target domains
    prompts_per_step: int = 8


@dataclass
class GRPOSection:
    # rule: eq. 8 hit per completion; prefix: leading codes matched per completion (0..L); beam-*: Rollout-Beam
    # reward of a trace's K completions, shared by them (megatron_onereason.rl.rewards.two_stage_rewards)
    reward: Literal["rule", "prefix", "beam-prefix", "beam-position"] = "rule"
    diversity: bool = True  # eq. 9 diversity factor
    clip_cot: Tuple[float, float] = (0.2, 0.28)
    clip_item: Tuple[float, float] = (0.1, 0.1)
    nonhit_weight: float = 0.5  # β of eq. 13
    kl_coef: float = 0.0  # > 0 adds a reference worker (the initial policy)
    kl_estimator: Literal["k1", "k3"] = "k3"
    dynamic_sampling: bool = False  # drop users whose N×K rewards are all equal


@dataclass
class MOPDSection:
    teachers: Dict[str, str] = field(default_factory=dict)  # domain -> HF directory of its GRPO teacher
    general_teacher: Optional[str] = None  # for prompts without a domain (itemic tokens penalised)
    rho: float = 0.9  # information-gain filter, eqs. 19-20
    is_low: float = 0.5  # truncated IS band, eq. 17
    is_high: float = 2.0
    adv_clip: Optional[Tuple[float, float]] = None  # OpenOneRec's reward clipping [α, β]


@dataclass
class RayLayout:
    # None: start a local Ray cluster for this run; "auto" or host:port: join a running cluster (multi-node).
    address: Optional[str] = None
    # colocated: the inference engines share the actor's placement bundles (and, with GPUs, their devices: set
    # fractional gpus so each bundle sums to <= 1; vLLM sleeps while the actor trains); disaggregated: own bundles.
    layout: Literal["colocated", "disaggregated"] = "colocated"
    num_cpus: Optional[int] = None  # logical CPUs of a local cluster (default: enough for every worker)
    log_to_driver: bool = False  # stream every worker's stdout/stderr to the driver (start-up progress is logged anyway)
    sync_bucket_mb: int = 512  # weight-sync bucket size


@dataclass
class RLConfig:
    algorithm: Literal["grpo", "mopd", "rft"] = "grpo"
    steps: int = 10
    seed: int = 1234
    actor: ActorSection = field(default_factory=ActorSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    data: DataSection = field(default_factory=DataSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    mopd: MOPDSection = field(default_factory=MOPDSection)
    teachers: ScorerSection = field(default_factory=ScorerSection)  # placement / precision of every MOPD/RFT teacher
    reference: ScorerSection = field(default_factory=ScorerSection)  # the KL reference (grpo.kl_coef > 0)
    ray: RayLayout = field(default_factory=RayLayout)
    save: Optional[str] = None  # checkpoint root (actor state + engine state); resumed from when it has one
    save_interval: Optional[int] = None
    eval_interval: Optional[int] = None
    eval_k: int = 8
    metrics_jsonl: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    rft_output: Optional[str] = None  # algorithm=rft: where the selected chat JSONL goes

    def __post_init__(self):
        missing = [name for name, value in (("rollout.model_dir", self.rollout.model_dir),
                                            ("data.benchmark", self.data.benchmark), ("data.catalog", self.data.catalog))
                   if not value]
        if self.algorithm != "rft" and not self.actor.model.load:
            missing.append("actor.model.load")
        if missing:
            raise ValueError(f"required settings missing: {', '.join(missing)}")
        for name, value in (("actor.data_parallel_size", self.actor.data_parallel_size),
                            ("rollout.replicas", self.rollout.replicas),
                            ("rollout.tensor_parallel_size", self.rollout.tensor_parallel_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.rollout.backend == "hf" and self.rollout.tensor_parallel_size != 1:
            raise ValueError("rollout.tensor_parallel_size > 1 needs rollout.backend=vllm (the HF backend is one "
                             "process)")
        if self.mopd.general_teacher and self.mopd.adv_clip is None:
            raise ValueError("mopd.general_teacher needs mopd.adv_clip (the itemic penalty sets teacher log-probs "
                             "to -1e9; OpenOneRec clips the advantage to [alpha, beta])")
