"""Experiment configs: frozen dataclasses, overridden from the command line, saved as JSON.

An experiment's config is a frozen dataclass whose fields have defaults. On the command line a
field is changed with `--set key=value`; the text is parsed to the field's declared type:

  ====================================  ==============================================
  declared type                         accepted text
  ====================================  ==============================================
  `int`                                 `3`, `-2`, `1_000`, `1e4` (an integral value)
  `float`                               `0.1`, `1e-3`, `inf` (never `nan`)
  `bool`                                `true/false`, `yes/no`, `1/0` (any case)
  `str`, `pathlib.Path`                 the text as given
  `Literal["a", "b"]`                   one of the listed values
  `tuple[int, ...]`, `tuple[float, ...]` a comma list, `1,2,3`; the empty text is `()`
  `tuple[int, float]`                   a comma list of exactly that length
  `Optional[T]`, `T | None`             `none` (any case), or text for `T`
  ====================================  ==============================================

A field that is itself a dataclass is reached with a dotted key: `--set model.width=64`.
`config_to_dict` and `config_from_dict` turn a config into plain JSON data and back, so that
`config.json` in a results folder records exactly what ran.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeVar, Union

from quartic.core.errors import QuarticError

__all__ = ["apply_overrides", "config_from_dict", "config_keys", "config_to_dict"]

C = TypeVar("C")

_TRUE = frozenset({"true", "yes", "1"})
_FALSE = frozenset({"false", "no", "0"})
_NONE = frozenset({"none", "null"})


# --------------------------------------------------------------------------------------------------
# Field types.


def _field_types(cls: type) -> dict[str, Any]:
    """The resolved type of every init field of the dataclass `cls`, in declaration order."""
    try:
        hints = typing.get_type_hints(cls)
    except NameError as e:
        # String annotations (`from __future__ import annotations`) are resolved in the module
        # that defines `cls`; that module must be importable or registered in `sys.modules`.
        raise TypeError(f"cannot resolve the field types of {cls.__qualname__}: {e}") from e
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    """How a declared type is described to the user in error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "bool (true/false, yes/no, 1/0)"
    if _is_union(tp):
        arms = [a for a in args if a is not type(None)]
        names = " or ".join(_type_name(a) for a in arms)
        return f"{names} or none" if len(arms) < len(args) else names
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (tuple, list):
        if not args:
            return "a comma list"
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            return f"a comma list of {_type_name(args[0])}"
        return f"a comma list of {len(args)} values ({', '.join(_type_name(a) for a in args)})"
    if tp is pathlib.Path:
        return "a path"
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------------------------------
# Parsing command-line text.


class _BadValue(Exception):
    """Raised by the parsers; turned into a QuarticError that names the key."""


class _Unsupported(Exception):
    """The declared type cannot be written on the command line."""


