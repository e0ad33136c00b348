"""Continuous batching: which requests run this step, and how many tokens each computes.

One token budget per step is shared by all requests (vLLM v1 style): running requests first — a
decode takes one token, an unfinished prefill takes the next chunk of its prompt — then waiting
requests, whose prompts are chunked to fit what is left. There are no prefill/decode phases, so a
step mixes both. Under KV pressure the lowest-priority running request is preempted: its blocks
are freed and it is recomputed later (its cached prefix usually survives in the prefix cache).

A request whose external KV arrives asynchronously (a peer's blocks READ over NIXL) waits for it
outside both queues (``WAITING_FOR_REMOTE_KVS``, as in vLLM): its blocks are allocated but not in
the prefix cache, it is not scheduled, and the engine keeps stepping the others. When the connector
says the READ ended, its blocks are cached and it runs first among the newcomers; a failed READ frees
the blocks and queues it to compute from scratch. An abort meanwhile frees its blocks only when the
READ has ended (until then the READ still writes into them). A READ that lands layer by layer lets
its request run once the first layer is in, if nothing else runs: the step's forward pass waits for
each later layer, and `end_layer_loads` caches the blocks or, on failure, drops the step's token for
it and recomputes.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from inferstack.engine.connector.base import KVConnectorBase
from inferstack.engine.kv.manager import KVCacheManager
from inferstack.engine.outputs import FinishReason
from inferstack.engine.request import Request, RequestStatus

if TYPE_CHECKING:
    from inferstack.engine.structured.manager import GrammarBitmask


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    long_prefill_token_threshold: int = 0       # 0 = a prompt may take the whole step budget
    policy: Literal["fcfs", "priority"] = "fcfs"


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: compute ``num_new_tokens`` tokens from ``start``."""

    request: Request
    start: int
    num_new_tokens: int
    block_ids: list[int]
    sample: bool              # True when this step reaches the end of the known tokens

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def token_ids(self) -> list[int]:
        return self.request.all_token_ids[self.start:self.start + self.num_new_tokens]


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    grammar_bitmask: GrammarBitmask | None = None    # rows follow the sampled seqs, in order
    # set when external KV of a scheduled request is still landing: the forward pass calls it with each
    # layer's index before that layer reads the KV cache (the connector's `LayerWait.wait_for_layer`)
    wait_for_layer: Callable[[int], None] | None = None

    @property
    def sampled_ids(self) -> list[str]:
        return [s.request_id for s in self.seqs if s.sample]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SchedulerCounters:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    external_prefix_cache_queries: int = 0
    external_prefix_cache_hits: int = 0
    num_preemptions: int = 0


