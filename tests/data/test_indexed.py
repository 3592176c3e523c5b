"""The tokens/loss-mask IndexedDataset pair round-trips exactly through Megatron's own reader."""
import glob
import json
import os

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_onereason.data.indexed import IndexedPair, IndexedPairWriter, lossmask_prefix, tokens_prefix


def _random_docs(n, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 200_000, rng.integers(1, 300)) for _ in range(n)]  # ids above 65535: int32 needed
    masks = [rng.integers(0, 2, d.size) for d in docs]
    return docs, masks


def test_round_trip_through_megatron_reader(tmp_path):
    docs, masks = _random_docs(50)
    prefix = str(tmp_path / "sub" / "corpus")
    with IndexedPairWriter(prefix) as w:
        for d, m in zip(docs, masks):
            w.add(d, m)
    tokens = IndexedDataset(tokens_prefix(prefix))  # Megatron's reader, not ours
    lossmask = IndexedDataset(lossmask_prefix(prefix))
    assert len(tokens) == len(lossmask) == 50
    assert tokens.index.dtype == np.int32 and lossmask.index.dtype == np.uint8
    assert tokens.document_indices.tolist() == list(range(51))  # one document per sample
    assert tokens.sequence_lengths.tolist() == [d.size for d in docs] == lossmask.sequence_lengths.tolist()
    for i, (d, m) in enumerate(zip(docs, masks)):
        assert np.array_equal(tokens[i], d) and np.array_equal(lossmask[i], m)
    pair = IndexedPair.open(prefix)
    t, m = pair.read(7, start=2, length=5)
    assert np.array_equal(t, docs[7][2:7]) and np.array_equal(m, masks[7][2:7])
    assert np.array_equal(pair.lengths, [d.size for d in docs]) and len(pair) == 50
    assert sorted(p.rsplit("/", 1)[1] for p in glob.glob(prefix + "*")) == [
        "corpus_lossmask.bin", "corpus_lossmask.idx", "corpus_stats.json", "corpus_tokens.bin", "corpus_tokens.idx"]
    stats = json.load(open(prefix + "_stats.json"))
    assert stats["documents"] == 50
    assert stats["files"] == {os.path.basename(p): os.path.getsize(p) for p in glob.glob(prefix + "_*.[bi][id]*")}


def test_failure_leaves_nothing_behind(tmp_path):
    docs, masks = _random_docs(5)
    prefix = str(tmp_path / "corpus")
    with pytest.raises(RuntimeError):
        with IndexedPairWriter(prefix) as w:
            for d, m in zip(docs, masks):
                w.add(d, m)
            raise RuntimeError("boom")
    assert glob.glob(str(tmp_path / "*")) == []


def test_commit_writes_stats_and_renames(tmp_path):
    prefix = str(tmp_path / "c")
    w = IndexedPairWriter(prefix)
    w.add(np.array([1, 2]), np.array([0, 1]))
    assert not IndexedDataset.exists(tokens_prefix(prefix))  # still under temporary names
    w.commit({"samples": 1})
    stats = json.load(open(prefix + "_stats.json"))
    assert (stats["documents"], stats["samples"], len(stats["files"])) == (1, 1, 4)
    assert sorted(glob.glob(str(tmp_path / "*"))) == sorted(
        [prefix + s for s in ("_lossmask.bin", "_lossmask.idx", "_stats.json", "_tokens.bin", "_tokens.idx")])


@pytest.mark.parametrize("tokens, mask, match", [
    ([1, 2, 3], [0, 1], "equal-length"),
    ([], [], "non-empty"),
    ([1, -2], [0, 1], "token ids"),
    ([1, 2], [0, 2], "0 or 1"),
])
def test_writer_rejects_bad_documents(tmp_path, tokens, mask, match):
    with IndexedPairWriter(str(tmp_path / "c")) as w:
        with pytest.raises(ValueError, match=match):
            w.add(np.array(tokens, dtype=np.int64), np.array(mask, dtype=np.int64))
        w.add(np.array([1]), np.array([1]))


def test_open_checks_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess_data"):
        IndexedPair.open(str(tmp_path / "missing"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    for prefix, n in ((a, 3), (b, 4)):
        with IndexedPairWriter(prefix) as w:
            w.add(np.arange(n), np.ones(n))
    # Pair a's tokens with b's lossmask: lengths disagree.
    for ext in (".bin", ".idx"):
        (tmp_path / f"a_lossmask{ext}").write_bytes((tmp_path / f"b_lossmask{ext}").read_bytes())
    with pytest.raises(ValueError, match="different runs"):  # the stats file's recorded sizes catch it first
        IndexedPair.open(a)
