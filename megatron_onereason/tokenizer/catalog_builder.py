"""Build an itemic tokenizer directory from item embeddings, or extend one with new items (no retraining).

Pipeline: read ids (+ domains) -> sample the training rows -> train RQ-KMeans codebooks -> encode every item in
chunks (checksumming and NaN-checking as it goes) -> resolve code collisions -> write the directory atomically
(a temp dir renamed into place, so a failed run leaves nothing that looks valid).

Interop with OpenOneRec's tokenizer artefacts: ``codebooks_path`` takes codebooks instead of training them (their
``model.pt`` with ``centroids.{l}``, or a ``codebooks.safetensors``) to encode new items; embeddings may be their
parquet (``pid``, ``embedding``); :func:`catalog_from_codes` builds the catalog from given codes (their
``pid2sid`` / codes parquet), keeping tuples shared by several items (counted in the manifest) or resolving them
with the collision resolution, which needs the codebooks and embeddings.

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
from megatron_onereason.metrics_log import RateLog
from megatron_onereason.tokenizer.code_collisions import CollisionReport, resolve_collisions
from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.embedding_io import (
    EmbeddingSource,
    file_sha256,
    nonfinite_error,
    nonfinite_rows,
    open_embeddings,
    read_item_codes,
    read_item_ids,
)
from megatron_onereason.tokenizer.item_catalog import MANIFEST_FILE, ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import LEVEL_LETTERS, is_domain_name
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
    codebooks: Optional[RQCodebooks]  # None for a catalog of given codes without codebooks
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
    catalog = ItemCatalog(item_ids, domains, codes, codebooks.codebook_size,
                          shared_codes=base is not None and base.shared_codes)
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


def _write_outputs(out_dir: str, overwrite: bool, codebooks: Optional[RQCodebooks], catalog: ItemCatalog,
                   manifest: dict):
    with atomic_directory(out_dir, overwrite) as tmp:
        if codebooks is not None:
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


def _manifest(codebooks: Optional[RQCodebooks], catalog: ItemCatalog, training: dict, inputs: dict,
              stats: dict) -> dict:
    files = {"codebooks": CODEBOOKS_FILE, "catalog": "catalog.parquet", "reverse_map": "codes_to_item.parquet",
             "manifest": MANIFEST_FILE}
    if codebooks is None:
        del files["codebooks"]
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "levels": catalog.levels,
        "codebook_size": catalog.codebook_size,
        "dim": None if codebooks is None else codebooks.dim,
        "num_items": len(catalog),
        "items_per_domain": dict(sorted(Counter(catalog.domains).items())),
        "shared_codes": {"kept": catalog.shared_codes, "tuples": catalog.shared_tuples,
                         "items": catalog.items_on_shared_tuples},
        "training": training,
        "inputs": inputs,
        "statistics": stats,
        "files": files,
    }


def build_itemic_tokenizer(
    inputs: CatalogInputs, config: RQKMeansConfig, out_dir: str, overwrite: bool = False,
    codebooks_path: Optional[str] = None,
) -> BuildResult:
    """Train codebooks on the items of ``inputs`` (or take them from ``codebooks_path``: no training, and
    ``config``'s levels / codebook size are those of the file), assign every item a unique code tuple, write
    ``out_dir``."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite to replace it)")
    source, item_ids, domains = _read_inputs(inputs)
    start = time.time()
    if codebooks_path is not None:
        codebooks = RQCodebooks.load(codebooks_path)
        training = {"imported_codebooks": os.path.abspath(codebooks_path), "sha256": file_sha256(codebooks_path)}
    else:
        log.info("building itemic tokenizer: %d items x %d dims (%s), %d levels x %d codes",
                 source.num_items, source.dim, source.dtype, config.levels, config.codebook_size)
        train_x = sample_training_rows(source, config)
        codebooks = train_rq_kmeans(train_x, config)
        training = {"seed": config.seed, "niter": config.niter, "train_sample_size": len(train_x),
                    "sample": "numpy default_rng(seed).choice without replacement, sorted; faiss seed = seed + level"}
        del train_x
    train_seconds = time.time() - start
    assigned = assign_items(codebooks, source, item_ids, domains, chunk_size=config.chunk_size)
    manifest = _manifest(codebooks, assigned.catalog, training,
                         _inputs_manifest(inputs, source, assigned.encoded),
                         _statistics(assigned, config.codebook_size))
    start = time.time()
    _write_outputs(out_dir, overwrite, codebooks, assigned.catalog, manifest)
    seconds = {"train" if codebooks_path is None else "load": train_seconds, **assigned.seconds,
               "write": time.time() - start}
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


