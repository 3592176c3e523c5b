"""A tiny random itemic recommender built end to end on the real pipeline, for tests, benchmarks and the demo.

synthetic catalog (captions, embeddings) → itemic tokenizer (RQ-KMeans codes, item catalog) → tiny random Qwen3
HF model with the tiny Qwen3 tokenizer → vocabulary extended with the itemic tokens. No downloads.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

from megatron_onereason.data.synthetic_catalog import EMBEDDINGS_FILE, ITEMS_FILE, make_synthetic_catalog


@dataclass(frozen=True)
class TinyRecommender:
    model_dir: str  # HF directory with the extended tokenizer and itemic_tokens.json
    catalog_dir: str  # itemic tokenizer directory (catalog.parquet, manifest.json)
    synthetic_dir: str  # synthetic catalog (items.parquet with captions, embeddings.npy)


def build_tiny_recommender(out_dir: str, items_per_domain: int = 24, domains: Sequence[str] = ("video", "prod"),
                           codebook_size: int = 8, preset: str = "tiny", seed: int = 0,
                           scheme: str = "onereason_report") -> TinyRecommender:
    """Write the three directories under ``out_dir`` (which must not exist or be empty); the model's itemic tokens
    follow the named ``scheme`` preset."""
    from megatron_onereason.tokenizer.catalog_builder import CatalogInputs, build_itemic_tokenizer
    from megatron_onereason.tokenizer import itemic_tokens
    from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3
    from megatron_onereason.tokenizer.rq_kmeans import RQKMeansConfig
    from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary

    synthetic_dir = os.path.join(out_dir, "synthetic_catalog")
    catalog_dir = os.path.join(out_dir, "itemic_tokenizer")
    base_dir = os.path.join(out_dir, "base_model")
    model_dir = os.path.join(out_dir, "model")
    make_synthetic_catalog(items_per_domain, domains=tuple(domains), seed=seed).save(synthetic_dir)
    inputs = CatalogInputs(embeddings=os.path.join(synthetic_dir, EMBEDDINGS_FILE),
                           ids=os.path.join(synthetic_dir, ITEMS_FILE), domain_column="domain")
    build_itemic_tokenizer(inputs, RQKMeansConfig(codebook_size=codebook_size, seed=seed, train_sample_size=0),
                           catalog_dir)
    save_tiny_hf_qwen3(base_dir, preset, seed=seed)
    extend_vocabulary(base_dir, model_dir, itemic_tokens.preset(scheme, codebook_size=codebook_size), seed=seed)
    return TinyRecommender(model_dir, catalog_dir, synthetic_dir)


def add_benchmark_arguments(parser, num_items: int) -> None:
    """The tiny recommender and rollout-shape options shared by the generation and rollout benchmarks."""
    parser.add_argument("--preset", default="tiny", help="Qwen3 preset of the random model")
    parser.add_argument("--items-per-domain", type=int, default=64, help="synthetic catalog items per domain")
    parser.add_argument("--codebook-size", type=int, default=16, help="RQ-KMeans codes per level")
    parser.add_argument("--prompts", type=int, default=8, help="synthetic-benchmark prompts per call")
    parser.add_argument("--num-traces", type=int, default=4, help="N reasoning traces per prompt")
    parser.add_argument("--num-items", type=int, default=num_items, help="K items per trace")
    parser.add_argument("--max-think-tokens", type=int, default=64, help="longest reasoning trace")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up")


def build_benchmark_inputs(out_dir: str, args):
    """The benchmarks' shared inputs from ``add_benchmark_arguments``' options: the tiny recommender under
    ``out_dir``, its item catalog, and ``args.prompts`` recommendation instances of seeded synthetic users."""
    from megatron_onereason.data.synthetic_catalog import SyntheticCatalog
    from megatron_onereason.eval.benchmark import SyntheticBenchmarkConfig, make_synthetic_benchmark, rec_instances
    from megatron_onereason.tokenizer.item_catalog import ItemCatalog

    tiny = build_tiny_recommender(out_dir, items_per_domain=args.items_per_domain, codebook_size=args.codebook_size,
                                  preset=args.preset)
    catalog = ItemCatalog.load(tiny.catalog_dir)
    users = make_synthetic_benchmark(SyntheticCatalog.load(tiny.synthetic_dir), catalog,
                                     SyntheticBenchmarkConfig(num_users=args.prompts, seed=0))
    return tiny, catalog, rec_instances(users)[:args.prompts]
