"""What autoscaling policies see: a window of samples of one pool (or one role of a PD pool).

A sample is taken every interval by whoever drives the policy (the simulator in virtual time, the
local supervisor or a Kubernetes actuator from the gateway's metrics). Everything in it is a gauge
or an amount *since the previous sample*: a policy never sees a cumulative counter, because a
counter only grows and a target on it scales up forever and never down (AIBrix #852 scaled on a
`_sum` and panicked). `signal_value` turns the named signals policies target into numbers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PoolSample:
    """One pool at one instant (engine gauges as the gateway scrapes them, plus its own counts)."""

    t: float                     # seconds (virtual in the simulator)
    replicas: int                # serving (up, not draining)
    starting: int                # ordered, still in their cold start
    waiting: int                 # requests waiting in the engines' schedulers
    running: int                 # requests running in the engines
    kv_usage: float              # mean KV cache use of the serving replicas, 0..1
    gateway_queued: int          # requests held at the gateway (flow control, scale from zero)
    arrivals: int                # requests that arrived since the previous sample
    completions: int             # requests that finished since the previous sample
    ttft_p95_s: float | None     # over the requests that finished since the previous sample
    tpot_p95_s: float | None
    input_tokens: int = 0        # prompt tokens of the arrivals since the previous sample
    output_tokens: int = 0       # output tokens of the completions since the previous sample
    interval_s: float = 0.0      # time since the previous sample (0: unknown, the first one)
    # mean fraction of the interval the serving replicas' accelerators ran a step: the GPU duty cycle
    # (DCGM_FI_DEV_GPU_UTIL); None where the source cannot see it (the live engines do not export it)
    busy: float | None = None
    # requests that finished since the previous sample and missed their objectives (failed ones included): the
    # per-request test the SLO attainment counts; None where the source was given no objectives
    missed: int | None = None

    @property
    def demand(self) -> int:
        """Requests in the system: waiting and running at the engines, held at the gateway."""
        return self.waiting + self.running + self.gateway_queued

    @property
    def request_rate(self) -> float:
        return self.arrivals / self.interval_s if self.interval_s > 0 else 0.0


@dataclass(frozen=True)
class Objectives:
    """Per-request latency limits a reader asks the source to count misses against (`PoolSample.missed`)."""

    ttft_s: float
    tpot_s: float

    def missed(self, ttft: float | None, tpot: float | None) -> bool:
        """A request missed when it has no first token (failed) or its TTFT or TPOT is over the limit; a reply
        without a TPOT (one token) has none to miss, as in the attainment (`bench.metrics.meets`)."""
        return ttft is None or ttft > self.ttft_s or (tpot is not None and tpot > self.tpot_s)


class SignalError(ValueError):
    """A policy was configured with a signal it cannot scale on."""


# name -> (per-replica value of one sample, what it means); every one a gauge or a rate
SIGNALS = {
    "concurrency": "requests in the system per replica (waiting + running + held at the gateway)",
    "queue": "requests waiting per replica (engine queues + held at the gateway)",
    "kv_usage": "mean KV-cache use of the replicas, 0..1",
    "gpu_util": "mean accelerator duty cycle of the replicas, 0..1 (DCGM_FI_DEV_GPU_UTIL, inferstack:busy_seconds)",
    "request_rate": "arrivals per second per replica",
    "ttft_p95": "p95 time to first token, seconds (pool-wide)",
    "tpot_p95": "p95 time per output token, seconds (pool-wide)",
}
_COUNTER_SUFFIXES = ("_total", "_sum", "_count", "_bucket", "_created")


def check_signal(name: str) -> str:
    """``name`` if policies can scale on it, else a SignalError that says what to use instead."""
    if name in SIGNALS:
        return name
    if name.endswith(_COUNTER_SUFFIXES):
        raise SignalError(f"`{name}` is a cumulative counter: it only grows, so a target on it scales up forever "
                          "and never down. Scale on a rate or a gauge instead: " + ", ".join(SIGNALS))
    raise SignalError(f"unknown autoscaling signal `{name}`; known: " + ", ".join(SIGNALS))


def signal_value(name: str, s: PoolSample) -> float | None:
    """The signal's value in one sample, per replica where that makes sense; None when the sample
    has nothing to say (a latency with no request finished)."""
    per = max(1, s.replicas)
    if name == "concurrency":
        return s.demand / per
    if name == "queue":
        return (s.waiting + s.gateway_queued) / per
    if name == "kv_usage":
        return s.kv_usage
    if name == "gpu_util":
        return s.busy
    if name == "request_rate":
        return s.request_rate / per
    if name == "ttft_p95":
        return s.ttft_p95_s
    if name == "tpot_p95":
        return s.tpot_p95_s
    raise SignalError(f"unknown autoscaling signal `{name}`")


def within(window: Sequence[PoolSample], seconds: float) -> list[PoolSample]:
    """The samples of the last ``seconds`` (ending at the newest sample), oldest first."""
    if not window:
        return []
    start = window[-1].t - seconds
    return [s for s in window if s.t > start or s is window[-1]]


def mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None
