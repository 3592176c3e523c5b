"""Conversion time and peak RSS for a Qwen3 preset shape with random bf16 weights.

    python benchmarks/conversion.py --preset 1.7b [--work-dir /tmp/conv_bench] [--tp 2]

Each direction runs as its own process (the CLIs print their peak RSS). Prints a markdown table.
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import time

import torch

from megatron_onereason.model.hf_qwen3 import make_hf_qwen3
from megatron_onereason.model.qwen3_config import qwen3_preset

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def timed_cli(*args):
    start = time.time()
    proc = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{args[0]} failed:\n{proc.stderr[-3000:]}")
    rss = float(re.search(r"peak RSS ([\d.]+) GiB", proc.stdout).group(1))
    return time.time() - start, rss


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="1.7b")
    p.add_argument("--work-dir", default="/tmp/onereason_conversion_bench")
    p.add_argument("--tp", default="2")
    args = p.parse_args()
    cfg = qwen3_preset(args.preset)
    shutil.rmtree(args.work_dir, ignore_errors=True)
    hf, mc, back = (os.path.join(args.work_dir, n) for n in ("hf", "mcore", "hf_export"))
    start = time.time()
    make_hf_qwen3(cfg, dtype=torch.bfloat16).save_pretrained(hf)
    print(f"random {args.preset} HF checkpoint written in {time.time() - start:.0f}s", flush=True)
    t1, r1 = timed_cli("checkpoints_convert/hf_to_mcore.py", "--hf-dir", hf, "--out-dir", mc, "--tp", args.tp,
                        "--no-tokenizer")
    t2, r2 = timed_cli("checkpoints_convert/mcore_to_hf.py", "--mcore-dir", mc, "--out-dir", back)
    gb = sum(os.path.getsize(os.path.join(hf, f)) for f in os.listdir(hf) if f.endswith(".safetensors")) / 1e9
    print("\n| preset | params | bf16 size | direction | wall s | peak RSS GiB |\n|---|---|---|---|---|---|")
    print(f"| {args.preset} | {cfg.num_parameters() / 1e9:.2f}B | {gb:.2f} GB | HF → mcore (TP={args.tp}) | {t1:.1f} | {r1:.2f} |")
    print(f"| {args.preset} | {cfg.num_parameters() / 1e9:.2f}B | {gb:.2f} GB | mcore → HF | {t2:.1f} | {r2:.2f} |")
    shutil.rmtree(args.work_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
