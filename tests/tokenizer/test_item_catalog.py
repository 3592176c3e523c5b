"""Collision resolution (against a brute-force oracle), catalog build/load/extend, text helpers, bad input."""
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys

import faiss
import numpy as np
import pyarrow.parquet as pq
import pytest

from megatron_onereason.data.synthetic_catalog import make_synthetic_catalog
from megatron_onereason.tokenizer.catalog_builder import (
    CatalogInputs,
    assign_items,
    build_itemic_tokenizer,
    extend_itemic_tokenizer,
    load_codebooks,
)
from megatron_onereason.tokenizer.code_collisions import resolve_collisions
from megatron_onereason.tokenizer.code_keys import pack_codes, unpack_keys
from megatron_onereason.tokenizer.embedding_io import ArrayEmbeddings
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, UnknownItemError
from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, preset
from megatron_onereason.tokenizer.rq_kmeans import RQCodebooks, RQKMeansConfig

faiss.omp_set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------- collision resolution
def oracle_resolve(x, centroids, raw):
    """Straight from the rule, in float64 with explicit loops over all code tuples (3 levels).

    First holders of each raw tuple keep it; each later item, in input order, takes the free tuple under its own
    (a, b) with the smallest reconstruction error; if (a, b) is full, the b' (then a') nearest to its residual
    among those with room, completed the same way.
    """
    x = x.astype(np.float64)
    c0, c1, c2 = (c.astype(np.float64) for c in centroids)
    k = len(c0)
    used = set()
    first = []
    for i, t in enumerate(map(tuple, raw)):
        if t not in used:
            used.add(t)
            first.append(i)
    out = raw.copy()

    def free_count(prefix):
        return sum(1 for t in itertools.product(range(k), repeat=3 - len(prefix)) if prefix + t not in used)

    def best_c(xi, a, b):
        free = [c for c in range(k) if (a, b, c) not in used]
        return min(free, key=lambda c: ((xi - c0[a] - c1[b] - c2[c]) ** 2).sum())

    def best_b(xi, a):
        room = [b for b in range(k) if free_count((a, b))]
        return min(room, key=lambda b: ((xi - c0[a] - c1[b]) ** 2).sum())

    for i in range(len(raw)):
        if i in first:
            continue
        a, b, _ = map(int, raw[i])
        if free_count((a, b)):
            t = (a, b, best_c(x[i], a, b))
        elif free_count((a,)):
            b = best_b(x[i], a)
            t = (a, b, best_c(x[i], a, b))
        else:
            a = min((a2 for a2 in range(k) if free_count((a2,))), key=lambda a2: ((x[i] - c0[a2]) ** 2).sum())
            b = best_b(x[i], a)
            t = (a, b, best_c(x[i], a, b))
        used.add(t)
        out[i] = t
    return out


def test_resolution_matches_oracle_on_crowded_codes():
    rng = np.random.default_rng(1)
    codebooks = RQCodebooks([rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3)])
    base = rng.standard_normal((5, 4))
    x = (np.repeat(base, 5, axis=0) + 1e-3 * rng.standard_normal((25, 4))).astype(np.float32)
    x = x[rng.permutation(25)]
    raw, _ = codebooks.encode(x)
    codes, report = resolve_collisions(raw, codebooks, lambda rows: x[rows], chunk_size=4)
    np.testing.assert_array_equal(codes, oracle_resolve(x, codebooks.centroids, raw))
    assert len(np.unique(pack_codes(codes, 3))) == 25
    moved = (codes != raw).any(1)
    assert report.moved == moved.sum() == 25 - len(np.unique(pack_codes(raw, 3)))
    # the crowded case exercises every fallback: last level, next-nearest b, next-nearest a
    assert min(report.moved_by_first_changed_level) > 0 and sum(report.moved_by_first_changed_level) == report.moved
    extra = (np.linalg.norm(x - codebooks.reconstruct(codes), axis=1)
             - np.linalg.norm(x - codebooks.reconstruct(raw), axis=1))[moved]
    assert report.mean_extra_distance == pytest.approx(extra.mean(), rel=1e-5)


