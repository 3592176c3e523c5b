"""Layout conversions of the HF ⇄ megatron mapping, against layouts built by hand."""
import dataclasses

import torch

from megatron_onereason.checkpoint.hf_mapping import (
    FC1,
    QKV,
    hf_layer_to_mcore,
    mcore_layer_to_hf,
    qkv_hf_to_mcore,
    qkv_mcore_to_hf,
)
from megatron_onereason.model.qwen3_config import qwen3_preset


def test_qkv_interleaves_query_groups_like_megatron():
    # 4 query heads in 2 groups, head_dim 1, hidden 1: each row is labelled by its source.
    cfg = dataclasses.replace(qwen3_preset("tiny"), head_dim=1, hidden_size=1, num_attention_heads=4,
                              num_query_groups=2)
    q = torch.tensor([[10.0], [11.0], [12.0], [13.0]])
    k = torch.tensor([[20.0], [21.0]])
    v = torch.tensor([[30.0], [31.0]])
    fused = qkv_hf_to_mcore(q, k, v, cfg)
    # group 0: q heads 0,1, k0, v0; group 1: q heads 2,3, k1, v1
    assert fused.flatten().tolist() == [10, 11, 20, 30, 12, 13, 21, 31]
    for a, b in zip(qkv_mcore_to_hf(fused, cfg), (q, k, v)):
        assert torch.equal(a, b)


def test_layer_round_trip_is_exact():
    cfg = qwen3_preset("tiny")
    from megatron_onereason.checkpoint.hf_mapping import expected_hf_shapes

    g = torch.Generator().manual_seed(0)
    hf = {n: torch.randn(s, generator=g) for n, s in expected_hf_shapes(cfg).items() if ".layers.1." in n}
    mc = hf_layer_to_mcore(hf.__getitem__, 1, cfg)
    rows = (cfg.num_attention_heads + 2 * cfg.num_query_groups) * cfg.head_dim  # q heads + k + v, all groups
    assert isinstance(mc[FC1], tuple) and mc[QKV].shape == (rows, cfg.hidden_size)
    back = mcore_layer_to_hf(mc, 1, cfg)
    assert set(back) == set(hf)
    assert all(torch.equal(back[n], hf[n]) for n in hf)
    # The fused fc1 ([gate; up]) is accepted too, as from a gathered model state dict.
    fused = dict(mc, **{FC1: torch.cat(mc[FC1])})
    assert torch.equal(mcore_layer_to_hf(fused, 1, cfg)["model.layers.1.mlp.up_proj.weight"],
                       hf["model.layers.1.mlp.up_proj.weight"])
