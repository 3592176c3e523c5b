"""Item tokenizer interop with OpenOneRec's artefacts: model.pt codebooks, parquet embeddings, given codes with
shared tuples. Oracles: a float64 numpy residual nearest-centroid encoder, and plain-Python groupings of the codes."""
import json
import os
import re
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from megatron_onereason.tokenizer.catalog_builder import (
    CatalogInputs,
    CodesInputs,
    build_itemic_tokenizer,
    catalog_from_codes,
    extend_itemic_tokenizer,
)
from megatron_onereason.tokenizer.embedding_io import open_embeddings
from megatron_onereason.tokenizer.item_catalog import ItemCatalog, SharedCodesError
from megatron_onereason.tokenizer.item_trie import ItemTrie
from megatron_onereason.tokenizer.itemic_tokens import preset
from megatron_onereason.tokenizer.rq_kmeans import RQCodebooks, RQKMeansConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LEVELS, K, DIM = 3, 8, 6


def encode_oracle(x, centroids):
    """Residual nearest-centroid codes in float64 (ties: lowest index), independent of faiss."""
    residual = np.asarray(x, np.float64).copy()
    codes = []
    for c in centroids:
        d = ((residual[:, None, :] - np.asarray(c, np.float64)[None]) ** 2).sum(-1)
        code = d.argmin(1)
        codes.append(code)
        residual -= c[code]
    return np.stack(codes, 1)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """OpenOneRec-style files: model.pt (their ResKmeans state dict), an embeddings parquet (pid, embedding) in
    several row groups, and a pid2sid parquet (pid, sid) whose codes come from that model (so tuples repeat)."""
    root = tmp_path_factory.mktemp("oor_tok")
    g = torch.Generator().manual_seed(0)
    centroids = [torch.randn(K, DIM, generator=g) * (0.5 ** level) for level in range(LEVELS)]
    torch.save({f"centroids.{i}": c for i, c in enumerate(centroids)}, root / "model.pt")
    torch.save({"model": {f"centroids.{i}": c for i, c in enumerate(centroids)}}, root / "nested.pt")
    x = np.random.default_rng(1).normal(size=(200, DIM)).astype(np.float32)
    pids = [1000 + 7 * i for i in range(200)]
    pq.write_table(pa.table({"pid": pids, "embedding": [row.tolist() for row in x]}), root / "emb.parquet",
                   row_group_size=37)
    codes = encode_oracle(x, [c.numpy() for c in centroids])
    pq.write_table(pa.table({"pid": pids, "sid": codes.tolist()}), root / "pid2sid.parquet")
    return {"root": root, "centroids": [c.numpy() for c in centroids], "x": x, "pids": [str(p) for p in pids],
            "codes": codes}


def test_model_pt_codebooks_load_and_encode_like_the_oracle(artefacts):
    root = artefacts["root"]
    for name in ("model.pt", "nested.pt"):
        books = RQCodebooks.load(str(root / name))
        assert books.levels == LEVELS and books.codebook_size == K and books.dim == DIM
        for got, want in zip(books.centroids, artefacts["centroids"]):
            assert np.array_equal(got, want)
    codes, _ = RQCodebooks.load(str(root / "model.pt")).encode(artefacts["x"])
    assert np.array_equal(codes, artefacts["codes"])


