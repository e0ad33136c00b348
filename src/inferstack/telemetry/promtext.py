"""Prometheus text exposition → flat samples, and the arithmetic Prometheus itself does on them.

The dashboard scrapes `/metrics` once a second and needs windowed rates and histogram quantiles
without a Prometheus server; these helpers reproduce `rate()` (counter resets included) and
`histogram_quantile()` (linear interpolation inside the bucket) on two scrapes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

Labels = tuple[tuple[str, str], ...]
SeriesKey = tuple[str, Labels]


@dataclass(frozen=True)
class Scrape:
    """One scrape of one target: sample name → sorted labels → value."""

    t: float
    by_name: Mapping[str, Mapping[Labels, float]]

    @property
    def samples(self) -> dict[SeriesKey, float]:
        return {(name, labels): v for name, series in self.by_name.items() for labels, v in series.items()}

    def select(self, name: str, **match: str) -> dict[Labels, float]:
        series = self.by_name.get(name, {})
        if not match:
            return dict(series)
        return {labels: v for labels, v in series.items()
                if all(dict(labels).get(k) == want for k, want in match.items())}

    def has(self, name: str) -> bool:
        return name in self.by_name


_LABEL = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')
_NAME = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}


def _unescape(v: str) -> str:
    if "\\" not in v:
        return v
    return re.sub(r'\\[\\"n]', lambda m: _UNESCAPE[m.group(0)], v)


def parse(text: str, t: float, names: Collection[str] | None = None,
          label_cache: dict[str, Labels] | None = None) -> Scrape:
    """Parse Prometheus text format (0.0.4) into samples; `_created` samples are dropped.

    `names` keeps only those sample names (e.g. `x_bucket`, `x_total`): the dashboard reads a dozen
    of the hundreds of series an engine exposes, and skipping the rest before their labels are
    parsed is most of the cost. `label_cache` (label text → parsed labels) saves re-parsing the same
    series on every scrape of a target. Raises ValueError on lines that are not exposition format.
    """
    if names is not None:
        return _parse_selected(text, t, frozenset(names), label_cache)
    by_name: dict[str, dict[Labels, float]] = {}
    checked = False
    # split on "\n" only: label values may hold \r, \u2028 and other characters splitlines() breaks on
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.strip(" \t")
        if not line or line[0] == "#":
            continue
        brace = line.find("{")
        space = line.find(" ")
        if brace != -1 and (space == -1 or brace < space):
            name = line[:brace]
            end = line.rfind("}")
            if end < brace:
                raise ValueError(f"not Prometheus text format (line {lineno}: unclosed labels): {raw[:80]!r}")
            label_text, rest = line[brace + 1:end], line[end + 1:]
        else:
            name, label_text, rest = line[:space] if space != -1 else line, "", line[space:] if space != -1 else ""
        if not checked:  # an HTML error page or the like fails here, even if every name is filtered out
            if not _NAME.fullmatch(name):
                raise ValueError(f"not Prometheus text format (line {lineno}): {raw[:80]!r}")
            checked = True
        if names is not None and name not in names:
            continue
        if name.endswith("_created"):
            continue
        parts = rest.split()
        if not parts:
            raise ValueError(f"not Prometheus text format (line {lineno}: no value): {raw[:80]!r}")
        try:
            value = float(parts[0])
        except ValueError:
            raise ValueError(f"not Prometheus text format (line {lineno}: bad value): {raw[:80]!r}") from None
        labels = label_cache.get(label_text) if label_cache is not None else None
        if labels is None:
            labels = _parse_labels(label_text, lineno, raw)
            if label_cache is not None:
                label_cache[label_text] = labels
        series = by_name.get(name)
        if series is None:
            series = by_name[name] = {}
        series[labels] = value
    return Scrape(t=t, by_name=by_name)


def _parse_selected(text: str, t: float, names: frozenset[str], label_cache: dict[str, Labels] | None) -> Scrape:
    """`parse` restricted to ``names``: the gateway scrapes every endpoint many times a second, and
    `str.find` on the few wanted names skips the hundreds of other lines without looking at them."""
    _check_format(text)
    by_name: dict[str, dict[Labels, float]] = {}
    for name in names:
        if name.endswith("_created"):
            continue
        pos = text.find(name)
        while pos != -1:
            end = text.find("\n", pos)
            end = len(text) if end == -1 else end
            after = pos + len(name)
            # a sample line starts with the name (HELP/TYPE lines and longer names do not match)
            if (pos == 0 or text[pos - 1] == "\n") and after < end and text[after] in "{ \t":
                labels, value = _sample(text, after, end, label_cache)
                by_name.setdefault(name, {})[labels] = value
            pos = text.find(name, end)
    return Scrape(t=t, by_name=by_name)


def _sample(text: str, after: int, end: int, label_cache: dict[str, Labels] | None) -> tuple[Labels, float]:
    """Labels and value of the sample line text[..end] whose name ends at ``after``."""
    line = text[after:end]
    try:
        if line[0] == "{":
            close = line.rfind("}")
            if close < 0:
                raise ValueError("unclosed labels")
            label_text, rest = line[1:close], line[close + 1:]
        else:
            label_text, rest = "", line
        value = float(rest.split()[0])
        labels = label_cache.get(label_text) if label_cache is not None else None
        if labels is None:
            labels = _parse_labels(label_text, 0, line)
            if label_cache is not None:
                label_cache[label_text] = labels
    except (ValueError, IndexError):
        lineno = text.count("\n", 0, after) + 1   # counted only when there is an error to report
        raise ValueError(f"not Prometheus text format (line {lineno}): {line[:80]!r}") from None
    return labels, value


def _check_format(text: str) -> None:
    """An HTML error page or the like fails here: the first sample line must start with a metric name."""
    start, lineno = 0, 1
    while start < len(text):
        end = text.find("\n", start)
        end = len(text) if end == -1 else end
        line = text[start:end].strip(" \t")
        if line and line[0] != "#":
            name = _NAME.match(line)
            if name is None or (name.end() < len(line) and line[name.end()] not in "{ \t"):
                raise ValueError(f"not Prometheus text format (line {lineno}): {line[:80]!r}")
            return
        start, lineno = end + 1, lineno + 1


def _parse_labels(label_text: str, lineno: int, raw: str) -> Labels:
    labels: list[tuple[str, str]] = []
    pos = 0
    while pos < len(label_text):
        m = _LABEL.match(label_text, pos)
        if m is None:
            raise ValueError(f"not Prometheus text format (line {lineno}: bad labels): {raw[:80]!r}")
        labels.append((m.group(1), _unescape(m.group(2))))
        pos = m.end()
    return tuple(sorted(labels))


def sample_names(histograms: Iterable[str] = (), counters: Iterable[str] = (),
                 gauges: Iterable[str] = ()) -> frozenset[str]:
    """The sample names a metric set exposes (histogram `_bucket/_count/_sum`, counter `_total`)."""
    out = set(gauges) | {c if c.endswith("_total") else f"{c}_total" for c in counters}
    for h in histograms:
        out |= {f"{h}_bucket", f"{h}_count", f"{h}_sum"}
    return frozenset(out)


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
