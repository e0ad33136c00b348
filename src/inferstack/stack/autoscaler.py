"""The local actuator of `inferstack up --autoscale`: sample the gateway, decide, start and drain replicas.

Every `interval_s` (every 0.25 s while the pool has no replica, so a held request is not kept waiting
for the next tick) the loop reads the pool's load from the gateway (`GET /admin/pools/default/load`),
differences it into a `PoolSample` (`autoscale.load.LoadSampler`, as the Kubernetes actuator and the
simulator do), and asks `PolicyAutoscaler` (the policy plus the
min/max/idle bounds) for the desired replica count, starting replicas included. Then it acts:

- up: spawn `engine-N` processes on free ports; each joins the gateway's pool when its ready file
  appears (the supervisor's `Child.wait_ready`), never before;
- down: cancel replicas still starting first, then drain the newest ready one: out of the pool (no
  new requests), wait until the engine reports nothing running or waiting (bounded by
  `drain_timeout_s`), then SIGTERM by PID (the engine's server finishes what it has), SIGKILL after
  `stop_timeout_s`.

After each decision it reports the status (`PUT /admin/pools/default/autoscaler`), which the gateway
exports as `inferstack_autoscaler_*`. Crashed replicas stay the supervisor's business (restart with
backoff); the autoscaler counts them as replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx

from inferstack.autoscale.config import AutoscaleSettings
from inferstack.autoscale.decision import objectives_of
from inferstack.autoscale.driver import PolicyAutoscaler
from inferstack.autoscale.load import BOTH, LoadSampler, LoadSnapshot
from inferstack.autoscale.metrics import AutoscalerStatus
from inferstack.gateway.datalayer import parse_engine_metrics
from inferstack.sim.autoscale import MetricSample
from inferstack.stack.children import Child, ChildFailed, ChildState

POOL = "default"
ZERO_TICK_S = 0.25


@dataclass
class ReplicaHooks:
    """What the autoscaler needs from the supervisor."""

    engines: list[Child]                        # the supervisor's replicas (the READY ones are in the pool)
    make: Callable[[], Child]                   # a new replica child, not yet spawned
    update_pool: Callable[[], Awaitable[None]]  # send the READY engines to the gateway
    event: Callable[[str], None]                # one line for the user


class LocalAutoscaler:
    def __init__(self, cfg: AutoscaleSettings, hooks: ReplicaHooks, client: httpx.AsyncClient, gateway_url: str,
                 token: str, ready_timeout_s: float, stop_timeout_s: float) -> None:
        self.cfg = cfg
        self.hooks = hooks
        self.client = client
        self.admin = gateway_url.rstrip("/") + f"/admin/pools/{POOL}"
        self.headers = {"authorization": f"Bearer {token}"}
        self.ready_timeout_s = ready_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.driver = PolicyAutoscaler(cfg.make_policy(), cfg.bounds(), cfg.interval_s, cfg.window_samples)
        # scale to zero needs a window that spans the idle period (Bounds.apply looks back idle_s)
        keep = cfg.window_samples + (math.ceil(cfg.idle_s / ZERO_TICK_S) if cfg.min_replicas == 0 else 0)
        self.window: deque[MetricSample] = deque(maxlen=keep)
        self.sampler = LoadSampler()
        self.status = AutoscalerStatus(POOL, "both", self.driver.policy.name)
        self.starting: dict[Child, asyncio.Task[None]] = {}
        self.draining: dict[Child, asyncio.Task[None]] = {}

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            zero = not self.hooks.engines and not self.starting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), ZERO_TICK_S if zero else self.cfg.interval_s)
            if not stop.is_set():
                await self.tick()

    async def tick(self) -> None:
        try:
            params: dict[str, float] = {"since": self.sampler.since}
            if (obj := objectives_of(self.driver.policy)) is not None:
                params |= {"ttft": obj.ttft_s, "tpot": obj.tpot_s}   # the policy's misses counted at the gateway
            r = await self.client.get(self.admin + "/load", params=params, headers=self.headers, timeout=5.0)
            r.raise_for_status()
            snap = LoadSnapshot.from_json(r.json())
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return  # the gateway is restarting: decide on the next tick, with fresh numbers
        self.window.append(MetricSample({POOL: self.sampler.sample(snap, len(self.starting))[BOTH]}))
        current = len(self.hooks.engines) + len(self.starting)
        desired = self.driver.desired(list(self.window), {POOL: current})[POOL]
        _, _, decision = self.driver.decisions.pop()  # the report is the status' counters: keep memory bounded
        self.status.decided(decision)
        if desired != current:
            self.hooks.event(f"autoscaler ({decision.policy}): {current} -> {desired} replicas: {decision.reason}")
        for _ in range(desired - current):
            self._scale_up()
        for _ in range(current - desired):
            await self._scale_down()
        await self.report()

    async def report(self) -> None:
        s = self.status
        s.ready = sum(1 for c in self.hooks.engines if c.state == ChildState.READY)
        s.starting, s.draining = len(self.starting), len(self.draining)
        with contextlib.suppress(httpx.HTTPError):
            await self.client.put(self.admin + "/autoscaler", json=s.to_json(), headers=self.headers, timeout=5.0)

    def _scale_up(self) -> None:
        child = self.hooks.make()
        child.spawn(0)
        self.starting[child] = asyncio.create_task(self._join(child))

    async def _join(self, child: Child) -> None:
        try:
            await child.wait_ready(self.ready_timeout_s, self.client)
        except ChildFailed as e:
            self.hooks.event(str(e))
            await child.stop(self.stop_timeout_s)
            return
        finally:
            self.starting.pop(child, None)
        took = time.monotonic() - child.started_at
        self.hooks.engines.append(child)
        await self.hooks.update_pool()
        self.hooks.event(f"{child.spec.name} joined the pool after {took:.1f}s (pid {child.pid}, {child.urls[0]})")
        await self.report()

    async def _scale_down(self) -> None:
        if self.starting:  # the newest order first: it serves nobody yet
            child, task = self.starting.popitem()
            task.cancel()
            await child.stop(self.stop_timeout_s)
            return
        ready = [c for c in self.hooks.engines if c.state == ChildState.READY]
        if not ready:
            return
        child = ready[-1]
        self.hooks.engines.remove(child)
        await self.hooks.update_pool()  # no new request goes there from now on
        self.draining[child] = asyncio.create_task(self._drain(child))

    async def _drain(self, child: Child) -> None:
        try:
            idle = await self._wait_idle(child)
            self.hooks.event(f"{child.spec.name} drained ({'idle' if idle else 'drain timeout'}); stopping pid "
                             f"{child.pid}")
            await child.stop(self.stop_timeout_s)
        finally:
            self.draining.pop(child, None)

    async def _wait_idle(self, child: Child) -> bool:
        """Until the engine reports nothing running or waiting twice in a row (a request routed just
        before the pool update may still be on its way), or the drain timeout."""
        deadline = time.monotonic() + self.cfg.drain_timeout_s
        quiet = 0
        while time.monotonic() < deadline and child.alive():
            try:
                r = await self.client.get(child.urls[0] + "/metrics", timeout=2.0)
                m = parse_engine_metrics(r.text)
            except httpx.HTTPError:
                m = None
            quiet = quiet + 1 if m is not None and m.running + m.queue == 0 else 0
            if quiet >= 2:
                return True
            await asyncio.sleep(0.1)
        return not child.alive()

    async def aclose(self) -> None:
        """Stop what the autoscaler still owns (replicas starting or draining)."""
        tasks = {**self.starting, **self.draining}
        for task in tasks.values():
            task.cancel()
        for child, task in tasks.items():
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await child.stop(self.stop_timeout_s)
