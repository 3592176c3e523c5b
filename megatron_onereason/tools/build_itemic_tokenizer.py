"""Build an itemic tokenizer (RQ-KMeans codebooks + item catalog) from item embeddings, or from given codes.

One domain for all items:
    python tools/build_itemic_tokenizer.py --embeddings E.npy --ids ids.txt --domain video --out DIR
All domains in one catalog (domain per item from a parquet column, e.g. the synthetic catalog's items.parquet):
    python tools/build_itemic_tokenizer.py --embeddings S/embeddings.npy --ids S/items.parquet \
        --domain-column domain --codebook-size 16 --out DIR
New items into an existing catalog with its saved codebooks (no retraining), written to a new directory:
    python tools/build_itemic_tokenizer.py --extend DIR --embeddings NEW.npy --ids new_ids.txt --domain prod --out DIR2
OpenOneRec's artefacts: their codebooks (model.pt, centroids.{l}) encode items of an embeddings parquet (pid,
embedding); or their codes (pid2sid parquet: pid, sid) become the catalog as given, tuples shared by several items
kept and counted (--resolve-shared moves them with the collision resolution: needs --codebooks and --embeddings):
    python tools/build_itemic_tokenizer.py --codebooks model.pt --embeddings emb.parquet --ids emb.parquet \
        --id-column pid --domain video --out DIR
    python tools/build_itemic_tokenizer.py --codes video_ad_pid2sid.parquet --domain video --out DIR \
        [--codebooks model.pt] [--resolve-shared --embeddings emb.parquet]
"""
from __future__ import annotations

import argparse
import logging
import sys

import faiss

from megatron_onereason.cli import run_cli
from megatron_onereason.tokenizer.catalog_builder import (
    CatalogInputs,
    CodesInputs,
    build_itemic_tokenizer,
    catalog_from_codes,
    extend_itemic_tokenizer,
)
from megatron_onereason.tokenizer.rq_kmeans import RQKMeansConfig


def _parser() -> argparse.ArgumentParser:
    defaults = RQKMeansConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--embeddings", help=".npy (memory-mapped), .safetensors, .zarr or .parquet [items, dim]")
    p.add_argument("--embeddings-key", help="tensor/array name in a safetensors file or zarr group; list column of "
                                            "a parquet file (default: embedding)")
    p.add_argument("--ids", help="item ids: .txt (one per line), .parquet or .npy, same length")
    p.add_argument("--id-column", help="ids column of a parquet ids or codes file (default: item_id; pid for --codes)")
    dom = p.add_mutually_exclusive_group(required=True)
    dom.add_argument("--domain", help="domain of every item (video, prod, ad, living, sid, ...)")
    dom.add_argument("--domain-column", help="take each item's domain from this column of a parquet ids/codes file")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--extend", metavar="DIR", help="add the items to this existing tokenizer's catalog instead")
    p.add_argument("--codebooks", help="use these codebooks instead of training (codebooks.safetensors, or "
                                       "OpenOneRec's model.pt)")
    p.add_argument("--codes", help="a parquet of given item codes (OpenOneRec's pid2sid: pid, sid): no encoding")
    p.add_argument("--codes-column", help="the codes column of --codes (default: sid or codes)")
    p.add_argument("--resolve-shared", action="store_true", help="with --codes: move items sharing a code tuple "
                                                                 "to free tuples instead of keeping them shared")
    p.add_argument("--levels", type=int, default=defaults.levels, help="RQ-KMeans levels (codes per item)")
    p.add_argument("--codebook-size", type=int, default=defaults.codebook_size, help="codes per level")
    p.add_argument("--seed", type=int, default=defaults.seed, help="k-means seed")
    p.add_argument("--niter", type=int, default=defaults.niter, help="k-means iterations per level")
    p.add_argument("--train-sample", type=int, default=defaults.train_sample_size,
                   help="train k-means on this many sampled items (0: all)")
    p.add_argument("--chunk-size", type=int, default=defaults.chunk_size, help="rows read and encoded at a time")
    p.add_argument("--threads", type=int, help="faiss/OpenMP threads (default: all cores)")
    return p


def _build(args):
    if args.codes:
        if args.extend or args.ids:
            raise ValueError("--codes takes the items from the codes file: --extend and --ids do not apply")
        inputs = CodesInputs(args.codes, args.id_column or "pid", args.codes_column, args.domain, args.domain_column)
        return catalog_from_codes(inputs, args.out, args.codebook_size, args.codebooks, args.resolve_shared,
                                  args.embeddings, args.embeddings_key, overwrite=args.overwrite)
    if not (args.embeddings and args.ids):
        raise ValueError("--embeddings and --ids are required (or --codes)")
    inputs = CatalogInputs(
        embeddings=args.embeddings, ids=args.ids, domain=args.domain, domain_column=args.domain_column,
        id_column=args.id_column or "item_id", embeddings_key=args.embeddings_key,
    )
    if args.extend:
        return extend_itemic_tokenizer(inputs, args.extend, args.out, overwrite=args.overwrite)
    config = RQKMeansConfig(
        levels=args.levels, codebook_size=args.codebook_size, seed=args.seed, niter=args.niter,
        train_sample_size=args.train_sample, chunk_size=args.chunk_size,
    )
    return build_itemic_tokenizer(inputs, config, args.out, overwrite=args.overwrite, codebooks_path=args.codebooks)


def run(argv=None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    result = _build(args)  # bad input: one line from run_cli
    manifest = result.manifest
    stats = manifest["statistics"]
    print(f"{'level':>5} {'used':>8} {'util':>7} {'perplexity':>11} {'residual mse':>13} {'relative':>9}")
    for s in stats["levels"]:
        print(f"{s['letter']:>5} {s['codes_used']:>8} {s['utilization']:>7.3f} {s['perplexity']:>11.1f} "
              f"{s.get('residual_mse', float('nan')):>13.5g} {s.get('relative_residual', float('nan')):>9.4f}")
    if "collisions" in stats:
        c = stats["collisions"]
        print(f"items {manifest['num_items']}, moved by collisions {c['moved']} ({c['moved_fraction']:.4%}), "
              f"by first changed level {c['moved_by_first_changed_level']}, mean extra distance "
              f"{c['mean_extra_distance']:.5g}")
    shared = manifest["shared_codes"]
    if shared["kept"]:
        print(f"items {manifest['num_items']}, {shared['tuples']} code tuples shared by {shared['items']} items (kept)")
    print(f"wrote {args.out}")


def main(argv=None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("build_itemic_tokenizer", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
