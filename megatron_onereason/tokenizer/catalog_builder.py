"""Build an itemic tokenizer directory from item embeddings, or extend one with new items (no retraining).

Pipeline: read ids (+ domains) -> sample the training rows -> train RQ-KMeans codebooks -> encode every item in
chunks (checksumming and NaN-checking as it goes) -> resolve code collisions -> write the directory atomically
(a temp dir renamed into place, so a failed run leaves nothing that looks valid).

Output directory::

    codebooks.safetensors   level_0 .. level_{L-1}: [codebook_size, dim] float32
    catalog.parquet         item_id, domain, a, b, c        (input order; see item_catalog)
    codes_to_item.parquet   a, b, c, domain, item_id        (sorted by codes: the reverse map)
    manifest.json           sizes, seed, input checksums, statistics

Several domains go into one catalog (one shared codebook, codes unique across domains) by taking each item's
domain from a column of a parquet ids file (``domain_column``), or all items from one ``domain``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_onereason.fileio import atomic_directory
from megatron_onereason.tokenizer.code_collisions import CollisionReport, resolve_collisions
from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.embedding_io import (
    EmbeddingSource,
    file_sha256,
    nonfinite_error,
    nonfinite_rows,
    open_embeddings,
    read_item_ids,
)
from megatron_onereason.tokenizer.item_catalog import MANIFEST_FILE, ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import LEVEL_LETTERS, is_domain_name
from megatron_onereason.tokenizer.progress import RateLog
from megatron_onereason.tokenizer.rq_kmeans import (
    CODEBOOKS_FILE,
    RQCodebooks,
    RQKMeansConfig,
    code_usage,
    sample_training_rows,
    train_rq_kmeans,
)

log = logging.getLogger(__name__)

FORMAT = "megatron_onereason/itemic_tokenizer"
FORMAT_VERSION = 1


@dataclass
class CatalogInputs:
    """Where the items come from."""

    embeddings: str  # .npy / .safetensors / .zarr
    ids: str  # .txt / .parquet / .npy, same length as the embeddings
    domain: Optional[str] = None  # every item in this domain ...
    domain_column: Optional[str] = None  # ... or each item's domain from this column of a parquet ids file
    id_column: str = "item_id"  # parquet ids column
    embeddings_key: Optional[str] = None  # tensor / array name inside a safetensors file or zarr group


@dataclass
class EncodedItems:
    """Raw (pre-collision) codes of every item and what the encoding pass measured."""

    codes: np.ndarray  # int32 [n, levels]
    level_sq_error: np.ndarray  # float64 [levels]: sum over items of ||residual after level l||^2
    input_sq_norm: float  # sum over items of ||x||^2
    sha256_float32: str  # checksum of the embeddings as row-major little-endian float32


@dataclass
class AssignedItems:
    """A catalog (existing items first, then the new ones) and statistics of the new items."""

    catalog: ItemCatalog
    encoded: EncodedItems
    collisions: CollisionReport
    seconds: Dict[str, float] = field(default_factory=dict)


@dataclass
class BuildResult:
    catalog: ItemCatalog
    codebooks: RQCodebooks
    manifest: dict
    seconds: Dict[str, float]  # wall time per phase: train, encode, collisions, write


def encode_source(codebooks: RQCodebooks, source: EmbeddingSource, chunk_size: int = 65536) -> EncodedItems:
    """Encode every row of ``source`` in chunks; raises (after the pass, with the count) on NaN/inf rows."""
    if source.dim != codebooks.dim:
        raise ValueError(f"{source.path}: embeddings have dim {source.dim}, codebooks have dim {codebooks.dim}")
    n = source.num_items
    codes = np.empty((n, codebooks.levels), dtype=np.int32)
    level_sq_error = np.zeros(codebooks.levels, dtype=np.float64)
    input_sq_norm = 0.0
    digest = hashlib.sha256()
    bad_rows: List[int] = []
    bad_count = 0
    progress = RateLog(log, "encode", n)
    for start in range(0, n, chunk_size):
        x = source.read(start, min(start + chunk_size, n))
        digest.update(np.ascontiguousarray(x, dtype="<f4").data)
        bad = nonfinite_rows(x)
        if len(bad):
            bad_count += len(bad)
            bad_rows.extend((bad[:5] + start).tolist())
            # keep going to count every bad row; the error below discards the result
            x = np.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        codes[start:start + len(x)], sq_error = codebooks.encode(x)
        level_sq_error += sq_error.sum(axis=0, dtype=np.float64)
        input_sq_norm += float(np.einsum("ij,ij->", x, x, dtype=np.float64))
        progress.update(start + len(x))
    if bad_count:
        raise nonfinite_error(source.path, bad_count, n, bad_rows)
    return EncodedItems(codes, level_sq_error, input_sq_norm, digest.hexdigest())


def assign_items(
    codebooks: RQCodebooks,
    source: EmbeddingSource,
    item_ids: Sequence[str],
    domains: Sequence[str],
    base: Optional[ItemCatalog] = None,
    chunk_size: int = 65536,
) -> AssignedItems:
    """Encode new items with fixed codebooks and give each a free code tuple (``base`` items keep theirs).

    Deterministic: the same codebooks, items and order give the same catalog. Re-assigning a catalog's own
    training items (with ``base=None``) reproduces that catalog.
    """
    if len(item_ids) != source.num_items or len(domains) != source.num_items:
        raise ValueError(
            f"{source.path}: {source.num_items} embeddings but {len(item_ids)} item ids and {len(domains)} domains"
        )
    if base is not None:
        if base.codebook_size != codebooks.codebook_size or base.levels != codebooks.levels:
            raise ValueError(
                f"base catalog has {base.levels} levels x {base.codebook_size} codes, codebooks have "
                f"{codebooks.levels} x {codebooks.codebook_size}"
            )
        overlap = set(base.item_ids).intersection(item_ids)
        if overlap:
            raise ValueError(f"{len(overlap)} new item ids are already in the catalog, e.g. {sorted(overlap)[:5]}")
    seconds = {}
    start = time.time()
    encoded = encode_source(codebooks, source, chunk_size)
    seconds["encode"] = time.time() - start
    start = time.time()
    codes, collisions = resolve_collisions(
        encoded.codes, codebooks, source.take, occupied_keys=None if base is None else base.keys
    )
    seconds["collisions"] = time.time() - start
    if base is not None:
        item_ids = base.item_ids + list(item_ids)
        domains = base.domains + list(domains)
        codes = np.concatenate([base.codes, codes])
    catalog = ItemCatalog(item_ids, domains, codes, codebooks.codebook_size)
    return AssignedItems(catalog, encoded, collisions, seconds)


def _read_inputs(inputs: CatalogInputs):
    source = open_embeddings(inputs.embeddings, inputs.embeddings_key)
    ids = read_item_ids(inputs.ids, inputs.id_column, inputs.domain_column)
    if len(ids.ids) != source.num_items:
        raise ValueError(
            f"length mismatch: {inputs.ids} has {len(ids.ids)} item ids, {inputs.embeddings} has "
            f"{source.num_items} embeddings"
        )
    if (inputs.domain is None) == (inputs.domain_column is None):
        raise ValueError("give exactly one of a domain for all items or a domain column of the ids file")
    if inputs.domain is not None and not is_domain_name(inputs.domain):
        raise ValueError(f"domain {inputs.domain!r} is not a lower-case identifier")
    domains = ids.domains if ids.domains is not None else [inputs.domain] * len(ids.ids)
    return source, ids.ids, domains


def _statistics(assigned: AssignedItems, codebook_size: int) -> dict:
    n = len(assigned.encoded.codes)
    levels = []
    usage = code_usage(assigned.catalog.codes, codebook_size)
    for level, used in enumerate(usage):
        sq = float(assigned.encoded.level_sq_error[level])
        levels.append({
            "level": level,
            "letter": LEVEL_LETTERS[level],
            **used,  # over the whole catalog, after collision resolution
            "residual_mse": sq / n,  # of this run's items, raw codes: mean ||x - sum of centroids up to l||^2
            "relative_residual": sq / assigned.encoded.input_sq_norm if assigned.encoded.input_sq_norm else 0.0,
        })
    raw_unique = len(np.unique(pack_codes(assigned.encoded.codes, codebook_size)))
    return {
        "levels": levels,
        "unique_raw_code_tuples": raw_unique,
        "collisions": assigned.collisions.to_dict(),
    }


def _write_outputs(out_dir: str, overwrite: bool, codebooks: RQCodebooks, catalog: ItemCatalog, manifest: dict):
    with atomic_directory(out_dir, overwrite) as tmp:
        codebooks.save(os.path.join(tmp, CODEBOOKS_FILE), metadata={"format": FORMAT})
        catalog.save(tmp)
        with open(os.path.join(tmp, MANIFEST_FILE), "w") as f:
            json.dump(manifest, f, indent=2)


def _inputs_manifest(inputs: CatalogInputs, source: EmbeddingSource, encoded: EncodedItems) -> dict:
    return {
        "embeddings": {
            "path": os.path.abspath(inputs.embeddings),
            "key": inputs.embeddings_key,
            "dtype": source.dtype,
            "shape": [source.num_items, source.dim],
            "sha256_float32": encoded.sha256_float32,
        },
        "ids": {"path": os.path.abspath(inputs.ids), "sha256": file_sha256(inputs.ids),
                "id_column": inputs.id_column, "domain_column": inputs.domain_column, "domain": inputs.domain},
    }


def _manifest(codebooks: RQCodebooks, catalog: ItemCatalog, training: dict, inputs: dict, stats: dict) -> dict:
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "levels": codebooks.levels,
        "codebook_size": codebooks.codebook_size,
        "dim": codebooks.dim,
        "num_items": len(catalog),
        "items_per_domain": dict(sorted(Counter(catalog.domains).items())),
        "training": training,
        "inputs": inputs,
        "statistics": stats,
        "files": {"codebooks": CODEBOOKS_FILE, "catalog": "catalog.parquet", "reverse_map": "codes_to_item.parquet",
                  "manifest": MANIFEST_FILE},
    }


def build_itemic_tokenizer(
    inputs: CatalogInputs, config: RQKMeansConfig, out_dir: str, overwrite: bool = False
) -> BuildResult:
    """Train codebooks on the items of ``inputs``, assign every item a unique code tuple, write ``out_dir``."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite to replace it)")
    source, item_ids, domains = _read_inputs(inputs)
    log.info("building itemic tokenizer: %d items x %d dims (%s), %d levels x %d codes",
             source.num_items, source.dim, source.dtype, config.levels, config.codebook_size)
    start = time.time()
    train_x = sample_training_rows(source, config)
    codebooks = train_rq_kmeans(train_x, config)
    train_seconds = time.time() - start
    assigned = assign_items(codebooks, source, item_ids, domains, chunk_size=config.chunk_size)
    training = {"seed": config.seed, "niter": config.niter, "train_sample_size": len(train_x),
                "sample": "numpy default_rng(seed).choice without replacement, sorted; faiss seed = seed + level"}
    del train_x
    manifest = _manifest(codebooks, assigned.catalog, training,
                         _inputs_manifest(inputs, source, assigned.encoded),
                         _statistics(assigned, config.codebook_size))
    start = time.time()
    _write_outputs(out_dir, overwrite, codebooks, assigned.catalog, manifest)
    seconds = {"train": train_seconds, **assigned.seconds, "write": time.time() - start}
    log.info("wrote %s: %d items, %d moved by collisions (%s)", out_dir, len(assigned.catalog),
             assigned.collisions.moved, ", ".join(f"{k} {v:.1f}s" for k, v in seconds.items()))
    return BuildResult(assigned.catalog, codebooks, manifest, seconds)


