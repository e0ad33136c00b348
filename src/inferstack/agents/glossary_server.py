"""An MCP server (official SDK, stdio) that the shipped agent and workflow examples use as their tool:
a glossary of inference-serving terms. Run: `python -m inferstack.agents.glossary_server`."""

from __future__ import annotations

import re

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

GLOSSARY = {
    "prefill": "Prefill computes the KV cache of every prompt token in one forward pass; it is compute-bound "
               "and sets the time to first token.",
    "decode": "Decode generates one token per step for each running sequence; it is memory-bandwidth-bound "
              "and sets the inter-token latency.",
    "kv cache": "The KV cache keeps the attention keys and values of earlier tokens so they are not "
                "recomputed; paged KV stores it in fixed-size blocks.",
    "prefix caching": "Prefix caching reuses the KV blocks of a prompt prefix computed earlier, so a shared "
                      "system prompt or conversation history is not prefilled again.",
    "session affinity": "Session affinity routes every request of one conversation to the replica that "
                        "already holds its prefix in its KV cache.",
    "speculative decoding": "Speculative decoding drafts several tokens cheaply and verifies them in one "
                            "pass of the large model.",
}

server = MCPServer("glossary")


def _words(text: str) -> list[str]:
    return [w[:4] for w in re.split(r"[^a-z]+", text.lower()) if len(w) >= 2]


def best_entry(term: str) -> str | None:
    """The entry sharing the most words with ``term`` (compared on their first four letters, so
    `prefix_cache` finds "prefix caching"); None when no word is shared."""
    wanted = set(_words(term))
    scored = [(len(wanted & set(_words(name))), name) for name in GLOSSARY]
    score, name = max(scored, key=lambda s: s[0])
    return name if score else None


@server.tool()
def lookup(term: str) -> str:
    """Define an inference-serving term (prefill, decode, kv cache, prefix caching, session affinity...)."""
    name = best_entry(term)
    if name is None:  # a ToolError reaches the client as an is_error result with this text
        raise ToolError(f"no entry for {term!r}; known terms: {', '.join(GLOSSARY)}")
    return f"{name}: {GLOSSARY[name]}"


@server.tool()
def count_words(text: str) -> int:
    """Count the words of a text."""
    return len(text.split())


if __name__ == "__main__":
    server.run()
