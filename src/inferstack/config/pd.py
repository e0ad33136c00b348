"""`pools.<name>.pd`: prefill/decode disaggregation settings of a pool (docs/disaggregation.md)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EndpointRole = Literal["prefill", "decode", "both"]


class PDConfig(BaseModel):
    """Split long prompts into a prefill leg (on a `role: prefill` endpoint) and a decode leg
    (on a `role: decode` endpoint that pulls the KV)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    threshold_tokens: int = Field(
        128, ge=0, description="Run the prefill leg only when at least this many prompt tokens are not "
        "cached on the chosen decode endpoint (0: always split).")
    prefill_routing: str | None = Field(
        None, description="Routing preset or profile for the prefill leg; defaults to the pool's `routing`.")
    max_prefill_queue: int | None = Field(
        None, ge=1, description="Conditional disaggregation (Dynamo's prefill-queue rule): when every prefill "
        "endpoint has at least this many requests waiting, prefill on the decode endpoint instead of queueing "
        "behind them (outcome `local_prefill_busy`). Unset: always wait for a prefill endpoint.")
    prefill_timeout_s: float = Field(
        60.0, gt=0, description="Give up on the prefill leg after this long and recompute on the decode endpoint.")


def pd_problems(pools: Mapping[str, Any], profiles: set[str]) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-checks between endpoint roles and `pd` (location, message), like `cross_check`."""
    problems: list[tuple[tuple[str | int, ...], str]] = []
    for name, pool in pools.items():
        pd: PDConfig | None = pool.pd
        roles = [e.role for e in pool.endpoints]
        enabled = pd is not None and pd.enabled
        if not enabled:
            for i, r in enumerate(roles):
                if r != "both":
                    problems.append((("pools", name, "endpoints", i, "role"),
                                     f"role {r!r} needs `pd: {{enabled: true}}` on pool {name!r}"))
            continue
        if pool.kubernetes is not None:
            continue  # roles come from the pods' `llm-d.ai/role` labels at run time
        if "prefill" not in roles:
            problems.append((("pools", name, "pd"), "pd needs at least one endpoint with `role: prefill`"))
        if "decode" not in roles:
            problems.append((("pools", name, "pd"), "pd needs at least one endpoint with `role: decode`"))
        if pd.prefill_routing is not None and pd.prefill_routing not in profiles:
            problems.append((("pools", name, "pd", "prefill_routing"),
                             f"unknown routing {pd.prefill_routing!r}; known: {', '.join(sorted(profiles))}"))
    return problems
