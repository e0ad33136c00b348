"""The engine's Prometheus metrics, with vLLM's names, labels and histogram buckets.

``ENGINE_METRICS`` is the single list of definitions: the /metrics exposition, the generated
``docs/metrics.md`` section and the tests all read it. Gauges and counters are read from the engine's
``stats()`` snapshot at scrape time (a custom collector, so the hot path counts nothing twice);
latency histograms are observed from the timestamps on each request's outputs.

Regenerate the docs after changing a definition:
``PYTHONPATH=src python -m inferstack.telemetry.metrics_doc docs/metrics.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector


@runtime_checkable
class Versioned(Protocol):
    """A collector that says when its series changed: ``version()`` differs whenever they do."""

    def version(self) -> object: ...

Kind = Literal["gauge", "counter", "histogram", "info"]

# vLLM v1's bucket boundaries (vllm/v1/metrics/loggers.py), so dashboards and SLO rules carry over.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                           120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass(frozen=True)
class MetricDef:
    name: str                      # as exposed (counters end in _total)
    kind: Kind
    help: str
    labels: tuple[str, ...] = ("model_name",)
    stat: str | None = None        # EngineStats field it is read from (gauges, counters)
    buckets: tuple[float, ...] = ()


ENGINE_METRICS: tuple[MetricDef, ...] = (
    MetricDef("vllm:num_requests_running", "gauge", "Requests in the running batch (being prefilled or decoded).",
              stat="num_running"),
    MetricDef("vllm:num_requests_waiting", "gauge", "Requests queued, waiting to be scheduled.",
              stat="num_waiting"),
    MetricDef("inferstack:max_num_seqs", "gauge",
              "Most requests the engine runs at once (its running-batch cap); beyond it requests wait. "
              "The gateway reads it to tell requests the engine can start at once from queued ones.",
              stat="max_num_seqs"),
    MetricDef("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (0-1).",
              stat="kv_cache_usage"),
    MetricDef("vllm:prompt_tokens_total", "counter", "Prompt tokens processed (prefill), cached ones included.",
              stat="prompt_tokens"),
    MetricDef("vllm:generation_tokens_total", "counter", "Tokens generated.", stat="generation_tokens"),
    MetricDef("vllm:prefix_cache_queries_total", "counter",
              "Prompt tokens looked up in the device prefix cache.", stat="prefix_cache_queries"),
    MetricDef("vllm:prefix_cache_hits_total", "counter", "Prompt tokens found in the device prefix cache.",
              stat="prefix_cache_hits"),
    MetricDef("vllm:external_prefix_cache_queries_total", "counter",
              "Prompt tokens looked up in external KV tiers or peers.", stat="external_prefix_cache_queries"),
    MetricDef("vllm:external_prefix_cache_hits_total", "counter",
              "Prompt tokens loaded from external KV tiers or peers.", stat="external_prefix_cache_hits"),
    MetricDef("vllm:request_success_total", "counter", "Finished requests, by finish reason.",
              labels=("model_name", "finished_reason"), stat="request_success"),
    MetricDef("vllm:num_preemptions_total", "counter", "Requests preempted (KV blocks reclaimed, recomputed later).",
              stat="num_preemptions"),
    MetricDef("inferstack:busy_seconds_total", "counter",
              "Seconds spent running engine steps; its rate is the accelerator's duty cycle (what "
              "DCGM_FI_DEV_GPU_UTIL reports), the 'GPU utilisation' an HPA can target.", stat="busy_seconds"),
    MetricDef("vllm:time_to_first_token_seconds", "histogram", "Time from arrival to the first generated token.",
              buckets=TTFT_BUCKETS),
    MetricDef("vllm:inter_token_latency_seconds", "histogram", "Time between consecutive generated tokens.",
              buckets=ITL_BUCKETS),
    MetricDef("vllm:e2e_request_latency_seconds", "histogram", "Time from arrival to the last token.",
              buckets=REQUEST_LATENCY_BUCKETS),
    MetricDef("vllm:request_queue_time_seconds", "histogram", "Time from arrival to first being scheduled.",
              buckets=REQUEST_LATENCY_BUCKETS),
    MetricDef("vllm:request_prefill_time_seconds", "histogram",
              "Time from first being scheduled to the first token.", buckets=REQUEST_LATENCY_BUCKETS),
    MetricDef("vllm:request_decode_time_seconds", "histogram", "Time from the first token to the last.",
              buckets=REQUEST_LATENCY_BUCKETS),
    MetricDef("vllm:cache_config_info", "info", "KV-cache configuration (value is always 1).",
              labels=("model_name", "block_size", "num_gpu_blocks")),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in ENGINE_METRICS}

# Histogram -> (start timestamp key, end timestamp key) on RequestOutput.metrics.
_SPANS: dict[str, tuple[str, str]] = {
    "vllm:time_to_first_token_seconds": ("arrival", "first_token"),
    "vllm:e2e_request_latency_seconds": ("arrival", "finished"),
    "vllm:request_queue_time_seconds": ("arrival", "scheduled"),
    "vllm:request_prefill_time_seconds": ("scheduled", "first_token"),
    "vllm:request_decode_time_seconds": ("first_token", "finished"),
}
_ITL = "vllm:inter_token_latency_seconds"


class _StatsCollector(Collector):
    """Builds gauges and counters from one ``stats()`` snapshot per scrape."""

    def __init__(self, source: Callable[[], tuple[str, Any] | None]) -> None:
        self._source = source

    def describe(self) -> list[Metric]:
        return []       # unknown until the engine is loaded; skip the registry's describe-by-collect

    def collect(self) -> Iterator[Metric]:
        got = self._source()
        if got is None:
            return
        model_name, stats = got
        for m in ENGINE_METRICS:
            if m.kind == "info":
                fam = GaugeMetricFamily(m.name, m.help, labels=m.labels)
                fam.add_metric([model_name, str(stats.block_size), str(stats.num_kv_blocks)], 1.0)
                yield fam
            elif m.stat is None:
                continue
            elif m.kind == "gauge":
                fam = GaugeMetricFamily(m.name, m.help, labels=m.labels)
                fam.add_metric([model_name], float(getattr(stats, m.stat)))
                yield fam
            else:
                fam = CounterMetricFamily(m.name, m.help, labels=m.labels)
                value = getattr(stats, m.stat)
                if isinstance(value, Mapping):
                    for reason, count in sorted(value.items()):
                        fam.add_metric([model_name, str(reason)], float(count))
                else:
                    fam.add_metric([model_name], float(value))
                yield fam


class EngineMetrics:
    """The registry behind one engine's /metrics (one per app: no process-global state)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self._model_name: str | None = None
        self._stats: Callable[[], Any] | None = None
        self.registry.register(_StatsCollector(lambda: self._scrape))
        self._hist: dict[str, Histogram] = {
            m.name: Histogram(m.name, m.help, labelnames=m.labels, buckets=m.buckets, registry=self.registry)
            for m in ENGINE_METRICS if m.kind == "histogram"
        }
        self._children: dict[str, Any] = {}
        self._observed = _Observed()
        self._rendered: tuple[int, Any, bytes] | None = None   # (observations, stats, text) of the last scrape
        self._scrape: tuple[str, Any] | None = None   # what the collector writes during this render
        # Collectors whose counters move on other threads (KV tiers, KV transfers: a holder serves a READ
        # while its engine stats stay equal): their own text, cached only on their `version()`.
        self._live = CollectorRegistry(auto_describe=False)
        self._live_versions: list[Callable[[], object] | None] = []
        self._live_rendered: tuple[tuple[Any, ...], bytes] | None = None

    def bind(self, model_name: str, stats: Callable[[], Any]) -> None:
        """Attach the loaded engine: its served name labels every series, ``stats`` is read per scrape."""
        self._model_name = model_name
        self._stats = stats
        self._children = {name: h.labels(model_name=model_name) for name, h in self._hist.items()}

    def add_live(self, collector: Collector) -> None:
        """Register ``collector``, whose series may change while the engine's stats and histograms do not
        (the render cache cannot see it). A `Versioned` collector (a ``version()`` that changes whenever its
        series do) is rendered again only when that changes; one without it, at every scrape."""
        self._live.register(collector)
        self._live_versions.append(collector.version if isinstance(collector, Versioned) else None)

    def _live_text(self) -> bytes:
        if not self._live_versions:
            return b""
        versions = tuple(None if v is None else v() for v in self._live_versions)
        last = self._live_rendered
        if last is not None and None not in versions and last[0] == versions:
            return last[1]
        text = generate_latest(self._live)
        self._live_rendered = (versions, text)
        return text

    def observer(self) -> RequestObserver:
        return RequestObserver(self._children, self._observed)

    def render(self) -> tuple[bytes, str]:
        """The exposition text. An idle engine is scraped many times a second (a gateway refreshes its
        routing signals every 50 ms) and its text does not change: while no histogram was observed and
        the stats snapshot is equal, the last text of the engine's own series is served instead of being
        rendered again; the live collectors' text (`add_live`) is kept while their versions are equal."""
        return self._engine_text() + self._live_text(), CONTENT_TYPE_LATEST

    def _engine_text(self) -> bytes:
        if self._stats is None or self._model_name is None:
            return generate_latest(self.registry)
        count, stats = self._observed.count, self._stats()
        last = self._rendered
        if last is not None and last[0] == count and last[1] == stats:
            return last[2]
        self._scrape = self._model_name, stats   # the text is written from this very snapshot
        try:
            text = generate_latest(self.registry)
        finally:
            self._scrape = None
        self._rendered = (count, stats, text)
        return text


