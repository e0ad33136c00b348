"""Dify's parameter-extractor and question-classifier nodes, answered by structured outputs: the
gateway's engine is asked for a strict JSON schema (`response_format: json_schema`, `strict: true`),
so the model's reply is valid JSON of that shape token by token (docs/structured-outputs.md) instead
of a prompt that hopes for JSON.

Node config as Dify writes it:
- parameter-extractor: `model`, `query` (a variable selector), `parameters: [{name, type, description,
  required, options}]`, `instruction` (may reference variables), `reasoning_mode` (`prompt`: a strict
  response_format; `function_call`: a forced call of a strict function with that schema, as Dify's
  tool-calling mode). Outputs: one value per parameter (None when the model gave none), `__is_success`
  (1/0), `__reason`, `__usage`.
- question-classifier: `model`, `query_variable_selector`, `classes: [{id, name}]`, `instruction`.
  Outputs `class_name`, `class_id`, `usage`; the edge taken is the one whose sourceHandle is the class id.
"""

from __future__ import annotations

import json
from typing import Any

from inferstack.workflow.context import RunContext, as_text
from inferstack.workflow.dsl import Node
from inferstack.workflow.nodes import COMPLETION_PARAMS, NodeFailure, NodeResult, Services, complete

# Dify parameter types → JSON Schema (strict mode: every object closed, every property required)
_SCALARS = {"string": "string", "number": "number", "bool": "boolean", "boolean": "boolean"}
_CLOSED_OBJECT = {"type": "object", "additionalProperties": False, "properties": {}, "required": []}
EXTRACT_FUNCTION = "extract_parameters"
DEFAULT_MAX_TOKENS = 256  # strict schemas allow no string length bound; this ends a rambling model


def parameter_schema(param: dict[str, Any]) -> dict[str, Any]:
    kind = str(param.get("type", "string"))
    if kind == "select":
        options = [str(o) for o in param.get("options") or []]
        if not options:
            raise NodeFailure(f"parameter {param.get('name')!r} is a select with no options")
        schema: dict[str, Any] = {"type": "string", "enum": options}
    elif kind in _SCALARS:
        schema = {"type": _SCALARS[kind]}
    elif kind.startswith("array[") and kind.endswith("]"):
        inner = kind[6:-1]
        items = dict(_CLOSED_OBJECT) if inner == "object" else {"type": _SCALARS.get(inner, "")}
        if items.get("type") == "":
            raise NodeFailure(f"parameter {param.get('name')!r}: unknown type {kind!r}")
        schema = {"type": "array", "items": items}
    else:
        raise NodeFailure(f"parameter {param.get('name')!r}: unknown type {kind!r}")
    if not param.get("required", False):  # optional in strict mode: may be null, still listed
        schema = {"anyOf": [schema, {"type": "null"}]}
    if param.get("description"):
        schema["description"] = str(param["description"])
    return schema


