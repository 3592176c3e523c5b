"""Chunked readers for item embeddings (``.npy``, ``.safetensors``, zarr, parquet), item-id files (text, parquet,
npy) and given item codes (parquet).

Catalogs can hold 10M x 1024 float16 embeddings, so nothing here loads a whole matrix: ``.npy`` is memory-mapped,
safetensors is read through slices, zarr through its own chunked arrays, parquet (OpenOneRec's ``pid``,
``embedding`` list column) row group by row group. Every read returns float32 rows. A codes parquet (OpenOneRec's
``pid2sid`` with a ``sid`` list column, or their tokenizer's output with ``codes``) gives each item its code tuple.
"""
from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_onereason.tokenizer.itemic_tokens import is_domain_name


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


class NpyEmbeddings(EmbeddingSource):
    def __init__(self, path: str):
        self.path = path
        self._array = np.load(path, mmap_mode="r")
        _check_matrix(path, self._array.shape, str(self._array.dtype), np.issubdtype(self._array.dtype, np.floating))
        self.num_items, self.dim = map(int, self._array.shape)
        self.dtype = str(self._array.dtype)

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self._array[start:stop], dtype=np.float32)

    def take(self, indices: np.ndarray, span_rows: int = 65536) -> np.ndarray:
        # A memory map gathers rows directly; no span reads needed.
        return np.asarray(self._array[np.asarray(indices, dtype=np.int64)], dtype=np.float32)


class ParquetEmbeddings(EmbeddingSource):
    """A list-of-floats column of a parquet file (OpenOneRec's ``embedding``), read one row group at a time."""

    def __init__(self, path: str, key: Optional[str] = None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = path
        self.column = key or "embedding"
        try:
            self._file = pq.ParquetFile(path)
        except (pa.ArrowException, OSError) as e:
            raise ValueError(f"{path}: not a readable parquet file ({e})") from None
        schema = self._file.schema_arrow
        if self.column not in schema.names:
            raise ValueError(f"{path}: no embeddings column {self.column!r} (has {schema.names}); name it with "
                             "--embeddings-key")
        field = schema.field(self.column).type
        if not (pa.types.is_list(field) or pa.types.is_large_list(field) or pa.types.is_fixed_size_list(field)) \
                or not pa.types.is_floating(field.value_type):
            raise ValueError(f"{path}: field {self.column!r} must be a list of floats, got {field}")
        self.dtype = str(field.value_type)
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self.num_items = int(self._starts[-1])
        self._cached: Tuple[int, Optional[np.ndarray]] = (-1, None)
        self.dim: Optional[int] = None
        self.dim = self._group(0).shape[1] if self.num_items else 0
        _check_matrix(path, (self.num_items, self.dim), self.dtype, True)

    def _group(self, i: int) -> np.ndarray:
        if self._cached[0] != i:
            column = self._file.read_row_group(i, columns=[self.column]).column(0).combine_chunks()
            lengths = list_lengths(column)
            dim = lengths[0] if len(lengths) else 0
            if column.null_count or (lengths != dim).any() or (self.dim is not None and dim != self.dim):
                raise ValueError(f"{self.path}: field {self.column!r}: rows {self._starts[i]}..{self._starts[i + 1]} "
                                 f"hold null embeddings or lengths other than {self.dim or dim}")
            values = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            self._cached = (i, values.reshape(len(column), dim))
        return self._cached[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        out = []
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        for i in range(first, len(self._starts) - 1):
            lo, hi = int(self._starts[i]), int(self._starts[i + 1])
            if lo >= stop:
                break
            out.append(self._group(i)[max(start, lo) - lo:min(stop, hi) - lo])
        return np.concatenate(out) if out else np.zeros((0, self.dim), np.float32)


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
    """Open ``path`` by its kind: ``.npy`` (memory-mapped), ``.safetensors``, ``.parquet`` (``key``: the list
    column, default ``embedding``), or a zarr store (``.zarr`` dir)."""
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
    if path.endswith(".parquet"):
        return ParquetEmbeddings(path, key)
    raise ValueError(f"{path}: unknown embeddings format (expected .npy, .safetensors, .parquet or a .zarr store)")


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

    ``domain_column`` (parquet only) gives each item's domain. Duplicate ids, empty ids and malformed domain names
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
        array = np.load(path, allow_pickle=False)
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
    bad = Counter(d for d in domains if not is_domain_name(d))
    if bad:
        raise ValueError(f"{path}: {sum(bad.values())} items have a domain that is not a lower-case identifier, e.g. "
                         f"{sorted(bad)[:5]}")


def list_lengths(column) -> np.ndarray:
    """Element counts of the rows of a pyarrow list / large list / fixed-size list array (int64)."""
    if hasattr(column, "offsets"):
        return np.diff(column.offsets.to_numpy()).astype(np.int64)
    return np.full(len(column), column.type.list_size, dtype=np.int64)


@dataclass
class ItemCodes:
    """Given code tuples per item (a codes / pid2sid parquet), with the items' domains when the file has them."""

    path: str
    ids: List[str]
    domains: Optional[List[str]]
    codes: np.ndarray  # int64 [n, levels]


CODES_COLUMNS = ("sid", "codes")  # OpenOneRec's pid2sid files, and their tokenizer's inference output


def read_item_codes(path: str, codebook_size: int, id_column: str = "pid", codes_column: Optional[str] = None,
                    domain_column: Optional[str] = None) -> ItemCodes:
    """Ids and code tuples of a parquet file; every tuple must have the same length and codes in
    ``[0, codebook_size)`` — otherwise one ``ValueError`` naming the file, the field and the first bad row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        names = pq.read_schema(path).names
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({e})") from None
    if codes_column is None:
        found = [c for c in CODES_COLUMNS if c in names]
        if len(found) != 1:
            raise ValueError(f"{path}: expected one codes column of {list(CODES_COLUMNS)} (has {names}); name it "
                             "with --codes-column")
        codes_column = found[0]
    wanted = [id_column, codes_column] + ([domain_column] if domain_column else [])
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (has {names})")
    table = pq.read_table(path, columns=wanted)
    column = table.column(codes_column).combine_chunks()
    if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
            or pa.types.is_fixed_size_list(column.type)) or not pa.types.is_integer(column.type.value_type):
        raise ValueError(f"{path}: field {codes_column!r} must be a list of integers, got {column.type}")
    if len(column) == 0:
        raise ValueError(f"{path}: no rows")
    if column.null_count:
        raise ValueError(f"{path}: field {codes_column!r}: {column.null_count} rows have no codes (null)")
    lengths = list_lengths(column)
    bad = np.flatnonzero(lengths != lengths[0])
    if len(bad) or lengths[0] < 1:
        row = int(bad[0]) if len(bad) else 0
        raise ValueError(f"{path}: field {codes_column!r}: every row needs the same number of codes (row 0 has "
                         f"{lengths[0]}, row {row} has {lengths[row]})")
    codes = column.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(len(column), int(lengths[0]))
    outside = np.flatnonzero(((codes < 0) | (codes >= codebook_size)).any(axis=1))
    if len(outside):
        row = int(outside[0])
        raise ValueError(f"{path}: field {codes_column!r}: {len(outside)} rows have codes outside [0, {codebook_size})"
                         f" (first at row {row}: {codes[row].tolist()})")
    ids = [str(v) for v in table.column(id_column).to_pylist()]
    _check_ids(path, ids)
    domains = None
    if domain_column:
        domains = [str(v) for v in table.column(domain_column).to_pylist()]
        _check_domains(path, domains)
    return ItemCodes(path, ids, domains, codes)