def _parse_text(tp: Any, text: str) -> Any:
    """Parse `text` to the declared type `tp`; raise `_BadValue` when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    stripped = text.strip()
    if tp is Any or tp is str:
        return text
    if tp is bool:
        low = stripped.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise _BadValue
    if tp is int:
        try:
            return int(stripped)
        except ValueError:
            pass
        try:
            value = float(stripped)
        except ValueError:
            raise _BadValue from None
        if not value.is_integer():
            raise _BadValue
        return int(value)
    if tp is float:
        try:
            value = float(stripped)
        except ValueError:
            raise _BadValue from None
        if math.isnan(value):
            raise _BadValue
        return value
    if tp is pathlib.Path:
        return pathlib.Path(text)
    if _is_union(tp):
        if stripped.lower() in _NONE and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _parse_text(arm, text)
            except _BadValue:
                continue
        raise _BadValue
    if origin is Literal:
        for option in args:
            if str(option) == stripped:
                return option
        raise _BadValue
    if origin in (tuple, list) or tp in (tuple, list):
        items = [] if not stripped else [s.strip() for s in stripped.split(",")]
        if not args:
            elem_types = [str] * len(items)
        elif origin is list or (len(args) == 2 and args[1] is Ellipsis):
            elem_types = [args[0]] * len(items)
        else:
            if len(items) != len(args):
                raise _BadValue
            elem_types = list(args)
        parsed = [_parse_text(t, s) for t, s in zip(elem_types, items, strict=True)]
        return list(parsed) if (origin or tp) is list else tuple(parsed)
    raise _Unsupported


def _split_override(item: str) -> tuple[list[str], str]:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise QuarticError(f"override {item!r} is not of the form key=value")
    return key.split("."), text


def config_keys(config_or_cls: Any) -> list[str]:
    """Every key `apply_overrides` accepts for this config, nested fields as dotted keys."""
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    keys = []
    for name, tp in _field_types(cls).items():
        if _is_dataclass_type(tp):
            keys.extend(f"{name}.{sub}" for sub in config_keys(tp))
        else:
            keys.append(name)
    return keys


def _field_type(root: type, path: list[str]) -> Any:
    """The declared type of the (possibly nested) field at `path` inside the dataclass `root`."""
    key = ".".join(path)
    cls = root
    for depth, name in enumerate(path):
        types_ = _field_types(cls)
        if name not in types_:
            raise QuarticError(
                f"unknown config key {key!r} for {root.__name__}; "
                f"valid keys: {', '.join(config_keys(root))}"
            )
        tp = types_[name]
        last = depth == len(path) - 1
        if _is_dataclass_type(tp):
            if last:
                prefix = ".".join(path)
                raise QuarticError(
                    f"config key {key!r} is a group; set its fields instead: "
                    f"{', '.join(f'{prefix}.{sub}' for sub in config_keys(tp))}"
                )
            cls = tp
        elif not last:
            raise QuarticError(
                f"unknown config key {key!r} for {root.__name__} ({name!r} has no fields); "
                f"valid keys: {', '.join(config_keys(root))}"
            )
    return tp


def apply_overrides(config: C, overrides: Sequence[str]) -> C:
    """A copy of the frozen dataclass `config` with `key=value` overrides applied, in order.

    Args:
      config: a dataclass instance (frozen or not); it is not modified.
      overrides: strings `key=value`; `key` may be dotted to reach a nested dataclass field. When a
        key is given twice the last value wins.

    Returns:
      The new config, built with `dataclasses.replace` so that `__post_init__` checks run again.

    Raises:
      QuarticError: for text not of the form `key=value`, an unknown key (the message lists the
        valid keys), a value that does not parse as the field's type (the message names the key,
        the expected type and the text given), or a config that rejects the new values.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"apply_overrides needs a dataclass instance, got {type(config)!r}")
    root = type(config)
    updates: dict[str, Any] = {}
    for item in overrides:
        path, text = _split_override(item)
        tp = _field_type(root, path)
        key = ".".join(path)
        try:
            value = _parse_text(tp, text)
        except _BadValue:
            raise QuarticError(
                f"config key {key!r} expects {_type_name(tp)}, got {text!r}"
            ) from None
        except _Unsupported:
            raise QuarticError(
                f"config key {key!r} has type {_type_name(tp)}, which cannot be set from "
                "the command line"
            ) from None
        node = updates
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    try:
        return _replace_nested(config, updates)
    except (TypeError, ValueError) as e:
        if isinstance(e, QuarticError):
            raise
        raise QuarticError(f"invalid config after overrides {list(overrides)}: {e}") from e


def _replace_nested(config: Any, updates: Mapping[str, Any]) -> Any:
    changes = {}
    for name, value in updates.items():
        if isinstance(value, dict):
            value = _replace_nested(getattr(config, name), value)
        changes[name] = value
    return dataclasses.replace(config, **changes)


# --------------------------------------------------------------------------------------------------
# JSON round trip.


def config_to_dict(config: Any) -> dict[str, Any]:
    """The config as plain JSON data: nested dicts, lists for tuples, strings for paths."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"config_to_dict needs a dataclass instance, got {type(config)!r}")

    def plain(value: Any) -> Any:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, pathlib.PurePath):
            return str(value)
        return value

    return plain(config)


def _from_json(tp: Any, value: Any, key: str) -> Any:
    """Convert JSON data `value` to the declared type `tp`; QuarticError when it does not fit."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)

    def bad() -> QuarticError:
        return QuarticError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")

    if tp is Any:
        return value
    if _is_dataclass_type(tp):
        if not isinstance(value, Mapping):
            raise bad()
        return _dataclass_from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if tp is pathlib.Path:
        if not isinstance(value, str):
            raise bad()
        return pathlib.Path(value)
    if _is_union(tp):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _from_json(arm, value, key)
            except QuarticError:
                continue
        raise bad()
    if origin is Literal:
        if value not in args:
            raise bad()
        return value
    if origin in (tuple, list) or tp in (tuple, list):
        if not isinstance(value, list | tuple):
            raise bad()
        if not args:
            items = list(value)
        elif origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [_from_json(args[0], v, key) for v in value]
        else:
            if len(value) != len(args):
                raise bad()
            items = [_from_json(t, v, key) for t, v in zip(args, value, strict=True)]
        return items if (origin or tp) is list else tuple(items)
    return value


def _dataclass_from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    types_ = _field_types(cls)
    unknown = [k for k in data if k not in types_]
    if unknown:
        raise QuarticError(
            f"unknown config key {prefix + unknown[0]!r} for {cls.__name__}; "
            f"valid keys: {', '.join(prefix + k for k in config_keys(cls))}"
        )
    kwargs = {k: _from_json(types_[k], v, prefix + k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise QuarticError(f"cannot build {cls.__name__} from the saved config: {e}") from e


def config_from_dict(cls: type[C], data: Mapping[str, Any]) -> C:
    """Rebuild a config of class `cls` from `config_to_dict` output (e.g. a `config.json`).

    Keys missing from `data` take the field's default. Raises QuarticError for an unknown key or a
    value of the wrong type.
    """
    if not _is_dataclass_type(cls):
        raise TypeError(f"config_from_dict needs a dataclass class, got {cls!r}")
    return _dataclass_from_dict(cls, data)
