"""Flow control on vs off, paired: `gateway_routing.py --repeats N` runs N pairs of runs over the same
arrival schedule (the same seed: the same requests, groups and send times), in ABBA order (on, off, off,
on, ...) so a drift of the machine's load over the minutes weighs on both sides alike, and compares them.

Why not the p90 of one run each: on this workload the p90 of one 40 s run moves by a third between
identical runs (which engine ends up holding which hot tenant depends on timing), so a single on/off
difference says nothing about 10 %. What is printed instead:
- what flow control did in the "on" runs (requests that waited in its queue, their wait, refusals):
  when nothing waited, "on" ran the same routing code as "off" plus the admission check;
- the ratio of the pooled TTFT p90s (all "on" requests against all "off" requests) with a 95 % cluster
  bootstrap interval (pairs resampled whole: the run-to-run spread is the noise that matters, not the
  request-to-request one), and the geometric mean of the per-pair p90 ratios;
- an A/A reference: the same pooled ratio between the "off" runs of even and of odd pairs, two halves of
  identical conditions: how far from 1.0 the method lands when nothing differs;
- the same over the requests sent after a warm-up (`--warmup-s`): on the held-out load flow control queued
  only while the 32 prefix caches filled, and those seconds weigh heavily in a 40 s run's p90;
- routing agreement: the share of requests (same index q, same arrival) sent to the same engine in the
  "on" and "off" run of a pair, against the same share between the "off" runs of consecutive pairs (its
  null: identical settings, so whatever disagreement shows there is timing, not flow control).
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Callable, Sequence

from gateway_common import pct

Pair = tuple[dict, dict]  # (flow control on, flow control off) rows of `gateway_routing.run_point`


def paired_runs(run: Callable[[bool], dict], repeats: int, warmup_s: float = 0.0) -> list[dict]:
    """``repeats`` pairs of ``run(flow_control_on)`` in ABBA order; prints the comparison over all requests and,
    with ``warmup_s``, over those sent after it; returns the rows."""
    pairs: list[Pair] = []
    for k in range(repeats):
        first = k % 2 == 0  # on first in even pairs, off first in odd ones
        a, b = run(first), run(not first)
        pairs.append((a, b) if first else (b, a))
    print("\nAll requests:")
    print_comparison(pairs)
    if warmup_s > 0:
        print(f"\nRequests sent after the first {warmup_s:g} s (prefix caches warm):")
        print_comparison([(after(on, warmup_s), after(off, warmup_s)) for on, off in pairs])
    return [row for pair in pairs for row in pair]


def after(row: dict, since_s: float) -> dict:
    """``row`` restricted to the requests scheduled at or after ``since_s`` (TTFT p90 and counts recomputed; the
    gateway's flow-control counts are for the whole run, so they are left out)."""
    keep = {q for q, t in row["sent_s_by_q"].items() if t >= since_s}
    ttft = {q: v for q, v in row["ttft_by_q"].items() if q in keep}
    endpoints = {q: e for q, e in row["endpoint_by_q"].items() if q in keep}
    return {**row, "flow": {}, "ttft_by_q": ttft, "endpoint_by_q": endpoints,
            "ttft_p90_s": pct(list(ttft.values()), 0.9), "ok": len(ttft), "sent": len(keep)}


def pooled_p90(rows: Sequence[dict]) -> float:
    return pct([t for r in rows for t in r["ttft_by_q"].values()], 0.9)


def pooled_ratio(pairs: Sequence[Pair]) -> float:
    """TTFT p90 over every "on" request / the same over every "off" request."""
    return pooled_p90([on for on, _ in pairs]) / pooled_p90([off for _, off in pairs])


def geomean_ratio(pairs: Sequence[Pair]) -> float:
    return math.exp(statistics.fmean(math.log(on["ttft_p90_s"] / off["ttft_p90_s"]) for on, off in pairs))


def cluster_interval(pairs: Sequence[Pair], statistic: Callable[[Sequence[Pair]], float],
                     rounds: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of ``statistic`` with whole pairs resampled."""
    rng = random.Random(seed)
    values = sorted(statistic(rng.choices(pairs, k=len(pairs))) for _ in range(rounds))
    return values[int(0.025 * rounds)], values[int(0.975 * rounds) - 1]


def same_endpoint(a: dict, b: dict) -> float:
    """Share of the requests both runs sent whose engine (by position in the pool) was the same."""
    ea, eb = a["endpoint_by_q"], b["endpoint_by_q"]
    both = [q for q in ea if q in eb]
    return sum(ea[q] == eb[q] for q in both) / len(both) if both else float("nan")


def paired_ttft_diff(pairs: Sequence[Pair]) -> tuple[float, float]:
    """Median per-request TTFT difference on - off (same q, same pair), over all requests and over those
    routed to the same engine in both runs, in seconds."""
    every: list[float] = []
    same: list[float] = []
    for on, off in pairs:
        for q, t in on["ttft_by_q"].items():
            if q in off["ttft_by_q"]:
                every.append(t - off["ttft_by_q"][q])
                if on["endpoint_by_q"].get(q) == off["endpoint_by_q"].get(q):
                    same.append(t - off["ttft_by_q"][q])
    return (statistics.median(every) if every else math.nan, statistics.median(same) if same else math.nan)


def verdict(low: float, high: float, bound: float = 0.10) -> str:
    if 1 - bound <= low and high <= 1 + bound:
        return f"shown: the whole interval is within {bound:.0%}"
    if low > 1 + bound:
        return f"on is slower by more than {bound:.0%}"
    return f"not resolved at {bound:.0%}: the interval is wider than the bound (more pairs, or a quieter machine)"


def print_comparison(pairs: Sequence[Pair]) -> None:
    print("\n| pair | order | TTFT p90 on | off | on/off | queued (on) | waited s (on) | held at endpoint (on) | "
          "held s (on) | refused (on) | ok on/off | same engine |\n"
          "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
    for k, (on, off) in enumerate(pairs):
        flow = on.get("flow", {})
        print(f"| {k} | {'on, off' if k % 2 == 0 else 'off, on'} | {on['ttft_p90_s']:.3f} | {off['ttft_p90_s']:.3f} "
              f"| {on['ttft_p90_s'] / off['ttft_p90_s']:.3f} | {flow.get('queued', '?')} "
              f"| {flow.get('queue_wait_sum_s', math.nan):.3f} | {flow.get('held', '?')} "
              f"| {flow.get('held_wait_sum_s', math.nan):.3f} | {flow.get('shed', '?')} "
              f"| {on['ok']}/{on['sent']}, {off['ok']}/{off['sent']} | {same_endpoint(on, off):.3f} |")
    low, high = cluster_interval(pairs, pooled_ratio)
    glow, ghigh = cluster_interval(pairs, geomean_ratio)
    print(f"\npooled TTFT p90 on/off: {pooled_ratio(pairs):.3f} [{low:.3f}, {high:.3f}] (95 % cluster bootstrap, "
          f"{len(pairs)} pairs) -> {verdict(low, high)}")
    print(f"geometric mean of per-pair p90 ratios: {geomean_ratio(pairs):.3f} [{glow:.3f}, {ghigh:.3f}]")
    offs = [off for _, off in pairs]
    if len(offs) >= 2:
        halves = list(zip(offs[::2], offs[1::2], strict=False))
        print(f"A/A reference (off runs of even / odd pairs, identical settings): {pooled_ratio(halves):.3f}; "
              f"same engine between consecutive off runs: "
              f"{statistics.fmean(same_endpoint(a, b) for a, b in itertools.pairwise(offs)):.3f} "
              f"(on vs off of a pair: {statistics.fmean(same_endpoint(on, off) for on, off in pairs):.3f})")
    every, same = paired_ttft_diff(pairs)
    print(f"per-request TTFT on - off, median: {every * 1e3:+.2f} ms (all), {same * 1e3:+.2f} ms (same engine)")
    if all(on.get("flow") for on, _ in pairs):
        print(f"queued by flow control in the on runs: {sum(on['flow']['queued'] for on, _ in pairs)} of "
              f"{sum(on['sent'] for on, _ in pairs)} requests")
