#!/usr/bin/env python
"""Packing quality and speed: fill rate and planning time on realistic length mixes, pack materialisation rate.

    PYTHONPATH=. python benchmarks/packing.py --docs 1000000

Mixes (document lengths in tokens), packed into 48K (49152) sequences:
- ``stage12``: log-uniform 100–4K plus 2% longer (4K–16K) samples, cap 4096 (stages 1–2, split policy);
- ``uniform``: uniform 100–4096, cap 4096;
- ``stage3``: log-uniform 100–32K, cap 32768 (stage 3 long user histories).
Baseline: next-fit over the same shuffled chunks (close a pack as soon as the next chunk does not fit).
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from megatron_onereason.data.packing import PackingConfig, assemble_pack, plan_packs, split_overlong

SEQ = 49152


def lengths_for(mix: str, n: int, rng: np.random.Generator) -> np.ndarray:
    if mix == "stage12":
        lengths = np.exp(rng.uniform(np.log(100), np.log(4096), n))
        long = rng.random(n) < 0.02
        lengths[long] = rng.uniform(4097, 16384, int(long.sum()))
    elif mix == "uniform":
        lengths = rng.uniform(100, 4096, n)
    elif mix == "stage3":
        lengths = np.exp(rng.uniform(np.log(100), np.log(32768), n))
    else:
        raise ValueError(mix)
    return lengths.astype(np.int64)


def next_fit_packs(chunk_lengths: np.ndarray, seq_length: int) -> int:
    packs, room = 0, 0
    for length in chunk_lengths.tolist():
        if length > room:
            packs, room = packs + 1, seq_length
        room -= length
    return packs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000)
    p.add_argument("--window", type=int, default=PackingConfig.window)
    p.add_argument("--materialise", type=int, default=200, help="packs to assemble for the materialisation rate")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    for mix, cap in (("stage12", 4096), ("uniform", 4096), ("stage3", 32768)):
        lengths = lengths_for(mix, args.docs, rng)
        cfg = PackingConfig(seq_length=SEQ, max_sample_length=cap, window=args.window)
        start = time.perf_counter()
        plan = plan_packs(lengths, cfg)
        seconds = time.perf_counter() - start
        s = plan.stats
        _, _, chunk_lengths, _ = split_overlong(lengths, cfg)
        baseline = next_fit_packs(chunk_lengths[np.random.default_rng(cfg.seed).permutation(chunk_lengths.size)], SEQ)
        print(json.dumps({
            "mix": mix, "cap": cap, "documents": s.documents, "tokens": s.input_tokens, "packs": s.packs,
            "lower_bound_packs": -(-s.packed_tokens // SEQ), "fill_rate": round(s.fill_rate, 5),
            "split_documents": s.split_documents, "plan_seconds": round(seconds, 2),
            "docs_per_second": round(s.documents / seconds), "next_fit_fill_rate": round(s.packed_tokens /
                                                                                           (baseline * SEQ), 5),
        }))
    # Materialisation: assemble packs from in-memory documents (the dataset adds only memory-mapped reads).
    docs = {d: rng.integers(0, 150_000, int(n)).astype(np.int32) for d, n in
            enumerate(lengths_for("stage12", 20_000, rng).clip(max=4096))}
    masks = {d: (rng.random(t.size) < 0.7).astype(np.uint8) for d, t in docs.items()}
    plan = plan_packs(np.array([t.size for t in docs.values()]), PackingConfig(seq_length=SEQ))
    count = min(args.materialise, len(plan))
    start = time.perf_counter()
    for i in range(count):
        chunk = plan.pack_slice(i)
        ids = plan.chunk_doc[chunk].tolist()
        assemble_pack([docs[d] for d in ids], [masks[d] for d in ids], [0] * len(ids), SEQ, 0)
    seconds = time.perf_counter() - start
    print(json.dumps({"materialise_packs_per_second": round(count / seconds, 1),
                      "tokens_per_second": round(count * SEQ / seconds)}))


if __name__ == "__main__":
    main()