def test_keeps_first_level_code_until_its_subtree_is_full():
    codebooks = RQCodebooks([
        np.array([[0, 0], [10, 0]], np.float32),
        np.array([[0, 0], [0, 1]], np.float32),
        np.array([[0, 0], [0.1, 0.1]], np.float32),
    ])
    x = np.tile(np.array([[0.2, 0.3]], np.float32), (5, 1))
    raw, _ = codebooks.encode(x)
    assert raw.tolist() == [[0, 0, 1]] * 5
    codes, report = resolve_collisions(raw, codebooks, lambda rows: x[rows])
    # hand-worked: free c under (0,0); then b=1 with its nearest c; then c=1; a-subtree full -> a=1, nearest b, c
    assert codes.tolist() == [[0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 1, 1], [1, 0, 0]]
    assert report.moved == 4 and report.moved_by_first_changed_level == [1, 2, 1]
    want_extra = [np.sqrt(0.13) - np.sqrt(0.05), np.sqrt(0.04 + 0.49) - np.sqrt(0.05),
                  np.sqrt(0.01 + 0.64) - np.sqrt(0.05), np.sqrt(9.8 ** 2 + 0.09) - np.sqrt(0.05)]
    assert report.mean_extra_distance == pytest.approx(np.mean(want_extra), rel=1e-5)
    assert report.max_extra_distance == pytest.approx(max(want_extra), rel=1e-5)


def test_large_codebook_beyond_the_precomputed_candidates():
    """K=70 > the 64 precomputed nearest codes: filling a prefix must fall back to the full order, then climb."""
    rng = np.random.default_rng(2)
    codebooks = RQCodebooks([rng.standard_normal((70, 3)).astype(np.float32) for _ in range(2)])
    x = np.tile(rng.standard_normal((1, 3)).astype(np.float32), (75, 1))
    raw, _ = codebooks.encode(x)
    codes, report = resolve_collisions(raw, codebooks, lambda rows: x[rows], chunk_size=16)
    # oracle, in float64: each later item takes the free code with the smallest reconstruction error under its
    # first-level code; once those 70 are taken, the nearest other first-level code with room
    c0, c1 = (c.astype(np.float64) for c in codebooks.centroids)
    xi = x[0].astype(np.float64)
    used, want = {tuple(raw[0])}, [tuple(raw[0])]
    for _ in range(74):
        a = int(raw[0, 0])
        if all((a, c) in used for c in range(70)):
            a = min((a2 for a2 in range(70) if a2 != a), key=lambda a2: ((xi - c0[a2]) ** 2).sum())
        c = min((c for c in range(70) if (a, c) not in used), key=lambda c: ((xi - c0[a] - c1[c]) ** 2).sum())
        used.add((a, c))
        want.append((a, c))
    assert list(map(tuple, codes.tolist())) == want
    assert report.moved_by_first_changed_level == [5, 69]


def test_existing_catalog_items_count_as_earlier_and_capacity_is_checked():
    codebooks = RQCodebooks([np.eye(2, dtype=np.float32) * s for s in (4, 2, 1)])
    x = np.array([[4.0, 0.0], [0.0, 4.0]], np.float32)
    raw, _ = codebooks.encode(x)
    occupied = pack_codes(raw[:1], 2)
    codes, report = resolve_collisions(raw, codebooks, lambda rows: x[rows], occupied_keys=occupied)
    assert report.moved == 1 and codes[1].tolist() == raw[1].tolist() and codes[0].tolist() != raw[0].tolist()
    with pytest.raises(ValueError, match=r"9 items \(\+0 already in the catalog\) exceed the 8 distinct codes"):
        resolve_collisions(np.zeros((9, 3), np.int32), codebooks, lambda rows: None)


def test_pack_unpack_roundtrip():
    codes = np.array([[0, 0, 0], [8191, 8191, 8191], [5028, 6733, 2559]])
    keys = pack_codes(codes, 8192)
    assert keys[2] == (5028 * 8192 + 6733) * 8192 + 2559
    np.testing.assert_array_equal(unpack_keys(keys, 3, 8192), codes)


# ---------------------------------------------------------------- build / load / extend
@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    syn = make_synthetic_catalog(items_per_domain=50, dim=16, seed=7)
    d = tmp_path_factory.mktemp("syn")
    syn.save(str(d / "syn"))
    return syn, str(d / "syn")


