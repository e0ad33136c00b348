"""OpenAI's strict-mode rules for JSON schemas (``response_format`` json_schema and function
``parameters`` with ``strict: true``), with OpenAI's 400 messages.

Strict mode guarantees that every output validates, so OpenAI accepts only a subset of JSON Schema:
the root is an object; every object sets ``additionalProperties: false`` and lists every property in
``required`` (an optional field is a ``["T", "null"]`` type); only the keywords below are allowed;
and the schema has size limits (configurable here: ``StrictLimits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from inferstack.protocol.errors import APIError

ALLOWED_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const",
    "description", "title", "$ref", "$defs", "definitions", "$schema", "$id",
    "pattern", "format",                                                      # strings
    "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",  # numbers
    "minItems", "maxItems",                                                   # arrays
})
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})


@dataclass(frozen=True)
class StrictLimits:
    max_properties: int = 5000      # object properties in the whole schema
    max_nesting: int = 10           # levels of object/array nesting
    max_enum_values: int = 1000     # enum values in the whole schema


@dataclass
class _Walk:
    owner: str                      # "response_format 'name'" or "function 'name'"
    param: str
    limits: StrictLimits
    properties: int = 0
    enum_values: int = 0

    def fail(self, context: tuple[str, ...], message: str) -> APIError:
        return APIError(400, f"Invalid schema for {self.owner}: In context={context!r}, {message}",
                        param=self.param)

    def limit(self, message: str) -> APIError:
        return APIError(400, f"Invalid schema for {self.owner}: {message}", param=self.param)


def check_strict_schema(schema: Any, owner: str, param: str, limits: StrictLimits = StrictLimits()) -> None:
    """Raise the 400 OpenAI gives for ``schema`` in strict mode; ``owner`` names the schema's holder
    (``response_format 'Person'``, ``function 'get_weather'``)."""
    walk = _Walk(owner, param, limits)
    if not isinstance(schema, dict):
        raise walk.limit("schema must be a JSON object.")
    kind = schema.get("type")
    if kind != "object":
        got = f'type: "{kind}"' if isinstance(kind, str) else "no type" if kind is None else f"type: {kind}"
        raise walk.limit(f"schema must be a JSON Schema of 'type: \"object\"', got '{got}'.")
    _node(walk, schema, (), 1)
    for key in ("$defs", "definitions"):
        for name, sub in (schema.get(key) or {}).items():
            _node(walk, sub, (key, name), 1)


def _node(walk: _Walk, node: Any, context: tuple[str, ...], depth: int) -> None:
    if not isinstance(node, dict):
        raise walk.fail(context, "schema must be a JSON object.")
    for key in node:
        if key not in ALLOWED_KEYWORDS:
            raise walk.fail(context, f"'{key}' is not permitted.")
    if "enum" in node:
        walk.enum_values += len(node["enum"]) if isinstance(node["enum"], list) else 0
        if walk.enum_values > walk.limits.max_enum_values:
            raise walk.limit(f"{walk.enum_values} enum values exceeds limit of {walk.limits.max_enum_values}.")
    if "anyOf" in node:
        branches = node["anyOf"]
        if not isinstance(branches, list) or not branches:
            raise walk.fail(context, "'anyOf' must be a non-empty array.")
        for i, branch in enumerate(branches):
            _node(walk, branch, (*context, "anyOf", str(i)), depth)
        return
    if "$ref" in node or "enum" in node or "const" in node:
        return
    kinds = _types(walk, node, context)
    if kinds & {"object", "array"} and depth > walk.limits.max_nesting:
        raise walk.limit(f"{depth} levels of nesting exceeds limit of {walk.limits.max_nesting}.")
    if "object" in kinds:
        _object(walk, node, context, depth)
    if "array" in kinds:
        if "items" not in node:
            raise walk.fail(context, "'items' is required to be supplied for an array.")
        _node(walk, node["items"], (*context, "items"), depth + 1)


def _types(walk: _Walk, node: dict[str, Any], context: tuple[str, ...]) -> set[str]:
    if "type" not in node:
        raise walk.fail(context, "schema must have a 'type' key.")
    kind = node["type"]
    kinds = {kind} if isinstance(kind, str) else set(kind) if isinstance(kind, list) else {repr(kind)}
    bad = sorted(k for k in kinds if k not in _TYPES)
    if bad or not kinds:
        raise walk.fail(context, f"'type' has an invalid value {bad[0] if bad else '[]'!r}.")
    return kinds


def _object(walk: _Walk, node: dict[str, Any], context: tuple[str, ...], depth: int) -> None:
    if node.get("additionalProperties") is not False:
        raise walk.fail(context, "'additionalProperties' is required to be supplied and to be false.")
    properties = node.get("properties") or {}
    if not isinstance(properties, dict):
        raise walk.fail(context, "'properties' must be an object.")
    required = node.get("required")
    missing = [k for k in properties if not isinstance(required, list) or k not in required]
    if missing:
        raise walk.fail(context, "'required' is required to be supplied and to be an array including every "
                                 f"key in properties. Missing '{missing[0]}'.")
    extra = [k for k in required or [] if k not in properties]
    if extra:
        raise walk.fail(context, f"'required' names '{extra[0]}', which is not in properties.")
    walk.properties += len(properties)
    if walk.properties > walk.limits.max_properties:
        raise walk.limit(f"{walk.properties} object properties exceeds limit of {walk.limits.max_properties}.")
    for name, sub in properties.items():
        _node(walk, sub, (*context, "properties", name), depth + 1)
