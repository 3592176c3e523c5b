"""A small synthetic item catalog: clustered embeddings and matching captions per domain, for tests and the demo.

Each cluster is about two topic words; its centre is the (scaled) sum of the two topics' vectors plus a domain
offset, so clusters about the same topics in different domains lie close together. Each item adds a style
vector and noise. The caption names exactly those parts ("cozy video about cooking and travel"), so a language
model can learn which captions go with which itemic codes. Everything is deterministic given the seed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from megatron_onereason.fileio import atomic_directory
from megatron_onereason.tokenizer.embedding_io import read_item_ids
from megatron_onereason.tokenizer.itemic_tokens import DOMAINS

TOPICS = (
    "cooking", "travel", "fitness", "gaming", "music", "fashion", "skincare", "pets", "gardening", "cars",
    "parenting", "finance", "history", "science", "football", "basketball", "camping", "baking", "coffee", "tea",
    "photography", "painting", "dance", "comedy", "movies", "books", "cycling", "yoga", "fishing", "hiking",
    "furniture", "cleaning", "snacks", "phones", "laptops", "toys", "jewelry", "shoes", "watches", "housing",
)
STYLES = (
    "cozy", "quick", "funny", "detailed", "budget", "premium", "classic", "trendy", "relaxing", "energetic",
    "practical", "colorful", "minimal", "festive", "healthy", "vintage",
)
DOMAIN_NOUNS = {"video": "video", "prod": "product", "ad": "advert", "living": "live stream", "sid": "picture"}
DEFAULT_SYNTHETIC_DOMAINS = ("video", "prod", "ad", "living")

ITEMS_FILE = "items.parquet"
EMBEDDINGS_FILE = "embeddings.npy"
IDS_FILE = "ids.txt"


@dataclass
class SyntheticCatalog:
    item_ids: List[str]  # unique, "{domain}_{index:06d}"
    domains: List[str]
    embeddings: np.ndarray  # float32 [n, dim]
    captions: List[str]
    clusters: np.ndarray  # int64 [n], global cluster index (domain_index * clusters_per_domain + k)

    def save(self, directory: str, overwrite: bool = False) -> None:
        """Write ``items.parquet`` (item_id, domain, caption, cluster), ``embeddings.npy`` and ``ids.txt``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        with atomic_directory(directory, overwrite) as tmp:
            table = pa.table({
                "item_id": pa.array(self.item_ids, pa.string()),
                "domain": pa.array(self.domains, pa.string()),
                "caption": pa.array(self.captions, pa.string()),
                "cluster": pa.array(self.clusters, pa.int64()),
            })
            pq.write_table(table, os.path.join(tmp, ITEMS_FILE))
            np.save(os.path.join(tmp, EMBEDDINGS_FILE), self.embeddings.astype(np.float32))
            with open(os.path.join(tmp, IDS_FILE), "w") as f:
                f.write("".join(f"{item_id}\n" for item_id in self.item_ids))

    @classmethod
    def load(cls, directory: str) -> "SyntheticCatalog":
        import pyarrow.parquet as pq

        items_path = os.path.join(directory, ITEMS_FILE)
        read_item_ids(items_path, domain_column="domain")  # validates ids and domains
        table = pq.read_table(items_path)
        embeddings = np.load(os.path.join(directory, EMBEDDINGS_FILE))
        if embeddings.shape[0] != len(table):
            raise ValueError(f"{directory}: {len(table)} items in {ITEMS_FILE} but {embeddings.shape[0]} embeddings")
        return cls(
            item_ids=table.column("item_id").to_pylist(),
            domains=table.column("domain").to_pylist(),
            embeddings=embeddings.astype(np.float32),
            captions=table.column("caption").to_pylist(),
            clusters=table.column("cluster").to_numpy().astype(np.int64),
        )


def make_synthetic_catalog(
    items_per_domain: int = 200,
    dim: int = 32,
    domains: Sequence[str] = DEFAULT_SYNTHETIC_DOMAINS,
    clusters_per_domain: int = 8,
    seed: int = 0,
) -> SyntheticCatalog:
    """``items_per_domain`` items in each domain, spread evenly over ``clusters_per_domain`` topic clusters."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown or len(set(domains)) != len(domains) or not domains:
        raise ValueError(f"domains must be distinct names from {DOMAINS}, got {list(domains)}")
    if items_per_domain < 1 or dim < 2 or clusters_per_domain < 1:
        raise ValueError(f"need items_per_domain >= 1, dim >= 2, clusters_per_domain >= 1; got "
                         f"{items_per_domain}, {dim}, {clusters_per_domain}")
    rng = np.random.default_rng(seed)
    topic_vectors = rng.standard_normal((len(TOPICS), dim))
    style_vectors = 0.5 * rng.standard_normal((len(STYLES), dim))
    domain_offsets = 0.5 * rng.standard_normal((len(domains), dim))
    item_ids, item_domains, captions, clusters, rows = [], [], [], [], []
    for d_index, domain in enumerate(domains):
        cluster_topics = [rng.choice(len(TOPICS), size=2, replace=False) for _ in range(clusters_per_domain)]
        centres = [(topic_vectors[t[0]] + topic_vectors[t[1]]) / np.sqrt(2) + domain_offsets[d_index]
                   for t in cluster_topics]
        for i in range(items_per_domain):
            k = i % clusters_per_domain
            style = int(rng.integers(len(STYLES)))
            rows.append(centres[k] + style_vectors[style] + 0.15 * rng.standard_normal(dim))
            first, second = (TOPICS[t] for t in cluster_topics[k])
            item_ids.append(f"{domain}_{i:06d}")
            item_domains.append(domain)
            captions.append(f"{STYLES[style]} {DOMAIN_NOUNS[domain]} about {first} and {second}")
            clusters.append(d_index * clusters_per_domain + k)
    return SyntheticCatalog(
        item_ids=item_ids,
        domains=item_domains,
        embeddings=np.asarray(rows, dtype=np.float32),
        captions=captions,
        clusters=np.asarray(clusters, dtype=np.int64),
    )
