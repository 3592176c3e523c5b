#!/usr/bin/env python
"""Write the synthetic four-granularity pre-training corpus and chat SFT samples as JSONL.

    python tools/make_synthetic_corpus.py --synthetic-catalog SYN --item-catalog TOK --out DIR --samples-per-task 200

SYN is a directory from tools/make_synthetic_catalog.py (captions), TOK one from tools/build_itemic_tokenizer.py
(codes). Items are written in the itemic scheme of ``--itemic-vocab`` (a directory with itemic_tokens.json, such as
the extended model), by default in the embedded default scheme. DIR gets one JSONL file per granularity (token/item/relational/user_granularity.jsonl, sft_chat.jsonl) in
the formats tools/preprocess_data.py reads, written atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence

from megatron_onereason.cli import run_cli
from megatron_onereason.data.synthetic_catalog import SyntheticCatalog
from megatron_onereason.data.synthetic_corpus import CorpusConfig, generate_corpus, items_from_catalogs
from megatron_onereason.fileio import atomic_directory
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import ItemicScheme


def run(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic-catalog", required=True, help="directory with items.parquet (captions)")
    p.add_argument("--item-catalog", required=True, help="itemic tokenizer directory with catalog.parquet (codes)")
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--samples-per-task", type=int, default=CorpusConfig.samples_per_task,
                   help="samples written per task")
    p.add_argument("--seed", type=int, default=CorpusConfig.seed, help="random seed")
    p.add_argument("--itemic-vocab", default=None, help="directory whose itemic_tokens.json names the scheme to write "
                                                        "items in (default: the embedded default scheme)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)

    items = items_from_catalogs(SyntheticCatalog.load(args.synthetic_catalog), ItemCatalog.load(args.item_catalog))
    config = CorpusConfig(samples_per_task=args.samples_per_task, seed=args.seed)
    if args.itemic_vocab:
        config = dataclasses.replace(config, scheme=ItemicScheme.load(args.itemic_vocab))
    corpus = generate_corpus(items, config)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        for name, records in corpus.items():
            with open(os.path.join(tmp, f"{name}.jsonl"), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    print(", ".join(f"{name}: {len(records)}" for name, records in corpus.items()) + f" samples -> {args.out}")


def main(argv=None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("make_synthetic_corpus", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
