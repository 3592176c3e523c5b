"""Build an itemic tokenizer (RQ-KMeans codebooks + collision-free item catalog) from item embeddings.

One domain for all items:
    python tools/build_itemic_tokenizer.py --embeddings E.npy --ids ids.txt --domain video --out DIR
All domains in one catalog (domain per item from a parquet column, e.g. the synthetic catalog's items.parquet):
    python tools/build_itemic_tokenizer.py --embeddings S/embeddings.npy --ids S/items.parquet \
        --domain-column domain --codebook-size 16 --out DIR
New items into an existing catalog with its saved codebooks (no retraining), written to a new directory:
    python tools/build_itemic_tokenizer.py --extend DIR --embeddings NEW.npy --ids new_ids.txt --domain prod --out DIR2
"""
from __future__ import annotations

import argparse
import logging
import sys

import faiss

from megatron_onereason.cli import run_cli
from megatron_onereason.tokenizer.catalog_builder import (
    CatalogInputs,
    build_itemic_tokenizer,
    extend_itemic_tokenizer,
)
from megatron_onereason.tokenizer.rq_kmeans import RQKMeansConfig


def main() -> None:
    defaults = RQKMeansConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", required=True, help=".npy (memory-mapped), .safetensors or .zarr [items, dim]")
    p.add_argument("--embeddings-key", help="tensor/array name inside a safetensors file or zarr group")
    p.add_argument("--ids", required=True, help="item ids: .txt (one per line), .parquet or .npy, same length")
    p.add_argument("--id-column", default="item_id", help="ids column of a parquet ids file")
    dom = p.add_mutually_exclusive_group(required=True)
    dom.add_argument("--domain", help="domain of every item (video, prod, ad, living, sid)")
    dom.add_argument("--domain-column", help="take each item's domain from this column of a parquet ids file")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--extend", metavar="DIR", help="add the items to this existing tokenizer's catalog instead")
    p.add_argument("--levels", type=int, default=defaults.levels, help="RQ-KMeans levels (codes per item)")
    p.add_argument("--codebook-size", type=int, default=defaults.codebook_size, help="codes per level")
    p.add_argument("--seed", type=int, default=defaults.seed, help="k-means seed")
    p.add_argument("--niter", type=int, default=defaults.niter, help="k-means iterations per level")
    p.add_argument("--train-sample", type=int, default=defaults.train_sample_size,
                   help="train k-means on this many sampled items (0: all)")
    p.add_argument("--chunk-size", type=int, default=defaults.chunk_size, help="rows read and encoded at a time")
    p.add_argument("--threads", type=int, help="faiss/OpenMP threads (default: all cores)")
    args = p.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    inputs = CatalogInputs(
        embeddings=args.embeddings, ids=args.ids, domain=args.domain, domain_column=args.domain_column,
        id_column=args.id_column, embeddings_key=args.embeddings_key,
    )
    if args.extend:
        result = extend_itemic_tokenizer(inputs, args.extend, args.out, overwrite=args.overwrite)
    else:
        config = RQKMeansConfig(
            levels=args.levels, codebook_size=args.codebook_size, seed=args.seed, niter=args.niter,
            train_sample_size=args.train_sample, chunk_size=args.chunk_size,
        )
        result = build_itemic_tokenizer(inputs, config, args.out, overwrite=args.overwrite)

    stats = result.manifest["statistics"]
    print(f"{'level':>5} {'used':>8} {'util':>7} {'perplexity':>11} {'residual mse':>13} {'relative':>9}")
    for s in stats["levels"]:
        print(f"{s['letter']:>5} {s['codes_used']:>8} {s['utilization']:>7.3f} {s['perplexity']:>11.1f} "
              f"{s['residual_mse']:>13.5g} {s['relative_residual']:>9.4f}")
    c = stats["collisions"]
    print(f"items {result.manifest['num_items']}, moved by collisions {c['moved']} ({c['moved_fraction']:.4%}), "
          f"by first changed level {c['moved_by_first_changed_level']}, mean extra distance "
          f"{c['mean_extra_distance']:.5g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    sys.exit(run_cli("build_itemic_tokenizer", main))  # user errors: one line, exit 1
