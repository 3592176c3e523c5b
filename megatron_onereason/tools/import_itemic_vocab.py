"""Describe the itemic tokens a HF checkpoint already has: OUT = IN (files hard-linked) + itemic_tokens.json.

    PYTHONPATH=. python tools/import_itemic_vocab.py --hf-dir OneRec-1.7B --out-dir OneRec-1.7B-onereason \\
        [--scheme auto|openonerec|onereason|onereason_report] [--overwrite]

For released OpenOneRec checkpoints (``<|sid_begin|><s_a_N><s_b_N><s_c_N><|sid_end|>``, added by their
expand_qwen3_vocab.py). ``auto`` reads the scheme off the tokenizer and refuses, naming the reason, when the tokens are
ambiguous (two code families) or incomplete (a missing code, level or end token); a preset name resolves the
ambiguity. See megatron_onereason/tokenizer/itemic_import.py.
"""
from __future__ import annotations

import argparse
import sys

from megatron_onereason.tokenizer.itemic_import import import_itemic_vocab, run_tool
from megatron_onereason.tokenizer.itemic_tokens import PRESETS


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hf-dir", required=True, help="input HF directory whose tokenizer has itemic tokens")
    parser.add_argument("--out-dir", required=True, help="output directory (must not exist unless --overwrite)")
    parser.add_argument("--scheme", default="auto", choices=["auto", *PRESETS],
                        help="the scheme of IN's tokens: detected (auto), or a preset name to resolve ambiguity")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    args = parser.parse_args(argv)
    return run_tool("import_itemic_vocab", lambda: import_itemic_vocab(args.hf_dir, args.out_dir, args.scheme,
                                                                       overwrite=args.overwrite), args.out_dir)


if __name__ == "__main__":
    sys.exit(main())
