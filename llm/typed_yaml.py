"""Strict YAML -> frozen dataclass loading, shared by the run config and the sweep spec.

``read_yaml`` reads a mapping (refusing alias bombs before they are expanded),
``apply_overrides`` applies ``a.b.c=value`` strings, and ``from_dict`` builds a
frozen dataclass from the nested mapping: unknown keys, wrong types and
non-finite numbers raise ``ConfigError`` with a one-line message naming the key
(and a did-you-mean), so a command line can exit with status 2 before anything
touches the disk. Ranges and cross-field rules belong to each config's own
``validate`` (``llm.config``, ``sweeps.spec``).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from rundir import did_you_mean

# Nodes that aliases may add when expanded: far above any real config or spec
# (hundreds of nodes), far below what a billion-laughs file asks for (9**9).
MAX_ALIAS_NODES = 100_000


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


# --------------------------------------------------------------------------- YAML


def _expanded_size(node: yaml.Node, memo: dict[int, int], active: set[int]) -> int:
    """Nodes in the tree ``node`` stands for once every alias is expanded (memoised by node)."""
    key = id(node)
    if key in memo:
        return memo[key]
    if key in active:
        raise ConfigError("a YAML alias refers to a node that contains it (recursive alias)")
    active.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(child, memo, active) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, memo, active) + _expanded_size(v, memo, active) for k, v in node.value)
    active.discard(key)
    memo[key] = size
    return size


def load_yaml_text(text: str, where: str) -> Any:
    """Parse YAML ``text`` (safe tags only); ``where`` names the source in errors.

    The node graph is composed first, with aliases still shared, and refused when
    expanding them would add more than ``MAX_ALIAS_NODES`` nodes: a billion-laughs
    document is rejected in milliseconds instead of exhausting memory later.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        memo: dict[int, int] = {}
        try:
            total = _expanded_size(node, memo, set())
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        if total - len(memo) > MAX_ALIAS_NODES:
            raise ConfigError(
                f"{where}: YAML aliases would expand this document past {MAX_ALIAS_NODES:,} nodes "
                "(a 'billion laughs' file?); write the values out instead of nesting aliases"
            )
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested too deeply") from None
    finally:
        loader.dispose()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read ({err.strerror or err})") from None
    try:
        data = load_yaml_text(text, str(path))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({err.__class__.__name__})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of config sections")
    return data


# --------------------------------------------------------------------------- nested mappings


def deep_copy(data: Any) -> Any:
    """Copy of nested mappings and sequences (as dicts and lists); leaves shared."""
    if isinstance(data, Mapping):
        return {k: deep_copy(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [deep_copy(v) for v in data]
    return data


def flatten(data: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 1}}`` -> ``{"optim.lr": 1}`` (``sep="/"`` gives TensorBoard tags)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, sep, f"{name}{sep}"))
        else:
            flat[name] = value
    return flat


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key=value (e.g. model.d_model=256)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{item}' has an empty key")
    try:
        value = load_yaml_text(raw, f"override {key}") if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings to a nested dict (values parsed as YAML scalars)."""
    data = deep_copy(data)
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


# --------------------------------------------------------------------------- dataclasses


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats, NaN and inf are not."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        concrete = [o for o in options if o is not type(None)]
        if len(concrete) == 1:
            # Optional[X]: X's own error names the bad key (e.g. a typo inside model.moe).
            return _coerce(value, concrete[0], where)
        for option in concrete:
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        names = " or ".join(_type_name(o) for o in options)
        raise ConfigError(f"{where}: expected {names}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if value is None:
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} keys, got null")
        return from_dict(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (inner, *_) = typing.get_args(tp) or (Any,)
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        key_tp, value_tp = typing.get_args(tp) or (Any, Any)
        return {
            _coerce(k, key_tp, where): _coerce(v, value_tp, f"{where}.{k}") for k, v in value.items()
        }
    if tp is Any:
        return value
    if isinstance(value, str) and tp in (int, float):
        value = _number_from_string(value)  # YAML 1.1 reads 1e-3 (no dot) as a string
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            # NaN passes every `x > 0` check downstream; no field means "unbounded" by inf.
            raise ConfigError(f"{where}: expected a finite number, got {value}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
            return int(value)  # YAML reads 1e6 as a float
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {tp!r}")


def _number_from_string(text: str) -> Any:
    try:
        number = float(text)
    except ValueError:
        return text
    return int(number) if number.is_integer() and "." not in text and "e" not in text.lower() else number


def from_dict(cls: type, data: Mapping[str, Any] | None, where: str = "") -> Any:
    """Build the frozen dataclass ``cls`` from a nested mapping; unknown keys are errors."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or cls.__name__}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        name = f"{where}.{key}" if where else str(key)
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(
                f"unknown config key '{name}'{did_you_mean(str(key), list(fields))}; "
                f"allowed keys here: {allowed}"
            )
        kwargs[key] = _coerce(value, hints[key], name)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain-dict form of a config dataclass (YAML/JSON ready)."""
    return dataclasses.asdict(cfg)
