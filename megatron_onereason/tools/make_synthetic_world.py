"""Write a learnable recommendation world (megatron_onereason/data/synthetic_world.py): catalog, itemic tokenizer,
pre-training corpus, SFT data with CoTs, RL prompts (train / held out) and the oracle Recall@K.

    python tools/make_synthetic_world.py --out DIR --seed S [--target-domains video] [--follow-prob 0.8] [--popularity-skew 0]

DIR gets: catalog/ (tools/make_synthetic_catalog.py's output), itemic/ (tools/build_itemic_tokenizer.py's),
corpus/{token,item,relational,user}_granularity.jsonl + sft_chat.jsonl (tools/make_synthetic_corpus.py's files, with
the world's user timelines added to user_granularity and its CoT recommendation samples in sft_chat in place of the
random-target ones), rl_train.jsonl / rl_eval.jsonl (synthetic-benchmark JSONL: user_id, portrait, history,
targets; one target per user) and oracle.json: exact Recall@K of the Bayes-optimal and of a random policy on the
held-out and on the training prompts. Written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional, Sequence

from megatron_onereason.cli import run_cli
from megatron_onereason.data.synthetic_catalog import DEFAULT_SYNTHETIC_DOMAINS, make_synthetic_catalog
from megatron_onereason.data.synthetic_corpus import CorpusConfig, generate_corpus, items_from_catalogs
from megatron_onereason.data.synthetic_world import (
    World,
    WorldConfig,
    pretrain_records,
    recall_table,
    sft_records,
    world_items,
)
from megatron_onereason.eval.benchmark import write_benchmark
from megatron_onereason.fileio import atomic_directory
from megatron_onereason.help_text import DocHelpFormatter
from megatron_onereason.tokenizer.catalog_builder import CatalogInputs, build_itemic_tokenizer
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.rq_kmeans import RQKMeansConfig


def _write_jsonl(path: str, records) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def run(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=DocHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (written atomically)")
    p.add_argument("--seed", type=int, default=0, help="random seed (catalog, codebooks, users)")
    p.add_argument("--items-per-domain", type=int, default=200, help="catalog items per domain")
    p.add_argument("--dim", type=int, default=32, help="embedding dimension")
    p.add_argument("--domains", nargs="+", default=list(DEFAULT_SYNTHETIC_DOMAINS), help="item domains")
    p.add_argument("--clusters-per-domain", type=int, default=8, help="interests per domain")
    p.add_argument("--levels", type=int, default=3, help="itemic code levels")
    p.add_argument("--codebook-size", type=int, default=16, help="codes per level")
    p.add_argument("--samples-per-task", type=int, default=150, help="pre-training corpus samples per task")
    p.add_argument("--target-domains", nargs="+", default=None, help="domains of the targets (default: all)")
    p.add_argument("--follow-prob", type=float, default=WorldConfig.follow_prob,
                   help="chance the target is the next item of the dominant interest's sequence")
    p.add_argument("--popularity-skew", type=float, default=WorldConfig.popularity_skew,
                   help="Zipf exponent of the item popularity inside an interest (0: uniform); its ranking is seeded "
                        "by --seed")
    p.add_argument("--dominant-share", type=float, default=WorldConfig.dominant_share,
                   help="chance a history event belongs to the dominant interest")
    p.add_argument("--sft-answers", choices=("target", "interest"), default="target",
                   help="the SFT samples' answers: the users' targets, or a uniform item of the dominant interest (a "
                        "demonstrator that knows the interest, not the popularity: RL's reward has more to teach)")
    p.add_argument("--train-users", type=int, default=64, help="RL training prompts")
    p.add_argument("--eval-users", type=int, default=64, help="held-out RL prompts")
    p.add_argument("--sft-users", type=int, default=600, help="SFT samples with CoT")
    p.add_argument("--pretrain-users", type=int, default=300, help="user timelines added to the corpus")
    p.add_argument("--ks", default="1,8,32", help="comma-separated K of the oracle Recall@K")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = p.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    config = WorldConfig(target_domains=tuple(args.target_domains) if args.target_domains else None,
                         follow_prob=args.follow_prob, dominant_share=args.dominant_share,
                         popularity_skew=args.popularity_skew, popularity_seed=args.seed)
    with atomic_directory(args.out, overwrite=args.overwrite) as tmp:
        synthetic = make_synthetic_catalog(args.items_per_domain, args.dim, args.domains, args.clusters_per_domain,
                                           args.seed)
        synthetic.save(os.path.join(tmp, "catalog"))
        build_itemic_tokenizer(
            CatalogInputs(embeddings=os.path.join(tmp, "catalog", "embeddings.npy"),
                          ids=os.path.join(tmp, "catalog", "items.parquet"), domain_column="domain"),
            RQKMeansConfig(levels=args.levels, codebook_size=args.codebook_size, seed=args.seed),
            os.path.join(tmp, "itemic"))
        catalog = ItemCatalog.load(os.path.join(tmp, "itemic"))
        world = World(world_items(synthetic, catalog), config)
        # Disjoint seeds per split: the held-out prompts are users no training set saw.
        seed = 1000 * args.seed
        train = world.draw_users(args.train_users, seed + 1, "train")
        held_out = world.draw_users(args.eval_users, seed + 2, "eval")
        sft_users = world.draw_users(args.sft_users, seed + 3, "sft")
        pretrain_users = world.draw_users(args.pretrain_users, seed + 4, "pre")

        corpus = generate_corpus(items_from_catalogs(synthetic, catalog),
                                 CorpusConfig(samples_per_task=args.samples_per_task, seed=args.seed))
        corpus["user_granularity"] += pretrain_records(world, pretrain_users)
        corpus["sft_chat"] = [r for r in corpus["sft_chat"] if r["source"] != "sft_recommend_think"]
        corpus["sft_chat"] += sft_records(world, sft_users, answers=args.sft_answers, seed=seed + 5)
        os.makedirs(os.path.join(tmp, "corpus"))
        for name, records in corpus.items():
            _write_jsonl(os.path.join(tmp, "corpus", f"{name}.jsonl"), records)
        write_benchmark(os.path.join(tmp, "rl_train.jsonl"), train)
        write_benchmark(os.path.join(tmp, "rl_eval.jsonl"), held_out)
        oracle = {split: {"oracle_recall": world.oracle_recall(users, ks),
                          "random_recall": world.random_recall(users, ks)}
                  for split, users in (("held_out", held_out), ("train", train))}
        oracle["config"] = {"seed": args.seed, "follow_prob": config.follow_prob,
                            "popularity_skew": config.popularity_skew, "sft_answers": args.sft_answers,
                            "dominant_share": config.dominant_share, "target_domains": list(world.target_domains)}
        with open(os.path.join(tmp, "oracle.json"), "w") as f:
            json.dump(oracle, f, indent=1)
    held = oracle["held_out"]
    print(recall_table({"Bayes-optimal (held out)": held["oracle_recall"], "random (held out)": held["random_recall"]}))
    print(f"wrote the world to {args.out}: {len(train)} training and {len(held_out)} held-out RL prompts, "
          f"{len(sft_users)} SFT samples with CoT")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("make_synthetic_world", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
