"""The item catalog: item id <-> (domain, codes), its files, and itemic-text <-> item id helpers.

A catalog directory (written by :mod:`megatron_onereason.tokenizer.catalog_builder`) holds:

- ``catalog.parquet``: one row per item in input order, columns ``item_id, domain, a, b, c`` (one column per level
  letter) — the file other components read, through :meth:`ItemCatalog.load`;
- ``codes_to_item.parquet``: the reverse map, the same rows sorted by code tuple (``a, b, c, domain, item_id``);
- ``codebooks.safetensors`` and ``manifest.json`` (see the build module).

Code tuples are unique across the whole catalog, not just per domain, so a tuple alone names one item; the domain
an itemic pattern's begin token names must still match that item's domain (a scheme whose begin token is shared by
all domains names none). A catalog built from given codes may keep *shared* tuples (OpenOneRec's codes put several
items on one tuple): it is then created with ``shared_codes=True`` (recorded in ``manifest.json``), a tuple names
the list :meth:`ItemCatalog.item_ids_for`, and :meth:`ItemCatalog.item_id_for` refuses a shared tuple rather than
pick one of its items. A catalog is independent of how items are written: the text helpers take the
:class:`~megatron_onereason.tokenizer.itemic_tokens.ItemicScheme` of the model at hand.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.itemic_tokens import LEVEL_LETTERS, ItemicScheme, is_domain_name

CATALOG_FILE = "catalog.parquet"
REVERSE_MAP_FILE = "codes_to_item.parquet"
MANIFEST_FILE = "manifest.json"


def catalog_manifest(directory: str) -> dict:
    """``DIR/manifest.json`` of a catalog: its ``levels`` and ``codebook_size`` (read without the items)."""
    path = os.path.join(directory, MANIFEST_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found (build a catalog with tools/build_itemic_tokenizer.py)")
    with open(path) as f:
        try:
            manifest = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: damaged, not valid JSON ({e}); build the catalog again "
                             "(tools/build_itemic_tokenizer.py)") from None
    missing = [key for key in ("levels", "codebook_size") if key not in manifest]
    if missing:
        raise ValueError(f"{path}: no {' or '.join(missing)} (not a catalog manifest of tools/build_itemic_tokenizer.py)")
    return manifest


class UnknownItemError(KeyError):
    """An item id, or a well-formed itemic pattern, that the catalog does not hold."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


class SharedCodesError(UnknownItemError):
    """A code tuple that names several items, asked for one item."""


