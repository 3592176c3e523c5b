"""Add the itemic tokens of a scheme to a HF Qwen3 directory: tokenizer, embedding (and untied lm_head), config,
itemic_tokens.json.

    PYTHONPATH=. python tools/extend_vocab.py --hf-dir Qwen3-8B --out-dir Qwen3-8B-itemic \\
        [--scheme onereason_report|openonerec|onereason] [--levels 3] [--codebook-size 8192] \\
        [--domains video,prod,ad,living,sid] [--seed 0] [--overwrite]

New rows are drawn from N(mean, cov) of the existing rows (OpenOneRec §4.2); see
megatron_onereason/tokenizer/vocab_extension.py for the id layout. A checkpoint whose tokenizer already has itemic
tokens (a released OpenOneRec model) is refused: describe its tokens with tools/import_itemic_vocab.py instead.
"""
from __future__ import annotations

import argparse
import sys

from megatron_onereason.tokenizer.itemic_import import run_tool
from megatron_onereason.tokenizer.itemic_tokens import DEFAULT_CODEBOOK_SIZE, DEFAULT_LEVELS, DEFAULT_SCHEME, \
    PRESETS, preset
from megatron_onereason.tokenizer.vocab_extension import extend_vocabulary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="input HF Qwen3 directory (safetensors)")
    parser.add_argument("--out-dir", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--scheme", default=DEFAULT_SCHEME.name, choices=list(PRESETS),
                        help="how items are written (megatron_onereason/tokenizer/itemic_tokens.py)")
    parser.add_argument("--levels", type=int, default=DEFAULT_LEVELS, help="code levels per item (a, b, c)")
    parser.add_argument("--codebook-size", type=int, default=DEFAULT_CODEBOOK_SIZE, help="codes per level")
    parser.add_argument("--domains", default=None, help="comma-separated itemic domains of a per-domain scheme "
                                                        "(default: video,prod,ad,living,sid)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new embedding rows' initialisation")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    args = parser.parse_args(argv)
    domains = None if args.domains is None else [d.strip() for d in args.domains.split(",") if d.strip()]
    scheme = lambda: preset(args.scheme, args.levels, args.codebook_size, domains)  # noqa: E731 (errors in run_tool)
    return run_tool("extend_vocab", lambda: extend_vocabulary(args.hf_dir, args.out_dir, scheme(), seed=args.seed,
                                                              overwrite=args.overwrite), args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