CONFIG = RQKMeansConfig(levels=3, codebook_size=8, seed=0, niter=10, chunk_size=64)


@pytest.fixture(scope="module")
def built(synthetic, tmp_path_factory):
    syn, syn_dir = synthetic
    out = str(tmp_path_factory.mktemp("tok") / "tok")
    inputs = CatalogInputs(os.path.join(syn_dir, "embeddings.npy"), os.path.join(syn_dir, "items.parquet"),
                           domain_column="domain")
    return build_itemic_tokenizer(inputs, CONFIG, out), out, inputs


def test_build_writes_a_unique_loadable_catalog(synthetic, built):
    syn, syn_dir = synthetic
    result, out, _ = built
    assert sorted(os.listdir(out)) == ["catalog.parquet", "codebooks.safetensors", "codes_to_item.parquet",
                                       "manifest.json"]
    table = pq.read_table(os.path.join(out, "catalog.parquet"))
    assert table.column_names == ["item_id", "domain", "a", "b", "c"]
    assert table.column("item_id").to_pylist() == syn.item_ids and table.column("domain").to_pylist() == syn.domains
    cat = ItemCatalog.load(out)
    codes = cat.codes
    assert len(set(map(tuple, codes.tolist()))) == len(syn.item_ids) == 200
    np.testing.assert_array_equal(codes, result.catalog.codes)

    reverse = pq.read_table(os.path.join(out, "codes_to_item.parquet")).to_pylist()
    assert [(r["a"], r["b"], r["c"]) for r in reverse] == sorted(map(tuple, codes.tolist()))
    for r in reverse:
        assert cat.item_id_for(r["domain"], (r["a"], r["b"], r["c"])) == r["item_id"]
        assert cat.codes_for(r["item_id"]) == (r["a"], r["b"], r["c"])

    # non-moved items keep their raw codes; moved items keep their first-level code (capacity allows here)
    raw, _ = load_codebooks(out).encode(syn.embeddings)
    moved = (raw != codes).any(1)
    stats = result.manifest["statistics"]
    assert stats["collisions"]["moved"] == moved.sum() == 200 - stats["unique_raw_code_tuples"] > 0
    np.testing.assert_array_equal(codes[:, 0], raw[:, 0])


def test_manifest_records_sizes_checksums_and_decreasing_error(synthetic, built):
    syn, syn_dir = synthetic
    result, out, _ = built
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest == result.manifest
    assert (manifest["levels"], manifest["codebook_size"], manifest["dim"], manifest["num_items"]) == (3, 8, 16, 200)
    assert manifest["training"]["seed"] == 0 and manifest["training"]["train_sample_size"] == 200
    assert manifest["items_per_domain"] == {"ad": 50, "living": 50, "prod": 50, "video": 50}
    emb = manifest["inputs"]["embeddings"]
    assert emb["sha256_float32"] == hashlib.sha256(syn.embeddings.astype("<f4").tobytes()).hexdigest()
    with open(os.path.join(syn_dir, "items.parquet"), "rb") as f:
        assert manifest["inputs"]["ids"]["sha256"] == hashlib.sha256(f.read()).hexdigest()
    levels = manifest["statistics"]["levels"]
    rel = [lvl["relative_residual"] for lvl in levels]
    assert 1 > rel[0] > rel[1] > rel[2] > 0
    x = syn.embeddings.astype(np.float64)
    raw, _ = result.codebooks.encode(syn.embeddings)
    recon = np.zeros_like(x)
    for lvl, c in enumerate(result.codebooks.centroids):
        recon += c[raw[:, lvl]]
        assert levels[lvl]["residual_mse"] == pytest.approx(((x - recon) ** 2).sum(1).mean(), rel=1e-4)
        assert levels[lvl]["codes_used"] == len(np.unique(result.catalog.codes[:, lvl]))


def test_reencoding_training_items_reproduces_the_catalog(synthetic, built):
    syn, _ = synthetic
    _, out, _ = built
    again = assign_items(load_codebooks(out), ArrayEmbeddings(syn.embeddings), syn.item_ids, syn.domains,
                         chunk_size=33)
    np.testing.assert_array_equal(again.catalog.codes, ItemCatalog.load(out).codes)


