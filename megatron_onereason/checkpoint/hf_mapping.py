"""Qwen3 weight names and layouts: Hugging Face ⇄ megatron-core. The single source of truth for weight names.

Megatron names here are *checkpoint* keys (``ShardedTensor.key``), which are the same for the TE and the local
layer spec: per-layer tensors are stacked on a leading layer axis under ``decoder.layers.<suffix>``. Layouts:

* ``linear_qkv.weight`` interleaves per query group ``g``: ``[q heads of g; k_g; v_g]`` (rows), so a TP shard
  holds whole groups. ``qkv_hf_to_mcore`` / ``qkv_mcore_to_hf`` convert.
* ``linear_fc1.weight`` is ``[gate; up]`` globally (megatron's SwiGLU factory chunks it per TP rank), so it is
  kept as the pair ``(gate, up)`` here; the converter writes the halves without concatenating them.
* The embedding (and untied output layer) is padded to the checkpoint's padded vocab; HF has the true vocab.
"""
from __future__ import annotations

from typing import Callable, Dict, Tuple, Union

import torch

from megatron_onereason.model.qwen3_config import Qwen3Config

EMBEDDING = "embedding.word_embeddings.weight"
FINAL_NORM = "decoder.final_layernorm.weight"
OUTPUT_LAYER = "output_layer.weight"
LAYER_PREFIX = "decoder.layers."

QKV = "self_attention.linear_qkv.weight"
FC1 = "mlp.linear_fc1.weight"
# megatron per-layer checkpoint suffix -> HF name inside "model.layers.{i}." for the one-to-one tensors.
LAYER_DIRECT = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "mlp.linear_fc1.layer_norm_weight": "post_attention_layernorm.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
LAYER_SUFFIXES = tuple(LAYER_DIRECT) + (QKV, FC1)
# The tensors outside the decoder layers: megatron checkpoint key -> HF name.
HF_NAME_OF_TOP_KEY = {EMBEDDING: "model.embed_tokens.weight", FINAL_NORM: "model.norm.weight",
                      OUTPUT_LAYER: "lm_head.weight"}
# The local spec's module names for the two norms that TE fuses into the following linear layer.
LOCAL_SPEC_ALIASES = {
    "input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
    "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight",
}

LayerTensor = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]


def hf_layer_name(layer: int, name: str) -> str:
    return f"model.layers.{layer}.{name}"


def qkv_hf_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Qwen3Config) -> torch.Tensor:
    groups, d = cfg.num_query_groups, cfg.head_dim
    heads_per_group = cfg.num_attention_heads // groups
    hidden = q.shape[-1]
    fused = torch.cat(
        [q.reshape(groups, heads_per_group * d, hidden), k.reshape(groups, d, hidden), v.reshape(groups, d, hidden)],
        dim=1,
    )
    return fused.reshape(-1, hidden)


def qkv_mcore_to_hf(qkv: torch.Tensor, cfg: Qwen3Config) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, d = cfg.num_query_groups, cfg.head_dim
    heads_per_group = cfg.num_attention_heads // groups
    hidden = qkv.shape[-1]
    grouped = qkv.reshape(groups, (heads_per_group + 2) * d, hidden)
    q, k, v = torch.split(grouped, [heads_per_group * d, d, d], dim=1)
    return q.reshape(-1, hidden), k.reshape(-1, hidden), v.reshape(-1, hidden)


def hf_layer_to_mcore(get_hf: Callable[[str], torch.Tensor], layer: int, cfg: Qwen3Config) -> Dict[str, LayerTensor]:
    """One decoder layer in megatron layout; ``get_hf(name)`` returns a HF tensor by its full name.

    ``FC1`` maps to the pair ``(gate, up)``; use :func:`fuse_fc1` where one tensor is needed.
    """
    out: Dict[str, LayerTensor] = {mc: get_hf(hf_layer_name(layer, hf)) for mc, hf in LAYER_DIRECT.items()}
    out[QKV] = qkv_hf_to_mcore(*(get_hf(hf_layer_name(layer, f"self_attn.{p}_proj.weight")) for p in "qkv"), cfg)
    out[FC1] = (get_hf(hf_layer_name(layer, "mlp.gate_proj.weight")), get_hf(hf_layer_name(layer, "mlp.up_proj.weight")))
    return out


def mcore_tensor_to_hf(suffix: str, tensor: LayerTensor, layer: int, cfg: Qwen3Config) -> Dict[str, torch.Tensor]:
    """HF tensors of one megatron per-layer tensor; ``FC1`` may be fused or the ``(gate, up)`` pair.

    Also accepts the local spec's norm names (:data:`LOCAL_SPEC_ALIASES`), e.g. from a gathered model state dict.
    """
    suffix = LOCAL_SPEC_ALIASES.get(suffix, suffix)
    if suffix == QKV:
        return {hf_layer_name(layer, f"self_attn.{p}_proj.weight"): t
                for p, t in zip("qkv", qkv_mcore_to_hf(tensor, cfg))}
    if suffix == FC1:
        gate, up = split_fc1(tensor)
        return {hf_layer_name(layer, "mlp.gate_proj.weight"): gate, hf_layer_name(layer, "mlp.up_proj.weight"): up}
    if suffix not in LAYER_DIRECT:
        raise KeyError(f"unknown megatron layer tensor {suffix!r}")
    return {hf_layer_name(layer, LAYER_DIRECT[suffix]): tensor}


def mcore_layer_to_hf(mc: Dict[str, LayerTensor], layer: int, cfg: Qwen3Config) -> Dict[str, torch.Tensor]:
    """Inverse of :func:`hf_layer_to_mcore`."""
    out: Dict[str, torch.Tensor] = {}
    for suffix, tensor in mc.items():
        out.update(mcore_tensor_to_hf(suffix, tensor, layer, cfg))
    return out


def fuse_fc1(fc1: LayerTensor) -> torch.Tensor:
    return torch.cat(fc1, dim=0) if isinstance(fc1, tuple) else fc1


def split_fc1(fc1: LayerTensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return fc1 if isinstance(fc1, tuple) else tuple(torch.chunk(fc1, 2, dim=0))


def expected_layer_shapes(cfg: Qwen3Config) -> Dict[str, Tuple[int, ...]]:
    """Global per-layer shapes in megatron layout (FC1 fused), used to check checkpoints against configs."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    return {
        "self_attention.linear_qkv.layer_norm_weight": (h,),
        "self_attention.q_layernorm.weight": (d,),
        "self_attention.k_layernorm.weight": (d,),
        "self_attention.linear_proj.weight": (h, cfg.num_attention_heads * d),
        "mlp.linear_fc1.layer_norm_weight": (h,),
        "mlp.linear_fc2.weight": (h, f),
        QKV: ((cfg.num_attention_heads + 2 * cfg.num_query_groups) * d, h),
        FC1: (2 * f, h),
    }


def expected_hf_shapes(cfg: Qwen3Config) -> Dict[str, Tuple[int, ...]]:
    """Every HF tensor name of the model with its shape."""
    h, f, d = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    per_layer = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.q_proj.weight": (cfg.num_attention_heads * d, h),
        "self_attn.k_proj.weight": (cfg.num_query_groups * d, h),
        "self_attn.v_proj.weight": (cfg.num_query_groups * d, h),
        "self_attn.o_proj.weight": (h, cfg.num_attention_heads * d),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
    }
    for layer in range(cfg.num_layers):
        for name, shape in per_layer.items():
            shapes[hf_layer_name(layer, name)] = shape
    return shapes
