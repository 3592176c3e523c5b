"""Thin script: the command is megatron_onereason/tools/mcore_to_hf.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.mcore_to_hf import main

if __name__ == "__main__":  # guard needed: dist_checkpointing's async writer re-imports __main__
    sys.exit(main())
