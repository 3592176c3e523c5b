"""Blending by token ratio, per-token source ids through packing, and per-source loss sums."""
from collections import Counter

import numpy as np
import pytest
import torch

from megatron_onereason.data.blending import BlendComponent, BlendConfig, blend_documents, loss_by_source, parse_blend
from megatron_onereason.data.indexed import IndexedPairWriter
from megatron_onereason.data.packed_dataset import build_packed_dataset
from megatron_onereason.data.packing import PackingConfig


def _sources(seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 200, n) for n in (300, 500, 1000)]  # ~30K, ~50K, ~100K tokens


def test_token_ratios_with_repetition():
    sources = _sources()
    weights, total = [0.5, 0.3, 0.2], 100_000
    plan = blend_documents(sources, weights, ["a", "b", "c"], total_tokens=total, seed=1)
    for i, lengths in enumerate(sources):
        want = round(weights[i] * total)
        mine = plan.doc_of[plan.source_of == i]
        got = int(lengths[mine].sum())
        assert got == plan.tokens_per_source[i]
        assert want <= got < want + lengths.max()  # whole documents: overshoot below one document
        counts = Counter(mine.tolist())
        if want >= lengths.sum():  # source a (~30K tokens for 50K wanted): every document once, some twice
            assert set(counts) == set(range(lengths.size)) and set(counts.values()) <= {1, 2}
        else:
            assert set(counts.values()) == {1}
    assert np.array_equal(plan.lengths, np.concatenate([sources[s][d:d + 1] for s, d in
                                                        zip(plan.source_of, plan.doc_of)]))
    assert plan.epochs_per_source[0] > 1 > plan.epochs_per_source[2]
    again = blend_documents(sources, weights, ["a", "b", "c"], total_tokens=total, seed=1)
    assert np.array_equal(plan.doc_of, again.doc_of) and np.array_equal(plan.source_of, again.source_of)


def test_default_budget_repeats_nothing():
    sources = _sources(1)
    plan = blend_documents(sources, [1.0, 1.0, 0.0], ["a", "b", "c"])
    pairs = list(zip(plan.source_of.tolist(), plan.doc_of.tolist()))
    assert len(pairs) == len(set(pairs))  # no document twice
    assert 2 not in plan.source_of  # weight 0: nothing taken
    assert plan.epochs_per_source[0] == 1.0  # the limiting source is used exactly once
    a, b = plan.tokens_per_source[:2]
    assert abs(int(a) - int(b)) < 200  # equal weights: equal tokens, to within one document
    ratios = plan.stats()
    assert ratios["c"]["tokens"] == 0 and abs(ratios["a"]["ratio"] - 0.5) < 0.01


def test_blend_errors():
    with pytest.raises(ValueError, match="no tokens"):
        blend_documents([np.array([3]), np.array([], dtype=np.int64)], [1, 1], ["a", "b"])
    with pytest.raises(ValueError, match="positive sum"):
        blend_documents([np.array([3])], [0], ["a"])
    with pytest.raises(ValueError, match="one weight and name"):
        blend_documents([np.array([3])], [1, 2], ["a"])
    assert parse_blend(["0.3", "d/x", "0.7", "e/y"]) == (BlendComponent("x", "d/x", 0.3),
                                                         BlendComponent("y", "e/y", 0.7))
    with pytest.raises(ValueError, match="not a number"):
        parse_blend(["x", "d/x"])
    with pytest.raises(ValueError, match="distinct"):
        parse_blend(["1", "d/x", "1", "e/x"])


def test_loss_by_source_matches_loop():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(2, 50, generator=g)
    mask = (torch.rand(2, 50, generator=g) > 0.3).float()
    sources = torch.randint(-1, 3, (2, 50), generator=g)
    sums, counts = loss_by_source(loss, mask, sources, 3)
    for k in range(3):
        want = sum(float(loss[i, j] * mask[i, j]) for i in range(2) for j in range(50) if sources[i, j] == k)
        assert sums[k].item() == pytest.approx(want, rel=1e-6)
        assert counts[k].item() == sum(float(mask[i, j]) for i in range(2) for j in range(50) if sources[i, j] == k)


def test_packed_blend_tracks_sources(tmp_path):
    """Two corpora blended 1:3 and packed together: every token's source id is right, token counts match."""
    rng = np.random.default_rng(5)
    components, docs = [], {}
    for i, (name, n, offset) in enumerate([("general", 80, 0), ("items", 200, 10_000)]):
        prefix = str(tmp_path / name)
        with IndexedPairWriter(prefix) as w:
            for d in range(n):
                tokens = offset + rng.integers(0, 1000, rng.integers(5, 60))  # the source is readable from the ids
                mask = rng.integers(0, 2, tokens.size)
                w.add(tokens, mask)
                docs[(i, d)] = (tokens, mask)
        components.append(BlendComponent(name, prefix, 1.0 if i == 0 else 3.0))
    ds = build_packed_dataset(BlendConfig(tuple(components), total_tokens=8000, seed=2),
                              PackingConfig(seq_length=256, max_sample_length=64, window=100), pad_id=0)
    assert ds.source_names == ["general", "items"]
    tokens_seen = np.zeros(2, dtype=np.int64)
    loss_sums = torch.zeros(2)
    for i in range(len(ds)):
        item = ds[i]
        src, tok = item["source_ids"], item["tokens"]
        assert torch.all((src == 0) == ((tok < 10_000) & (src >= 0)))
        assert torch.all((src == 1) == (tok >= 10_000))
        tokens_seen += np.bincount(src[src >= 0].numpy(), minlength=2)
        loss_sums += loss_by_source(torch.ones(tok.shape), item["loss_mask"], src, 2)[1]
    assert np.array_equal(tokens_seen, ds.blend.tokens_per_source)
    # Oracle for the loss-token counts: from the documents themselves (every chunk is a whole doc: cap 64 > 60).
    want = np.zeros(2)
    for s, d in zip(ds.blend.source_of, ds.blend.doc_of):
        want[s] += docs[(int(s), int(d))][1][1:].sum()
    assert np.array_equal(loss_sums.numpy(), want)
    ratio = ds.blend.tokens_per_source / ds.blend.tokens_per_source.sum()
    assert abs(ratio[1] - 0.75) < 0.01
