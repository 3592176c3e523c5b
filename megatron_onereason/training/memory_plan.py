"""Per-rank memory and per-step FLOPs of a training layout, before anything is allocated.

Pure functions of the architecture (:class:`~megatron_onereason.model.qwen3_config.Qwen3Config` and the padded
vocabulary), the layout (:class:`Layout`: TP, PP, virtual stages, DP, sequence parallel, distributed optimizer) and
the step (:class:`StepShape`: pack length, micro-batches, precision, recompute, trainable parameters). One row per
pipeline stage, in bytes:

* **weights**: this rank's parameters (enumerated layer by layer with megatron-core's names, :func:`rank_parameters`)
  in the parameter dtype.
* **grads**: megatron DDP's fp32 ``main_grad`` buffer of the trainable parameters (``grad_reduce_in_fp32``).
* **optimizer**: Adam's two fp32 moments, plus an fp32 master copy when the parameters are bf16; divided over DP
  with the distributed optimizer. Buffer padding for the distributed optimizer (< 64 elements per parameter plus
  ``lcm(DP, 128)`` per bucket) is not counted.
* **activations**: what the forward pass keeps for the backward, per micro-batch (:func:`layer_activation_bytes`,
  counted tensor by tensor for the kernels that run; flash-style attention: no ``S²`` term), times the micro-batches
  in flight on this stage (1F1B warm-up, interleaved when virtual stages are set).
* **transient**: the larger of two moments that do not overlap — the backward's working set (one layer recomputed
  with full recompute, and the gradients of its largest intermediates) and, on the last stage, the logits
  ``[S, V/TP]`` with the cross-entropy's copies (an fp32 copy that becomes the softmax and then the gradient for
  megatron's own cross-entropy; in place for TE's fused one), one micro-batch at a time.
* **runtime**: CUDA context, NCCL and cuBLAS workspaces (an assumption, ``runtime_gib``).

Validated on CPU against real models (``tests/training/test_memory_plan.py``): weights, grads and non-distributed
optimizer states are exact; stored activations are within the margin stated there, and the peak of a
forward-backward within its margin. FLOPs come from
:mod:`megatron_onereason.training.flops` (model FLOPs for MFU; full recompute adds one forward to what the hardware
does).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from megatron_onereason.cli import UserError
from megatron_onereason.model.qwen3_config import Qwen3Config
from megatron_onereason.training.flops import forward_flops, training_flops

GIB = 2**30
VOCAB_MATRICES = ("embedding.word_embeddings.weight", "output_layer.weight")


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual stages (model chunks) per pipeline rank
    dp: int = 1
    cp: int = 1
    sequence_parallel: bool = False
    distributed_optimizer: bool = False

    def __post_init__(self):
        for name in ("tp", "pp", "dp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.cp * self.dp


@dataclass(frozen=True)
class StepShape:
    seq_length: int  # tokens per pack (one pack per micro-batch)
    micro_batches: int  # per DP rank and step (global batch / DP)
    bf16: bool = True
    recompute: Optional[str] = None  # None | "full" | "selective"
    trainable: Tuple[str, ...] = ("all",)  # as train.trainable: "all", "itemic_rows" or name regexes

    @property
    def bytes_per_value(self) -> int:
        return 2 if self.bf16 else 4


@dataclass
class StageMemory:
    """One pipeline rank's memory, in bytes."""

    pp_rank: int
    layers: int
    params: int  # elements on this rank
    trainable_params: int
    weights: int
    grads: int
    optimizer: int
    activations: int  # kept for the backward by the micro-batches in flight
    working: int  # the backward's working set
    logits: int  # the last stage's logits and cross-entropy (forward or backward of one micro-batch)
    runtime: int
    in_flight: int  # micro-batches (chunk forwards with virtual stages) holding activations at the peak

    @property
    def states(self) -> int:
        return self.weights + self.grads + self.optimizer

    @property
    def transient(self) -> int:
        return max(self.working, self.logits)

    @property
    def total(self) -> int:
        return self.states + self.activations + self.transient + self.runtime


