"""The tokens + loss-mask pair of Megatron ``IndexedDataset`` files written by ``tools/preprocess_data.py``.

A preprocessed corpus with prefix ``P`` is ``P_tokens.bin/.idx`` (int32: the vocabulary with itemic tokens is
larger than 65535) and ``P_lossmask.bin/.idx`` (uint8, 1 = the token is a loss target), one document per sample,
equal lengths, plus ``P_stats.json``. Both are plain ``megatron.core.datasets.indexed_dataset`` files, so Megatron's
own reader opens them.

The four data files move into place as one unit: ``P_stats.json`` is the commit record. A commit first removes the
old one, renames the data files, then renames the new stats file (which lists the four files' sizes) into place, so
a kill in between leaves no stats file and :meth:`IndexedPair.open` refuses the mix of old and new files.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

from megatron_onereason.fileio import check_writable, remove_leftovers, temp_sibling

log = logging.getLogger(__name__)

TOKEN_DTYPE = np.int32
LOSSMASK_DTYPE = np.uint8


def tokens_prefix(prefix: str) -> str:
    return prefix + "_tokens"


def lossmask_prefix(prefix: str) -> str:
    return prefix + "_lossmask"


def stats_path(prefix: str) -> str:
    return prefix + "_stats.json"


FILES_KEY = "files"  # in P_stats.json: the data files' sizes at commit
MAX_TOKEN_ID_KEY = "max_token_id"  # in P_stats.json: the largest token id of the data


def _final_paths(prefix: str) -> Tuple[str, ...]:
    """The four data files in the order they are renamed into place (indexes last: a reader needs both)."""
    t, m = tokens_prefix(prefix), lossmask_prefix(prefix)
    return t + ".bin", m + ".bin", t + ".idx", m + ".idx"


def _parents(directory: str):
    """``directory`` and each directory above it."""
    while True:
        yield directory
        parent = os.path.dirname(directory)
        if parent == directory:
            return
        directory = parent


class IndexedPairWriter:
    """Writes the tokens/loss-mask pair under temporary names; :meth:`commit` renames them into place.

    Used as a context manager, it commits on a clean exit and deletes its temporary files on an exception, so a
    failed run never leaves files that look like a valid dataset.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        directory = os.path.dirname(os.path.abspath(prefix))
        blocking = next((d for d in _parents(directory) if os.path.exists(d) and not os.path.isdir(d)), None)
        if blocking:
            raise NotADirectoryError(f"output prefix {prefix}: {blocking} is a file, not a directory")
        check_writable(prefix, "output prefix ")
        os.makedirs(directory, exist_ok=True)
        paths = _final_paths(prefix) + (stats_path(prefix),)
        for path in paths:  # temporary files of killed earlier runs
            remove_leftovers(path)
        self._tmp = {path: temp_sibling(path) for path in paths}
        t, m = tokens_prefix(prefix), lossmask_prefix(prefix)
        self._tokens = IndexedDatasetBuilder(self._tmp[t + ".bin"], dtype=TOKEN_DTYPE)
        self._lossmask = IndexedDatasetBuilder(self._tmp[m + ".bin"], dtype=LOSSMASK_DTYPE)
        self.documents = self.tokens = self.loss_tokens = 0
        self.max_token_id = -1  # recorded: the trainer refuses data with ids its model has no row for
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
        self.tokens += int(tokens.size)
        self.loss_tokens += int(lossmask.sum())
        self.max_token_id = max(self.max_token_id, int(tokens.max()))

    def commit(self, stats: Optional[Dict] = None) -> None:
        """Finish the index files, write ``P_stats.json`` (document, token and loss-token counts plus ``stats``),
        rename into place.

        The stats file is always rewritten, so a stale one from an earlier run never describes the new files; it is
        the commit record (see the module docstring) and lists the data files' sizes under ``"files"``.
        """
        try:
            self._commit(stats)
        except BaseException:
            self.abort()
            raise

    def _commit(self, stats: Optional[Dict]) -> None:
        t, m = tokens_prefix(self.prefix), lossmask_prefix(self.prefix)
        self._tokens.finalize(self._tmp[t + ".idx"])
        self._lossmask.finalize(self._tmp[m + ".idx"])
        data = _final_paths(self.prefix)
        sizes = {os.path.basename(p): os.path.getsize(self._tmp[p]) for p in data}
        with open(self._tmp[stats_path(self.prefix)], "w") as f:
            json.dump({"documents": self.documents, "tokens": self.tokens, "loss_tokens": self.loss_tokens,
                       MAX_TOKEN_ID_KEY: self.max_token_id, **(stats or {}), FILES_KEY: sizes}, f, indent=2,
                      sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        if os.path.exists(stats_path(self.prefix)):
            os.remove(stats_path(self.prefix))  # from here until the last rename, the prefix reads as incomplete
        for path in data:
            os.replace(self._tmp[path], path)
        os.replace(self._tmp[stats_path(self.prefix)], stats_path(self.prefix))
        self._closed = True

    def abort(self) -> None:
        """Close and delete all temporary files (also after a write failed on a full disk)."""
        for builder in (self._tokens, self._lossmask):
            try:
                builder.data_file.close()
            except OSError:  # flushing the last buffer fails again on a full disk
                pass
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
        check_prefix(prefix)
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


_PREFIX_SUFFIXES = ("_tokens.bin", "_tokens.idx", "_lossmask.bin", "_lossmask.idx", "_stats.json", "_tokens",
                    "_lossmask", ".bin", ".idx")


def check_prefix(prefix: str) -> Dict:
    """Check that ``prefix`` names one complete output of ``tools/preprocess_data.py``; returns its stats.

    Raises ``FileNotFoundError`` / ``ValueError`` naming the file and the likely mistake (a file name given
    instead of the prefix, an interrupted run, files from two different runs).
    """
    missing = [p for p in _final_paths(prefix) + (stats_path(prefix),) if not os.path.exists(p)]
    if len(missing) == 5:
        hint = next((f"; give the prefix without {sfx!r}: {prefix[: -len(sfx)]}" for sfx in _PREFIX_SUFFIXES
                     if prefix.endswith(sfx) and os.path.exists(stats_path(prefix[: -len(sfx)]))), "")
        if not hint:
            directory = os.path.dirname(os.path.abspath(prefix))
            found = sorted(n[: -len("_stats.json")] for n in os.listdir(directory) if n.endswith("_stats.json")) \
                if os.path.isdir(directory) else []
            hint = (f"; prefixes in {directory}: {', '.join(found[:8])}" if found else
                    f"; {directory} holds no preprocessed data" if os.path.isdir(directory) else
                    f"; {directory} does not exist")
        raise FileNotFoundError(f"{prefix}: no preprocessed data (expected {os.path.basename(prefix)}_tokens.bin/.idx, "
                                f"_lossmask.bin/.idx and _stats.json written by tools/preprocess_data.py "
                                f"--output-prefix {prefix}){hint}")
    if missing:
        raise ValueError(f"{prefix}: incomplete preprocessed data, {os.path.basename(missing[0])} is missing (an "
                         "interrupted tools/preprocess_data.py run, which writes _stats.json last?); run it again")
    try:
        with open(stats_path(prefix)) as f:
            stats = json.load(f)
    except ValueError as e:
        raise ValueError(f"{stats_path(prefix)}: not valid JSON ({e}); run tools/preprocess_data.py again") from None
    for name, size in stats.get(FILES_KEY, {}).items():
        actual = os.path.getsize(os.path.join(os.path.dirname(os.path.abspath(prefix)), name))
        if actual != size:
            raise ValueError(f"{prefix}: {name} has {actual} bytes but {os.path.basename(stats_path(prefix))} "
                             f"recorded {size}: the files come from different runs (an interrupted or concurrent "
                             "tools/preprocess_data.py?); run it again")
    return stats
