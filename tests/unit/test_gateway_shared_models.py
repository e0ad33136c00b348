"""Two pools serving one model name: the gateway names the pool that wins instead of choosing silently."""

from __future__ import annotations

from inferstack.gateway.server import shared_models


def test_names_served_by_several_pools_list_them_in_config_order() -> None:
    pools = {"gpu": {"llama", "qwen"}, "cpu": {"llama", "smol"}, "canary": {"llama"}}
    assert shared_models(pools, aliases=()) == {"llama": ["gpu", "cpu", "canary"]}


def test_an_alias_routes_explicitly_so_it_is_not_ambiguous() -> None:
    assert shared_models({"a": {"llama"}, "b": {"llama"}}, aliases={"llama"}) == {}
    assert shared_models({"a": {"x"}, "b": {"y"}}, aliases=()) == {}
