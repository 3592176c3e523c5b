"""Packed-document and tree attention for megatron-core's ``core_attention`` slot, without ``S × S`` memory.

The pack's structure (:class:`~megatron_onereason.model.pack_layout.PackLayout`: segments of a causal trunk and
children that see a trunk prefix; every query row sees at most two contiguous key ranges) reaches every layer as
:class:`PackedAttentionParams`, megatron's ``PackedSeqParams`` plus the layout, the RoPE positions and the per-row key
ranges on the device, built once per micro-batch (host-to-device copies only; no ``.item()``/``.tolist()`` after).
Kernels (``PackedAttentionParams.backend``; ``auto`` picks ``flex`` on CUDA with Triton, ``sdpa`` otherwise):

* ``sdpa``: per segment, ``scaled_dot_product_attention`` causal over the trunk and, for the children, over the
  segment with a ``children × segment`` mask. Memory grows with the pack length for a fixed segment size, never
  with its square; runs forward and backward on CPU (and on CUDA without Triton).
* ``flex``: FlexAttention with a ``BlockMask`` built from the key ranges (block-level work, no ``S × S`` tensor),
  compiled once per pack-length bucket; GQA through ``enable_gqa`` (K/V are not repeated). Its forward also runs on
  CPU (tests); its backward does not (torch has no CPU FlexAttention backward), which is refused with a clear error.
* On the Transformer Engine spec, document packs keep TE's own flash ``thd`` kernel and tree packs use ``flex``.
* ``dense``: megatron's own attention with the ``S × S`` mask — the oracle of tests and the benchmark's baseline.

Packs travel in megatron's ``sbhd`` layout (``[S, 1, heads, dim]``, ``qkv_format="sbhd"``) with RoPE at
``position_ids`` (``megatron_onereason.model.builder.PositionedRotaryEmbedding`` reads them from the params), so one
path serves documents (positions restart per document) and trees (children continue their trunk's positions), and
no per-layer ``thd`` RoPE (which reads ``cu_seqlens`` on the host) is involved.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from megatron_onereason.model.pack_layout import PackLayout, allowed_keys

BACKENDS = ("auto", "sdpa", "flex", "dense")
FLEX_BLOCK = 128  # FlexAttention's sparse block size
FLEX_BUCKET = 1024  # flex pads packs to a multiple of this: one compilation per bucket, not per length


def pack_params(layout: PackLayout, device, backend: str = "auto") -> "PackedAttentionParams":
    """The ``packed_seq_params`` of a pack, its tensors on ``device`` (``packed_seq_params`` of the model's forward)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    def to_device(array):  # from pageable memory an asynchronous copy is staged at once: the host never waits
        return torch.as_tensor(array).to(device, non_blocking=True)

    cu = to_device(torch.tensor(layout.boundaries, dtype=torch.int32))
    return PackedAttentionParams(
        qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=layout.length,
        max_seqlen_kv=layout.length, layout=layout, position_ids=to_device(layout.position_ids()),
        key_ranges=to_device(layout.key_ranges()), backend=backend)


def document_params(cu_seqlens, device, backend: str = "auto") -> "PackedAttentionParams":
    """``packed_seq_params`` of a document pack from host-side ``cu_seqlens`` (as the data pipeline writes them)."""
    return pack_params(PackLayout.from_cu_seqlens(cu_seqlens), device, backend)


@dataclass
class PackedAttentionParams(PackedSeqParams):
    """megatron's ``PackedSeqParams`` (``qkv_format="sbhd"``, ``cu_seqlens`` = segment boundaries, ``max_seqlen`` =
    pack length) plus the pack's structure. Build with :func:`pack_params`; pass as ``packed_seq_params`` to the
    model (keyword argument: the model reads RoPE positions from it) with ``attention_mask=None``.

    ``cache`` holds what the kernels derive from the structure (block mask, child masks) so that it is built at the
    first layer and reused by the others, for forward, recomputation and backward alike.
    """

    layout: Optional[PackLayout] = None
    position_ids: Optional[torch.Tensor] = None  # int64 [S]
    key_ranges: Optional[torch.Tensor] = None  # int32 [4, S], see PackLayout.key_ranges
    backend: str = "auto"
    cache: Dict = field(default_factory=dict, repr=False, compare=False)

    def cached(self, key, build):
        if key not in self.cache:
            self.cache[key] = build()
        return self.cache[key]


@functools.lru_cache(maxsize=None)
def flex_available() -> bool:
    """FlexAttention on CUDA needs torch >= 2.5 with Triton."""
    try:
        import triton  # noqa: F401
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend != "auto":
        return backend
    return "flex" if device.type == "cuda" and flex_available() else "sdpa"


def packed_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: PackedAttentionParams,
                     scale: float, backend: Optional[str] = None) -> torch.Tensor:
    """Attention of one pack: ``query [S, 1, Hq, D]``, ``key``/``value [S, 1, Hkv, D]`` (megatron ``sbhd``, ``Hq``
    a multiple of ``Hkv``) → ``[S, 1, Hq·D]``. ``backend`` (default: the params') is ``sdpa`` or ``flex``."""
    if query.size(1) != 1 or query.size(0) != params.layout.length:
        raise ValueError(f"a pack of {params.layout.length} positions needs query [S={params.layout.length}, 1, heads, "
                         f"dim], got {list(query.shape)}")
    backend = resolve_backend(backend or params.backend, query.device)
    q, k, v = (x[:, 0].transpose(0, 1).unsqueeze(0) for x in (query, key, value))  # [1, H, S, D]
    if backend == "sdpa":
        out = _sdpa_segments(q, k, v, params, scale)
    elif backend == "flex":
        out = _flex(q, k, v, params, scale)
    else:
        raise ValueError(f"packed_attention computes backends 'sdpa' and 'flex', got {backend!r}")
    return out[0].transpose(0, 1).reshape(query.size(0), 1, -1)


