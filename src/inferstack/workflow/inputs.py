"""Check and convert a run's inputs against the start node's variables (Dify's input form rules)."""

from __future__ import annotations

from typing import Any

from inferstack.workflow.dsl import Node


class InputError(ValueError):
    pass


def coerce_inputs(start: Node, given: dict[str, Any]) -> dict[str, Any]:
    """Inputs typed per the start node: required ones present, numbers parsed, selects in their options."""
    declared = {v["variable"]: v for v in start.data.get("variables") or []}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise InputError(f"unknown input(s) {unknown}; the start node declares {sorted(declared)}")
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        value = given.get(name, spec.get("default"))
        if value is None or value == "":
            if spec.get("required"):
                raise InputError(f"input {name!r} is required (--input {name}=...)")
            out[name] = None
            continue
        out[name] = _convert(name, spec, value)
    return out


def _convert(name: str, spec: dict[str, Any], value: Any) -> Any:
    kind = spec.get("type", "text-input")
    if kind == "number":
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise InputError(f"input {name!r} must be a number, got {value!r}") from None
        return int(number) if number.is_integer() else number
    if kind == "select" and value not in (spec.get("options") or []):
        raise InputError(f"input {name!r} must be one of {spec.get('options')}, got {value!r}")
    if kind in ("text-input", "paragraph", "select"):
        value = str(value)
        limit = spec.get("max_length")
        if limit and len(value) > int(limit):
            raise InputError(f"input {name!r} is longer than its max_length {limit}")
    return value
