"""If-else conditions with Dify's comparison operators."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from inferstack.workflow.context import RunContext


def _num(value: Any) -> float:
    return float(value)


def _empty(v: Any) -> bool:
    return v is None or v == "" or v == [] or v == {}


OPERATORS: dict[str, Callable[[Any, Any], bool]] = {
    "contains": lambda v, x: v is not None and x in v,
    "not contains": lambda v, x: v is None or x not in v,
    "start with": lambda v, x: isinstance(v, str) and v.startswith(x),
    "end with": lambda v, x: isinstance(v, str) and v.endswith(x),
    "is": lambda v, x: str(v) == str(x),
    "is not": lambda v, x: str(v) != str(x),
    "empty": lambda v, x: _empty(v),
    "not empty": lambda v, x: not _empty(v),
    "null": lambda v, x: v is None,
    "not null": lambda v, x: v is not None,
    "exists": lambda v, x: v is not None,
    "not exists": lambda v, x: v is None,
    "in": lambda v, x: v in (x if isinstance(x, list) else str(x).split(",")),
    "not in": lambda v, x: v not in (x if isinstance(x, list) else str(x).split(",")),
    "all of": lambda v, x: isinstance(v, list) and all(i in v for i in (x or [])),
    "=": lambda v, x: _num(v) == _num(x),
    "≠": lambda v, x: _num(v) != _num(x),
    ">": lambda v, x: _num(v) > _num(x),
    "<": lambda v, x: _num(v) < _num(x),
    "≥": lambda v, x: _num(v) >= _num(x),
    "≤": lambda v, x: _num(v) <= _num(x),
}


class ConditionError(ValueError):
    pass


def _check(cond: dict[str, Any], ctx: RunContext) -> bool:
    op = cond.get("comparison_operator")
    if op not in OPERATORS:
        raise ConditionError(f"unknown comparison operator {op!r}")
    value = ctx.get(cond.get("variable_selector") or [])
    expected = cond.get("value")
    if isinstance(expected, str):
        expected = ctx.render(expected)
    try:
        return OPERATORS[op](value, expected)
    except (TypeError, ValueError) as exc:
        raise ConditionError(f"{op!r} cannot compare {value!r} with {expected!r}: {exc}") from None


def evaluate_cases(data: dict[str, Any], ctx: RunContext) -> str | None:
    """The id of the first case that holds (Dify's `cases`, or the legacy single `conditions` → "true")."""
    cases = data.get("cases")
    if cases is None:
        cases = [{"case_id": "true", "logical_operator": data.get("logical_operator", "and"),
                  "conditions": data.get("conditions") or []}]
    for case in cases:
        results = [_check(c, ctx) for c in case.get("conditions") or []]
        holds = any(results) if case.get("logical_operator") == "or" else all(results)
        if results and holds:
            return str(case.get("case_id"))
    return None
