"""Host N emulated engines in one process (`inferstack engine serve --emulate P --emulate-count N`).

Each engine is the real EngineCore (scheduler, block pool, prefix cache) with the emulated executor,
behind its own HTTP server on an OS-chosen port; the ready file lists every URL. The servers share
one event loop on a worker thread, so the main thread owns the signals: SIGTERM drains all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any

import aiohttp

from inferstack.engine.config import EngineConfig
from inferstack.engine.scheduler import SchedulerOutput
from inferstack.sim.profile import Profile

if TYPE_CHECKING:
    from inferstack.engine.async_engine import AsyncEngine

log = logging.getLogger(__name__)


async def _wait_ready(urls: list[str], tasks: list[asyncio.Future], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as s:
        for url in urls:
            while True:
                if any(t.done() for t in tasks):
                    raise RuntimeError("an emulated engine stopped before it was ready (see the log above)")
                try:
                    async with s.get(url + "/ready", timeout=aiohttp.ClientTimeout(total=2)) as r:
                        if r.status == 200:
                            break
                except (aiohttp.ClientError, TimeoutError):
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{url} not ready within {timeout_s:g} s")
                await asyncio.sleep(0.05)


class _Fleet:
    """The engines of one `serve_fleet` call and the event loop serving them (on a worker thread)."""

    def __init__(self, config: EngineConfig, profile: Profile, count: int, options: Any,
                 timer: Callable[[SchedulerOutput], float] | None) -> None:
        self.config, self.profile, self.options, self.timer = config, profile, options, timer
        self.engines: list[AsyncEngine] = []
        self.urls: list[str | None] = [None] * count
        self.codes: list[int] = []
        self.loop: asyncio.AbstractEventLoop | None = None
        self.stop: asyncio.Event | None = None

    def factory(self, n: int) -> AsyncEngine:
        """Engine ``n`` of the fleet (engines load concurrently on threads: ``n`` is passed, never counted)."""
        from inferstack.engine.async_engine import AsyncEngine
        from inferstack.engine.executor.emulated import build_emulated_engine

        # Like --port, a fixed --kv-transfer-port applies to the first engine; the others get free ones. A step log
        # is one engine's steps in order (served step times are start to next start): engine n > 0 writes PATH.n.
        config = self.config
        if n:
            config = replace(config, kv_transfer_port=0,
                             step_log=f"{config.step_log}.{n}" if config.step_log else None)
        engine = AsyncEngine(build_emulated_engine(config, self.profile, timer=self.timer))
        self.engines.append(engine)
        return engine

    async def main(self) -> None:
        from inferstack.engine.server import serve
        from inferstack.fileio import write_ready_file

        self.loop, self.stop = asyncio.get_running_loop(), asyncio.Event()
        tasks = [asyncio.ensure_future(serve(partial(self.factory, i),
                                             replace(self.options, port=self.options.port if i == 0 else 0,
                                                     ready_file=None),
                                             stop=self.stop, on_listening=self._listening(i), freeze_heap=True))
                 for i in range(len(self.urls))]
        while None in self.urls and not any(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        if None not in self.urls:
            urls = [u for u in self.urls if u]
            try:
                await _wait_ready(urls, tasks, timeout_s=300)
                write_ready_file(self.options.ready_file, {"urls": urls, "pid": os.getpid()})
            except (TimeoutError, RuntimeError) as e:
                log.error("%s", e)
                self.stop.set()
        self.codes.extend(await asyncio.gather(*tasks))

    def _listening(self, i: int) -> Callable[[str], None]:
        return lambda url: self.urls.__setitem__(i, url)

    def run_loop(self) -> None:
        try:
            import uvloop
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:    # pragma: no cover
            runner = asyncio.Runner()
        with runner:
            runner.run(self.main())

    def on_signal(self, signum: int, frame: Any) -> None:
        if self.loop is not None and self.stop is not None:
            self.loop.call_soon_threadsafe(self.stop.set)


def serve_fleet(config: EngineConfig, profile: Profile, count: int, options: Any,
                timer: Callable[[SchedulerOutput], float] | None = None) -> int:
    """Serve `count` emulated engines; `options` is engine.server.ServeOptions (port applies to the first).

    Raises ValueError before serving when the profile cannot emulate ``config`` (weights exceed memory,
    KV tiers asked for, no network for a PD role)."""
    from inferstack.engine.executor.emulated import check_emulation

    check_emulation(config, profile)        # fail fast, before any port is bound
    fleet = _Fleet(config, profile, count, options, timer)
    thread = threading.Thread(target=fleet.run_loop, name="emulated-fleet")
    previous = {s: signal.signal(s, fleet.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # Engine threads wake from their emulated step sleeps and need the GIL at once; Python's default
    # 5 ms switch interval would let the HTTP loop hold it for a whole decode step.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    thread.start()
    try:
        while thread.is_alive():
            thread.join(0.2)
    finally:
        sys.setswitchinterval(switch_interval)
        for s, handler in previous.items():
            signal.signal(s, handler)
    stats = [e.core.executor.stats.summary() for e in fleet.engines]   # type: ignore[attr-defined]
    print(json.dumps({"emulator": str(profile), "engines": len(stats), "stats": stats}), file=sys.stderr, flush=True)
    return max(fleet.codes, default=1)
