"""Valid-item trie for constrained decoding: which code may follow a partial itemic pattern.

Items are grouped by what their begin token says (the *begin key*, :meth:`ItemicScheme.begin_key`): the domain for
per-domain begin tokens, or None — one group of all catalog items — when the scheme's begin token is shared.

The trie is stored as flat arrays (CSR), built once per catalog and shared by every consumer: the rollout's logits
processors, the transformers generation loop, the actor's renormalised log-probs (``rl/sampling.py``) and evaluation.
Nodes are numbered breadth first: the root of each begin key (``0 .. R-1``, in :attr:`ItemTrie.domains` order), then
every catalog prefix of one code, then of two, … (sorted by key, then code). A node's children are the edges
``offsets[n] .. offsets[n+1]``; edge ``e`` carries code ``edge_code[e]`` and leads to node ``e + R`` (breadth-first
numbering makes every child range contiguous). ``edge_key[e] = parent * K + code`` is sorted, so a step down the
trie for many rows at once is one ``searchsorted``. Memory: one int64 offset per node and one int32 code plus one
int64 key per edge (a 1M-item 3 × 8192 catalog: ≈ 2M nodes, ≈ 40 MB).

A trie built by :meth:`ItemTrie.from_catalog` over a catalog loaded from a directory pickles *by reference*: the
receiving process (an actor rank getting a tree pack) loads the catalog once and reuses that trie for every later
message, instead of receiving the arrays with every step (every node must see the catalog directory; a copy
with other content is refused).
"""
from __future__ import annotations

import functools
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from megatron_onereason.tokenizer.code_keys import pack_codes
from megatron_onereason.tokenizer.item_catalog import CATALOG_FILE, ItemCatalog
from megatron_onereason.tokenizer.itemic_tokens import ItemicPatternError, ItemicScheme, ItemicVocab


