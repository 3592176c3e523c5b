#!/usr/bin/env python
"""Preprocessing throughput (tokens/s) of tools/preprocess_data.py on synthetic pre-training text.

    PYTHONPATH=. python benchmarks/preprocess.py --tokens 4e6 --workers 1 2

Builds the tiny Qwen3 tokenizer extended with the full itemic vocabulary (3 x 8192 codes: 24,581 added tokens, as
in production), writes a JSONL corpus of pre-training samples (loss-masked template context + target text,
100–4K tokens, English-like Zipf-distributed words with itemic patterns sprinkled in) and runs the preprocessing
end to end (read, parse, validate itemic tokens, tokenize, write the IndexedDataset pair) once per worker count.
Caveat: the tiny tokenizer has a 1K-entry BPE vocabulary, so it emits more tokens per character than Qwen3's 151K.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import resource
import tempfile
import time

from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_SCHEME
from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3
from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary
from megatron_onereason.tools.preprocess_data import preprocess

WORDS = """the of and to a in is that for it as was with be by on not he this are or his from at which but have an
they you were her she there been one all we their has would when if so no will more can about other into some could
them only then its time two may these like over first such new people after also most made many before must through
back years where much your way well down should because each just those how too little state good very make world
still own see men work long get here between both life being under never day same another know while last might us
great old year off come since against go came right used take three video product live stream price review user item
click watch buy share follow recommend interest history cooking travel fitness music fashion pets garden camera phone
""".split()
DOMAINS = ("video", "prod", "ad", "living")


def _text(rng: random.Random, weights, n_words: int) -> str:
    words = rng.choices(WORDS, weights, k=n_words)
    out = []
    for i, w in enumerate(words):
        r = rng.random()
        if r < 0.02:
            out.append(DEFAULT_SCHEME.format_item(rng.choice(DOMAINS), [rng.randrange(8192) for _ in range(3)]))
        elif r < 0.04:
            out.append(str(rng.randrange(10_000)))
        out.append(w.capitalize() + "," if r > 0.97 else w)
        if i % 17 == 16:
            out[-1] += "." + ("\n" if rng.random() < 0.3 else "")
    return " ".join(out)


def write_corpus(path: str, target_tokens: float, seed: int = 0) -> int:
    """Write pre-training samples of ~100–4K tokens (log-uniform); returns the number of samples."""
    rng = random.Random(seed)
    weights = [1.0 / (rank + 1) ** 0.9 for rank in range(len(WORDS))]
    approx_tokens, n = 0, 0
    with open(path, "w") as f:
        while approx_tokens < target_tokens:
            n_words = int(math.exp(rng.uniform(math.log(60), math.log(2500))))
            context = "User: " + _text(rng, weights, max(5, n_words // 5)) + "\nAssistant: "
            target = _text(rng, weights, n_words)
            f.write(json.dumps({"segments": [{"text": context, "loss": False}, {"text": target, "loss": True}],
                                "source": f"general_{n % 3}", "domain": "text"}) + "\n")
            approx_tokens += int(n_words * 1.6)  # rough words→tokens of the tiny tokenizer; the run counts exactly
            n += 1
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=float, default=4e6, help="approximate corpus size in tokens")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--codebook-size", type=int, default=8192)
    p.add_argument("--workdir", help="keep files here (default: a temporary directory)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or tmp
        os.makedirs(work, exist_ok=True)
        tokenizer = os.path.join(work, "tokenizer")
        if not os.path.exists(tokenizer):
            save_tiny_hf_qwen3(os.path.join(work, "base"), preset="tiny", overwrite=True)
            extend_vocabulary(os.path.join(work, "base"), tokenizer,
                              dataclasses.replace(DEFAULT_SCHEME, codebook_size=args.codebook_size))
        corpus = os.path.join(work, "pretrain.jsonl")
        samples = write_corpus(corpus, args.tokens)
        size_mb = os.path.getsize(corpus) / 2**20
        print(f"corpus: {samples} samples, {size_mb:.1f} MiB; {os.cpu_count()} CPUs visible")
        for workers in args.workers:
            cpu_before = _cpu_seconds()
            start = time.perf_counter()
            stats = preprocess([corpus], tokenizer, os.path.join(work, f"out_w{workers}"), workers=workers,
                               progress=False)
            wall = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu_before
            print(json.dumps({
                "workers": workers, "tokens": stats["tokens"], "samples": stats["samples"],
                "loss_tokens": stats["loss_tokens"], "itemic_tokens": stats["itemic_tokens"],
                "wall_s": round(wall, 2), "tokens_per_s": round(stats["tokens"] / wall),
                "MiB_per_s": round(size_mb / wall, 1),
                # CPU seconds of this process and its (joined) workers: on a shared machine the wall rate depends on
                # the load; tokens per CPU-second does not.
                "cpu_s": round(cpu, 2), "tokens_per_cpu_s": round(stats["tokens"] / cpu),
                "load_avg_1min": round(os.getloadavg()[0], 2),
            }))


def _cpu_seconds() -> float:
    """User + system CPU time of this process and all its terminated, waited-for children."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


if __name__ == "__main__":
    main()
