"""Step-cache policy and keys: what may be reused, for how long, and what changes the key."""

from __future__ import annotations

from inferstack.workflow.cache import DEFAULT_TTL_S, cache_key, cache_ttl
from inferstack.workflow.dsl import Node


def node(kind: str, **data: object) -> Node:
    return Node(id="n", type=kind, title="t", data={"type": kind, **data}, line=1, parent=None)


def llm_inputs(**params: object) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hi"}], "params": params}


def test_llm_cacheable_only_when_reproducible() -> None:
    assert cache_ttl(node("llm"), llm_inputs(temperature=0)) == DEFAULT_TTL_S
    assert cache_ttl(node("llm"), llm_inputs(temperature=0.7, seed=3)) == DEFAULT_TTL_S
    assert cache_ttl(node("llm"), llm_inputs(temperature=0.7)) is None
    assert cache_ttl(node("llm"), llm_inputs()) is None  # the API's default temperature is 1


def test_per_node_policy_and_types() -> None:
    assert cache_ttl(node("llm", cache={"ttl": 60}), llm_inputs(temperature=0)) == 60.0
    assert cache_ttl(node("llm", cache={"never": True}), llm_inputs(temperature=0)) is None
    assert cache_ttl(node("code"), {"code": "", "inputs": {}}) == DEFAULT_TTL_S
    assert cache_ttl(node("http-request"), {"method": "POST"}) is None
    assert cache_ttl(node("http-request"), {"method": "GET"}) == DEFAULT_TTL_S
    assert cache_ttl(node("template-transform"), {}) is None


def test_key_follows_inputs_config_and_model_not_cosmetics() -> None:
    base = cache_key(node("llm", model={"name": "a"}), llm_inputs(temperature=0), "http://gw/v1")
    assert base == cache_key(node("llm", model={"name": "a"}, title="renamed", retry_config={"enabled": True}),
                             llm_inputs(temperature=0), "http://gw/v1")
    assert base != cache_key(node("llm", model={"name": "b"}), llm_inputs(temperature=0), "http://gw/v1")
    assert base != cache_key(node("llm", model={"name": "a"}), llm_inputs(temperature=0, max_tokens=5), "http://gw/v1")
    assert base != cache_key(node("llm", model={"name": "a"}), llm_inputs(temperature=0), "http://other/v1")