def test_build_is_deterministic(built, tmp_path):
    result, out, inputs = built
    second = build_itemic_tokenizer(inputs, CONFIG, str(tmp_path / "again"))
    assert second.manifest == result.manifest
    for name in ("catalog.parquet", "codes_to_item.parquet"):
        assert pq.read_table(tmp_path / "again" / name).equals(pq.read_table(os.path.join(out, name)))


def test_extend_adds_items_without_moving_existing_ones(synthetic, tmp_path):
    syn, _ = synthetic
    np.save(tmp_path / "base.npy", syn.embeddings[:150])
    (tmp_path / "base.txt").write_text("\n".join(syn.item_ids[:150]))
    np.save(tmp_path / "new.npy", syn.embeddings[150:])
    (tmp_path / "new.txt").write_text("\n".join(syn.item_ids[150:]))
    base = build_itemic_tokenizer(CatalogInputs(str(tmp_path / "base.npy"), str(tmp_path / "base.txt"), "video"),
                                  CONFIG, str(tmp_path / "base"))
    ext = extend_itemic_tokenizer(CatalogInputs(str(tmp_path / "new.npy"), str(tmp_path / "new.txt"), "prod"),
                                  str(tmp_path / "base"), str(tmp_path / "ext"))
    cat = ItemCatalog.load(str(tmp_path / "ext"))
    assert cat.item_ids == syn.item_ids and cat.domains == ["video"] * 150 + ["prod"] * 50
    np.testing.assert_array_equal(cat.codes[:150], base.catalog.codes)
    assert len(set(map(tuple, cat.codes.tolist()))) == 200
    # oracle: resolve the new items' raw codes with the base tuples counted as taken
    raw, _ = base.codebooks.encode(syn.embeddings[150:])
    want, _ = resolve_collisions(raw, base.codebooks, lambda rows: syn.embeddings[150:][rows],
                                 occupied_keys=np.sort(pack_codes(base.catalog.codes, 8)))
    np.testing.assert_array_equal(cat.codes[150:], want)
    assert ext.manifest["training"]["base_items"] == 150
    with pytest.raises(ValueError, match="50 new item ids are already in the catalog"):
        extend_itemic_tokenizer(CatalogInputs(str(tmp_path / "new.npy"), str(tmp_path / "new.txt"), "prod"),
                                str(tmp_path / "ext"), str(tmp_path / "ext2"))


# ---------------------------------------------------------------- text helpers
def test_itemic_text_to_item_id_and_back(built):
    _, out, _ = built
    cat = ItemCatalog.load(out)
    report, openonerec = preset("onereason_report"), preset("openonerec")
    for item_id in cat.item_ids[::17]:
        text = cat.item_text(item_id, report)
        assert text == "<|%s_begin|><a_%d><b_%d><c_%d>" % ((cat.domain_for(item_id),) + cat.codes_for(item_id))
        assert cat.item_id_from_text(text, report) == item_id
        sid = cat.item_text(item_id, openonerec)
        assert sid == "<|sid_begin|><s_a_%d><s_b_%d><s_c_%d><|sid_end|>" % cat.codes_for(item_id)
        assert cat.item_id_from_text(sid, openonerec) == item_id  # the codes alone name the item
    a, b = cat.item_ids[0], cat.item_ids[-1]
    sentence = f"bought {cat.item_text(a, report)} then watched {cat.item_text(b, report)}."
    spans = cat.item_ids_in_text(sentence, report)
    assert [s[2] for s in spans] == [a, b] and sentence[spans[0][0]:spans[0][1]] == cat.item_text(a, report)

    for bad in ["<|prod_begin|><a_1><c_2><c_3>", "<|prod_begin|><a_1><b_2>", "<|shop_begin|><a_1><b_2><c_3>",
                "<|prod_begin|><a_1><b_2><c_3> tail"]:
        with pytest.raises(ItemicPatternError):
            cat.item_id_from_text(bad, report)
    used = set(map(tuple, cat.codes.tolist()))
    free = next(t for t in itertools.product(range(8), repeat=3) if t not in used)
    with pytest.raises(UnknownItemError, match="no catalog item has codes"):
        cat.item_id_for("video", free)
    video_item = cat.item_ids[cat.domains.index("video")]
    with pytest.raises(UnknownItemError, match="of domain 'video', not 'prod'"):
        cat.item_id_for("prod", cat.codes_for(video_item))
    with pytest.raises(UnknownItemError, match="'nope' is not in the catalog"):
        cat.codes_for("nope")


