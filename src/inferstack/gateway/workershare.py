"""What one of N gateway workers runs with (docs/gateway.md, "Workers"): pure functions over the config.

Every worker runs the whole pipeline with its own routing state, so a limit that is a promise to an
engine must be split: worker ``i`` of ``n`` holds `share(cap, n, i)` of each endpoint's
`max_concurrency`, and the shares add up to the cap, so the pool's hard cap holds across workers
(flow control in each worker queues once its own share is in flight). Each worker's audit records
go to their own hash chain, ``<audit.directory>/worker-<i>``, since one chain has one writer.
"""

from __future__ import annotations

from inferstack.config.schema import InferstackConfig


def share(total: int, workers: int, index: int) -> int:
    """Worker ``index``'s part of ``total``: the parts differ by at most one and add up to ``total``."""
    if not 0 <= index < workers:
        raise ValueError(f"worker index {index} outside 0..{workers - 1}")
    base, extra = divmod(total, workers)
    return base + (1 if index < extra else 0)


def worker_config(cfg: InferstackConfig, index: int) -> InferstackConfig:
    """``cfg`` as worker ``index`` of ``cfg.gateway.workers`` runs it (the same config for one worker)."""
    n = cfg.gateway.workers
    if n == 1:
        return cfg
    pools = {name: p.model_copy(update={"max_concurrency": share(p.max_concurrency, n, index)})
             if p.max_concurrency is not None else p for name, p in cfg.pools.items()}
    # the admin API would change one worker's pools only: off unless asked for (then the config is refused)
    gw = cfg.gateway.model_copy(update={"admin_api": cfg.gateway.admin_api or False})
    update: dict = {"pools": pools, "gateway": gw}
    if cfg.audit is not None:
        update["audit"] = cfg.audit.model_copy(update={"directory": cfg.audit.directory / f"worker-{index}"})
    return cfg.model_copy(update=update)
