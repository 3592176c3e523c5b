"""The command-line tools, one module per command, each with a ``main(argv=None) -> int`` entry.

The top-level ``tools/*.py`` and ``checkpoints_convert/*.py`` scripts of a checkout are thin wrappers around these
modules with the same command lines; ``python -m megatron_onereason.tools.<name>`` runs them as well.
"""
