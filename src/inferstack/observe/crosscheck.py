"""eBPF's latency histograms against the observed server's own, over the same requests.

The server's histograms are read from its `/metrics` before and after the requests (the increase);
observe's come from its own registry, which only holds those requests. The two use different bucket
bounds (vLLM's vs the gateway's), so they are compared at the bounds both have. Counts must be equal.

- Gaps (ITL) are the same events seen at two places: the cumulative counts at a bound may differ
  only by samples within ``tol_s`` of it, and the means by at most ``tol_s``.
- TTFT is not the same span: the engine times from its request handler to its token, eBPF from the
  socket read to the chunk's write, so eBPF's also holds the HTTP parsing, tokenizing and writing the
  server does around it. eBPF's must therefore be the longer: its cumulative count at a bound never
  above the server's (beyond samples within ``tol_s``), its mean not below the server's by more than
  ``tol_s``. The mean difference is that server-side overhead, reported, not bounded.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from inferstack.observe.exchange import ObservedRequest
from inferstack.telemetry.promtext import Scrape, bucket_increase, counter_increase

# (what, the server's histogram, observe's histogram) for our engine (vLLM's names)
ENGINE_PAIRS = (("ttft", "vllm:time_to_first_token_seconds", "gen_ai_server_time_to_first_token_seconds"),
                ("itl", "vllm:inter_token_latency_seconds", "inferstack_gateway_inter_token_latency_seconds"))
# our gateway exports the same names observe does
GATEWAY_PAIRS = (("ttft", "gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_to_first_token_seconds"),
                 ("itl", "inferstack_gateway_inter_token_latency_seconds",
                  "inferstack_gateway_inter_token_latency_seconds"))


@dataclass(frozen=True)
class HistogramCheck:
    what: str
    server_count: float
    ebpf_count: float
    server_mean_s: float
    ebpf_mean_s: float
    bucket_diff: dict[float, float]      # common bound -> eBPF's cumulative count minus the server's
    slack: dict[float, int]              # common bound -> eBPF samples within tol_s of it
    tol_s: float
    spans_server: bool = False           # eBPF's span holds the server's (TTFT): one-sided bounds

    @property
    def mean_diff_ms(self) -> float:
        return (self.ebpf_mean_s - self.server_mean_s) * 1e3

    @property
    def agrees(self) -> bool:
        tol_ms = self.tol_s * 1e3
        if self.server_count != self.ebpf_count or not self.server_count:
            return False
        if self.spans_server:
            return self.mean_diff_ms >= -tol_ms and all(d <= self.slack[le] for le, d in self.bucket_diff.items())
        return abs(self.mean_diff_ms) <= tol_ms and all(abs(d) <= self.slack[le] for le, d in self.bucket_diff.items())

    def to_dict(self) -> dict:
        return {"count_server": self.server_count, "count_ebpf": self.ebpf_count,
                "mean_server_ms": round(self.server_mean_s * 1e3, 3), "mean_ebpf_ms": round(self.ebpf_mean_s * 1e3, 3),
                "mean_diff_ms": round(self.mean_diff_ms, 3), "agrees": self.agrees,
                "buckets": {f"{le:g}": {"diff": d, "slack": self.slack[le]} for le, d in self.bucket_diff.items()}}


def samples(requests: Sequence[ObservedRequest]) -> dict[str, list[float]]:
    """Per-request TTFT and every chunk gap (seconds), as observe's histograms record them."""
    out: dict[str, list[float]] = {"ttft": [], "itl": []}
    for r in requests:
        if not r.openai or r.error or not r.streamed or not r.chunk_ns or not 200 <= r.status_code < 300:
            continue
        out["ttft"].append((r.chunk_ns[0] - r.arrival_ns) / 1e9)
        out["itl"] += [(b - a) / 1e9 for a, b in zip(r.chunk_ns, r.chunk_ns[1:], strict=False)]
    return out


def _totals(before: Scrape, after: Scrape, name: str) -> tuple[dict[float, float], float, float]:
    buckets = bucket_increase(before, after, name)
    count = sum(counter_increase(before, after, f"{name}_count").values())
    total = sum(counter_increase(before, after, f"{name}_sum").values())
    return buckets, count, total


def compare(server_before: Scrape, server_after: Scrape, ebpf: Scrape, values: dict[str, list[float]],
            pairs: Sequence[tuple[str, str, str]] = ENGINE_PAIRS, tol_s: float = 0.002) -> list[HistogramCheck]:
    """One check per (what, server histogram, eBPF histogram); ``values`` from :func:`samples`."""
    empty = Scrape(t=0.0, by_name={})
    checks = []
    for what, server_name, ebpf_name in pairs:
        s_buckets, s_count, s_sum = _totals(server_before, server_after, server_name)
        e_buckets, e_count, e_sum = _totals(empty, ebpf, ebpf_name)
        common = sorted(le for le in set(s_buckets) & set(e_buckets) if not math.isinf(le))
        diff = {le: e_buckets[le] - s_buckets[le] for le in common}
        slack = {le: sum(abs(v - le) <= tol_s for v in values[what]) for le in common}
        checks.append(HistogramCheck(what, s_count, e_count, s_sum / s_count if s_count else math.nan,
                                     e_sum / e_count if e_count else math.nan, diff, slack, tol_s,
                                     spans_server=what == "ttft"))
    return checks
