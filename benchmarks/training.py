"""Trainer throughput: tokens/s, TFLOP/s per device and MFU of the real trainer on random weights and data.

    python benchmarks/training.py --preset tiny --seq-length 1024 --layouts 1x1 2x1 1x2 [--iters 6] [--bf16]
    python benchmarks/training.py --preset 8b --seq-length 49152 --layouts 8x1 --nproc 8 --bf16   (a GPU node)

Each layout TPxPP runs ``--nproc`` processes under torchrun (the rest is data parallel); the first two iterations
are warm-up and excluded. FLOPs follow ``megatron_onereason/training/flops.py``. Prints a markdown table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_inputs(work: str, preset: str, seq_length: int, max_tp: int) -> str:
    """A random-weight megatron checkpoint of ``preset`` and a random corpus of 1/8-sequence documents."""
    import torch

    from megatron_onereason.data.indexed import IndexedPairWriter
    from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
    from megatron_onereason.model.qwen3_config import qwen3_preset

    cfg = qwen3_preset(preset)
    hf = os.path.join(work, "hf")
    make_hf_qwen3(cfg, dtype=torch.bfloat16).save_pretrained(hf)
    subprocess.run([sys.executable, "checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf, "--out-dir",
                    os.path.join(work, "mcore"), "--tp", str(max_tp), "--no-tokenizer"],
                   cwd=REPO, check=True, capture_output=True)
    rng = np.random.default_rng(0)
    with IndexedPairWriter(os.path.join(work, "corpus")) as writer:
        for _ in range(512):
            n = int(rng.integers(seq_length // 16, seq_length // 4))
            writer.add(rng.integers(0, cfg.vocab_size, n), np.ones(n, dtype=np.uint8))
    return work


def run_layout(work: str, tp: int, pp: int, nproc: int, seq_length: int, iters: int, bf16: bool) -> dict:
    metrics = os.path.join(work, f"tp{tp}_pp{pp}.jsonl")
    if os.path.exists(metrics):
        os.remove(metrics)
    dp = nproc // (tp * pp)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "megatron_onereason.train", f"model.load={os.path.join(work, 'mcore')}",
           f"data.blend=[1.0, {os.path.join(work, 'corpus')}]", f"data.seq_length={seq_length}",
           f"data.max_sample_length={seq_length}", f"train.iters={iters}", f"train.global_batch_size={2 * dp}",
           f"parallel.tensor_model_parallel_size={tp}", f"parallel.pipeline_model_parallel_size={pp}",
           f"precision.bf16={'true' if bf16 else 'false'}", f"logging.metrics_jsonl={metrics}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"TP={tp} PP={pp} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(metrics)][2:]  # skip warm-up
    mean = lambda k: statistics.mean(r[k] for r in rows) if rows and k in rows[0] else float("nan")  # noqa: E731
    return {"tokens_per_sec": mean("tokens_per_sec"), "tflops": mean("tflops_per_device"), "mfu": mean("mfu"),
            "memory_gib": mean("memory_gib"), "iteration_time": mean("iteration_time")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--layouts", nargs="+", default=["1x1", "2x1", "1x2"], help="TPxPP")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--bf16", action="store_true")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        make_inputs(work, args.preset, args.seq_length, max(int(x.split("x")[0]) for x in args.layouts))
        print(f"\n{args.preset}, {args.seq_length}-token packs, {args.nproc} processes, "
              f"{'bf16' if args.bf16 else 'fp32'}\n")
        print("| TP×PP | tokens/s | TFLOP/s/device | MFU | s/iteration | memory GiB |\n|---|---|---|---|---|---|")
        for layout in args.layouts:
            tp, pp = (int(x) for x in layout.split("x"))
            r = run_layout(work, tp, pp, args.nproc, args.seq_length, args.iters, args.bf16)
            mfu = f"{r['mfu']:.3f}" if r["mfu"] == r["mfu"] else "– (no known peak)"
            print(f"| {tp}×{pp} | {r['tokens_per_sec']:.0f} | {r['tflops']:.3f} | {mfu} | "
                  f"{r['iteration_time']:.2f} | {r['memory_gib']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
