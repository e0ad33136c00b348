"""The gateway's half of prefill/decode disaggregation: the prefill leg and its metrics.

For a request the PD router split (`routing/disagg.py`), the prefill leg goes to the prefill
endpoint non-streamed with ``max_tokens: 1`` and ``kv_transfer_params: {"do_remote_decode": true}``;
its response says where the KV is held, and those params go into the client's request, which the
gateway then proxies to the decode endpoint as usual (streamed or not, as the client asked). If the
prefill leg fails the decode endpoint gets the plain request and recomputes the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from prometheus_client import CollectorRegistry, Counter, Histogram

from inferstack.config.schema import GatewayConfig
from inferstack.gateway.datalayer import Endpoint, Pool
from inferstack.gateway.routing.disagg import PDResult

log = logging.getLogger("inferstack.gateway")

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
# Sampling fields that make no sense (or fail validation) for a one-token prefill leg.
_DROP = ("stream_options", "max_completion_tokens", "min_tokens", "n", "best_of")


class PDMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter("inferstack_gateway_pd_decisions", "PD routing decisions by outcome "
                                 "(remote_prefill, local_cached, local_no_prefill, local_no_decode, local_both, "
                                 "local_prefill_busy).",
                                 ("pool", "outcome"), registry=registry)
        self.prefill_seconds = Histogram("inferstack_gateway_pd_prefill_seconds",
                                         "Duration of successful prefill legs.", ("pool", "endpoint"),
                                         buckets=_BUCKETS, registry=registry)
        self.fallbacks = Counter("inferstack_gateway_pd_fallbacks", "Prefill legs that failed; the decode "
                                 "endpoint recomputed the prompt.", ("pool", "reason"), registry=registry)


def prefill_body(req: dict[str, Any]) -> bytes:
    """The prefill leg: the client's request, non-streamed, one output token, holding its KV."""
    leg = {k: v for k, v in req.items() if k not in _DROP}
    leg["stream"] = False
    leg["max_tokens"] = 1
    leg["kv_transfer_params"] = {"do_remote_decode": True}
    return orjson.dumps(leg)


def transfer_params(status: int, body: bytes) -> dict[str, Any] | str:
    """The prefill response's ``kv_transfer_params``, or why there are none."""
    if status != 200:
        return f"status_{status}"
    try:
        params = orjson.loads(body).get("kv_transfer_params")
    except (orjson.JSONDecodeError, AttributeError):
        return "bad_response"
    if not isinstance(params, dict) or not params.get("do_remote_prefill"):
        return "no_params"
    return params


class PDLegs:
    def __init__(self, registry: CollectorRegistry, cfg: GatewayConfig):
        self.metrics = PDMetrics(registry)
        self.cfg = cfg

    async def decode_payload(self, pool: Pool, result: PDResult, path: bytes, payload: bytes,
                             rid: bytes) -> bytes:
        """Count the decision; for a split request run the prefill leg and return the decode leg's
        body (the client's request plus the KV's whereabouts), else ``payload`` unchanged."""
        self.metrics.decisions.labels(pool.name, result.outcome.value).inc()
        pview = result.others.get("prefill")
        if pview is None or pool.config.pd is None:
            return payload
        pep = pool.by_id(pview.id)
        req = orjson.loads(payload)
        t0 = time.perf_counter()
        pep.in_flight += 1
        try:
            outcome = await asyncio.wait_for(self._leg(pep, path, prefill_body(req), rid),
                                             pool.config.pd.prefill_timeout_s)
        except TimeoutError:
            outcome = "timeout"
        except OSError as exc:
            outcome = f"connection_{type(exc).__name__}"
        finally:
            pep.in_flight -= 1
        if isinstance(outcome, str):
            pep.request_failed(self.cfg)
            reason = "connection" if outcome.startswith("connection") else outcome
            self.metrics.fallbacks.labels(pool.name, reason).inc()
            log.warning("request %s: prefill leg on %s failed (%s); decode endpoint %s recomputes",
                        rid.decode("latin-1"), pep.id, outcome, result.endpoint.id)
            return payload
        pep.request_succeeded()
        self.metrics.prefill_seconds.labels(pool.name, pep.id).observe(time.perf_counter() - t0)
        req["kv_transfer_params"] = outcome
        return orjson.dumps(req)

    @staticmethod
    async def _leg(ep: Endpoint, path: bytes, body: bytes, rid: bytes) -> dict[str, Any] | str:
        conn = await ep.upstream.send_request(ep.post_head(path, rid), body)
        try:
            data = await conn.read()
        except BaseException:
            conn.close()
            raise
        conn.release()
        return transfer_params(conn.status, data)