# ---------------------------------------------------------------- bad input
def _no_leftovers(tmp_path, name):
    """Neither the output dir nor a temp dir beside it survived the failure."""
    return not any(name in p.name for p in tmp_path.iterdir())


def test_bad_inputs_fail_with_file_and_count(synthetic, tmp_path):
    syn, syn_dir = synthetic
    emb = os.path.join(syn_dir, "embeddings.npy")
    ids = os.path.join(syn_dir, "items.parquet")
    cases = []
    x = syn.embeddings.copy()
    x[[5, 90]] = np.nan
    x[120, 0] = -np.inf
    np.save(tmp_path / "nan.npy", x)
    cases.append((CatalogInputs(str(tmp_path / "nan.npy"), ids, domain_column="domain"), CONFIG,
                  r"nan\.npy: 3 of 200 sampled training rows contain NaN or inf \(first at rows \[5, 90, 120\]"))
    (tmp_path / "short.txt").write_text("\n".join(syn.item_ids[:199]))
    cases.append((CatalogInputs(emb, str(tmp_path / "short.txt"), "video"), CONFIG,
                  r"short\.txt has 199 item ids, .*embeddings\.npy has 200 embeddings"))
    (tmp_path / "dup.txt").write_text("\n".join(syn.item_ids[:197] + syn.item_ids[:3]))
    cases.append((CatalogInputs(emb, str(tmp_path / "dup.txt"), "video"), CONFIG,
                  r"dup\.txt: 3 item ids occur more than once"))
    cases.append((CatalogInputs(emb, ids, domain_column="domain"),
                  RQKMeansConfig(codebook_size=256), r"embeddings\.npy: codebook size 256 is larger than the 200"))
    cases.append((CatalogInputs(emb, ids, domain="Shop!"), CONFIG, r"domain 'Shop!' is not a lower-case identifier"))
    for inputs, config, message in cases:
        with pytest.raises(ValueError, match=message):
            build_itemic_tokenizer(inputs, config, str(tmp_path / "out"))
        assert _no_leftovers(tmp_path, "out")
    with pytest.raises(FileExistsError):
        build_itemic_tokenizer(CatalogInputs(emb, ids, domain_column="domain"), CONFIG, syn_dir)


def test_nonfinite_rows_outside_the_training_sample_are_counted(synthetic, tmp_path):
    syn, syn_dir = synthetic
    config = RQKMeansConfig(levels=3, codebook_size=8, seed=0, niter=10, train_sample_size=100, chunk_size=64)
    sampled = set(np.random.default_rng(0).choice(200, 100, replace=False).tolist())
    bad = [r for r in range(200) if r not in sampled][:3]
    x = syn.embeddings.copy()
    x[bad] = np.inf
    np.save(tmp_path / "late.npy", x)
    message = re.escape(f"late.npy: 3 of 200 rows contain NaN or inf (first at rows {bad})")
    with pytest.raises(ValueError, match=message):
        build_itemic_tokenizer(CatalogInputs(str(tmp_path / "late.npy"), os.path.join(syn_dir, "items.parquet"),
                                             domain_column="domain"), config, str(tmp_path / "out"))
    assert _no_leftovers(tmp_path, "out")


def test_cli_builds_all_domains_in_one_command(synthetic, tmp_path):
    _, syn_dir = synthetic
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(REPO, "tools", "build_itemic_tokenizer.py"),
           "--embeddings", os.path.join(syn_dir, "embeddings.npy"), "--ids", os.path.join(syn_dir, "items.parquet"),
           "--domain-column", "domain", "--codebook-size", "8", "--niter", "10", "--threads", "1", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "moved by collisions" in proc.stdout
    cat = ItemCatalog.load(str(out))
    assert len(cat) == 200 and sorted(set(cat.domains)) == ["ad", "living", "prod", "video"]
