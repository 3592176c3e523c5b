"""Command-line help from docstrings: RST markup removed, and a config's sections listed with their defaults.

Docstrings are written for Sphinx (````code````, ``:mod:`x```, ``**bold**``); ``--help`` shows them as plain text.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import typing
from typing import Any, List

_RST = [
    (re.compile(r":[a-z]+:`~?([^`]+)`"), r"\1"),  # :mod:`x`, :class:`~a.B`
    (re.compile(r"``([^`]+)``"), r"\1"),
    (re.compile(r"\*\*([^*]+)\*\*"), r"\1"),
]


def plain_text(text: str) -> str:
    """``text`` without RST inline markup."""
    for pattern, replacement in _RST:
        text = pattern.sub(replacement, text)
    return text


class DocHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the docstring's line breaks (examples stay examples) and drops its RST markup."""

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))

    def _expand_help(self, action: argparse.Action) -> str:
        return plain_text(super()._expand_help(action))


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " | ".join(str(a) for a in args)
    if origin is typing.Union:
        names = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(names) + (" | null" if type(None) in args else "")
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(tp, "__name__", str(tp))


def _default(field: dataclasses.Field) -> Any:
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return "(required)"


def _yaml_value(value: Any) -> str:
    """How the value is written in YAML (true, null, [0.2, 0.28]); strings bare."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def config_fields(cls: type, prefix: str = "") -> List[str]:
    """``section.field: type = default`` for every field of the config dataclass ``cls``, sections expanded."""
    hints = typing.get_type_hints(cls)
    lines = []
    for field in dataclasses.fields(cls):
        tp = hints[field.name]
        if dataclasses.is_dataclass(tp):
            lines.extend(config_fields(tp, f"{prefix}{field.name}."))
        else:
            lines.append(f"{prefix}{field.name}: {_type_name(tp)} = {_yaml_value(_default(field))}")
    return lines


def config_epilog(cls: type) -> str:
    """The ``--help`` epilog of a command configured by ``cls``: every setting and its default."""
    return ("settings (YAML keys of --config; override any as section.field=value):\n  "
            + "\n  ".join(config_fields(cls)))
