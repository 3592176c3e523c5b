"""Build Qwen3 as a megatron-core ``GPTModel``.

Qwen3 = RMSNorm pre-norm decoder, SwiGLU MLP, GQA attention with RMSNorm on queries and keys (qk-layernorm),
RoPE (θ = 1e6), no biases, embeddings tied below 8B. The Transformer Engine layer spec is used when TE and CUDA
are present (fused kernels, FP8); megatron-core's local spec otherwise. Both take the packed attention of
:mod:`megatron_onereason.model.packed_attention` as core attention, so packed documents never see each other and RL
tree packs keep their structure, without an ``S × S`` mask.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Any, Dict, Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

from megatron_onereason.cli import UserError
from megatron_onereason.model.packed_attention import (
    PackedAttentionParams,
    PackedDotProductAttention,
    te_packed_attention_class,
)
from megatron_onereason.model.qwen3_config import Qwen3Config, padded_vocab_size


def transformer_engine_available() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except Exception:  # ImportError, or a TE build that fails to load its CUDA libraries
        return False
    return torch.cuda.is_available()


@dataclass(frozen=True)
class FP8Config:
    """FP8 training settings passed to megatron-core's ``TransformerConfig`` (TE spec only).

    Embedding and output layer stay in BF16 (megatron-core's default for FP8 runs).
    """

    format: Literal["e4m3", "hybrid"] = "hybrid"
    recipe: Literal["delayed", "tensorwise", "blockwise", "mxfp8"] = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: int = 0


@dataclass(frozen=True)
class ModelBuildConfig:
    """How to build (not what to build): parallelism, precision, kernels."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    context_parallel_size: int = 1
    params_dtype: torch.dtype = torch.float32
    bf16: bool = False
    fp8: Optional[FP8Config] = None
    layer_spec: Literal["auto", "te", "local"] = "auto"
    # None: ceil(vocab / (128 × TP)) × 128 × TP. A checkpoint records the padded size it was written with.
    padded_vocab_size: Optional[int] = None
    recompute_granularity: Optional[Literal["full", "selective"]] = None
    init_method_std: float = 0.02
    # Training: the loss is a sum over tokens and megatron divides gradients by the global token count.
    calculate_per_token_loss: bool = False
    # Every fused kernel megatron-core offers for this architecture that the machine can run (see
    # fused_kernel_flags); False: megatron's unfused torch ops everywhere (to bisect a numerical difference).
    fused_kernels: bool = True

    def resolved_layer_spec(self) -> str:
        if self.layer_spec == "auto":
            return "te" if transformer_engine_available() else "local"
        if self.layer_spec == "te" and not transformer_engine_available():
            raise RuntimeError("layer_spec='te' needs Transformer Engine and CUDA; use layer_spec='local'")
        return self.layer_spec

    def vocab_rows(self, cfg: Qwen3Config) -> int:
        """The embedding's rows: the checkpoint's padded vocabulary, which TP must divide (:class:`UserError`)."""
        tp = self.tensor_model_parallel_size
        padded = self.padded_vocab_size or padded_vocab_size(cfg.vocab_size, tp)
        if padded < cfg.vocab_size:
            raise UserError(f"the checkpoint's padded vocabulary ({padded} rows) is smaller than its vocabulary "
                            f"({cfg.vocab_size}): the checkpoint is damaged; convert it again")
        if padded % tp:
            raise UserError(
                f"the checkpoint's padded vocabulary ({padded} rows) is not divisible by TP={tp}: re-convert the HF "
                f"checkpoint with --tp {tp} (checkpoints_convert/hf_to_mcore.py --hf-dir HF --out-dir OUT --tp {tp}),"
                f" or use a TP that divides {padded} ({_divisors(padded, limit=tp * 4)})")
        return padded


def _divisors(n: int, limit: int) -> str:
    return ", ".join(str(d) for d in range(1, min(n, limit) + 1) if n % d == 0)


def check_parallel_layout(cfg: Qwen3Config, build: ModelBuildConfig) -> None:
    """Refuse a TP/PP the architecture (and the padded vocabulary) cannot be split by: a :class:`UserError` (every
    rank reaches it: reported once) naming the numbers and the sizes that would work. The trainer (at model build)
    and ``python -m megatron_onereason.plan`` both run it."""
    tp, pp = build.tensor_model_parallel_size, build.pipeline_model_parallel_size
    sizes = {"num_attention_heads": cfg.num_attention_heads, "num_query_groups": cfg.num_query_groups,
             "ffn_hidden_size": cfg.ffn_hidden_size}
    for what, n in sizes.items():
        if n % tp:
            common = [d for d in range(1, cfg.num_query_groups + 1) if all(v % d == 0 for v in sizes.values())]
            raise UserError(f"TP={tp} does not divide {what}={n}: use a TP among {', '.join(map(str, common))}")
    virtual = build.virtual_pipeline_model_parallel_size or 1
    if cfg.num_layers % (pp * virtual):
        stages = f"PP={pp}" + (f" × {virtual} virtual stages" if virtual > 1 else "")
        raise UserError(f"{stages} does not divide num_layers={cfg.num_layers}: use a PP (× virtual stages) among "
                        f"{_divisors(cfg.num_layers, cfg.num_layers)}")
    build.vocab_rows(cfg)


@dataclass(frozen=True)
class KernelSupport:
    """What this machine can run: the inputs of :func:`fused_kernel_flags` (probed by :func:`detect_kernel_support`)."""

    cuda: bool
    triton: bool  # megatron's jit_fuser is torch.compile (torch >= 2.2), which generates Triton kernels on CUDA
    apex_wgrad: bool  # apex's fused_weight_gradient_mlp_cuda: megatron's own linear layers (the output layer) need it
    apex_softmax: bool  # apex's scaled_*masked_softmax_cuda: the local spec's fused softmax
    te_rope: bool  # Transformer Engine's fused RoPE for thd packs
    te_cross_entropy: bool  # Transformer Engine's parallel cross-entropy (no fp32 copy of the logits)


def detect_kernel_support() -> KernelSupport:
    """Probe the kernels megatron-core would import, the way megatron-core itself imports them."""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.language_module import language_module
    from megatron.core.tensor_parallel import layers

    cuda = torch.cuda.is_available()

    def importable(*modules: str) -> bool:
        return all(importlib.util.find_spec(m) is not None for m in modules)

    return KernelSupport(
        cuda=cuda,
        triton=cuda and importable("triton"),
        apex_wgrad=cuda and bool(getattr(layers, "_grad_accum_fusion_available", False)),
        apex_softmax=cuda and importable("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda",
                                         "scaled_softmax_cuda"),
        te_rope=cuda and getattr(rope_utils, "fused_apply_rotary_pos_emb_thd", None) is not None,
        te_cross_entropy=cuda and getattr(language_module, "te_parallel_cross_entropy", None) is not None,
    )


def fused_kernel_flags(support: KernelSupport, enabled: bool = True) -> Dict[str, Any]:
    """``TransformerConfig`` fusion fields for Qwen3 (SwiGLU, RMSNorm, RoPE, no biases, no dropout) on this machine.

    Each fusion megatron-core 0.16–0.19 offers for this architecture is on exactly when its kernel exists:

    * ``gradient_accumulation_fusion``: wgrad GEMMs accumulate straight into the fp32 ``main_grad``. TE's linear
      layers do it themselves, but the output layer is always megatron's ``ColumnParallelLinear``, which refuses the
      flag without apex's ``fused_weight_gradient_mlp_cuda`` — so apex decides. (Stage-1 row freezing masks
      ``main_grad`` after the reductions, so it is unaffected.)
    * ``bias_activation_fusion``: the SwiGLU of the MLP through megatron's ``bias_swiglu_impl`` (bias-free here);
      ``bias_dropout_fusion``: the residual add through the fused bias-dropout-add. Both are ``jit_fuser``
      (``torch.compile``) kernels: CUDA with Triton.
    * ``apply_rope_fusion``: TE's fused RoPE; for ``thd`` packs it also removes megatron's unfused path's
      ``cu_seqlens.tolist()`` host sync (two per layer and forward).
    * ``cross_entropy_loss_fusion``: ``cross_entropy_fusion_impl="te"`` (TE's kernel computes the loss and its
      gradient in place in the bf16 logits: no fp32 copy of ``[S, V/TP]``) where TE has it, else ``"native"``
      (megatron's jit-fused vocab-parallel cross-entropy: fewer kernels, same memory as the unfused one).
    * ``masked_softmax_fusion``: apex's fused scale-mask-softmax, used only by the local spec's
      ``DotProductAttention``; TE's attention and the packed core attention do their own softmax.
    * ``persist_layer_norm`` / ``memory_efficient_layer_norm``: apex LayerNorm kernels; Qwen3 uses RMSNorm, where
      megatron's torch norm asserts they are off — not applicable, always off.
    """
    on = enabled and support.cuda
    return dict(
        gradient_accumulation_fusion=on and support.apex_wgrad,
        bias_activation_fusion=on and support.triton,
        bias_dropout_fusion=on and support.triton,
        apply_rope_fusion=on and support.te_rope,
        cross_entropy_loss_fusion=on and (support.te_cross_entropy or support.triton),
        cross_entropy_fusion_impl="te" if on and support.te_cross_entropy else "native",
        masked_softmax_fusion=on and support.apex_softmax,
        persist_layer_norm=False,
        memory_efficient_layer_norm=False,
    )


def make_transformer_config(cfg: Qwen3Config, build: ModelBuildConfig, support: Optional[KernelSupport] = None):
    """megatron-core ``TransformerConfig`` of ``cfg`` built as ``build`` says, with the fusions ``support`` allows
    (default: what this machine has). Fields the installed megatron-core does not know are left out."""
    from megatron.core.transformer import TransformerConfig

    check_parallel_layout(cfg, build)
    te = build.resolved_layer_spec() == "te"
    if build.fp8 is not None and not te:
        raise ValueError(
            "FP8 needs the Transformer Engine layer spec (TE + CUDA); this machine has "
            f"{'no CUDA' if not torch.cuda.is_available() else 'no importable transformer_engine'}. "
            "Run in the NGC PyTorch container, or drop the fp8 setting."
        )
    fp8_kwargs = {}
    if build.fp8 is not None:
        fp8_kwargs = dict(
            fp8=build.fp8.format,
            fp8_recipe=build.fp8.recipe,
            fp8_amax_history_len=build.fp8.amax_history_len,
            fp8_amax_compute_algo=build.fp8.amax_compute_algo,
            fp8_margin=build.fp8.margin,
        )
    cuda = torch.cuda.is_available()
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    fusions = {k: v for k, v in fused_kernel_flags(support or detect_kernel_support(), build.fused_kernels).items()
               if k in known}
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.ffn_hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_eps,
        qk_layernorm=True,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=build.init_method_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=build.tensor_model_parallel_size,
        pipeline_model_parallel_size=build.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=build.virtual_pipeline_model_parallel_size,
        calculate_per_token_loss=build.calculate_per_token_loss,
        context_parallel_size=build.context_parallel_size,
        sequence_parallel=build.sequence_parallel,
        params_dtype=build.params_dtype,
        bf16=build.bf16,
        pipeline_dtype=build.params_dtype,
        autocast_dtype=torch.bfloat16 if build.bf16 else None,
        recompute_granularity=build.recompute_granularity,
        recompute_method="uniform" if build.recompute_granularity == "full" else None,
        recompute_num_layers=1 if build.recompute_granularity == "full" else None,
        use_cpu_initialization=not cuda,
        batch_p2p_sync=False,  # a torch.cuda.synchronize() after every p2p exchange: only old PyTorch needed it
        deallocate_pipeline_outputs=True,  # a stage's sent output is freed (its backward needs only the grad)
        **fusions,
        **fp8_kwargs,
    )


