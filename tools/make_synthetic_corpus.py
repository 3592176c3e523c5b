"""Thin script: the command is megatron_onereason/tools/make_synthetic_corpus.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.make_synthetic_corpus import main

if __name__ == "__main__":
    sys.exit(main())
