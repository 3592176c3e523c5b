"""Packed attention: peak memory and time of forward + backward vs pack length, old dense path vs the new module.

    python benchmarks/attention.py                      # CPU: packs of 4K…48K tokens of ~1K documents, one layer
    python benchmarks/attention.py --recipe             # CPU: the 48K-pack recipe (4K documents) in the real trainer
    python benchmarks/attention.py --device cuda --shape 8b --layers 4 --bf16 --lengths 49152 --doc-length 4096 \\
        --tree-length 16384 --paths packed              # a GPU: the 8B width on a 48K pack and a 16K tree pack

Scaling mode: every point (path × pack length) runs in a fresh process: a megatron ``GPTModel`` with random weights
(``--layers``, ``--hidden``, ``--heads``, ``--groups``; or ``--shape`` a Qwen3 preset's width), one warm-up step and
``--steps`` timed forward + backward steps of a mean-token loss on one pack. ``dense`` is the old path (megatron's
``DotProductAttention`` with the ``S × S`` block-causal mask, now the ``dense`` oracle backend); ``packed`` is
:mod:`megatron_onereason.model.packed_attention` (``auto``: FlexAttention on CUDA, per-segment SDPA on CPU). Memory
is the peak above the level before the first step (weights and inputs, so gradients count):
``torch.cuda.max_memory_allocated`` on CUDA, the peak RSS on CPU. Dense points longer than ``--dense-max`` are
skipped (the dense 16K point needs ~17 GB on CPU, 48K ~40 GB per layer). The growth exponent of each path is the
slope of a log-log fit of time and memory against pack length (document packs).

Recipe mode: ``python -m megatron_onereason.train`` (one process, random weights of ``--layers`` layers of width
``--hidden`` ≤ 256, random documents of 3–4K tokens, 48K packs) for ``--iters`` iterations; prints s/it, tokens/s
and the peak RSS.
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(args):
    from megatron_onereason.model.qwen3_config import Qwen3Config, qwen3_preset

    if args.shape:
        base = qwen3_preset(args.shape)
        return Qwen3Config(args.layers, base.hidden_size, base.ffn_hidden_size, base.num_attention_heads,
                           base.num_query_groups, base.head_dim, args.vocab or base.vocab_size,
                           max_position_embeddings=max(args.lengths + [args.tree_length or 0]))
    return Qwen3Config(args.layers, args.hidden, 3 * args.hidden, args.heads, args.groups, args.hidden // args.heads,
                       args.vocab or 4096, max_position_embeddings=max(args.lengths + [args.tree_length or 0]))


def pack_layout(kind: str, length: int, args, rng):
    """Documents of ``doc_length`` ± 25 % (the last one cut to fill the pack), or RL trees (trunk + K children)
    repeated to fill it, the rest as padding."""
    from megatron_onereason.model.pack_layout import PackLayout, Segment

    if kind == "documents":
        lengths, total = [], 0
        while total < length:
            n = min(int(rng.integers(int(0.75 * args.doc_length), int(1.25 * args.doc_length) + 1)), length - total)
            lengths.append(n)
            total += n
        return PackLayout.documents(lengths)
    tree = Segment(args.trunk, args.trunk - 1, (args.child + 1,) * args.children)
    segments = [tree] * (length // tree.length)
    if length % tree.length:
        segments.append(Segment(length % tree.length))
    return PackLayout(tuple(segments))


def measure(args) -> dict:
    """One point, in this process: time and peak memory of forward + backward."""
    import torch

    from megatron_onereason.model.builder import ModelBuildConfig, build_qwen3_model
    from megatron_onereason.model.packed_attention import pack_params
    from megatron_onereason.platform import device, initialize_distributed

    initialize_distributed(1, 1)
    dev = device()
    cfg = model_config(args)
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = build_qwen3_model(cfg, ModelBuildConfig(params_dtype=dtype, bf16=args.bf16)).to(dev)
    if args.bf16:
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(model.config, model)
    rng = np.random.default_rng(0)
    layout = pack_layout(args.kind, args.length, args, rng)
    tokens = torch.from_numpy(rng.integers(0, cfg.vocab_size, (1, layout.length))).to(dev)
    params = pack_params(layout, dev, backend="dense" if args.path == "dense" else "auto")

    def step():
        loss = model(tokens, None, None, labels=tokens, packed_seq_params=params).float().mean()
        loss.backward()
        return loss

    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        import psutil

        base = psutil.Process().memory_info().rss
    step()  # warm-up (and FlexAttention's compilation)
    times = []
    for _ in range(args.steps):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"non-finite loss {float(loss)}")
    peak = (torch.cuda.max_memory_allocated() if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) - base
    seconds = float(np.median(times))
    return {"path": args.path, "kind": args.kind, "length": layout.length, "segments": len(layout.segments),
            "seconds": seconds, "tokens_per_s": layout.length / seconds, "peak_gb": max(peak, 0) / 1e9}


def run_point(args, path: str, kind: str, length: int):
    cmd = [sys.executable, os.path.abspath(__file__), "--point", "--path", path, "--kind", kind,
           "--length", str(length)] + [a for a in sys.argv[1:] if a != "--point"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        return {"path": path, "kind": kind, "length": length, "error": proc.stderr.strip().splitlines()[-1][:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def exponent(rows, key):
    rows = [r for r in rows if "error" not in r and r[key] > 0]
    if len(rows) < 2:
        return float("nan")
    return float(np.polyfit(np.log([r["length"] for r in rows]), np.log([r[key] for r in rows]), 1)[0])


def scaling(args):
    rows = []
    points = [(p, "documents", n) for p in args.paths for n in args.lengths if p != "dense" or n <= args.dense_max]
    if args.tree_length:
        points += [(p, "trees", args.tree_length) for p in args.paths
                   if p != "dense" or args.tree_length <= args.dense_max]
    for path, kind, length in points:
        rows.append(run_point(args, path, kind, length))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print("\n| path | pack | positions | segments | fwd+bwd s | tokens/s | peak GB |\n|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['path']} | {r['kind']} | {r['length']} | | failed: {r['error']} | | |")
        else:
            print(f"| {r['path']} | {r['kind']} | {r['length']} | {r['segments']} | {r['seconds']:.3f} | "
                  f"{r['tokens_per_s']:.0f} | {r['peak_gb']:.3f} |")
    print()
    for path in args.paths:
        docs = [r for r in rows if r["path"] == path and r["kind"] == "documents"]
        print(f"{path}: time ∝ length^{exponent(docs, 'seconds'):.2f}, "
              f"memory ∝ length^{exponent(docs, 'peak_gb'):.2f} "
              f"(documents of ~{args.doc_length}, {len([r for r in docs if 'error' not in r])} points)")


def recipe(args):
    """The 48K-pack pre-training recipe through the real trainer, on CPU."""
    from megatron_onereason.data.indexed import IndexedPairWriter
    from megatron_onereason.model.qwen3_config import Qwen3Config

    if args.hidden > 256:
        sys.exit("--recipe is the small-model recipe: --hidden must be <= 256")
    with tempfile.TemporaryDirectory() as work:
        cfg = Qwen3Config(args.layers, args.hidden, 3 * args.hidden, args.heads, args.groups,
                          args.hidden // args.heads, args.vocab or 4096, max_position_embeddings=65536)
        config_path = os.path.join(work, "config.json")
        json.dump(cfg.to_hf_dict(), open(config_path, "w"))
        rng = np.random.default_rng(0)
        with IndexedPairWriter(os.path.join(work, "docs")) as writer:
            for _ in range(13 * (args.iters + 1)):
                n = int(rng.integers(3072, 4097))
                writer.add(rng.integers(0, cfg.vocab_size, n), np.ones(n, dtype=np.uint8))
        metrics = os.path.join(work, "metrics.jsonl")
        cmd = [sys.executable, "-m", "megatron_onereason.train", f"model.init_from={config_path}",
               f"data.blend=[1.0, {os.path.join(work, 'docs')}]", "data.seq_length=49152",
               "data.max_sample_length=4096", f"train.iters={args.iters}", "train.global_batch_size=1",
               "optim.lr=1e-3", "optim.warmup_iters=1", f"optim.decay_iters={args.iters}", "logging.log_interval=1",
               f"logging.metrics_jsonl={metrics}"]
        start = time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.time() - start
        if proc.returncode:
            sys.exit(f"trainer failed:\n{proc.stderr[-4000:]}")
        rows = [json.loads(line) for line in open(metrics)]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / 1e9
    result = {"layers": args.layers, "hidden": args.hidden, "pack": 49152, "iters": len(rows), "wall_s": wall,
              "losses": [r["loss"] for r in rows], "s_per_iter": [r["iteration_time"] for r in rows],
              "tokens_per_s": [r["tokens_per_sec"] for r in rows], "peak_rss_gb": peak_gb}
    print(json.dumps(result))
    return result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 49152])
    p.add_argument("--paths", nargs="+", choices=["dense", "packed"], default=["dense", "packed"])
    p.add_argument("--dense-max", type=int, default=8192, help="longest pack for the dense path")
    p.add_argument("--doc-length", type=int, default=1024)
    p.add_argument("--tree-length", type=int, default=0, help="also a tree pack of this length")
    p.add_argument("--trunk", type=int, default=2048, help="tree trunk (prompt + trace) length")
    p.add_argument("--children", type=int, default=8)
    p.add_argument("--child", type=int, default=8, help="item completion length")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--groups", type=int, default=2)
    p.add_argument("--vocab", type=int, default=0, help="default: 4096, or the preset's")
    p.add_argument("--shape", help="width of a Qwen3 preset (e.g. 8b) instead of --hidden/--heads/--groups")
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--recipe", action="store_true", help="the 48K-pack recipe through the trainer (CPU)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--kind", default="documents", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("--device cuda: no CUDA device here")
    elif args.point:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.point:
        print(json.dumps(measure(args)))
    elif args.recipe:
        recipe(args)
    else:
        scaling(args)


if __name__ == "__main__":
    main()
