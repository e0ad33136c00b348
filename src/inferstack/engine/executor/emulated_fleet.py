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
from typing import Any

import aiohttp

from inferstack.engine.config import EngineConfig
from inferstack.engine.scheduler import SchedulerOutput
from inferstack.sim.profile import Profile

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


def serve_fleet(config: EngineConfig, profile: Profile, count: int, options: Any,
                timer: Callable[[SchedulerOutput], float] | None = None) -> int:
    """Serve `count` emulated engines; `options` is engine.server.ServeOptions (port applies to the first).

    Raises ValueError before serving when the profile cannot emulate ``config`` (weights exceed memory,
    KV tiers asked for, no network for a PD role)."""
    from inferstack.engine.async_engine import AsyncEngine
    from inferstack.engine.executor.emulated import build_emulated_engine, check_emulation
    from inferstack.engine.server import serve
    from inferstack.fileio import write_ready_file

    check_emulation(config, profile)        # fail fast, before any port is bound

    engines: list[AsyncEngine] = []
    urls: list[str | None] = [None] * count
    codes: list[int] = []
    state: dict[str, Any] = {}

    def factory() -> AsyncEngine:
        # Like --port, a fixed --kv-transfer-port applies to the first engine; the others get free ones.
        engine = AsyncEngine(build_emulated_engine(replace(config, kv_transfer_port=0) if engines else config, profile,
                                                    timer=timer))
        engines.append(engine)
        return engine

    async def main() -> None:
        stop = asyncio.Event()
        state["loop"], state["stop"] = asyncio.get_running_loop(), stop

        def listening(i: int) -> Any:
            return lambda url: urls.__setitem__(i, url)

        tasks = [asyncio.ensure_future(serve(factory, replace(options, port=options.port if i == 0 else 0,
                                                              ready_file=None), stop=stop, on_listening=listening(i),
                                               freeze_heap=True))
                 for i in range(count)]
        while None in urls and not any(t.done() for t in tasks):
            await asyncio.sleep(0.01)
        if None not in urls:
            try:
                await _wait_ready([u for u in urls if u], tasks, timeout_s=300)
                write_ready_file(options.ready_file, {"urls": [u for u in urls if u], "pid": os.getpid()})
            except (TimeoutError, RuntimeError) as e:
                log.error("%s", e)
                stop.set()
        codes.extend(await asyncio.gather(*tasks))

    def run_loop() -> None:
        try:
            import uvloop
            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        except ImportError:    # pragma: no cover
            runner = asyncio.Runner()
        with runner:
            runner.run(main())

    thread = threading.Thread(target=run_loop, name="emulated-fleet")

    def on_signal(signum: int, frame: Any) -> None:
        loop, stop = state.get("loop"), state.get("stop")
        if loop is not None and stop is not None:
            loop.call_soon_threadsafe(stop.set)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
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
    stats = [e.core.executor.stats.summary() for e in engines]   # type: ignore[attr-defined]
    print(json.dumps({"emulator": str(profile), "engines": len(stats), "stats": stats}), file=sys.stderr, flush=True)
    return max(codes, default=1)
