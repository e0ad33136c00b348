"""OpenAI strict-mode schema rules: every valid strict schema passes; one broken node anywhere gives
OpenAI's message naming that node's path."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.protocol.errors import APIError
from inferstack.protocol.strict_schema import StrictLimits, check_strict_schema

WIDE = StrictLimits(max_properties=10_000, max_nesting=100, max_enum_values=10_000)
LEAVES = st.sampled_from([{"type": "string"}, {"type": "integer", "minimum": 0}, {"type": "boolean"},
                          {"type": ["string", "null"]}, {"type": "string", "enum": ["a", "b"]},
                          {"anyOf": [{"type": "number"}, {"type": "null"}]}])


def _object(children: st.SearchStrategy) -> st.SearchStrategy:
    return st.dictionaries(st.from_regex(r"[a-z]{1,6}", fullmatch=True), children, max_size=3).map(
        lambda props: {"type": "object", "properties": props, "required": list(props),
                       "additionalProperties": False})


NODES = st.recursive(LEAVES, lambda c: st.one_of(_object(c), c.map(lambda s: {"type": "array", "items": s})),
                     max_leaves=8)
ROOTS = _object(NODES)


def _nodes(node: dict[str, Any], ctx: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    """Every node with its OpenAI context path."""
    out = [(ctx, node)]
    for name, sub in (node.get("properties") or {}).items():
        out += _nodes(sub, (*ctx, "properties", name))
    if "items" in node:
        out += _nodes(node["items"], (*ctx, "items"))
    for i, sub in enumerate(node.get("anyOf") or []):
        out += _nodes(sub, (*ctx, "anyOf", str(i)))
    return out


def _error(schema: dict[str, Any], limits: StrictLimits = WIDE) -> str:
    with pytest.raises(APIError) as err:
        check_strict_schema(schema, "response_format 'S'", "response_format", limits)
    assert err.value.status == 400 and err.value.param == "response_format"
    return err.value.message


@settings(max_examples=60, deadline=None)
@given(ROOTS)
def test_valid_strict_schemas_pass(schema: dict[str, Any]) -> None:
    check_strict_schema(schema, "response_format 'S'", "response_format", WIDE)


@settings(max_examples=60, deadline=None)
@given(ROOTS, st.data())
def test_an_open_object_is_named_by_its_path(schema: dict[str, Any], data: st.DataObject) -> None:
    schema = json.loads(json.dumps(schema))     # hypothesis shares leaf objects between nodes
    objects = [(ctx, n) for ctx, n in _nodes(schema) if n.get("type") == "object"]
    ctx, node = data.draw(st.sampled_from(objects))
    del node["additionalProperties"]
    assert _error(schema) == (f"Invalid schema for response_format 'S': In context={ctx!r}, "
                              "'additionalProperties' is required to be supplied and to be false.")


@settings(max_examples=60, deadline=None)
@given(ROOTS, st.data())
def test_an_optional_property_is_named(schema: dict[str, Any], data: st.DataObject) -> None:
    schema = json.loads(json.dumps(schema))     # hypothesis shares leaf objects between nodes
    objects = [(ctx, n) for ctx, n in _nodes(schema) if n.get("properties")]
    if not objects:
        return
    ctx, node = data.draw(st.sampled_from(objects))
    dropped = data.draw(st.sampled_from(node["required"]))
    node["required"] = [k for k in node["required"] if k != dropped]
    assert _error(schema).endswith(f"In context={ctx!r}, 'required' is required to be supplied and to be an array "
                                   f"including every key in properties. Missing '{dropped}'.")


@settings(max_examples=60, deadline=None)
@given(ROOTS, st.data(), st.sampled_from(["minLength", "patternProperties", "oneOf", "allOf", "not", "if",
                                          "uniqueItems", "default"]))
def test_an_unsupported_keyword_is_named(schema: dict[str, Any], data: st.DataObject, keyword: str) -> None:
    schema = json.loads(json.dumps(schema))     # hypothesis shares leaf objects between nodes
    ctx, node = data.draw(st.sampled_from(_nodes(schema)))
    node[keyword] = 1
    assert _error(schema) == (f"Invalid schema for response_format 'S': In context={ctx!r}, "
                              f"'{keyword}' is not permitted.")


def test_root_must_be_an_object_and_limits_hold() -> None:
    assert _error({"type": "array", "items": {"type": "string"}}) == (
        "Invalid schema for response_format 'S': schema must be a JSON Schema of 'type: \"object\"', "
        "got 'type: \"array\"'.")
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(6):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"], "additionalProperties": False}
    assert _error(deep, StrictLimits(max_nesting=5)).endswith("6 levels of nesting exceeds limit of 5.")
    check_strict_schema(deep, "response_format 'S'", "response_format", StrictLimits(max_nesting=6))
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(101)},
            "required": [f"p{i}" for i in range(101)], "additionalProperties": False}
    assert _error(wide, StrictLimits(max_properties=100)).endswith("101 object properties exceeds limit of 100.")
    colors = {"type": "object", "properties": {"c": {"type": "string", "enum": [str(i) for i in range(501)]}},
              "required": ["c"], "additionalProperties": False}
    assert _error(colors, StrictLimits(max_enum_values=500)).endswith("501 enum values exceeds limit of 500.")
    refs = {"type": "object", "properties": {"n": {"$ref": "#/$defs/node"}}, "required": ["n"],
            "additionalProperties": False,
            "$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}}, "required": ["v"]}}}
    assert "In context=('$defs', 'node'), 'additionalProperties'" in _error(refs)
