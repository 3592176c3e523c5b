"""Chunked readers for item embeddings (``.npy``, ``.safetensors``, zarr) and item-id files (text, parquet, npy).

Catalogs can hold 10M x 1024 float16 embeddings, so nothing here loads a whole matrix: ``.npy`` is memory-mapped,
safetensors is read through slices, zarr through its own chunked arrays. Every read returns float32 rows.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_onereason.tokenizer.itemic_tokens import DOMAINS


class EmbeddingSource:
    """A read-only [num_items, dim] float matrix on disk, read in row ranges."""

    path: str
    num_items: int
    dim: int
    dtype: str

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a float32 array."""
        raise NotImplementedError

    def take(self, indices: np.ndarray, span_rows: int = 65536) -> np.ndarray:
        """Rows at sorted ``indices`` as float32; reads contiguous spans of at most ``span_rows`` rows at a time."""
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.dim), dtype=np.float32)
        pos = 0
        while pos < len(indices):
            first = indices[pos]
            end = int(np.searchsorted(indices, first + span_rows, side="left"))
            block = self.read(int(first), int(indices[end - 1]) + 1)
            out[pos:end] = block[indices[pos:end] - first]
            pos = end
        return out


def _check_matrix(path: str, shape: Tuple[int, ...], dtype: str, is_float: bool) -> None:
    if len(shape) != 2:
        raise ValueError(f"{path}: embeddings must be a 2-D [items, dim] array, got shape {tuple(shape)}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"{path}: embeddings array is empty, shape {tuple(shape)}")
    if not is_float:
        raise ValueError(f"{path}: embeddings must be floating point, got dtype {dtype}")


class ArrayEmbeddings(EmbeddingSource):
    """An in-memory array, for encoding a few new items without writing them to disk first."""

    def __init__(self, array: np.ndarray, name: str = "<array>"):
        self.path = name
        self._array = np.asarray(array)
        _check_matrix(name, self._array.shape, str(self._array.dtype), np.issubdtype(self._array.dtype, np.floating))
        self.num_items, self.dim = map(int, self._array.shape)
        self.dtype = str(self._array.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._array[start:stop], dtype=np.float32)


def load_npy(path: str, mmap_mode: Optional[str] = None) -> np.ndarray:
    """``np.load`` whose errors name the file (an empty or truncated ``.npy`` says only "No data left in file")."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found") from None
    except (EOFError, ValueError, OSError) as e:
        size = os.path.getsize(path) if os.path.exists(path) else None
        what = "an empty file (0 bytes)" if size == 0 else f"not a readable .npy array ({e})"
        raise ValueError(f"{path}: {what}; write it with numpy.save") from None


class NpyEmbeddings(EmbeddingSource):
    def __init__(self, path: str):
        self.path = path
        self._array = load_npy(path, mmap_mode="r")
        _check_matrix(path, self._array.shape, str(self._array.dtype), np.issubdtype(self._array.dtype, np.floating))
        self.num_items, self.dim = map(int, self._array.shape)
        self.dtype = str(self._array.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._array[start:stop], dtype=np.float32)

    def take(self, indices: np.ndarray, span_rows: int = 65536) -> np.ndarray:
        # A memory map gathers rows directly; no span reads needed.
        return np.asarray(self._array[np.asarray(indices, dtype=np.int64)], dtype=np.float32)


def _choose_array(path: str, names: List[str], key: Optional[str]) -> str:
    """The array ``key`` of a multi-array file, or its only array when no key is given."""
    if key is None:
        if len(names) != 1:
            raise ValueError(f"{path}: holds {len(names)} tensors {names[:8]}; name one with --embeddings-key")
        return names[0]
    if key not in names:
        raise ValueError(f"{path}: no array {key!r} (has {names[:8]})")
    return key


class SafetensorsEmbeddings(EmbeddingSource):
    def __init__(self, path: str, key: Optional[str] = None):
        from safetensors import safe_open

        self.path = path
        self._file = safe_open(path, framework="pt")  # "pt" because numpy has no bfloat16
        key = _choose_array(path, list(self._file.keys()), key)
        self._slice = self._file.get_slice(key)
        shape = tuple(self._slice.get_shape())
        self.dtype = self._slice.get_dtype()
        _check_matrix(path, shape, self.dtype, self.dtype in ("F16", "BF16", "F32", "F64"))
        self.num_items, self.dim = map(int, shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        return self._slice[start:stop].float().numpy()


class ZarrEmbeddings(EmbeddingSource):
    def __init__(self, path: str, key: Optional[str] = None):
        try:
            import zarr
        except ImportError:
            raise ImportError(
                f"{path}: reading zarr embeddings needs the optional package zarr (pip install zarr)"
            ) from None
        self.path = path
        node = zarr.open(path, mode="r")
        if isinstance(node, zarr.Group):
            node = node[_choose_array(path, [name for name, _ in node.arrays()], key)]
        self._array = node
        _check_matrix(path, tuple(node.shape), str(node.dtype), np.issubdtype(node.dtype, np.floating))
        self.num_items, self.dim = map(int, node.shape)
        self.dtype = str(node.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._array[start:stop], dtype=np.float32)


def _is_zarr(path: str) -> bool:
    return path.rstrip("/").endswith(".zarr") or any(
        os.path.exists(os.path.join(path, marker)) for marker in ("zarr.json", ".zarray", ".zgroup")
    )


def open_embeddings(path: str, key: Optional[str] = None) -> EmbeddingSource:
    """Open ``path`` by its kind: ``.npy`` (memory-mapped), ``.safetensors``, or a zarr store (``.zarr`` dir)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: embeddings file not found")
    if _is_zarr(path):
        return ZarrEmbeddings(path, key)
    if path.endswith(".npy"):
        if key is not None:
            raise ValueError(f"{path}: --embeddings-key applies to safetensors/zarr inputs only")
        return NpyEmbeddings(path)
    if path.endswith(".safetensors"):
        return SafetensorsEmbeddings(path, key)
    raise ValueError(f"{path}: unknown embeddings format (expected .npy, .safetensors or a .zarr store)")


def nonfinite_rows(block: np.ndarray) -> np.ndarray:
    """Row indices of ``block`` holding a NaN or an inf."""
    return np.flatnonzero(~np.isfinite(block).all(axis=1))


def nonfinite_error(path: str, count: int, of: int, first_rows: Sequence[int], what: str = "rows") -> ValueError:
    return ValueError(
        f"{path}: {count} of {of} {what} contain NaN or inf (first at rows {list(map(int, first_rows[:5]))})"
    )


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ItemIds:
    """Item ids from an ids file, and their domains when the file carries a domain column."""

    path: str
    ids: List[str]
    domains: Optional[List[str]]


def read_item_ids(path: str, id_column: str = "item_id", domain_column: Optional[str] = None) -> ItemIds:
    """Read item ids (as strings) from ``.txt`` (one per line), ``.parquet`` (``id_column``) or ``.npy`` (1-D).

    ``domain_column`` (parquet only) gives each item's domain. Duplicate ids, empty ids and unknown domains
    raise a ``ValueError`` naming the file and the count.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: ids file not found")
    domains = None
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        columns = [id_column] + ([domain_column] if domain_column else [])
        available = pq.read_schema(path).names
        missing = [c for c in columns if c not in available]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (has {available})")
        table = pq.read_table(path, columns=columns)
        ids = [str(v) for v in table.column(id_column).to_pylist()]
        if domain_column:
            domains = [str(v) for v in table.column(domain_column).to_pylist()]
    elif domain_column:
        raise ValueError(f"{path}: a domain column needs a parquet ids file")
    elif path.endswith(".npy"):
        array = load_npy(path)
        if array.ndim != 1:
            raise ValueError(f"{path}: ids array must be 1-D, got shape {array.shape}")
        ids = [str(v) for v in array.tolist()]
    else:
        with open(path, encoding="utf-8") as f:
            ids = [line.strip() for line in f.read().splitlines()]
        while ids and ids[-1] == "":  # a trailing newline is not an item
            ids.pop()
    _check_ids(path, ids)
    if domains is not None:
        _check_domains(path, domains)
    return ItemIds(path=path, ids=ids, domains=domains)


def _check_ids(path: str, ids: List[str]) -> None:
    empty = [i for i, v in enumerate(ids) if v == ""]
    if empty:
        raise ValueError(f"{path}: {len(empty)} empty item ids (first at rows {empty[:5]})")
    if len(set(ids)) != len(ids):
        dup = [v for v, c in Counter(ids).items() if c > 1]
        raise ValueError(f"{path}: {len(dup)} item ids occur more than once, e.g. {dup[:5]}")


def _check_domains(path: str, domains: List[str]) -> None:
    bad = Counter(d for d in domains if d not in DOMAINS)
    if bad:
        raise ValueError(
            f"{path}: {sum(bad.values())} items have an unknown domain {sorted(bad)[:5]} (known: {DOMAINS})"
        )
