"""The output constraint an OpenAI request asks for: ``response_format`` (text, json_object,
json_schema with strict true/false) or vLLM's ``guided_*`` / ``structured_outputs`` extras."""

from __future__ import annotations

import json
import re
from typing import Any

from inferstack.engine.structured.spec import GrammarKind, GrammarSpec
from inferstack.protocol.errors import bad_request
from inferstack.protocol.requests import ChatCompletionRequest, CompletionRequest
from inferstack.protocol.strict_schema import StrictLimits, check_strict_schema

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_EXTRA_KINDS = {"json": GrammarKind.JSON, "regex": GrammarKind.REGEX, "choice": GrammarKind.CHOICE,
                "grammar": GrammarKind.GRAMMAR, "json_object": GrammarKind.JSON_OBJECT}


def requested_grammar(req: ChatCompletionRequest | CompletionRequest,
                      limits: StrictLimits) -> tuple[GrammarSpec | None, str]:
    """(the constraint or None, the request field it came from). At most one may be given."""
    found: list[tuple[GrammarSpec, str]] = []
    if req.response_format is not None:
        spec = response_format_grammar(req.response_format, limits)
        if spec is not None:
            found.append((spec, "response_format"))
    if req.guided_json is not None:
        found.append((GrammarSpec.json_schema(req.guided_json), "guided_json"))
    if req.guided_regex is not None:
        found.append((GrammarSpec(GrammarKind.REGEX, req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        found.append((GrammarSpec.choice(req.guided_choice), "guided_choice"))
    if req.guided_grammar is not None:
        found.append((GrammarSpec(GrammarKind.GRAMMAR, req.guided_grammar), "guided_grammar"))
    if req.structured_outputs is not None:
        found.extend(_structured_outputs(req.structured_outputs))
    if len(found) > 1:
        raise bad_request("Only one kind of structured output may be given; got "
                          f"{', '.join(p for _, p in found)}.", found[1][1])
    return found[0] if found else (None, "")


def response_format_grammar(rf: dict[str, Any], limits: StrictLimits) -> GrammarSpec | None:
    kind = rf.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec(GrammarKind.JSON_OBJECT)
    if kind != "json_schema":
        raise bad_request(f"Invalid value: '{kind}'. Supported values are: 'json_object', 'json_schema', and "
                          "'text'.", "response_format.type", "invalid_value")
    js = rf.get("json_schema")
    if not isinstance(js, dict):
        raise bad_request("Missing required parameter: 'response_format.json_schema'.",
                          "response_format.json_schema", "missing_required_parameter")
    name = js.get("name")
    if not isinstance(name, str):
        raise bad_request("Missing required parameter: 'response_format.json_schema.name'.",
                          "response_format.json_schema.name", "missing_required_parameter")
    if not _NAME.match(name):
        raise bad_request("Invalid 'response_format.json_schema.name': string does not match pattern. Expected a "
                          "string that matches the pattern '^[a-zA-Z0-9_-]+$'.", "response_format.json_schema.name",
                          "invalid_value")
    schema = js.get("schema", {"type": "object"})
    if not isinstance(schema, dict):
        raise bad_request("Invalid type for 'response_format.json_schema.schema': expected an object.",
                          "response_format.json_schema.schema", "invalid_type")
    if js.get("strict") is True:
        check_strict_schema(schema, f"response_format '{name}'", "response_format", limits)
    return GrammarSpec.json_schema(schema)


def _structured_outputs(so: dict[str, Any]) -> list[tuple[GrammarSpec, str]]:
    out: list[tuple[GrammarSpec, str]] = []
    for key, value in so.items():
        kind = _EXTRA_KINDS.get(key)
        if kind is None or value is None or value is False:
            continue
        param = f"structured_outputs.{key}"
        if kind is GrammarKind.JSON:
            out.append((GrammarSpec.json_schema(value if isinstance(value, dict | str) else json.dumps(value)), param))
        elif kind is GrammarKind.CHOICE:
            if not isinstance(value, list):
                raise bad_request(f"{param} must be a list of strings", param)
            out.append((GrammarSpec.choice(value), param))
        elif kind is GrammarKind.JSON_OBJECT:
            out.append((GrammarSpec(kind), param))
        elif isinstance(value, str):
            out.append((GrammarSpec(kind, value), param))
        else:
            raise bad_request(f"{param} must be a string", param)
    return out