def qwen3_layer_spec(cfg: Qwen3Config, build: ModelBuildConfig):
    """megatron's GPT layer spec (TE or local) with the packed attention as core attention."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if build.resolved_layer_spec() == "te":
        spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=True)
        core_attention = te_packed_attention_class()
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=True, normalization="RMSNorm")
        core_attention = PackedDotProductAttention
    spec.submodules.self_attention.submodules.core_attention = core_attention
    return spec


def build_qwen3_model(
    cfg: Qwen3Config,
    build: ModelBuildConfig = ModelBuildConfig(),
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
):
    """One megatron-core ``GPTModel`` chunk for this rank's pipeline stage (needs initialised parallel state)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    if parallel_state.get_tensor_model_parallel_world_size() != build.tensor_model_parallel_size or (
        parallel_state.get_pipeline_model_parallel_world_size() != build.pipeline_model_parallel_size
    ):
        raise ValueError(
            f"model wants TP={build.tensor_model_parallel_size} PP={build.pipeline_model_parallel_size}, "
            f"process groups have TP={parallel_state.get_tensor_model_parallel_world_size()} "
            f"PP={parallel_state.get_pipeline_model_parallel_world_size()}"
        )
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    model = GPTModel(
        config=make_transformer_config(cfg, build),
        transformer_layer_spec=qwen3_layer_spec(cfg, build),
        vocab_size=build.vocab_rows(cfg),
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(cfg.rope_theta),
        vp_stage=vp_stage,
    )
    if type(getattr(model, "rotary_pos_emb", None)) is RotaryEmbedding:
        model.rotary_pos_emb.__class__ = PositionedRotaryEmbedding  # adds optional explicit positions; no params
        model.register_forward_pre_hook(_use_pack_positions, with_kwargs=True)
        model.register_forward_hook(_forget_pack_positions, always_call=True)
    if post_process and build.vocab_rows(cfg) > cfg.vocab_size:
        model.output_layer.register_forward_hook(_padded_vocab_mask_hook(cfg.vocab_size, build.vocab_rows(cfg)))
    return model


