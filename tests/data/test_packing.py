"""Packing: hand-checked masks, a brute-force first-fit-decreasing oracle, invariants, fill rate, the dataset."""
import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from megatron_onereason.data.blending import blend_documents
from megatron_onereason.data.indexed import IndexedPair, IndexedPairWriter
from megatron_onereason.data.packed_dataset import PackedDataset
from megatron_onereason.data.packing import (
    PAD_SOURCE_ID,
    PackingConfig,
    assemble_pack,
    packed_loss_mask,
    plan_packs,
    split_overlong,
)

PAD = 0


# ------------------------------------------------------------------------------------------ hand-written examples
def test_assemble_pack_token_by_token():
    # doc A = [5, 6, 7]: 5 is context, 6 and 7 are targets; doc B = [8, 9]: both targets; 3 positions of padding.
    pack = assemble_pack([np.array([5, 6, 7]), np.array([8, 9])], [np.array([0, 1, 1]), np.array([1, 1])],
                         [3, 4], seq_length=8, pad_id=PAD)
    assert pack.tokens.tolist() == [5, 6, 7, 8, 9, 0, 0, 0]
    assert pack.labels.tolist() == [6, 7, PAD, 9, PAD, PAD, PAD, PAD]
    # 5→6 target, 6→7 target, 7 ends A (must not predict B's 8), 8→9 target, 9 ends B, padding none.
    assert pack.loss_mask.tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
    assert pack.position_ids.tolist() == [0, 1, 2, 0, 1, 0, 1, 2]
    assert pack.cu_seqlens.tolist() == [0, 3, 5, 8]
    assert pack.source_ids.tolist() == [3, 3, 3, 4, 4, PAD_SOURCE_ID, PAD_SOURCE_ID, PAD_SOURCE_ID]
    assert pack.num_documents == 2
    assert (pack.tokens.dtype, pack.labels.dtype, pack.loss_mask.dtype, pack.position_ids.dtype,
            pack.cu_seqlens.dtype, pack.source_ids.dtype) == (np.int64, np.int64, np.float32, np.int64, np.int32,
                                                              np.int64)


def test_assemble_pack_exactly_full_has_no_padding_segment():
    # A target token right after a document boundary: B's first token (a target) is predicted by nobody.
    pack = assemble_pack([np.array([1, 2]), np.array([3, 4, 5])], [np.array([1, 1]), np.array([1, 0, 1])],
                         [0, 0], seq_length=5, pad_id=PAD)
    assert pack.cu_seqlens.tolist() == [0, 2, 5]
    assert pack.loss_mask.tolist() == [1, 0, 0, 1, 0]
    assert pack.position_ids.tolist() == [0, 1, 0, 1, 2]
    assert pack.labels.tolist() == [2, PAD, 4, 5, PAD]


def test_packed_loss_mask_hand_example_and_errors():
    target = np.array([0, 0, 1, 1, 0, 1, 1, 1, 0, 0], dtype=np.uint8)
    cu = np.array([0, 4, 8, 10])
    assert packed_loss_mask(target, cu).tolist() == [0, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="from 0 to 10"):
        packed_loss_mask(target, np.array([0, 4, 9]))
    with pytest.raises(ValueError, match="strictly increasing"):
        packed_loss_mask(target, np.array([0, 4, 4, 10]))


def test_assemble_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="more than seq_length"):
        assemble_pack([np.arange(6)], [np.ones(6)], [0], seq_length=5, pad_id=PAD)
    with pytest.raises(ValueError, match="target-mask"):
        assemble_pack([np.arange(3)], [np.ones(2)], [0], seq_length=5, pad_id=PAD)
    with pytest.raises(ValueError, match="empty"):
        assemble_pack([np.arange(0)], [np.ones(0)], [0], seq_length=5, pad_id=PAD)


