"""Configs as JSON and ``key=value`` overrides, strictly: unknown keys and wrong types
are errors, not warnings."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np

from twostage.config.sections import ExperimentConfig
from twostage.errors import ConfigError

__all__ = [
    "apply_overrides",
    "apply_settings",
    "from_dict",
    "load_config",
    "save_config",
    "to_dict",
]

T = TypeVar("T")


def to_dict(config: Any) -> dict[str, Any]:
    """A JSON-safe dict of a config dataclass (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, dict):
            raise ConfigError(f"`{where}` should be a mapping. Received: {value!r}.")
        return from_dict(hint, value, prefix=where)  # type: ignore[arg-type]
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(
                f"`{where}` should be one of {list(args)}. Received: {value!r}."
            )
        return value
    if origin is tuple:
        if isinstance(value, str) and value.strip().startswith("["):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ConfigError(
                    f"`{where}` should be a list, e.g. `256,128` or `[256, 128]`. "
                    f"Received: {value!r} ({e.msg})."
                ) from e
        elif isinstance(value, str):
            text = value
            # "" is the empty list; items are stripped, as the CLI's lists are.
            value = [v.strip() for v in text.split(",")] if text.strip() else []
            if not all(value):  # "a,,b" or "a,b,": a slip
                raise ConfigError(
                    f"`{where}` should be a comma-separated list without empty "
                    f"items. Received: {text!r}."
                )
        if not isinstance(value, list | tuple):
            raise ConfigError(f"`{where}` should be a list. Received: {value!r}.")
        return tuple(_coerce(v, args[0], f"{where}[]") for v in value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    elif hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise ConfigError(f"`{where}` has an unsupported type {hint!r}.")
    raise ConfigError(
        f"`{where}` should be of type {getattr(hint, '__name__', hint)}. "
        f"Received: {value!r}."
    )


def from_dict(cls: type[T], values: dict[str, Any], *, prefix: str = "") -> T:
    """Build a config dataclass, rejecting unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(names))
    if unknown:
        where = f" in `{prefix}`" if prefix else ""
        raise ConfigError(
            f"unknown config key(s) {unknown}{where}. Known keys: {names}."
        )
    kwargs = {
        k: _coerce(_pairs(k, v), hints[k], f"{prefix}.{k}" if prefix else k)
        for k, v in values.items()
    }
    return cls(**kwargs)


#: Keys that hold ``name=value`` entries, which a JSON config or Python settings
#: may give as an object: ``{"view": 1, "purchase": 5}``.
_PAIR_KEYS = frozenset({"weight_values", "field_kinds"})


def _pairs(key: str, value: Any) -> Any:
    """``{"view": 1}`` as ``["view=1"]`` for the keys of ``_PAIR_KEYS``."""
    if key in _PAIR_KEYS and isinstance(value, Mapping):
        return [f"{name}={entry}" for name, entry in value.items()]
    return value


def did_you_mean(name: str, choices: list[str], *, prefix: str = "") -> str:
    """`` Did you mean 'x'?`` for the closest of ``choices`` (written after
    ``prefix.`` when given), or ``""``."""
    import difflib

    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.6)
    if not close:
        return ""
    return f" Did you mean {(prefix + '.' if prefix else '') + close[0]!r}?"


def apply_overrides(config: T, overrides: list[str] | tuple[str, ...]) -> T:
    """Apply ``section.key=value`` overrides (e.g. ``train.epochs=5``) to a config."""
    values = to_dict(config)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(
                f"an override should look like `train.epochs=5`. Received: {item!r}."
            )
        _assign(values, key, raw, f"override {item!r}")
    return from_dict(type(config), values)


def apply_settings(config: T, settings: Mapping[str, Any]) -> T:
    """Apply ``{"section.key": value}`` settings with Python values, checked as a
    JSON config's are: ``None`` unsets an optional key (where an override's text
    would be the string ``"None"``), ``True`` is no number, lists stay lists.
    numpy scalars count as their Python values."""
    values = to_dict(config)
    for key, value in settings.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"a setting's key should be `section.key` text, e.g. "
                f"`train.epochs`. Received: {key!r}."
            )
        _assign(values, key, _plain(value), f"setting {key!r}")
    return from_dict(type(config), values)


def _plain(value: Any) -> Any:
    """numpy scalars as Python values, in lists and arrays too."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _assign(values: dict[str, Any], key: str, value: Any, what: str) -> None:
    """Set ``section.key`` in a config's dict, naming an unknown section or key
    (with the closest known one) and ``what`` was given."""
    node = values
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(
            f"a {what.split()[0]}'s key should be `section.key`, without empty parts "
            f"(e.g. `train.epochs=5`). Received: {what.partition(' ')[2]}."
        )
    for part in parts[:-1]:
        if not isinstance(node.get(part), dict):
            sections = sorted(k for k, v in node.items() if isinstance(v, dict))
            raise ConfigError(
                f"unknown config section {part!r} in {what}."
                f"{did_you_mean(part, sections)} Known sections: {sections}."
            )
        node = node[part]
    if parts[-1] not in node or isinstance(node[parts[-1]], dict):
        keys = sorted(k for k, v in node.items() if not isinstance(v, dict))
        hint = did_you_mean(parts[-1], keys, prefix=".".join(parts[:-1]))
        if not hint and len(parts) == 1:  # `epochs=5` for `train.epochs=5`
            full = sorted(
                f"{name}.{k}"
                for name, sub in node.items()
                if isinstance(sub, dict)
                for k in sub
                if k == parts[-1]
            )
            hint = f" Did you mean {' or '.join(map(repr, full))}?" if full else ""
        raise ConfigError(
            f"unknown config key {key!r} in {what}.{hint} "
            f"Known keys here: {sorted(node)}."
        )
    node[parts[-1]] = value


def save_config(config: Any, path: str | Path) -> None:
    """Write a config as indented JSON."""
    Path(path).write_text(json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")


def load_config(path: str | Path, cls: type[T] = ExperimentConfig) -> T:  # type: ignore[assignment]
    """Read a config saved by :func:`save_config` (or written by hand), strictly:
    one JSON object (UTF-8, with or without a BOM), no key given twice."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # editors may add a BOM
        values = json.loads(text, object_pairs_hook=_unique_keys)
    except ConfigError as e:  # a repeated key
        raise ConfigError(f"config file {str(path)!r}: {e}") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"cannot read config file {str(path)!r} as JSON (UTF-8): {e}"
        ) from e
    if not isinstance(values, dict):
        raise ConfigError(
            f"config file {str(path)!r} should hold one JSON object of sections, "
            f'e.g. {{"train": {{"epochs": 5}}}}. Received a {type(values).__name__}.'
        )
    return from_dict(cls, values)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are distinct (the json module keeps the last of
    a repeated key without a word)."""
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(
                f"the key {key!r} is given twice in one object; keep one of them"
            )
        seen[key] = value
    return seen
