"""List + watch the pods of one pool (and its InferencePool) and publish the endpoint set.

The informer pattern, written out so its failure handling is ours to test (tests/unit/test_kube_discovery.py):
list (the full set, and the resourceVersion to watch from), then watch from that version; a 410 Gone
(the version was compacted away) relists at once; any other API error or an unreachable API server
backs off exponentially and retries, while the last published set stays in force (pods keep serving
when the control plane blips); 401/403 keep retrying too (RBAC can be fixed live) but say exactly
which permission is missing. Publishing is decoupled from the watch: a sink task takes the newest set
(bursts of pod churn coalesce into one update) so a slow consumer never stalls the watch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError, NotReadyError
from lightkube.generic_resource import create_namespaced_resource
from lightkube.resources.core_v1 import Pod

from inferstack.kube.config import KubernetesPoolConfig
from inferstack.kube.pods import DiscoveredEndpoint, PoolTarget, endpoints_of, inference_pool_target

log = logging.getLogger("inferstack.kube")

InferencePool = create_namespaced_resource("inference.networking.k8s.io", "v1", "InferencePool", "inferencepools")
Publish = Callable[[tuple[DiscoveredEndpoint, ...]], Awaitable[None]]
_WATCH_SERVER_TIMEOUT_S = 300  # the API server ends each watch after this; lightkube resumes it
# Relist at least this often: a watch on a half-open TCP connection (a NAT or load balancer dropped it
# silently) would otherwise wait forever for events that never come.
RESYNC_S = _WATCH_SERVER_TIMEOUT_S + 30


@dataclass
class Backoff:
    """Exponential retry delay: first, 2x first, ... up to cap; reset after a success."""

    first: float = 0.2
    cap: float = 10.0
    _next: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._next = min(self.cap, self._next * 2 if self._next else self.first)
        return self._next

    def reset(self) -> None:
        self._next = 0.0


@dataclass
class DiscoveryState:
    """What the gateway/EPP report: synced once a list succeeded; error = the last unresolved problem."""

    synced: bool = False
    error: str | None = None
    endpoints: tuple[DiscoveredEndpoint, ...] = ()
    relists: int = 0
    failures: int = 0   # failed attempts so far (API errors, outages), for operators and tests
    target: PoolTarget | None = None


class _Gone(Exception):
    """The watch's resourceVersion expired (410): relist."""


class _Resync(Exception):
    """The periodic relist is due (RESYNC_S)."""


def status_code(exc: BaseException) -> int | None:
    if isinstance(exc, ApiError):
        return exc.status.code
    if isinstance(exc, httpx2.HTTPStatusError):
        return exc.response.status_code
    return None


def status_message(exc: BaseException) -> str:
    """The API server's Status message (lightkube only parses it when the content type is exactly JSON)."""
    if isinstance(exc, ApiError) and exc.status.message:
        return exc.status.message
    if isinstance(exc, httpx2.HTTPStatusError):
        with contextlib.suppress(Exception):
            message = exc.response.json().get("message")
            if message:
                return str(message)
    return str(exc)


def describe(exc: BaseException, verb: str, what: str, namespace: str) -> str:
    """A precise, actionable message for an API failure."""
    code = status_code(exc)
    detail = status_message(exc)
    if code == 403:
        return (f"forbidden (RBAC): the gateway's service account may not {verb} {what} in namespace "
                f"{namespace!r}; grant it get/list/watch on pods and inferencepools (the Helm chart's Role "
                f"does): {detail}")
    if code == 401:
        return f"unauthorized: the API server rejected the credentials (token expired or wrong kubeconfig): {detail}"
    if code == 404:
        return f"{what} not found in namespace {namespace!r} (is the InferencePool CRD installed?): {detail}"
    if code is not None:
        return f"API server answered {code} to {verb} {what} in {namespace!r}: {detail}"
    return f"API server unreachable ({type(exc).__name__}: {exc}); keeping the last known endpoints"


