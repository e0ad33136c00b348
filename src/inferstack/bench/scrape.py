"""Server-side metrics scraped from each target's `/metrics` while a run goes on (vLLM names)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import aiohttp

from inferstack.telemetry import promtext

GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
COUNTERS = ("vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:prompt_tokens",
            "vllm:generation_tokens", "vllm:num_preemptions")


_SAMPLES = frozenset({*GAUGES, *COUNTERS, *(c + "_total" for c in COUNTERS)})


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every sample per wanted name (over labels, e.g. model_name); counters without `_total`."""
    scrape = promtext.parse(text, 0.0, names=_SAMPLES)
    out: dict[str, float] = {}
    for name in (*GAUGES, *COUNTERS):
        values = [*scrape.select(name).values(), *scrape.select(name + "_total").values()]
        if values:
            out[name] = sum(values)
    return out


@dataclass
class Scraper:
    targets: list[str]
    interval_s: float = 1.0
    samples: list[dict[str, float]] = field(default_factory=list)   # {"t": run clock, "target": i, ...}
    errors: list[str] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, clock0: float, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=max(2.0, self.interval_s * 2))
        while not stop.is_set():
            await asyncio.gather(*(self._one(session, i, url, clock0, timeout) for i, url in enumerate(self.targets)))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)
        await asyncio.gather(*(self._one(session, i, url, clock0, timeout) for i, url in enumerate(self.targets)))

    async def _one(self, session: aiohttp.ClientSession, i: int, url: str, clock0: float,
                   timeout: aiohttp.ClientTimeout) -> None:
        try:
            async with session.get(url + "/metrics", timeout=timeout) as resp:
                if resp.status != 200:
                    self._error(f"{url}/metrics: HTTP {resp.status}")
                    return
                text = await resp.text()
            values = parse_metrics(text)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            self._error(f"{url}/metrics: {type(e).__name__}: {e}")
            return
        if values:
            self.samples.append({"t": time.perf_counter() - clock0, "target": i, **values})

    def _error(self, msg: str) -> None:
        if len(self.errors) < 10:
            self.errors.append(msg)

    def summary(self, window: tuple[float, float]) -> dict[str, object]:
        """Gauge distributions and counter deltas inside the window, over all targets."""
        if not self.samples:
            return {"available": False, "errors": self.errors}
        out: dict[str, object] = {"available": True, "samples": len(self.samples)}
        inside = [s for s in self.samples if window[0] <= s["t"] <= window[1]] or self.samples
        for g in GAUGES:
            vals = [s[g] for s in inside if g in s]
            if vals:
                out[g] = {"mean": sum(vals) / len(vals), "max": max(vals)}
        deltas: dict[str, float] = {}
        for i in range(len(self.targets)):
            mine = [s for s in self.samples if s["target"] == i]
            before = [s for s in mine if s["t"] <= window[0]] or mine[:1]
            after = [s for s in mine if s["t"] >= window[1]] or mine[-1:]
            if not before or not after:
                continue
            for c in COUNTERS:
                if c in before[-1] and c in after[0]:
                    deltas[c] = deltas.get(c, 0.0) + after[0][c] - before[-1][c]
        out["counter_deltas"] = deltas
        q, h = deltas.get("vllm:prefix_cache_queries"), deltas.get("vllm:prefix_cache_hits")
        out["prefix_cache_hit_rate"] = (h / q) if q else None
        if self.errors:
            out["errors"] = self.errors
        return out

    def timeline(self) -> list[dict[str, float]]:
        return self.samples
