"""Prometheus view of a TieredKVStore: a collector the engine server registers on its registry.

No global registry and no metric objects at import: ``registry.register(KVStoreCollector(store,
model_name))`` reads the store's counters at scrape time. Units: chunks (256 tokens) and bytes;
the connector's token counters are vLLM's ``vllm:external_prefix_cache_*``.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferstack.kvstore.stats import Histogram
from inferstack.kvstore.store import TieredKVStore

COUNTERS = (
    ("hits", "inferstack_kv_tier_hits", "Chunks read from a KV tier."),
    ("misses", "inferstack_kv_tier_misses", "Chunks asked of a KV tier and not served (absent, corrupt or error)."),
    ("read_bytes", "inferstack_kv_tier_read_bytes", "Bytes read from a KV tier."),
    ("write_bytes", "inferstack_kv_tier_write_bytes", "Bytes written to a KV tier."),
    ("writes", "inferstack_kv_tier_writes", "Chunks written to a KV tier."),
    ("evictions", "inferstack_kv_tier_evictions", "Chunks a KV tier dropped to stay within its byte budget."),
    ("corrupt", "inferstack_kv_tier_corrupt_chunks",
     "Chunks that failed their checksum or header check; deleted, served as misses."),
    ("errors", "inferstack_kv_tier_errors",
     "KV tier operations that failed (e.g. Redis unreachable); served as misses."),
)


def histogram_family(name: str, doc: str, labels: list[str]) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=labels)


def add_histogram(fam: HistogramMetricFamily, values: list[str], h: Histogram) -> None:
    fam.add_metric(values, buckets=h.cumulative(), sum_value=h.total)


class KVStoreCollector(Collector):
    def __init__(self, store: TieredKVStore, model_name: str) -> None:
        self.store = store
        self.model_name = model_name

    def version(self) -> tuple[object, ...]:
        """Every counter and gauge `collect` reports, and each histogram's count (bumped after its buckets
        and sum): equal while the text is (`EngineMetrics.add_live` renders the tiers again on a change)."""
        tiers = tuple((*(getattr(t.stats, attr) for attr, _, _ in COUNTERS), t.stats.read_seconds.n,
                       t.stats.write_seconds.n, t.available(), t.used_bytes(), t.capacity_bytes())
                      for t in self.store.tiers)
        wb = self.store.writeback.stats
        return tiers, wb.queued_items, wb.queued_bytes, wb.dropped, wb.completed

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "tier"]
        for attr, name, doc in COUNTERS:
            fam = CounterMetricFamily(name, doc, labels=labels)
            for tier in self.store.tiers:
                fam.add_metric([self.model_name, tier.name], getattr(tier.stats, attr))
            yield fam
        reads = histogram_family("inferstack_kv_tier_read_seconds",
                                 "Time to read and verify one chunk from a KV tier.", labels)
        writes = histogram_family("inferstack_kv_tier_write_seconds", "Time to write one chunk to a KV tier.", labels)
        up = GaugeMetricFamily("inferstack_kv_tier_up", "0 while a KV tier is skipped after a failure, else 1.",
                               labels=labels)
        for tier in self.store.tiers:
            up.add_metric([self.model_name, tier.name], 1 if tier.available() else 0)
        yield up
        used = GaugeMetricFamily("inferstack_kv_tier_used_bytes", "Bytes a KV tier holds (tiers that track it).",
                                 labels=labels)
        cap = GaugeMetricFamily("inferstack_kv_tier_capacity_bytes", "A KV tier's byte budget.", labels=labels)
        for tier in self.store.tiers:
            with tier.stats.lock:
                add_histogram(reads, [self.model_name, tier.name], tier.stats.read_seconds)
                add_histogram(writes, [self.model_name, tier.name], tier.stats.write_seconds)
            if (u := tier.used_bytes()) is not None:
                used.add_metric([self.model_name, tier.name], u)
            if (c := tier.capacity_bytes()) is not None:
                cap.add_metric([self.model_name, tier.name], c)
        yield from (reads, writes, used, cap)
        wb = self.store.writeback.stats
        ml = ["model_name"]
        depth = GaugeMetricFamily("inferstack_kv_writeback_queue_chunks", "Chunks waiting to be written to KV tiers.",
                                  labels=ml)
        depth.add_metric([self.model_name], wb.queued_items)
        qbytes = GaugeMetricFamily("inferstack_kv_writeback_queue_bytes", "Bytes waiting to be written to KV tiers.",
                                   labels=ml)
        qbytes.add_metric([self.model_name], wb.queued_bytes)
        dropped = CounterMetricFamily("inferstack_kv_writeback_dropped",
                                      "Chunk writes dropped because the write-back queue was full (back-pressure).",
                                      labels=ml)
        dropped.add_metric([self.model_name], wb.dropped)
        done = CounterMetricFamily("inferstack_kv_writeback_completed",
                                   "Chunks the write-back worker finished writing.", labels=ml)
        done.add_metric([self.model_name], wb.completed)
        yield from (depth, qbytes, dropped, done)
