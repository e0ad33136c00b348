"""Run an autoscaling policy over a trace in the simulator (virtual time) and measure it: SLO
attainment, replica-hours, failed requests, cold starts, and the replicas and TTFT over time.

`benchmarks/autoscale_eval.py` compares every policy with it; the `autoscaling` and
`predictive-scaling` labs run a few. Every policy sees the same trace, fleet type, starting replica
count, cold-start delay, bounds and decision interval (`EvalSetup`).
"""

from __future__ import annotations

import bisect
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferstack.autoscale.decision import Bounds, Decision, Policy
from inferstack.autoscale.driver import PolicyAutoscaler
from inferstack.autoscale.signals import PoolSample
from inferstack.sim.runner import SimArgs, build_settings, simulate
from inferstack.sim.simulation import Simulation


def diurnal_trace(path: Path, minutes: float, peak_rps: float, seed: int, bursts: int = 3,
                  trough: float = 0.15) -> Path:
    """Generic JSONL trace: a compressed day (trough at ``trough`` of the peak) with ``bursts``
    2-minute bursts at 2x the current rate; lengths log-normal around 1,000 in / 200 out
    (Azure-conversation-like)."""
    rng = random.Random(seed)
    span = minutes * 60.0
    starts = [span * (i + 1) / (bursts + 1) for i in range(bursts)]
    t, rows = 0.0, []
    while t < span:
        base = peak_rps * (trough + (1 - trough) * (0.5 - 0.5 * math.cos(2 * math.pi * t / span)))
        rate = base * (2.0 if any(b <= t < b + 120 for b in starts) else 1.0)
        t += rng.expovariate(rate)
        rows.append({"timestamp": round(t, 4), "input_tokens": int(min(8000, rng.lognormvariate(6.6, 0.8))),
                     "output_tokens": int(min(1000, max(4, rng.lognormvariate(5.0, 0.8))))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


WINDOW_S = 300.0   # what every policy may look back on


def mooncake_like_trace(path: Path, minutes: float, peak_rps: float, seed: int, documents: int = 40) -> Path:
    """A trace in Mooncake's JSONL layout (timestamp in ms, input/output lengths, one hash id per 512-token
    block): long prompts (log-normal, median ~3,000 tokens, at most 7,000 for the model's 8k context), most
    starting with one of ``documents`` shared documents (the same leading block ids), short outputs (median
    ~150), and
    arrivals twice as bursty as Poisson (Gamma gaps, shape 0.25) under a slow swing between 30 % and 100 %
    of ``peak_rps``. Like Mooncake's conversation trace in shape, not its numbers."""
    rng = random.Random(seed)
    span = minutes * 60.0
    docs = [int(min(6_000, rng.lognormvariate(7.6, 0.5))) for _ in range(documents)]
    t, rows, fresh = 0.0, [], 1_000_000
    while t < span:
        rate = peak_rps * (0.3 + 0.7 * (0.5 - 0.5 * math.cos(2 * math.pi * t / span)))
        t += rng.gammavariate(0.25, 1.0 / (0.25 * rate))
        length = int(min(7_000, max(64, rng.lognormvariate(8.0, 0.6))))
        doc = rng.randrange(documents) if rng.random() < 0.7 else None
        shared = min(length, docs[doc]) // 512 if doc is not None else 0
        blocks = [doc * 100 + i for i in range(shared)] + list(range(fresh, fresh + -(-length // 512) - shared))
        fresh += len(blocks)
        rows.append({"timestamp": round(t * 1000, 1), "input_length": length,
                     "output_length": int(min(1000, max(4, rng.lognormvariate(5.0, 0.7)))), "hash_ids": blocks})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@dataclass(frozen=True)
class EvalSetup:
    fleet: str = "l4:llama-3-8b"
    start: int = 1
    min_replicas: int = 1
    max_replicas: int = 24
    cold_start_s: float = 30.0
    interval_s: float = 10.0
    max_num_seqs: int = 32
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    seed: int = 1
    time_scale: float = 1.0
    bin_s: float = 30.0          # width of the latency-over-time bins


@dataclass(frozen=True)
class Oracle:
    """Hindsight, not a policy: it reads the trace's future arrivals and gives every interval exactly
    ``per_replica_rps`` of arrivals per replica, ordering each replica one cold start ahead and removing one only
    when no interval before a replacement could join needs it. What perfect foresight costs and attains on this
    trace and fleet: the bound a policy that only sees the past is measured against."""

    sent: tuple[float, ...]           # every request's send time, sorted
    per_replica_rps: float
    cold_start_s: float
    interval_s: float
    name: str = "oracle"

    def need(self, start: float, end: float) -> int:
        """The most replicas any interval in [start, end) needs."""
        most, t = 0, start
        while t < end:
            n = bisect.bisect_left(self.sent, t + self.interval_s) - bisect.bisect_left(self.sent, t)
            most, t = max(most, math.ceil(n / (self.interval_s * self.per_replica_rps))), t + self.interval_s
        return most

    def decide(self, window: Sequence[PoolSample], current: int) -> Decision:
        t = window[-1].t if window else 0.0
        lead = self.cold_start_s + self.interval_s
        joined = self.need(t + self.cold_start_s, t + lead)         # what a replica ordered now will meet
        desired = joined if joined >= current else max(joined, min(current, self.need(t, t + lead)))
        return Decision(self.name, current, desired, "hindsight")


def _latency_bins(cols: dict[str, Any], bin_s: float) -> list[tuple[float, float | None]]:
    """(bin start, p95 TTFT of the requests that finished in it) over the run."""
    end = np.asarray(cols["end"], dtype=float)
    ttft = np.asarray(cols["ttft"], dtype=float)
    if end.size == 0:
        return []
    out = []
    for b in range(int(np.nanmax(end) // bin_s) + 1):
        sel = ttft[(end >= b * bin_s) & (end < (b + 1) * bin_s)]
        sel = sel[~np.isnan(sel)]
        out.append((b * bin_s, float(np.percentile(sel, 95)) if sel.size else None))
    return out


def _miss_bins(sim: Simulation, bin_s: float) -> list[tuple[float, int, int]]:
    """(bin start, requests sent in it, of those the ones that missed the SLO or failed), by send time:
    where in the trace the misses come from (a burst's onset, a cold start after a scale-down)."""
    sink = sim.sink
    sent = sink.column("sent")
    if sent.size == 0 or sim.s.run.slo is None:
        return []
    included = np.frombuffer(sink.included, dtype=np.int8).astype(bool)
    missed = included & ~sink.met(sim.s.run.slo)
    bins = (sent // bin_s).astype(int)
    return [(b * bin_s, int((included & (bins == b)).sum()), int((missed & (bins == b)).sum()))
            for b in range(int(bins.max()) + 1)]


CAUSES = ("failed", "first cold start", "cold start after a scale-down", "cold start", "at the bound",
          "after a scale-down", "steady")


def miss_cause(t: float, ok: bool, timeline: Sequence[tuple[float, int, int]], setup: EvalSetup) -> str:
    """Why a request sent at ``t`` (completed: ``ok``) missed, from the fleet's decisions (time, replicas counted,
    desired) up to then; the first that applies of `CAUSES`: it failed (the trace's over-long prompts); it was
    sent before any ordered replica could be ready (the first decision plus a cold start); replicas ordered within
    the last cold start were still starting (the fleet was short and had already asked for more) and a scale-down
    came within two cold starts before (replicas removed that the order then had to buy back), or none did; the
    fleet was at its upper bound; a scale-down within two cold starts before; none of these (the replicas' own
    capacity, or routing)."""
    if not ok:
        return "failed"
    if t < setup.interval_s + setup.cold_start_s:
        return "first cold start"
    past = [(when, cur, want) for when, cur, want in timeline if when <= t]
    down = any(want < cur for when, cur, want in past if t - 2 * setup.cold_start_s <= when)
    if any(want > cur for when, cur, want in past if t - setup.cold_start_s < when):
        return "cold start after a scale-down" if down else "cold start"
    if past and past[-1][1] >= setup.max_replicas:
        return "at the bound"
    return "after a scale-down" if down else "steady"


def _miss_causes(sim: Simulation, timeline: Sequence[tuple[float, int, int]], setup: EvalSetup) -> dict[str, int]:
    """The run's misses (failed requests included) counted by `miss_cause`."""
    sink = sim.sink
    sent = sink.column("sent")
    if sent.size == 0 or sim.s.run.slo is None:
        return {}
    included = np.frombuffer(sink.included, dtype=np.int8).astype(bool)
    ok = np.frombuffer(sink.ok, dtype=np.int8).astype(bool)
    out = dict.fromkeys(CAUSES, 0)
    for i in np.flatnonzero(included & ~sink.met(sim.s.run.slo)):
        out[miss_cause(float(sent[i]), bool(ok[i]), timeline, setup)] += 1
    return out


def valid_attainment(sim: Simulation, setup: EvalSetup) -> float | None:
    """SLO attainment over the requests a fleet could have served in time: the requests the model refuses as
    invalid (HTTP 400, a prompt over its context: no fleet serves them; they stay failed requests, which the goal
    bounds by kpa's) and those sent before the first decision's replicas could be ready (``interval_s`` +
    ``cold_start_s``: every policy starts from the same fleet, so none can act on them) are left out, for every
    policy alike. None without an SLO or such requests."""
    sink = sim.sink
    sent = sink.column("sent")
    if sent.size == 0 or sim.s.run.slo is None:
        return None
    included = np.frombuffer(sink.included, dtype=np.int8).astype(bool)
    invalid = np.frombuffer(sink.invalid, dtype=np.int8).astype(bool)
    valid = included & ~invalid & (sent >= setup.interval_s + setup.cold_start_s)
    return float(sink.met(sim.s.run.slo)[valid].mean()) if valid.any() else None


def evaluate(name: str, policy: Policy, trace: Path, setup: EvalSetup) -> dict[str, Any]:
    """Simulate ``trace`` with ``policy`` scaling the fleet; the run's numbers and timelines."""
    args = SimArgs(fleet=[f"{setup.fleet}={setup.start}"],
                   workload=f"trace:path={trace},time_scale={setup.time_scale}",
                   slo=f"ttft={setup.slo_ttft_s}s,tpot={setup.slo_tpot_s * 1000:g}ms", seed=setup.seed,
                   max_num_seqs=setup.max_num_seqs, drain_timeout=120.0)
    settings = build_settings(args, None)
    # the window spans HPA's default 300 s scale-down stabilisation (it used to see 120 s of it)
    scaler = PolicyAutoscaler(policy, Bounds(setup.min_replicas, setup.max_replicas, idle_s=600),
                              interval_s=setup.interval_s, cold_start_s=setup.cold_start_s,
                              window_samples=max(8, math.ceil(WINDOW_S / setup.interval_s)))
    settings.autoscaler = scaler
    wall = time.perf_counter()
    sim, res = simulate(settings)
    s = res.summary
    counts = [d.current for _, _, d in scaler.decisions]
    timeline = [(t, d.current, d.desired) for t, _, d in scaler.decisions]
    return {"policy": name, "attainment": s["slo"]["attainment"], "attainment_valid": valid_attainment(sim, setup),
            "replica_hours": sum(counts) * setup.interval_s / 3600,
            "peak_replicas": max(counts, default=setup.start), "failed": s["requests"]["failed"],
            "requests": s["requests"]["sent"],
            "cold_starts": sum(max(0, d.desired - d.current) for _, _, d in scaler.decisions),
            "ttft_p95_s": (s["latency_s"]["ttft"] or {}).get("p95"), "wall_s": time.perf_counter() - wall,
            "timeline": timeline, "miss_causes": _miss_causes(sim, timeline, setup),
            "ttft_p95_over_time": _latency_bins(sim.sink.cols, setup.bin_s),
            "misses_over_time": _miss_bins(sim, setup.bin_s)}


UTIL = "hpa (GPU util"     # the utilisation baseline's rows: `hpa (GPU util T)`


ACCOUNTINGS = {"all": "attainment", "valid": "attainment_valid"}   # `--accounting`: the row key each one reads


def cheapest(rows: Sequence[dict[str, Any]], prefix: str, attainment: float,
             key: str = "attainment") -> dict[str, Any] | None:
    """The row named ``prefix``... with the fewest replica-hours among those whose ``key`` reaches ``attainment``."""
    ok = [r for r in rows if r["policy"].startswith(prefix) and (r.get(key) or 0.0) >= attainment]
    return min(ok, key=lambda r: r["replica_hours"], default=None)


def baseline(rows: Sequence[dict[str, Any]], goal: float, key: str = "attainment") -> dict[str, Any] | None:
    """The utilisation baseline: the cheapest GPU-util target whose ``key`` reaches ``goal``, else the
    best-attaining one (the same accounting as the rows it is compared with)."""
    util = [r for r in rows if r["policy"].startswith(UTIL)]
    return cheapest(rows, UTIL, goal, key) or max(util, key=lambda r: r.get(key) or 0.0, default=None)


@dataclass(frozen=True)
class Verdict:
    """One policy on one trace against the issue's goal."""

    policy: str
    attainment: float
    cost: float | None              # replica-hours / the utilisation baseline's; None without a baseline
    failed: int
    kpa_failed: int | None          # the failures the goal allows (kpa's); None without a kpa row
    met: bool


def judge(rows: Sequence[dict[str, Any]], goal: float = 0.99, max_cost: float = 0.75,
          ours: tuple[str, ...] = ("slo", "planner"), key: str = "attainment") -> list[Verdict]:
    """The goal, per row of ``ours`` on one trace: attainment (the row's ``key``: `ACCOUNTINGS`) >= ``goal``,
    replica-hours <= ``max_cost`` x the utilisation baseline's (`baseline`, by the same ``key``) and no more failed
    requests than kpa; not met without a baseline."""
    base = baseline(rows, goal, key)
    kpa = next((r["failed"] for r in rows if r["policy"].startswith("kpa")), None)
    out = []
    for r in rows:
        if not r["policy"].startswith(ours):
            continue
        cost = r["replica_hours"] / base["replica_hours"] if base and base["replica_hours"] > 0 else None
        attained = r.get(key) or 0.0
        met = attained >= goal and cost is not None and cost <= max_cost and (kpa is None or r["failed"] <= kpa)
        out.append(Verdict(r["policy"], attained, cost, r["failed"], kpa, met))
    return out
