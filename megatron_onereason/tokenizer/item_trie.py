"""Valid-item trie for constrained decoding: which code may follow a partial itemic pattern.

Per domain (the begin token fixes it) and per prefix length ``l``, the trie keeps the sorted packed keys of every
catalog prefix of length ``l + 1``. The codes allowed after a length-``l`` prefix ``p`` are exactly the keys in
``[p * K, (p + 1) * K)`` — found with two binary searches, O(log n), and returned as ``key % K``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.item_catalog import ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import DOMAINS, ItemicPatternError, ItemicVocab


class ItemTrie:
    def __init__(self, levels: int, codebook_size: int, prefix_keys: Dict[str, List[np.ndarray]]):
        """``prefix_keys[domain][l]``: sorted unique packed keys of the domain's catalog prefixes of length l+1."""
        self.levels = levels
        self.codebook_size = codebook_size
        self._prefix_keys = prefix_keys

    @classmethod
    def from_catalog(cls, catalog: ItemCatalog) -> "ItemTrie":
        domains = np.asarray(catalog.domains)
        prefix_keys = {}
        for domain in sorted(set(catalog.domains)):
            codes = catalog.codes[domains == domain]
            prefix_keys[domain] = [
                np.unique(pack_codes(codes[:, :length], catalog.codebook_size))
                for length in range(1, catalog.levels + 1)
            ]
        return cls(catalog.levels, catalog.codebook_size, prefix_keys)

    @property
    def domains(self) -> List[str]:
        return list(self._prefix_keys)

    def allowed_next(self, domain: str, prefix_codes: Sequence[int]) -> np.ndarray:
        """Sorted codes (int64) that continue ``prefix_codes`` to some catalog item of ``domain``.

        Empty when the prefix is complete (``levels`` codes), not a catalog prefix, or the domain has no items.
        """
        if domain not in DOMAINS:
            raise ItemicPatternError(f"unknown itemic domain {domain!r} (known: {DOMAINS})")
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

    def contains(self, domain: str, codes: Sequence[int]) -> bool:
        """Whether ``codes`` is a complete catalog item of ``domain``."""
        if len(codes) != self.levels:
            return False
        return int(codes[-1]) in self.allowed_next(domain, codes[:-1])

    def allowed_token_mask(
        self,
        vocab: ItemicVocab,
        domains: Sequence[str],
        prefixes: Sequence[Sequence[int]],
        vocab_size: Optional[int] = None,
    ):
        """Boolean torch tensor [B, vocab_size]: True at the token ids of the codes allowed next for each row.

        Row ``b`` is inside an item of ``domains[b]`` whose codes so far are ``prefixes[b]`` (fewer than
        ``levels``). A row with no allowed code (a prefix outside the catalog) is all False; callers decide what
        that means. ``vocab_size`` defaults to ``vocab.end_id`` (pass the model's padded vocabulary size).
        """
        import torch

        if len(domains) != len(prefixes):
            raise ValueError(f"{len(domains)} domains but {len(prefixes)} prefixes")
        if vocab.levels != self.levels or vocab.codebook_size < self.codebook_size:
            raise ValueError(f"vocabulary has {vocab.levels} levels x {vocab.codebook_size} codes, the catalog "
                             f"{self.levels} x {self.codebook_size}")
        vocab_size = vocab.end_id if vocab_size is None else vocab_size
        if vocab_size < vocab.end_id:
            raise ValueError(f"vocab_size {vocab_size} is smaller than the itemic token range end {vocab.end_id}")
        rows, cols = [], []
        for b, (domain, prefix) in enumerate(zip(domains, prefixes)):
            if len(prefix) >= self.levels:
                raise ItemicPatternError(f"row {b}: prefix {list(prefix)} is already a complete item")
            codes = self.allowed_next(domain, prefix)
            rows.append(np.full(len(codes), b, dtype=np.int64))
            cols.append(vocab.code_id(len(prefix), 0) + codes)
        mask = torch.zeros((len(domains), vocab_size), dtype=torch.bool)
        if rows:
            mask[torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))] = True
        return mask
