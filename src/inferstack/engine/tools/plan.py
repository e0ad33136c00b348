"""``tools`` / ``tool_choice`` / ``parallel_tool_calls`` of a chat request, checked the way OpenAI
checks them, and what they mean for the prompt, the grammar and the parsing of the output."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from inferstack.engine.structured.spec import GrammarKind, GrammarSpec
from inferstack.engine.tools.formats import ToolFormat
from inferstack.protocol.errors import APIError, bad_request
from inferstack.protocol.strict_schema import StrictLimits, check_strict_schema

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
Choice = Literal["auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    fmt: ToolFormat
    functions: list[dict[str, Any]]      # the `function` objects of `tools`, in order
    choice: Choice
    named: str | None
    parallel: bool
    marker_id: int | None = None         # the special token spelling fmt.start, if the tokenizer has one

    @property
    def keep_special_ids(self) -> frozenset[int]:
        """Special tokens the output parser reads, kept in the text with the default skip_special_tokens."""
        return frozenset() if self.marker_id is None else frozenset({self.marker_id})

    @property
    def grammar(self) -> GrammarSpec | None:
        """`required` and a named function are enforced; `auto` is parsed from free output."""
        if self.choice == "auto":
            return None
        chosen = [f for f in self.functions if self.choice == "required" or f["name"] == self.named]
        schemas = [{"type": "object", "properties": {"name": {"const": f["name"]},
                                                     self.fmt.args_key: _parameters(f)},
                    "required": ["name", self.fmt.args_key], "additionalProperties": False} for f in chosen]
        parallel = self.parallel and self.choice == "required"
        return GrammarSpec(GrammarKind.GRAMMAR, self.fmt.grammar(schemas, parallel, self.marker_id))

    def finish_reason(self, has_calls: bool, reason: str) -> str:
        """OpenAI: "tool_calls" when the model chose to call; a forced named call ends with "stop"."""
        return "tool_calls" if has_calls and reason == "stop" and self.choice != "named" else reason


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def _missing(param: str) -> APIError:
    return bad_request(f"Missing required parameter: '{param}'.", param)


def check_functions(tools: list[dict[str, Any]], limits: StrictLimits) -> list[dict[str, Any]]:
    functions: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise bad_request(f"Invalid value: '{tool.get('type')}'. Supported values are: 'function'.",
                              f"tools[{i}].type")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _missing(f"tools[{i}].function")
        name = function.get("name")
        if not isinstance(name, str):
            raise _missing(f"tools[{i}].function.name")
        if not _NAME.match(name):
            raise bad_request(f"Invalid 'tools[{i}].function.name': string does not match pattern. Expected a "
                              "string that matches the pattern '^[a-zA-Z0-9_-]+$'.", f"tools[{i}].function.name")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(f"Invalid type for 'tools[{i}].function.parameters': expected an object.",
                              f"tools[{i}].function.parameters")
        if function.get("strict") is True:
            check_strict_schema(params or {"type": "object", "properties": {}, "additionalProperties": False},
                                f"function '{name}'", f"tools[{i}].function.parameters", limits)
        functions.append(function)
    return functions


def plan_tools(fmt: ToolFormat, tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None,
               parallel: bool | None, limits: StrictLimits, marker_id: int | None = None) -> ToolPlan | None:
    """None when no tool may be called (no tools, or tool_choice "none"). ``marker_id``: the special
    token that spells the format's start marker in the model's tokenizer, if any."""
    if not tools:
        if tool_choice is not None and tool_choice != "none":
            raise bad_request("Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are "
                              "specified.", "tool_choice")
        return None
    functions = check_functions(tools, limits)
    if tool_choice is None or tool_choice in ("auto", "required"):
        return ToolPlan(fmt, functions, tool_choice or "auto", None, parallel is not False, marker_id)
    if tool_choice == "none":
        return None
    if isinstance(tool_choice, str):
        raise bad_request(f"Invalid value: '{tool_choice}'. Supported values are: 'none', 'auto', and 'required'.",
                          "tool_choice")
    named = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
    if not isinstance(named, str):
        raise _missing("tool_choice.function.name")
    if named not in {f["name"] for f in functions}:
        raise bad_request(f"Invalid value for 'tool_choice': function '{named}' is not among 'tools'.",
                          "tool_choice")
    return ToolPlan(fmt, functions, "named", named, False, marker_id)


def template_messages(fmt: ToolFormat, plan: ToolPlan | None, messages: list[dict[str, Any]],
                      native: bool) -> list[dict[str, Any]]:
    """Messages for a template: as OpenAI sent them (arguments as objects, which templates expect)
    when it renders tools itself; else in the family's syntax, with the tools in the system prompt."""
    out: list[dict[str, Any]] = []
    for m in messages:
        calls = [(c["function"]["name"], _arguments(c["function"].get("arguments"))) for c in m.get("tool_calls") or []]
        if native:
            m = dict(m)
            if calls:
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": args}}
                                   for c, (_, args) in zip(m["tool_calls"], calls, strict=True)]
            out.append(m)
        elif m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif calls:
            rendered = fmt.render_calls(calls)
            out.append({"role": "assistant", "content": f"{m['content']}\n{rendered}" if m["content"] else rendered})
        else:
            out.append({"role": m["role"], "content": m["content"]})
    if plan is not None and not native:
        prompt = plan.fmt.system_prompt(plan.functions)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out


def _arguments(raw: Any) -> Any:
    if isinstance(raw, str):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    return raw
