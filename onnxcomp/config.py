"""Validated, frozen configuration dataclasses built from recipe tables.

``from_mapping(Config, table, where="quantize")`` checks every key against the dataclass fields and
every value against its annotation (bool, int, float, str, ``Literal`` choices, tuples, optionals,
nested config dataclasses), so errors name the field and list the valid choices.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

from onnxcomp.errors import RecipeError

__all__ = ["config_to_dict", "from_mapping", "validate_config"]

C = TypeVar("C")


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise RecipeError(f"{where} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"{where} must be {_type_name(tp)}; got {value!r}")
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be {_type_name(tp)}; got {value!r}")
        item_tp = get_args(tp)[0]
        return tuple(_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise RecipeError(f"{where} must be a table; got {value!r}")
        return from_mapping(tp, value, where=where)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false; got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer; got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number; got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string; got {value!r}")
        return value
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise RecipeError(f"{where} must be {_type_name(tp)}; got {value!r}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a config class (resolved once: it evaluates every annotation)."""
    return typing.get_type_hints(cls)


def from_mapping(cls: type[C], table: Mapping[str, Any], *, where: str) -> C:
    """Build the frozen dataclass ``cls`` from ``table``; unknown keys and bad values raise RecipeError."""
    if not isinstance(table, Mapping):
        raise RecipeError(f"{where} must be a table of options; got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = sorted(set(table) - set(fields))
    if unknown:
        valid = ", ".join(sorted(fields)) or "(none)"
        raise RecipeError(f"{where}: unknown option {unknown[0]!r}; valid options are: {valid}")
    hints = _type_hints(cls)
    kwargs = {key: _coerce(value, hints[key], f"{where}.{key}") for key, value in table.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise RecipeError(f"{where}: {exc}") from exc


def validate_config(obj: Any, *, where: str) -> None:
    """Re-check every field of an already-built config (used when it was created in Python)."""
    hints = _type_hints(type(obj))
    for field in dataclasses.fields(obj):
        _coerce(getattr(obj, field.name), hints[field.name], f"{where}.{field.name}")


def config_to_dict(obj: Any) -> dict[str, Any]:
    """A TOML/JSON-friendly dict of a config (tuples become lists)."""

    def convert(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: convert(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (tuple, list)):
            return [convert(x) for x in v]
        return v

    return convert(obj)
