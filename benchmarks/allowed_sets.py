"""Constrained decoding at catalog scale: the allowed sets one RL step sends to the actor, before and after the CSR
trie, side by side in one run.

    PYTHONPATH=. python benchmarks/allowed_sets.py [--items 1000000] [--levels 3] [--codebook-size 8192] \
        [--trees 256] [--items-per-tree 16] [--logmass-positions 512]

A random catalog of ``--items`` distinct code tuples (two domains, the ``onereason_report`` scheme: begin, three
codes, end) behind a Qwen3-sized text vocabulary, and one step's rollout trees: ``--trees`` trees of
``--items-per-tree`` catalog items each (half of the trees force their domain). Rows:

* ``baseline``: the path before the CSR trie, kept here only as the baseline — a trie of sorted packed prefix keys
  (one binary search per row), and ``item_allowed_ids`` writing every position's allowed ids as Python lists,
  padded to the widest set (the first code level) in one int64 tensor;
* ``csr``: :func:`megatron_onereason.rl.sampling.item_allowed_ids` — the trie as CSR arrays walked for all items at
  once, the sets sent by reference (trie nodes; the trie itself pickles as its catalog directory).

Columns: trie build seconds (once per catalog and process), driver seconds per step, bytes per step as pickled for
each actor rank (the engine pickles the packs to every TP rank, twice: log-probs and train), and the actor's
log-mass on the first ``--logmass-positions`` positions against random logits of the full vocabulary width (seconds,
and max |Δ| between the two).
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
import time
from typing import Dict, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_onereason.generation.constrained import ItemicConstraint  # noqa: E402
from megatron_onereason.rl.sampling import item_allowed_ids, vocab_parallel_allowed_log_mass  # noqa: E402
from megatron_onereason.rl.tree_pack import TreeSequence, pack_trees  # noqa: E402
from megatron_onereason.tokenizer.code_keys import pack_codes  # noqa: E402
from megatron_onereason.tokenizer.item_catalog import ItemCatalog  # noqa: E402
from megatron_onereason.tokenizer.item_trie import ItemTrie  # noqa: E402
from megatron_onereason.tokenizer.itemic_tokens import ItemicVocab, preset  # noqa: E402

TEXT_TOKENS = 151_669  # Qwen3's text vocabulary: the itemic tokens come after it


class PrefixKeyTrie:
    """Baseline only: the trie before the CSR arrays (sorted packed prefix keys per begin key and level)."""

    def __init__(self, catalog: ItemCatalog, scheme):
        self.levels, self.codebook_size = catalog.levels, catalog.codebook_size
        domains = np.asarray(catalog.domains)
        self._keys = {d: [np.unique(pack_codes(catalog.codes[domains == d][:, :n], self.codebook_size))
                          for n in range(1, self.levels + 1)] for d in sorted(set(catalog.domains))}

    @property
    def domains(self):
        return list(self._keys)

    def allowed_next(self, domain, prefix):
        size, key = self.codebook_size, 0
        for code in prefix:
            key = key * size + int(code)
        keys = self._keys[domain][len(prefix)]
        lo, hi = np.searchsorted(keys, [key * size, (key + 1) * size])
        return keys[lo:hi] % size

    def allowed_token_mask(self, vocab, domains, prefixes, vocab_size=None):
        rows, cols = [], []
        for b, (domain, prefix) in enumerate(zip(domains, prefixes)):
            codes = self.allowed_next(domain, prefix)
            rows.append(np.full(len(codes), b))
            cols.append(vocab.code_ids[len(prefix)][codes])
        mask = torch.zeros((len(domains), vocab_size), dtype=torch.bool)
        mask[torch.from_numpy(np.concatenate(rows)), torch.from_numpy(np.concatenate(cols))] = True
        return mask


def baseline_item_allowed_ids(pack, trees, domains, constraint):
    """Baseline only: ``item_allowed_ids`` before the CSR trie (Python lists padded to the widest set)."""
    positions, allowed = [], []
    for i, (tree, domain) in enumerate(zip(trees, domains)):
        context = [int(t) for t in tree.prompt] + [int(t) for t in tree.trace]
        start = [constraint.vocab.begin_id(domain)] if domain is not None else list(constraint.live_begin_ids)
        for j, child in enumerate(tree.children):
            child = [int(t) for t in child]
            rows = constraint.allowed([context + child[:t] for t in range(1, len(child))]) if len(child) > 1 else []
            for t in range(len(child)):
                ids = start if t == 0 else rows[t - 1].nonzero().flatten().tolist()
                if child[t] not in ids:
                    raise ValueError("not allowed")
                positions.append(int(pack.child_index[i, j, t]))
                allowed.append(ids)
    width = max(len(a) for a in allowed)
    ids = torch.full((len(allowed), width), -1, dtype=torch.long)
    for r, a in enumerate(allowed):
        ids[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    return torch.tensor(positions, dtype=torch.long), ids


def random_catalog(items: int, levels: int, k: int, seed: int) -> ItemCatalog:
    rng = np.random.default_rng(seed)
    keys = np.unique(rng.integers(0, k ** levels, size=int(items * 1.01), dtype=np.int64))
    keys = rng.permutation(keys)[:items]
    codes = np.stack([keys // k ** (levels - 1 - i) % k for i in range(levels)], axis=1)
    domains = np.where(rng.random(len(keys)) < 0.5, "video", "prod").tolist()
    return ItemCatalog([str(i) for i in range(len(keys))], domains, codes, k)


def step_trees(catalog: ItemCatalog, vocab: ItemicVocab, trees: int, per_tree: int, seed: int):
    rng = np.random.default_rng(seed + 1)
    domains = np.asarray(catalog.domains)
    by_domain = {d: np.flatnonzero(domains == d) for d in ("video", "prod")}
    out, forced = [], []
    for t in range(trees):
        domain = ("video", "prod")[t % 2] if t % 4 < 2 else None
        pool = by_domain[domain] if domain else np.arange(len(catalog))
        rows = rng.choice(pool, per_tree)
        children = [vocab.item_ids(catalog.domains[r], catalog.codes[r]) for r in rows]
        out.append(TreeSequence(rng.integers(0, 1000, 200).tolist(), rng.integers(0, 1000, 100).tolist(), children))
        forced.append(domain)
    return out, forced


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--levels", type=int, default=3)
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--trees", type=int, default=256, help="rollout trees in the step")
    p.add_argument("--items-per-tree", type=int, default=16, help="K item completions per tree")
    p.add_argument("--logmass-positions", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    scheme = preset("onereason_report", levels=args.levels, codebook_size=args.codebook_size)
    vocab = ItemicVocab.from_lookup(scheme, {t: TEXT_TOKENS + i for i, t in enumerate(scheme.token_strings())})
    width = (vocab.max_id + 1 + 255) // 256 * 256
    with tempfile.TemporaryDirectory(prefix="allowed_sets_") as tmp:
        t0 = time.perf_counter()
        random_catalog(args.items, args.levels, args.codebook_size, args.seed).save(tmp)
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            f.write(f'{{"levels": {args.levels}, "codebook_size": {args.codebook_size}}}')
        catalog = ItemCatalog.load(tmp)
        print(f"catalog: {len(catalog)} items, {args.levels} x {args.codebook_size} codes, 2 domains; logits width "
              f"{width} (built in {time.perf_counter() - t0:.1f} s)")
        trees, forced = step_trees(catalog, vocab, args.trees, args.items_per_tree, args.seed)
        pack = pack_trees(trees)
        results: Dict[str, Dict] = {}
        for name in ("baseline", "csr"):
            t0 = time.perf_counter()
            trie = PrefixKeyTrie(catalog, scheme) if name == "baseline" else ItemTrie.from_catalog(catalog, scheme)
            build = time.perf_counter() - t0
            constraint = ItemicConstraint(trie, vocab, width)
            fn = baseline_item_allowed_ids if name == "baseline" else item_allowed_ids
            t0 = time.perf_counter()
            positions, allowed = fn(pack, trees, forced, constraint)
            driver = time.perf_counter() - t0
            t0 = time.perf_counter()
            message = pickle.dumps((positions, allowed), protocol=pickle.HIGHEST_PROTOCOL)
            pickling = time.perf_counter() - t0
            n = min(args.logmass_positions, len(positions))
            logits = torch.randn(n, width, generator=torch.Generator().manual_seed(args.seed))
            part = allowed[:n] if name == "baseline" else type(allowed)(allowed.listed[:n], allowed.node[:n],
                                                                       allowed.trie, allowed.code_tokens)
            t0 = time.perf_counter()
            mass = vocab_parallel_allowed_log_mass(logits, part)
            logmass = time.perf_counter() - t0
            results[name] = {"build": build, "driver": driver, "bytes": len(message), "pickle": pickling,
                             "logmass": logmass, "mass": mass, "positions": len(positions)}
            del message, allowed
    diff = float((results["csr"]["mass"] - results["baseline"]["mass"]).abs().max())
    print(f"\none step: {args.trees} trees x {args.items_per_tree} items = {results['csr']['positions']} item positions "
          f"(equal positions: {results['csr']['positions'] == results['baseline']['positions']})")
    print(f"{'path':<10} {'trie build s':>13} {'driver s/step':>14} {'MB/step/rank':>13} {'pickle s':>9} "
          f"{'log-mass s':>11}")
    for name, r in results.items():
        print(f"{name:<10} {r['build']:>13.2f} {r['driver']:>14.3f} {r['bytes'] / 1e6:>13.2f} {r['pickle']:>9.3f} "
              f"{r['logmass']:>11.3f}")
    print(f"log-mass on the first {args.logmass_positions} positions, max |csr - baseline| = {diff:.2e}")


if __name__ == "__main__":
    main()