def extraction_schema(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    names = [str(p["name"]) for p in parameters]
    if len(set(names)) != len(names):
        raise NodeFailure(f"duplicate parameter names in {names}")
    return {"type": "object", "additionalProperties": False, "required": names,
            "properties": {str(p["name"]): parameter_schema(p) for p in parameters}}


def _model_request(node: Node, ctx: RunContext, selector_key: str) -> dict[str, Any]:
    model = node.data.get("model") or {}
    params = {k: v for k, v in (model.get("completion_params") or {}).items() if k in COMPLETION_PARAMS}
    params.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    return {"model": model.get("name"), "params": params,
            "query": as_text(ctx.get(node.data.get(selector_key) or [])),
            "instruction": ctx.render(str(node.data.get("instruction") or ""))}


def _body(resolved: dict[str, Any], system: str, name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"model": resolved["model"], **resolved["params"],
            "messages": [{"role": "system", "content": system}, {"role": "user", "content": resolved["query"]}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": name, "strict": True, "schema": schema}}}


class ParameterExtractor:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        resolved = _model_request(node, ctx, "query")
        resolved["parameters"] = [dict(p) for p in node.data.get("parameters") or []]
        resolved["reasoning_mode"] = str(node.data.get("reasoning_mode") or "prompt")
        return resolved

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        params = resolved["parameters"]
        if not params:
            raise NodeFailure("no parameters to extract (data.parameters is empty)")
        schema = extraction_schema(params)
        lines = [f"- {p['name']} ({p.get('type', 'string')}"
                 f"{', required' if p.get('required') else ', null if absent'}): {p.get('description', '')}"
                 for p in params]
        system = ("Extract these parameters from the user's text and answer with JSON only.\n"
                  + "\n".join(lines) + (f"\n{resolved['instruction']}" if resolved["instruction"] else ""))
        body = _body(resolved, system, "parameters", schema)
        if resolved["reasoning_mode"] == "function_call":  # Dify's tool-calling mode: a forced function call
            del body["response_format"]
            body["tools"] = [{"type": "function", "function": {"name": EXTRACT_FUNCTION, "strict": True,
                                                               "description": "Record the extracted parameters.",
                                                               "parameters": schema}}]
            body["tool_choice"] = {"type": "function", "function": {"name": EXTRACT_FUNCTION}}
        reply = await complete(svc, body)
        values, reason = _parse_object(_extracted_text(reply.message))
        outputs = {str(p["name"]): (values or {}).get(str(p["name"])) for p in params}
        outputs.update({"__is_success": 1 if reason is None else 0, "__reason": reason, "__usage": reply.usage})
        return NodeResult(outputs, usage=reply.usage)


class QuestionClassifier:
    def resolve(self, node: Node, ctx: RunContext) -> dict[str, Any]:
        resolved = _model_request(node, ctx, "query_variable_selector")
        resolved["classes"] = [{"id": str(c.get("id")), "name": str(c.get("name"))}
                               for c in node.data.get("classes") or []]
        return resolved

    async def run(self, node: Node, resolved: dict[str, Any], svc: Services) -> NodeResult:
        classes = resolved["classes"]
        names = [c["name"] for c in classes]
        if not classes or len(set(names)) != len(names):
            raise NodeFailure(f"classes need distinct names, got {names}")
        schema = {"type": "object", "additionalProperties": False, "required": ["category_name"],
                  "properties": {"category_name": {"type": "string", "enum": names}}}
        system = ("Classify the user's text into exactly one of these categories and answer with JSON only.\n"
                  + "\n".join(f"- {n}" for n in names)
                  + (f"\n{resolved['instruction']}" if resolved["instruction"] else ""))
        reply = await complete(svc, _body(resolved, system, "classification", schema))
        values, reason = _parse_object(reply.message.get("content"))
        chosen = next((c for c in classes if values and c["name"] == values.get("category_name")), None)
        if chosen is None:
            raise NodeFailure(f"the model named no category ({reason or values})")
        return NodeResult({"class_name": chosen["name"], "class_id": chosen["id"], "usage": reply.usage},
                          branch=chosen["id"], usage=reply.usage)


def _extracted_text(message: dict[str, Any]) -> Any:
    """The JSON text of the answer: the forced function call's arguments, else the content."""
    for call in message.get("tool_calls") or []:
        function = call.get("function") or {}
        if function.get("name") == EXTRACT_FUNCTION:
            return function.get("arguments")
    return message.get("content")


def _parse_object(content: Any) -> tuple[dict[str, Any] | None, str | None]:
    """(the JSON object, None) or (None, why not): a reply cut off by max_tokens is not valid JSON."""
    try:
        value = json.loads(content or "")
    except ValueError as exc:
        return None, f"the model's reply is not JSON ({exc}): {str(content)[:200]!r}"
    if not isinstance(value, dict):
        return None, f"the model's reply is not a JSON object: {str(content)[:200]!r}"
    return value, None
