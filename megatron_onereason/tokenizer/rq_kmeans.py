"""Residual k-means (RQ-KMeans) codebooks: training on residuals level by level, and nearest-centroid encoding.

Level 0 clusters the embeddings; level ``l`` clusters what is left after subtracting the chosen centroids of levels
``< l`` (OneReason §4.1, OpenOneRec §2.1: 3 levels x 8192 codes). An item's codes are the nearest centroid at each
level on its running residual, so items sharing a prefix are close in embedding space.

faiss-cpu does the clustering and the exact L2 search: on the 2-core CPU box it ran a 65k x 8192 x 256 nearest
centroid search at ~69 GFLOP/s, against ~50 for numpy and ~40 for torch matmul + argmin.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Tuple

import numpy as np

from megatron_onereason.extras import import_optional
from megatron_onereason.tokenizer.code_keys import check_key_space
from megatron_onereason.tokenizer.embedding_io import EmbeddingSource, nonfinite_error, nonfinite_rows
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_CODEBOOK_SIZE, DEFAULT_LEVELS, LEVEL_LETTERS

if TYPE_CHECKING:
    import faiss

log = logging.getLogger(__name__)


def import_faiss():
    """faiss-cpu, the ``tokenizer`` extra (imported when codes are trained or encoded, not at import)."""
    return import_optional("faiss", "tokenizer", "RQ-KMeans item codes")

CODEBOOKS_FILE = "codebooks.safetensors"


@dataclass
class RQKMeansConfig:
    """How to train the codebooks."""

    levels: int = DEFAULT_LEVELS
    codebook_size: int = DEFAULT_CODEBOOK_SIZE
    seed: int = 0
    niter: int = 20
    # k-means trains on a fixed random subset of this many items (0: all items); 64 points per centroid at 8192
    # codes, enough for stable centroids while keeping a 10M catalog's training to one sample in RAM.
    train_sample_size: int = 64 * DEFAULT_CODEBOOK_SIZE
    chunk_size: int = 65536  # rows read and encoded at a time

    def __post_init__(self):
        if not 1 <= self.levels <= len(LEVEL_LETTERS):
            raise ValueError(f"levels must be in [1, {len(LEVEL_LETTERS)}], got {self.levels}")
        check_key_space(self.levels, self.codebook_size)
        if self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.niter < 1 or self.train_sample_size < 0 or self.chunk_size < 1:
            raise ValueError(f"niter and chunk_size must be >= 1 and train_sample_size >= 0: {self}")


class RQCodebooks:
    """One [codebook_size, dim] float32 centroid matrix per level."""

    def __init__(self, centroids: List[np.ndarray]):
        if not centroids:
            raise ValueError("RQ codebooks need at least one level")
        shapes = {c.shape for c in centroids}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ValueError(
                f"all levels must share one [codebook_size, dim] shape, got {[c.shape for c in centroids]}"
            )
        self.centroids = [np.ascontiguousarray(c, dtype=np.float32) for c in centroids]
        self._indexes: Optional[List[faiss.IndexFlatL2]] = None

    @property
    def levels(self) -> int:
        return len(self.centroids)

    @property
    def codebook_size(self) -> int:
        return self.centroids[0].shape[0]

    @property
    def dim(self) -> int:
        return self.centroids[0].shape[1]

    def _level_indexes(self) -> List[faiss.IndexFlatL2]:
        if self._indexes is None:
            faiss = import_faiss()
            self._indexes = []
            for c in self.centroids:
                index = faiss.IndexFlatL2(self.dim)
                index.add(c)
                self._indexes.append(index)
        return self._indexes

    def encode(self, x: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Nearest-centroid codes per level on running residuals.

        Returns ``codes`` int32 [n, levels] and ``sq_error`` float32 [n, levels], where ``sq_error[:, l]`` is the
        squared norm of the residual left after level ``l`` (faiss's search distance).
        """
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected [n, {self.dim}] embeddings, got shape {x.shape}")
        residual = np.array(x, dtype=np.float32, order="C", copy=True)
        codes = np.empty((x.shape[0], self.levels), dtype=np.int32)
        sq_error = np.empty((x.shape[0], self.levels), dtype=np.float32)
        for level, index in enumerate(self._level_indexes()):
            dist, nearest = index.search(residual, 1)
            codes[:, level] = nearest[:, 0]
            sq_error[:, level] = np.maximum(dist[:, 0], 0.0)
            residual -= self.centroids[level][nearest[:, 0]]
        return codes, sq_error

    def reconstruct(self, codes: np.ndarray) -> np.ndarray:
        """Sum of the chosen centroids of every level: float32 [n, dim]."""
        codes = np.asarray(codes)
        out = np.zeros((codes.shape[0], self.dim), dtype=np.float32)
        for level in range(codes.shape[1]):
            out += self.centroids[level][codes[:, level]]
        return out

    def save(self, path: str, metadata: Optional[Dict[str, str]] = None) -> None:
        from safetensors.numpy import save_file

        tensors = {f"level_{i}": c for i, c in enumerate(self.centroids)}
        save_file(tensors, path, metadata={"levels": str(self.levels), **(metadata or {})})

    @classmethod
    def load(cls, path: str) -> "RQCodebooks":
        """This project's ``codebooks.safetensors`` (``level_{l}``), or OpenOneRec's ``model.pt``: the state dict of
        their ``ResKmeans`` (``centroids.{l}``, possibly under ``model`` / ``state_dict``), read with
        ``weights_only`` (a pickled module object is refused)."""
        if path.endswith(".safetensors"):
            from safetensors.numpy import load_file

            tensors, prefix = load_file(path), "level_"
        else:
            tensors, prefix = _torch_state(path), "centroids."
        levels = len(tensors)
        names = [f"{prefix}{i}" for i in range(levels)]
        if levels == 0 or sorted(tensors) != sorted(names):
            raise ValueError(f"{path}: expected tensors {prefix}0 .. {prefix}{{L-1}}, found {sorted(tensors)[:8]}")
        centroids = [np.asarray(tensors[name], dtype=np.float32) for name in names]
        for name, c in zip(names, centroids):
            if c.ndim != 2 or not np.isfinite(c).all():
                raise ValueError(f"{path}: {name} must be a finite [codebook_size, dim] matrix, got shape {c.shape}")
        try:
            return cls(centroids)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


