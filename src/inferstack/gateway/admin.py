"""The admin API: GET /admin/pools and PUT /admin/pools/{pool}/endpoints (desired state).

Whoever can call it decides where tenants' prompts go, so it is guarded three ways: it is off unless
an admin token is configured (`gateway.admin_token_env`; `inferstack up` generates one and passes it
to both the gateway and its supervisor), every call must carry that token as a bearer token, and the
Host header must name a loopback address, so a web page that rebinds its DNS name to 127.0.0.1
cannot drive it from a browser. Endpoint URLs are validated like the config file's.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol
from urllib.parse import parse_qs

import orjson
from pydantic import ValidationError

from inferstack.autoscale.load import LoadSnapshot
from inferstack.autoscale.metrics import AutoscalerStatus
from inferstack.autoscale.signals import Objectives
from inferstack.config.schema import EndpointConfig, GatewayConfig
from inferstack.gateway.datalayer import DataLayer, Pool
from inferstack.protocol.errors import APIError

log = logging.getLogger("inferstack.gateway.admin")

ReadBody = Callable[[int], Awaitable[bytes]]  # reads the request body, refusing more than N bytes


def is_loopback_host(host_header: bytes | None) -> bool:
    """The Host header names a loopback address (localhost, 127.0.0.0/8, ::1), with or without port."""
    if not host_header:
        return False
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_refusal(token: str | None, host: bytes | None, authorization: bytes | None) -> APIError | None:
    """Why a call may not use the admin API, or None when it may."""
    if not is_loopback_host(host):
        return APIError(403, "The admin API answers only requests addressed to a loopback host name "
                        "(Host: 127.0.0.1 or localhost).", code="admin_host_not_allowed")
    scheme, _, given = (authorization or b"").decode("latin-1").partition(" ")
    matches = token is not None and hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not matches:
        return APIError(401, "The admin API needs `Authorization: Bearer <admin token>`.",
                        code="invalid_admin_token")
    return None


def admin_token(cfg: GatewayConfig, enabled: bool) -> str | None:
    """The configured token, or None (then the API is off, and the log says why)."""
    token = os.environ.get(cfg.admin_token_env) or None
    if enabled and token is None:
        log.warning("admin API off: set %s to a secret to serve /admin/pools (inferstack up does this)",
                    cfg.admin_token_env)
    return token if enabled else None


def _parse_endpoints(body: bytes) -> list[EndpointConfig]:
    try:
        raw = orjson.loads(body)
        items = raw["endpoints"] if isinstance(raw, dict) else None
        if not isinstance(items, list):
            raise TypeError("`endpoints` must be a list")
        unknown = sorted({k for e in items for k in e} - set(EndpointConfig.model_fields))
        if unknown:  # never drop what a caller sent silently
            raise APIError(400, f"Unknown endpoint field(s) {', '.join(unknown)}; accepted: "
                           f"{', '.join(EndpointConfig.model_fields)}.", param="endpoints", code="invalid_endpoint")
        return [EndpointConfig.model_validate(e) for e in items]
    except ValidationError as exc:
        why = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise APIError(400, f"Invalid endpoint: {why}", param="endpoints", code="invalid_endpoint") from None
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise APIError(400, f"Expected {{\"endpoints\": [{{\"url\": \"http://...\"}}, ...]}}: {exc}",
                       param="endpoints") from None


class PoolAutoscaling(Protocol):
    """What the autoscaling routes read and write (the gateway's `Pipeline`)."""

    def pool_load(self, pool: str, since: float, objectives: Objectives | None = None) -> LoadSnapshot: ...

    def report_autoscaler(self, status: AutoscalerStatus) -> None: ...


def _since(query: bytes) -> float:
    raw = parse_qs(query.decode("latin-1")).get("since", ["0"])[0]
    try:
        return float(raw)
    except ValueError:
        raise APIError(400, "`since` must be a number (the `now` of the previous answer).", param="since") from None


def _objectives(query: bytes) -> Objectives | None:
    """``ttft`` and ``tpot`` (seconds, both or neither): count the misses of the requests finished since."""
    q = parse_qs(query.decode("latin-1"))
    if "ttft" not in q and "tpot" not in q:
        return None
    try:
        ttft, tpot = float(q["ttft"][0]), float(q["tpot"][0])
    except (KeyError, ValueError):
        raise APIError(400, "`ttft` and `tpot` must both be numbers of seconds (the objectives misses are "
                            "counted against).", param="ttft") from None
    if not (ttft > 0 and tpot > 0):
        raise APIError(400, "`ttft` and `tpot` must be > 0 seconds.", param="ttft")
    return Objectives(ttft, tpot)


class AdminAPI:
    """Answers admin calls with a JSON body; refusals are raised as APIError.

    Autoscalers (docs/autoscaling.md) use two more routes: GET /admin/pools/{pool}/load?since=T[&ttft=S&tpot=S]
    (the pool's `LoadSnapshot`, `autoscale/load.py`, with the misses of those objectives) and PUT
    /admin/pools/{pool}/autoscaler (the actuator's desired/actual replicas and decision counts, exported as
    `inferstack_autoscaler_*`)."""

    def __init__(self, pools: dict[str, Pool], datalayer: DataLayer, token: str | None,
                 autoscaling: PoolAutoscaling | None = None):
        self.pools = pools
        self.datalayer = datalayer
        self.token = token
        self.autoscaling = autoscaling

    async def _autoscaling(self, pool: str, route: str, method: str, query: bytes, read_body: ReadBody) -> bytes:
        if self.autoscaling is None:
            raise APIError(404, f"Unknown path /admin/pools/{pool}/{route}.", code="not_found")
        if route == "load" and method == "GET":
            return orjson.dumps(self.autoscaling.pool_load(pool, _since(query), _objectives(query)).to_json())
        if route == "autoscaler" and method == "PUT":
            try:
                status = AutoscalerStatus.from_json(pool, orjson.loads(await read_body(1 << 20)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
                raise APIError(400, f"Expected an autoscaler status {{\"policy\", \"desired\", \"ready\", "
                               f"\"decisions\": [...]}}: {exc}") from None
            self.autoscaling.report_autoscaler(status)
            return orjson.dumps({"pool": pool, "role": status.role})
        raise APIError(405, f"Use {'GET' if route == 'load' else 'PUT'} for /admin/pools/{pool}/{route}.")

    async def handle(self, path: bytes, method: str, headers: Mapping[bytes, bytes],
                     read_body: ReadBody, query: bytes = b"") -> bytes:
        if self.token is None:
            raise APIError(404, f"Unknown path {path.decode('latin-1')}.", code="not_found")
        refusal = admin_refusal(self.token, headers.get(b"host"), headers.get(b"authorization"))
        if refusal is not None:
            raise refusal
        parts = path.decode("latin-1").strip("/").split("/")
        if parts == ["admin", "pools"] and method == "GET":
            return orjson.dumps({"pools": {name: [
                {"id": e.id, "url": e.url, "healthy": e.healthy, "in_flight": e.in_flight,
                 "drain_s": e.drain_s, "models": sorted(e.models)}
                for e in p.endpoints] for name, p in self.pools.items()}})
        if len(parts) != 4 or parts[3] not in ("endpoints", "load", "autoscaler"):
            raise APIError(404, f"Unknown path {path.decode('latin-1')}.", code="not_found")
        pool = self.pools.get(parts[2])
        if pool is None:
            raise APIError(404, f"Unknown pool `{parts[2]}`.", param="pool", code="pool_not_found")
        if parts[3] != "endpoints":
            return await self._autoscaling(pool.name, parts[3], method, query, read_body)
        if method != "PUT":
            raise APIError(405, "Use PUT with {\"endpoints\": [{\"url\": ...}, ...]}.")
        wanted = _parse_endpoints(await read_body(1 << 20))
        await self.datalayer.set_endpoints(pool, wanted)
        return orjson.dumps({"pool": pool.name, "endpoints": [e.id for e in pool.endpoints]})
