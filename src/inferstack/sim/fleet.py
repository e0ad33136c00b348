"""What `inferstack sim` simulates, from the command line and `inferstack.yaml`: the fleet
(`--fleet HW:MODEL=N[:ROLE][@HOST]`, `--pd XpYd`) and the pool the gateway routes over (routing, max
concurrency, PD and precise prefix from the config's pool, with the fleet as its endpoints)."""

from __future__ import annotations

import re
from pathlib import Path

from inferstack.config.loader import load_config
from inferstack.config.pd import PDConfig
from inferstack.config.schema import EndpointConfig, InferstackConfig, PoolConfig
from inferstack.gateway.routing.registry import PRESETS
from inferstack.sim.profile import ProfileError, parse_profile
from inferstack.sim.simulation import FleetSpec

_FLEET = re.compile(r"^(?P<profile>.+?)=(?P<n>\d+)(?::(?P<role>prefill|decode|both))?(?:@(?P<host>[\w.-]+))?$")
_PD = re.compile(r"^(?P<p>\d+)p(?P<d>\d+)d$")


class SimSetupError(ValueError):
    pass


def parse_fleet(text: str) -> FleetSpec:
    m = _FLEET.match(text.strip())
    if not m:
        raise SimSetupError(f"--fleet {text!r}: expected HARDWARE:MODEL=N[:prefill|decode|both][@HOST], "
                            "e.g. h100:llama-3-8b=8 or cpu:smollm2-135m=2@box")
    try:
        profile = parse_profile(m.group("profile"))
    except ProfileError as e:
        raise SimSetupError(f"--fleet {text!r}: {str(e).split(': ', 1)[-1]}") from None
    n = int(m.group("n"))
    if n < 1:
        raise SimSetupError(f"--fleet {text!r}: the replica count must be >= 1")
    return FleetSpec(profile, n, m.group("role") or "both", m.group("host"))


def apply_pd(fleets: list[FleetSpec], pd: str) -> list[FleetSpec]:
    """``colocated`` keeps the fleet; ``XpYd`` splits a single-profile fleet of X+Y replicas into X
    prefill and Y decode replicas."""
    if pd == "colocated":
        return fleets
    m = _PD.match(pd)
    if not m:
        raise SimSetupError(f"--pd {pd!r}: expected colocated or XpYd, e.g. 2p2d")
    p, d = int(m.group("p")), int(m.group("d"))
    if len(fleets) != 1 or p < 1 or d < 1:
        raise SimSetupError(f"--pd {pd}: needs exactly one --fleet and at least 1 prefill and 1 decode replica")
    host = fleets[0].host
    return [FleetSpec(fleets[0].profile, p, "prefill", host), FleetSpec(fleets[0].profile, d, "decode", host)]


def load_sim_config(path: Path | None) -> InferstackConfig:
    """The one `inferstack.yaml` (file:line errors from its loader), or the defaults."""
    return load_config(path) if path is not None else InferstackConfig()


def sim_pool(cfg: InferstackConfig, fleets: list[FleetSpec], routing: str | None, pool_name: str | None,
             pd_threshold: int | None = None) -> PoolConfig:
    """The config's pool (named, or the only one) with the fleet as its endpoints; without a config a
    default pool. Roles other than ``both`` turn PD on with the pool's (or default) PD settings."""
    if pool_name is not None and pool_name not in cfg.pools:
        raise SimSetupError(f"--pool {pool_name!r}: the config has no such pool; it has {sorted(cfg.pools) or 'none'}")
    if pool_name is None and len(cfg.pools) > 1:
        raise SimSetupError(f"the config has several pools ({', '.join(sorted(cfg.pools))}); choose one with --pool")
    base = cfg.pools[pool_name] if pool_name else next(iter(cfg.pools.values()), None)
    endpoints = [EndpointConfig(url=f"http://sim-{i}", role=f.role) for i, f in
                 enumerate(r for f in fleets for r in [f] * f.replicas)]
    fields: dict[str, object] = base.model_dump(exclude={"endpoints"}) if base else {}
    fields["endpoints"] = endpoints
    if routing is not None:
        if routing not in PRESETS and routing not in cfg.routing.profiles:
            raise SimSetupError(f"--routing {routing!r}: unknown; presets: {', '.join(sorted(PRESETS))}"
                                + (f"; profiles: {', '.join(sorted(cfg.routing.profiles))}"
                                   if cfg.routing.profiles else ""))
        fields["routing"] = routing
    split = any(f.role != "both" for f in fleets)
    if split and not (base and base.pd and base.pd.enabled):
        fields["pd"] = PDConfig().model_dump()
    if not split:
        fields["pd"] = None
    if pd_threshold is not None and fields.get("pd"):
        fields["pd"] = {**fields["pd"], "threshold_tokens": pd_threshold}  # type: ignore[dict-item]
    return PoolConfig.model_validate(fields)
