"""RQ-KMeans training/encoding and the chunked embedding readers, against float64 brute-force oracles."""
import faiss
import numpy as np
import pytest

from megatron_onereason.data.synthetic_catalog import make_synthetic_catalog
from megatron_onereason.tokenizer.embedding_io import (
    ArrayEmbeddings,
    NpyEmbeddings,
    open_embeddings,
    read_item_ids,
)
from megatron_onereason.tokenizer.rq_kmeans import (
    RQCodebooks,
    RQKMeansConfig,
    code_usage,
    sample_training_rows,
    train_rq_kmeans,
)

faiss.omp_set_num_threads(1)  # tiny problems: threads only add contention on the shared CI cores


@pytest.fixture(scope="module")
def synthetic():
    return make_synthetic_catalog(items_per_domain=60, dim=16, seed=3)


@pytest.fixture(scope="module")
def codebooks(synthetic):
    return train_rq_kmeans(synthetic.embeddings, RQKMeansConfig(levels=3, codebook_size=8, seed=5, niter=10))


def brute_force_encode(centroids, x):
    """Oracle: nearest centroid per level in float64 on explicit residuals; also residual mse per level."""
    residual = x.astype(np.float64)
    codes, mse = [], []
    for c in centroids:
        c = c.astype(np.float64)
        dist = ((residual[:, None, :] - c[None, :, :]) ** 2).sum(-1)
        nearest = dist.argmin(1)
        residual = residual - c[nearest]
        codes.append(nearest)
        mse.append((residual ** 2).sum(1).mean())
    return np.stack(codes, 1), np.array(mse)


def test_encode_matches_brute_force_and_residual_error_decreases(synthetic, codebooks):
    x = synthetic.embeddings
    codes, sq_error = codebooks.encode(x)
    want_codes, want_mse = brute_force_encode(codebooks.centroids, x)
    np.testing.assert_array_equal(codes, want_codes)
    np.testing.assert_allclose(sq_error.mean(0), want_mse, rtol=1e-4)
    total = (x.astype(np.float64) ** 2).sum(1).mean()
    assert total > want_mse[0] > want_mse[1] > want_mse[2]
    # reconstruct is the sum of chosen centroids: the residual norm left after the last level
    recon_err = ((x.astype(np.float64) - codebooks.reconstruct(codes)) ** 2).sum(1).mean()
    assert recon_err == pytest.approx(want_mse[2], rel=1e-4)


def test_encode_is_chunk_independent(synthetic, codebooks):
    x = synthetic.embeddings
    whole, _ = codebooks.encode(x)
    pieces = np.concatenate([codebooks.encode(x[i:i + 7])[0] for i in range(0, len(x), 7)])
    np.testing.assert_array_equal(whole, pieces)


def test_training_is_deterministic_given_seed(synthetic):
    cfg = RQKMeansConfig(levels=2, codebook_size=8, seed=11, niter=5)
    a = train_rq_kmeans(synthetic.embeddings, cfg)
    b = train_rq_kmeans(synthetic.embeddings, cfg)
    c = train_rq_kmeans(synthetic.embeddings, RQKMeansConfig(levels=2, codebook_size=8, seed=12, niter=5))
    for la, lb in zip(a.centroids, b.centroids):
        np.testing.assert_array_equal(la, lb)
    assert not np.array_equal(a.centroids[0], c.centroids[0])


def test_training_sample_is_the_seeded_subset(tmp_path, synthetic):
    path = tmp_path / "e.npy"
    np.save(path, synthetic.embeddings)
    cfg = RQKMeansConfig(codebook_size=8, train_sample_size=50, seed=9, chunk_size=16)
    rows = np.sort(np.random.default_rng(9).choice(len(synthetic.embeddings), 50, replace=False))
    np.testing.assert_array_equal(sample_training_rows(NpyEmbeddings(str(path)), cfg), synthetic.embeddings[rows])


def test_codebook_larger_than_training_items_is_an_error(tmp_path, synthetic):
    path = tmp_path / "small.npy"
    np.save(path, synthetic.embeddings[:10])
    with pytest.raises(ValueError, match=r"small\.npy: codebook size 16 is larger than the 10 training items"):
        sample_training_rows(NpyEmbeddings(str(path)), RQKMeansConfig(codebook_size=16))


