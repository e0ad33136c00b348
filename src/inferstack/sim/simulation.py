"""The discrete-event loop of `inferstack sim`: arrivals from `inferstack bench` workloads, the
gateway's admission and routing (`sim.gateway`), engine replicas stepping the real scheduler
(`sim.replica`), failures and the autoscaler hook, all in virtual time.

Time only moves by popping the event heap; nothing reads the wall clock except the progress bar.
Ties are ordered by insertion, every random choice comes from the seed, so a run is bit-for-bit
repeatable.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from inferstack.autoscale.load import BOTH, EndpointLoad, LoadSampler, LoadSnapshot
from inferstack.bench.metrics import meets
from inferstack.bench.records import RequestRecord
from inferstack.bench.runner import RunConfig
from inferstack.bench.runner import _arrivals as bench_arrivals
from inferstack.bench.workloads import RequestSpec, Unit
from inferstack.config.schema import InferstackConfig, PoolConfig
from inferstack.engine.config import EngineConfig
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.gateway.flowqueue import Rejected
from inferstack.gateway.requests import engine_priority
from inferstack.gateway.routing import EndpointView, RequestView
from inferstack.sim.autoscale import Autoscaler, MetricSample
from inferstack.sim.cores import CoreShare, HostSpeed
from inferstack.sim.gateway import SimEndpoint, SimGateway
from inferstack.sim.profile import Profile
from inferstack.sim.prompts import PromptTokens
from inferstack.sim.records import RecordSink
from inferstack.sim.replica import DecodeRun, SimReplica

POOL = "sim"


@dataclass(frozen=True)
class FleetSpec:
    profile: Profile
    replicas: int
    role: str = "both"          # prefill | decode | both
    host: str | None = None     # replicas of fleets naming the same host share its cores (`sim.cores`)


@dataclass(frozen=True)
class Crash:
    replica: int                # index in fleet order
    at_s: float
    restart_after_s: float | None = None


@dataclass
class SimSettings:
    run: RunConfig                       # workload, load, duration, seed, SLO: as `inferstack bench run`
    fleets: list[FleetSpec]
    config: InferstackConfig
    pool: PoolConfig                     # routing, max_concurrency, pd, precise_prefix
    engine: EngineConfig                 # scheduler settings every replica runs with
    tokens: PromptTokens
    crashes: list[Crash] = field(default_factory=list)
    autoscaler: Autoscaler | None = None
    drain_timeout_s: float = 600.0
    # Seconds between the gateway routing a request and the engine holding it (HTTP hops, parsing,
    # chat template, tokenization), which the modelled step times do not include.
    request_overhead_s: float = 0.0
    request_overhead_samples_s: tuple[float, ...] = ()   # if given: each request draws one (seeded) instead
    records_path: Path | None = None     # per-request rows are streamed to this CSV
    sample_every: int = 1
    # Longest leap over identical decode steps (`SimReplica.begin_run`); 0 steps one event per step.
    # Leaps are exact: the records are the same either way (tests/unit/test_sim_core.py).
    decode_run_steps: int = 64
    # Route over numpy columns of the endpoints where the profile allows (`routing.columns`); the same
    # decisions as the Python path (tests/unit/test_sim_scale.py), which False forces (for comparisons).
    columnar_routing: bool = True
    # The replicas' KV block-hash digest (`engine.kv.hashing.DIGESTS`). Hashes never leave the simulation and
    # only their equalities matter (prefix hits, twins, the precise index), so a cheaper one than the engines'
    # SHA-256 gives the same records (tests/unit/test_sim_scale.py); "sha256" runs the engines' own.
    kv_digest: str = "xxh3-128"


@dataclass(eq=False, slots=True)     # one per request: no per-instance dict
class _Unit:
    n: int
    unit: Unit
    scheduled: float
    included: bool
    stage: int = 0
    pending: int = 0
    ok: bool = True


@dataclass(eq=False, slots=True)     # one per request: no per-instance dict
class _Req:
    rec: RequestRecord
    unit: _Unit
    spec: RequestSpec
    tokens: list[int]
    view: RequestView
    tries: set[str] = field(default_factory=set)
    endpoint: SimEndpoint | None = None
    prefill: SimEndpoint | None = None
    held: SimEndpoint | None = None  # routed to it while it had no room: waiting in its hold queue
    engine: Request | None = None
    times: list[float] = field(default_factory=list)


class Simulation:
    def __init__(self, s: SimSettings) -> None:
        self.s = s
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[..., None], tuple]] = []
        self._seq = itertools.count()
        self.replicas: list[SimReplica] = []
        self._next_replica = itertools.count()
        self._hosts: dict[str, CoreShare[SimReplica]] = {}
        self._cores: dict[SimReplica, CoreShare[SimReplica]] = {}     # replicas on a shared host -> its share
        track = s.pool.precise_prefix is not None
        for fleet in s.fleets:
            for _ in range(fleet.replicas):
                self.replicas.append(self._new_replica(fleet, track))
        self.gateway = SimGateway(s.config, s.pool, self.replicas, s.run.seed, s.columnar_routing)
        # the shortest context of the fleet: a request longer than that is refused (400) up front
        self.max_model_len = min(rep.max_model_len for rep in self.replicas)
        self.sink = RecordSink(s.records_path, s.sample_every)
        self.active: dict[str, _Req] = {}
        self.counter = itertools.count()
        self.window = (s.run.warmup_s, max(s.run.warmup_s, s.run.duration_s - s.run.cooldown_s))
        self.arrived = self.completed = self.events = 0
        self.tokens_in = self.tokens_out = 0     # prompt tokens of arrivals, output tokens of completions
        # replicas ordered and in their cold start, oldest first; a scale-down cancels the newest first
        self.orders: list[_Order] = []
        self._window_ttft: list[float] = []
        self._window_tpot: list[float] = []
        # finished since the last sample and missing the run's SLO (the attainment's test); None without an SLO
        self._window_missed: int | None = None if s.run.slo is None else 0
        self._samples: list[MetricSample] = []
        # the pool's snapshots differenced, as live actuators do; the simulation's counts start at 0 at t = 0
        self._load = LoadSampler(LoadSnapshot(POOL, 0.0, 0, 0, 0, 0, None, None, held=0, queued=0))
        self._last_busy: dict[str, float] = {}   # replica id -> its modelled device time at the last sample
        self.planned = 0
        self.model = s.fleets[0].profile.model.name
        self._overhead_rng = random.Random(s.run.seed)
        self._params: dict[int, SamplingParams] = {}

    # -- event queue ------------------------------------------------------------------------------
    def at(self, t: float, fn: Callable[..., None], *args: object) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, args))

    def _clock(self) -> float:
        return self.now

    def _new_replica(self, fleet: FleetSpec, track: bool) -> SimReplica:
        i = next(self._next_replica)
        # simulated replicas move KV through the modelled link only: the PD peer check has no peer to name
        config = replace(self.s.engine, kv_role=fleet.role, kv_transfer_secret="simulated")
        rid = f"{fleet.profile.hardware.name}-{i}"
        replica = SimReplica(rid, fleet.profile, config, self._clock, self.s.tokens.output_ids(), lambda t: None,
                             track_events=track, kv_digest=self.s.kv_digest)
        replica.wake = lambda t, r=replica: self.at(t, self._wake, r)
        if fleet.host is not None:
            if fleet.host not in self._hosts:
                # the host's speed drifts as its first fleet's profile was fitted to (`Hardware.speed_jitter`)
                hw = fleet.profile.hardware
                speed = HostSpeed(hw.speed_jitter, hw.speed_jitter_s, hw.speed_jitter_corr,
                                  f"{self.s.run.seed}/{fleet.host}")
                self._hosts[fleet.host] = CoreShare(speed if hw.speed_jitter > 0 else None)
            self._cores[replica] = self._hosts[fleet.host]
        return replica

    def run(self, progress: Callable[[Simulation], None] | None = None) -> None:
        times, units = bench_arrivals(self.s.run)
        self.planned = len(times)
        feed = _Feed(times, units)
        if times:
            self.at(times[0], self._arrival, feed)
        for c in self.s.crashes:
            self.at(c.at_s, self._crash, c)
        if self.s.autoscaler is not None:
            self.at(self.s.autoscaler.interval_s, self._autoscale)
        with _sparse_gc():
            self._loop(progress)
        for rid in list(self.active):
            r = self.active.pop(rid)
            self._finish(r, "cancelled", "still running when the drain timeout ended the run")
        for rep in self.replicas:
            rep.retire()
        self.sink.close()

    def _loop(self, progress: Callable[[Simulation], None] | None) -> None:
        end = self.s.run.duration_s + self.s.drain_timeout_s
        next_report = time.perf_counter() + 0.5
        heap = self._heap
        while heap:
            t, _, fn, args = heapq.heappop(heap)
            if t > end:
                heapq.heappush(heap, (t, 0, fn, args))
                self._settle_runs(end)
                break
            self.now = self.gateway.now = t
            fn(*args)
            self.events += 1
            if progress is not None and not self.events & 4095 and time.perf_counter() >= next_report:
                progress(self)
                next_report = time.perf_counter() + 0.5

    # -- arrivals ----------------------------------------------------------------------------------
    def _arrival(self, feed: _Feed) -> None:
        n, unit = feed.take()
        if unit is None:        # a finite workload ran out: no more arrivals
            return
        u = _Unit(n, unit, self.now, self.window[0] <= self.now < self.window[1])
        self._start_stage(u)
        if feed.has_more():
            self.at(feed.peek_time(), self._arrival, feed)

    def _start_stage(self, u: _Unit) -> None:
        stage = u.unit.stages[u.stage]
        u.pending = len(stage)
        for spec in stage:
            self._submit(u, spec)

    def _submit(self, u: _Unit, spec: RequestSpec) -> None:
        self.arrived += 1
        rec = RequestRecord(index=next(self.counter), unit=u.n, stage=u.stage,
                            scheduled=u.scheduled if u.stage == 0 else self.now, sent=self.now,
                            input_tokens_nominal=spec.input_tokens, output_tokens_nominal=spec.output_tokens,
                            session=spec.session, group=spec.group, included=u.included, target=POOL)
        view = self.gateway.request_view(spec.messages, 0, spec.output_tokens, spec.session, self.model)
        r = _Req(rec, u, spec, self.s.tokens.encode_request(spec), view)
        rec.prompt_tokens = len(r.tokens)
        self.tokens_in += len(r.tokens)
        if self.gateway.precise:      # the live gateway tokenizes through an engine and hashes as it does
            view.token_hashes = self.replicas[0].layout.key_space.hashes(r.tokens, self.gateway.salt)
        max_len = self.max_model_len
        if len(r.tokens) + spec.output_tokens > max_len:
            self._finish(r, "http_400", f"context length {max_len} exceeded: {len(r.tokens)} prompt + "
                                        f"{spec.output_tokens} output tokens")
            return
        try:
            if not self.gateway.admission.admit(r, 0, self.gateway.salt, self.gateway.tenant_weight):
                self.at(self.now + self.s.config.gateway.flow_control.queue_timeout_s + 1e-9, self._expire)
                self.at(self.now + self.s.config.gateway.scrape_interval_s, self._pump)
                return
        except Rejected as e:
            self._finish(r, "http_429", e.code)
            return
        self._route(r)

    # -- gateway -----------------------------------------------------------------------------------
    def _route(self, r: _Req, skip: frozenset[str] = frozenset(), refused: str = "",
               promised: float | None = None) -> None:
        """Route ``r``; on its first routing, an endpoint without room holds it (`_hold`). ``skip``: endpoints
        whose hold refused it (``refused``: the last refusal's code, answered when no endpoint is left);
        ``promised``: its arrival, when the pool's queue released it (`FairQueue.admit`)."""
        first = not r.tries
        result = self.gateway.route(r.view, frozenset(r.tries) | skip)
        if result is None:
            self._finish(r, "http_429" if refused else "http_503", refused or "no healthy endpoint")
            return
        ep = self.gateway.endpoints[result.endpoint.id]
        prefill = result.others.get("prefill")
        if first and prefill is None and self.gateway.holds_at_endpoints() and not self._hold(r, ep, skip, promised):
            return
        self._send(r, ep, prefill)

    def _hold(self, r: _Req, ep: SimEndpoint, skip: frozenset[str], promised: float | None) -> bool:
        """True: ``ep`` takes ``r`` now. Else ``r`` waits in ``ep``'s hold queue, or was refused there and
        is routed again without ``ep`` while another endpoint has room (else answered 429), as
        `Picker.route` does live."""
        q = self.gateway.hold_queue(ep)
        try:
            if q.admit(r, 0, self.gateway.salt, self.gateway.tenant_weight, promised=promised):
                return True
        except Rejected as e:
            skip = skip | {ep.id}
            if self.gateway.room_elsewhere(skip):
                self._route(r, skip, e.code, promised)
            else:
                self._finish(r, "http_429", e.code)
            return False
        r.held = ep
        self.gateway.shift_held(ep, 1)
        since = self.now if promised is None else promised
        self.at(since + self.s.config.gateway.flow_control.queue_timeout_s + 1e-9, self._expire)
        self.at(self.now + self.s.config.gateway.scrape_interval_s, self._pump)
        return False

    def _unhold(self, r: _Req) -> SimEndpoint:
        ep = r.held
        assert ep is not None
        r.held = None
        self.gateway.shift_held(ep, -1)
        return ep

    def _send(self, r: _Req, ep: SimEndpoint, prefill: EndpointView | None) -> None:
        r.tries.add(ep.id)
        r.endpoint = ep
        self.gateway.shift(ep, 1)
        if prefill is not None:
            r.prefill = self.gateway.endpoints[prefill.id]
            self.gateway.shift(r.prefill, 1)
            self._dispatch(r, r.prefill, 1, {"do_remote_decode": True}, suffix="-p")
        else:
            self._dispatch(r, ep, r.spec.output_tokens, None)

    def _dispatch(self, r: _Req, ep: SimEndpoint, max_tokens: int, kv: dict | None, suffix: str = "") -> None:
        params = self._params.get(max_tokens)
        if params is None:     # one per length: the engine never changes a request's params (validated once)
            params = self._params[max_tokens] = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        req = Request(f"{r.rec.index}{suffix}", r.tokens, params,
                      arrival_time=self.now, priority=engine_priority(r.view.priority),
                      cache_salt=self.gateway.salt, kv_transfer_params=kv)
        r.engine = req
        self.active[req.request_id] = r
        overhead = self.s.request_overhead_s
        if self.s.request_overhead_samples_s:
            overhead = self._overhead_rng.choice(self.s.request_overhead_samples_s)
        if overhead > 0:
            self.at(self.now + overhead, self._deliver, ep.replica, req)
        else:
            self._deliver(ep.replica, req)

    def _deliver(self, rep: SimReplica, req: Request) -> None:
        if not rep.up:           # it crashed meanwhile (or while this request's prefill leg ran elsewhere)
            r = self.active.pop(req.request_id)
            if req.request_id.endswith("-p") and r.prefill is not None:
                self.gateway.shift(r.prefill, -1)
            self._finish(r, "connection", f"replica {rep.id} is down")
            return
        self._cut(rep)
        rep.add(req)
        self._kick(rep)

    def _pump(self) -> None:
        """A metrics refresh: endpoint holds first (what waits there was routed earlier), then the pool."""
        for key in list(self.gateway.holds):
            self._release_held(key)
        self._release()
        if self.gateway.admission.queued or any(q.queued for q in self.gateway.holds.values()):
            self.at(self.now + self.s.config.gateway.scrape_interval_s, self._pump)

    def _release_held(self, key: str) -> None:
        """Release what endpoint ``key`` has room for; waiters of one that is down, draining or gone route
        again without it (`EndpointQueues.pump`)."""
        q = self.gateway.holds.get(key)
        if q is None or not q.queued:
            return
        ep = self.gateway.endpoints.get(key)
        if ep is None or not ep.replica.up or ep.draining:
            for r, _ in q.take_all():
                self._unhold(r)
                self._route(r, frozenset({key}))
            if ep is None:
                del self.gateway.holds[key]
            return
        for r, _ in q.release():
            self._unhold(r)
            self._send(r, ep, None)
            q.routed()
        for r, _, _ in q.hopeless():
            self._unhold(r)
            self._finish(r, "http_429", "queue_timeout")

    def _release(self) -> None:
        """Route what flow control releases; each then counts in its endpoint's in-flight. Waiters the
        drain rate says would time out are refused now, as the live gateway does."""
        for r, _ in self.gateway.admission.release():
            self._route(r, promised=r.rec.sent)
            self.gateway.admission.routed()
        for r, _, _ in self.gateway.admission.hopeless():
            self._finish(r, "http_429", "queue_timeout")

    def _expire(self) -> None:
        for r, _ in self.gateway.admission.expire():
            self._finish(r, "http_429", "queue_timeout")
        for q in self.gateway.holds.values():
            for r, _ in q.expire():
                self._unhold(r)
                self._finish(r, "http_429", "queue_timeout")

    # -- engines -----------------------------------------------------------------------------------
    def _kick(self, rep: SimReplica) -> None:
        if rep.up and not rep.stepping:
            rep.stepping = True
            self.at(self.now, self._step, rep, rep.epoch)

    def _wake(self, rep: SimReplica) -> None:
        self._kick(rep)

    def _step(self, rep: SimReplica, epoch: int) -> None:
        if epoch != rep.epoch:
            return
        if rep.batch is not None:
            advanced = rep.end_step()
            self.gateway.kv_events(rep.id, rep.take_events())
            for req in advanced:
                self._token(req)
        self._next(rep)

    def _next(self, rep: SimReplica) -> None:
        """At a step boundary: leap over a run of identical decode steps, or schedule one step. A replica
        sharing its host's cores steps one event at a time: its steps' ends move with its neighbours'."""
        share = self._cores.get(rep) if self._cores else None
        if self.s.decode_run_steps > 1 and share is None:
            run = rep.begin_run(self.s.decode_run_steps)
            if run is not None:
                self.at(run.ends[-1], self._run_end, rep, run)
                return
        dt = rep.begin_step()
        if dt is None:
            rep.stepping = False
            return
        if share is None:
            self.at(self.now + dt, self._step, rep, rep.epoch)
        else:
            self._retimed(share.start(rep, dt, rep.profile.hardware.colocation_slowdown, self.now))

    def _retimed(self, ends: list[tuple[SimReplica, float, int]]) -> None:
        for rep, end, token in ends:
            self.at(end, self._shared_step, rep, rep.epoch, token)

    def _shared_step(self, rep: SimReplica, epoch: int, token: int) -> None:
        """The end of a shared-host step, unless a neighbour's start or end has moved it since."""
        share = self._cores[rep]
        if epoch != rep.epoch or share.token(rep) != token:
            return
        slowed, ends = share.end(rep, self.now)
        rep.stats.busy_s += slowed      # the device was busy for the step's whole stretched time
        self._retimed(ends)
        self._step(rep, epoch)

    def _run_end(self, rep: SimReplica, run: DecodeRun) -> None:
        if rep.run is not run:
            return            # cut short (a request arrived, the replica crashed): already settled
        self._deliver_run(run, rep.settle(len(run.ends)))
        self._next(rep)

    def _deliver_run(self, run: DecodeRun, ends: list[float]) -> None:
        """The tokens of a run's settled steps, and the requests its last step finished, in batch order (as
        `_token` takes the tokens of a step)."""
        if not ends:
            return
        active = self.active
        for req in run.requests:
            r = active[req.request_id]
            r.times.extend(ends)
            if req.is_finished:
                del active[req.request_id]
                self._finish(r, "ok", "")

    def _cut(self, rep: SimReplica) -> None:
        """Something is about to change a replica mid-run: apply the steps over by now and end the run with
        the step in progress, exactly where per-step simulation would be. That step was scheduled before
        the change, so it is the run's step either way: the scheduler applies it now (its blocks were taken
        when it began) and its tokens arrive at its end (`_landed`). When it is the run's last step, the one
        that finishes requests, it is made an ordinary step instead (finishing is observable at once)."""
        run = rep.run
        if run is not None and run.completed(self.now) >= len(run.ends):
            self._run_end(rep, run)      # the run ends right now: end it first (the next one begins now)
            run = rep.run
        if run is None:
            return
        done = run.completed(self.now)
        if done + 1 < len(run.ends):
            self._deliver_run(run, rep.settle_through(done))
            self.at(run.ends[done], self._landed, rep, rep.epoch, run)
            return
        self._deliver_run(run, rep.settle(done))
        started = run.ends[done - 1] if done else run.start
        dt = rep.begin_step()
        assert dt is not None and started + dt == run.ends[done], "a decode leap diverged from per-step pricing"
        self.at(run.ends[done], self._step, rep, rep.epoch)

    def _landed(self, rep: SimReplica, epoch: int, run: DecodeRun) -> None:
        """The end of a step `_cut` applied early: its tokens, then the next step (as `_step`)."""
        if epoch != rep.epoch:
            return
        rep.land()
        active = self.active
        for req in run.requests:
            active[req.request_id].times.append(self.now)
        self._next(rep)

    def _settle_runs(self, end: float) -> None:
        """The run is over at ``end``: apply every step that ended by then (as per-step events would
        have been), with the time of the last of them as the simulation's last event time."""
        for rep in self.replicas:
            run = rep.run
            if run is not None:        # its last step ends after ``end`` (else its event came first): none finish
                ends = rep.settle(run.completed(end), count_next=True)
                self._deliver_run(run, ends)
                if ends:
                    self.now = max(self.now, ends[-1])

    def _token(self, req: Request) -> None:
        r = self.active[req.request_id]
        if req.request_id.endswith("-p"):
            if req.is_finished:      # prefill leg done: the decode leg pulls the KV the prefill holds
                del self.active[req.request_id]
                assert r.prefill is not None and r.endpoint is not None
                self.gateway.shift(r.prefill, -1)
                kv = dict(req.kv_transfer_params or {})
                self._dispatch(r, r.endpoint, r.spec.output_tokens, kv or None)
            return
        r.times.append(self.now)
        if req.is_finished:
            del self.active[req.request_id]
            self._finish(r, "ok", "")

    def _finish(self, r: _Req, status: str, error: str) -> None:
        rec = r.rec
        rec.status, rec.end = status, self.now
        rec.error = error if status != "ok" else ""
        ep = r.endpoint
        held = self.gateway.holds.get(ep.id) if ep is not None else None
        if ep is not None:
            self.gateway.shift(ep, -1)
            if status == "ok":  # only a served request measures the pace (gateway/pipeline/pick.py)
                if held is not None:
                    held.completed()
                self.gateway.admission.completed()
            rec.target = ep.id
        if status == "ok" and r.engine is not None and ep is not None:
            eng = r.engine
            rec.chunk_times = r.times
            rec.output_tokens = eng.num_output_tokens
            self.tokens_out += eng.num_output_tokens
            rec.prompt_tokens = eng.num_prompt_tokens
            rec.cached_tokens = max(eng.num_cached_tokens, 0)
            ttft = r.times[0] - rec.sent
            tpot = rec.tpot
            self.gateway.state.latency.observe(ep.id, r.view.est_prompt_tokens, ep.view.in_flight + 1, ttft, tpot)
            self._window_ttft.append(ttft)
            if tpot is not None:
                self._window_tpot.append(tpot)
        self.completed += 1
        if self._window_missed is not None and self.s.run.slo is not None:
            self._window_missed += not meets(rec, self.s.run.slo)
        self.sink.add(rec)
        if ep is not None and ep.draining and not ep.replica.scheduler.has_unfinished():
            self._leave(ep)
        self._unit_done(r.unit, status == "ok")
        if held is not None and held.queued:
            self._release_held(ep.id)
        if self.gateway.admission.queued:
            self._release()

    def _unit_done(self, u: _Unit, ok: bool) -> None:
        u.pending -= 1
        u.ok &= ok
        if u.pending or not u.ok or u.stage + 1 >= len(u.unit.stages):
            return
        u.stage += 1
        self.at(self.now + u.unit.think_s, self._start_stage, u)

    # -- failures and scaling ----------------------------------------------------------------------
    def _crash(self, c: Crash) -> None:
        if c.replica >= len(self.replicas) or not self.replicas[c.replica].up:
            return
        rep = self.replicas[c.replica]
        self._cut(rep)
        share = self._cores.get(rep)
        if share is not None and share.token(rep) is not None:   # its step is lost: the neighbours speed up
            self._retimed(share.end(rep, self.now)[1])
        ep = self.gateway.endpoints.get(rep.id)
        for req in rep.crash():
            r = self.active.pop(req.request_id, None)
            if r is None:
                continue
            if req.request_id.endswith("-p") and r.prefill is not None:
                self.gateway.shift(r.prefill, -1)
            if r.times or len(r.tries) > self.s.config.gateway.max_retries:
                self._finish(r, "connection", f"replica {rep.id} crashed")
            else:          # nothing reached the client yet: the gateway retries another endpoint
                assert r.endpoint is not None
                self.gateway.shift(r.endpoint, -1)
                r.endpoint = r.prefill = None  # released: a retry that finds no endpoint must not release it again
                self._route(r)
        if ep is not None:
            ep.view.has_metrics = False
        self.gateway.changed()
        if c.restart_after_s is not None:
            self.at(self.now + c.restart_after_s, self._restart, rep)

    def _restart(self, rep: SimReplica) -> None:
        rep.restart()
        self.gateway.changed()
        self.gateway.state.precise.cleared(rep.id)

    def _autoscale(self) -> None:
        a = self.s.autoscaler
        assert a is not None
        self._samples.append(self._sample())
        self._samples = self._samples[-a.window_samples:]
        serving = [ep for ep in self.gateway.order if ep.replica.up and not ep.draining]
        want = a.desired(self._samples, {POOL: len(serving) + self.starting}).get(POOL, len(serving))
        have = len(serving) + self.starting
        for _ in range(max(0, want - have)):
            order = _Order()
            self.orders.append(order)
            self.at(self.now + a.cold_start_s, self._join, order)
        # down: cancel replicas still starting first (the newest order: it serves nobody yet), as the local
        # actuator does; only the rest drains ready replicas (draining those and keeping the orders left the
        # pool with no replica serving for up to a cold start, and its queue timed out)
        cancel = min(max(0, have - want), len(self.orders))
        for order in self.orders[len(self.orders) - cancel:]:
            order.cancelled = True
        del self.orders[len(self.orders) - cancel:]
        for ep in reversed(serving[: max(0, have - want - cancel)]):
            ep.draining = True
            self.gateway.changed()
            if not ep.replica.scheduler.has_unfinished():
                self._leave(ep)
        if self.now < self.s.run.duration_s:
            self.at(self.now + a.interval_s, self._autoscale)

    @property
    def starting(self) -> int:
        return len(self.orders)

    def _join(self, order: _Order) -> None:
        if order.cancelled:
            return
        self.orders.remove(order)
        rep = self._new_replica(self.s.fleets[0], self.s.pool.precise_prefix is not None)
        self.replicas.append(rep)
        self.gateway.add(rep)

    def _leave(self, ep: SimEndpoint) -> None:
        if self.gateway.endpoints.get(ep.id) is not ep:
            return  # already gone: several requests of a draining replica can finish in one step
        ep.replica.retire()
        self.gateway.remove(ep)

    def _sample(self) -> MetricSample:
        """The pool's `LoadSnapshot`, differenced by the `LoadSampler` the live actuators use."""
        eps = [ep for ep in self.gateway.order if ep.replica.up and not ep.draining]
        duty = self._duty_cycle(eps, self._load.since)
        loads = []
        for ep in eps:
            waiting, running, kv = ep.replica.snapshot_metrics()
            loads.append(EndpointLoad(ep.id, ep.id, True, waiting=waiting, running=running, kv_usage=kv,
                                      busy=duty.get(ep.id)))

        def p95(v: list[float]) -> float | None:
            return float(np.percentile(v, 95)) if v else None

        snap = LoadSnapshot(POOL, self.now, self.arrived, self.completed, self.tokens_in, self.tokens_out,
                            p95(self._window_ttft), p95(self._window_tpot), held=0,
                            queued=self.gateway.admission.queued + sum(q.queued for q in self.gateway.holds.values()),
                            endpoints=tuple(loads), missed=self._window_missed)
        self._window_ttft, self._window_tpot = [], []
        self._window_missed = None if self._window_missed is None else 0
        return MetricSample({POOL: self._load.sample(snap, self.starting)[BOTH]})

    def _duty_cycle(self, eps: list[SimEndpoint], since: float) -> dict[str, float]:
        """Per serving replica, the fraction of the time since the previous sample (or since it came up) it
        ran a step, as DCGM's GPU utilisation reports it. A decode leap books its device time when it
        settles, so a fraction may lean a few steps late; it is clamped to 1."""
        busy = {ep.id: ep.replica.stats.busy_s for ep in eps}
        fractions = {}
        for ep in eps:
            span = self.now - max(since, ep.replica.started_at)
            if span > 0:
                fractions[ep.id] = min(1.0, (busy[ep.id] - self._last_busy.get(ep.id, 0.0)) / span)
        self._last_busy = busy
        return fractions


@contextmanager
def _sparse_gc() -> Iterator[None]:
    """Run with the cyclic collector's thresholds raised, then put them back. A fleet holds millions of
    long-lived objects (KV blocks, prefix-index entries, requests) that the default thresholds rescan
    over and over (~20 % of a 1,000-replica run's CPU); what the simulation drops is freed by reference
    counting, and the few cycles (replica wake-up closures) are still collected, only less often."""
    old = gc.get_threshold()
    gc.set_threshold(100_000, 50, 1_000)
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclass
class _Order:
    """A replica ordered by the autoscaler, in its cold start until it joins (or is cancelled)."""

    cancelled: bool = False


class _Feed:
    """Arrival times and their units, pulled one at a time (only the next arrival is in the heap)."""

    def __init__(self, times: list[float], units: Iterator[Unit]) -> None:
        self.times, self.units, self.i = times, units, 0

    def take(self) -> tuple[int, Unit | None]:
        n = self.i
        self.i += 1
        unit = next(self.units, None)
        if unit is None:
            del self.times[self.i:]
        return n, unit

    def has_more(self) -> bool:
        return self.i < len(self.times)

    def peek_time(self) -> float:
        return self.times[self.i]
