"""The dashboard's server-side memory: a ring of scrapes per target turned into windowed chart points.

Input, once per tick, is what a `state_provider` returns (see `dashboard.py`): the gateway's own
Prometheus text and, per endpoint, its health and Prometheus text. Output is JSON for the page:
one point per tick per chart series (percentiles and rates over the last `window_s` seconds, gauges
as read), kept for `history_s` seconds, plus the endpoint table.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from inferstack.telemetry.promtext import (
    Scrape,
    bucket_increase,
    counter_increase,
    histogram_quantile,
    merge_buckets,
    parse,
    sample_names,
)

QUANTILES = (("p50", 0.5), ("p95", 0.95), ("p99", 0.99))

# Latency charts: (chart id, title, gateway histogram, engine histogram used when the gateway has none).
LATENCY_CHARTS = (
    ("ttft", "Time to first token", "gen_ai_server_time_to_first_token_seconds",
     "vllm:time_to_first_token_seconds"),
    ("tpot", "Time per output token", "gen_ai_server_time_per_output_token_seconds",
     "vllm:request_time_per_output_token_seconds"),
    ("itl", "Inter-token latency", "inferstack_gateway_inter_token_latency_seconds",
     "vllm:inter_token_latency_seconds"),
)

# Everything the charts read; the rest of an exposition is skipped unparsed.
WANTED = sample_names(
    histograms=[h for _, _, gw, engine in LATENCY_CHARTS for h in (gw, engine)],
    counters=["inferstack_gateway_tokens", "inferstack_gateway_requests", "inferstack_gateway_shed",
              "inferstack_gateway_retries", "inferstack_gateway_routing_decisions", "vllm:prompt_tokens",
              "vllm:generation_tokens", "vllm:request_success", "vllm:prefix_cache_queries",
              "vllm:prefix_cache_hits"],
    gauges=["inferstack_gateway_queue_depth", "vllm:num_requests_waiting", "vllm:num_requests_running",
            "vllm:kv_cache_usage_perc", "inferstack_autoscaler_desired_replicas", "inferstack_autoscaler_replicas",
            "inferstack_gateway_held_requests"],
)

CHART_META: dict[str, dict[str, str]] = {
    "ttft": {"title": "Time to first token", "unit": "s"},
    "tpot": {"title": "Time per output token", "unit": "s"},
    "itl": {"title": "Inter-token latency", "unit": "s"},
    "throughput": {"title": "Token throughput", "unit": "tok/s"},
    "requests": {"title": "Requests by status", "unit": "req/s"},
    "queue": {"title": "Waiting requests per endpoint", "unit": "req"},
    "kv": {"title": "KV cache use per endpoint", "unit": "%"},
    "prefix_hit": {"title": "Prefix cache hit rate per endpoint", "unit": "%"},
    "routing": {"title": "Routing decisions (by deciding scorer), sheds, retries", "unit": "/s"},
    "replicas": {"title": "Autoscaler: desired vs actual replicas, held requests", "unit": "count"},
}


def _replicas(latest: Scrape) -> dict[str, float | None]:
    """Desired and actual replicas by state (summed over pools) and requests held for a cold start;
    empty unless an autoscaler reports to this gateway (docs/autoscaling.md)."""
    out: dict[str, float | None] = {}
    desired = latest.select("inferstack_autoscaler_desired_replicas")
    if not desired:
        return out
    out["desired"] = _finite(sum(desired.values()))
    for labels, v in latest.select("inferstack_autoscaler_replicas").items():
        state = dict(labels).get("state", "ready")
        out[state] = (out.get(state) or 0.0) + v
    held = latest.select("inferstack_gateway_held_requests")
    if held:
        out["held requests"] = _finite(sum(held.values()))
    return out


_Pair = tuple[Scrape, Scrape]   # the first and last scrape of a window


@dataclass
class _Target:
    scrapes: deque[Scrape] = field(default_factory=deque)
    labels: dict[str, tuple[tuple[str, str], ...]] = field(default_factory=dict)  # parse cache

    def add(self, scrape: Scrape, keep_s: float) -> None:
        self.scrapes.append(scrape)
        while len(self.scrapes) > 2 and scrape.t - self.scrapes[0].t > keep_s:
            self.scrapes.popleft()

    def window(self, window_s: float) -> _Pair | None:
        """(oldest scrape inside the window, newest), or None with fewer than two scrapes."""
        if len(self.scrapes) < 2:
            return None
        newest = self.scrapes[-1]
        for s in self.scrapes:
            if newest.t - s.t <= window_s + 1e-6 and s is not newest:
                return s, newest
        return self.scrapes[-2], newest


def _rate(pair: _Pair | None, name: str, by: str | None = None) -> dict[str, float]:
    if pair is None:
        return {}
    old, new = pair
    dt = new.t - old.t
    if dt <= 0:
        return {}
    return {k: v / dt for k, v in counter_increase(old, new, name, by).items()}


def _finite(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) or math.isinf(v) else round(v, 6)


def _latencies(gw: _Pair | None, eps: dict[str, _Pair | None]) -> dict[str, dict[str, float | None]]:
    """Quantiles per latency chart: the gateway's histograms when it has them, else the engines' merged."""
    point: dict[str, dict[str, float | None]] = {}
    for chart, _title, gw_metric, engine_metric in LATENCY_CHARTS:
        if gw and gw[1].has(f"{gw_metric}_bucket"):
            buckets = bucket_increase(gw[0], gw[1], gw_metric)
        else:
            buckets = merge_buckets(bucket_increase(p[0], p[1], engine_metric) for p in eps.values() if p)
        point[chart] = {label: _finite(histogram_quantile(q, buckets)) for label, q in QUANTILES}
    return point


def _throughput(gw: _Pair | None, eps: dict[str, _Pair | None]) -> dict[str, float | None]:
    """Input and output tokens per second (the gateway's count, else the engines' sums)."""
    tokens: dict[str, float] = {}
    if gw and gw[1].has("inferstack_gateway_tokens_total"):
        tokens = _rate(gw, "inferstack_gateway_tokens_total", by="type")
    elif any(eps.values()):
        tokens = {"input": 0.0, "output": 0.0}
        for p in eps.values():
            tokens["input"] += sum(_rate(p, "vllm:prompt_tokens_total").values())
            tokens["output"] += sum(_rate(p, "vllm:generation_tokens_total").values())
    return {k: _finite(v) for k, v in tokens.items()}


def _requests(gw: _Pair | None, eps: dict[str, _Pair | None]) -> dict[str, float | None]:
    """Requests per second by status at the gateway, else by finish reason summed over the engines."""
    if gw and gw[1].has("inferstack_gateway_requests_total"):
        return {k or "unknown": _finite(v) for k, v in _rate(gw, "inferstack_gateway_requests_total", "status").items()}
    by_reason: dict[str, float] = {}
    for p in eps.values():
        for k, v in _rate(p, "vllm:request_success_total", "finished_reason").items():
            by_reason[k] = by_reason.get(k, 0.0) + v
    return {f"finished:{k}": _finite(v) for k, v in by_reason.items()}


def _routing(gw: _Pair | None) -> dict[str, float | None]:
    """The gateway's routing decisions per deciding scorer, sheds and retries per second."""
    routing: dict[str, float | None] = {}
    if gw:
        for k, v in _rate(gw, "inferstack_gateway_routing_decisions_total", "scorer").items():
            routing[f"decided by {k}" if k else "decisions"] = _finite(v)
        for metric, label in (("inferstack_gateway_shed_total", "shed"),
                              ("inferstack_gateway_retries_total", "retries")):
            if gw[1].has(metric):
                routing[label] = _finite(sum(_rate(gw, metric).values()))
    return routing


