"""Add the itemic tokens to a HF Qwen3 directory: tokenizer, embedding (and untied lm_head), config, itemic_tokens.json.

    PYTHONPATH=. python tools/extend_vocab.py --hf-dir Qwen3-8B --out-dir Qwen3-8B-itemic \\
        [--levels 3] [--codebook-size 8192] [--domains video,prod,ad,living,sid] [--seed 0] [--overwrite]

New rows are drawn from N(mean, cov) of the existing rows (OpenOneRec §4.2); see
megatron_onereason/tokenizer/vocab_extension.py for the id layout.
"""
from __future__ import annotations

import argparse
import json
import sys

from megatron_onereason.cli import run_cli
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_CODEBOOK_SIZE, DEFAULT_LEVELS, DOMAINS
from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="input HF Qwen3 directory (safetensors)")
    parser.add_argument("--out-dir", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="code levels per item (a, b, c)")
    parser.add_argument("--codebook-size", type=int, default=DEFAULT_CODEBOOK_SIZE, help="codes per level")
    parser.add_argument("--domains", default=",".join(DOMAINS), help="comma-separated itemic domains")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new embedding rows' initialisation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    args = parser.parse_args(argv)
    vocab = extend_vocabulary(
        args.hf_dir,
        args.out_dir,
        levels=args.levels,
        codebook_size=args.codebook_size,
        domains=[d.strip() for d in args.domains.split(",") if d.strip()],
        seed=args.seed,
        overwrite=args.overwrite,
    )
    print(json.dumps({"out_dir": args.out_dir, **vocab.to_dict()}, indent=2))


if __name__ == "__main__":
    sys.exit(run_cli("extend_vocab", main))  # user errors: one line, exit 1
