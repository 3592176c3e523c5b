"""Thin script: the command is megatron_onereason/tools/build_itemic_tokenizer.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.build_itemic_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
