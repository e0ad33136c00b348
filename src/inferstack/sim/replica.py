"""One simulated engine replica: the engine's own Scheduler, KVCacheManager and BlockPool (built by
`engine.core.build_scheduler`, sized by `emulated_layout` exactly as `engine serve --emulate`), stepped
in virtual time with step times from `sim.perf_model`.

A step is what `EngineCore.step` does minus detokenization: schedule at the step's start, run for the
modelled time, then `update_from_output` at its end; the next step starts at that instant while work
remains (the emulated executor's back-to-back rule), or when the next request arrives after idling.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from itertools import accumulate
from typing import Any

from inferstack.engine.config import EngineConfig
from inferstack.engine.connector.base import KVConnectorBase
from inferstack.engine.core import build_scheduler
from inferstack.engine.executor.emulated import emulated_layout
from inferstack.engine.kv.events import EventBuffer, KVEvent
from inferstack.engine.request import Request
from inferstack.engine.scheduler import SchedulerOutput
from inferstack.sim.perf_model import DecodePricing, kv_transfer_time
from inferstack.sim.profile import Profile

Clock = Callable[[], float]
# Called with (request id, virtual time) when the replica must wake up for a request (KV arrived).
WakeFn = Callable[[float], None]


class SimPDConnector(KVConnectorBase):
    """The PD connector's scheduler-side contract in virtual time, with no bytes moved.

    Decode side: a request with ``kv_transfer_params["do_remote_prefill"]`` pulls its prompt's KV
    over the modelled link (`kv_transfer_time`) while other requests run, then is scheduled with
    those tokens as external hits (block-aligned, one prompt token left to compute, as the real
    connector). Prefill side: a finished prefill keeps its blocks until the decode side has pulled."""

    def __init__(self, profile: Profile, block_size: int, clock: Clock, wake: WakeFn,
                 min_remote_tokens: int = 16) -> None:
        self.profile, self.block_size, self.clock, self.wake = profile, block_size, clock, wake
        self.min_remote_tokens = min_remote_tokens
        self._ready_at: dict[str, float] = {}
        self._holding: dict[str, float] = {}      # prefill side: request id -> when the pull ends

    def transfer_s(self, tokens: int) -> float:
        p = self.profile
        return kv_transfer_time(p.model, p.hardware, tokens, p.tp)

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        rid, bs, now = request.request_id, self.block_size, self.clock()
        ready = self._ready_at.get(rid)
        if ready is None:
            if not params.get("do_remote_prefill"):
                return 0, False
            max_blocks = (request.num_tokens - 1) // bs
            offered = min(int(params.get("remote_num_blocks", max_blocks)), max_blocks)
            if (offered - num_computed_tokens // bs) * bs < self.min_remote_tokens:
                request.kv_transfer_params = None
                return 0, False
            ready = self._ready_at[rid] = now + self.transfer_s((offered - num_computed_tokens // bs) * bs)
            self.wake(ready)
        if now < ready:
            return None, True
        del self._ready_at[rid]
        params = dict(params)
        request.kv_transfer_params = None
        max_blocks = (request.num_tokens - 1) // bs
        offered = min(int(params.get("remote_num_blocks", max_blocks)), max_blocks)
        return max(0, (offered - num_computed_tokens // bs) * bs), False

    def update_state_after_alloc(self, request: Request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        return None

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        if not (request.kv_transfer_params or {}).get("do_remote_decode") or not block_ids:
            return False, None
        blocks = request.num_prompt_tokens // self.block_size
        done = self.clock() + self.transfer_s(blocks * self.block_size)
        self._holding[request.request_id] = done
        self.wake(done)
        return True, {"do_remote_prefill": True, "remote_num_blocks": blocks,
                      "remote_request_id": request.request_id}

    def take_finished_sending(self) -> list[str]:
        now = self.clock()
        done = [rid for rid, t in self._holding.items() if t <= now]
        for rid in done:
            del self._holding[rid]
        return done

    def next_release(self) -> float | None:
        return min(self._holding.values(), default=None)

    def register_kv_caches(self, kv_caches: Sequence[Any]) -> None:
        return None

    def start_load_kv(self) -> None:
        return None


@dataclass(eq=False)
class DecodeRun:
    """Consecutive decode steps of an unchanging batch, priced at once and applied when they are over
    (or when something observes the replica earlier): an exact leap over per-step events."""

    start: float
    ends: list[float]             # virtual end time of each step
    dts: list[float]
    requests: list[Request]       # the batch, in the scheduler's running order
    free_blocks: int              # the pool's free blocks when the run began

    def completed(self, now: float) -> int:
        """Steps over by ``now`` (a step ending exactly now counts as over)."""
        return bisect_right(self.ends, now)


@dataclass
class ReplicaStats:
    steps: int = 0
    busy_s: float = 0.0           # modelled device time
    lifetimes: list[tuple[float, float]] = field(default_factory=list)   # (up, down) virtual times


class SimReplica:
    """An engine replica. The simulation calls `begin_step` at a step boundary and `end_step` when the
    step's modelled time has passed; `epoch` changes at a crash so stale step events are ignored."""

    def __init__(self, rid: str, profile: Profile, config: EngineConfig, clock: Clock,
                 output_token_ids: Sequence[int], wake: WakeFn, track_events: bool = False,
                 kv_digest: str = "sha256") -> None:
        self.id, self.profile, self.config, self.clock = rid, profile, config, clock
        self.role = config.kv_role
        self.output_token_ids = list(output_token_ids)
        self._ring = self.output_token_ids * 2     # output ids repeated: a leap's tokens are one slice of it
        self.wake = wake
        self.track_events = track_events
        layout = emulated_layout(config, profile)
        # ``kv_digest``: the block-hash chain's digest (`hashing.DIGESTS`); only its equalities reach the records
        self.layout = replace(layout, key_space=replace(layout.key_space, digest=kv_digest))
        self.pricing = DecodePricing(profile.model, profile.hardware, profile.tp)
        self.stats = ReplicaStats()
        self.epoch = 0
        self.up = True
        self.started_at = clock()
        self.stepping = False          # a step (or a wake-up) is pending in the event queue
        self.batch: SchedulerOutput | None = None
        self.run: DecodeRun | None = None
        self._saved: dict[str, int] = {}
        # tokens the scheduler has applied for a step still running (`settle_through`): not generated yet
        self.ahead = 0
        self._build()

    def counters(self) -> dict[str, int]:
        """The engine's /metrics counters over the replica's whole life (restarts included)."""
        c = self.scheduler.counters
        now = {"prefix_cache_queries": c.prefix_cache_queries, "prefix_cache_hits": c.prefix_cache_hits,
               "num_preemptions": c.num_preemptions, "generation_tokens": c.generation_tokens - self.ahead}
        return {**{k: v + self._saved.get(k, 0) for k, v in now.items()}, "steps": self.stats.steps}

    def _build(self) -> None:
        # through self.wake: the simulation may set it after construction
        self.connector = (SimPDConnector(self.profile, self.config.block_size, self.clock, lambda t: self.wake(t))
                          if self.role != "both" else None)
        self.events = EventBuffer() if self.track_events else None
        self.scheduler = build_scheduler(self.config, self.layout.num_kv_blocks, self.config.block_size,
                                         self.layout.key_space, self.layout.max_model_len, self.connector,
                                         self.events, self.clock)

    @property
    def max_model_len(self) -> int:
        return self.layout.max_model_len

    def add(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def begin_step(self) -> float | None:
        """Schedule the next batch and return its modelled duration (None: nothing can run now)."""
        batch = self.scheduler.schedule()
        if batch.is_empty:
            self.batch = None
            return None
        self.batch = batch
        # `step_time` of the batch's `SeqWork`s, float for float, without building them
        dt = self.pricing.step_time([(s.start, s.num_new_tokens, s.sample) for s in batch.seqs])
        self.stats.steps += 1
        self.stats.busy_s += dt
        return dt

    def begin_run(self, max_steps: int) -> DecodeRun | None:
        """At a step boundary: the next decode steps as one run, when at least two of them can leap
        (`Scheduler.decode_run_limit`); None otherwise (step one at a time). Never with KV events to
        publish or a PD connector: their per-step effects are observable by the gateway."""
        if self.events is not None or self.connector is not None:
            return None
        k = self.scheduler.decode_run_limit(max_steps)
        if k < 2:
            return None
        reqs = list(self.scheduler.running)
        dts = self.pricing.times([r.num_computed_tokens for r in reqs], k)
        now = self.clock()
        ends = list(accumulate(dts, initial=now))     # t + dt step after step, at C speed
        del ends[0]
        self.run = DecodeRun(now, ends, dts, reqs, self.scheduler.kv.pool.num_free_blocks)
        return self.run

    def settle(self, steps: int, count_next: bool = False) -> list[float]:
        """Apply the run's first ``steps`` steps and end it; returns their end times (each request of the
        run received one token at each; after its last step, those that reached their length are finished).
        ``count_next``: the step after them had begun (it counts in the stats, as `begin_step` counts a step
        when it starts)."""
        run, self.run = self.run, None
        assert run is not None and steps <= len(run.ends)
        if steps:
            n = len(self.output_token_ids)
            ring = self._ring
            if len(ring) < n + steps:
                ring = self._ring = self.output_token_ids * (steps // n + 2)
            # token j of a request is out[(outputs so far + j) % n], as `end_step` samples one per step; the run's
            # requests are the scheduler's running ones, in order (nothing changed them since `begin_run`)
            self.scheduler.advance_decodes(steps, [ring[(k := len(r.output_token_ids) % n):k + steps]
                                                   for r in run.requests])
        counted = steps + (1 if count_next and steps < len(run.ends) else 0)
        stats = self.stats
        stats.steps += counted
        busy = stats.busy_s
        for dt in run.dts[:counted]:     # one addition per step, in order (as per-step simulation adds them)
            busy += dt
        stats.busy_s = busy
        return run.ends[:steps]

    def settle_through(self, done: int) -> list[float]:
        """Apply the run's ``done`` steps over and the step in progress, which is not the run's last (so
        nothing finishes in it) and took its blocks when it began; returns the end times of the ``done``
        steps. The step in progress delivers its tokens at its end (`land`); until then they are `ahead`."""
        run = self.run
        assert run is not None and done + 1 < len(run.ends)
        ends = self.settle(done + 1)
        self.ahead = len(run.requests)
        return ends[:done]

    def land(self) -> None:
        """The step `settle_through` applied early has ended: its tokens are generated."""
        self.ahead = 0

    def end_step(self) -> list[Request]:
        """Finish the running batch: the requests that received a token (finished ones included)."""
        batch, self.batch = self.batch, None
        assert batch is not None
        if self.connector is not None:
            for seq in batch.seqs:
                self.scheduler.kv.update_block_hashes(seq.request)
        out = self.output_token_ids
        sampled = {s.request_id: out[len(s.request.output_token_ids) % len(out)] for s in batch.seqs if s.sample}
        return self.scheduler.update_from_output(batch, sampled)

    def take_events(self) -> list[KVEvent]:
        return self.events.drain() if self.events is not None else []

    def crash(self) -> list[Request]:
        """Lose every request and the KV cache; returns the requests that were on the replica."""
        lost = list(self.scheduler.requests.values())
        self.scheduler.counters.generation_tokens -= self.ahead     # the step in progress never ends
        self.ahead = 0
        self.up = False
        self.epoch += 1
        self.batch = None
        self.run = None
        self.stepping = False
        self.stats.lifetimes.append((self.started_at, self.clock()))
        return lost

    def restart(self) -> None:
        self._saved = {k: v for k, v in self.counters().items() if k != "steps"}
        self.up = True
        self.epoch += 1
        self.started_at = self.clock()
        self._build()

    def retire(self) -> None:
        if self.up:
            self.stats.lifetimes.append((self.started_at, self.clock()))
        self.up = False

    def snapshot_metrics(self) -> tuple[int, int, float]:
        """(waiting, running, KV use) as the engine's /metrics would report them now."""
        s = self.scheduler
        run = self.run
        if run is None:
            return s.num_waiting, s.num_running, s.kv.pool.usage
        # mid-run: the steps begun by now have taken their blocks (a step allocates when it is scheduled)
        begun = min(run.completed(self.clock()) + 1, len(run.ends))
        taken = s.kv.total_blocks_needed(run.requests, begun)
        return s.num_waiting, s.num_running, 1.0 - (run.free_blocks - taken) / s.kv.pool.num_blocks
