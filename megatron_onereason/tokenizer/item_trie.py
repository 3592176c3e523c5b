"""Valid-item trie for constrained decoding: which code may follow a partial itemic pattern.

Items are grouped by what their begin token says (the *begin key*, :meth:`ItemicScheme.begin_key`): the domain for
per-domain begin tokens, or None — one group of all catalog items — when the scheme's begin token is shared. Per
group and per prefix length ``l``, the trie keeps the sorted packed keys of every catalog prefix of length ``l + 1``.
The codes allowed after a length-``l`` prefix ``p`` are exactly the keys in ``[p * K, (p + 1) * K)`` — found with two
binary searches, O(log n), and returned as ``key % K``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme, ItemicVocab


class ItemTrie:
    def __init__(self, levels: int, codebook_size: int, prefix_keys: Dict[Optional[str], List[np.ndarray]]):
        """``prefix_keys[begin key][l]``: sorted unique packed keys of the group's catalog prefixes of length l+1."""
        self.levels = levels
        self.codebook_size = codebook_size
        self._prefix_keys = prefix_keys

    @classmethod
    def from_catalog(cls, catalog: ItemCatalog, scheme: ItemicScheme) -> "ItemTrie":
        """Group ``catalog``'s items by ``scheme``'s begin keys; a per-domain scheme must have every catalog domain."""
        domains = np.asarray(catalog.domains)
        present = sorted(set(catalog.domains))
        if scheme.shared_begin:
            groups = {None: np.ones(len(catalog), dtype=bool)}
        else:
            unknown = [d for d in present if d not in scheme.domains]
            if unknown:
                raise ItemicPatternError(f"catalog domains {unknown} have no begin token in itemic scheme "
                                         f"{scheme.name!r} (its domains: {list(scheme.domains)})")
            groups = {d: domains == d for d in present}
        prefix_keys = {}
        for key, rows in groups.items():
            codes = catalog.codes[rows]
            prefix_keys[key] = [np.unique(pack_codes(codes[:, :length], catalog.codebook_size))
                                for length in range(1, catalog.levels + 1)]
        return cls(catalog.levels, catalog.codebook_size, prefix_keys)

    @property
    def domains(self) -> List[Optional[str]]:
        """The begin keys with catalog items (``[None]`` for a shared begin token)."""
        return list(self._prefix_keys)

    def allowed_next(self, domain: Optional[str], prefix_codes: Sequence[int]) -> np.ndarray:
        """Sorted codes (int64) that continue ``prefix_codes`` to some catalog item of begin key ``domain``.

        Empty when the prefix is complete (``levels`` codes), not a catalog prefix, or the key has no items.
        """
        length = len(prefix_codes)
        if length > self.levels:
            raise ItemicPatternError(f"prefix has {length} codes, items have {self.levels}")
        if length == self.levels or domain not in self._prefix_keys:
            return np.zeros(0, dtype=np.int64)
        size = self.codebook_size
        if not all(0 <= int(c) < size for c in prefix_codes):
            return np.zeros(0, dtype=np.int64)
        prefix_key = 0
        for code in prefix_codes:
            prefix_key = prefix_key * size + int(code)
        keys = self._prefix_keys[domain][length]
        lo, hi = np.searchsorted(keys, [prefix_key * size, (prefix_key + 1) * size])
        return keys[lo:hi] % size

    def contains(self, domain: Optional[str], codes: Sequence[int]) -> bool:
        """Whether ``codes`` is a complete catalog item of begin key ``domain``."""
        if len(codes) != self.levels:
            return False
        return int(codes[-1]) in self.allowed_next(domain, codes[:-1])

    def allowed_token_mask(
        self,
        vocab: ItemicVocab,
        domains: Sequence[Optional[str]],
        prefixes: Sequence[Sequence[int]],
        vocab_size: Optional[int] = None,
    ):
        """Boolean torch tensor [B, vocab_size]: True at the token ids of the codes allowed next for each row.

        Row ``b`` is inside an item of begin key ``domains[b]`` whose codes so far are ``prefixes[b]`` (fewer than
        ``levels``). A row with no allowed code (a prefix outside the catalog) is all False; callers decide what
        that means. ``vocab_size`` defaults to ``vocab.max_id + 1`` (pass the model's padded vocabulary size).
        """
        import torch

        if len(domains) != len(prefixes):
            raise ValueError(f"{len(domains)} domains but {len(prefixes)} prefixes")
        if vocab.levels != self.levels or vocab.codebook_size < self.codebook_size:
            raise ValueError(f"vocabulary has {vocab.levels} levels x {vocab.codebook_size} codes, the catalog "
                             f"{self.levels} x {self.codebook_size}")
        vocab_size = vocab.max_id + 1 if vocab_size is None else vocab_size
        if vocab_size <= vocab.max_id:
            raise ValueError(f"vocab_size {vocab_size} does not reach the largest itemic token id {vocab.max_id}")
        rows, cols = [], []
        for b, (domain, prefix) in enumerate(zip(domains, prefixes)):
            if len(prefix) >= self.levels:
                raise ItemicPatternError(f"row {b}: prefix {list(prefix)} is already a complete item")
            codes = self.allowed_next(domain, prefix)
            rows.append(np.full(len(codes), b, dtype=np.int64))
            cols.append(vocab.code_ids[len(prefix)][codes])
        mask = torch.zeros((len(domains), vocab_size), dtype=torch.bool)
        if rows:
            mask[torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))] = True
        return mask
