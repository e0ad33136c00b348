"""EngineCore: schedule → execute → update, synchronously and deterministically.

It knows no HTTP and no event loop: the offline ``LLM`` drives it directly and ``AsyncEngine`` runs
it on its own thread. Detokenization and stop strings live here because a stop string ends a
request, which must free its blocks in the same step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from inferstack.engine.config import EngineConfig
from inferstack.engine.connector.base import KVConnectorBase
from inferstack.engine.executor.base import Executor
from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.events import EventBuffer, KVEventSink, ZmqEventPublisher
from inferstack.engine.kv.hashing import KVKeySpace
from inferstack.engine.kv.manager import KVCacheManager
from inferstack.engine.outputs import GRAMMAR_FAILED, FinishReason, RequestOutput
from inferstack.engine.request import Request, RequestStatus
from inferstack.engine.scheduler import Scheduler, SchedulerConfig
from inferstack.engine.stats import EngineStats
from inferstack.engine.steplog import StepLog
from inferstack.engine.structured.compiler import CompiledGrammar, GrammarCompiler
from inferstack.engine.structured.manager import Advance, StructuredOutputManager
from inferstack.engine.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger(__name__)


@dataclass
class _TextState:
    """Output text of one request; holds back a tail that could still become a stop string."""

    detok: IncrementalDetokenizer
    stops: list[str]
    include_stop: bool
    text: str = ""
    emitted: int = 0
    stopped: bool = False
    hold: int = field(init=False)

    def __post_init__(self) -> None:
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    def add(self, token_ids: list[int]) -> str | None:
        """Append tokens; return the stop string if one now appears in the text."""
        search_from = max(0, len(self.text) - self.hold)
        self.text += self.detok.feed(token_ids)
        for stop in self.stops:
            idx = self.text.find(stop, search_from)
            if idx >= 0:
                self.text = self.text[: idx + len(stop) if self.include_stop else idx]
                self.stopped = True
                return stop
        return None

    def take(self, final: bool) -> str:
        if final and not self.stopped:
            self.text += self.detok.finish()
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def build_scheduler(config: EngineConfig, num_kv_blocks: int, block_size: int, key_space: KVKeySpace,
                    max_model_len: int, connector: KVConnectorBase | None = None, events: KVEventSink | None = None,
                    clock: Callable[[], float] = time.monotonic) -> Scheduler:
    """The scheduler, KV manager and block pool of an engine with ``config``: the one construction the
    live engine, the emulated engine and the simulator (`inferstack sim`, with a virtual ``clock``) share."""
    pool = BlockPool(num_kv_blocks, block_size, config.enable_prefix_caching, events)
    return Scheduler(
        SchedulerConfig(max_num_seqs=config.seq_limit, max_num_batched_tokens=config.max_num_batched_tokens,
                        max_model_len=max_model_len, long_prefill_token_threshold=config.long_prefill_token_threshold,
                        policy=config.scheduling_policy),
        KVCacheManager(pool, key_space), connector, clock)


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, tokenizer: Tokenizer,
                 events: EventBuffer | None = None, publisher: ZmqEventPublisher | None = None,
                 structured: StructuredOutputManager | None = None, step_log: StepLog | None = None) -> None:
        self.scheduler = scheduler
        self.executor = executor
        self.tokenizer = tokenizer
        self.structured = structured
        self._events = events
        self._publisher = publisher
        self._text: dict[str, _TextState] = {}
        # every reason from 0, as vLLM does: a counter that appears only at its first increment hides that
        # increment from rate() and from the gateway's drain measurement (gateway/enginedrain.py)
        self._success: dict[str, int] = {r.value: 0 for r in FinishReason}
        self._busy_s = 0.0     # wall time inside executor steps: the accelerator's duty cycle is its rate
        # constrained requests whose grammar is still compiling: not scheduled until it is ready
        self._compiling: dict[str, tuple[Request, Future[CompiledGrammar]]] = {}
        self._idle_wait: Callable[[float], object] = time.sleep
        self._step_log = step_log

    def set_idle_wait(self, wait: Callable[[float], object]) -> None:
        """How a step that found nothing runnable waits (at most the seconds given) before returning:
        the async engine passes an event's ``wait``, set by the connector's waker and new requests."""
        self._idle_wait = wait

    @classmethod
    def build(cls, config: EngineConfig, executor: Executor, tokenizer: Tokenizer, key_space: KVKeySpace,
              max_model_len: int, connector: KVConnectorBase | None = None,
              vocab_size: int | None = None) -> EngineCore:
        events = publisher = None
        if config.kv_events_endpoint:
            publisher = ZmqEventPublisher(config.kv_events_endpoint, config.kv_events_topic)
            events = EventBuffer()
        scheduler = build_scheduler(config, executor.num_kv_blocks, executor.block_size, key_space, max_model_len,
                                    connector, events)
        compiler = GrammarCompiler(tokenizer, vocab_size or tokenizer.vocab_size, config.grammar_workers,
                                   config.grammar_timeout_s)
        return cls(scheduler, executor, tokenizer, events, publisher,
                   StructuredOutputManager(compiler, config.seq_limit),
                   StepLog(config.step_log) if config.step_log else None)

    @property
    def kv_events_endpoint(self) -> str | None:
        return self._publisher.endpoint if self._publisher else None

    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        self._text[request.request_id] = _TextState(
            IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens, params.keep_special_ids),
            params.stop, params.include_stop_str_in_output)
        if params.structured_outputs is None:
            self.scheduler.add_request(request)
            return
        if self.structured is None:
            raise ValueError("this engine was built without structured-output support")
        future = self.structured.compiler.submit(params.structured_outputs)
        self._compiling[request.request_id] = (request, future)

    def abort(self, request_id: str) -> RequestOutput | None:
        compiling = self._compiling.pop(request_id, None)
        request = (self._end_unscheduled(compiling[0], FinishReason.ABORT) if compiling
                   else self.scheduler.finish_request(request_id, FinishReason.ABORT))
        if request is None:
            return None
        return self._finish_output(request, [], self.scheduler.clock())

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedule constrained requests whose grammar is ready; fail those whose compile failed."""
        failed: list[RequestOutput] = []
        for rid, (request, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[rid]
            exc = future.exception()
            if exc is not None:
                log.warning("request %s: grammar failed: %s", rid, exc)
                request = self._end_unscheduled(request, FinishReason.ERROR, str(exc))
                failed.append(self._finish_output(request, [], self.scheduler.clock()))
                continue
            assert self.structured is not None
            self.structured.start(rid, future.result())
            self.scheduler.add_request(request)
        return failed

    @staticmethod
    def _end_unscheduled(request: Request, reason: FinishReason, why: str | None = None) -> Request:
        request.status = RequestStatus.FINISHED
        request.finish_reason, request.stop_reason = reason, why
        return request

    def step(self) -> list[RequestOutput]:
        step_start = time.perf_counter()
        outputs = self._admit_compiled() if self._compiling else []
        batch = self.scheduler.schedule()
        if batch.is_empty:
            self._flush_events()
            if self.has_unfinished():
                # external KV still arriving or grammars compiling: do not spin; the connector's waker
                # (`set_idle_wait`) ends the wait as soon as a transfer has news
                self._idle_wait(0.001)
            return outputs
        connector = self.scheduler.connector
        if connector is not None:
            connector.start_load_kv()
            failed = connector.take_failed_loads()
            if failed:                 # their blocks hold garbage: recompute, never sample from them
                self.scheduler.recompute(batch, failed)
                if batch.is_empty:
                    return outputs
        if self.structured is not None and self.structured.active:
            batch.grammar_bitmask = self.structured.bitmask(batch.sampled_ids)
        streaming = self.scheduler.streaming_ids
        landing = connector.layer_loads(streaming) if connector is not None and streaming else None
        if landing is not None:        # the forward pass computes layer l while later layers still arrive
            batch.wait_for_layer = landing.wait_for_layer
        started = time.perf_counter()
        result = self.executor.execute(batch)
        execute_s = time.perf_counter() - started
        self._busy_s += execute_s
        if landing is not None:
            self.scheduler.end_layer_loads(batch, landing.finish())
        if connector is not None:
            for seq in batch.seqs:
                self.scheduler.kv.update_block_hashes(seq.request)
            connector.save_kv(batch.seqs)
        advanced = self.scheduler.update_from_output(batch, result.sampled)
        now = self.scheduler.clock()
        for request in advanced:
            rid = request.request_id
            if request.first_token_time is None:
                request.first_token_time = now
            state = self._text[rid]
            token = request.output_token_ids[-1]
            if self.structured is not None and not request.is_finished and rid in self.structured:
                self._advance_grammar(request, token)
            stop = state.add([token])
            if stop is not None and not request.is_finished:
                self.scheduler.finish_request(rid, FinishReason.STOP, stop)
            lp = result.logprobs.get(rid)
            if request.is_finished:
                outputs.append(self._finish_output(request, [token], now, [lp] if lp else None))
            else:
                outputs.append(self._output(request, state, [token], now, [lp] if lp else None, final=False))
        self._flush_events()
        if self._step_log is not None:
            self._step_log.record(batch, step_start, execute_s, time.perf_counter(), self.has_unfinished())
        return outputs

    def _advance_grammar(self, request: Request, token: int) -> None:
        assert self.structured is not None
        advance = self.structured.advance(request.request_id, token)
        if advance is Advance.TERMINATED:
            self.scheduler.finish_request(request.request_id, FinishReason.STOP)
        elif advance is Advance.REJECTED:
            error = self.structured.error(request.request_id)
            log.error("request %s: token %d breaks its grammar: %s", request.request_id, token, error)
            # the grammar engine gave up (e.g. llguidance's parser limits on a huge schema): the client's
            # schema, not the engine, so the server answers 400 (serving._finish_reason)
            self.scheduler.finish_request(request.request_id, FinishReason.ERROR,
                                          GRAMMAR_FAILED + str(error).splitlines()[0][:300])

    def stats(self) -> EngineStats:
        c = self.scheduler.counters
        pool = self.scheduler.kv.pool
        return EngineStats(
            num_running=self.scheduler.num_running, num_waiting=self.scheduler.num_waiting,
            max_num_seqs=self.scheduler.config.max_num_seqs,
            kv_cache_usage=pool.usage, num_kv_blocks=pool.num_blocks, block_size=pool.block_size,
            prompt_tokens=c.prompt_tokens, generation_tokens=c.generation_tokens,
            prefix_cache_queries=c.prefix_cache_queries, prefix_cache_hits=c.prefix_cache_hits,
            external_prefix_cache_queries=c.external_prefix_cache_queries,
            external_prefix_cache_hits=c.external_prefix_cache_hits,
            num_preemptions=c.num_preemptions, request_success=dict(self._success), busy_seconds=self._busy_s)

    def _finish_output(self, request: Request, tokens: list[int], now: float, logprobs=None) -> RequestOutput:
        state = self._text.pop(request.request_id)
        if self.structured is not None:
            self.structured.remove(request.request_id)
        self.executor.release(request.request_id)
        reason = request.finish_reason.value if request.finish_reason else "unknown"
        self._success[reason] = self._success.get(reason, 0) + 1
        return self._output(request, state, tokens, now, logprobs, final=True)

    def _output(self, request: Request, state: _TextState, tokens: list[int], now: float, logprobs,
                final: bool) -> RequestOutput:
        metrics = {"arrival": request.arrival_time, "now": now}
        if request.scheduled_time is not None:
            metrics["scheduled"] = request.scheduled_time
        if request.first_token_time is not None:
            metrics["first_token"] = request.first_token_time
        if final:
            metrics["finished"] = now
        return RequestOutput(
            request_id=request.request_id, index=request.index, new_token_ids=tokens,
            new_text=state.take(final), finish_reason=request.finish_reason if final else None,
            stop_reason=request.stop_reason if final else None, logprobs=logprobs,
            num_prompt_tokens=request.num_prompt_tokens, num_cached_tokens=max(request.num_cached_tokens, 0),
            num_external_cached_tokens=request.num_external_cached_tokens,
            num_output_tokens=request.num_output_tokens, metrics=metrics,
            kv_transfer_params=request.kv_transfer_params if final else None)

    def _flush_events(self) -> None:
        tier_events = self.scheduler.connector.take_events() if self.scheduler.connector is not None else []
        if self._events is not None and self._publisher is not None:
            self._events.publish(tier_events)       # KV tiers, with their medium
            self._publisher.publish(self._events.drain())

    def shutdown(self) -> None:
        if self._step_log is not None:
            self._step_log.close()
        if self.structured is not None:
            self.structured.compiler.shutdown()
        if self._publisher is not None:
            self._publisher.close()
        if self.scheduler.connector is not None:
            self.scheduler.connector.shutdown()
