"""Benchmark the itemic tokenizer build: items/s for RQ-KMeans training and encoding, plus collision/utilization
statistics, on a random clustered catalog (default 1M x 256-d float16, 3 levels x 8192 codes).

    PYTHONPATH=. python benchmarks/itemic_tokenizer.py --items 1000000 --dim 256 --threads 2

The data is a two-level Gaussian mixture (coarse topics, finer sub-topics, noise), L2-normalised like the output
of an embedding model. It first times the nearest-centroid search backends on one chunk (why faiss was picked).
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import faiss
import numpy as np

from megatron_onereason.tokenizer.catalog_builder import CatalogInputs, build_itemic_tokenizer
from megatron_onereason.tokenizer.rq_kmeans import RQKMeansConfig


def write_clustered_embeddings(path: str, n: int, dim: int, seed: int, chunk: int = 65536) -> None:
    """float16 [n, dim] .npy: unit-norm(topic + 0.6 * subtopic + 0.35 * noise)."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((1024, dim)).astype(np.float32)
    subtopics = rng.standard_normal((16384, dim)).astype(np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        x = topics[rng.integers(1024, size=m)] + 0.6 * subtopics[rng.integers(16384, size=m)]
        x += 0.35 * rng.standard_normal((m, dim), dtype=np.float32)
        out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out


def compare_search_backends(dim: int, codebook_size: int, queries: int = 16384, repeats: int = 3) -> list:
    """GFLOP/s of exact nearest-centroid search: faiss IndexFlatL2 vs numpy and torch matmul + argmin.

    Best of ``repeats`` runs each, so a busy shared machine disturbs the ranking less.
    """
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((queries, dim), dtype=np.float32)
    c = rng.standard_normal((codebook_size, dim), dtype=np.float32)
    flops = 2.0 * queries * codebook_size * dim
    rows = []

    def timed(name, fn):
        best = float("inf")
        for _ in range(repeats):
            start = time.time()
            fn()
            best = min(best, time.time() - start)
        rows.append((name, flops / best / 1e9))

    index = faiss.IndexFlatL2(dim)
    index.add(c)
    timed("faiss IndexFlatL2", lambda: index.search(x, 1))
    cn = (c * c).sum(1)
    timed("numpy matmul+argmin", lambda: [(cn - 2 * x[i:i + 4096] @ c.T).argmin(1) for i in range(0, queries, 4096)])
    xt, ct, cnt = torch.from_numpy(x), torch.from_numpy(c), torch.from_numpy(cn)
    timed("torch matmul+argmin", lambda: [(cnt - 2 * xt[i:i + 4096] @ ct.T).argmin(1) for i in range(0, queries, 4096)])
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--train-sample", type=int, default=131072, help="k-means training subset (16 per centroid)")
    p.add_argument("--niter", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workdir", help="keep data and output here (default: a temp dir, deleted)")
    p.add_argument("--backends-only", action="store_true", help="only time the nearest-centroid search backends")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    faiss.omp_set_num_threads(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    backends = compare_search_backends(args.dim, args.codebook_size)
    print("exact nearest-centroid search, one 16384-query chunk (best of 3)")
    for name, gflops in backends:
        print(f"  {name:<22} {gflops:8.1f} GFLOP/s")
    if args.backends_only:
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        emb, ids = os.path.join(work, "embeddings.npy"), os.path.join(work, "ids.txt")
        start = time.time()
        write_clustered_embeddings(emb, args.items, args.dim, seed=0)
        with open(ids, "w") as f:
            f.write("".join(f"item{i}\n" for i in range(args.items)))
        gen_seconds = time.time() - start
        config = RQKMeansConfig(levels=args.levels, codebook_size=args.codebook_size, seed=0, niter=args.niter,
                                train_sample_size=args.train_sample)
        start = time.time()
        result = build_itemic_tokenizer(CatalogInputs(emb, ids, domain="video"), config,
                                        os.path.join(work, "tokenizer"), overwrite=True)
        total = time.time() - start

    s = result.seconds
    n, sample = args.items, result.manifest["training"]["train_sample_size"]
    stats = result.manifest["statistics"]
    c = stats["collisions"]
    print(f"\nitemic tokenizer benchmark: {n} items x {args.dim}-d float16, {args.levels} levels x "
          f"{args.codebook_size} codes, {args.threads} threads (data generated in {gen_seconds:.1f}s)")
    print(f"\n{'phase':<28} {'seconds':>9} {'items/s':>12}")
    print(f"{'train (sample, all levels)':<28} {s['train']:>9.1f} {sample / s['train']:>12.0f}"
          f"   ({sample} sampled items x {args.levels} levels x {args.niter} iters: "
          f"{sample * args.levels * args.niter / s['train']:.0f} item-iterations/s)")
    print(f"{'encode (all items)':<28} {s['encode']:>9.1f} {n / s['encode']:>12.0f}")
    print(f"{'collision resolution':<28} {s['collisions']:>9.1f} {n / s['collisions']:>12.0f}"
          f"   ({c['moved']} items moved, {c['moved'] / s['collisions']:.0f} moved items/s)")
    print(f"{'write outputs':<28} {s['write']:>9.1f}")
    print(f"{'total build':<28} {total:>9.1f} {n / total:>12.0f}")
    print(f"\n{'level':>5} {'codes used':>11} {'utilization':>12} {'perplexity':>11} {'relative residual':>18}")
    for lvl in stats["levels"]:
        print(f"{lvl['letter']:>5} {lvl['codes_used']:>11} {lvl['utilization']:>12.4f} {lvl['perplexity']:>11.1f} "
              f"{lvl['relative_residual']:>18.4f}")
    print(f"\nunique raw code tuples {stats['unique_raw_code_tuples']} of {n}; moved {c['moved']} "
          f"({c['moved_fraction']:.4%}), by first changed level {c['moved_by_first_changed_level']}, "
          f"mean extra distance {c['mean_extra_distance']:.4g} (max {c['max_extra_distance']:.4g})")


if __name__ == "__main__":
    main()