def test_nonfinite_training_rows_are_counted(tmp_path, synthetic):
    x = synthetic.embeddings.copy()
    x[[3, 40]] = np.nan
    x[7, 2] = np.inf
    path = tmp_path / "bad.npy"
    np.save(path, x)
    message = r"bad\.npy: 3 of 240 sampled training rows contain NaN or inf \(first at rows \[3, 7, 40\]"
    with pytest.raises(ValueError, match=message):
        sample_training_rows(NpyEmbeddings(str(path)), RQKMeansConfig(codebook_size=8, train_sample_size=0))


def test_codebooks_save_load_roundtrip(tmp_path, codebooks, synthetic):
    path = str(tmp_path / "cb.safetensors")
    codebooks.save(path)
    loaded = RQCodebooks.load(path)
    assert (loaded.levels, loaded.codebook_size, loaded.dim) == (3, 8, 16)
    np.testing.assert_array_equal(loaded.encode(synthetic.embeddings)[0], codebooks.encode(synthetic.embeddings)[0])


def test_code_usage_hand_computed():
    codes = np.array([[0, 1], [0, 1], [2, 1], [3, 0]])
    level_a, level_b = code_usage(codes, 4)
    assert level_a["codes_used"] == 3 and level_a["utilization"] == 0.75
    p = np.array([0.5, 0.25, 0.25])
    assert level_a["perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()))
    assert level_b["codes_used"] == 2
    assert level_b["perplexity"] == pytest.approx(np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25))))


def test_readers_agree_across_formats(tmp_path):
    import torch
    from safetensors.torch import save_file

    x = np.random.default_rng(0).standard_normal((37, 6)).astype(np.float16)
    np.save(tmp_path / "e.npy", x)
    save_file({"emb": torch.from_numpy(x), "other": torch.zeros(2)}, str(tmp_path / "e.safetensors"))
    save_file({"emb": torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)}, str(tmp_path / "bf.safetensors"))
    rows = np.array([0, 1, 5, 20, 21, 36])
    sources = [open_embeddings(str(tmp_path / "e.npy")), open_embeddings(str(tmp_path / "e.safetensors"), "emb"),
               ArrayEmbeddings(x)]
    zarr = pytest.importorskip("zarr")
    z = zarr.open(str(tmp_path / "e.zarr"), mode="w", shape=x.shape, chunks=(8, 6), dtype="float16")
    z[:] = x
    sources.append(open_embeddings(str(tmp_path / "e.zarr")))
    for src in sources:
        assert (src.num_items, src.dim) == (37, 6)
        np.testing.assert_array_equal(src.read(3, 11), x[3:11].astype(np.float32))
        np.testing.assert_array_equal(src.take(rows, span_rows=4), x[rows].astype(np.float32))
    bf = open_embeddings(str(tmp_path / "bf.safetensors"))
    want = torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(bf.read(0, 37), want)
    with pytest.raises(ValueError, match=r"e\.safetensors: holds 2 tensors"):
        open_embeddings(str(tmp_path / "e.safetensors"))
    np.save(tmp_path / "ints.npy", np.zeros((3, 2), np.int32))
    with pytest.raises(ValueError, match=r"ints\.npy: embeddings must be floating point"):
        open_embeddings(str(tmp_path / "ints.npy"))


def test_item_id_readers_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "ids.txt").write_text("x1\nx2\nx3\n")
    assert read_item_ids(str(tmp_path / "ids.txt")).ids == ["x1", "x2", "x3"]
    np.save(tmp_path / "ids.npy", np.array([10, 11, 12]))
    assert read_item_ids(str(tmp_path / "ids.npy")).ids == ["10", "11", "12"]
    pq.write_table(pa.table({"item_id": ["p", "q"], "domain": ["prod", "video"]}), tmp_path / "ids.parquet")
    got = read_item_ids(str(tmp_path / "ids.parquet"), domain_column="domain")
    assert (got.ids, got.domains) == (["p", "q"], ["prod", "video"])

    (tmp_path / "dup.txt").write_text("a\nb\na\nc\nb\n")
    with pytest.raises(ValueError, match=r"dup\.txt: 2 item ids occur more than once"):
        read_item_ids(str(tmp_path / "dup.txt"))
    pq.write_table(pa.table({"item_id": ["p", "q", "r"], "domain": ["prod", "Shop", "Shop"]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: 2 items have a domain that is not a lower-case identifier, "
                                         r"e\.g\. \['Shop'\]"):
        read_item_ids(str(tmp_path / "bad.parquet"), domain_column="domain")
    with pytest.raises(ValueError, match=r"ids\.parquet: missing column\(s\) \['dom'\]"):
        read_item_ids(str(tmp_path / "ids.parquet"), domain_column="dom")
