"""Thin script: the command is megatron_onereason/tools/compare_logits.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.compare_logits import main

if __name__ == "__main__":
    sys.exit(main())
