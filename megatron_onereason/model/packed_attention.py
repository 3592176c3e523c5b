"""Packed-sequence attention for megatron-core's local (non-TE) layer spec.

megatron-core handles packed sequences in ``qkv_format="thd"``: the attention module applies RoPE per document
(positions restart at every ``cu_seqlens`` boundary) and hands ``[t, heads, dim]`` tensors to core attention,
which on the TE spec is a varlen flash kernel. The local ``DotProductAttention`` refuses ``thd``; this subclass
accepts it by building the block-diagonal causal mask from ``cu_seqlens`` so documents never attend across each
other. It materialises a ``t × t`` mask, which is fine for CPU tests and small runs; GPUs use the TE spec.
"""
from __future__ import annotations

import torch
from megatron.core.transformer.dot_product_attention import DotProductAttention


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean ``[1, 1, total, total]`` mask, True where attention is *forbidden* (megatron's convention).

    Position ``q`` may attend to ``k`` iff both lie in the same ``cu_seqlens`` segment and ``k <= q``.
    """
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must run from 0 to {total}, got {cu_seqlens.tolist()}")
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.long)
    if bool((lengths < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=cu_seqlens.device), lengths)
    pos = torch.arange(total, device=cu_seqlens.device)
    allowed = (segment[:, None] == segment[None, :]) & (pos[None, :] <= pos[:, None])
    return (~allowed)[None, None]


class PackedDotProductAttention(DotProductAttention):
    """``DotProductAttention`` that also takes ``thd`` packed sequences (single pack per micro-batch)."""

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        if packed_seq_params is None:
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias)
        if packed_seq_params.qkv_format != "thd":
            raise ValueError(f"packed sequences need qkv_format='thd', got {packed_seq_params.qkv_format!r}")
        if packed_seq_params.cu_seqlens_q_padded is not None:
            raise ValueError("padded cu_seqlens (context parallel) need the Transformer Engine spec")
        # [t, heads, dim] -> [t, b=1, heads, dim]: the whole pack is one attention problem with a block mask.
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        mask = block_causal_mask(packed_seq_params.cu_seqlens_q, query.size(0))
        return super().forward(query, key, value, mask, attn_mask_type, attention_bias)
