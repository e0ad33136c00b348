"""How each model family writes tool calls, and how its prompts show tools, calls and results.

=============  ==================================================  =====================================
family         a call in the output                                 models
=============  ==================================================  =====================================
hermes         ``<tool_call>{"name": …, "arguments": {…}}</tool_call>``  Hermes, Qwen2.5 / Qwen3
smollm2        ``<tool_call>[{"name": …, "arguments": {…}}, …]</tool_call>``  SmolLM2 (the bundled model)
llama3_json    ``{"name": …, "parameters": {…}}`` (calls joined by ``; ``)   Llama 3.1 / 3.2 / 3.3
mistral        ``[TOOL_CALLS][{"name": …, "arguments": {…}}, …]``           Mistral 7B v0.3, Nemo
=============  ==================================================  =====================================

When a model's own chat template renders ``tools`` we use it; otherwise (the bundled SmolLM2 GGUF
template has no tool section) the family's system prompt below describes the tools, earlier calls are
written back in the family's syntax and tool results are user turns in ``<tool_response>`` tags.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_PROMPT = """You are an expert in composing functions. You are given a question and a set of possible \
functions. Based on the question, you will need to make one or more function/tool calls to achieve the \
purpose. If none of the functions can be used, point it out and refuse to answer. If the given question \
lacks the parameters required by the function, also point it out.

You have access to the following tools:
<tools>{tools}</tools>

The output MUST strictly adhere to the following format, and NO other text MUST be included.
{example}"""


@dataclass(frozen=True)
class ToolFormat:
    name: str
    start: str              # opens the tool-call part of the output ("" = the output starts with "{")
    args_key: str           # "arguments" or "parameters"
    list_form: bool         # calls are one JSON array after `start`
    end: str = ""           # closes the tool-call part
    separator: str = ""     # between calls when not a list

    def split(self, text: str) -> tuple[str, str] | None:
        """(content before the calls, the calls' text), or None when the output has no call."""
        if self.start:
            at = text.find(self.start)
            return None if at < 0 else (text[:at], text[at + len(self.start):])
        stripped = text.lstrip()
        stripped = stripped.removeprefix("<|python_tag|>")
        return ("", stripped) if stripped.startswith("{") else None

    def call_json(self, name: str, arguments: Any) -> str:
        return json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)

    def render_calls(self, calls: list[tuple[str, Any]]) -> str:
        """An assistant turn that made ``calls`` ((name, arguments) pairs), in this family's syntax."""
        items = [self.call_json(n, a) for n, a in calls]
        if self.list_form:
            return f"{self.start}[{', '.join(items)}]{self.end}"
        if self.start:
            return "\n".join(f"{self.start}\n{item}\n{self.end}" for item in items)
        return self.separator.join(items)

    def system_prompt(self, functions: list[dict[str, Any]]) -> str:
        example = self.render_calls([("func_name1", {"argument1": "value1", "argument2": "value2"})])
        if self.list_form:
            example += "\nPut every call in the list; the parameter types must be correct."
        return _PROMPT.format(tools=json.dumps(functions, ensure_ascii=False), example=example)

    def grammar(self, call_schemas: list[dict[str, Any]], parallel: bool, start_token: int | None = None) -> str:
        """A Lark grammar (llguidance dialect) for one or more calls, each matching one of ``call_schemas``.
        ``start_token``: the id of the special token that spells ``start`` in this tokenizer (Mistral's
        ``[TOOL_CALLS]``), which the model writes as that one token, not as text."""
        one = {"anyOf": call_schemas} if len(call_schemas) > 1 else call_schemas[0]
        # a special-token marker is followed by a space where a sentencepiece model writes "▁[" next
        start = json.dumps(self.start) if start_token is None else f'<[{start_token}]> " "?'
        if self.list_form:
            array = {"type": "array", "items": one, "minItems": 1, **({} if parallel else {"maxItems": 1})}
            return f"start: {start} calls {json.dumps(self.end)}\ncalls: %json {json.dumps(array)}"
        call = f"call: %json {json.dumps(one)}"
        if self.start:      # as render_calls writes them: one tagged call per line
            item = f"{start} {json.dumps(chr(10))} call {json.dumps(chr(10) + self.end)}"
            more = f' ({json.dumps(chr(10))} item)*' if parallel else ""
            return f"start: item{more}\nitem: {item}\n{call}"
        more = f' ({json.dumps(self.separator)} call)*' if parallel else ""
        return f"start: call{more}\n{call}"


FORMATS: dict[str, ToolFormat] = {
    "hermes": ToolFormat("hermes", "<tool_call>", "arguments", list_form=False, end="</tool_call>"),
    "smollm2": ToolFormat("smollm2", "<tool_call>", "arguments", list_form=True, end="</tool_call>"),
    "llama3_json": ToolFormat("llama3_json", "", "parameters", list_form=False, separator="; "),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "arguments", list_form=True),
}


def detect_format(requested: str, chat_template: str | None, model_name: str) -> ToolFormat:
    """The configured family, or (``auto``) the one the chat template or the model name gives away."""
    if requested != "auto":
        if requested not in FORMATS:
            raise ValueError(f"tool_call_parser must be auto or one of {', '.join(FORMATS)}, got {requested!r}")
        return FORMATS[requested]
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return FORMATS["mistral"]
    if "<|python_tag|>" in template or "ipython" in template:
        return FORMATS["llama3_json"]
    if "smollm" in model_name.lower():
        return FORMATS["smollm2"]
    return FORMATS["hermes"]
