"""The tokens + loss-mask pair of Megatron ``IndexedDataset`` files written by ``tools/preprocess_data.py``.

A preprocessed corpus with prefix ``P`` is ``P_tokens.bin/.idx`` (int32: the vocabulary with itemic tokens is
larger than 65535) and ``P_lossmask.bin/.idx`` (uint8, 1 = the token is a loss target), one document per sample,
equal lengths, plus ``P_stats.json``. Both are plain ``megatron.core.datasets.indexed_dataset`` files, so Megatron's
own reader opens them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

TOKEN_DTYPE = np.int32
LOSSMASK_DTYPE = np.uint8


def tokens_prefix(prefix: str) -> str:
    return prefix + "_tokens"


def lossmask_prefix(prefix: str) -> str:
    return prefix + "_lossmask"


def stats_path(prefix: str) -> str:
    return prefix + "_stats.json"


def _final_paths(prefix: str) -> Tuple[str, ...]:
    """The four data files in the order they are renamed into place (indexes last: a reader needs both)."""
    t, m = tokens_prefix(prefix), lossmask_prefix(prefix)
    return t + ".bin", m + ".bin", t + ".idx", m + ".idx"


class IndexedPairWriter:
    """Writes the tokens/loss-mask pair under temporary names; :meth:`commit` renames them into place.

    Used as a context manager, it commits on a clean exit and deletes its temporary files on an exception, so a
    failed run never leaves files that look like a valid dataset.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        directory = os.path.dirname(os.path.abspath(prefix))
        os.makedirs(directory, exist_ok=True)
        self._tmp = {path: f"{path}.tmp{os.getpid()}" for path in _final_paths(prefix) + (stats_path(prefix),)}
        t, m = tokens_prefix(prefix), lossmask_prefix(prefix)
        self._tokens = IndexedDatasetBuilder(self._tmp[t + ".bin"], dtype=TOKEN_DTYPE)
        self._lossmask = IndexedDatasetBuilder(self._tmp[m + ".bin"], dtype=LOSSMASK_DTYPE)
        self.documents = 0
        self._closed = False

    def add(self, tokens: np.ndarray, lossmask: np.ndarray) -> None:
        """Append one document (one sample)."""
        tokens = np.asarray(tokens)
        lossmask = np.asarray(lossmask)
        if tokens.ndim != 1 or tokens.size == 0 or tokens.shape != lossmask.shape:
            raise ValueError(f"document {self.documents}: need equal-length non-empty 1-D arrays, got tokens "
                             f"{tokens.shape} and lossmask {lossmask.shape}")
        if tokens.min() < 0 or tokens.max() > np.iinfo(TOKEN_DTYPE).max:
            raise ValueError(f"document {self.documents}: token ids outside [0, {np.iinfo(TOKEN_DTYPE).max}]")
        if lossmask.min() < 0 or lossmask.max() > 1:
            raise ValueError(f"document {self.documents}: lossmask values must be 0 or 1")
        self._tokens.add_document(tokens.astype(TOKEN_DTYPE, copy=False), [tokens.size])
        self._lossmask.add_document(lossmask.astype(LOSSMASK_DTYPE, copy=False), [lossmask.size])
        self.documents += 1

    def commit(self, stats: Optional[Dict] = None) -> None:
        """Finish the index files, write ``P_stats.json`` (the document count plus ``stats``), rename into place.

        The stats file is always rewritten, so a stale one from an earlier run never describes the new files.
        """
        t, m = tokens_prefix(self.prefix), lossmask_prefix(self.prefix)
        self._tokens.finalize(self._tmp[t + ".idx"])
        self._lossmask.finalize(self._tmp[m + ".idx"])
        with open(self._tmp[stats_path(self.prefix)], "w") as f:
            json.dump({"documents": self.documents, **(stats or {})}, f, indent=2, sort_keys=True)
        for path in _final_paths(self.prefix) + (stats_path(self.prefix),):
            os.replace(self._tmp[path], path)
        self._closed = True

    def abort(self) -> None:
        """Close and delete all temporary files."""
        for builder in (self._tokens, self._lossmask):
            builder.data_file.close()
        for tmp in self._tmp.values():
            if os.path.exists(tmp):
                os.remove(tmp)
        self._closed = True

    def __enter__(self) -> "IndexedPairWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.commit()
        else:
            self.abort()


@dataclass
class IndexedPair:
    """A preprocessed corpus opened with Megatron's reader: documents of tokens and their loss-target masks."""

    prefix: str
    tokens: IndexedDataset
    lossmask: IndexedDataset

    @classmethod
    def open(cls, prefix: str) -> "IndexedPair":
        for p in (tokens_prefix(prefix), lossmask_prefix(prefix)):
            if not IndexedDataset.exists(p):
                raise FileNotFoundError(f"{p}.bin/.idx: not found (run tools/preprocess_data.py first)")
        tokens = IndexedDataset(tokens_prefix(prefix))
        lossmask = IndexedDataset(lossmask_prefix(prefix))
        if tokens.index.dtype != TOKEN_DTYPE or lossmask.index.dtype != LOSSMASK_DTYPE:
            raise ValueError(f"{prefix}: expected dtypes int32/uint8, got {tokens.index.dtype}/{lossmask.index.dtype}")
        if not np.array_equal(tokens.sequence_lengths, lossmask.sequence_lengths):
            raise ValueError(f"{prefix}: tokens and lossmask files disagree on document lengths")
        return cls(prefix, tokens, lossmask)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    def read(self, doc: int, start: int = 0, length: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """Tokens and target mask of ``doc[start:start + length]``: views into the memory map, valid while open."""
        return (
            self.tokens.get(doc, offset=start, length=length),
            self.lossmask.get(doc, offset=start, length=length),
        )
