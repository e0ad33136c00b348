"""Copies between the paged KV cache (per layer ``[2, num_blocks, block_size, H, D]``) and chunk
tensors (``[num_layers, 2, n * block_size, H, D]``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import torch

from inferstack.engine.connector.wire import TransferError
from inferstack.engine.kv.hashing import BLOCKS_PER_CHUNK

log = logging.getLogger("inferstack.engine.connector")


def _index(block_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(list(block_ids), dtype=torch.long, device=device)


def scatter_into_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], src: torch.Tensor) -> None:
    """Write ``src`` (n blocks' worth of tokens, all layers) into blocks ``block_ids``."""
    _, _, bs, heads, dim = kv_caches[0].shape
    n = len(block_ids)
    ids = _index(block_ids, kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        cache.index_copy_(1, ids, src[layer].view(2, n, bs, heads, dim).to(cache.device, non_blocking=True))


def gather_blocks(kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> None:
    """Read blocks ``block_ids`` of every layer into ``out`` (contiguous, on the caches' device
    or the host)."""
    _, _, bs, heads, dim = kv_caches[0].shape
    n = len(block_ids)
    ids = _index(block_ids, kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        dst = out[layer].view(2, n, bs, heads, dim)
        if dst.device == cache.device:
            torch.index_select(cache, 1, ids, out=dst)
        else:
            dst.copy_(cache.index_select(1, ids))


class LayerProgress:
    """How far a load that lands layer by layer (in layer order) has got; ``wake`` is called when the
    first layer lands, so an idle engine schedules the request at once."""

    def __init__(self) -> None:
        self.wake: Callable[[], None] = _nothing
        self._landed = 0
        self._ended = False
        self._cond = threading.Condition()

    def landed(self, layer: int) -> None:
        with self._cond:
            self._landed = layer + 1
            self._cond.notify_all()
        if layer == 0:
            self.wake()

    def end(self) -> None:
        """Nothing more will land (the load finished or failed)."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    @property
    def started(self) -> bool:
        with self._cond:
            return self._landed > 0

    def wait(self, layer: int) -> None:
        """Until ``layer`` landed or the load ended (a failed load is reported by its future)."""
        with self._cond:
            self._cond.wait_for(lambda: self._landed > layer or self._ended)


def _nothing() -> None:
    return None


@dataclass
class LayerLoads:
    """Asynchronous loads of requests scheduled before their last layer landed: the forward pass calls
    `wait_for_layer` before a layer reads its KV, and `finish` after it waits for the loads' ends."""

    loads: list[tuple[str, LayerProgress, Future[float]]]
    waited_s: float = 0.0        # what the forward pass and `finish` spent waiting: on the step's critical path

    def wait_for_layer(self, layer: int) -> None:
        t0 = time.perf_counter()
        for _, progress, _ in self.loads:
            progress.wait(layer)
        self.waited_s += time.perf_counter() - t0

    def finish(self) -> list[tuple[str, float | None]]:
        """(request id, seconds the load took, or None when it failed: the step computed over garbage)."""
        t0 = time.perf_counter()
        out = [(rid, _read_result(rid, fut)) for rid, _, fut in self.loads]
        self.waited_s += time.perf_counter() - t0
        return out


def _read_result(request_id: str, fut: Future[float]) -> float | None:
    try:
        return fut.result()
    except (TransferError, CancelledError) as exc:
        log.warning("request %s: reading external KV failed, recomputing: %s", request_id, exc)
        return None


class PendingLoad(Protocol):
    """External KV a connector can put into a request's blocks once they are allocated: chunks
    already on the host (`StagedLoad`), or blocks a peer holds that are read straight into the
    engine's KV cache (the NIXL transport's ``RemoteLoad``)."""

    first_block: int
    num_blocks: int
    # True: `copy_into` waits on a transfer (a NIXL READ), so it runs on a reader thread while the
    # engine keeps stepping; False: a host copy, done on the engine thread before the forward pass.
    asynchronous: bool
    # An asynchronous load that lands layer by layer says so here: its request may run once the first
    # layer is in, the forward pass waiting for each later layer (`LayerLoads`). None: all at once.
    layers: LayerProgress | None

    def rebase(self, first_block: int) -> PendingLoad | None: ...

    def accept(self, block_ids: Sequence[int], num_external_tokens: int, block_size: int) -> None: ...

    def copy_into(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> None:
        """Fill the accepted blocks; raises `TransferError` when the KV did not arrive (the blocks
        then hold garbage and the request must be recomputed)."""

    def discard(self) -> None:
        """The load will not happen (request aborted or offer declined): let go of what it holds."""


@dataclass
class StagedLoad:
    """External KV held on the host for one request until its blocks are allocated.

    ``chunks[i]`` covers request blocks ``[(c0 + i) * 16, (c0 + i + 1) * 16)`` where
    ``c0 = first_block // 16`` (the last chunk may be shorter); blocks ``first_block ..
    first_block + num_blocks - 1`` are the ones to load.
    """

    first_block: int
    num_blocks: int
    chunks: list[torch.Tensor]
    block_ids: list[int] = field(default_factory=list)
    asynchronous: bool = False
    layers: LayerProgress | None = None

    def rebase(self, first_block: int) -> StagedLoad | None:
        """The same load for a request whose device prefix hit moved to ``first_block`` since it
        was staged; None when what is staged no longer starts there."""
        if first_block == self.first_block:
            return self
        end = self.first_block + self.num_blocks
        if not self.first_block < first_block < end:
            return None
        skip = first_block // BLOCKS_PER_CHUNK - self.first_block // BLOCKS_PER_CHUNK
        return StagedLoad(first_block, end - first_block, self.chunks[skip:])

    def accept(self, block_ids: Sequence[int], num_external_tokens: int, block_size: int) -> None:
        self.num_blocks = min(self.num_blocks, num_external_tokens // block_size)
        self.block_ids = list(block_ids[self.first_block:self.first_block + self.num_blocks])

    def copy_into(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> None:
        block, done = self.first_block, 0
        for chunk in self.chunks:
            offset = block % BLOCKS_PER_CHUNK
            n = min(BLOCKS_PER_CHUNK - offset, self.num_blocks - done)
            if n <= 0:
                break
            scatter_into_blocks(kv_caches, self.block_ids[done:done + n],
                                chunk[:, :, offset * block_size:(offset + n) * block_size])
            block += n
            done += n

    def discard(self) -> None:
        return None   # host tensors only: the garbage collector frees them


def _discard_result(fut: Future[PendingLoad | None]) -> None:
    if not fut.cancelled() and fut.exception() is None:
        load = fut.result()
        if load is not None:
            load.discard()


class Stager:
    """Loads staged per request, fetched on the caller's thread or on a background thread.

    A background fetch lets the scheduler run other requests while KV is read from a slow tier
    or pulled from a prefill engine (``get_num_new_matched_tokens`` answers None meanwhile, as in
    vLLM). A finished fetch that found nothing is remembered as zero, so it is not retried.

    An accepted `asynchronous` load (a NIXL READ into the request's blocks) runs on a reader thread;
    `take_finished_reads` reports it once its bytes are in the blocks (or the READ failed). Until then
    the scheduler neither runs the request nor caches its blocks, and never frees them (the READ is
    still writing into them), even if the request is aborted meanwhile.
    """

    PENDING = -1

    def __init__(self, workers: int = 1) -> None:
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kv-stage")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-read")
        self._reading: dict[str, Future[float]] = {}   # async loads in flight: seconds they took
        self._pending: dict[str, Future[PendingLoad | None]] = {}
        self._staged: dict[str, PendingLoad | None] = {}
        self._ready: list[tuple[str, PendingLoad]] = []   # accepted, loaded before the next forward
        self._failed: list[str] = []           # loads that raised after their blocks were accepted
        self._layers: dict[str, LayerProgress] = {}   # async loads in flight that land layer by layer
        self._announced: set[str] = set()              # those `take_started_reads` named already
        self._wake: Callable[[], None] = _nothing
        self._lock = threading.Lock()

    def set_waker(self, wake: Callable[[], None]) -> None:
        """``wake()`` runs when a fetch ends, a READ's first layer lands and a READ ends: an idle engine
        then schedules at once instead of at its next poll."""
        self._wake = wake

    def check(self, request_id: str, first_block: int, block_size: int) -> int | None:
        """PENDING while fetching; the tokens staged (possibly 0); None if nothing was started."""
        with self._lock:
            fut = self._pending.get(request_id)
            if fut is not None:
                if not fut.done():
                    return self.PENDING
                del self._pending[request_id]
                try:
                    self._staged[request_id] = fut.result()
                except Exception:
                    self._staged[request_id] = None
            if request_id not in self._staged:
                return None
            load = self._staged[request_id]
            if load is not None:
                rebased = self._staged[request_id] = load.rebase(first_block)
                if rebased is None:
                    load.discard()
                load = rebased
            return load.num_blocks * block_size if load is not None else 0

    def put(self, request_id: str, load: PendingLoad | None) -> None:
        with self._lock:
            self._staged[request_id] = load

    def start(self, request_id: str, fetch: Callable[[], PendingLoad | None]) -> None:
        with self._lock:
            fut = self._pending[request_id] = self._pool.submit(fetch)
        fut.add_done_callback(self._woken)

    def _woken(self, _: Future) -> None:
        self._wake()

    def is_async(self, request_id: str) -> bool:
        """Whether the load staged for ``request_id`` is read on the reader thread."""
        with self._lock:
            load = self._staged.get(request_id)
        return load is not None and load.asynchronous

    def accept(self, request_id: str, block_ids: Sequence[int], num_external_tokens: int, block_size: int,
               kv_caches: Sequence[torch.Tensor] = ()) -> int:
        """The scheduler allocated ``block_ids`` and took ``num_external_tokens`` of the offer (0
        releases the staged load): start an asynchronous load now, queue another for `load_into`;
        returns the tokens it brings."""
        with self._lock:
            staged = self._staged.pop(request_id, None)
        if staged is None:
            return 0
        if num_external_tokens <= 0:
            staged.discard()
            return 0
        staged.accept(block_ids, num_external_tokens, block_size)
        if staged.asynchronous:
            if staged.layers is not None:
                staged.layers.wake = self._wake
            with self._lock:
                fut = self._reading[request_id] = self._reader.submit(_timed_copy, staged, kv_caches, block_size)
                if staged.layers is not None:
                    self._layers[request_id] = staged.layers
            fut.add_done_callback(self._woken)
        else:
            self._ready.append((request_id, staged))
        return staged.num_blocks * block_size

    def take_finished_reads(self) -> list[tuple[str, float | None]]:
        """Asynchronous loads that ended since the last call: (request id, seconds the load took, or
        None when it failed and the blocks hold garbage)."""
        with self._lock:
            done = [(rid, fut) for rid, fut in self._reading.items() if fut.done()]
            for rid, _ in done:
                del self._reading[rid]
                self._layers.pop(rid, None)
                self._announced.discard(rid)
        return [(rid, _read_result(rid, fut)) for rid, fut in done]

    def take_started_reads(self) -> list[str]:
        """Layer-by-layer reads whose first layer landed since the last call (each named once): their
        request may run now, its forward pass waiting for the layers still to come (`layer_loads`)."""
        with self._lock:
            started = [rid for rid, progress in self._layers.items()
                       if rid not in self._announced and progress.started]
            self._announced.update(started)
        return started

    def layer_loads(self, request_ids: Sequence[str]) -> LayerLoads | None:
        """The reads of ``request_ids``, scheduled before they ended; `take_finished_reads` no longer
        reports them (`LayerLoads.finish` does)."""
        loads: list[tuple[str, LayerProgress, Future[float]]] = []
        with self._lock:
            for rid in request_ids:
                fut = self._reading.pop(rid, None)
                progress = self._layers.pop(rid, None)
                self._announced.discard(rid)
                if fut is not None and progress is not None:
                    loads.append((rid, progress, fut))
        return LayerLoads(loads) if loads else None

    def load_into(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> float | None:
        """Copy every accepted load into its blocks (before the forward pass); the seconds spent,
        or None when there was nothing to load. A load that fails is recorded for `take_failed`."""
        if not self._ready:
            return None
        t0 = time.perf_counter()
        for request_id, load in self._ready:
            try:
                load.copy_into(kv_caches, block_size)
            except TransferError as exc:
                log.warning("request %s: loading external KV failed, recomputing: %s", request_id, exc)
                self._failed.append(request_id)
        self._ready.clear()
        return time.perf_counter() - t0

    def take_failed(self) -> list[str]:
        out, self._failed = self._failed, []
        return out

    def drop(self, request_id: str) -> None:
        with self._lock:
            staged = self._staged.pop(request_id, None)
            fut = self._pending.pop(request_id, None)
        if staged is not None:
            staged.discard()
        if fut is not None and not fut.cancel():
            fut.add_done_callback(_discard_result)   # still fetching: let go of it when it lands

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._reader.shutdown(wait=True, cancel_futures=True)


def _timed_copy(load: PendingLoad, kv_caches: Sequence[torch.Tensor], block_size: int) -> float:
    t0 = time.perf_counter()
    try:
        load.copy_into(kv_caches, block_size)
    finally:
        if load.layers is not None:
            load.layers.end()    # a forward pass waiting for a layer that will never land goes on
    return time.perf_counter() - t0

