"""Thin script: the command is megatron_onereason/tools/summarize_metrics.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.summarize_metrics import main

if __name__ == "__main__":
    sys.exit(main())
