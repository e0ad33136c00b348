"""Checks for `gateway.workers` > 1 (several gateway processes on one port, docs/gateway.md "Workers"):
the combinations whose state cannot be shared correctly are refused here, with the key to change."""

from __future__ import annotations

from typing import Any

Problem = tuple[tuple[str | int, ...], str]


def worker_problems(cfg: Any) -> list[Problem]:
    """(location, message) for each setting that does not work with ``cfg.gateway.workers`` processes."""
    n = cfg.gateway.workers
    if n <= 1:
        return []
    problems: list[Problem] = []
    if cfg.gateway.admin_api is True:
        problems.append((("gateway", "admin_api"),
                         f"the admin API changes one process's pools; with gateway.workers: {n} it would change "
                         "one worker of several. Set admin_api: false (or leave it unset) or workers: 1"))
    for name, pool in cfg.pools.items():
        if pool.max_concurrency is not None and pool.max_concurrency < n:
            problems.append((("pools", name, "max_concurrency"),
                             f"{pool.max_concurrency} is below gateway.workers ({n}): each worker holds a share "
                             "of every endpoint's cap and needs at least 1; lower workers or raise the cap"))
        if pool.kubernetes is not None and pool.kubernetes.autoscale is not None:
            problems.append((("pools", name, "kubernetes", "autoscale"),
                             f"each of the {n} workers would scale the same Deployments; run the autoscaler "
                             "in a gateway with workers: 1"))
    return problems
