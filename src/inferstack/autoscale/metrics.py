"""`inferstack_autoscaler_*`: what an actuator decided and has, as Prometheus series.

An actuator keeps an `AutoscalerStatus` per pool and role (desired and actual replicas, decision
counts) and exports it through `AutoscalerCollector` on any registry: the local supervisor hands its
status to the gateway (`PUT /admin/pools/{pool}/autoscaler`), so the gateway's /metrics, dashboard
and Prometheus carry it next to the load it acted on. The status is desired state (cumulative counts),
so a resent or repeated report never double-counts.

Decision reasons are free text with numbers (`panic: 6s demand wants 12`); the `reason` label keeps the
text with each number replaced by `N`, so its values are bounded by the policies' templates.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from inferstack.autoscale.decision import Decision

_NUMBER = re.compile(r"(?<![A-Za-z_0-9.])[0-9]+(\.[0-9]+)?(e-?[0-9]+)?")  # not the 95 of p95
PREFIX = "inferstack_autoscaler_"


def reason_label(reason: str) -> str:
    """The reason with numbers replaced by N (bounded label values), at most 80 characters."""
    return _NUMBER.sub("N", reason)[:80]


@dataclass
class AutoscalerStatus:
    """One pool (and role) under one policy: the newest decision and the replicas by state."""

    pool: str
    role: str
    policy: str
    desired: int = 0
    ready: int = 0
    starting: int = 0
    draining: int = 0
    decisions: dict[tuple[str, str], int] = field(default_factory=dict)  # (direction, reason label) -> count

    def decided(self, d: Decision) -> None:
        self.desired = d.desired
        key = (d.direction, reason_label(d.reason))
        self.decisions[key] = self.decisions.get(key, 0) + 1

    def to_json(self) -> dict:
        return {"role": self.role, "policy": self.policy, "desired": self.desired, "ready": self.ready,
                "starting": self.starting, "draining": self.draining,
                "decisions": [{"direction": d, "reason": r, "count": n} for (d, r), n in self.decisions.items()]}

    @classmethod
    def from_json(cls, pool: str, raw: dict) -> AutoscalerStatus:
        """Raises KeyError/TypeError/ValueError on a malformed report."""
        decisions = {(str(d["direction"]), reason_label(str(d["reason"]))): int(d["count"])
                     for d in raw.get("decisions", [])}
        counts = {k: int(raw.get(k, 0)) for k in ("desired", "ready", "starting", "draining")}
        if any(v < 0 for v in counts.values()) or any(v < 0 for v in decisions.values()):
            raise ValueError("replica and decision counts must be >= 0")
        return cls(pool, str(raw.get("role", "both")), str(raw["policy"]), **counts, decisions=decisions)


_DOC = [
    (PREFIX + "desired_replicas", "gauge", ("pool", "role", "policy"),
     "Replicas the autoscaling policy wants, after the min/max bounds."),
    (PREFIX + "replicas", "gauge", ("pool", "role", "state"),
     "Replicas the actuator has, by state (ready: in the pool; starting: cold start; draining: leaving)."),
    (PREFIX + "decisions_total", "counter", ("pool", "role", "policy", "direction", "reason"),
     "Autoscaling decisions by policy, direction (up, down, hold) and reason (numbers as N)."),
]


def doc_rows() -> list[str]:
    """The rows of docs/metrics.md's autoscaler table (`telemetry/metrics_doc.py`)."""
    rows = ["| name | type | labels | meaning |", "|---|---|---|---|"]
    for name, kind, labels, doc in _DOC:
        rows.append(f"| `{name}` | {kind} | {', '.join(f'`{x}`' for x in labels)} | {doc} |")
    return rows


class AutoscalerCollector:
    """Exports the statuses ``source`` returns at scrape time."""

    def __init__(self, source: Callable[[], Iterable[AutoscalerStatus]]) -> None:
        self.source = source

    def describe(self) -> list:
        return []  # collected lazily: the families exist only once an actuator reported

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        (dname, _, dlabels, ddoc), (aname, _, alabels, adoc), (cname, _, clabels, cdoc) = _DOC
        desired = GaugeMetricFamily(dname, ddoc, labels=list(dlabels))
        actual = GaugeMetricFamily(aname, adoc, labels=list(alabels))
        decisions = CounterMetricFamily(cname.removesuffix("_total"), cdoc, labels=list(clabels))
        for s in self.source():
            desired.add_metric([s.pool, s.role, s.policy], s.desired)
            for state, n in (("ready", s.ready), ("starting", s.starting), ("draining", s.draining)):
                actual.add_metric([s.pool, s.role, state], n)
            for (direction, reason), n in sorted(s.decisions.items()):
                decisions.add_metric([s.pool, s.role, s.policy, direction, reason], n)
        yield desired
        yield actual
        yield decisions