@pytest.mark.parametrize("policy, doc, start, length, counts", [
    ("split", [0, 1, 1, 1, 3], [0, 0, 4, 8, 0], [3, 4, 4, 2, 4], dict(split_documents=1)),
    ("truncate", [0, 1, 3], [0, 0, 0], [3, 4, 4], dict(truncated_documents=1, truncated_tokens=6)),
    ("drop", [0, 3], [0, 0], [3, 4], dict(dropped_documents=1, dropped_tokens=10)),
])
def test_split_overlong_policies(policy, doc, start, length, counts):
    d, s, n, c = split_overlong(np.array([3, 10, 0, 4]), PackingConfig(seq_length=8, max_sample_length=4,
                                                                       overlong_policy=policy))
    assert (d.tolist(), s.tolist(), n.tolist()) == (doc, start, length)
    expected = dict(split_documents=0, truncated_documents=0, truncated_tokens=0, dropped_documents=0,
                    dropped_tokens=0, empty_documents=1)
    expected.update(counts)
    assert c == expected


def test_config_validation():
    with pytest.raises(ValueError, match="max_sample_length"):
        PackingConfig(seq_length=8, max_sample_length=9)
    with pytest.raises(ValueError, match="overlong_policy"):
        PackingConfig(overlong_policy="ignore")
    assert PackingConfig(seq_length=8, max_sample_length=None).cap == 8


