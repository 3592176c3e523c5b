"""The synthetic catalog: deterministic, clustered, captions tied to clusters, save/load and CLI."""
import os
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from megatron_onereason.data.synthetic_catalog import STYLES, TOPICS, SyntheticCatalog, make_synthetic_catalog

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_shapes_ids_and_determinism():
    cat = make_synthetic_catalog(items_per_domain=30, dim=12, domains=("video", "ad"), clusters_per_domain=3, seed=2)
    assert cat.embeddings.shape == (60, 12) and cat.embeddings.dtype == np.float32
    assert len(set(cat.item_ids)) == 60 and cat.item_ids[0] == "video_000000" and cat.item_ids[-1] == "ad_000029"
    assert cat.domains == ["video"] * 30 + ["ad"] * 30
    assert sorted(set(cat.clusters.tolist())) == list(range(6))
    again = make_synthetic_catalog(items_per_domain=30, dim=12, domains=("video", "ad"), clusters_per_domain=3, seed=2)
    np.testing.assert_array_equal(cat.embeddings, again.embeddings)
    assert cat.captions == again.captions
    other = make_synthetic_catalog(items_per_domain=30, dim=12, domains=("video", "ad"), clusters_per_domain=3, seed=3)
    assert not np.array_equal(cat.embeddings, other.embeddings)
    with pytest.raises(ValueError, match="domains must be distinct names"):
        make_synthetic_catalog(domains=("video", "shop"))


def test_captions_name_the_cluster_topics_and_embeddings_cluster():
    cat = make_synthetic_catalog(items_per_domain=80, dim=32, seed=0)
    topics_of = {}
    for caption, cluster, domain in zip(cat.captions, cat.clusters.tolist(), cat.domains):
        words = caption.split()
        assert words[0] in STYLES and words[-3] in TOPICS and words[-1] in TOPICS and words[-2] == "and"
        topics_of.setdefault(cluster, set()).add((words[-3], words[-1]))
    assert all(len(t) == 1 for t in topics_of.values())  # one topic pair per cluster
    # nearest cluster mean (brute force, float64) recovers almost every item's cluster
    x = cat.embeddings.astype(np.float64)
    means = np.stack([x[cat.clusters == k].mean(0) for k in range(cat.clusters.max() + 1)])
    nearest = ((x[:, None, :] - means[None]) ** 2).sum(-1).argmin(1)
    assert (nearest == cat.clusters).mean() > 0.9


def test_save_load_roundtrip_and_cli(tmp_path):
    cat = make_synthetic_catalog(items_per_domain=10, dim=8, seed=1)
    cat.save(str(tmp_path / "syn"))
    assert sorted(os.listdir(tmp_path / "syn")) == ["embeddings.npy", "ids.txt", "items.parquet"]
    assert pq.read_table(tmp_path / "syn" / "items.parquet").column_names == ["item_id", "domain", "caption", "cluster"]
    assert (tmp_path / "syn" / "ids.txt").read_text().splitlines() == cat.item_ids
    loaded = SyntheticCatalog.load(str(tmp_path / "syn"))
    np.testing.assert_array_equal(loaded.embeddings, cat.embeddings)
    np.testing.assert_array_equal(loaded.clusters, cat.clusters)
    assert (loaded.item_ids, loaded.domains, loaded.captions) == (cat.item_ids, cat.domains, cat.captions)
    with pytest.raises(FileExistsError):
        cat.save(str(tmp_path / "syn"))

    cmd = [sys.executable, os.path.join(REPO, "tools", "make_synthetic_catalog.py"), "--out", str(tmp_path / "cli"),
           "--items-per-domain", "10", "--dim", "8", "--seed", "1"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "cli" / "embeddings.npy"), cat.embeddings)