def load_codebooks(tokenizer_dir: str) -> RQCodebooks:
    path = os.path.join(tokenizer_dir, CODEBOOKS_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (build one with tools/build_itemic_tokenizer.py)")
    return RQCodebooks.load(path)


def extend_itemic_tokenizer(
    inputs: CatalogInputs, tokenizer_dir: str, out_dir: str, overwrite: bool = False
) -> BuildResult:
    """Add new items to the catalog in ``tokenizer_dir`` with its saved codebooks; write the result to ``out_dir``.

    Existing items keep their codes; statistics in the new manifest describe the new items (utilization: the
    whole catalog).
    """
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite to replace it)")
    codebooks = load_codebooks(tokenizer_dir)
    base = ItemCatalog.load(tokenizer_dir)
    with open(os.path.join(tokenizer_dir, MANIFEST_FILE)) as f:
        base_manifest = json.load(f)
    source, item_ids, domains = _read_inputs(inputs)
    assigned = assign_items(codebooks, source, item_ids, domains, base=base)
    training = {**base_manifest["training"], "extended_from": os.path.abspath(tokenizer_dir),
                "base_items": len(base), "base_inputs": base_manifest["inputs"]}
    manifest = _manifest(codebooks, assigned.catalog, training,
                         _inputs_manifest(inputs, source, assigned.encoded),
                         _statistics(assigned, codebooks.codebook_size))
    start = time.time()
    _write_outputs(out_dir, overwrite, codebooks, assigned.catalog, manifest)
    return BuildResult(assigned.catalog, codebooks, manifest, {**assigned.seconds, "write": time.time() - start})
