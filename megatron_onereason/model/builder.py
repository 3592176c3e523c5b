"""Build Qwen3 as a megatron-core ``GPTModel``.

Qwen3 = RMSNorm pre-norm decoder, SwiGLU MLP, GQA attention with RMSNorm on queries and keys (qk-layernorm),
RoPE (θ = 1e6), no biases, embeddings tied below 8B. The Transformer Engine layer spec is used when TE and CUDA
are present (fused kernels, FP8); megatron-core's local spec otherwise. Both take the packed attention of
:mod:`megatron_onereason.model.packed_attention` as core attention, so packed documents never see each other and RL
tree packs keep their structure, without an ``S × S`` mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

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

    def resolved_layer_spec(self) -> str:
        if self.layer_spec == "auto":
            return "te" if transformer_engine_available() else "local"
        if self.layer_spec == "te" and not transformer_engine_available():
            raise RuntimeError("layer_spec='te' needs Transformer Engine and CUDA; use layer_spec='local'")
        return self.layer_spec

    def vocab_rows(self, cfg: Qwen3Config) -> int:
        padded = self.padded_vocab_size or padded_vocab_size(cfg.vocab_size, self.tensor_model_parallel_size)
        if padded < cfg.vocab_size or padded % self.tensor_model_parallel_size:
            raise ValueError(
                f"padded vocab size {padded} must be >= vocab size {cfg.vocab_size} and divisible by "
                f"TP={self.tensor_model_parallel_size}"
            )
        return padded


def check_parallel_layout(cfg: Qwen3Config, build: ModelBuildConfig) -> None:
    """Refuse a TP/PP the architecture cannot be split by, with the numbers in the message."""
    tp, pp = build.tensor_model_parallel_size, build.pipeline_model_parallel_size
    for what, n in (("num_attention_heads", cfg.num_attention_heads), ("num_query_groups", cfg.num_query_groups),
                    ("ffn_hidden_size", cfg.ffn_hidden_size)):
        if n % tp:
            raise ValueError(f"TP={tp} does not divide {what}={n}")
    stages = pp * (build.virtual_pipeline_model_parallel_size or 1)
    if cfg.num_layers % stages:
        raise ValueError(f"PP={pp} (× virtual stages) does not divide num_layers={cfg.num_layers}")


def make_transformer_config(cfg: Qwen3Config, build: ModelBuildConfig):
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
        # Fused CUDA kernels exist only with CUDA (and apex/TE); on CPU megatron falls back to torch ops.
        use_cpu_initialization=not cuda,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=cuda and te,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        batch_p2p_sync=cuda,
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
            keep = torch.arange(local, device=logits.device) < first_pad
            logits = logits.masked_fill(~keep, torch.finfo(logits.dtype).min)
        return logits, bias

    return hook