# --------------------------------------------------------------------------------------------------- parameters
def layer_parameters(cfg: Qwen3Config, tp: int) -> List[Tuple[str, int]]:
    """One decoder layer's parameters on one TP rank (megatron-core local-spec names; TE fuses the two input norms
    into ``linear_qkv`` / ``linear_fc1`` as ``layer_norm_weight``, same sizes)."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_query_groups
    return [
        ("input_layernorm.weight", h),
        ("self_attention.linear_qkv.weight", (nq + 2 * nkv) * d // tp * h),
        ("self_attention.q_layernorm.weight", d),
        ("self_attention.k_layernorm.weight", d),
        ("self_attention.linear_proj.weight", h * (nq * d // tp)),
        ("pre_mlp_layernorm.weight", h),
        ("mlp.linear_fc1.weight", 2 * f // tp * h),
        ("mlp.linear_fc2.weight", h * (f // tp)),
    ]


def rank_parameters(cfg: Qwen3Config, vocab_rows: int, layout: Layout, pp_rank: int) -> List[Tuple[str, int]]:
    """(name, elements) of every parameter one rank of pipeline stage ``pp_rank`` holds, over its model chunks.

    Layers are split evenly over ``PP × virtual`` chunks; chunk ``c`` of rank ``r`` holds layers of global chunk
    ``c·PP + r``. The first chunk of rank 0 has the embedding, the last chunk of the last rank the final norm and
    the output layer (a separate copy of a tied embedding when PP > 1, as megatron keeps it).
    """
    chunks = layout.vpp or 1
    per_chunk = cfg.num_layers // (layout.pp * chunks)
    out: List[Tuple[str, int]] = []
    layer = layer_parameters(cfg, layout.tp)
    for c in range(chunks):
        prefix = f"chunk{c}." if chunks > 1 else ""
        first = c == 0 and pp_rank == 0
        last = c == chunks - 1 and pp_rank == layout.pp - 1
        if first:
            out.append((prefix + "embedding.word_embeddings.weight", vocab_rows // layout.tp * cfg.hidden_size))
        for i in range(per_chunk):
            out += [(f"{prefix}decoder.layers.{i}.{name}", n) for name, n in layer]
        if last:
            out.append((prefix + "decoder.final_layernorm.weight", cfg.hidden_size))
            if not cfg.tie_word_embeddings or layout.pp > 1:
                out.append((prefix + "output_layer.weight", vocab_rows // layout.tp * cfg.hidden_size))
    return out


def trainable_parameters(params: Sequence[Tuple[str, int]], trainable: Sequence[str]) -> List[Tuple[str, int]]:
    """The parameters with gradients and optimizer states under ``train.trainable`` (training/freezing.py's rules:
    ``itemic_rows`` keeps whole vocabulary matrices trainable and masks rows, so they count whole)."""
    trainable = list(trainable)
    if trainable == ["itemic_rows"]:
        return [(name, n) for name, n in params if name.endswith(VOCAB_MATRICES)]
    patterns = [re.compile(p) for p in trainable if p != "all"]
    if not patterns:
        return list(params)
    return [(name, n) for name, n in params if any(p.search(name) for p in patterns)]


def state_bytes(params: Sequence[Tuple[str, int]], trainable: Sequence[Tuple[str, int]], layout: Layout, bf16: bool,
                fp32_norms: bool = False) -> Tuple[int, int, int]:
    """(weights, grads, optimizer) bytes of one rank.

    ``fp32_norms``: the local spec's torch RMSNorm keeps its weights in fp32 in a bf16 model (TE's follow the
    parameter dtype); fp32 weights need no fp32 master copy.
    """
    def split(items):
        norms = sum(n for name, n in items if "layernorm" in name) if bf16 and fp32_norms else 0
        return sum(n for _, n in items) - norms, norms

    low, fp32 = split(params)
    low_trained, fp32_trained = split(trainable)
    weights = low * (2 if bf16 else 4) + fp32 * 4
    grads = (low_trained + fp32_trained) * 4
    moments, master = 8 * (low_trained + fp32_trained), (4 * low_trained if bf16 else 0)
    if layout.distributed_optimizer:  # each DP rank keeps its shard of the (flat) buffer
        moments, master = (math.ceil(x / layout.dp) for x in (moments, master))
    return weights, grads, moments + master


# --------------------------------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class PlannedKernels:
    """Which kernels run, as far as what they keep for the backward differs (see :func:`kernels_of`)."""

    te_norm: bool = True  # TE's RMSNorm (fused into linear_qkv / linear_fc1) keeps its input and rstd; torch's also
    #                       its normalised input
    fused_rope: bool = True  # TE's fused RoPE keeps nothing; megatron's unfused one keeps cos and sin for q and k
    fused_swiglu: bool = True  # megatron's bias_swiglu keeps fc1's output; the unfused GLU also silu's output and
    #                            a copy of the linear half
    te_cross_entropy: bool = True  # TE's in-place cross-entropy; megatron's keeps an fp32 softmax

    @classmethod
    def named(cls, name: str) -> "PlannedKernels":
        """``te`` (NGC container: TE + apex), ``plain`` (CUDA PyTorch + Triton, no TE), ``cpu`` (nothing fused)."""
        kinds = {"te": cls(), "plain": cls(False, False, True, False), "cpu": cls(False, False, False, False)}
        if name not in kinds:
            raise ValueError(f"kernels must be one of {sorted(kinds)}, got {name!r}")
        return kinds[name]


def kernels_of(layer_spec: str, fusions: dict) -> PlannedKernels:
    """The planned kernels of a model built with ``layer_spec`` ("te" | "local") and these ``TransformerConfig``
    fusion flags (:func:`megatron_onereason.model.builder.fused_kernel_flags`)."""
    return PlannedKernels(
        te_norm=layer_spec == "te",
        fused_rope=bool(fusions.get("apply_rope_fusion")),
        fused_swiglu=bool(fusions.get("bias_activation_fusion")),
        te_cross_entropy=bool(fusions.get("cross_entropy_loss_fusion"))
        and fusions.get("cross_entropy_fusion_impl") == "te",
    )


def _norm_bytes(kernels: PlannedKernels, value_bytes: int) -> int:
    """Bytes per value of what an RMSNorm keeps: torch's RMSNorm of the local spec has fp32 weights in a bf16
    model, so it computes — and keeps its input and normalised input — in fp32."""
    return 4 if not kernels.te_norm and value_bytes == 2 else value_bytes


def norm_and_linear_bytes(hidden: int, shards: int, kernels: PlannedKernels, value_bytes: int) -> float:
    """Per token: an RMSNorm over ``hidden`` values followed by a linear layer, sequence-sharded ``shards`` ways —
    the norm's input (+ its normalised input with torch's norm), its fp32 ``rstd``, and the linear layer's input."""
    values = (1 if kernels.te_norm else 2) * hidden * _norm_bytes(kernels, value_bytes) + hidden * value_bytes
    return (values + 4) / shards


