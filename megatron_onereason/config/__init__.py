"""Typed configs: nested dataclasses loaded from YAML, with ``section.field=value`` overrides from the CLI.

Unknown keys and values of the wrong type are errors naming the key and the file, so a typo in a 500-node job's
config fails at start-up instead of being ignored.

A YAML file may name a base file with ``extends: base.yaml`` (a path relative to the file): the base's settings
apply first and the file's own override them key by key, sections merging recursively (lists are replaced whole).
Bases may extend further bases.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Dict, List, Optional, Sequence, Type, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X] and unions: first alternative that accepts the value
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, alt, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: {value!r} does not fit {tp} ({'; '.join(errors)})")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin in (list, tuple, List, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Dict) or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads 1e-4 without a dot as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}")


def from_dict(cls: Type[T], data: Optional[Dict[str, Any]], where: str = "config") -> T:
    """Build dataclass ``cls`` from a (nested) mapping, checking names and types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown} for {cls.__name__} (known: {sorted(names)})")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def _check_override(cls: Optional[type], keys: Sequence[str], value: Any, item: str) -> None:
    """Errors of an override blamed on the override: an unknown name (with the known ones) or a value of the wrong
    type for its field (values that are sections are checked when the config is built)."""
    for depth, k in enumerate(keys):
        if cls is None or not dataclasses.is_dataclass(cls):
            return
        names = sorted(f.name for f in dataclasses.fields(cls) if f.init)
        if k not in names:
            section = ".".join(keys[:depth]) or "the top level"
            raise ConfigError(f"override {item!r}: no {k!r} in {section} (known: {names})")
        cls = typing.get_type_hints(cls)[k]
    if not (dataclasses.is_dataclass(cls) and isinstance(value, dict)):
        _coerce(value, cls, f"override {item!r}")


def apply_overrides(data: Dict[str, Any], overrides: Sequence[str], cls: Optional[type] = None) -> Dict[str, Any]:
    """``["optim.lr=1e-4", "data.blend=[1.0, /d/a]"]`` → nested updates; values are parsed as YAML. With ``cls``
    (the config dataclass) names and value types are checked here, so their errors name the override."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key.path=value")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            problem = str(e).splitlines()[0]
            raise ConfigError(f"override {item!r}: the value is not valid YAML ({problem}); quote it if it is a "
                              "string") from None
        _check_override(cls, keys, value, item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def _merge(base: Dict[str, Any], update: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def read_yaml_config(path: str, _chain: Sequence[str] = ()) -> Dict[str, Any]:
    """The mapping of a YAML config file, with its ``extends`` chain merged in (module docstring)."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends must be a path to a YAML file, got {base!r}")
    base_path = os.path.normpath(os.path.join(os.path.dirname(path), base))
    chain = [*_chain, os.path.normpath(path)]
    if base_path in chain:
        raise ConfigError(f"{path}: extends {base!r} makes a cycle ({' -> '.join(chain + [base_path])})")
    return _merge(read_yaml_config(base_path, chain), data)


def load_config(cls: Type[T], path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    data = read_yaml_config(path) if path is not None else {}
    return from_dict(cls, apply_overrides(data, overrides, cls), where=path or "config")
