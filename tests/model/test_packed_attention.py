"""Packed attention kernels against a dense-mask reference built by hand (float64 math, outputs and gradients)."""
import types

import numpy as np
import pytest
import torch

from megatron_onereason.model.pack_layout import PackLayout, Segment
from megatron_onereason.model.packed_attention import _with_te_document_packs, flex_block_mask, pack_params, \
    packed_attention
from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees


def hand_mask(pieces):
    """The allowed ``[S, S]`` mask of a pack written as ``("doc", n)`` and ``("tree", prompt+trace, [child...])``
    pieces, from the definitions (causal documents; a child sees the trunk without its last token and itself)."""
    total = sum(p[1] + sum(p[2]) if p[0] == "tree" else p[1] for p in pieces)
    allowed = torch.zeros(total, total, dtype=torch.bool)
    pos = 0
    for piece in pieces:
        trunk = piece[1]
        for q in range(trunk):
            allowed[pos + q, pos:pos + q + 1] = True
        start, pos = pos, pos + trunk
        for c in (piece[2] if piece[0] == "tree" else []):
            for q in range(c):
                allowed[pos + q, start:start + trunk - 1] = True
                allowed[pos + q, pos:pos + q + 1] = True
            pos += c
    return allowed


def layout_of(pieces):
    return PackLayout(tuple(Segment(p[1], p[1] - 1, tuple(p[2])) if p[0] == "tree" else Segment(p[1])
                            for p in pieces))


def reference(q, k, v, allowed, scale):
    """softmax(q kᵀ · scale, masked) v in float64 with K/V heads repeated for GQA; [S, 1, H, D] → [S, 1, H·D]."""
    rep = q.size(2) // k.size(2)
    qq, kk, vv = (x[:, 0].transpose(0, 1).double() for x in (q, k, v))
    kk, vv = kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0)
    probs = (qq @ kk.transpose(1, 2) * scale).masked_fill(~allowed, float("-inf")).softmax(-1)
    return (probs @ vv).transpose(0, 1).reshape(q.size(0), 1, -1)


DOCS = [("doc", 37), ("doc", 5), ("doc", 1), ("doc", 60), ("doc", 9)]  # the last one: the data pipeline's padding
TREES = [("tree", 40, [4, 2, 5]), ("doc", 3), ("tree", 1, [2, 3]), ("tree", 25, [1]), ("doc", 17)]


@pytest.mark.parametrize("pieces, heads, groups", [(DOCS, 4, 2), (TREES, 4, 2), (TREES, 2, 2), (DOCS, 6, 1)],
                         ids=["documents-gqa", "trees-gqa", "trees-mha", "documents-mqa"])
