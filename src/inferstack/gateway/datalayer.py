"""Per-endpoint state: scraped engine metrics, in-flight counts, health, KV events.

Background tasks keep this fresh (metrics every ~50 ms, health every few seconds, KV events as
they arrive); request handling only reads it through `Pool.snapshot()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
import orjson

from inferstack.config.schema import EndpointConfig, GatewayConfig, PoolConfig
from inferstack.gateway.enginedrain import EngineDrain, engine_full, pool_drain_s
from inferstack.gateway.routing import EndpointView, PoolSnapshot, Router, build_router
from inferstack.gateway.routing.disagg import PDRouter, build_pd_router, pd_free_slots
from inferstack.gateway.routing.state import RoutingState
from inferstack.gateway.upstream import UpstreamPool, finished
from inferstack.telemetry import promtext

if TYPE_CHECKING:
    from inferstack.gateway.discovery import KubeDiscovery

log = logging.getLogger("inferstack.gateway")

# Engine metric families (vLLM / inferstack, SGLang) that feed the router.
_QUEUE = {"vllm:num_requests_waiting", "sglang:num_queue_reqs"}
_RUNNING = {"vllm:num_requests_running", "sglang:num_running_reqs"}
_KV = {"vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage"}
_LORA = "vllm:lora_requests_info"
# how many requests the running batch takes at once: our engines; SGLang versions that export it
_BATCH_CAP = {"inferstack:max_num_seqs", "sglang:max_running_requests"}
_BUSY = "inferstack:busy_seconds_total"   # cumulative step time: the autoscaler's duty cycle is its rate
_FINISHED = "vllm:request_success_total"  # finished requests (all reasons): the engine's drain (`EngineDrain`)
_WANTED = frozenset({*_QUEUE, *_RUNNING, *_KV, _LORA, *_BATCH_CAP, _BUSY, _FINISHED})
_NO_METRICS_RETRY_S = 5.0


@dataclass(slots=True)
class ScrapedMetrics:
    queue: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    adapters_active: frozenset[str] = frozenset()
    adapters_waiting: frozenset[str] = frozenset()
    max_lora: int = 0
    batch_cap: int = 0
    reports_queue: bool = True  # a waiting or running family is present (not only KV use)
    busy_seconds: float | None = None  # cumulative; None where the engine does not export it
    finished: float | None = None      # cumulative finished requests; None where not exported


_SIGNALS = frozenset({*_QUEUE, *_RUNNING, *_KV})
_LABELS_KEPT = 256  # parsed label sets an endpoint's scrapes keep (`parse_engine_metrics`): its series are few


def parse_engine_metrics(text: str, label_cache: dict[str, promtext.Labels] | None = None) -> ScrapedMetrics | None:
    """Pick the router's signals out of Prometheus text; None if no known family is present. ``label_cache``:
    the label sets an endpoint's earlier scrapes parsed (label text -> labels), kept by the caller: the same
    series come back every scrape, and parsing their labels again was most of a scrape's cost."""
    if label_cache is not None and len(label_cache) > _LABELS_KEPT:
        label_cache.clear()  # LoRA info series change labels as adapters come and go: never unbounded
    try:
        families = promtext.parse(text, 0.0, names=_WANTED, label_cache=label_cache).by_name
    except ValueError:
        return None
    if families.keys().isdisjoint(_SIGNALS):
        return None

    def total(names: Iterable[str]) -> float:
        return sum(v for n in names if n in families for v in families[n].values())

    m = ScrapedMetrics(queue=total(_QUEUE), running=total(_RUNNING),
                       kv_usage=max((v for n in _KV if n in families for v in families[n].values()), default=0.0),
                       batch_cap=int(total(_BATCH_CAP)),
                       reports_queue=not families.keys().isdisjoint(_QUEUE | _RUNNING),
                       busy_seconds=total((_BUSY,)) if _BUSY in families else None,
                       finished=total((_FINISHED,)) if _FINISHED in families else None)
    lora = families.get(_LORA)
    if lora:  # several series over time: the newest (its value is a timestamp) is the current state
        labels = dict(max(lora, key=lambda k: lora[k]))
        m.adapters_active = frozenset(a for a in labels.get("running_lora_adapters", "").split(",") if a)
        m.adapters_waiting = frozenset(a for a in labels.get("waiting_lora_adapters", "").split(",") if a)
        with contextlib.suppress(ValueError):
            m.max_lora = int(labels.get("max_lora", "0") or 0)
    return m