def _sdpa_segments(q, k, v, params: PackedAttentionParams, scale: float) -> torch.Tensor:
    """Per segment: causal SDPA over the trunk; the children's rows over the segment with their small mask."""
    gqa = q.size(1) != k.size(1)
    outs = []
    for i, (seg, start) in enumerate(zip(params.layout.segments, params.layout.boundaries)):
        trunk_end, end = start + seg.trunk, start + seg.length
        outs.append(F.scaled_dot_product_attention(q[:, :, start:trunk_end], k[:, :, start:trunk_end],
                                                   v[:, :, start:trunk_end], is_causal=True, scale=scale,
                                                   enable_gqa=gqa))
        if end > trunk_end:
            mask = params.cached(("children", i, q.device), lambda: allowed_keys(
                params.key_ranges[:, trunk_end:end], torch.arange(start, end, device=q.device)))
            outs.append(F.scaled_dot_product_attention(q[:, :, trunk_end:end], k[:, :, start:end], v[:, :, start:end],
                                                       attn_mask=mask, scale=scale, enable_gqa=gqa))
    return torch.cat(outs, dim=2)


@functools.lru_cache(maxsize=None)
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes: packs of one bucket share one compiled kernel (eager FlexAttention would materialise scores).
    return torch.compile(flex_attention, dynamic=False)


def _flex(q, k, v, params: PackedAttentionParams, scale: float) -> torch.Tensor:
    if q.device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
        raise NotImplementedError("FlexAttention has no backward on CPU; CPU training uses the 'sdpa' backend")
    length = q.size(2)
    bucket = -(-length // FLEX_BUCKET) * FLEX_BUCKET
    block_mask = params.cached(("flex", bucket, q.device), lambda: flex_block_mask(params.key_ranges, bucket))
    if bucket > length:  # padded rows see nothing (their output is dropped); padded keys are seen by no row
        q, k, v = (F.pad(x, (0, 0, 0, bucket - length)) for x in (q, k, v))
    out = _compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))
    return out[:, :, :length]