class ItemCatalog:
    """Items with their domain and codes [n, levels] (unique unless ``shared_codes``); lookups both ways."""

    def __init__(self, item_ids: Sequence[str], domains: Sequence[str], codes: np.ndarray, codebook_size: int,
                 shared_codes: bool = False):
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[0] != len(item_ids) or len(domains) != len(item_ids):
            raise ValueError(
                f"catalog needs equal lengths: {len(item_ids)} ids, {len(domains)} domains, codes {codes.shape}"
            )
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise ValueError(f"codes outside [0, {codebook_size}): min {codes.min()}, max {codes.max()}")
        bad = sorted({d for d in domains if not is_domain_name(d)}, key=repr)
        if bad:
            raise ValueError(f"catalog has domain names {bad[:3]} that are not lower-case identifiers")
        self.item_ids = list(item_ids)
        self.domains = list(domains)
        self.directory: Optional[str] = None  # where load() read it (the trie pickles by this reference)
        self.codes = codes.astype(np.int32)
        self.codebook_size = int(codebook_size)
        self.keys = pack_codes(self.codes, self.codebook_size)
        self._key_order = np.argsort(self.keys, kind="stable")
        sorted_keys = self.keys[self._key_order]
        repeats = sorted_keys[1:] == sorted_keys[:-1] if len(sorted_keys) > 1 else np.zeros(0, dtype=bool)
        if repeats.any() and not shared_codes:
            raise ValueError(f"catalog has {int(repeats.sum())} items sharing a code tuple with an earlier item "
                             "(keep them with shared codes, or resolve them with the collision resolution)")
        self.shared_codes = bool(shared_codes)
        first = np.concatenate([[True], ~repeats]) if len(sorted_keys) else np.zeros(0, dtype=bool)
        groups = np.diff(np.flatnonzero(np.concatenate([first, [True]])))  # items per distinct tuple
        self.shared_tuples = int((groups > 1).sum())  # tuples held by more than one item
        self.items_on_shared_tuples = int(groups[groups > 1].sum())
        self._sorted_keys = sorted_keys
        self._row_by_id: Optional[Dict[str, int]] = None  # built on first use: 10M ids cost ~1 GB as a dict

    @property
    def levels(self) -> int:
        return self.codes.shape[1]

    def __len__(self) -> int:
        return len(self.item_ids)

    def _row_of(self, item_id: str) -> int:
        if self._row_by_id is None:
            self._row_by_id = {item_id: row for row, item_id in enumerate(self.item_ids)}
            if len(self._row_by_id) != len(self.item_ids):
                raise ValueError(f"catalog has {len(self.item_ids) - len(self._row_by_id)} duplicate item ids")
        try:
            return self._row_by_id[item_id]
        except KeyError:
            raise UnknownItemError(f"item id {item_id!r} is not in the catalog ({len(self)} items)") from None

    def codes_for(self, item_id: str) -> Tuple[int, ...]:
        return tuple(int(c) for c in self.codes[self._row_of(item_id)])

    def domain_for(self, item_id: str) -> str:
        return self.domains[self._row_of(item_id)]

    def rows_for_codes(self, codes: Sequence[int]) -> List[int]:
        """Catalog rows holding exactly ``codes``, in input order (several only with shared codes)."""
        if len(codes) != self.levels or not all(0 <= int(c) < self.codebook_size for c in codes):
            return []
        key = int(pack_codes(np.asarray([codes]), self.codebook_size)[0])
        lo, hi = np.searchsorted(self._sorted_keys, [key, key + 1])
        return [int(r) for r in self._key_order[lo:hi]]

    def item_ids_for(self, domain: Optional[str], codes: Sequence[int]) -> List[str]:
        """Every item holding ``codes`` (of ``domain``, when given), in input order; [] when none does."""
        return [self.item_ids[r] for r in self.rows_for_codes(codes) if domain is None or self.domains[r] == domain]

    def item_id_for(self, domain: Optional[str], codes: Sequence[int]) -> str:
        """The item holding ``codes``; ``domain`` (None: not known, as with a shared begin token) must be its own.
        A tuple shared by several items raises :class:`SharedCodesError` (use :meth:`item_ids_for`)."""
        rows = self.rows_for_codes(codes)
        if not rows:
            raise UnknownItemError(f"no catalog item has codes {tuple(int(c) for c in codes)}")
        if domain is not None and all(self.domains[r] != domain for r in rows):
            raise UnknownItemError(f"codes {tuple(int(c) for c in codes)} belong to item {self.item_ids[rows[0]]!r} "
                                   f"of domain {self.domains[rows[0]]!r}, not {domain!r}")
        ids = self.item_ids_for(domain, codes)
        if len(ids) > 1:
            raise SharedCodesError(f"codes {tuple(int(c) for c in codes)} name {len(ids)} items {ids[:5]}; use "
                                   "item_ids_for")
        return ids[0]

    # itemic text <-> item id
    def item_text(self, item_id: str, scheme: ItemicScheme) -> str:
        """``item_id`` written in ``scheme`` (``<|video_begin|><a_i><b_j><c_k>`` in ``onereason_report``)."""
        row = self._row_of(item_id)
        return scheme.format_item(self.domains[row], self.codes[row])

    def item_id_from_text(self, text: str, scheme: ItemicScheme) -> str:
        """Item id of a string that is exactly one itemic pattern; malformed text raises ItemicPatternError."""
        domain, codes = scheme.parse_item(text)
        return self.item_id_for(domain, codes)

    def item_ids_in_text(self, text: str, scheme: ItemicScheme) -> List[Tuple[int, int, str]]:
        """``(start, end, item_id)`` for every itemic pattern in ``text``."""
        return [(m.start, m.end, self.item_id_for(m.domain, m.codes)) for m in scheme.find_items(text)]

    # files
    def save(self, directory: str) -> None:
        """Write ``catalog.parquet`` and ``codes_to_item.parquet`` into ``directory`` (which must exist)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        def table(rows: np.ndarray, first: List[str]) -> "pa.Table":
            cols = {
                "item_id": pa.array([self.item_ids[r] for r in rows], pa.string()),
                "domain": pa.array([self.domains[r] for r in rows], pa.string()),
            }
            cols.update({LEVEL_LETTERS[lvl]: pa.array(self.codes[rows, lvl], pa.int32()) for lvl in range(self.levels)})
            names = first + [c for c in cols if c not in first]
            return pa.table({name: cols[name] for name in names})

        letters = list(LEVEL_LETTERS[:self.levels])
        pq.write_table(table(np.arange(len(self)), ["item_id", "domain"]), os.path.join(directory, CATALOG_FILE))
        pq.write_table(table(self._key_order, letters), os.path.join(directory, REVERSE_MAP_FILE))

    @classmethod
    def load(cls, directory: str) -> "ItemCatalog":
        """Load ``DIR/catalog.parquet``; the codebook size comes from ``DIR/manifest.json``."""
        import pyarrow.parquet as pq

        path = os.path.join(directory, CATALOG_FILE)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found (build a catalog with tools/build_itemic_tokenizer.py)")
        manifest = catalog_manifest(directory)
        levels, size = int(manifest["levels"]), int(manifest["codebook_size"])
        shared = bool(manifest.get("shared_codes", {}).get("kept", False))
        table = pq.read_table(path)
        letters = list(LEVEL_LETTERS[:levels])
        missing = [c for c in ["item_id", "domain"] + letters if c not in table.column_names]
        if missing:
            raise ValueError(f"{path}: missing column(s) {missing} (has {table.column_names})")
        codes = np.stack([table.column(c).to_numpy() for c in letters], axis=1) if len(table) else np.zeros((0, levels))
        try:
            catalog = cls(table.column("item_id").to_pylist(), table.column("domain").to_pylist(), codes, size, shared)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        catalog.directory = os.path.abspath(directory)
        return catalog