def layer_activation_bytes(cfg: Qwen3Config, layout: Layout, recompute: Optional[str], kernels: PlannedKernels,
                           value_bytes: int) -> float:
    """Bytes one decoder layer keeps for its backward, per token of the pack (``value_bytes``: 2 for bf16).

    Counted tensor by tensor (``[·]`` = values per token; ``/sp``: sharded by sequence parallelism, ``/t``: by
    tensor parallelism over heads or columns):

    * each of the two norms and the linear layer after it (:func:`norm_and_linear_bytes`) over ``[h/sp]`` (the
      linear layers re-gather their input over TP in the backward);
    * the fused QKV output ``[(nq+2·nkv)·d/t]``, kept whole because k (the k norm's input) and v (attention's) are
      views of it; the q norm's input ``[nq·d/t]`` (a copy; torch's fp32 norm also keeps an fp32 copy of k), the
      normalised q and k with torch's norm, ``rstd`` per head (fp32);
    * unfused RoPE: cos and sin for q and k ``[4·d]``;
    * core attention (flash / FlexAttention / per-document SDPA): contiguous q and k ``[(nq+nkv)·d/t]``, the
      output ``[nq·d/t]`` and the fp32 log-sum-exp per head (dropped with selective recompute); linear_proj's
      input ``[nq·d/t]``;
    * MLP: fc1's output ``[2f/t]`` (SwiGLU's input), fc2's input ``[f/t]`` (+ silu's output and the linear half
      ``[2f/t]`` when unfused).

    With full recompute a layer keeps only its input ``[h/sp]``.
    """
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nq, nkv = cfg.num_attention_heads, cfg.num_query_groups
    t, sp, v = layout.tp, (layout.tp if layout.sequence_parallel else 1), value_bytes
    if recompute == "full":
        return h / sp * v
    total = 2 * norm_and_linear_bytes(h, sp, kernels, v)
    norm_v = _norm_bytes(kernels, v)
    total += (nq + 2 * nkv) * d / t * v  # the fused QKV output, kept whole by its views k and v
    total += (nq + (nkv if norm_v != v else 0)) * d / t * norm_v  # q norm's input (a copy); k's when upcast
    if not kernels.te_norm:
        total += (nq + nkv) * d / t * norm_v  # normalised q, k
    total += (nq + nkv) / t * 4  # rstd per head
    if not kernels.fused_rope:
        total += 4 * d * v
    total += ((nq + nkv) * d / t + 2 * nq * d / t) * v  # attention's q, k (v: the view); output; linear_proj input
    if recompute != "selective":
        total += nq / t * 4
    total += (3 * f / t + (0 if kernels.fused_swiglu else 2 * f / t)) * v
    return total