def flex_block_mask(key_ranges: torch.Tensor, length: int):
    """FlexAttention ``BlockMask`` of a pack padded to ``length`` (a multiple of ``FLEX_BLOCK``), from the key ranges.

    Block ``(i, j)`` is skipped when no row of query block ``i`` sees a key of block ``j``, *full* (no mask applied)
    when every row sees all of it, and *partial* (``mask_mod`` per element) otherwise. Work is
    ``length² / FLEX_BLOCK`` comparisons on the device, done once per micro-batch; nothing is ``length × length``.
    """
    from torch.nn.attention.flex_attention import BlockMask

    pad = length - key_ranges.size(1)
    empty = torch.tensor([[0], [-1], [0], [-1]], dtype=key_ranges.dtype, device=key_ranges.device)
    ranges = torch.cat([key_ranges, empty.expand(4, pad)], dim=1)
    lo1, hi1, lo2, hi2 = ranges
    blocks = length // FLEX_BLOCK
    first = torch.arange(blocks, device=ranges.device, dtype=ranges.dtype) * FLEX_BLOCK  # [KVb]
    last = first + FLEX_BLOCK - 1
    rows = ranges.view(4, blocks, FLEX_BLOCK, 1)  # [4, Qb, rows, 1] against [KVb]
    seen = ((rows[0] <= last) & (rows[1] >= first)) | ((rows[2] <= last) & (rows[3] >= first))
    covered = ((rows[0] <= first) & (rows[1] >= last)) | ((rows[2] <= first) & (rows[3] >= last))
    full = covered.all(dim=1)
    partial = seen.any(dim=1) & ~full

    def ordered(dense):  # [Qb, KVb] bool -> counts [1, 1, Qb], block indices [1, 1, Qb, KVb] (listed first)
        counts = dense.sum(-1, dtype=torch.int32)
        order = torch.argsort(dense.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
        return counts[None, None], order[None, None]

    def mask_mod(b, h, q_idx, kv_idx):
        return ((kv_idx >= lo1[q_idx]) & (kv_idx <= hi1[q_idx])) | ((kv_idx >= lo2[q_idx]) & (kv_idx <= hi2[q_idx]))

    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=FLEX_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(length, length))


class _PackDispatch:
    """Core-attention mixin: packs (:class:`PackedAttentionParams`) go to :func:`packed_attention`; anything else to
    the megatron class it is mixed into (unpacked batches with megatron's own masks)."""

    te_document_packs = False  # TE's flash thd kernel takes document packs

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        if not isinstance(packed_seq_params, PackedAttentionParams):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias,
                                   packed_seq_params=packed_seq_params, **kwargs)
        params = packed_seq_params
        if attention_mask is not None or attention_bias is not None:
            raise ValueError("a pack's PackedAttentionParams replace the attention mask: pass attention_mask=None")
        backend = resolve_backend(params.backend, query.device)
        if backend == "dense":
            mask = params.cached(("dense", query.device),
                                 lambda: ~params.layout.dense_mask().to(query.device)[None, None])
            return super().forward(query, key, value, mask, AttnMaskType.arbitrary)
        if self.te_document_packs and not params.layout.has_children:
            thd = params.cached("thd", lambda: PackedSeqParams(
                qkv_format="thd", cu_seqlens_q=params.cu_seqlens_q, cu_seqlens_kv=params.cu_seqlens_kv,
                max_seqlen_q=max(s.length for s in params.layout.segments),
                max_seqlen_kv=max(s.length for s in params.layout.segments)))
            out = super().forward(query[:, 0], key[:, 0], value[:, 0], None, AttnMaskType.causal,
                                  packed_seq_params=thd)
            return out.reshape(query.size(0), 1, -1)
        return packed_attention(query, key, value, params, self.softmax_scale, backend)


def _check_supported(config) -> None:
    unsupported = {"attention_dropout": config.attention_dropout,
                   "apply_query_key_layer_scaling": getattr(config, "apply_query_key_layer_scaling", False),
                   "window_size": getattr(config, "window_size", None),
                   "softmax_type": None if getattr(config, "softmax_type", "vanilla") == "vanilla" else
                   config.softmax_type}
    bad = {k: v for k, v in unsupported.items() if v}
    if bad:
        raise ValueError(f"packed attention implements plain softmax attention; unsupported settings: {bad}")


class PackedDotProductAttention(_PackDispatch, DotProductAttention):
    """The local spec's core attention: packs through :func:`packed_attention`, the rest through megatron's own."""

    def __init__(self, config, *args, **kwargs):
        _check_supported(config)
        super().__init__(config, *args, **kwargs)


@functools.lru_cache(maxsize=None)
def te_packed_attention_class():
    """The TE spec's core attention (made on first use: it subclasses TE's, which needs TE and CUDA): TE's kernels
    for unpacked batches and document packs (flash ``thd``), :func:`packed_attention` for tree packs. Its state dict
    is TE's."""
    from megatron.core.extensions.transformer_engine import TEDotProductAttention

    return _with_te_document_packs(TEDotProductAttention)


def _with_te_document_packs(base):
    """``base`` (TE's core attention) taking packs: documents through its ``thd`` kernel, trees through ours."""

    def __init__(self, config, *args, **kwargs):
        _check_supported(config)
        base.__init__(self, config, *args, **kwargs)

    return type("TEPackedDotProductAttention", (_PackDispatch, base),
                {"te_document_packs": True, "__init__": __init__, "__module__": __name__,
                 "__doc__": te_packed_attention_class.__doc__})