class Endpoint:
    """One upstream engine: its HTTP session, scraped metrics and the gateway's own counters."""

    def __init__(self, url: str, name: str | None, api_key: str | None, kv_events: str | None,
                 max_concurrency: int | None, kv_transfer: str | None = None):
        self.url = url
        self.kv_transfer = kv_transfer   # HOST:PORT other replicas READ its cached prefixes from
        self.id = name or urlsplit(url).netloc
        self.api_key = api_key
        self.kv_events = kv_events
        self.max_concurrency = max_concurrency
        self.metrics: ScrapedMetrics | None = None
        self.metrics_at = 0.0
        self.drain = EngineDrain()
        self.drain_s: float | None = None  # `drain.seconds_per_completion()` as of the latest scrape
        self.metrics_supported = True
        self.metrics_text = b""   # the last /metrics body: an unchanged one is not parsed again
        self.metrics_labels: dict[str, promtext.Labels] = {}  # label sets its scrapes parsed (`parse_engine_metrics`)
        self.in_flight = 0
        self.held = 0  # requests routed here that wait for its room at the gateway (`endpointflow`)
        self.active_ok = True
        self.failures = 0
        self.ejected_until = 0.0
        self.models: set[str] = set()
        self.tasks: list[asyncio.Task] = []  # KV-event subscription
        self.session: aiohttp.ClientSession | None = None  # health checks, /tokenize
        self.upstream: UpstreamPool | None = None  # completions (hot path)
        self.scrape: UpstreamPool | None = None  # /metrics, with a short read timeout
        self.scrape_head = b""  # its GET /metrics request head, built once (`UpstreamPool.head`)
        auth = [(b"authorization", f"Bearer {api_key}".encode())] if api_key else []
        self.request_headers: list[tuple[bytes, bytes]] = [(b"content-type", b"application/json"), *auth]
        self.id_bytes = self.id.encode()
        self._heads: dict[bytes, bytes] = {}

    def post_head(self, path: bytes, request_id: bytes) -> bytes:
        """The head of a completion request to this endpoint (`UpstreamPool.send_request`): request line,
        Host and `request_headers` built once per path, then the request's id."""
        head = self._heads.get(path)
        if head is None:
            head = self._heads[path] = self.upstream.head(b"POST", path, self.request_headers)
        return b"%sx-request-id: %s\r\n" % (head, request_id)

    @property
    def healthy(self) -> bool:
        return self.active_ok and time.monotonic() >= self.ejected_until

    def view(self, now: float) -> EndpointView:
        """This endpoint at ``now`` (a `time.monotonic()` reading), for routing and flow control."""
        m = self.metrics
        healthy = self.active_ok and now >= self.ejected_until  # `healthy` without another clock reading
        if m is None:
            return EndpointView(self.id, in_flight=self.in_flight, healthy=healthy,
                                max_concurrency=self.max_concurrency, held=self.held)
        return EndpointView(self.id, m.queue, m.running, m.kv_usage, now - self.metrics_at, True,
                            self.in_flight, healthy, self.max_concurrency, m.adapters_active,
                            m.adapters_waiting, m.max_lora, m.batch_cap, m.reports_queue,
                            self.drain_s, self.held)

    def request_failed(self, cfg: GatewayConfig) -> None:
        self.failures += 1
        if self.failures >= cfg.eject_after_failures:
            self.ejected_until = time.monotonic() + cfg.eject_s
            log.warning("endpoint %s ejected for %.1fs after %d failures", self.id, cfg.eject_s, self.failures)

    def request_succeeded(self) -> None:
        self.failures = 0