# ------------------------------------------------------------------------------------------ FFD oracle
def _ffd_oracle(lengths, seq_length):
    """Textbook first-fit decreasing, one item at a time: list of packs (lists of item indices)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # Python's sort is stable
    packs, room = [], []
    for i in order:
        for b in range(len(packs)):
            if room[b] >= lengths[i]:
                packs[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(seq_length - lengths[i])
    return packs


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 30), min_size=1, max_size=60), st.integers(30, 70))
def test_plan_equals_first_fit_decreasing_oracle(lengths, seq_length):
    plan = plan_packs(np.array(lengths), PackingConfig(seq_length=seq_length, max_sample_length=30, shuffle=False,
                                                       window=10_000))
    got = [sorted(plan.chunk_doc[plan.pack_slice(p)].tolist()) for p in range(len(plan))]
    assert got == [sorted(p) for p in _ffd_oracle(lengths, seq_length)]


# ------------------------------------------------------------------------------------------ invariants
@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.integers(0, 120), min_size=0, max_size=200),
    st.sampled_from(["split", "truncate", "drop"]),
    st.integers(1, 50),
    st.integers(0, 3),
)
@example([0, 41], "split", 1, 0)  # as many chunks as documents, yet one empty and one split (found by hypothesis)
def test_plan_invariants(lengths, policy, window, seed):
    lengths = np.array(lengths, dtype=np.int64)
    cfg = PackingConfig(seq_length=64, max_sample_length=40, overlong_policy=policy, window=window, seed=seed)
    plan = plan_packs(lengths, cfg)
    s = plan.stats
    # Every pack fits and is non-empty; every chunk is in exactly one pack (CSR offsets partition the chunks).
    sums = np.add.reduceat(plan.chunk_length, plan.pack_offsets[:-1]) if len(plan) else np.array([])
    assert np.all(sums <= 64) and np.all(np.diff(plan.pack_offsets) > 0)
    assert plan.pack_offsets[0] == 0 and plan.pack_offsets[-1] == plan.chunk_doc.size == s.chunks
    # Per document: chunks tile [0, kept length) exactly once, each at most the cap.
    assert np.all(plan.chunk_length >= 1) and np.all(plan.chunk_length <= 40)
    for d, length in enumerate(lengths):
        mine = np.flatnonzero(plan.chunk_doc == d)
        starts, lens = plan.chunk_start[mine], plan.chunk_length[mine]
        order = np.argsort(starts)
        covered = np.concatenate([np.arange(a, a + n) for a, n in zip(starts[order], lens[order])]) \
            if mine.size else np.array([], dtype=np.int64)
        if length == 0 or (policy == "drop" and length > 40):
            assert mine.size == 0
        elif policy == "truncate":
            assert covered.tolist() == list(range(min(length, 40)))
        else:
            assert covered.tolist() == list(range(length))
        if policy != "split":
            assert mine.size <= 1  # a kept document is one chunk, never split across packs
    # Nothing disappears without being counted.
    assert s.packed_tokens + s.truncated_tokens + s.dropped_tokens == s.input_tokens == lengths.sum()
    assert s.documents == lengths.size and s.empty_documents == int((lengths == 0).sum())
    assert s.packs >= math.ceil(s.packed_tokens / 64)
    assert s.fill_rate == (s.packed_tokens / (s.packs * 64) if s.packs else 0.0)


def test_plan_is_deterministic_given_seed():
    lengths = np.random.default_rng(0).integers(1, 500, 3000)
    cfg = PackingConfig(seq_length=2048, max_sample_length=512, window=700)
    a, b = plan_packs(lengths, cfg), plan_packs(lengths, cfg)
    c = plan_packs(lengths, PackingConfig(seq_length=2048, max_sample_length=512, window=700, seed=1))
    for name in ("chunk_doc", "chunk_start", "chunk_length", "pack_offsets"):
        assert np.array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.chunk_doc, c.chunk_doc)


def test_fill_rate_on_realistic_mix():
    """100–4K-token samples (log-uniform) plus 2% over the 4K cap, packed at 48K: fill >= 99%."""
    rng = np.random.default_rng(0)
    lengths = np.exp(rng.uniform(np.log(100), np.log(4096), 20_000)).astype(np.int64)
    lengths[rng.random(lengths.size) < 0.02] = rng.integers(4097, 20_000)
    plan = plan_packs(lengths, PackingConfig(seq_length=49152, max_sample_length=4096, window=5000))
    s = plan.stats
    assert s.fill_rate >= 0.99, s
    assert s.split_documents > 0 and s.packed_tokens == s.input_tokens
    assert s.packs <= math.ceil(s.input_tokens / 49152) + 1  # at most one pack more than the token-count bound


# ------------------------------------------------------------------------------------------ the dataset
def test_packed_dataset_reconstructs_every_document(tmp_path):
    """Write documents, pack them (with splits), then rebuild every document from the packs: nothing lost or moved."""
    rng = np.random.default_rng(3)
    docs = [rng.integers(1, 1000, n) for n in rng.integers(1, 90, 120)]
    masks = [rng.integers(0, 2, d.size) for d in docs]
    prefix = str(tmp_path / "c")
    with IndexedPairWriter(prefix) as w:
        for d, m in zip(docs, masks):
            w.add(d, m)
    pair = IndexedPair.open(prefix)
    blend = blend_documents([pair.lengths], [1.0], ["c"])
    plan = plan_packs(blend.lengths, PackingConfig(seq_length=128, max_sample_length=48, window=50))
    ds = PackedDataset([pair], blend, plan, pad_id=PAD)
    pieces = {}
    for i in range(len(ds)):
        item = ds[i]
        tokens, loss, cu = item["tokens"].numpy(), item["loss_mask"].numpy(), item["cu_seqlens"].numpy()
        chunk_ids = range(ds.plan.pack_slice(i).start, ds.plan.pack_slice(i).stop)
        assert tokens.shape == (128,) and item["num_documents"] == len(chunk_ids)
        for c, (a, b) in zip(chunk_ids, zip(cu[:-1], cu[1:])):
            doc = int(blend.doc_of[plan.chunk_doc[c]])
            start = int(plan.chunk_start[c])
            assert np.all(item["position_ids"].numpy()[a:b] == np.arange(b - a))
            # Loss at t iff t+1 is in this chunk and is a target of the original document.
            want_loss = np.append(masks[doc][start + 1:start + (b - a)], 0)
            assert np.array_equal(loss[a:b], want_loss)
            pieces.setdefault(doc, []).append((start, tokens[a:b]))
    assert sorted(pieces) == list(range(len(docs)))
    for doc, parts in pieces.items():
        rebuilt = np.concatenate([t for _, t in sorted(parts, key=lambda p: p[0])])
        assert np.array_equal(rebuilt, docs[doc])
    assert ds.stats()["packing"]["fill_rate"] == plan.stats.fill_rate