class _WaitingQueue:
    """FCFS deque, or a heap ordered by (priority, arrival); preempted requests go back in front."""

    def __init__(self, policy: str) -> None:
        self._priority = policy == "priority"
        self._deque: deque[Request] = deque()
        self._heap: list[tuple[tuple[int, float], int, Request]] = []
        self._tiebreak = itertools.count()

    def __len__(self) -> int:
        return len(self._heap) if self._priority else len(self._deque)

    def add(self, request: Request, front: bool = False) -> None:
        if self._priority:
            heapq.heappush(self._heap, (request.sort_key, next(self._tiebreak), request))
        elif front:
            self._deque.appendleft(request)
        else:
            self._deque.append(request)

    def peek(self) -> Request:
        return self._heap[0][2] if self._priority else self._deque[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[2] if self._priority else self._deque.popleft()

    def remove(self, request: Request) -> None:
        if self._priority:
            self._heap = [e for e in self._heap if e[2] is not request]
            heapq.heapify(self._heap)
        else:
            self._deque.remove(request)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, connector: KVConnectorBase | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock     # injected: the simulator runs this scheduler in virtual time
        self.kv = kv
        self.connector = connector
        self._delayed_free: dict[str, Request] = {}   # finished, blocks kept for a KV transfer
        self._recving: dict[str, Request] = {}        # their blocks being filled by an asynchronous load
        self._kv_ready: deque[Request] = deque()      # that load done (or landing layer by layer): run first
        self._streaming: dict[str, Request] = {}      # scheduled this step while their load still lands
        self.waiting = _WaitingQueue(config.policy)
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.counters = SchedulerCounters()

    @property
    def num_waiting(self) -> int:
        """Queued, plus those waiting for remote KV (vLLM counts them as waiting too)."""
        return len(self.waiting) + (self.num_waiting_for_remote_kvs if self._recving else 0) + len(self._kv_ready)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting_for_remote_kvs(self) -> int:
        return sum(1 for r in self._recving.values() if not r.is_finished)

    @property
    def streaming_ids(self) -> list[str]:
        """Requests of the step just scheduled whose external KV still lands layer by layer: the forward
        pass waits for each layer (`SchedulerOutput.wait_for_layer`), then `end_layer_loads`."""
        return list(self._streaming)

    def has_unfinished(self) -> bool:
        # an aborted request whose READ is still running counts: its blocks are freed when it ends
        return bool(self.running) or len(self.waiting) > 0 or bool(self._recving) or bool(self._kv_ready)

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_request(self, request_id: str, reason: FinishReason,
                       stop_reason: str | int | None = None) -> Request | None:
        """End a request (abort, stop string, ...) and release its blocks."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        elif request in self._kv_ready:
            self._kv_ready.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        request.stop_reason = stop_reason
        delay_free = False
        if self.connector is not None:
            delay_free, request.kv_transfer_params = self.connector.request_finished(
                request, self.kv.block_ids(request_id))
        if delay_free:
            self._delayed_free[request_id] = request
        elif request_id not in self._recving:     # else freed when its READ ends (`_take_loaded`)
            self.kv.free(request)
        return request

    def schedule(self) -> SchedulerOutput:
        """One step: the running requests first (preempting from the back when blocks run out), then the
        requests whose asynchronous KV load ended, then the waiting queue, all within the token budget."""
        out = SchedulerOutput()
        now = self.clock()
        self._serve_connector()
        budget, preempted = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not preempted:
            budget = self._schedule_kv_ready(out, budget)
            self._schedule_waiting(out, budget, now)
        return out

    def _serve_connector(self) -> None:
        """The KV connector's bookkeeping before a step: serve holds, free what finished sending, take loads."""
        if self.connector is None:
            return
        self.connector.serve_holds(self.kv.pool)
        for rid in self.connector.take_finished_sending():
            held = self._delayed_free.pop(rid, None)
            if held is not None:
                self.kv.free(held)
        self._take_loaded()

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> tuple[int, bool]:
        """Schedule the running requests in order; the budget left and whether any was preempted."""
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = self._chunk(request, budget)
            while not self.kv.allocate_slots(request, n):
                victim = self._pick_victim()
                victim_index = self.running.index(victim)
                if victim_index < i:
                    # Already scheduled this step: take its share back before freeing its blocks.
                    seq = next(s for s in out.seqs if s.request is victim)
                    out.seqs.remove(seq)
                    budget += seq.num_new_tokens
                    i -= 1
                self._preempt(victim)
                out.preempted.append(victim.request_id)
                preempted = True
                if victim is request:
                    break
            else:
                out.seqs.append(self._scheduled(request, n))
                budget -= n
                i += 1
                continue
            # `request` itself was preempted: the list shrank under index i.
        return budget, preempted

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, now: float) -> None:
        """Admit waiting requests in queue order while the budget, the sequence cap and the blocks allow."""
        fetching: list[Request] = []     # external KV still on its way: they wait, others go
        while len(self.waiting) > 0 and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            hits, num_hit = self.kv.get_computed_blocks(request)
            num_external, load_async = 0, False
            if self.connector is not None:
                self.kv.update_block_hashes(request)
                matched, load_async = self.connector.get_num_new_matched_tokens(request, num_hit)
                if matched is None:
                    fetching.append(self.waiting.pop())
                    continue
                num_external = matched
            if load_async and num_external > 0:
                if not self._start_async_load(request, hits, num_hit, num_external, now):
                    break
                continue
            n = self._chunk(request, budget, num_hit + num_external)
            if not self.kv.allocate_slots(request, num_external + n, hits):
                break   # the connector keeps what it staged for the next attempt
            self.waiting.pop()
            request.num_computed_tokens = num_hit + num_external
            if self.connector is not None:
                self.connector.update_state_after_alloc(request, self.kv.block_ids(request.request_id), num_external)
            self._count_admission(request, num_hit, num_external, now)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(self._scheduled(request, n))
            budget -= n
        for request in reversed(fetching):
            self.waiting.add(request, front=True)

    def _schedule_kv_ready(self, out: SchedulerOutput, budget: int) -> int:
        """Run the requests whose asynchronous load ended (their blocks are all allocated); the budget left."""
        later: list[Request] = []
        while self._kv_ready and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self._kv_ready[0]
            landing = request.request_id in self._recving    # not cached until its last layer is in
            if landing and self.running:
                # the step's forward pass would wait on the peer's READ: the running requests' next token
                # never does, so it runs once its READ ended (or once nothing else runs)
                later.append(self._kv_ready.popleft())
                continue
            n = self._chunk(request, budget)
            if not self.kv.allocate_slots(request, n, cache=not landing):
                break
            self._kv_ready.popleft()
            if landing:
                self._streaming[request.request_id] = self._recving.pop(request.request_id)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.seqs.append(self._scheduled(request, n))
            budget -= n
        self._kv_ready.extendleft(reversed(later))
        return budget

    def _count_admission(self, request: Request, num_hit: int, num_external: int, now: float) -> None:
        if request.num_cached_tokens >= 0:      # admitted before (preempted or recomputed since)
            return
        request.num_cached_tokens = num_hit + num_external
        request.num_external_cached_tokens = num_external
        request.scheduled_time = now
        self.counters.prompt_tokens += request.num_prompt_tokens
        self.counters.prefix_cache_queries += request.num_prompt_tokens
        self.counters.prefix_cache_hits += num_hit
        if self.connector is not None:
            self.counters.external_prefix_cache_queries += request.num_prompt_tokens
            self.counters.external_prefix_cache_hits += num_external

    def _start_async_load(self, request: Request, hits: list[int], num_hit: int, num_external: int,
                          now: float) -> bool:
        """Allocate the blocks an asynchronous load fills (uncached until it ends), start it, and park
        the request until `_take_loaded` hears it ended; False when the pool is short of blocks. The
        prompt's last tokens get their block now too: parked requests holding every free block between
        them, none able to run for want of one more, would wait for each other forever."""
        assert self.connector is not None
        rest = request.num_tokens - num_hit - num_external
        if not self.kv.allocate_slots(request, num_external + rest, hits, cache=False):
            return False
        self.waiting.pop()
        request.num_computed_tokens = num_hit + num_external
        self.connector.update_state_after_alloc(request, self.kv.block_ids(request.request_id), num_external)
        self._count_admission(request, num_hit, num_external, now)
        request.status = RequestStatus.WAITING_FOR_REMOTE_KVS
        self._recving[request.request_id] = request
        return True

    def _take_loaded(self) -> None:
        """Asynchronous loads that ended: cache and ready their blocks, or recompute (failure), or
        free them (the request was aborted meanwhile). Loads landing layer by layer whose first layer
        is in: ready their request already (it stays in `_recving` until it is scheduled)."""
        assert self.connector is not None
        for rid, ok in self.connector.take_finished_recving():
            request = self._recving.pop(rid, None)
            if request is None:
                continue
            ready = any(r is request for r in self._kv_ready)
            if request.is_finished:
                self.kv.free(request)
            elif ok:
                self.kv.cache_computed(request)
                if not ready:
                    self._kv_ready.append(request)
            else:                      # garbage in the blocks: never cached, so nobody else reads it
                if ready:
                    self._kv_ready.remove(request)
                self.kv.free(request)
                self._drop_external(request)
                request.num_computed_tokens = 0
                request.status = RequestStatus.WAITING
                self.waiting.add(request, front=True)
        for rid in self.connector.take_started_recving():
            request = self._recving.get(rid)
            if request is not None and not request.is_finished:
                self._kv_ready.append(request)

    def _drop_external(self, request: Request) -> None:
        self.counters.external_prefix_cache_hits -= request.num_external_cached_tokens
        request.num_cached_tokens -= request.num_external_cached_tokens
        request.num_external_cached_tokens = 0

    def end_layer_loads(self, out: SchedulerOutput, finished: Sequence[tuple[str, bool]]) -> None:
        """After the forward pass of a step that ran requests while their KV still landed
        (`streaming_ids`; ``finished`` from the connector's `LayerWait.finish`): cache the blocks of
        those whose KV arrived; take the others out of the step (it computed them over garbage, their
        sampled token is dropped) and recompute them from scratch."""
        failed = []
        for rid, ok in finished:
            request = self._streaming.get(rid)
            if request is None:
                continue
            if ok:
                self.kv.cache_computed(request)
            else:
                failed.append(request)
        self._streaming.clear()
        if failed:
            self.recompute(out, [r.request_id for r in failed])
            for request in failed:
                self._drop_external(request)

    def recompute(self, out: SchedulerOutput, request_ids: Sequence[str]) -> None:
        """Requests whose external KV failed to load into their blocks (``take_failed_loads``):
        take them out of this step, forget the hashes of the blocks the step was to fill (garbage
        now), and queue them to compute from scratch. A request that took a cache hit on those
        blocks in this same step is reset too. Their ``do_remote_prefill`` is already consumed, so
        nothing is pulled again."""
        failed = set(request_ids)
        seqs = {s.request_id: s for s in out.seqs}
        bad: set[int] = set()
        for rid in failed & seqs.keys():
            request = seqs[rid].request
            first = (seqs[rid].start - request.num_external_cached_tokens) // self.kv.block_size
            bad |= self.kv.forget_from(request, first)
        for s in out.seqs:
            if s.request_id not in failed and bad & set(s.block_ids):
                failed.add(s.request_id)
                self.kv.forget_from(s.request, s.start // self.kv.block_size)
        out.seqs = [s for s in out.seqs if s.request_id not in failed]
        for request in [r for r in self.running if r.request_id in failed]:
            self.running.remove(request)
            self.kv.free(request)
            request.status = RequestStatus.PREEMPTED
            request.num_computed_tokens = 0
            self.waiting.add(request, front=True)

    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance every scheduled request; append sampled tokens; return the requests that
        received a token this step (finished ones are already released)."""
        advanced: list[Request] = []
        for seq in out.seqs:
            request = seq.request
            if request.is_finished:
                continue
            request.num_computed_tokens += seq.num_new_tokens
            if not seq.sample:
                continue
            token = sampled[request.request_id]
            request.append_output_token(token)
            self.counters.generation_tokens += 1
            advanced.append(request)
            reason, stop_reason = self._check_stop(request, token)
            if reason is not None:
                self.finish_request(request.request_id, reason, stop_reason)
        return advanced

    def decode_run_limit(self, max_steps: int) -> int:
        """How many of the next steps (at most ``max_steps``) are decode steps of an unchanging batch that
        `advance_decodes` may apply at once: nothing waits or is held for a KV transfer, every running
        request has one token to compute and no stop token to watch for, none reaches its length limit
        before the last of them (the last may finish requests, as `update_from_output` would at its end),
        and the pool has the blocks they need (so nothing is preempted). 0 otherwise.

        The fleet simulator uses it to leap over runs of identical decode steps; `schedule` itself never
        does this."""
        running = self.running
        if (len(self.waiting) or self.connector is not None or self._recving or self._delayed_free or not running
                or len(running) > self.config.max_num_batched_tokens):
            return 0
        limit, max_len = max_steps, self.config.max_model_len
        for r in running:      # `num_tokens` / `num_output_tokens` read as lengths: once per request per leap
            p = r.sampling_params
            num_tokens = len(r.all_token_ids)
            if num_tokens - r.num_computed_tokens != 1 or p.stop_token_ids or not p.ignore_eos:
                return 0
            left = max_len - num_tokens
            if p.max_tokens is not None and p.max_tokens - len(r.output_token_ids) < left:
                left = p.max_tokens - len(r.output_token_ids)
            if left < limit:       # the step that finishes a request ends the run
                limit = left
        while limit > 0 and self.kv.total_blocks_needed(running, limit) > self.kv.pool.num_free_blocks:
            limit //= 2
        return max(limit, 0)

    def advance_decodes(self, steps: int, sampled: Sequence[Sequence[int]]) -> list[Request]:
        """Apply ``steps`` decode steps of the running batch at once (``steps`` within `decode_run_limit`),
        leaving exactly the state of ``steps`` rounds of `schedule` + `update_from_output` with those
        sampled tokens (``sampled[i]``: the ``steps`` tokens of ``running[i]``): blocks are allocated and cached
        in the same (step, request) order, so block ids, evictions and the prefix-cache map match too; requests
        that reach their length limit at the last step finish there, in batch order, after that step's
        allocations (as `update_from_output` releases them after `schedule` allocated). Returns the batch,
        finished requests included. KV slot work happens only at a step that opens or fills a block, so the
        cost is O(requests + steps x requests / block size)."""
        running = self.running
        start = [r.num_computed_tokens for r in running]
        for r, tokens in zip(running, sampled, strict=True):
            r.output_token_ids.extend(tokens)
            r.all_token_ids.extend(tokens)
        if not self.kv.allocate_leap(running, start, steps):
            self._allocate_leap_points(steps, start)
        batch = list(running)
        self.counters.generation_tokens += steps * len(batch)
        max_len = self.config.max_model_len
        at_limit: list[Request] = []
        for r, nc in zip(batch, start, strict=True):
            r.num_computed_tokens = nc + steps
            # within `decode_run_limit` (no stop tokens, EOS ignored) only a length limit finishes a request:
            # `_check_stop` only for one that reached its own
            cap = r.sampling_params.max_tokens
            if len(r.all_token_ids) >= max_len or (cap is not None and len(r.output_token_ids) >= cap):
                at_limit.append(r)
        for r in at_limit:      # after every request's progress, in batch order (as `update_from_output`)
            reason, stop_reason = self._check_stop(r, r.output_token_ids[-1])
            if reason is not None:
                self.finish_request(r.request_id, reason, stop_reason)
        return batch

    def _allocate_leap_points(self, steps: int, start: list[int]) -> None:
        """A leap's block boundaries one by one (`KVCacheManager.allocate_decode_slots`), where
        `allocate_leap` cannot take them at once."""
        running, bs = self.running, self.kv.block_size
        n = len(running)
        # step j of request i as j * n + i: sorted, the (step, request) order. A point listed twice is applied
        # once (the second finds its block taken and cached), so a list does, without a set's hashing.
        points: list[int] = []
        cached = self.kv.num_cached_blocks
        for i, (r, nc) in enumerate(zip(running, start, strict=True)):
            if cached(r.request_id) != nc // bs:
                points.append(i)       # unusual (a step caches what it fills): let step 0 catch up
            points += range((-nc) % bs * n + i, steps * n, bs * n)
            points += range((-nc - 1) % bs * n + i, steps * n, bs * n)
        points.sort()
        slots = [(running[p % n], start[p % n] + p // n) for p in points]
        if not self.kv.allocate_decode_slots(slots):
            raise RuntimeError("advance_decodes beyond decode_run_limit: the pool ran out of blocks")

    def _check_stop(self, request: Request, token: int) -> tuple[FinishReason | None, int | None]:
        params = request.sampling_params
        n_out = len(request.output_token_ids)     # `num_output_tokens`: every token of every request comes here
        if n_out >= params.min_tokens:
            if token in params.stop_token_ids:
                return FinishReason.STOP, token
            if not params.ignore_eos and token in request.eos_token_ids:
                return FinishReason.STOP, None
        if params.max_tokens is not None and n_out >= params.max_tokens:
            return FinishReason.LENGTH, None
        if len(request.all_token_ids) >= self.config.max_model_len:
            return FinishReason.LENGTH, None
        return None, None

    def _chunk(self, request: Request, budget: int, num_hit: int = 0) -> int:
        n = request.num_tokens - request.num_computed_tokens - num_hit
        if self.config.long_prefill_token_threshold > 0:
            n = min(n, self.config.long_prefill_token_threshold)
        return min(n, budget)

    def _scheduled(self, request: Request, n: int) -> ScheduledSeq:
        start = request.num_computed_tokens
        return ScheduledSeq(request=request, start=start, num_new_tokens=n,
                            block_ids=self.kv.block_ids(request.request_id),
                            sample=start + n == request.num_tokens)

    def _pick_victim(self) -> Request:
        if self.config.policy == "priority":
            return max(self.running, key=lambda r: r.sort_key)
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.counters.num_preemptions += 1
        self.waiting.add(request, front=True)
