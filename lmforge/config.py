"""Dataclass configs, YAML recipes and `key=value` overrides.

A recipe is a YAML mapping whose keys are the fields of a config dataclass (nested dataclasses
are nested mappings, or dotted keys on the command line: `model.n_layers=4`). Unknown keys are an
error that lists the valid ones, so a typo never silently does nothing.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import UserError
from .io import write_text_atomic

ConfigT = TypeVar("ConfigT")

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def resolve_recipe(name_or_path: str) -> Path:
    """A recipe is a YAML path, or the name of a file in the repository's `configs/` folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for candidate in (REPO_CONFIG_DIR / name_or_path, REPO_CONFIG_DIR / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in REPO_CONFIG_DIR.glob("*.yaml")) if REPO_CONFIG_DIR.is_dir() else []
    raise UserError(
        f"config '{name_or_path}' is neither a file nor a recipe name; known recipes: {', '.join(known) or 'none'}"
    )


def _read_utf8(path: Path) -> str:
    """The text of a config file, which must be UTF-8 (a UTF-8 byte-order mark is allowed)."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"config '{path}' cannot be read ({error.strerror or error}); check the path") from None
    # Windows editors (and PowerShell's `>`) save UTF-16: name it rather than report a bad byte.
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise UserError(f"config '{path}' is UTF-16 (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if b"\x00" in data:   # UTF-16 without a byte-order mark: a NUL byte next to every ASCII letter
        raise UserError(f"config '{path}' is not UTF-8 text (it holds NUL bytes, as UTF-16 files do); "
                        "save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"config '{path}' is not UTF-8 (byte {error.start} cannot be decoded); "
                        "save it as UTF-8") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    text = _read_utf8(Path(path))
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        raise UserError(f"config '{path}' is not valid YAML ({error}); fix the file") from None
    except RecursionError:
        raise UserError(f"config '{path}' nests too deeply to be a config; fix the file") from None
    if not isinstance(data, dict):
        raise UserError(f"config '{path}' must be a YAML mapping of key: value pairs")
    return data


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's declared type."""
    inner, optional = _strip_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null", "")):
        if optional:
            return None
        raise UserError(f"config key '{key}' cannot be empty; give a value of type {getattr(inner, '__name__', inner)}")
    if isinstance(value, str) and inner is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            pass
    origin = typing.get_origin(inner)
    try:
        if inner is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                return value.lower() in ("true", "yes", "1", "on")
            if isinstance(value, int) and value in (0, 1):
                return bool(value)
            raise ValueError
        if inner is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if inner is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if inner is str:
            return str(value)
        if origin in (list, tuple):
            (item_type, *_) = typing.get_args(inner) or (Any,)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v]
            items = [coerce(v, item_type, key) if item_type is not Any else v for v in value]
            return items if origin is list else tuple(items)
        if origin is dict or inner is dict:
            if not isinstance(value, dict):
                raise ValueError
            return dict(value)
        if typing.get_origin(inner) is typing.Literal:
            choices = typing.get_args(inner)
            if value not in choices:
                raise UserError(f"config key '{key}' must be one of {', '.join(map(str, choices))}, not '{value}'")
            return value
    except (ValueError, TypeError):
        raise UserError(
            f"config key '{key}' expects {getattr(inner, '__name__', str(inner))}, got '{value}'; fix the value"
        ) from None
    return value


def valid_keys(cls: type, prefix: str = "") -> list[str]:
    keys = []
    for name, tp in _field_types(cls).items():
        inner, _ = _strip_optional(tp)
        if dataclasses.is_dataclass(inner):
            keys.extend(valid_keys(inner, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _unknown_key_error(cls: type, key: str, root: type) -> UserError:
    keys = valid_keys(root)
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown config key '{key}'{hint}; valid keys are: {', '.join(keys)}")


def _apply(instance: Any, mapping: dict[str, Any], prefix: str, root: type) -> Any:
    types_by_name = _field_types(type(instance))
    updates = {}
    for key, value in mapping.items():
        full_key = f"{prefix}{key}"
        if key not in types_by_name:
            raise _unknown_key_error(type(instance), full_key, root)
        inner, _ = _strip_optional(types_by_name[key])
        if dataclasses.is_dataclass(inner):
            if not isinstance(value, dict):
                raise UserError(f"config key '{full_key}' is a section; give it a mapping of its keys")
            current = getattr(instance, key) or inner()
            updates[key] = _apply(current, value, f"{full_key}.", root)
        else:
            updates[key] = coerce(value, types_by_name[key], full_key)
    return dataclasses.replace(instance, **updates)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """Turn ['a.b=1', 'c=x'] into {'a': {'b': '1'}, 'c': 'x'} (values are coerced later)."""
    nested: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' must look like key=value (for example lr=3e-4)")
        key, value = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for index, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):   # ["a=1", "a.b=2"]: a is a value and a section
                raise UserError(f"override '{item}' sets a key inside '{'.'.join(parts[:index + 1])}', "
                                "which another override gives a value; give one or the other")
        node[parts[-1]] = value
    return nested


def build_config(cls: type[ConfigT], recipe: str | Path | None = None, overrides: list[str] | None = None,
                 base: ConfigT | None = None) -> ConfigT:
    """Defaults <- recipe YAML <- command-line overrides, validated against the dataclass."""
    config = base if base is not None else cls()
    if recipe is not None:
        config = _apply(config, load_yaml(resolve_recipe(str(recipe))), "", cls)
    if overrides:
        config = _apply(config, parse_overrides(overrides), "", cls)
    if hasattr(config, "validate"):
        config.validate()
    return config


def config_from_dict(cls: type[ConfigT], mapping: dict[str, Any]) -> ConfigT:
    return _apply(cls(), mapping, "", cls)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: str | Path) -> None:
    """Save the resolved config as YAML (atomically), so every run records exactly what it ran."""
    write_text_atomic(path, yaml.safe_dump(to_dict(config), sort_keys=False))