def test_bad_codebook_files_are_named(artefacts, tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state dict
    torch.save({"centroids.0": torch.zeros(K, DIM), "centroids.2": torch.zeros(K, DIM)}, tmp_path / "gap.pt")
    torch.save({"centroids.0": torch.zeros(K, DIM), "centroids.1": torch.zeros(K + 1, DIM)}, tmp_path / "shape.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    for name, match in [("module.pt", "not a readable state dict of codebooks"), ("gap.pt", "expected tensors"),
                        ("shape.pt", "share one"), ("junk.pt", "not a readable state dict")]:
        with pytest.raises(ValueError, match=f"{name}: .*{match}"):
            RQCodebooks.load(str(tmp_path / name))


def test_parquet_embeddings_read_by_row_group(artefacts, tmp_path):
    source = open_embeddings(str(artefacts["root"] / "emb.parquet"))
    assert (source.num_items, source.dim) == (200, DIM)
    for start, stop in [(0, 200), (30, 80), (36, 38), (199, 200)]:
        assert np.array_equal(source.read(start, stop), artefacts["x"][start:stop])
    rows = np.array([3, 40, 41, 150, 199])
    assert np.array_equal(source.take(rows), artefacts["x"][rows])
    pq.write_table(pa.table({"pid": [1, 2], "embedding": [[0.0, 1.0], [1.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(ValueError, match="ragged.parquet: field 'embedding': rows 0..2 hold null embeddings or"):
        open_embeddings(str(tmp_path / "ragged.parquet"))
    pq.write_table(pa.table({"pid": [1], "vec": [[1, 2]]}), tmp_path / "ints.parquet")
    with pytest.raises(ValueError, match="no embeddings column 'embedding'"):
        open_embeddings(str(tmp_path / "ints.parquet"))
    with pytest.raises(ValueError, match="field 'vec' must be a list of floats"):
        open_embeddings(str(tmp_path / "ints.parquet"), "vec")


def test_imported_codebooks_encode_new_items_without_training(artefacts, tmp_path):
    root = artefacts["root"]
    inputs = CatalogInputs(embeddings=str(root / "emb.parquet"), ids=str(root / "emb.parquet"), domain="video",
                           id_column="pid")
    result = build_itemic_tokenizer(inputs, RQKMeansConfig(codebook_size=K), str(tmp_path / "tok"),
                                    codebooks_path=str(root / "model.pt"))
    catalog, raw = result.catalog, artefacts["codes"]
    assert catalog.item_ids == artefacts["pids"] and not catalog.shared_codes
    first_holder = {}
    for row, t in enumerate(map(tuple, raw.tolist())):
        first_holder.setdefault(t, row)
    keeps = [row for row in first_holder.values()]
    assert np.array_equal(catalog.codes[keeps], raw[keeps])  # first holders keep their encoded tuple
    assert len({tuple(c) for c in catalog.codes.tolist()}) == len(catalog)  # the others moved to free tuples
    assert result.manifest["training"]["imported_codebooks"].endswith("model.pt")
    assert np.array_equal(RQCodebooks.load(str(tmp_path / "tok" / "codebooks.safetensors")).centroids[2],
                          artefacts["centroids"][2])


def test_given_codes_keep_shared_tuples_recorded_and_counted(artefacts, tmp_path):
    root, pids, raw = artefacts["root"], artefacts["pids"], artefacts["codes"]
    result = catalog_from_codes(CodesInputs(str(root / "pid2sid.parquet"), domain="video"), str(tmp_path / "cat"),
                                codebook_size=K)
    holders = defaultdict(list)
    for pid, t in zip(pids, map(tuple, raw.tolist())):
        holders[t].append(pid)
    shared = {t: ids for t, ids in holders.items() if len(ids) > 1}
    assert shared and result.manifest["shared_codes"] == {"kept": True, "tuples": len(shared),
                                                          "items": sum(map(len, shared.values()))}
    catalog = ItemCatalog.load(str(tmp_path / "cat"))
    assert catalog.shared_codes and np.array_equal(catalog.codes, raw) and catalog.item_ids == pids
    for t, ids in holders.items():
        assert catalog.item_ids_for(None, t) == ids  # every holder, in input order
        if len(ids) == 1:
            assert catalog.item_id_for("video", t) == ids[0]
        else:
            with pytest.raises(SharedCodesError, match=f"name {len(ids)} items"):
                catalog.item_id_for(None, t)
    assert catalog.item_ids_for("prod", next(iter(holders))) == []
    trie = ItemTrie.from_catalog(catalog, preset("openonerec", codebook_size=K))
    assert all(trie.contains(None, t) for t in holders)
    # new items with the imported codebooks: existing (shared) tuples stay, the new ones get free tuples
    x_new = np.random.default_rng(5).normal(size=(10, DIM)).astype(np.float32)
    np.save(tmp_path / "new.npy", x_new)
    (tmp_path / "new.txt").write_text("".join(f"n{i}\n" for i in range(10)))
    with_books = catalog_from_codes(CodesInputs(str(root / "pid2sid.parquet"), domain="video"),
                                    str(tmp_path / "cat_books"), codebooks_path=str(root / "model.pt"))
    assert with_books.catalog.shared_tuples == len(shared)
    ext = extend_itemic_tokenizer(CatalogInputs(str(tmp_path / "new.npy"), str(tmp_path / "new.txt"), "video"),
                                  str(tmp_path / "cat_books"), str(tmp_path / "ext"))
    new_keys = set(map(tuple, ext.catalog.codes[200:].tolist()))
    assert len(new_keys) == 10 and not new_keys & set(holders) and ext.catalog.shared_tuples == len(shared)


def test_shared_tuples_resolved_on_request(artefacts, tmp_path):
    root, raw = artefacts["root"], artefacts["codes"]
    result = catalog_from_codes(CodesInputs(str(root / "pid2sid.parquet"), domain="video"), str(tmp_path / "cat"),
                                codebooks_path=str(root / "model.pt"), resolve_shared=True,
                                embeddings=str(root / "emb.parquet"))
    codes = result.catalog.codes
    assert len({tuple(c) for c in codes.tolist()}) == len(codes) and not result.catalog.shared_codes
    seen = set()
    for row, t in enumerate(map(tuple, raw.tolist())):
        if t not in seen:
            assert tuple(codes[row]) == t  # a tuple's first holder keeps it
        seen.add(t)
    assert result.manifest["statistics"]["collisions"]["moved"] == len(raw) - len(seen)
    with pytest.raises(ValueError, match="needs the codebooks and the items' embeddings"):
        catalog_from_codes(CodesInputs(str(root / "pid2sid.parquet"), domain="video"), str(tmp_path / "x"),
                           codebook_size=K, resolve_shared=True)


@pytest.mark.parametrize("table, match", [
    ({"pid": [1, 2, 3], "sid": [[0, 1, 2], [0, 8, 1], [9, 9, 9]]}, r"field 'sid': 2 rows have codes outside "
                                                                  r"\[0, 8\) \(first at row 1: \[0, 8, 1\]\)"),
    ({"pid": [1, 2], "sid": [[0, 1, 2], [0, 1]]}, r"field 'sid': every row needs the same number of codes"),
    ({"pid": [1, 2], "codes": [[0, 1, 2], [0, 1, 2]], "sid": [[0, 1, 2], [0, 1, 2]]}, "expected one codes column"),
    ({"pid": [1, 2], "sid": ["a", "b"]}, r"field 'sid' must be a list of integers"),
    ({"item": [1, 2], "sid": [[0, 1, 2], [0, 1, 2]]}, r"missing column\(s\) \['pid'\]"),
])
def test_bad_codes_files_are_refused_in_one_line(tmp_path, table, match):
    path = tmp_path / "codes.parquet"
    pq.write_table(pa.table(table), path)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_itemic_tokenizer.py"), "--codes",
                           str(path), "--codebook-size", str(K), "--domain", "video", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")
    assert re.search(match, lines[0]), lines[0]
    assert not os.path.exists(tmp_path / "out")


def test_cli_codes_with_shared_tuples(artefacts, tmp_path):
    root = artefacts["root"]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "build_itemic_tokenizer.py"), "--codes",
                           str(root / "pid2sid.parquet"), "--codebooks", str(root / "model.pt"), "--domain", "ad",
                           "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 0, proc.stderr
    manifest = json.load(open(tmp_path / "out" / "manifest.json"))
    assert f"{manifest['shared_codes']['tuples']} code tuples shared by {manifest['shared_codes']['items']} items" \
        in proc.stdout
    assert sorted(os.listdir(tmp_path / "out")) == ["catalog.parquet", "codebooks.safetensors",
                                                    "codes_to_item.parquet", "manifest.json"]
