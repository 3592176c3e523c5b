"""Write a synthetic recommendation benchmark (JSONL, format in megatron_onereason/eval/benchmark.py).

    python tools/make_synthetic_benchmark.py --synthetic-catalog SYN_DIR --catalog ITEMIC_TOKENIZER_DIR \
        --out BENCH.jsonl [--users 100] [--seed 0] [--evolution]

SYN_DIR is tools/make_synthetic_catalog.py's output (captions); ITEMIC_TOKENIZER_DIR is
tools/build_itemic_tokenizer.py's output for the same items (codes). Users mix one to three interest clusters
(items sharing their first code); their targets are unseen items of those clusters, per domain. ``--evolution``
adds R2 evolution tasks (a topic per cluster and its history items) for Mix-RL (``data.tasks=[rec, evolution]``).
"""
from __future__ import annotations

import argparse
import sys

from megatron_onereason.cli import run_cli
from megatron_onereason.data.synthetic_catalog import SyntheticCatalog
from megatron_onereason.eval.benchmark import SyntheticBenchmarkConfig, make_synthetic_benchmark, write_benchmark
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.tokenizer.item_catalog import ItemCatalog


def run(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--synthetic-catalog", required=True, help="directory of tools/make_synthetic_catalog.py")
    p.add_argument("--catalog", required=True, help="itemic tokenizer directory with catalog.parquet")
    p.add_argument("--out", required=True, help="benchmark JSONL to write")
    p.add_argument("--users", type=int, default=100, help="number of users")
    p.add_argument("--history-length", type=int, nargs=2, default=(8, 24), metavar=("MIN", "MAX"),
                   help="items in a user's history")
    p.add_argument("--targets-per-domain", type=int, nargs=2, default=(1, 3), metavar=("MIN", "MAX"),
                   help="held-out target items per domain")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--evolution", action="store_true", help="also write R2 evolution tasks (Mix-RL)")
    args = p.parse_args(argv)
    if args.users < 1:
        p.error(f"--users must be >= 1, got {args.users} (a benchmark without users evaluates nothing)")
    config = SyntheticBenchmarkConfig(num_users=args.users, history_length=tuple(args.history_length),
                                      targets_per_domain=tuple(args.targets_per_domain), seed=args.seed,
                                      evolution=args.evolution)
    users = make_synthetic_benchmark(SyntheticCatalog.load(args.synthetic_catalog), ItemCatalog.load(args.catalog),
                                     config)
    write_benchmark(args.out, users)
    instances = sum(len(u.targets) for u in users)
    evolution = sum(len(u.evolution) for u in users)
    print(f"wrote {len(users)} users ({instances} user x domain instances, {evolution} evolution tasks) to {args.out}")


def main(argv=None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("make_synthetic_benchmark", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
