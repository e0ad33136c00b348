"""JSON schemas for structured-output tests and benchmarks: a seeded generator of small bounded
schemas (every output of a constrained model must finish within a short max_tokens) and a few
real-world ones, plus the pathological deeply nested ``oneOf`` schema."""

from __future__ import annotations

import random
from typing import Any

# strict-mode compatible (OpenAI's rules: no maxLength, every object closed and fully required)
STRICT_COMPATIBLE = frozenset({"weather_report", "sentiment"})
REAL_WORLD: dict[str, dict[str, Any]] = {
    "weather_report": {  # what an agent returns after a weather tool call
        "type": "object", "additionalProperties": False, "required": ["city", "unit", "temperature", "rain"],
        "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Tokyo", "Lima"]},
                       "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                       "temperature": {"type": "integer", "minimum": -40, "maximum": 50},
                       "rain": {"type": "boolean"}}},
    "calendar_event": {
        "type": "object", "required": ["title", "day", "attendees"], "additionalProperties": False,
        "properties": {"title": {"type": "string", "maxLength": 12},
                       "day": {"type": "string", "pattern": "^2025-(0[1-9]|1[0-2])-[0-2][0-9]$"},
                       "attendees": {"type": "array", "items": {"type": "string", "maxLength": 8},
                                     "minItems": 1, "maxItems": 2}}},
    "sentiment": {
        "type": "object", "additionalProperties": False, "required": ["label", "score"],
        "properties": {"label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
                       "score": {"type": "integer", "minimum": 0, "maximum": 10}}},
    "address": {
        "type": "object", "required": ["street", "zip", "country"], "additionalProperties": False,
        "properties": {"street": {"type": "string", "maxLength": 16},
                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "country": {"anyOf": [{"type": "string", "enum": ["FR", "DE", "US"]}, {"type": "null"}]}}},
}


def _leaf(rng: random.Random) -> dict[str, Any]:
    kind = rng.choice(["int", "bool", "enum", "string", "array"])
    if kind == "int":
        lo = rng.randint(-100, 100)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 900)}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "enum":
        return {"type": "string", "enum": rng.sample(["red", "green", "blue", "cat", "dog", "yes", "no"], 3)}
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 10)}
    return {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": rng.randint(1, 3)}


def random_schema(rng: random.Random, depth: int = 0) -> dict[str, Any]:
    """An object of 1-3 bounded properties; nested objects up to two levels."""
    names = rng.sample(["id", "name", "color", "count", "ok", "tags", "kind", "size", "meta"], rng.randint(1, 3))
    props = {n: (random_schema(rng, depth + 1) if depth < 1 and rng.random() < 0.25 else _leaf(rng)) for n in names}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def deep_one_of(depth: int) -> dict[str, Any]:
    """Each level: an object wrapping the level below, or an array of it (vllm #54003's shape)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"oneOf": [{"type": "object", "properties": {"a": schema}, "required": ["a"]},
                            {"type": "array", "items": schema}]}
    return schema


def deep_ref_one_of(depth: int) -> dict[str, Any]:
    """deep_one_of's shape through ``$defs``: linear in size, ``depth`` levels of recursion for the
    compiler (deep enough, ~700 levels, to overflow a default thread stack inside llguidance)."""
    defs: dict[str, Any] = {"l0": {"type": "string"}}
    for i in range(1, depth + 1):
        inner = {"$ref": f"#/$defs/l{i - 1}"}
        defs[f"l{i}"] = {"oneOf": [{"type": "object", "properties": {"a": inner}, "required": ["a"]},
                                   {"type": "array", "items": inner}]}
    return {"$defs": defs, "$ref": f"#/$defs/l{depth}"}


def slow_one_of(depth: int, width: int) -> dict[str, Any]:
    """Nested ``oneOf`` whose every level is an object of ``width`` optional properties (or an array
    of it): within llguidance's size limits, but its compile time grows with width² (any order of
    optional properties), so it outlasts a short grammar deadline."""
    defs: dict[str, Any] = {"l0": {"type": "integer"}}
    for i in range(1, depth + 1):
        props = {f"p{j}": {"$ref": f"#/$defs/l{i - 1}"} for j in range(width)}
        level = {"type": "object", "properties": props, "additionalProperties": False}
        defs[f"l{i}"] = {"oneOf": [level, {"type": "array", "items": level}]}
    return {"$defs": defs, "$ref": f"#/$defs/l{depth}"}
