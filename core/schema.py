"""Typed dataclass configs from plain dicts: validation, overrides, serialization.

Every config section is a dataclass whose fields carry a one-line doc in
`metadata["help"]` (use `option(...)`). `from_dict` builds a dataclass from parsed
YAML, checking every value against the field's annotation and rejecting unknown keys
with the nearest valid key. Errors are `ConfigError`s naming the dotted key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import re
import types
import typing
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A config value or key is invalid; the message names the key (and file when known).
    `key`: the dotted key at fault when known, so a `--set` that set it can be named."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None, bound: str | None = None):
    """A dataclass field with a one-line doc; `factory` for mutable defaults; `bound` the range of a
    number (or of each number of a list), written as the error says it: ">= 0", "> 0", "[0, 1)", "[0, 2**31]"."""
    metadata = {"help": help, "bound": bound}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_COMPARE = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_INTERVAL = re.compile(r"([\[(])(\S+), (\S+)([\])])")


def _number(text: str) -> float:
    base, _, exponent = text.partition("**")
    return float(base) ** float(exponent) if exponent else float(text)


def within(value: Any, bound: str) -> bool:
    """Whether number `value` meets `bound` (see `option`); NaN, infinities and non-numbers never do."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return False
    op, _, limit = bound.partition(" ")
    if op in _COMPARE:
        return _COMPARE[op](value, _number(limit))
    match = _INTERVAL.fullmatch(bound)
    assert match, f"bad bound {bound!r}"
    opening, low, high, closing = match.groups()
    return ((operator.ge if opening == "[" else operator.gt)(value, _number(low))
            and (operator.le if closing == "]" else operator.lt)(value, _number(high)))


def bound_text(bound: str) -> str:
    """">= 1" or "in [0, 1)": how a bound reads after "must be"."""
    return f"in {bound}" if bound[0] in "[(" else bound


def check_bounds(config: Any, section: str, **bounds: str) -> None:
    """Check every number of dataclass `config` against its field's `bound` (and `bounds`, for bounds that
    depend on other fields); raise ConfigError "SECTION.FIELD must be >= 1, got 0" at the first miss.
    None (an optional field left empty) passes."""
    for field in dataclasses.fields(config):
        bound = bounds.get(field.name) or field.metadata.get("bound")
        if bound is None:
            continue
        value = getattr(config, field.name)
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is not None and not within(item, bound):
                raise ConfigError(f"{section}.{field.name} must be {bound_text(bound)}, got {item!r}", key=f"{section}.{field.name}")


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
        if len(errors) == 1 and type(None) in args:  # an optional value: the one type's message, "or null"
            raise ConfigError(f"{errors[0]} or null", key=path)
        raise ConfigError(f"'{path}' = {value!r} is not {_type_name(annotation)}", key=path)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"'{path}' = {value!r} must be one of {', '.join(repr(a) for a in args)}", key=path)
        return value
    if dataclasses.is_dataclass(annotation):
        if isinstance(value, annotation):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' must be a mapping of {annotation.__name__} fields, got {value!r}", key=path)
        return from_dict(annotation, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{path}' = {value!r} must be a list", key=path)
        item_type = args[0] if args else Any
        items = [coerce(v, item_type, f"{path}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{path}' = {value!r} must be a mapping", key=path)
        value_type = args[1] if args else Any
        return {str(k): coerce(v, value_type, f"{path}.{k}") for k, v in value.items()}
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"'{path}' = {value!r} must be true or false", key=path)
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"'{path}' = {value!r} must be an integer", key=path)
        return value
    if annotation is float:
        if isinstance(value, str):
            # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"'{path}' = {value!r} must be a number", key=path)
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"'{path}' = {value!r} must be a string", key=path)
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {path}")


def from_dict(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`, validating keys and types recursively."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in fields:
            key_path = f"{path}.{key}" if path else str(key)
            raise ConfigError(unknown_key_message(key_path, list(fields)), key=key_path)
    values = {}
    for name, field in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in data:
            values[name] = coerce(data[name], hints[name], key_path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{key_path}'", key=key_path)
    try:
        return cls(**values)
    except ConfigError:
        raise
    except ValueError as error:  # a check across fields of the section
        message = str(error)
        prefix = path or cls.__name__
        raise ConfigError(message if message.startswith(f"{prefix}.") else f"{prefix}: {message}", key=path or None) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one silently,
    dropping a whole section when it is `run:` twice)."""

    def __init__(self, stream):
        super().__init__(stream)
        self._paths: dict[int, str] = {}  # id(node) -> its dotted key path, registered by its parent first

    def construct_mapping(self, node, deep=False):
        path = self._paths.get(id(node), "")
        first_lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys of its own override the merged ones
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base constructor names the unhashable key with its line
            key_path = f"{path}.{key}" if path else str(key)
            line = key_node.start_mark.line + 1
            if key in first_lines:
                where = f"twice on line {line}" if first_lines[key] == line else f"at lines {first_lines[key]} and {line}"
                raise ConfigError(f"duplicate key '{key_path}' {where} (YAML would keep only the last; remove one)", key=key_path)
            first_lines[key] = line
            self._paths[id(value_node)] = key_path
        return super().construct_mapping(node, deep)

    def construct_sequence(self, node, deep=False):
        path = self._paths.get(id(node), "")
        for index, item in enumerate(node.value):
            self._paths[id(item)] = f"{path}[{index}]"
        return super().construct_sequence(node, deep)


def load_yaml(text: str) -> Any:
    """yaml.safe_load, except that a duplicate key is a ConfigError naming its key path and both lines."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML so 3, 1e-3, true, [1,2] get types)."""
    if "=" not in text:
        raise ConfigError(f"--set {text}: must look like key.path=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text}: the key before '=' is empty")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: the text itself (a string field takes it; any other says what it needs)
    except ConfigError as error:
        raise ConfigError(f"--set {text}: {error}", key=key) from None
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
                    raise ConfigError(f"--set {text}: " + unknown_key_message(path, list(hints)), key=path)
                field_type = hints[key]
                node_cls = field_type if dataclasses.is_dataclass(field_type) else None
            if is_last:
                node[key] = value
            else:
                child = node.get(key)
                if child is None:
                    child = node[key] = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"--set {text}: '{path}' is not a section", key=path)
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
        bound = field.metadata.get("bound")
        type_name = _type_name(annotation) + (f" {bound_text(bound)}" if bound else "")
        rows.append((key, type_name, default, field.metadata.get("help", "")))
    return rows