class _Observed:
    """How many times any request's histograms were observed: the render cache's change marker."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


class RequestObserver:
    """Turns one request's output timestamps into histogram observations (per choice index)."""

    __slots__ = ("_children", "_last", "_observed")

    def __init__(self, children: Mapping[str, Any], observed: _Observed) -> None:
        self._children = children
        self._last: dict[int, float] = {}
        self._observed = observed

    def on_output(self, index: int, num_new_tokens: int, metrics: Mapping[str, float],
                  finish_reason: str | None) -> None:
        if not self._children:
            return
        now = metrics.get("now")
        if num_new_tokens and now is not None:
            last = self._last.get(index)
            if last is None:
                last = metrics.get("first_token", now)
                num_new_tokens -= 1          # the first token's latency is TTFT, not ITL
            if num_new_tokens > 0:
                gap = (now - last) / num_new_tokens
                itl = self._children[_ITL]
                for _ in range(num_new_tokens):
                    itl.observe(gap)
            self._last[index] = now
        if finish_reason in ("stop", "length"):
            for name, (start, end) in _SPANS.items():
                if start in metrics and end in metrics:
                    self._children[name].observe(max(0.0, metrics[end] - metrics[start]))
        self._observed.count += 1   # after the observations: a render that saw them also sees this


# --- docs ------------------------------------------------------------------------------------------

DOC_BEGIN = "<!-- BEGIN engine metrics: generated by `python -m inferstack.telemetry.metrics_doc` -->"
DOC_END = "<!-- END engine metrics -->"


def engine_metrics_markdown() -> str:
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for m in ENGINE_METRICS:
        extra = f" Buckets: {', '.join(f'{b:g}' for b in m.buckets)}." if m.buckets else ""
        source = f" Source: `EngineStats.{m.stat}`." if m.stat else ""
        rows.append(f"| `{m.name}` | {m.kind} | {', '.join(f'`{x}`' for x in m.labels)} | {m.help}{source}{extra} |")
    return "\n".join([DOC_BEGIN, *rows, DOC_END])
