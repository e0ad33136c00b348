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


def compare(name: str, a_label: str, a: float | None, b_label: str, b: float | None, unit: str = "ms") -> str:
    """"NAME: A x unit for a_label vs B for b_label (R x lower/higher for b_label)", from the numbers."""
    if a is None or b is None or a <= 0 or b <= 0:
        return f"{name}: {a_label} {a} vs {b_label} {b} (not comparable)"
    r = a / b
    how = f"{r:.1f}x lower" if r >= 1 else f"{1 / r:.1f}x higher"
    return f"{name}: {a_label} {a:.1f} {unit}, {b_label} {b:.1f} {unit} ({how} with {b_label})"
