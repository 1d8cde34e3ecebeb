"""TOML tables → typed, validated dataclasses, with errors that name file, key and fix.

Each package owns its ``Config`` dataclass (``@dataclass(kw_only=True)``, one docstring per
field, checks in ``__post_init__``). This module only maps TOML onto them; it knows no package.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import tomllib
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Bad job-spec input. ``str()`` is one line: where, what, and how to fix it."""

    def __init__(self, source: str, key: str, problem: str, fix: str = ""):
        self.source, self.key, self.problem, self.fix = source, key, problem, fix
        msg = f"{source}: {key}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "<file>", "no such file", "pass the path of a .toml job file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(str(path), "<file>", f"cannot read: {e}", "check permissions and encoding") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(str(path), "<syntax>", str(e), "fix the TOML syntax at that line") from None


def field_docs(cls: type) -> dict[str, str]:
    """Docstrings written under each dataclass field (torchtitan style)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, nxt in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str, source: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(tp):
            return None  # only JSON (spec.json) can say null; TOML has no null
        errors = []
        for option in typing.get_args(tp):
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where, source)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(source, where, f"{value!r} is not a {_type_name(tp)}", f"give a {_type_name(tp)}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(source, where, f"expected a table, got {value!r}", f"write [{where}] as a table")
        return build_dataclass(tp, value, source, where)
    if origin in (list, tuple):
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        if not isinstance(value, list):
            raise ConfigError(source, where, f"expected a list, got {value!r}", "write it as [a, b, ...]")
        return [_coerce(v, item_tp, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(source, where, f"expected a table, got {value!r}", "write it as {k = v}")
        _, val_tp = typing.get_args(tp) or (str, Any)
        return {k: _coerce(v, val_tp, f"{where}.{k}", source) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(source, where, f"expected an integer, got {value!r}", "give a whole number")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(
            source, where, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}", f"give a {_type_name(tp)}"
        )
    return value


def build_dataclass(cls: type, table: dict[str, Any], source: str, prefix: str) -> Any:
    """Build ``cls`` from a TOML table: unknown keys, wrong types and failed checks are ConfigErrors."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in table.items():
        where = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            close = [k for k in fields if k.startswith(key[:3])]
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(sorted(fields))}"
            raise ConfigError(source, where, "unknown key", hint)
        kwargs[key] = _coerce(value, hints[key], where, source)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        key, problem = _split_check_message(str(e), fields)
        where = f"{prefix}.{key}" if key and prefix else (key or prefix)
        raise ConfigError(source, where, problem, f"change {where} in {source}") from None


def _split_check_message(message: str, fields: dict) -> tuple[str, str]:
    """``__post_init__`` checks start with ``"<field>=..."``; pull the field name out."""
    head = message.split("=", 1)[0].strip()
    # cross-section checks (JobSpec) name a dotted key such as "pipeline.stages"
    return (head, message) if head.split(".", 1)[0] in fields else ("", message)


def explain(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key, type, default, doc) for every field, nested tables flattened."""
    rows = []
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(explain(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = repr(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _type_name(tp), default, docs.get(f.name, "")))
    return rows
