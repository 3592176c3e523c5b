"""Write a random HF Qwen3 model directory with the locally built tiny Qwen3 tokenizer (no downloads).

    PYTHONPATH=. python tools/make_tiny_qwen3.py --out runs/tiny_qwen3 [--preset tiny] [--seed 0] [--untied]
"""
from __future__ import annotations

import argparse
import dataclasses
import sys

from megatron_onereason.cli import run_cli
from megatron_onereason.model.qwen3_config import qwen3_preset
from megatron_onereason.tokenizer.qwen3_tokenizer import save_tiny_hf_qwen3


def run(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output HF directory (must not exist unless --overwrite)")
    parser.add_argument("--preset", default="tiny", help="Qwen3 preset: tiny, 0.6b, 1.7b, 4b, 8b, 14b")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--untied", action="store_true", help="separate lm_head (tie_word_embeddings=false)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    args = parser.parse_args(argv)
    cfg = qwen3_preset(args.preset)
    if args.untied:
        cfg = dataclasses.replace(cfg, tie_word_embeddings=False)
    save_tiny_hf_qwen3(args.out, cfg, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {args.out}: preset {args.preset}, tie_word_embeddings={cfg.tie_word_embeddings}, seed {args.seed}")


def main(argv=None) -> int:
    """The command line: user errors become one line on stderr and exit code 1."""
    return run_cli("make_tiny_qwen3", lambda: run(argv))


if __name__ == "__main__":
    sys.exit(main())
