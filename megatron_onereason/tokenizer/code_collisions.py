"""Make item codes unique: no two items may share a full code tuple (a, b, c).

Rule: items keep their raw RQ codes unless an *earlier* item (input order; items of an existing catalog count as
earlier than all new ones) already has the same tuple. Every raw tuple's first holder is reserved up front, so a
moved item never pushes out an item that did not collide. A moved item takes the nearest free code of the last level
under its own prefix; if that prefix is full it takes the next-nearest prefix one level up (nearest by the
residual at that level), and so on, so it keeps its first-level code whenever that subtree has room. Distances are
the residual-to-centroid distances of RQ-KMeans, so "nearest" means "smallest reconstruction error".
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from megatron_onereason.metrics_log import RateLog
from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.rq_kmeans import RQCodebooks

log = logging.getLogger(__name__)

_PRECOMPUTED_CANDIDATES = 64  # nearest last-level codes ranked in one batched matmul per chunk of moved items


@dataclass
class CollisionReport:
    items: int  # items resolved in this call (not counting an existing catalog)
    moved: int  # items whose raw code tuple was already held by an earlier item
    # moved items by the first level whose code changed: [a changed, b changed (a kept), ..., only the last changed]
    moved_by_first_changed_level: List[int]
    # mean / max of ||x - recon(new codes)|| - ||x - recon(raw codes)|| over moved items (0 when none moved)
    mean_extra_distance: float
    max_extra_distance: float

    @property
    def moved_fraction(self) -> float:
        return self.moved / self.items if self.items else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "moved_fraction": self.moved_fraction}


class _Occupancy:
    """Which full code keys are taken: a sorted array of reserved keys plus the keys added while resolving."""

    def __init__(self, reserved_keys: np.ndarray, levels: int, codebook_size: int):
        self.reserved = reserved_keys  # sorted, unique int64
        self.added = set()
        self.levels = levels
        self.codebook_size = codebook_size
        # subtree_size[l]: number of full codes under one prefix of length l
        self.subtree_size = [codebook_size ** (levels - length) for length in range(levels + 1)]
        self.added_under = [dict() for _ in range(levels)]  # prefix length -> {prefix key: keys added under it}

    def is_used(self, key: int) -> bool:
        if key in self.added:
            return True
        i = int(np.searchsorted(self.reserved, key))
        return i < len(self.reserved) and int(self.reserved[i]) == key

    def count_under(self, prefix_key: int, length: int) -> int:
        lo = prefix_key * self.subtree_size[length]
        hi = lo + self.subtree_size[length]
        reserved = int(np.searchsorted(self.reserved, hi)) - int(np.searchsorted(self.reserved, lo))
        return reserved + self.added_under[length].get(prefix_key, 0)

    def add(self, codes: Sequence[int]) -> None:
        key = 0
        for length, code in enumerate(codes, start=1):
            key = key * self.codebook_size + int(code)
            if length < self.levels:
                self.added_under[length][key] = self.added_under[length].get(key, 0) + 1
        self.added.add(key)


def _nearest_order(residuals: np.ndarray, centroids: np.ndarray, first: Optional[int] = None) -> np.ndarray:
    """Codes nearest-first for each residual row: int64 [m, K], or only the ``first`` nearest ones [m, first].

    Ties go to the lower code (for a truncated order, except an exact tie across its cut, which argpartition
    settles deterministically).
    """
    dist = (centroids * centroids).sum(axis=1)[None, :] - 2.0 * residuals @ centroids.T
    if first is None or first >= dist.shape[1]:
        return np.argsort(dist, axis=1, kind="stable")
    top = np.argpartition(dist, first - 1, axis=1)[:, :first]
    return np.take_along_axis(top, np.lexsort((top, np.take_along_axis(dist, top, axis=1)), axis=-1), axis=1)


class _Resolver:
    def __init__(self, codebooks: RQCodebooks, occupancy: _Occupancy):
        self.codebooks = codebooks
        self.occupancy = occupancy

    def nearest_free(self, residual: np.ndarray, prefix: Tuple[int, ...], order: Optional[np.ndarray] = None):
        """Nearest-first depth-first search for a free full code under ``prefix``; None if its subtree is full.

        ``residual`` is the item's residual at level ``len(prefix)``; ``order`` its precomputed code order there.
        """
        level = len(prefix)
        centroids = self.codebooks.centroids[level]
        if order is None:
            order = _nearest_order(residual[None, :], centroids)[0]
        prefix_key = 0
        for code in prefix:
            prefix_key = prefix_key * self.codebooks.codebook_size + code
        last = level == self.codebooks.levels - 1
        for code in order.tolist():
            key = prefix_key * self.codebooks.codebook_size + code
            if last:
                if not self.occupancy.is_used(key):
                    return prefix + (code,)
            elif self.occupancy.count_under(key, level + 1) < self.occupancy.subtree_size[level + 1]:
                # the subtree has room, so the search below cannot come back empty
                return self.nearest_free(residual - centroids[code], prefix + (code,))
        return None

    def resolve(self, raw: Tuple[int, ...], residuals: List[np.ndarray], last_order: np.ndarray) -> Tuple[int, ...]:
        """New codes for an item whose raw codes are taken: vary the last level first, then climb."""
        levels = self.codebooks.levels
        # the precomputed nearest few codes of the last level usually suffice; else search its full order
        found = self.nearest_free(residuals[-1], raw[:-1], last_order)
        for level in range(levels - 1, -1, -1):
            if found is None:
                found = self.nearest_free(residuals[level], raw[:level])
            if found is not None:
                self.occupancy.add(found)
                return found
        raise RuntimeError(f"no free code for {raw} although the catalog capacity was checked")


def resolve_collisions(
    raw_codes: np.ndarray,
    codebooks: RQCodebooks,
    fetch_embeddings: Callable[[np.ndarray], np.ndarray],
    occupied_keys: Optional[np.ndarray] = None,
    chunk_size: int = 2048,
) -> Tuple[np.ndarray, CollisionReport]:
    """Unique codes for items with ``raw_codes`` [n, levels] (input order decides who keeps a contested tuple).

    ``fetch_embeddings(rows)`` returns the float32 embeddings of sorted row indices (only colliding items are
    fetched). ``occupied_keys`` are packed keys already held by an existing catalog. Returns the resolved codes
    (int32, a new array) and a report.
    """
    raw_codes = np.asarray(raw_codes)
    n, levels = raw_codes.shape
    size = codebooks.codebook_size
    occupied_keys = np.zeros(0, np.int64) if occupied_keys is None else np.asarray(occupied_keys, np.int64)
    capacity = size ** levels
    if n + len(occupied_keys) > capacity:
        raise ValueError(
            f"{n} items (+{len(occupied_keys)} already in the catalog) exceed the {capacity} distinct codes of "
            f"{levels} levels x {size}"
        )
    keys = pack_codes(raw_codes, size)
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    repeat = np.zeros(n, dtype=bool)
    repeat[1:] = sorted_keys[1:] == sorted_keys[:-1]
    collides = np.zeros(n, dtype=bool)
    collides[order[repeat]] = True
    collides |= np.isin(keys, occupied_keys)
    occupancy = _Occupancy(np.union1d(occupied_keys, keys[~collides]), levels, size)
    resolver = _Resolver(codebooks, occupancy)

    codes = raw_codes.astype(np.int32, copy=True)
    colliders = np.flatnonzero(collides)
    extra = np.zeros(len(colliders), dtype=np.float64)
    progress = RateLog(log, "collisions: moved", len(colliders))
    for start in range(0, len(colliders), chunk_size):
        rows = colliders[start:start + chunk_size]
        x = fetch_embeddings(rows).astype(np.float32)
        residuals = [x]
        for level in range(levels - 1):
            residuals.append(residuals[-1] - codebooks.centroids[level][raw_codes[rows, level]])
        last_orders = _nearest_order(residuals[-1], codebooks.centroids[-1], first=_PRECOMPUTED_CANDIDATES)
        for j, row in enumerate(rows.tolist()):
            raw = tuple(int(c) for c in raw_codes[row])
            codes[row] = resolver.resolve(raw, [r[j] for r in residuals], last_orders[j])
        x64 = x.astype(np.float64)
        extra[start:start + len(rows)] = (
            np.linalg.norm(x64 - codebooks.reconstruct(codes[rows]), axis=1)
            - np.linalg.norm(x64 - codebooks.reconstruct(raw_codes[rows]), axis=1)
        )
        progress.update(start + len(rows))
    changed = codes[colliders] != raw_codes[colliders]
    first_changed = np.argmax(changed, axis=1)
    report = CollisionReport(
        items=n,
        moved=len(colliders),
        moved_by_first_changed_level=np.bincount(first_changed, minlength=levels).tolist(),
        mean_extra_distance=float(extra.mean()) if len(extra) else 0.0,
        max_extra_distance=float(extra.max()) if len(extra) else 0.0,
    )
    return codes, report