def pool_router(cfg: PoolConfig, gw: GatewayConfig, endpoint_ids: list[str], state: RoutingState,
                custom_profiles: dict | None = None) -> Router:
    """The router of a pool (shared by the live gateway and `inferstack sim`); ``endpoint_ids`` are in
    the order of ``cfg.endpoints`` and ``state`` is fresh (the simulator passes a seeded rng)."""
    state.block_chars = gw.prefix_index.block_chars
    state.approx.capacity = gw.prefix_index.capacity_per_endpoint
    if cfg.pd is not None and cfg.pd.enabled:  # prefill/decode disaggregation (routing/disagg.py)
        return build_pd_router(cfg.routing, cfg.pd.prefill_routing or cfg.routing,
                               {i: e.role for i, e in zip(endpoint_ids, cfg.endpoints, strict=True)},
                               cfg.pd.threshold_tokens, state, custom_profiles,
                               cfg.precise_prefix.block_size if cfg.precise_prefix else 16,
                               cfg.pd.max_prefill_queue)
    return build_router(cfg.routing, state, custom_profiles)


@dataclass
class Pool:
    name: str
    config: PoolConfig
    endpoints: list[Endpoint]
    router: Router
    gateway: GatewayConfig
    models: set[str] = field(default_factory=set)
    discovered: bool = False

    @classmethod
    def from_config(cls, name: str, cfg: PoolConfig, gw: GatewayConfig,
                    custom_profiles: dict | None = None, rng: random.Random | None = None) -> Pool:
        """``rng``: the router's random choices (tie-breaks, power-of-two); None: seeded from the OS."""
        eps = [Endpoint(e.url, e.name, e.api_key, e.kv_events, cfg.max_concurrency, e.kv_transfer)
               for e in cfg.endpoints]
        router = pool_router(cfg, gw, [ep.id for ep in eps], RoutingState(rng=rng or random.Random()),
                             custom_profiles)
        return cls(name, cfg, eps, router, gw, set(cfg.models))

    def snapshot(self, exclude: frozenset[str] = frozenset()) -> PoolSnapshot:
        now = time.monotonic()
        fc = self.gateway.flow_control
        views = [e.view(now) for e in self.endpoints if e.id not in exclude] if exclude else \
            [e.view(now) for e in self.endpoints]
        return PoolSnapshot(views, now, self.gateway.metrics_stale_s, fc.queue_threshold, fc.kv_threshold,
                            queue_wait_s=fc.queue_wait_s)

    def room(self, ep: Endpoint) -> int:
        """Requests ``ep`` may take now (`PoolSnapshot.room`): the per-endpoint hold's free slots."""
        now = time.monotonic()
        fc = self.gateway.flow_control
        return PoolSnapshot((), now, self.gateway.metrics_stale_s, fc.queue_threshold, fc.kv_threshold,
                            queue_wait_s=fc.queue_wait_s).room(ep.view(now))

    def holds_at_endpoints(self) -> bool:
        """Requests routed to an endpoint without room wait for it (`endpointflow`): every pool but a
        prefill/decode one, whose legs' rooms the pool-level check keeps together (`pd_free_slots`)."""
        return not isinstance(self.router, PDRouter)

    def free_slots(self, snap: PoolSnapshot | None = None) -> int:
        """How many queued requests may be released now (flow control), over ``snap`` (None: a new snapshot):
        the endpoints' positive rooms, since a request routed to a full endpoint waits for it there
        (`holds_at_endpoints`); a prefill/decode pool's signed sums (`pd_free_slots`)."""
        if snap is None:
            snap = self.snapshot()
        if isinstance(self.router, PDRouter):
            return pd_free_slots(snap, self.router.roles, conditional=self.router.max_prefill_queue is not None)
        return snap.free_slots(positive=True)

    def engines_pace(self) -> float | None:
        """The pool's seconds per release from its healthy engines' own drain (flow control's prior); only
        engines that completed a request while full count (before that an engine's drain is a lower bound)."""
        return pool_drain_s([e.drain_s if e.drain.measured() else None for e in self.endpoints if e.healthy])

    def engines_full(self) -> bool:
        """Every healthy engine reports itself full (`enginedrain.engine_full`: requests waiting, or its running
        batch at its cap); False while one has no metrics (flow control's hold, `FairQueue.engines_full`)."""
        healthy = [e for e in self.endpoints if e.healthy]
        return bool(healthy) and all(e.metrics is not None and engine_full(e.metrics.queue, e.metrics.running,
                                                                           e.metrics.batch_cap) for e in healthy)

    def by_id(self, endpoint_id: str) -> Endpoint:
        for e in self.endpoints:
            if e.id == endpoint_id:
                return e
        raise KeyError(endpoint_id)


