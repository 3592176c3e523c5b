#!/usr/bin/env python
"""Planning a pre-training blend at OneReason's scale: time and memory of the blend + pack plan, lengths only.

    PYTHONPATH=. python benchmarks/pack_plan.py                 # the full 578B-token blend (~75 GB RAM)
    PYTHONPATH=. python benchmarks/pack_plan.py --scale 0.01    # 1% of it, same length distributions

OneReason pre-trains on 578B tokens (stages 1-3, §4.4). The blend is simulated with the four sources and token ratios
of ``examples/pretrain_8b.sh`` (appendix C.2) and assumed length distributions (log-uniform, in tokens):
item captions 64-1024, user histories 512-8192 (longer than the 4K cap: split), relational 128-2048, general text
100-16384. Each source holds exactly its share of the tokens. Planned with the stage-1 settings (48K packs, 4K cap)
by the trainer's own code (:func:`~megatron_onereason.data.packed_dataset.plan_dataset`), then saved as the trainer's
plan cache and memory-mapped back. Memory is numpy's peak allocation (tracemalloc) while planning, beyond the
simulated lengths themselves, plus the peak RSS of the process. Before the plan cache every rank did this at start;
now one process does, and each rank maps the result (the last column: what a rank holds resident after opening it).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
import tracemalloc

import numpy as np

from megatron_onereason.data.blending import BlendComponent, BlendConfig
from megatron_onereason.data.packed_dataset import load_plans, plan_dataset, plan_key, save_plans
from megatron_onereason.data.packing import PackingConfig

TOTAL_TOKENS = 578_000_000_000
SOURCES = (("item_caption", 0.35, 64, 1024), ("user_history", 0.25, 512, 8192), ("relational", 0.15, 128, 2048),
           ("general_text", 0.25, 100, 16384))


def simulated_lengths(tokens: int, low: int, high: int, rng: np.random.Generator) -> np.ndarray:
    """int32 document lengths, log-uniform in [low, high], summing to ``tokens`` (the last one trimmed)."""
    mean = (high - low) / np.log(high / low)
    out, total = [], 0
    while total < tokens:
        n = max(int((tokens - total) / mean * 1.02) + 16, 16)
        chunk = np.exp(rng.uniform(np.log(low), np.log(high), n)).astype(np.int32)
        out.append(chunk)
        total += int(chunk.sum(dtype=np.int64))
    lengths = np.concatenate(out)
    cut = int(np.searchsorted(np.cumsum(lengths, dtype=np.int64), tokens)) + 1
    lengths = lengths[:cut]
    lengths[-1] -= int(lengths.sum(dtype=np.int64)) - tokens
    return lengths


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of the 578B tokens")
    p.add_argument("--seq-length", type=int, default=49152)
    p.add_argument("--max-sample-length", type=int, default=4096)
    p.add_argument("--work", help="where to save the plan (default: a temporary directory)")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    tokens = int(TOTAL_TOKENS * args.scale)
    t0 = time.perf_counter()
    lengths = [simulated_lengths(int(tokens * share), low, high, rng) for _, share, low, high in SOURCES]
    simulate_s = time.perf_counter() - t0
    blend = BlendConfig(tuple(BlendComponent(name, name, share) for name, share, _, _ in SOURCES), seed=1)
    packing = PackingConfig(args.seq_length, args.max_sample_length, seed=1)

    tracemalloc.start()
    t0 = time.perf_counter()
    key = plan_key(lengths, blend, packing)
    key_s = time.perf_counter() - t0
    blended, packs = plan_dataset(lengths, blend, packing)
    plan_s = time.perf_counter() - t0 - key_s
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        directory = os.path.join(work, key)
        t0 = time.perf_counter()
        save_plans(directory, blended, packs, key)
        save_s = time.perf_counter() - t0
        disk = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
        del blended, packs
        before = rss_gib()
        t0 = time.perf_counter()
        mapped_blend, mapped = load_plans(directory)
        first, last = mapped.pack_slice(0), mapped.pack_slice(len(mapped) - 1)  # touch both ends
        load_s = time.perf_counter() - t0
        mapped_rss = rss_gib() - before
        s = mapped.stats
        print(json.dumps({
            "tokens": tokens, "documents": int(sum(x.size for x in lengths)), "chunks": s.chunks, "packs": s.packs,
            "fill_rate": round(s.fill_rate, 5), "split_documents": s.split_documents,
            "simulate_s": round(simulate_s, 1), "fingerprint_s": round(key_s, 2), "plan_s": round(plan_s, 1),
            "save_s": round(save_s, 1), "load_s": round(load_s, 3),
            "plan_peak_gib": round(peak / 2**30, 2), "lengths_gib": round(sum(x.nbytes for x in lengths) / 2**30, 2),
            "process_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "plan_on_disk_gib": round(disk / 2**30, 3), "rank_resident_after_load_gib": round(max(mapped_rss, 0), 3),
            "_": (first, last, mapped_blend.names)[2][0],
        }))


if __name__ == "__main__":
    main()
