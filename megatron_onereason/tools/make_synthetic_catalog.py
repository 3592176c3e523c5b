"""Write a synthetic item catalog (clustered embeddings + captions per domain) for tests and the demo.

    python tools/make_synthetic_catalog.py --out DIR --items-per-domain 200 --dim 32 --seed 0
writes DIR/items.parquet (item_id, domain, caption, cluster), DIR/embeddings.npy and DIR/ids.txt.
"""
from __future__ import annotations

import argparse
import sys

from megatron_onereason.cli import run_cli
from megatron_onereason.data.synthetic_catalog import DEFAULT_SYNTHETIC_DOMAINS, make_synthetic_catalog


def run(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--items-per-domain", type=int, default=200, help="items per domain")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--domains", nargs="+", default=list(DEFAULT_SYNTHETIC_DOMAINS), help="item domains")
    p.add_argument("--clusters-per-domain", type=int, default=8, help="embedding clusters per domain")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    catalog = make_synthetic_catalog(args.items_per_domain, args.dim, args.domains, args.clusters_per_domain, args.seed)
    catalog.save(args.out, overwrite=args.overwrite)
    print(f"wrote {len(catalog.item_ids)} items ({', '.join(args.domains)}) x {args.dim} dims to {args.out}")


def main(argv=None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("make_synthetic_catalog", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
