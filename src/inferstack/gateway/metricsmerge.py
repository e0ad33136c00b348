"""One /metrics for a gateway of several worker processes: the workers' expositions merged into the
totals a single process would report (docs/gateway.md, "Workers").

Counters and histograms add up; gauges add up (requests queued, held, in flight: each worker counts
its own), except the few in `_MIN_GAUGES` that are a health flag, where the gateway is as healthy
as its least healthy worker. ``_created`` samples take the earliest.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

_MIN_GAUGES = frozenset({"inferstack_audit_writer_healthy"})


class _Merged:
    """A collector that yields already-merged families (so `generate_latest` writes the text)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def merge_expositions(texts: list[str]) -> bytes:
    """The Prometheus text of all ``texts`` merged, in the order families first appear."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple, float]] = {}
    for text in texts:
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                values[fam.name] = {}
            acc = values[fam.name]
            for s in fam.samples:
                key = (s.name, tuple(s.labels.items()))  # every worker writes labels in one order
                old = acc.get(key)
                acc[key] = s.value if old is None else _combine(fam.name, s.name, old, s.value)
    for name, fam in families.items():
        for (sample, labels), value in values[name].items():
            fam.add_sample(sample, dict(labels), value)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(families.values())))
    return generate_latest(registry)


def _combine(family: str, sample: str, a: float, b: float) -> float:
    if sample.endswith("_created"):
        return min(a, b)
    if family in _MIN_GAUGES:
        return min(a, b)
    return a + b


@dataclass
class WorkerPeers:
    """What worker ``index`` knows of its siblings: the Unix sockets each one serves its own
    /metrics on (`local_scrape` tells such a request from the public port's)."""

    index: int
    sockets: list[Path]
    timeout_s: float = 2.0
    _sessions: dict[int, aiohttp.ClientSession] = field(default_factory=dict)

    async def gateway_metrics(self, own: bytes) -> bytes:
        """The whole gateway's exposition; raises OSError/TimeoutError when a sibling does not answer
        (a scrape must fail rather than report some workers' counters as the gateway's)."""
        others = await asyncio.gather(*(self._scrape(i) for i in range(len(self.sockets)) if i != self.index))
        return merge_expositions([own.decode(), *others])

    async def _scrape(self, i: int) -> str:
        s = self._sessions.get(i)
        if s is None:
            s = self._sessions[i] = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(self.sockets[i])))
        try:
            async with s.get("http://worker/metrics", timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
                if r.status != 200:
                    raise OSError(f"worker {i} answered /metrics with {r.status}")
                return await r.text()
        except aiohttp.ClientError as exc:
            raise OSError(f"worker {i} did not answer /metrics: {exc}") from exc

    async def aclose(self) -> None:
        for s in self._sessions.values():
            await s.close()
        self._sessions.clear()


def local_scrape(scope: dict) -> bool:
    """A request that came over a worker's Unix socket (uvicorn reports its server as (path, None)):
    a sibling asking for this worker's own metrics."""
    server = scope.get("server")
    return server is not None and server[1] is None