def _torch_state(path: str) -> Dict[str, np.ndarray]:
    """The ``centroids.*`` tensors of a torch checkpoint as float32 numpy arrays."""
    import pickle

    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path}: not a readable state dict of codebooks ({first}); save the ResKmeans state dict "
                         "(torch.save(model.state_dict(), path))") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds a {type(state).__name__}, not a state dict of codebooks")
    return {k: v.float().numpy() for k, v in state.items() if k.startswith("centroids.") and hasattr(v, "numpy")}


def sample_training_rows(source: EmbeddingSource, config: RQKMeansConfig) -> np.ndarray:
    """The fixed training subset (seeded numpy Generator, sorted rows) as float32 [S, dim].

    Raises if the codebook is larger than the subset, or if any sampled row holds NaN/inf.
    """
    n = source.num_items
    size = n if config.train_sample_size == 0 else min(config.train_sample_size, n)
    if config.codebook_size > size:
        raise ValueError(
            f"{source.path}: codebook size {config.codebook_size} is larger than the {size} training items "
            f"({n} items in the file)"
        )
    rows = np.arange(n) if size == n else np.sort(np.random.default_rng(config.seed).choice(n, size, replace=False))
    x = np.empty((size, source.dim), dtype=np.float32)
    start_time = time.time()
    for start in range(0, size, config.chunk_size):
        x[start:start + config.chunk_size] = source.take(rows[start:start + config.chunk_size])
    log.info("read %d of %d rows of %s for training in %.1fs", size, n, source.path, time.time() - start_time)
    bad = nonfinite_rows(x)
    if len(bad):
        raise nonfinite_error(source.path, len(bad), size, rows[bad], what="sampled training rows")
    return x


def train_rq_kmeans(x: np.ndarray, config: RQKMeansConfig) -> RQCodebooks:
    """Train ``config.levels`` codebooks on ``x`` [S, dim] float32, each on the residuals of the previous ones.

    Deterministic for a given ``x`` and seed (level ``l`` uses faiss seed ``seed + l``; faiss's own subsampling is
    disabled so the caller's sample is the training set).
    """
    size, dim = x.shape
    if config.codebook_size > size:
        raise ValueError(f"codebook size {config.codebook_size} is larger than the {size} training items")
    residual = np.array(x, dtype=np.float32, order="C", copy=True)
    faiss = import_faiss()
    centroids = []
    for level in range(config.levels):
        start = time.time()
        kmeans = faiss.Kmeans(
            dim,
            config.codebook_size,
            niter=config.niter,
            seed=config.seed + level,
            max_points_per_centroid=math.ceil(size / config.codebook_size) + 1,
            min_points_per_centroid=1,  # small catalogs are legitimate; silence faiss's warning
            verbose=False,
        )
        kmeans.train(residual)
        level_centroids = np.ascontiguousarray(kmeans.centroids, dtype=np.float32)
        _, nearest = kmeans.index.search(residual, 1)
        residual -= level_centroids[nearest[:, 0]]
        centroids.append(level_centroids)
        log.info(
            "rq-kmeans level %s: %d items x %d codes, %d iters in %.1fs, residual mse %.5g",
            LEVEL_LETTERS[level], size, config.codebook_size, config.niter, time.time() - start,
            float(np.mean(np.sum(residual.astype(np.float64) ** 2, axis=1))),
        )
    return RQCodebooks(centroids)


def code_usage(codes: np.ndarray, codebook_size: int) -> List[Dict[str, float]]:
    """Per level: codes used, utilization (used / size) and perplexity (exp of the code-frequency entropy)."""
    out = []
    for level in range(codes.shape[1]):
        counts = np.bincount(codes[:, level], minlength=codebook_size)
        p = counts[counts > 0] / codes.shape[0]
        used = int((counts > 0).sum())
        out.append({
            "codes_used": used,
            "utilization": used / codebook_size,
            "perplexity": float(np.exp(-(p * np.log(p)).sum())),
        })
    return out