def in_flight_microbatches(layout: Layout, pp_rank: int, micro_batches: int) -> int:
    """Chunk forwards whose activations are alive at the peak of megatron's schedule on ``pp_rank``.

    1F1B: the warm-up forwards ``PP − rank − 1`` plus the one in steady state; interleaved: warm-up
    ``2·(PP − rank − 1) + (V − 1)·PP`` chunk forwards plus one (megatron's ``get_pp_rank_microbatches``).
    """
    if layout.pp == 1:
        return 1
    chunks = layout.vpp or 1
    total = micro_batches * chunks
    if chunks == 1:
        warmup = layout.pp - pp_rank - 1
    else:
        warmup = 2 * (layout.pp - pp_rank - 1) + (chunks - 1) * layout.pp
    return min(warmup, total) + (1 if warmup < total else 0)


def stored_activation_bytes(cfg: Qwen3Config, layout: Layout, step: StepShape, kernels: PlannedKernels,
                            pp_rank: int, in_flight: int = 1) -> int:
    """What ``in_flight`` micro-batches keep for the backward on ``pp_rank``: the layers, the first stage's token
    ids, the last stage's final norm and output-layer input (the logits are :func:`logits_bytes`)."""
    chunks = layout.vpp or 1
    layers = cfg.num_layers // (layout.pp * chunks)
    tokens = step.seq_length / layout.cp
    sp = layout.tp if layout.sequence_parallel else 1
    v = step.bytes_per_value
    per_micro_batch = layer_activation_bytes(cfg, layout, step.recompute, kernels, v) * layers * tokens
    if step.recompute == "full":
        per_micro_batch += tokens * cfg.head_dim * 4  # the RoPE angles, passed to (and kept by) each checkpoint
    if pp_rank == 0:
        per_micro_batch += tokens * 8  # token ids (int64) for the embedding's backward
    stored = per_micro_batch * in_flight
    if pp_rank == layout.pp - 1:  # one micro-batch at a time reaches the loss: final norm, output layer, labels
        stored += tokens * (norm_and_linear_bytes(cfg.hidden_size, sp, kernels, v) + 9)
    return int(stored)


def working_bytes(cfg: Qwen3Config, layout: Layout, step: StepShape, kernels: PlannedKernels) -> int:
    """The backward's working set on any stage: the layer being differentiated (recomputed, with full recompute)
    and the gradients of its largest intermediates (fc1's output and the residual stream)."""
    tokens = step.seq_length / layout.cp
    sp = layout.tp if layout.sequence_parallel else 1
    v = step.bytes_per_value
    grads = (2 * cfg.ffn_hidden_size / layout.tp + 2 * cfg.hidden_size / sp) * tokens * v
    recomputed = layer_activation_bytes(cfg, layout, None, kernels, v) * tokens if step.recompute == "full" else 0
    return int(grads + recomputed)


def logits_bytes(vocab_rows: int, layout: Layout, step: StepShape, kernels: PlannedKernels,
                 stored: bool = False) -> int:
    """Peak bytes of the last stage's logits and cross-entropy for one micro-batch (``stored``: only what the
    cross-entropy keeps for the backward).

    ``[S, V/TP]`` logits in the activation dtype; megatron's vocab-parallel cross-entropy (unfused or its jit
    "native" fusion) turns an fp32 copy of them into the saved softmax (and then the fp32 gradient), alive beside
    the 16-bit logits at the peak (with fp32 logits it works in place); TE's fused cross-entropy keeps the gradient
    in the logits' place.
    """
    elements = step.seq_length / layout.cp * vocab_rows / layout.tp
    if kernels.te_cross_entropy:
        return int(elements * step.bytes_per_value)
    return int(elements * (4 + (step.bytes_per_value if step.bf16 and not stored else 0)))


