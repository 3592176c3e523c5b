"""Thin script: the command is megatron_onereason/tools/make_synthetic_catalog.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.make_synthetic_catalog import main

if __name__ == "__main__":
    sys.exit(main())