class PositionedRotaryEmbedding(RotaryEmbedding):
    """megatron-core's RoPE, at a pack's explicit positions while the model runs on a pack.

    megatron's ``GPTModel`` derives RoPE angles from sequence indices and ignores ``position_ids``. A pack
    (:class:`PackedAttentionParams`, passed as the ``packed_seq_params`` keyword) carries the position of each token in
    its own document or rollout; :func:`build_qwen3_model` hooks the model so that this embedding sees that pack for
    the duration of the forward pass. The angles are gathered from the cached table of the pack length: positions
    never exceed it, so no host read of the positions is needed.
    """

    pack: Optional[PackedAttentionParams] = None

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if self.pack is None:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        return super().forward(self.pack.layout.length)[self.pack.position_ids]


def _use_pack_positions(model, args, kwargs):
    params = kwargs.get("packed_seq_params")
    model.rotary_pos_emb.pack = params if isinstance(params, PackedAttentionParams) else None


def _forget_pack_positions(model, args, output):
    model.rotary_pos_emb.pack = None


def _padded_vocab_mask_hook(vocab_size: int, padded_rows: int):
    """Forward hook on the output layer: logits of padded vocab rows -> dtype minimum.

    Padding rows exist only for TP alignment; their logits (0 for zero rows) would otherwise take probability
    mass in the softmax, so megatron's loss and sampling would differ from the exported HF model, which has no
    such rows. Handles both TP-local logits ``[s, b, padded/TP]`` and gathered ones ``[s, b, padded]``.
    """
    from megatron.core import parallel_state

    def hook(module, inputs, output):
        logits, bias = output
        local = logits.shape[-1]
        start = 0 if local == padded_rows else parallel_state.get_tensor_model_parallel_rank() * local
        first_pad = min(max(vocab_size - start, 0), local)
        if first_pad < local:
            # In place: an out-of-place fill would hold a second [S, V/TP] copy of the logits at the peak (4 GiB
            # for a 48K pack of the 8B model at TP=4). The linear layer keeps its input, not its output.
            logits[..., first_pad:] = torch.finfo(logits.dtype).min
        return logits, bias

    return hook