def plan_memory(cfg: Qwen3Config, vocab_rows: int, layout: Layout, step: StepShape,
                kernels: PlannedKernels = PlannedKernels(), runtime_gib: float = 0.0) -> List[StageMemory]:
    """One :class:`StageMemory` per pipeline rank."""
    stages = layout.pp * (layout.vpp or 1)
    if cfg.num_layers % stages:
        raise ValueError(f"num_layers={cfg.num_layers} does not split over PP={layout.pp} × virtual "
                         f"{layout.vpp or 1} stages")
    out = []
    for r in range(layout.pp):
        params = rank_parameters(cfg, vocab_rows, layout, r)
        trainable = trainable_parameters(params, step.trainable)
        weights, grads, optimizer = state_bytes(params, trainable, layout, step.bf16, not kernels.te_norm)
        in_flight = in_flight_microbatches(layout, r, step.micro_batches)
        activations = stored_activation_bytes(cfg, layout, step, kernels, r, in_flight)
        logits = logits_bytes(vocab_rows, layout, step, kernels) if r == layout.pp - 1 else 0
        out.append(StageMemory(r, cfg.num_layers // layout.pp, sum(n for _, n in params),
                               sum(n for _, n in trainable), weights, grads, optimizer,
                               activations, working_bytes(cfg, layout, step, kernels), logits,
                               int(runtime_gib * GIB), in_flight))
    return out


# --------------------------------------------------------------------------------------------------- FLOPs
@dataclass
class StepFlops:
    model: float  # model FLOPs of one step over all ranks (MFU's numerator)
    hardware: float  # including recomputation
    tokens: int  # tokens per step


def pack_documents(seq_length: int, doc_length: int) -> List[int]:
    """A pack filled with documents of ``doc_length`` tokens (the last one shorter)."""
    full, rest = divmod(seq_length, doc_length)
    return [doc_length] * full + ([rest] if rest else [])


def step_flops(cfg: Qwen3Config, vocab_rows: int, step: StepShape, global_batch: int, doc_length: int) -> StepFlops:
    docs = pack_documents(step.seq_length, doc_length)
    model = training_flops(cfg, docs, vocab_rows) * global_batch
    extra = forward_flops(cfg, docs, vocab_rows) * global_batch if step.recompute == "full" else 0.0
    return StepFlops(model, model + extra, step.seq_length * global_batch)


