"""Typed dataclass configs from plain dicts: validation, overrides, serialization.

Every config section is a dataclass whose fields carry a one-line doc in
`metadata["help"]` (use `option(...)`). `from_dict` builds a dataclass from parsed
YAML, checking every value against the field's annotation and rejecting unknown keys
with the nearest valid key. Errors are `ConfigError`s naming the dotted key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key (and file when known)."""


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None):
    """A dataclass field with a one-line doc; `factory` for mutable defaults."""
    metadata = {"help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def nearest(name: str, candidates: list[str]) -> str | None:
    matches = difflib.get_close_matches(name, candidates, n=1, cutoff=0.4)
    return matches[0] if matches else None


def unknown_key_message(path: str, candidates: list[str]) -> str:
    leaf = path.rsplit(".", 1)[-1]
    suggestion = nearest(leaf, candidates)
    hint = f" (did you mean '{suggestion}'?)" if suggestion else ""
    return f"unknown key '{path}'{hint}; valid keys here: {', '.join(sorted(candidates))}"


def _type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(annotation))
    return getattr(annotation, "__name__", str(annotation)).replace("typing.", "")


def coerce(value: Any, annotation: Any, path: str) -> Any:
    """Check `value` against `annotation`, converting only where YAML is ambiguous (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(f"'{path}' = {value!r} is not {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{path}' = {value!r} must be one of {', '.join(repr(a) for a in args)}")
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping of {annotation.__name__} fields, got {value!r}")
        return from_dict(annotation, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' = {value!r} must be a list")
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' = {value!r} must be a mapping")
        value_type = args[1] if args else Any
        return {str(k): coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' = {value!r} must be true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{path}' = {value!r} must be an integer")
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{path}' = {value!r} must be a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' = {value!r} must be a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {path}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, validating keys and types recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            raise ConfigError(unknown_key_message(f"{path}.{key}" if path else str(key), list(fields)))
    values = {}
    for name, field in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            values[name] = coerce(data[name], hints[name], key_path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key_path}'")
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:
        raise ConfigError(f"{path or cls.__name__}: {error}") from None


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML so 3, 1e-3, true, [1,2] get types)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, cls: type, overrides: list[str]) -> dict:
    """Merge `--set` overrides into raw config `data`, checking each key exists in `cls`."""
    for text in overrides:
        keys, value = parse_override(text)
        node, node_cls = data, cls
        for depth, key in enumerate(keys):
            path = ".".join(keys[: depth + 1])
            is_last = depth == len(keys) - 1
            if node_cls is not None:
                hints = typing.get_type_hints(node_cls)
                if key not in hints:
                    raise ConfigError(f"--set {text}: " + unknown_key_message(path, list(hints)))
                field_type = hints[key]
                node_cls = field_type if dataclasses.is_dataclass(field_type) else None
            if is_last:
                node[key] = value
            else:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {text}: '{path}' is not a section")
                node = child
    return data


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """Rows (key, type, default, help) for every field, recursively: the config reference."""
    rows = []
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        key = f"{prefix}{field.name}"
        annotation = hints[field.name]
        if dataclasses.is_dataclass(annotation):
            rows.extend(describe(annotation, key + "."))
            continue
        if field.default is not dataclasses.MISSING:
            default = repr(field.default)
        elif field.default_factory is not dataclasses.MISSING:
            default = repr(field.default_factory())
        else:
            default = "(required)"
        rows.append((key, _type_name(annotation), default, field.metadata.get("help", "")))
    return rows
