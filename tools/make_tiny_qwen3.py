"""Thin script: the command is megatron_onereason/tools/make_tiny_qwen3.py (same command line; see its --help)."""
import sys

from megatron_onereason.tools.make_tiny_qwen3 import main

if __name__ == "__main__":
    sys.exit(main())