class DataLayer:
    """Owns the background tasks that refresh every pool's endpoints."""

    def __init__(self, pools: list[Pool], cfg: GatewayConfig, on_refresh=None):
        self.pools = pools
        self.cfg = cfg
        self.on_refresh = on_refresh  # called with a pool after its metrics refresh
        self._tasks: list[asyncio.Task] = []
        self.discovery: KubeDiscovery | None = None  # pools with `kubernetes:` (gateway/discovery.py)

    def _open(self, pool: Pool, ep: Endpoint) -> None:
        ep.session = aiohttp.ClientSession(
            ep.url,
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.cfg.connect_timeout_s),
            auto_decompress=False,
        )
        ep.upstream = UpstreamPool(ep.url, self.cfg.connect_timeout_s, self.cfg.request_timeout_s)
        ep.scrape = UpstreamPool(ep.url, self.cfg.connect_timeout_s, 1.0, max_idle=2)
        ep.scrape_head = ep.scrape.head(b"GET", b"/metrics", _auth_raw(ep))
        if ep.kv_events:
            from inferstack.gateway.kvevents import subscribe

            ep.tasks.append(asyncio.create_task(subscribe(ep, pool.router.state)))

    async def _close(self, ep: Endpoint) -> None:
        for t in ep.tasks:
            t.cancel()
        if ep.session is not None:
            await ep.session.close()
        if ep.upstream is not None:
            ep.upstream.close()
            ep.scrape.close()

    async def start(self) -> None:
        for pool in self.pools:
            for ep in pool.endpoints:
                self._open(pool, ep)
        # one discovery + health round before serving, so /v1/models is right from the start
        await asyncio.gather(*(self._health_once(p, e) for p in self.pools for e in p.endpoints))
        if any(p.config.kubernetes is not None for p in self.pools):
            from inferstack.gateway.discovery import (
                KubeDiscovery,  # loads the Kubernetes client only when used
            )

            self.discovery = KubeDiscovery(self)
            await self.discovery.start()
        for pool in self.pools:
            self._tasks.append(asyncio.create_task(self._scrape_loop(pool)))
            self._tasks.append(asyncio.create_task(self._health_loop(pool)))

    async def set_endpoints(self, pool: Pool, wanted: list[EndpointConfig]) -> None:
        """Make ``pool``'s endpoints exactly ``wanted`` (desired state, idempotent). Endpoints that
        stay keep their counters and connections; removed ones leave the routing state too."""
        by_url = {e.url: e for e in pool.endpoints}
        new: list[Endpoint] = []
        fresh: list[Endpoint] = []
        for w in wanted:
            ep = by_url.pop(w.url, None)
            if ep is None:
                ep = Endpoint(w.url, w.name, w.api_key, w.kv_events, pool.config.max_concurrency, w.kv_transfer)
                self._open(pool, ep)
                fresh.append(ep)
            new.append(ep)
        await asyncio.gather(*(self._health_once(pool, e) for e in fresh))
        pool.endpoints = new  # one assignment: readers see the old or the new list, never a mix
        for gone in by_url.values():
            pool.router.state.forget_endpoint(gone.id)
            await self._close(gone)

    async def stop(self) -> None:
        if self.discovery is not None:
            await self.discovery.stop()
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        for pool in self.pools:
            for ep in pool.endpoints:
                await self._close(ep)

    async def _scrape_one(self, ep: Endpoint, now: float) -> None:
        """One endpoint's scrape on a connection of its own (made if none is kept): `_scrape_round`'s slow path."""
        if not _scrape_due(ep, now):
            return
        try:
            conn = await ep.scrape.request(b"GET", b"/metrics", _auth_raw(ep), b"")
            try:
                body = await conn.read()
            finally:
                conn.release()
        except OSError:
            return  # metrics age grows; stale endpoints count as saturated
        _take_scrape(ep, now, conn.status, body)

    async def _scrape_round(self, pool: Pool, now: float) -> None:
        """Every endpoint's /metrics at once: each request written on a kept connection (built once), the answers
        taken as they come in this one coroutine (`upstream.finished`); an endpoint with no kept connection (the
        first round, or after a failure) is scraped by `_scrape_one` beside them. A scrape costs the gateway every
        50 ms per endpoint, under load too: no task per endpoint, no request head built per scrape."""
        due = [ep for ep in pool.endpoints if _scrape_due(ep, now)]
        sent = [(ep, ep.scrape.send_now(ep.scrape_head, b"")) for ep in due]
        kept = [conn for _, conn in sent if conn is not None]
        if len(kept) < len(sent):
            await asyncio.gather(self._take_sent(sent, kept, now),
                                 *(self._scrape_one(ep, now) for ep, conn in sent if conn is None))
        else:
            await self._take_sent(sent, kept, now)

    @staticmethod
    async def _take_sent(sent: list[tuple[Endpoint, Any]], kept: list[Any], now: float) -> None:
        by_conn = {id(conn): ep for ep, conn in sent if conn is not None}
        async for conn in finished(kept):
            if conn.error is not None:
                conn.close()  # metrics age grows; stale endpoints count as saturated
                continue
            status, body = conn.status, conn.body_now()
            conn.release()
            _take_scrape(by_conn[id(conn)], now, status, body or b"")

    async def _scrape_loop(self, pool: Pool) -> None:
        interval = self.cfg.scrape_interval_s
        while True:
            start = time.monotonic()
            try:
                await self._scrape_round(pool, start)
                if self.on_refresh is not None:
                    self.on_refresh(pool)
            except Exception:
                # this loop feeds routing and flow control: an unexpected error must cost one round,
                # never the loop (a dead loop left every endpoint's metrics stale for good)
                log.exception("metrics refresh of pool %s failed", pool.name)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))

    async def _health_once(self, pool: Pool, ep: Endpoint) -> None:
        try:
            async with ep.session.get("/v1/models", timeout=aiohttp.ClientTimeout(total=2.0),
                                      headers=_auth(ep)) as r:
                body = await r.read()
                ok = r.status == 200
        except (TimeoutError, aiohttp.ClientError, OSError):
            ok, body = False, b""
        if ok:
            with contextlib.suppress(orjson.JSONDecodeError, TypeError, AttributeError):
                ep.models = {m["id"] for m in orjson.loads(body).get("data", []) if isinstance(m, dict) and "id" in m}
            if not pool.config.models:
                pool.models |= ep.models
                pool.discovered = True
            if not ep.active_ok:
                log.info("endpoint %s is healthy again", ep.id)
                ep.ejected_until = 0.0
                ep.failures = 0
        elif ep.active_ok:
            log.warning("endpoint %s failed its health check", ep.id)
        ep.active_ok = ok

    async def _health_loop(self, pool: Pool) -> None:
        while True:
            await asyncio.sleep(self.cfg.health_interval_s)
            await asyncio.gather(*(self._health_once(pool, e) for e in pool.endpoints))


