"""Numbers every lab reads out of an `inferstack bench` summary."""

from __future__ import annotations

from typing import Any


def latency(summary: dict[str, Any], metric: str, q: str) -> float | None:
    """A latency percentile in seconds (``q``: p50, p90, p99, mean), None when nothing finished."""
    dist = (summary.get("latency_s") or {}).get(metric)
    return dist.get(q) if dist else None


def completed(summary: dict[str, Any]) -> int:
    return int(summary["requests"]["completed"])


def req_per_s(summary: dict[str, Any]) -> float:
    return float(summary["throughput"]["requests_per_s"])


def hit_rate(summary: dict[str, Any]) -> float | None:
    return (summary.get("prefix_cache_client") or {}).get("hit_rate")


def ms(v: float | None) -> float | None:
    return None if v is None else v * 1000