class DashboardHistory:
    """Ring buffer of raw scrapes (for windows) and of computed points (for the charts)."""

    def __init__(self, window_s: float = 10.0, history_s: float = 300.0) -> None:
        self.window_s = window_s
        self.history_s = history_s
        self._gateway = _Target()
        self._endpoints: dict[str, _Target] = {}
        self._points: deque[tuple[float, dict[str, dict[str, float | None]]]] = deque()
        self._table: list[dict[str, Any]] = []
        self._errors: list[str] = []

    def ingest(self, state: dict[str, Any], now: float) -> None:
        """Take one provider state (see dashboard.py for its shape) and append a chart point."""
        keep = self.window_s + 2.0
        self._errors = []
        gateway = state.get("gateway") or {}
        if gateway.get("metrics"):
            self._add(self._gateway, gateway["metrics"], now, keep, "gateway")
        seen = set()
        table = []
        for ep in state.get("endpoints") or []:
            name = str(ep.get("name") or ep.get("url"))
            seen.add(name)
            target = self._endpoints.setdefault(name, _Target())
            if ep.get("metrics"):
                self._add(target, ep["metrics"], now, keep, name)
            table.append(self._row(name, ep, target, now))
        for name in list(self._endpoints):
            if name not in seen:
                del self._endpoints[name]
        self._table = table
        self._points.append((now, self._point()))
        while self._points and now - self._points[0][0] > self.history_s:
            self._points.popleft()

    def _add(self, target: _Target, text: str, now: float, keep: float, who: str) -> None:
        try:
            if len(target.labels) > 50_000:  # label churn (e.g. many tenants): start over, stay bounded
                target.labels.clear()
            target.add(parse(text, now, WANTED, target.labels), keep)
        except ValueError as e:
            self._errors.append(f"{who}: {e}")

    def _row(self, name: str, ep: dict[str, Any], target: _Target, now: float) -> dict[str, Any]:
        latest = target.scrapes[-1] if target.scrapes else None
        fresh = latest is not None and now - latest.t <= max(3.0, 3 * self.window_s / 10)

        def gauge(metric: str) -> float | None:
            if not fresh or latest is None:
                return None
            values = latest.select(metric)
            return sum(values.values()) if values else None

        kv = gauge("vllm:kv_cache_usage_perc")
        pair = target.window(self.window_s)
        queries = sum(_rate(pair, "vllm:prefix_cache_queries_total").values())
        hits = sum(_rate(pair, "vllm:prefix_cache_hits_total").values())
        return {
            "name": name,
            "url": ep.get("url"),
            "model": ep.get("model"),
            "role": ep.get("role"),
            "state": ep.get("state") or ("ready" if ep.get("healthy") else "down"),
            "healthy": bool(ep.get("healthy")),
            "running": gauge("vllm:num_requests_running"),
            "waiting": gauge("vllm:num_requests_waiting"),
            "kv_percent": _finite(kv * 100) if kv is not None else None,
            "prefix_hit_percent": _finite(100 * hits / queries) if queries > 0 else None,
            "restarts": ep.get("restarts", 0),
            "scrape_age_s": round(now - latest.t, 3) if latest else None,
        }

    def _point(self) -> dict[str, dict[str, float | None]]:
        gw = self._gateway.window(self.window_s)
        eps = {name: t.window(self.window_s) for name, t in self._endpoints.items()}
        point = _latencies(gw, eps)
        point["throughput"] = _throughput(gw, eps)
        point["requests"] = _requests(gw, eps)
        point.update(self._per_endpoint(gw, eps))
        point["routing"] = _routing(gw)
        point["replicas"] = _replicas(gw[1]) if gw else {}
        return point

    def _per_endpoint(self, gw: _Pair | None, eps: dict[str, _Pair | None]) -> dict[str, dict[str, float | None]]:
        """Each engine's queue, KV usage and prefix hit rate (and the gateway's own queue depth)."""
        queue: dict[str, float | None] = {}
        kv: dict[str, float | None] = {}
        hit: dict[str, float | None] = {}
        for name, target in self._endpoints.items():
            latest = target.scrapes[-1] if target.scrapes else None
            if latest is None:
                continue
            waiting = latest.select("vllm:num_requests_waiting")
            queue[name] = _finite(sum(waiting.values())) if waiting else None
            usage = latest.select("vllm:kv_cache_usage_perc")
            kv[name] = _finite(100 * sum(usage.values())) if usage else None
            q = sum(_rate(eps.get(name), "vllm:prefix_cache_queries_total").values())
            h = sum(_rate(eps.get(name), "vllm:prefix_cache_hits_total").values())
            hit[name] = _finite(100 * h / q) if q > 0 else None
        if gw:
            depth = gw[1].select("inferstack_gateway_queue_depth")
            if depth:
                queue["gateway queue"] = _finite(sum(depth.values()))
        return {"queue": queue, "kv": kv, "prefix_hit": hit}

    def render(self, since: float | None = None) -> dict[str, Any]:
        """JSON for the page: per chart, per series, [[t, v], ...] (points after `since` only)."""
        charts: dict[str, Any] = {}
        for chart, meta in CHART_META.items():
            series: dict[str, list[list[float | None]]] = {}
            for t, point in self._points:
                if since is not None and t <= since:
                    continue
                for name, value in point.get(chart, {}).items():
                    series.setdefault(name, []).append([round(t, 3), value])
            charts[chart] = {**meta, "series": series}
        return {
            "t": self._points[-1][0] if self._points else None,
            "window_s": self.window_s,
            "history_s": self.history_s,
            "charts": charts,
            "endpoints": self._table,
            "errors": self._errors,
        }
