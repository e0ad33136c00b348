"""Connector counters and their Prometheus collector (the engine server registers it)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from inferstack.kvstore.stats import Histogram

LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _hist() -> Histogram:
    return Histogram(buckets=LOAD_BUCKETS, counts=[0] * (len(LOAD_BUCKETS) + 1))


@dataclass
class ConnectorStats:
    loaded_tokens: int = 0
    saved_chunks: int = 0
    load_failures: int = 0         # a tier or transfer failed mid-way: the rest was recomputed
    save_dropped: int = 0          # chunks the write-back queue refused (back-pressure)
    peers_refused: int = 0         # PD pulls refused: peer not allowed or params not signed (SSRF guard)
    lookup_seconds: Histogram = field(default_factory=_hist)   # finding the external prefix
    fetch_seconds: Histogram = field(default_factory=_hist)    # reading it to host (tiers or peer)
    load_seconds: Histogram = field(default_factory=_hist)     # copying it into KV blocks
    save_seconds: Histogram = field(default_factory=_hist)     # gathering new chunks for the store
    # asynchronous loads: what the request's computation waited on them once its blocks were allocated
    # (the whole load when it ran after it; the forward pass's per-layer waits when it ran during it)
    wait_seconds: Histogram = field(default_factory=_hist)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    changes: int = 0      # bumped by every update: the engine's /metrics re-renders on a change

    def observe(self, name: str, seconds: float) -> None:
        with self.lock:
            getattr(self, name).observe(seconds)
            self.changes += 1     # after the update: a scrape that sees the new count sees the new values

    def add(self, **deltas: int) -> None:
        with self.lock:
            for k, v in deltas.items():
                setattr(self, k, getattr(self, k) + v)
            self.changes += 1


class ConnectorCollector(Collector):
    def __init__(self, stats: ConnectorStats, model_name: str, connector: str) -> None:
        self.stats = stats
        self.labels = [model_name, connector]

    def version(self) -> int:
        """Changes whenever what `collect` reports changes (`EngineMetrics.add_live`)."""
        return self.stats.changes

    def collect(self) -> Iterator[Metric]:
        names = ["model_name", "connector"]
        s = self.stats
        for attr, name, doc in (
            ("loaded_tokens", "inferstack_kv_connector_loaded_tokens",
             "Prompt tokens whose KV was loaded instead of computed."),
            ("saved_chunks", "inferstack_kv_connector_saved_chunks", "Chunks handed to the KV store after compute."),
            ("load_failures", "inferstack_kv_connector_load_failures",
             "Loads that failed mid-way and fell back to recompute."),
            ("save_dropped", "inferstack_kv_connector_save_dropped",
             "Chunks not saved because the write-back queue was full."),
            ("peers_refused", "inferstack_kv_connector_peers_refused",
             "Remote prefills refused: the peer is not in --kv-transfer-peers or the params are not signed."),
        ):
            fam = CounterMetricFamily(name, doc, labels=names)
            fam.add_metric(self.labels, getattr(s, attr))
            yield fam
        for attr, name, doc in (
            ("lookup_seconds", "inferstack_kv_connector_lookup_seconds",
             "Time to find a request's external KV prefix."),
            ("fetch_seconds", "inferstack_kv_connector_fetch_seconds",
             "Time to read external KV to host memory (tiers or a prefill peer)."),
            ("load_seconds", "inferstack_kv_connector_load_seconds", "Time to copy external KV into KV blocks."),
            ("save_seconds", "inferstack_kv_connector_save_seconds",
             "Time to gather new chunks out of KV blocks for saving."),
            ("wait_seconds", "inferstack_kv_connector_load_wait_seconds",
             "Time a request's computation waited on an asynchronous load (a NIXL READ) after its blocks were "
             "allocated: all of it, or only the forward pass's waits for layers still landing."),
        ):
            fam = HistogramMetricFamily(name, doc, labels=names)
            with s.lock:
                h = getattr(s, attr)
                fam.add_metric(self.labels, buckets=h.cumulative(), sum_value=h.total)
            yield fam


class TransferCollector(Collector):
    """KV transfer counters of a PD connector (either side), per transport (nixl, shm, tcp) and path
    (pd: prefill → decode; reuse: a replica's cached prefix read by another)."""

    def __init__(self, connector: Any, model_name: str) -> None:
        self.connector = connector
        self.model_name = model_name

    def version(self) -> tuple[int, ...]:
        """Changes whenever what `collect` reports changes (`EngineMetrics.add_live`)."""
        return tuple(st.changes for st in self.connector.transfer_stats())

    def collect(self) -> Iterator[Metric]:
        labels = ["model_name", "direction", "transport", "path"]
        nbytes = CounterMetricFamily("inferstack_kv_transfer_bytes",
                                     "KV bytes moved between engines; `transport`: nixl (NIXL/UCX), shm or tcp; "
                                     "`path`: pd (prefill to decode) or reuse (another replica's cached prefix).",
                                     labels=labels)
        secs = CounterMetricFamily("inferstack_kv_transfer_seconds",
                                   "Time spent in KV transfers (bytes/seconds = throughput; nixl: the READ "
                                   "alone on the decode side).", labels=labels)
        count = CounterMetricFamily("inferstack_kv_transfers", "KV transfers completed.", labels=labels)
        fails = CounterMetricFamily("inferstack_kv_transfer_failures",
                                    "KV transfers that failed (the KV tiers or a recompute took over).",
                                    labels=["model_name", "direction", "path"])
        for st in self.connector.transfer_stats():
            with st.lock:
                for (direction, transport), b in st.bytes.items():
                    key = [self.model_name, direction, transport, st.path]
                    nbytes.add_metric(key, b)
                    secs.add_metric(key, st.seconds[(direction, transport)])
                    count.add_metric(key, st.transfers[(direction, transport)])
                for direction, n in st.failures.items():
                    fails.add_metric([self.model_name, direction, st.path], n)
        yield from (nbytes, secs, count, fails)
