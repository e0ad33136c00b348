"""One benchmark run: schedule units (open loop at absolute times, or N closed-loop workers), send them
through the client, scrape server metrics, and summarize the measurement window."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from inferstack.bench.arrivals import arrival_times
from inferstack.bench.client import BenchError, Client, ClientOptions, build_body
from inferstack.bench.metrics import summarize
from inferstack.bench.progress import ProgressView
from inferstack.bench.records import RequestRecord
from inferstack.bench.scrape import Scraper
from inferstack.bench.slo import SLO
from inferstack.bench.workloads import Unit, Workload

LOOKAHEAD_S = 1.0       # open loop: build request bodies this far ahead of their send time


@dataclass
class LoadSpec:
    rate: float | None = None              # open loop, units per second
    arrival: str = "poisson"               # poisson | constant | gamma
    burstiness: float = 1.0
    concurrency: int | None = None         # closed loop: this many units in flight
    max_concurrency: int | None = None     # open loop: cap on requests in flight (excess waits)

    @property
    def label(self) -> str:
        if self.concurrency:
            return f"concurrency={self.concurrency}"
        if self.rate is None:
            return "replay"
        return f"rate={self.rate:g}/s ({self.arrival}{f', b={self.burstiness:g}' if self.arrival == 'gamma' else ''})"


@dataclass
class RunConfig:
    targets: list[str]
    model: str
    workload: Workload
    load: LoadSpec
    duration_s: float
    warmup_s: float = 0.0
    cooldown_s: float = 0.0
    seed: int = 0
    slo: SLO | None = None
    client: ClientOptions = field(default_factory=ClientOptions)
    scrape_interval_s: float = 1.0
    drain_timeout_s: float = 60.0
    progress: bool = True

    def describe(self) -> dict[str, object]:
        return {
            "targets": self.targets, "model": self.model, "workload": self.workload.description,
            "workload_kind": self.workload.kind, "workload_params": self.workload.params,
            "load": {**asdict(self.load), "label": self.load.label}, "duration_s": self.duration_s,
            "warmup_s": self.warmup_s, "cooldown_s": self.cooldown_s, "seed": self.seed,
            "slo": str(self.slo) if self.slo else None, "client": asdict(self.client) | {"api_key": None},
        }


@dataclass
class RunResult:
    config: dict[str, object]
    records: list[RequestRecord]
    summary: dict[str, object]
    server: dict[str, object]
    timeline: list[dict[str, float]]
    wall_s: float


class _Feed:
    """Open-loop send times and the units for them, turned into request bodies a little ahead."""

    def __init__(self, run: _Run, times: list[float], units: Iterator[Unit]) -> None:
        self.run, self.times, self.units = run, times, units
        self.ready: deque[tuple[Unit, list[list[bytes]]]] = deque()
        self.built = 0

    def fill(self, until: float) -> None:
        while self.built < len(self.times) and self.times[self.built] < until:
            unit = next(self.units, None)
            if unit is None:             # a finite workload ran out: no more arrivals
                del self.times[self.built:]
                return
            self.ready.append((unit, self.run.bodies(unit)))
            self.built += 1


class _Run:
    def __init__(self, cfg: RunConfig, client: Client) -> None:
        self.cfg, self.client = cfg, client
        self.records: list[RequestRecord] = []
        self.counter = itertools.count()
        self.in_flight = 0
        self.done = 0
        self.failed = 0
        self.clock0 = 0.0
        self.window = (cfg.warmup_s, max(cfg.warmup_s, cfg.duration_s - cfg.cooldown_s))
        self.gate = asyncio.Semaphore(cfg.load.max_concurrency) if cfg.load.max_concurrency else None

    def bodies(self, unit: Unit) -> list[list[bytes]]:
        return [[build_body(spec, self.cfg.model, self.cfg.client) for spec in stage] for stage in unit.stages]

    async def unit(self, n: int, unit: Unit, bodies: list[list[bytes]], scheduled: float) -> None:
        included = self.window[0] <= scheduled < self.window[1]
        for s, (stage, stage_bodies) in enumerate(zip(unit.stages, bodies, strict=True)):
            if s and unit.think_s:
                await asyncio.sleep(unit.think_s)
            recs = []
            for spec in stage:
                rec = RequestRecord(index=next(self.counter), unit=n, stage=s,
                                    scheduled=scheduled if s == 0 else time.perf_counter() - self.clock0,
                                    input_tokens_nominal=spec.input_tokens, output_tokens_nominal=spec.output_tokens,
                                    session=spec.session, group=spec.group, included=included)
                self.records.append(rec)
                recs.append(rec)
            if len(recs) == 1:
                await self.one(stage_bodies[0], recs[0])
            else:
                await asyncio.gather(*(self.one(body, rec) for body, rec in zip(stage_bodies, recs, strict=True)))
            if not all(r.ok for r in recs):
                return      # a failed stage ends the unit: later stages depend on it

    async def one(self, body: bytes, rec: RequestRecord) -> None:
        self.in_flight += 1
        try:
            if self.gate is not None:
                async with self.gate:
                    await self.client.send(body, rec, self.clock0)
            else:
                await self.client.send(body, rec, self.clock0)
        except asyncio.CancelledError:
            rec.status, rec.error = "cancelled", "still running when the drain timeout ended the run"
            rec.end = time.perf_counter() - self.clock0
            raise
        finally:
            self.in_flight -= 1
            self.done += 1
            self.failed += not rec.ok

    async def open_loop(self, feed: _Feed, tasks: set[asyncio.Task]) -> None:
        """Fire unit n at clock0 + times[n]; bodies are built LOOKAHEAD_S ahead, in the slack between
        arrivals, so memory stays bounded on long runs."""
        loop = asyncio.get_running_loop()
        pc = time.perf_counter
        n = 0
        while n < len(feed.times):
            t = feed.times[n]
            feed.fill(t + LOOKAHEAD_S)
            if n >= len(feed.times):
                return
            delay = self.clock0 + t - pc()
            if delay > 0:
                await asyncio.sleep(delay)
            unit, bodies = feed.ready.popleft()
            task = loop.create_task(self.unit(n, unit, bodies, t))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1

    async def closed_loop(self, units: Iterator[Unit], workers: int, tasks: set[asyncio.Task]) -> None:
        await asyncio.sleep(max(0.0, self.clock0 - time.perf_counter()))     # start at t = 0, inside the window
        deadline = self.clock0 + self.cfg.duration_s
        numbering = itertools.count()

        async def worker() -> None:
            while time.perf_counter() < deadline:
                unit = next(units, None)
                if unit is None:
                    return
                await self.unit(next(numbering), unit, self.bodies(unit), time.perf_counter() - self.clock0)

        loop = asyncio.get_running_loop()
        for _ in range(workers):
            task = loop.create_task(worker())
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        await asyncio.sleep(max(0.0, deadline - time.perf_counter()))


def _arrivals(cfg: RunConfig) -> tuple[list[float], Iterator[Unit]]:
    """Open-loop send times and the units to send at them (a trace without --rate brings its own times)."""
    units = cfg.workload.units(cfg.seed)
    if cfg.load.rate is None:
        timed = []
        for unit in units:
            assert unit.at is not None
            if unit.at >= cfg.duration_s:
                break
            timed.append(unit)
        return [u.at for u in timed if u.at is not None], iter(timed)
    times = arrival_times(cfg.load.arrival, cfg.load.rate, cfg.duration_s,
                          np.random.default_rng(cfg.seed + 7919), cfg.load.burstiness)
    return [float(t) for t in times], units


async def execute(cfg: RunConfig) -> RunResult:
    if cfg.load.rate is None and not cfg.load.concurrency and not cfg.workload.finite:
        raise BenchError("choose a load: --rate R, --concurrency C, --sweep or --goodput "
                         "(only a trace replays at its own timestamps)")
    wall0 = time.perf_counter()
    async with Client(cfg.targets, cfg.model, cfg.client) as client:
        run = _Run(cfg, client)
        times, units = _arrivals(cfg) if not cfg.load.concurrency else ([], iter(()))
        feed = _Feed(run, times, units)
        feed.fill(LOOKAHEAD_S)                        # the first second is ready before the clock starts
        scraper = Scraper(client.targets, cfg.scrape_interval_s)
        stop = asyncio.Event()
        tasks: set[asyncio.Task] = set()
        view = ProgressView(cfg.progress, cfg.duration_s, cfg.load.label)
        run.clock0 = time.perf_counter() + 0.05      # a short lead-in so the first arrival is not late
        assert client.session is not None
        scrape_task = asyncio.create_task(scraper.run(client.session, run.clock0, stop))
        with view:
            view_task = asyncio.create_task(view.follow(run))
            if cfg.load.concurrency:
                await run.closed_loop(cfg.workload.units(cfg.seed), cfg.load.concurrency, tasks)
            else:
                await run.open_loop(feed, tasks)
                await asyncio.sleep(max(0.0, run.clock0 + cfg.duration_s - time.perf_counter()))
            view.draining()
            if tasks:
                _, pending = await asyncio.wait(set(tasks), timeout=cfg.drain_timeout_s)
                for task in pending:
                    task.cancel()
                if pending:
                    await asyncio.wait(pending)
            stop.set()
            await scrape_task
            view_task.cancel()
            view.show(run)
    planned = len(feed.times) / cfg.duration_s if feed.times else None
    summary = summarize(run.records, run.window, cfg.slo, cfg.load.rate, planned)
    return RunResult(cfg.describe(), run.records, summary, scraper.summary(run.window), scraper.timeline(),
                     time.perf_counter() - wall0)


def run_sync(cfg: RunConfig) -> RunResult:
    try:
        import uvloop
    except ImportError:   # pragma: no cover - uvloop is an optional speed-up
        return asyncio.run(execute(cfg))
    return uvloop.run(execute(cfg))
