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
