"""resolve: the requested model -> (pool, name upstream, LoRA adapter).

Order: a `models:` entry (weighted choice among its targets), then a pool's LoRA adapters, then a
pool's served models in config order.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from inferstack.config.schema import InferstackConfig
from inferstack.gateway.datalayer import Pool
from inferstack.gateway.pipeline.context import Route
from inferstack.protocol.errors import APIError


@dataclass(slots=True, frozen=True)
class _Target:
    pool: Pool
    weight: float
    upstream_model: str | None


class Resolver:
    def __init__(self, cfg: InferstackConfig, pools: Mapping[str, Pool], rng: random.Random | None = None):
        self.pools = pools
        self.aliases: dict[str, list[_Target]] = {}
        for name, m in cfg.models.items():
            targets = [_Target(pools[t.pool], t.weight, t.model or name) for t in m.targets]
            for alias in [name, *m.aliases]:
                self.aliases[alias] = targets
        self._rng = rng or random.Random()

    def resolve(self, model: str) -> Route:
        targets = self.aliases.get(model)
        if targets is not None:
            t = targets[0] if len(targets) == 1 else self._weighted(targets)
            return Route(model, t.pool, t.upstream_model or model, None)
        for p in self.pools.values():
            if model in p.config.lora_adapters:
                return Route(model, p, model, model)
            if model in p.models:
                return Route(model, p, model, None)
        raise APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")

    def _weighted(self, targets: list[_Target]) -> _Target:
        r = self._rng.random() * sum(t.weight for t in targets)
        for t in targets:
            r -= t.weight
            if r < 0:
                return t
        return targets[-1]

    def model_names(self) -> set[str]:
        """Every name a client may ask for: aliases, served models and adapters."""
        names: set[str] = set(self.aliases)
        for p in self.pools.values():
            names |= p.models
            names.update(p.config.lora_adapters)
        return names


def shared_models(pool_models: dict[str, set[str]], aliases: Collection[str]) -> dict[str, list[str]]:
    """Model names (not aliases) that more than one pool serves -> those pools, in config order."""
    owners: dict[str, list[str]] = {}
    for pool, models in pool_models.items():
        for model in models:
            owners.setdefault(model, []).append(pool)
    return {m: pools for m, pools in sorted(owners.items()) if len(pools) > 1 and m not in aliases}
