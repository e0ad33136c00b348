"""Dagger-style step cache policy: which node results may be reused, for how long, under which key.

Key = sha256 of (node type, node config, resolved inputs, model name and gateway): a node whose
inputs are unchanged reuses its earlier outputs; any upstream change reaches the key through the
resolved inputs, so invalidation is exactly as narrow as the node's inputs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from inferstack.workflow.dsl import MODEL_NODES, Node

DEFAULT_TTL_S = 7 * 24 * 3600  # Dagger's function-cache default
# nodes worth caching: they call a model, run code or go to the network; the rest are cheap and pure
CACHEABLE = MODEL_NODES | {"code", "http-request"}
# keys that do not change what a node computes
_COSMETIC = frozenset({"title", "desc", "selected", "cache", "retry_config", "timeout_s", "isInIteration",
                       "iteration_id", "error_strategy", "default_value"})


def cache_ttl(node: Node, resolved: dict[str, Any]) -> float | None:
    """Seconds to keep this result, or None when it must not be cached.

    `data.cache: {never: true}` or `{ttl: seconds}` overrides; an LLM call is only reproducible at
    temperature 0 or with a seed; an HTTP request only for GET.
    """
    policy = node.data.get("cache") or {}
    if node.type not in CACHEABLE or policy.get("never"):
        return None
    if node.type in MODEL_NODES:
        params = resolved.get("params", {})
        if params.get("temperature", 1) != 0 and params.get("seed") is None:
            return None
    if node.type == "http-request" and resolved.get("method") != "GET":
        return None
    ttl = policy.get("ttl", DEFAULT_TTL_S)
    return float(ttl) if ttl and float(ttl) > 0 else None


def cache_key(node: Node, resolved: dict[str, Any], gateway: str) -> str:
    config = {k: v for k, v in node.data.items() if k not in _COSMETIC}
    model = (node.data.get("model") or {}).get("name")
    material = {"type": node.type, "config": config, "inputs": resolved,
                "model": [model, gateway] if node.type in MODEL_NODES else None}
    blob = json.dumps(material, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()