class _PodWatchSwitch:
    """The pod watch of an InferencePool-backed pool, restarted when the pool's selection changes."""

    def __init__(self, disc: PoolDiscovery, name: str):
        self.disc = disc
        self.name = name
        self.current: PoolTarget | None = None
        self.task: asyncio.Task | None = None

    def apply(self, obj: Any) -> None:
        d = self.disc
        try:
            target = inference_pool_target(obj.to_dict(), d.cfg.target_port)
        except ValueError as exc:
            d._failed(f"InferencePool {d.namespace}/{self.name} is unusable: {exc}")
            return
        if target == self.current:
            return
        log.info("pool %s: InferencePool %s selects %s on ports %s", d.pool, self.name, dict(target.selector),
                 list(target.ports))
        if self.task is not None:
            self.task.cancel()
        self.current = target
        self.task = asyncio.create_task(d._watch_pods(target))

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


def _merge(per_pod: dict[str, tuple[DiscoveredEndpoint, ...]]) -> tuple[DiscoveredEndpoint, ...]:
    return tuple(sorted(e for eps in per_pod.values() for e in eps))


class PoolDiscovery:
    """Keeps one pool's endpoint set in step with its pods; ``publish`` receives every new set."""

    def __init__(self, pool: str, cfg: KubernetesPoolConfig, client: AsyncClient, publish: Publish,
                 backoff_cap_s: float = 10.0, resync_s: float = RESYNC_S):
        self.pool = pool
        self.resync_s = resync_s
        self.cfg = cfg
        self.client = client
        self.namespace = cfg.namespace or client.namespace or "default"
        self.publish = publish
        self.backoff_cap_s = backoff_cap_s
        self.state = DiscoveryState()
        self.first_attempt = asyncio.Event()  # set after the first list succeeded or failed
        self._pending: tuple[DiscoveredEndpoint, ...] | None = None
        self._changed = asyncio.Event()

    async def run(self) -> None:
        sink = asyncio.create_task(self._sink())
        try:
            if self.cfg.inference_pool is not None:
                await self._follow_pool(self.cfg.inference_pool)
            else:
                assert self.cfg.selector is not None and self.cfg.target_port is not None  # schema checks
                await self._watch_pods(PoolTarget(self.cfg.selector, (self.cfg.target_port,)))
        finally:
            sink.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sink

    # ---- pods -----------------------------------------------------------------------------------
    async def _watch_pods(self, target: PoolTarget) -> None:
        backoff = Backoff(cap=self.backoff_cap_s)
        while True:
            try:
                await self._list_and_watch(target, backoff)
            except _Gone:
                self.state.relists += 1
                log.info("pool %s: pod watch expired (410 Gone); relisting", self.pool)
            except _Resync:
                log.debug("pool %s: periodic relist", self.pool)
            except (httpx2.HTTPError, OSError) as exc:
                self._failed(describe(exc, "list/watch", "pods", self.namespace))
                await asyncio.sleep(backoff.next())
            except Exception as exc:  # e.g. an object lightkube cannot decode: retry, never stop discovery
                log.exception("pool %s: unexpected error watching pods", self.pool)
                self._failed(f"unexpected error watching pods: {type(exc).__name__}: {exc}")
                await asyncio.sleep(backoff.next())

    async def _list_and_watch(self, target: PoolTarget, backoff: Backoff) -> None:
        labels = dict(target.selector)
        listing = self.client.list(Pod, namespace=self.namespace, labels=labels)
        # each pod's endpoints: an event recomputes only its own pod's (a burst is not O(pods^2) checks)
        per_pod = {p.metadata.name: endpoints_of([p], target, self.cfg.scheme) async for p in listing}
        try:
            version: str | None = listing.resourceVersion  # the collection's version: watch from there
        except NotReadyError:
            version = None  # an empty version from an odd server: the watch replays the current state
        self.state.synced, self.state.error, self.state.target = True, None, target
        self.first_attempt.set()
        backoff.reset()
        self._set(_merge(per_pod))
        stream = self.client.watch(Pod, namespace=self.namespace, labels=labels, resource_version=version,
                                   server_timeout=_WATCH_SERVER_TIMEOUT_S)
        try:
            async with asyncio.timeout(self.resync_s):
                await self._consume(stream, per_pod, target)
        except TimeoutError:
            raise _Resync from None
        except httpx2.HTTPStatusError as exc:  # an ERROR event (ApiError) or a 410 answer to a re-watch
            if status_code(exc) == 410:
                raise _Gone from exc
            raise

    async def _consume(self, stream: Any, per_pod: dict[str, tuple[DiscoveredEndpoint, ...]],
                       target: PoolTarget) -> None:
        async for kind, pod in stream:
            if kind == "DELETED":
                per_pod.pop(pod.metadata.name, None)
            elif kind in ("ADDED", "MODIFIED"):
                per_pod[pod.metadata.name] = endpoints_of([pod], target, self.cfg.scheme)
            else:
                continue  # BOOKMARK: only moves the version
            self._set(_merge(per_pod))

    # ---- InferencePool --------------------------------------------------------------------------
    async def _follow_pool(self, name: str) -> None:
        """Watch the InferencePool; (re)start the pod watch whenever its selector/ports change."""
        backoff = Backoff(cap=self.backoff_cap_s)
        switch = _PodWatchSwitch(self, name)
        try:
            while True:
                try:
                    await self._get_and_watch_pool(name, switch, backoff)
                except (httpx2.HTTPError, OSError) as exc:
                    if status_code(exc) == 410:
                        continue
                    self._failed(describe(exc, "get/watch", f"InferencePool {name!r}", self.namespace))
                    await asyncio.sleep(backoff.next())
                except Exception as exc:  # as in _watch_pods: retry, never stop following the pool
                    log.exception("pool %s: unexpected error watching InferencePool %s", self.pool, name)
                    self._failed(f"unexpected error watching InferencePool {name!r}: {type(exc).__name__}: {exc}")
                    await asyncio.sleep(backoff.next())
        finally:
            await switch.close()

    async def _get_and_watch_pool(self, name: str, switch: _PodWatchSwitch, backoff: Backoff) -> None:
        """One get + watch of the pool object; returns at the periodic resync (the caller gets it again)."""
        switch.apply(await self.client.get(InferencePool, name, namespace=self.namespace))
        backoff.reset()
        stream = self.client.watch(InferencePool, namespace=self.namespace, fields={"metadata.name": name},
                                   server_timeout=_WATCH_SERVER_TIMEOUT_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.resync_s):
                async for kind, obj in stream:
                    if obj.metadata.name != name:
                        continue
                    if kind == "DELETED":
                        self._failed(f"InferencePool {self.namespace}/{name} was deleted; "
                                     "keeping the last known endpoints")
                    elif kind in ("ADDED", "MODIFIED"):
                        switch.apply(obj)

    # ---- publishing -----------------------------------------------------------------------------
    def _failed(self, message: str) -> None:
        if message != self.state.error:
            log.error("pool %s: %s", self.pool, message)
        self.state.error = message
        self.state.failures += 1
        self.first_attempt.set()

    def _set(self, endpoints: tuple[DiscoveredEndpoint, ...]) -> None:
        if endpoints == self.state.endpoints:
            return
        self.state.endpoints = endpoints
        self._pending = endpoints
        self._changed.set()

    async def _sink(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            endpoints, self._pending = self._pending, None
            if endpoints is None:
                continue
            try:
                await self.publish(endpoints)
            except Exception:  # a consumer bug must not stop discovery; the next change retries
                log.exception("pool %s: applying discovered endpoints failed", self.pool)
