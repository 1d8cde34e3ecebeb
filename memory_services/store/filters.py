"""Metadata filters shared by listing and search: ``{"key": value}`` (equality) or
``{"key": {"$op": operand, ...}}`` with ``$eq $ne $in $nin $gt $gte $lt $lte $exists``; keys AND.

``compile_where`` checks the filter once (bounded size, known operators, operand types) and
returns a predicate over an entry's metadata dict. Range operators compare numbers with numbers
and strings with strings; a value of another type simply does not match.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

MAX_KEYS = 16
MAX_IN = 256
MAX_KEY_CHARS = 128
MAX_STR_CHARS = 1024

Predicate = Callable[[dict[str, Any]], bool]


class FilterError(ValueError):
    """A filter that cannot be evaluated; the message starts with ``where.<key>``."""


def _is_number(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_scalar(v: Any, where: str) -> Any:
    if v is None or isinstance(v, bool):
        return v
    if _is_number(v):
        if not math.isfinite(v):
            raise FilterError(f"{where}: {v!r} is not a finite number")
        return v
    if isinstance(v, str):
        if len(v) > MAX_STR_CHARS:
            raise FilterError(f"{where}: string of {len(v)} chars exceeds {MAX_STR_CHARS}")
        return v
    raise FilterError(f"{where}: {type(v).__name__} is not a string, number, boolean or null")


def _same_kind(a: Any, b: Any) -> bool:
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b  # True is not 1, null only equals null
    return _same_kind(a, b) and a == b


_RANGE = {
    "$gt": lambda a, b: a > b,
    "$gte": lambda a, b: a >= b,
    "$lt": lambda a, b: a < b,
    "$lte": lambda a, b: a <= b,
}


def _op(key: str, op: str, operand: Any) -> Predicate:
    where = f"where.{key}.{op}"
    missing = object()
    if op in ("$eq", "$ne"):
        want = _check_scalar(operand, where)
        if op == "$eq":
            return lambda m: key in m and _equal(m[key], want)
        return lambda m: not (key in m and _equal(m[key], want))
    if op in ("$in", "$nin"):
        if not isinstance(operand, list) or len(operand) > MAX_IN:
            raise FilterError(f"{where}: must be a list of at most {MAX_IN} values")
        options = [_check_scalar(v, f"{where}[{i}]") for i, v in enumerate(operand)]
        hit = lambda m: key in m and any(_equal(m[key], o) for o in options)  # noqa: E731
        return hit if op == "$in" else (lambda m: not hit(m))
    if op in _RANGE:
        bound = _check_scalar(operand, where)
        if not (_is_number(bound) or isinstance(bound, str)):
            raise FilterError(f"{where}: needs a number or a string, got {operand!r}")
        cmp = _RANGE[op]
        return lambda m: _same_kind(v := m.get(key, missing), bound) and cmp(v, bound)
    if op == "$exists":
        if not isinstance(operand, bool):
            raise FilterError(f"{where}: must be true or false")
        return lambda m: (key in m) == operand
    raise FilterError(f"{where}: unknown operator (known: $eq $ne $in $nin $gt $gte $lt $lte $exists)")


def compile_where(where: dict[str, Any] | None) -> Predicate | None:
    """A predicate for ``where`` (None when there is nothing to filter); FilterError if it is malformed."""
    if not where:
        return None
    if not isinstance(where, dict):
        raise FilterError("where: must be an object of key: value or key: {operator: value}")
    if len(where) > MAX_KEYS:
        raise FilterError(f"where: {len(where)} keys exceed {MAX_KEYS}")
    preds: list[Predicate] = []
    for key, cond in where.items():
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise FilterError(f"where: key {str(key)[:40]!r} must be a string of 1..{MAX_KEY_CHARS} chars")
        if isinstance(cond, dict):
            if not cond or len(cond) > 8:
                raise FilterError(f"where.{key}: needs 1..8 operators")
            preds.extend(_op(key, op, operand) for op, operand in cond.items())
        else:
            preds.append(_op(key, "$eq", cond))
    return lambda m: all(p(m) for p in preds)