@dataclass
class CodesInputs:
    """Items whose codes are given (OpenOneRec's ``pid2sid`` / codes parquet), not computed."""

    codes: str  # parquet: an id column and a list-of-integers codes column
    id_column: str = "pid"
    codes_column: Optional[str] = None  # default: "sid" or "codes", whichever the file has
    domain: Optional[str] = None  # every item in this domain ...
    domain_column: Optional[str] = None  # ... or each item's domain from this column


def catalog_from_codes(
    inputs: CodesInputs, out_dir: str, codebook_size: Optional[int] = None, codebooks_path: Optional[str] = None,
    resolve_shared: bool = False, embeddings: Optional[str] = None, embeddings_key: Optional[str] = None,
    overwrite: bool = False,
) -> BuildResult:
    """A catalog with the given codes. Tuples held by several items are kept (``shared_codes``: recorded and
    counted) unless ``resolve_shared``: then every item after a tuple's first holder moves to the nearest free
    tuple, as the collision resolution does for trained codes — with the codebooks and the items' embeddings (rows
    in the order of the codes file). The codebook size comes from the codebooks when given."""
    if os.path.exists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (pass overwrite to replace it)")
    if (inputs.domain is None) == (inputs.domain_column is None):
        raise ValueError("give exactly one of a domain for all items or a domain column of the codes file")
    if inputs.domain is not None and not is_domain_name(inputs.domain):
        raise ValueError(f"domain {inputs.domain!r} is not a lower-case identifier")
    codebooks = RQCodebooks.load(codebooks_path) if codebooks_path else None
    size = codebooks.codebook_size if codebooks is not None else codebook_size
    if size is None:
        raise ValueError("the codebook size is unknown: pass the codebooks or a codebook size")
    given = read_item_codes(inputs.codes, size, inputs.id_column, inputs.codes_column, inputs.domain_column)
    if codebooks is not None and given.codes.shape[1] != codebooks.levels:
        raise ValueError(f"{inputs.codes}: items have {given.codes.shape[1]} codes, {codebooks_path} has "
                         f"{codebooks.levels} levels")
    domains = given.domains if given.domains is not None else [inputs.domain] * len(given.ids)
    codes, report, start = given.codes, None, time.time()
    if resolve_shared:
        if codebooks is None or embeddings is None:
            raise ValueError("resolving shared codes needs the codebooks and the items' embeddings")
        source = open_embeddings(embeddings, embeddings_key)
        if source.num_items != len(given.ids):
            raise ValueError(f"length mismatch: {inputs.codes} has {len(given.ids)} items, {embeddings} has "
                             f"{source.num_items} embeddings")
        codes, report = resolve_collisions(codes, codebooks, source.take)
    catalog = ItemCatalog(given.ids, domains, codes, size, shared_codes=not resolve_shared)
    seconds = {"collisions": time.time() - start}
    stats = {"levels": [{"level": lvl, "letter": LEVEL_LETTERS[lvl], **used}
                        for lvl, used in enumerate(code_usage(catalog.codes, size))]}
    if report is not None:
        stats["collisions"] = report.to_dict()
    inputs_manifest = {"codes": {"path": os.path.abspath(inputs.codes), "sha256": file_sha256(inputs.codes),
                                 "id_column": inputs.id_column, "codes_column": inputs.codes_column,
                                 "domain_column": inputs.domain_column, "domain": inputs.domain}}
    training = {"given_codes": os.path.abspath(inputs.codes)}
    if codebooks_path:
        training.update(imported_codebooks=os.path.abspath(codebooks_path), sha256=file_sha256(codebooks_path))
    manifest = _manifest(codebooks, catalog, training, inputs_manifest, stats)
    start = time.time()
    _write_outputs(out_dir, overwrite, codebooks, catalog, manifest)
    seconds["write"] = time.time() - start
    log.info("wrote %s: %d items with given codes, %d tuples shared by %d items (%s)", out_dir, len(catalog),
             catalog.shared_tuples, catalog.items_on_shared_tuples, "resolved" if resolve_shared else "kept")
    return BuildResult(catalog, codebooks, manifest, seconds)
