"""Thin script: the command is megatron_onereason/tools/import_itemic_vocab.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.import_itemic_vocab import main

if __name__ == "__main__":
    sys.exit(main())