class ItemTrie:
    def __init__(self, levels: int, codebook_size: int, keys: Sequence[Optional[str]], offsets: np.ndarray,
                 edge_code: np.ndarray, edge_key: np.ndarray, depth: np.ndarray):
        """The CSR arrays of the module docstring: ``keys`` the begin keys (root ``i`` is ``keys[i]``), ``offsets``
        int64 [N + 1], ``edge_code`` int32 [E], ``edge_key`` int64 [E], ``depth`` int8 [N]."""
        self.levels = levels
        self.codebook_size = codebook_size
        self.root = {key: i for i, key in enumerate(keys)}
        self.offsets = offsets
        self.edge_code = edge_code
        self.edge_key = edge_key
        self.depth = depth
        self.source: Optional[Tuple[str, Dict, str]] = None  # (catalog dir, scheme, sha256 of its file)

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
        k, levels = catalog.codebook_size, catalog.levels
        keys = list(groups)
        if max(len(keys), 1) * k ** levels >= 2 ** 62:
            raise ValueError(f"{len(keys)} begin keys x {k}^{levels} codes do not fit the trie's int64 keys")
        parents, codes = [], []
        first_of_depth = 0  # node id of the first node at the current depth (the roots: 0)
        previous: Optional[np.ndarray] = None  # sorted (key index, prefix) of the previous depth, combined
        for length in range(1, levels + 1):
            combined = np.concatenate([
                index * k ** length + np.unique(pack_codes(catalog.codes[rows][:, :length], k))
                for index, rows in enumerate(groups.values())]) if keys else np.zeros(0, dtype=np.int64)
            key_index, prefix = combined // k ** length, combined % k ** length
            if previous is None:
                parent = key_index
            else:  # the node of the same key and the prefix one code shorter
                parent = first_of_depth + np.searchsorted(previous, key_index * k ** (length - 1) + prefix // k)
            first_of_depth = len(keys) if previous is None else first_of_depth + len(previous)
            parents.append(parent)
            codes.append(prefix % k)
            previous = combined
        nodes = len(keys) + sum(len(p) for p in parents)
        parent = np.concatenate(parents).astype(np.int64)
        edge_code = np.concatenate(codes).astype(np.int32)
        offsets = np.zeros(nodes + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(parent, minlength=nodes))
        depth = np.zeros(nodes, dtype=np.int8)
        depth[len(keys):] = np.repeat(np.arange(1, levels + 1), [len(p) for p in parents])
        trie = cls(levels, k, keys, offsets, edge_code, parent * k + edge_code, depth)
        directory = getattr(catalog, "directory", None)
        if directory is not None:
            trie.source = (directory, scheme.to_dict(), _file_stamp(directory))
        return trie

    def __reduce__(self):
        if self.source is None:
            return super().__reduce__()
        return _load_trie, self.source

    @property
    def domains(self) -> List[Optional[str]]:
        """The begin keys with catalog items (``[None]`` for a shared begin token)."""
        return list(self.root)

    @property
    def roots(self) -> int:
        return len(self.root)

    def step(self, nodes: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """The child of each node along ``codes`` (int64 arrays of one shape); −1 where there is none (no such
        catalog prefix, a complete item, a code out of range, or a node that is already −1)."""
        nodes, codes = np.asarray(nodes, dtype=np.int64), np.asarray(codes, dtype=np.int64)
        query = nodes * self.codebook_size + codes
        at = np.searchsorted(self.edge_key, query)
        ok = (nodes >= 0) & (codes >= 0) & (codes < self.codebook_size) & (at < len(self.edge_key))
        ok[ok] = self.edge_key[at[ok]] == query[ok]
        return np.where(ok, at + self.roots, -1)

    def node(self, domain: Optional[str], prefix_codes: Sequence[int]) -> int:
        """The node of a prefix (−1 when no catalog item of begin key ``domain`` starts with it)."""
        if len(prefix_codes) > self.levels:
            raise ItemicPatternError(f"prefix has {len(prefix_codes)} codes, items have {self.levels}")
        node = np.array([self.root.get(domain, -1)], dtype=np.int64)
        for code in prefix_codes:
            node = self.step(node, np.array([int(code)]))
        return int(node[0])

    def children(self, node: int) -> np.ndarray:
        """Sorted codes (int64) of a node's children (empty for a leaf or −1)."""
        if node < 0:
            return np.zeros(0, dtype=np.int64)
        return self.edge_code[self.offsets[node]:self.offsets[node + 1]].astype(np.int64)

    def allowed_next(self, domain: Optional[str], prefix_codes: Sequence[int]) -> np.ndarray:
        """Sorted codes (int64) that continue ``prefix_codes`` to some catalog item of begin key ``domain``.

        Empty when the prefix is complete (``levels`` codes), not a catalog prefix, or the key has no items.
        """
        return self.children(self.node(domain, prefix_codes))

    def contains(self, domain: Optional[str], codes: Sequence[int]) -> bool:
        """Whether ``codes`` is a complete catalog item of begin key ``domain``."""
        return len(codes) == self.levels and self.node(domain, codes) >= 0

    def nodes(self, domains: Sequence[Optional[str]], prefixes: Sequence[Sequence[int]]) -> np.ndarray:
        """:meth:`node` of many rows (int64 [B]), one ``searchsorted`` per code level."""
        if len(domains) != len(prefixes):
            raise ValueError(f"{len(domains)} domains but {len(prefixes)} prefixes")
        lengths = np.array([len(p) for p in prefixes], dtype=np.int64)
        if len(lengths) and lengths.max() > self.levels:
            raise ItemicPatternError(f"a prefix has {int(lengths.max())} codes, items have {self.levels}")
        codes = np.zeros((len(prefixes), self.levels), dtype=np.int64)
        for b, p in enumerate(prefixes):
            codes[b, :len(p)] = p
        nodes = np.array([self.root.get(d, -1) for d in domains], dtype=np.int64)
        for level in range(int(lengths.max()) if len(lengths) else 0):
            deeper = lengths > level
            nodes[deeper] = self.step(nodes[deeper], codes[deeper, level])
        return nodes

    def child_pairs(self, nodes: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Every (row, edge) of the children of ``nodes`` [B] (−1: none): two int64 arrays, rows ascending."""
        nodes = np.asarray(nodes, dtype=np.int64)
        live = nodes >= 0
        start = np.where(live, self.offsets[np.maximum(nodes, 0)], 0)
        count = np.where(live, self.offsets[np.maximum(nodes, 0) + 1] - start, 0)
        rows = np.repeat(np.arange(len(nodes)), count)
        first = np.cumsum(count) - count
        return rows, start[rows] + np.arange(len(rows)) - first[rows]

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
        self.check_vocab(vocab)
        vocab_size = vocab.max_id + 1 if vocab_size is None else vocab_size
        if vocab_size <= vocab.max_id:
            raise ValueError(f"vocab_size {vocab_size} does not reach the largest itemic token id {vocab.max_id}")
        for b, prefix in enumerate(prefixes):
            if len(prefix) >= self.levels:
                raise ItemicPatternError(f"row {b}: prefix {list(prefix)} is already a complete item")
        rows, edges = self.child_pairs(self.nodes(domains, prefixes))
        mask = torch.zeros((len(domains), vocab_size), dtype=torch.bool)
        if len(rows):
            cols = self.code_tokens(vocab)[self.depth[edges + self.roots] - 1, self.edge_code[edges]]
            mask[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return mask

    def check_vocab(self, vocab: ItemicVocab) -> None:
        if vocab.levels != self.levels or vocab.codebook_size < self.codebook_size:
            raise ValueError(f"vocabulary has {vocab.levels} levels x {vocab.codebook_size} codes, the catalog "
                             f"{self.levels} x {self.codebook_size}")

    def code_tokens(self, vocab: ItemicVocab) -> np.ndarray:
        """int64 ``[levels, codebook_size]``: the token id of each (level, code) of the trie's codebook."""
        self.check_vocab(vocab)
        return np.stack([np.asarray(vocab.code_ids[level][:self.codebook_size], dtype=np.int64)
                         for level in range(self.levels)])


def _file_stamp(directory: str) -> str:
    """sha256 of the catalog file (a copy on another node matches; an edited catalog does not)."""
    path = os.path.join(directory, CATALOG_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: not found in this process, which received a trie of that catalog: every "
                                "node of a run must see the catalog directory (shared storage)")
    stat = os.stat(path)
    return _digest(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=16)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=4)
def _cached_trie(directory: str, scheme_json: str, stamp: str) -> ItemTrie:
    import json

    return ItemTrie.from_catalog(ItemCatalog.load(directory), ItemicScheme.from_dict(json.loads(scheme_json)))


def _load_trie(directory: str, scheme: Dict, stamp: str) -> ItemTrie:
    """Unpickle a trie by reference: this process's trie of that catalog, built on first use."""
    import json

    if _file_stamp(directory) != stamp:
        raise RuntimeError(f"{directory}/{CATALOG_FILE} differs from the catalog the trie sent to this process was "
                           "built from: every process of a run must read the same catalog")
    return _cached_trie(directory, json.dumps(scheme, sort_keys=True), stamp)
