"""What a request constrains its output to: a grammar kind and its source text (the cache key)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class GrammarKind(StrEnum):
    JSON = "json"                 # a JSON schema (text)
    JSON_OBJECT = "json_object"   # any JSON object
    REGEX = "regex"
    CHOICE = "choice"             # a JSON list of strings: the output is exactly one of them
    GRAMMAR = "grammar"           # Lark or GBNF (llguidance converts GBNF)


@dataclass(frozen=True)
class GrammarSpec:
    kind: GrammarKind
    source: str = ""

    @classmethod
    def json_schema(cls, schema: dict[str, Any] | str) -> GrammarSpec:
        # sort_keys=False: property order is the generation order; canonical separators for the cache key
        text = schema if isinstance(schema, str) else json.dumps(schema, separators=(",", ":"))
        return cls(GrammarKind.JSON, text)

    @classmethod
    def choice(cls, options: list[str]) -> GrammarSpec:
        return cls(GrammarKind.CHOICE, json.dumps(options))
