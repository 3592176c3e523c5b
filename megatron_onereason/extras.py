"""Optional dependencies (the package's extras): imported where a command needs them, with the install line if not.

A converter-only install (``pip install megatron_onereason``) has no ray, faiss, vLLM or wandb; a command that needs
one stops with ``<prog>: error: <what> needs <package>: pip install 'megatron_onereason[<extra>]'``.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from megatron_onereason.cli import UserError


def import_optional(module: str, extra: str, needed_for: str) -> ModuleType:
    """``import module``, or a :class:`UserError` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module.split(".")[0]:
            raise  # the package is there but broken: its own traceback says why
        raise UserError(f"{needed_for} needs the {module.split('.')[0]} package, which is not installed: "
                        f"pip install 'megatron_onereason[{extra}]'") from e
