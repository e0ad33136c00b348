"""Prometheus text exposition → flat samples, and the arithmetic Prometheus itself does on them.

The dashboard scrapes `/metrics` once a second and needs windowed rates and histogram quantiles
without a Prometheus server; these helpers reproduce `rate()` (counter resets included) and
`histogram_quantile()` (linear interpolation inside the bucket) on two scrapes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]


@dataclass(frozen=True)
class Scrape:
    """One scrape of one target: sample name + sorted labels → value."""

    t: float
    samples: Mapping[SeriesKey, float]

    def select(self, name: str, **match: str) -> dict[Labels, float]:
        out: dict[Labels, float] = {}
        for (sample_name, labels), value in self.samples.items():
            if sample_name != name:
                continue
            lab = dict(labels)
            if all(lab.get(k) == v for k, v in match.items()):
                out[labels] = value
        return out

    def has(self, name: str) -> bool:
        return any(sample_name == name for sample_name, _ in self.samples)


def parse(text: str, t: float) -> Scrape:
    """Parse Prometheus text format; `_created` samples are dropped (they are timestamps, not values).

    Raises ValueError on text that is not Prometheus exposition format.
    """
    samples: dict[SeriesKey, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                samples[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
    except Exception as e:  # the parser raises bare ValueError/IndexError/KeyError on malformed lines
        raise ValueError(f"not Prometheus text format: {e}") from e
    return Scrape(t=t, samples=samples)


def _label(labels: Labels, name: str) -> str:
    for k, v in labels:
        if k == name:
            return v
    return ""


def counter_increase(old: Scrape, new: Scrape, name: str, by: str | None = None) -> dict[str, float]:
    """Increase of counter `name` between two scrapes, summed per value of label `by` (or under "").

    A value lower than before means the process restarted: the new value is the increase, like
    Prometheus' `increase()`. A series absent from `old` started from zero inside the window.
    """
    out: dict[str, float] = {}
    before = old.select(name)
    for labels, value in new.select(name).items():
        prev = before.get(labels, 0.0)
        delta = value - prev if value >= prev else value
        key = _label(labels, by) if by else ""
        out[key] = out.get(key, 0.0) + delta
    return out


def bucket_increase(old: Scrape, new: Scrape, name: str) -> dict[float, float]:
    """Per-`le` increase of histogram `name`, summed over all other labels (`sum by (le)`)."""
    out: dict[float, float] = {}
    for le, delta in counter_increase(old, new, f"{name}_bucket", by="le").items():
        bound = math.inf if le in ("+Inf", "Inf") else float(le)
        out[bound] = out.get(bound, 0.0) + delta
    return out


def merge_buckets(parts: Iterable[Mapping[float, float]]) -> dict[float, float]:
    out: dict[float, float] = {}
    for part in parts:
        for le, v in part.items():
            out[le] = out.get(le, 0.0) + v
    return out


def histogram_quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """Prometheus' `histogram_quantile` over cumulative bucket counts; None when there are no events.

    Linear interpolation inside the bucket that holds the rank; the lowest bucket interpolates from 0;
    a rank in the +Inf bucket returns the highest finite bound, as Prometheus does.
    """
    if not buckets:
        return None
    bounds = sorted(buckets)
    counts = [buckets[b] for b in bounds]
    # Cumulative counts can look non-monotonic when buckets were scraped mid-update; fix like Prometheus.
    for i in range(1, len(counts)):
        counts[i] = max(counts[i], counts[i - 1])
    total = counts[-1]
    if total <= 0 or not math.isinf(bounds[-1]):
        return None
    rank = q * total
    for i, (bound, count) in enumerate(zip(bounds, counts, strict=True)):
        if count >= rank:
            if math.isinf(bound):
                return bounds[-2] if len(bounds) > 1 else None
            lower = bounds[i - 1] if i > 0 else 0.0
            below = counts[i - 1] if i > 0 else 0.0
            in_bucket = count - below
            if in_bucket <= 0:
                return bound
            return lower + (bound - lower) * (rank - below) / in_bucket
    return None