def test_sdpa_kernel_matches_dense_reference_in_outputs_and_gradients(pieces, heads, groups):
    layout = layout_of(pieces)
    allowed = hand_mask(pieces)
    assert torch.equal(layout.dense_mask(), allowed)
    g = torch.Generator().manual_seed(0)
    s, dim, scale = layout.length, 16, 16 ** -0.5
    q, k, v = (torch.randn(s, 1, h, dim, generator=g, requires_grad=True) for h in (heads, groups, groups))
    out = packed_attention(q, k, v, pack_params(layout, "cpu", backend="sdpa"), scale)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    expected = reference(q64, k64, v64, allowed, scale)
    upstream = torch.randn(expected.shape, generator=g, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    for got, want in ((q, q64), (k, k64), (v, v64)):
        torch.testing.assert_close(got.grad.double(), want.grad, atol=1e-5, rtol=0)
    # The check can fail: a plain causal mask over the whole pack gives other outputs.
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    assert (reference(q64, k64, v64, causal, scale) - expected).abs().max() > 1e-2


def test_tree_pack_layout_is_the_tree_attention_and_positions_of_its_rollouts():
    trees = [TreeSequence([5, 6, 7], [8, 9], [[1, 2, 3], [4]]), TreeSequence([3], [], [[1], [2, 2]])]
    pack = pack_trees(trees, length=24)
    assert torch.equal(pack.allowed, hand_mask([("tree", 5, [4, 2]), ("tree", 1, [2, 3]), ("doc", 7)]))
    # A child's tokens continue its rollout: copy of the last trunk token at its position, then the completion.
    expected = [0, 1, 2, 3, 4, 4, 5, 6, 7, 4, 5, 0, 0, 1, 0, 1, 2] + list(range(7))
    assert pack.position_ids.tolist() == expected


def _blocks(counts, indices, length):
    """Dense ``[Q blocks, KV blocks]`` bool of a (counts, indices) block list."""
    dense = torch.zeros(length // 128, length // 128, dtype=torch.bool)
    for row, (n, idx) in enumerate(zip(counts[0, 0].tolist(), indices[0, 0].tolist())):
        dense[row, idx[:n]] = True
    return dense


def test_flex_block_mask_has_torchs_partial_and_full_blocks():
    from torch.nn.attention.flex_attention import create_block_mask

    # Long trunks and documents span several blocks: full, partial and empty blocks all occur.
    pieces = [("tree", 300, [5, 9, 3]), ("doc", 140), ("tree", 1, [2, 2]), ("tree", 200, [4]), ("doc", 37)]
    allowed = hand_mask(pieces)
    length = 1024  # padded: rows past the pack see nothing
    padded = torch.zeros(length, length, dtype=torch.bool)
    padded[: allowed.size(0), : allowed.size(0)] = allowed
    ours = flex_block_mask(torch.from_numpy(layout_of(pieces).key_ranges()), length)
    theirs = create_block_mask(lambda b, h, q, kv: padded[q, kv], None, None, length, length, device="cpu")
    for name in ("kv", "full_kv"):
        mine = _blocks(getattr(ours, f"{name}_num_blocks"), getattr(ours, f"{name}_indices"), length)
        torchs = _blocks(getattr(theirs, f"{name}_num_blocks"), getattr(theirs, f"{name}_indices"), length)
        assert torch.equal(mine, torchs), name
    assert ours.full_kv_num_blocks.sum() > 0 and ours.kv_num_blocks.sum() > 0
    q, kv = torch.meshgrid(torch.arange(length), torch.arange(length), indexing="ij")
    assert torch.equal(ours.mask_mod(0, 0, q, kv), padded)


def test_flex_forward_matches_dense_reference_on_cpu_and_refuses_cpu_backward():
    """The CUDA kernel's path (compiled FlexAttention, block mask, GQA, padding to the bucket) — forward on CPU."""
    layout = layout_of(TREES)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(layout.length, 1, h, 16, generator=g) for h in (4, 2, 2))
    params = pack_params(layout, "cpu", backend="flex")
    with torch.no_grad():
        out = packed_attention(q, k, v, params, 0.25)
    torch.testing.assert_close(out.double(), reference(q, k, v, hand_mask(TREES), 0.25), atol=1e-5, rtol=0)
    with pytest.raises(NotImplementedError, match="no backward on CPU"):
        packed_attention(q.requires_grad_(), k, v, params, 0.25)


class FakeTEAttention(torch.nn.Module):
    """Stands in for TE's core attention (no TE here): takes ``thd`` document packs as TE's flash kernel does."""

    def __init__(self, config, **kwargs):
        super().__init__()
        self.softmax_scale = config.kv_channels ** -0.5
        self.calls = []

    def forward(self, query, key, value, attention_mask, attn_mask_type, attention_bias=None, packed_seq_params=None):
        self.calls.append(packed_seq_params)
        cu = packed_seq_params.cu_seqlens_q.tolist()
        return torch.cat([reference(*(x[s:e, None] for x in (query, key, value)),
                                    torch.ones(e - s, e - s, dtype=torch.bool).tril(), self.softmax_scale)
                          for s, e in zip(cu[:-1], cu[1:])])[:, 0].float()


def test_te_spec_sends_document_packs_to_tes_thd_kernel_and_tree_packs_to_ours():
    attention = _with_te_document_packs(FakeTEAttention)(types.SimpleNamespace(attention_dropout=0.0, kv_channels=16))
    g = torch.Generator().manual_seed(2)
    calls = {}
    for name, pieces in (("documents", DOCS), ("trees", TREES)):
        layout = layout_of(pieces)
        q, k, v = (torch.randn(layout.length, 1, h, 16, generator=g) for h in (4, 2, 2))
        attention.calls.clear()
        out = attention(q, k, v, None, None, packed_seq_params=pack_params(layout, "cpu"))
        torch.testing.assert_close(out.double(), reference(q, k, v, hand_mask(pieces), 0.25), atol=1e-5, rtol=0)
        calls[name] = list(attention.calls)
    assert calls["trees"] == []
    (thd,) = calls["documents"]
    assert thd.qkv_format == "thd" and thd.max_seqlen_q == thd.max_seqlen_kv == 60
    assert thd.cu_seqlens_q.tolist() == thd.cu_seqlens_kv.tolist() == [0, 37, 42, 43, 103, 112]


def test_bad_structures_are_refused():
    with pytest.raises(ValueError, match="strictly increase"):
        PackLayout.from_cu_seqlens(np.array([0, 4, 4, 9]))
    with pytest.raises(ValueError, match="start at 0"):
        PackLayout.from_cu_seqlens(torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="segment 1"):
        PackLayout((Segment(3), Segment(2, 3, (1,))))
    with pytest.raises(ValueError, match="backend"):
        pack_params(PackLayout.documents([4]), "cpu", backend="fast")
    layout = PackLayout.documents([4, 4])
    with pytest.raises(ValueError, match="8 positions"):
        packed_attention(torch.zeros(6, 1, 2, 4), torch.zeros(6, 1, 2, 4), torch.zeros(6, 1, 2, 4),
                         pack_params(layout, "cpu"), 0.5)
