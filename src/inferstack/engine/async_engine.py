"""AsyncEngine: the EngineCore on its own thread, streaming deltas to asyncio callers.

The step loop never runs on the HTTP event loop (like vLLM v1's EngineCore process): requests
and aborts reach it through a thread-safe inbox, and each step's outputs go back to the loop in a
single ``call_soon_threadsafe`` call.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from prometheus_client.registry import Collector

from inferstack.engine.builder import BuiltEngine, build_engine
from inferstack.engine.config import EngineConfig
from inferstack.engine.llm import expand_choices
from inferstack.engine.outputs import FinishReason, RequestOutput
from inferstack.engine.request import Request
from inferstack.engine.sampling_params import SamplingParams
from inferstack.engine.stats import EngineStats
from inferstack.engine.structured.spec import GrammarSpec

log = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, built: BuiltEngine) -> None:
        self._built = built
        self.core = built.core
        self.tokenizer = built.tokenizer
        self.model_name = built.model_name
        self.max_model_len = built.max_model_len
        self.model_digest = built.model_digest
        self.tool_format = built.tool_format
        self.strict_limits = built.strict_limits
        self._inbox: queue.SimpleQueue[tuple[str, object]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._stopping = threading.Event()
        self._dead: BaseException | None = None
        self._woken = threading.Event()
        connector = self.core.scheduler.connector
        if connector is not None:
            # a peer's pin of cached blocks must not wait for the next request, and a request whose KV
            # transfer has news (fetched, first layer in, READ done) must not wait for the next 1 ms poll
            connector.set_waker(self._wake)
            self.core.set_idle_wait(self._idle_wait)
        self._thread = threading.Thread(target=self._run, name="engine-core", daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        self._woken.set()
        self._inbox.put(("wake", None))

    def _idle_wait(self, seconds: float) -> None:
        self._woken.wait(seconds)
        self._woken.clear()

    @classmethod
    def from_config(cls, config: EngineConfig) -> AsyncEngine:
        return cls(build_engine(config))

    @property
    def error(self) -> BaseException | None:
        """Why the engine loop stopped, or None while it is alive (``/health`` reports it)."""
        return self._dead

    @property
    def kv_events_endpoint(self) -> str | None:
        return self.core.kv_events_endpoint

    def ready_info(self) -> dict[str, object]:
        """What a supervisor needs to route cross-replica KV reads to this engine (the ready file's extra
        keys): its KV events endpoint, its KV transfer address and its KV key space, when it has them."""
        info: dict[str, object] = {}
        if self.kv_events_endpoint:
            info["kv_events"] = self.kv_events_endpoint
        connector = self.core.scheduler.connector
        address = connector.reuse_address() if connector is not None else None
        if address is not None:
            info["kv_transfer"] = address
        if info:       # a gateway indexing these events or naming this holder must hash blocks like this engine
            space = self.core.scheduler.kv.key_space
            info["kv_key_space"] = {"model_digest": space.model_digest, "dtype": space.dtype,
                                    "kv_layout": space.kv_layout, "block_size": space.block_size}
        return info

    def stats(self) -> EngineStats:
        return self.core.stats()

    def metric_collectors(self) -> list[Collector]:
        """Prometheus collectors beyond the engine stats: KV tiers and PD transfers (docs/kv-cache.md)."""
        connector = self.core.scheduler.connector
        if connector is None:      # the connectors import torch: an engine without one must not pay for it
            return []
        from inferstack.engine.connector.factory import connector_collectors

        return connector_collectors(connector, self.model_name)

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams, request_id: str,
                       priority: int = 0, cache_salt: str | None = None,
                       kv_transfer_params: dict | None = None) -> AsyncIterator[RequestOutput]:
        if self._dead is not None:
            raise EngineDeadError(f"the engine loop has stopped: {self._dead}")
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        requests = expand_choices(request_id, prompt_token_ids, params, time.monotonic(),
                                  self._built.eos_token_ids, priority, cache_salt, kv_transfer_params)
        for r in requests:
            if r.request_id in self._streams:
                raise ValueError(f"request id {r.request_id!r} is already in flight")
        for r in requests:
            self._streams[r.request_id] = stream
        self._inbox.put(("add", requests))
        pending = {r.request_id for r in requests}
        try:
            while pending:
                out = await stream.queue.get()
                if isinstance(out, BaseException):
                    raise EngineDeadError(str(out)) from out
                if out.finished:
                    pending.discard(out.request_id)
                out.request_id = request_id
                yield out
        finally:
            for rid in pending:
                self._inbox.put(("abort", rid))
            for r in requests:
                self._streams.pop(r.request_id, None)

    async def compile_grammar(self, spec: GrammarSpec, param: str) -> None:
        """Compile (or find cached) off the step loop; raises GrammarError (a 400) on failure or timeout."""
        assert self.core.structured is not None
        await self.core.structured.compiler.compile_async(spec, param)

    async def abort(self, request_id: str) -> None:
        for rid in [k for k in self._streams if k == request_id or k.startswith(request_id + "#")]:
            self._inbox.put(("abort", rid))

    async def shutdown(self) -> None:
        self._stopping.set()
        self._inbox.put(("stop", None))
        await asyncio.to_thread(self._thread.join, 30)
        self.core.shutdown()

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                block = not self.core.has_unfinished()
                if not self._drain_inbox(block):
                    break
                outputs = self.core.step()
                if outputs:
                    self._deliver(outputs)
        except BaseException as exc:  # the loop must never die silently: fail every caller
            log.exception("engine loop crashed")
            self._dead = exc
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    def _drain_inbox(self, block: bool) -> bool:
        aborted: list[RequestOutput] = []
        while True:
            try:
                kind, payload = self._inbox.get(block=block, timeout=None)
            except queue.Empty:
                break
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                for request in payload:  # type: ignore[union-attr]
                    assert isinstance(request, Request)
                    self.core.add_request(request)
            elif kind == "abort":
                out = self.core.abort(payload)  # type: ignore[arg-type]
                if out is not None:
                    aborted.append(out)
        if aborted:
            self._deliver(aborted)
        return True

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for q, out in items:
        q.put_nowait(out)


__all__ = ["AsyncEngine", "EngineDeadError", "FinishReason"]
