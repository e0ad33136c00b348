"""The one way autoscaling inputs are built: a pool's `LoadSnapshot` (cumulative counts and gauges at one
instant) and `LoadSampler`, which differences successive snapshots into the `PoolSample`s policies see.

Every driver feeds policies through it: the gateway's `PoolLoad` (gateway/poolload.py) takes the snapshot,
`GET /admin/pools/{pool}/load` carries it as JSON to the local supervisor (stack/autoscaler.py), the
Kubernetes actuator (gateway/kubescale.py) takes it in process, and the simulator (sim/simulation.py) builds
it from its modelled replicas. Counts are cumulative, so any number of readers can sample without stealing
each other's amounts (one shared, drained window is how autoscalers ended up sharing one result);
latencies are p95s over the requests that finished since the reader's previous snapshot.

Requests spilled over to a fallback pool since the previous sample count as held demand (they are counted
as arrivals already): a pool that spills never queues, so without them a demand-based policy would never
see that it is short of replicas. A PD pool gets one sample per role (its endpoints' gauges); arrivals,
held requests and latencies are the pool's, since every request needs both roles.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

from inferstack.autoscale.signals import PoolSample

BOTH = "both"


@dataclass(frozen=True)
class EndpointLoad:
    """One endpoint as the gateway sees it: health, its own in-flight count, the engine's scraped gauges."""

    id: str
    url: str
    healthy: bool
    in_flight: int = 0
    waiting: float = 0.0
    running: float = 0.0
    kv_usage: float = 0.0
    role: str = BOTH
    # accelerator duty cycle since the previous snapshot (DCGM_FI_DEV_GPU_UTIL), where the source knows it (the
    # simulator); a live engine exports its cumulative step time instead, which `LoadSampler` differences
    busy: float | None = None
    busy_seconds: float | None = None


@dataclass(frozen=True)
class LoadSnapshot:
    """A pool at one instant: counts since the source started (cumulative), gauges now."""

    pool: str
    now: float                   # seconds on the source's clock (monotonic; virtual in the simulator)
    arrivals: int                # requests for this pool, spilled or not
    completions: int
    input_tokens: int            # prompt tokens (the gateway counts them at completion, the simulator at arrival)
    output_tokens: int
    ttft_p95_s: float | None     # over the requests that finished since the reader's previous snapshot
    tpot_p95_s: float | None
    held: int                    # held for a replica (scale from zero)
    queued: int                  # queued by flow control
    endpoints: tuple[EndpointLoad, ...] = ()
    spilled: int = 0             # sent to the fallback pool
    # of the requests that finished since the reader's previous snapshot, those that missed the objectives the
    # reader gave (`signals.Objectives`); None: no objectives given
    missed: int | None = None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: Mapping) -> LoadSnapshot:
        """Raises KeyError, TypeError or ValueError on a malformed answer."""
        eps = tuple(EndpointLoad(**{**e, "in_flight": int(e.get("in_flight", 0))}) for e in raw["endpoints"])
        opt = {k: (None if raw.get(k) is None else float(raw[k])) for k in ("ttft_p95_s", "tpot_p95_s")}
        ints = {k: int(raw.get(k, 0)) for k in ("arrivals", "completions", "input_tokens", "output_tokens",
                                                 "held", "queued", "spilled")}
        missed = None if raw.get("missed") is None else int(raw["missed"])
        return cls(pool=str(raw["pool"]), now=float(raw["now"]), endpoints=eps, missed=missed, **opt, **ints)


def by_role(endpoints: Sequence[EndpointLoad]) -> dict[str, list[EndpointLoad]]:
    """Endpoints by PD role ({"both": all} without roles); a `both` endpoint in a PD pool serves each role."""
    if all(e.role == BOTH for e in endpoints):
        return {BOTH: list(endpoints)}
    out: dict[str, list[EndpointLoad]] = {"prefill": [], "decode": []}
    for e in endpoints:
        for r in ("prefill", "decode") if e.role == BOTH else (e.role,):
            out[r].append(e)
    return out


class LoadSampler:
    """Successive snapshots of one pool → one `PoolSample` per role (amounts since the previous snapshot)."""

    def __init__(self, origin: LoadSnapshot | None = None) -> None:
        """``origin``: the snapshot the first one is differenced against; None: the first sample has no
        amounts (a reader joining a running gateway knows nothing of what came before)."""
        self.prev: LoadSnapshot | None = origin

    @property
    def since(self) -> float:
        """Where the next snapshot's latencies start (the previous snapshot's `now`)."""
        return self.prev.now if self.prev else 0.0

    def sample(self, snap: LoadSnapshot, starting: Mapping[str, int] | int = 0) -> dict[str, PoolSample]:
        """``starting``: replicas ordered and not serving yet, per role (an int for a colocated pool)."""
        prev, self.prev = self.prev or snap, snap
        out: dict[str, PoolSample] = {}
        for role, eps in by_role(snap.endpoints).items():
            serving = [e for e in eps if e.healthy]
            waiting = sum(e.waiting for e in serving)
            # engines that export no gauges still show the gateway's own in-flight count
            running = max(sum(e.running for e in serving), sum(e.in_flight for e in serving) - waiting)
            duty = [d for d in (_duty(e, prev, snap.now) for e in serving) if d is not None]
            out[role] = PoolSample(
                t=snap.now, replicas=len(serving),
                starting=starting if isinstance(starting, int) else starting.get(role, 0),
                waiting=int(waiting), running=int(running),
                kv_usage=sum(e.kv_usage for e in serving) / len(serving) if serving else 0.0,
                gateway_queued=snap.held + snap.queued + (snap.spilled - prev.spilled),
                arrivals=snap.arrivals - prev.arrivals, completions=snap.completions - prev.completions,
                ttft_p95_s=snap.ttft_p95_s, tpot_p95_s=snap.tpot_p95_s,
                input_tokens=snap.input_tokens - prev.input_tokens,
                output_tokens=snap.output_tokens - prev.output_tokens, interval_s=snap.now - prev.now,
                busy=sum(duty) / len(duty) if duty else None, missed=snap.missed)
        return out


def _duty(e: EndpointLoad, prev: LoadSnapshot, now: float) -> float | None:
    """The endpoint's duty cycle since ``prev``: given (the simulator), or its step time's growth over the
    elapsed time (a live engine's counter); None without both ends (a new endpoint, an engine without it)."""
    if e.busy is not None:
        return e.busy
    before = next((p for p in prev.endpoints if p.id == e.id), None)
    if e.busy_seconds is None or before is None or before.busy_seconds is None or now <= prev.now:
        return None
    return min(1.0, max(0.0, (e.busy_seconds - before.busy_seconds) / (now - prev.now)))