# --------------------------------------------------------------------------------------------------- report
@dataclass
class Plan:
    stages: List[StageMemory]
    flops: StepFlops
    capacity: Optional[int] = None  # bytes per device
    notes: List[str] = field(default_factory=list)

    @property
    def peak(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    def fits(self) -> bool:
        return self.capacity is None or self.peak.total <= self.capacity

    def table(self) -> str:
        def gib(x):
            return f"{x / GIB:.2f}"

        rows = ["| PP rank | layers | params (M) | weights | grads | optimizer | activations (in flight) "
                "| backward working set | logits + CE | runtime | total GiB |" + (" of device |" if self.capacity else ""),
                "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if self.capacity else "")]
        for s in self.stages:
            share = f" {100 * s.total / self.capacity:.0f}% |" if self.capacity else ""
            rows.append(f"| {s.pp_rank} | {s.layers} | {s.params / 1e6:.1f} | {gib(s.weights)} | {gib(s.grads)} | "
                        f"{gib(s.optimizer)} | {gib(s.activations)} ({s.in_flight}) | {gib(s.working)} | "
                        f"{gib(s.logits)} | {gib(s.runtime)} | **{gib(s.total)}** |{share}")
        rows.append("(total = weights + grads + optimizer + activations + the larger of the working set and the "
                    "logits, which do not overlap + runtime)")
        return "\n".join(rows)


# --------------------------------------------------------------------------------------------------- from a config
class MemoryPlanError(UserError):
    """The planner says the layout does not fit the device (every rank reaches it: reported once, by rank 0)."""


def plan_training(cfg, model: Qwen3Config, vocab_rows: int, world_size: int, kernels: PlannedKernels,
                  capacity: Optional[int] = None, runtime_gib: float = 0.0,
                  doc_length: Optional[int] = None) -> Plan:
    """The :class:`Plan` of a :class:`~megatron_onereason.training.config.TrainConfig` on ``world_size`` ranks.

    FLOPs assume packs full of documents of ``doc_length`` tokens (default: the sample cap, the most attention).
    """
    p = cfg.parallel
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ValueError(f"world size {world_size} is not divisible by TP×PP×CP = {model_parallel}")
    layout = Layout(p.tensor_model_parallel_size, p.pipeline_model_parallel_size,
                    p.virtual_pipeline_model_parallel_size, world_size // model_parallel, p.context_parallel_size,
                    p.sequence_parallel and p.tensor_model_parallel_size > 1, p.use_distributed_optimizer)
    if cfg.train.global_batch_size % layout.dp:
        raise ValueError(f"train.global_batch_size={cfg.train.global_batch_size} is not divisible by DP={layout.dp}")
    step = StepShape(cfg.data.seq_length, cfg.train.global_batch_size // layout.dp, cfg.precision.bf16,
                     cfg.model.recompute_granularity, tuple(cfg.train.trainable))
    stages = plan_memory(model, vocab_rows, layout, step, kernels, runtime_gib)
    doc = doc_length or cfg.data.max_sample_length or cfg.data.seq_length
    notes = [f"TP={layout.tp} PP={layout.pp}{f' (×{layout.vpp} virtual)' if layout.vpp else ''} CP={layout.cp} "
             f"DP={layout.dp} on {world_size} ranks; sequence parallel {'on' if layout.sequence_parallel else 'off'}, "
             f"distributed optimizer {'on' if layout.distributed_optimizer else 'off'}; "
             f"{step.micro_batches} packs of {step.seq_length} tokens per rank and step; "
             f"{'bf16' if step.bf16 else 'fp32'}, recompute {step.recompute or 'none'}, "
             f"trainable {list(step.trainable)}; kernels {kernels}"]
    return Plan(stages, step_flops(model, vocab_rows, step, cfg.train.global_batch_size, doc), capacity, notes)


def device_capacity() -> Tuple[int, float, str]:
    """(bytes a rank may use, runtime GiB to reserve, what was measured).

    CUDA: the device's total memory, with 3 GiB reserved for the CUDA context, NCCL and cuBLAS workspaces. CPU: the
    host's total memory divided by the ranks on this node (``LOCAL_WORLD_SIZE``, ``SLURM_NTASKS_PER_NODE``), nothing
    reserved — CPU runs are tests and demos, and the check then only stops layouts that cannot run at all.
    """
    import os

    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return props.total_memory, 3.0, f"{props.name}, {props.total_memory / GIB:.1f} GiB"
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    total = psutil.virtual_memory().total
    return total // max(local, 1), 0.0, f"host memory {total / GIB:.1f} GiB / {local} local ranks"


def check_training_memory(cfg, model: Qwen3Config, vocab_rows: int, world_size: int, layer_spec: str,
                          fusions: dict) -> Plan:
    """Plan this run on this machine; refuse it (``train.memory_check: refuse``) when a stage does not fit."""
    capacity, runtime, where = device_capacity()
    plan = plan_training(cfg, model, vocab_rows, world_size, kernels_of(layer_spec, fusions), capacity, runtime)
    if not plan.fits():
        peak = plan.peak
        message = (f"memory plan: pipeline rank {peak.pp_rank} needs {peak.total / GIB:.1f} GiB per device, "
                   f"{where} (weights {peak.weights / GIB:.1f}, grads {peak.grads / GIB:.1f}, optimizer "
                   f"{peak.optimizer / GIB:.1f}, activations {peak.activations / GIB:.1f}, transient "
                   f"{peak.transient / GIB:.1f}); use more TP/PP, the distributed optimizer or recompute, shorter packs, "
                   f"or set train.memory_check=warn to start anyway")
        if cfg.train.memory_check == "refuse":
            raise MemoryPlanError(message + "\n" + plan.table())
        plan.notes.append("WARNING: " + message)
    return plan


def check_run_fits(cfg, world_size: int, rank: int) -> Optional[Plan]:
    """The trainer's start-up check (before any model is built): the model comes from the config's starting
    checkpoint, the kernels from what this machine has; rank 0 logs the table."""
    import logging

    from megatron_onereason.model.builder import detect_kernel_support, fused_kernel_flags
    from megatron_onereason.training.setup import build_config, model_source

    if cfg.train.memory_check == "off":
        return None
    info = model_source(cfg.model, cfg.checkpoint.load, cfg.parallel.tensor_model_parallel_size)[0]
    build = build_config(cfg.model, cfg.parallel, cfg.precision, info)
    fusions = fused_kernel_flags(detect_kernel_support(), build.fused_kernels)
    plan = check_training_memory(cfg, info.config, info.padded_vocab_size, world_size, build.resolved_layer_spec(),
                                 fusions)
    if rank == 0:
        log = logging.getLogger("megatron_onereason.train")
        log.info("memory plan per device (GiB):\n%s\n%s", plan.table(), "\n".join(plan.notes))
    return plan