def _scrape_due(ep: Endpoint, now: float) -> bool:
    """An endpoint without metrics (404, or not Prometheus text) is asked again only every few seconds."""
    return ep.metrics_supported or now - ep.metrics_at >= _NO_METRICS_RETRY_S


def _take_scrape(ep: Endpoint, now: float, status: int, body: bytes) -> None:
    """A scrape's answer into the endpoint: its metrics (an unchanged text is not parsed again) and drain."""
    if status != 200:
        ep.metrics_supported = False
        ep.metrics_at = now
        return
    if body == ep.metrics_text and ep.metrics is not None:   # an idle engine: same text, same values
        m = ep.metrics
    else:
        m = parse_engine_metrics(body.decode("utf-8", "replace"), ep.metrics_labels)
        ep.metrics_text = body if m is not None else b""
    if m is None:
        ep.metrics_supported = False
        ep.metrics, ep.metrics_at = None, now
    else:
        ep.metrics_supported = True
        ep.metrics, ep.metrics_at = m, time.monotonic()
        ep.drain.observe(ep.metrics_at, m.finished, engine_full(m.queue, m.running, m.batch_cap))
        ep.drain_s = ep.drain.seconds_per_completion()


def _auth_raw(ep: Endpoint) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", f"Bearer {ep.api_key}".encode())] if ep.api_key else []


def _auth(ep: Endpoint) -> dict[str, str]:
    return {"authorization": f"Bearer {ep.api_key}"} if ep.api_key else {}
