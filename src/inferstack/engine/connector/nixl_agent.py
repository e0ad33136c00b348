"""One NIXL agent per engine (UCX backend) with the engine's paged KV cache registered, and nothing else.

NIXL (NVIDIA's inference transfer library, what vLLM's NixlConnector, Dynamo and llm-d use) moves
bytes between registered memory of two agents; UCX picks the wire (shared memory or CMA on one
host, TCP, RDMA/InfiniBand, NVLink). An agent that knows a peer's *metadata* (its name and memory
keys) can READ any region the peer registered, so an engine registers its per-layer KV cache
tensors once at start-up and never any other memory, and hands its metadata only to decode engines
that prove they share the stack's transfer secret (``nixl_transport.py``).

A block ``b`` of layer ``l`` is, in a cache of ``[2, num_blocks, block_size, H, D]`` per layer,
K at ``base[l] + b * block_bytes`` and V at ``base[l] + (num_blocks + b) * block_bytes``: a READ
names those addresses on both sides, so the decode engine's blocks are filled in place.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from inferstack.engine.connector.wire import TransferError

if TYPE_CHECKING:      # annotations only: the engine server imports this module for NixlUnavailable
    import torch


# A layer-by-layer transfer up to this size is one READ (`layer_groups`): each READ costs ~30-50 us of set-up and
# a post, and a 4 MB move in one READ instead of 3 was 5-8 % faster at the median (docs/disaggregation.md).
MIN_READ_BYTES = 4 << 20
# A larger transfer starts with a READ of as few layers as weigh this much: that READ gates the request's forward
# pass (layer 0's KV), so one 1.5 MB layer of a 1,000-token SmolLM2 prompt (~0.25 ms) rather than the three of a
# 4 MiB first READ (~0.7 ms; until the fifteenth stop); 16 MB is then 4 READs instead of 3.
FIRST_READ_BYTES = 1 << 20
# Transfers this large or larger go to the agent with UCX copy threads; smaller ones are copied by
# the thread that asks, as the hand-off to a copy thread and back costs more than the second core
# saves there (docs/disaggregation.md: a one-block READ took 0.55 ms with two copy threads, 0.28 ms
# without, p90 6 ms vs 0.4 ms on a loaded host; 4 MB went faster without; 16 MB took 20-25 % less CPU
# without in every same-run comparison of the ninth and tenth stops, 64 MB and up went faster with them).
BULK_MIN_BYTES = 32 << 20


def default_threads() -> int:
    """Copy threads of the UCX backend (`ucx_backend_params`): on one host UCX READs with CMA, a copy
    made by the reading process, so a READ split over two threads copies on two cores (measured,
    docs/disaggregation.md); idle, they sleep (no polling). No copy threads for a process pinned to one core."""
    return 2 if len(os.sched_getaffinity(0)) >= 2 else 0


class NixlUnavailable(RuntimeError):
    """The NIXL transport cannot run in this process (not installed, or UCX did not start)."""


def import_nixl() -> ModuleType:
    try:
        import nixl_cu12
    except ImportError as exc:
        raise NixlUnavailable(f"NIXL transport: the nixl-cu12 package does not import ({exc})") from None
    # nixl's Python logger prints INFO lines to stdout, where `engine serve` prints its ready line:
    # send them through our logging instead, warnings and up unless NIXL_LOG_LEVEL says otherwise.
    logger = logging.getLogger("nixl")
    logger.handlers.clear()
    logger.propagate = True
    if not os.environ.get("NIXL_LOG_LEVEL"):
        logger.setLevel(logging.WARNING)
    return nixl_cu12


def nixl_missing() -> str | None:
    """Why nixl does not import in this process, or None when it does."""
    try:
        import_nixl()
    except NixlUnavailable as exc:
        return str(exc)
    return None


def ucx_environment() -> str:
    keys = ("UCX_TLS", "UCX_NET_DEVICES")
    return ", ".join(f"{k}={os.environ.get(k, '<unset>')}" for k in keys)


# UCX configuration of our agents. No keepalive: UCX checks an idle connection by a round trip that
# only completes when the peer progresses its worker, which a prefill engine does only while it serves an
# offer (it runs no progress thread); a direct READ issued after a keepalive fired waited for its timeout
# (measured: every READ after 10 s idle with the default, 3 s idle with KEEPALIVE_INTERVAL=0.5s). A dead
# peer still fails a READ: on one host CMA fails at once, across hosts the transport times out, and every
# READ has its own deadline.
UCX_ENGINE_CONFIG = "KEEPALIVE_INTERVAL=inf"


def ucx_backend_params(threads: int) -> dict[str, str]:
    """NIXL's UCX backend parameters for ``threads`` dedicated copy threads (0: none, the caller's
    thread posts and progresses every READ). NIXL splits a READ across its threads only when it has
    ``split_batch_size`` descriptors or more (1,024 by default); ours have 2 per layer (K and V), so
    the threshold is 1: every descriptor may go to another thread."""
    params = {"engine_config": UCX_ENGINE_CONFIG}
    if threads <= 0:
        return params
    return {**params, "num_threads": str(threads), "split_batch_size": "1"}


@dataclass(frozen=True)
class KVRegions:
    """Where an engine's KV blocks are: per-layer base addresses of ``[2, num_blocks, bs, H, D]``."""

    bases: tuple[int, ...]
    num_blocks: int
    block_bytes: int
    mem_type: str        # "DRAM" or "VRAM"
    device_id: int

    @classmethod
    def of(cls, kv_caches: Sequence[torch.Tensor]) -> KVRegions:
        first = kv_caches[0]
        for cache in kv_caches:
            if not cache.is_contiguous() or cache.shape != first.shape or cache.dtype != first.dtype:
                raise ValueError("NIXL transport needs equal, contiguous per-layer KV caches")
        _, num_blocks, bs, heads, dim = first.shape
        return cls(tuple(c.data_ptr() for c in kv_caches), num_blocks, bs * heads * dim * first.element_size(),
                   "VRAM" if first.is_cuda else "DRAM", first.device.index or 0)

    def all_descs(self) -> np.ndarray:
        """Nx3 (address, length, device) descriptors of every block of every layer, K then V: row
        ``(layer * 2 + kv) * num_blocks + block`` (`indices`). Prepared once per agent and per peer
        (`NixlAgent`), a READ then names rows by index instead of building and checking descriptors."""
        bases = np.asarray(self.bases, dtype=np.int64)[:, None, None]
        kv = np.asarray([0, self.num_blocks], dtype=np.int64)[None, :, None]
        blocks = np.arange(self.num_blocks, dtype=np.int64)[None, None, :]
        addrs = (bases + (kv + blocks) * self.block_bytes).reshape(-1)
        out = np.empty((addrs.size, 3), dtype=np.int64)
        out[:, 0] = addrs
        out[:, 1] = self.block_bytes
        out[:, 2] = self.device_id
        return out

    def indices(self, layers: range, block_ids: Sequence[int]) -> np.ndarray:
        """Rows of `all_descs` for ``block_ids`` of ``layers``, layer-major, K then V, blocks in the
        given order (both sides of a READ list them alike, so row i here pairs with row i there).
        Raises `TransferError` for a block id outside the cache (an offer naming blocks that are not there)."""
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_blocks):
            raise TransferError(f"block ids outside a cache of {self.num_blocks} blocks")
        rows = np.arange(layers.start, layers.stop, dtype=np.int64)[:, None, None] * 2 + np.arange(2)[None, :, None]
        return (rows * self.num_blocks + ids[None, None, :]).reshape(-1).astype(np.int32)


def layer_groups(layers: int, layer_bytes: int, min_read_bytes: int,
                 first_read_bytes: int = FIRST_READ_BYTES) -> list[range]:
    """The layers of each READ of a layer-by-layer transfer: all in one READ for a transfer up to
    ``min_read_bytes`` (each READ costs ~50 us of set-up); else the first READ as few layers as weigh
    ``first_read_bytes`` (at most ``min_read_bytes``; one layer of a 1,000-token SmolLM2 fp32 prompt, 1.5 MB),
    then each READ twice the layers of the one before. The first layer lands as early as with a READ per
    layer, and the engine computes layer l while the next group arrives, but 30 layers take 5 READs, not 30:
    each READ is a hand-off to the copy threads and back, which on a loaded host waits for the scheduler
    (measured, docs/disaggregation.md)."""
    first = layers if layers * layer_bytes <= min_read_bytes else -(-min(first_read_bytes, min_read_bytes)
                                                                      // max(1, layer_bytes))
    size = max(1, min(layers, first))
    groups: list[range] = []
    start = 0
    while start < layers:
        groups.append(range(start, min(layers, start + size)))
        start, size = start + size, size * 2
    return groups


class _Endpoint:
    """One nixl agent with the KV cache registered (the NIXL side of `NixlAgent`)."""

    def __init__(self, nixl: ModuleType, name: str, threads: int, kv_caches: Sequence[torch.Tensor],
                 regions: KVRegions) -> None:
        strict = nixl.nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT   # pulls run on several threads
        # No UCX progress thread: idle, it polls and takes half a core (measured), which a CPU engine's
        # forward pass needs; the reader progresses its READ itself (`_wait`), the peer's CPU is not
        # involved in a READ on one host (CMA) or with RDMA.
        config = nixl.nixl_agent_config(enable_prog_thread=False, backends=[], sync_mode=strict)
        try:
            self.agent = nixl.nixl_agent(name, config)
            self.agent.create_backend("UCX", ucx_backend_params(threads))
        except Exception as exc:   # nixlBackendError and friends: no common base class is exported
            raise NixlUnavailable(f"NIXL transport: the UCX backend did not start ({exc}; {ucx_environment()})") \
                from None
        if "UCX" not in self.agent.backends:
            raise NixlUnavailable("NIXL transport: this nixl build has no UCX plugin")
        try:
            self.registered = self.agent.register_memory(list(kv_caches))
            self.local = self.agent.prep_xfer_dlist("NIXL_INIT_AGENT", regions.all_descs(), regions.mem_type)
        except Exception as exc:
            raise NixlUnavailable(f"NIXL transport: UCX could not register the KV cache ({exc}; "
                                  f"{ucx_environment()})") from None
        # each peer's blocks, prepared at its first READ: (agent name, its regions) -> prepared list
        self.remote: dict[tuple[str, KVRegions], object] = {}
        # peers this agent has READ from: UCX's connection to them is up. Setting it up needs the peer to
        # progress its worker, which it does only while it serves an offer: a direct READ (no offer) goes
        # only through an agent that is connected already, or it would wait for its timeout.
        self.connected: set[str] = set()

    def remote_list(self, peer: str, regions: KVRegions) -> object:
        """``peer``'s blocks as a prepared descriptor list (the caller holds `NixlAgent`'s lock).
        NIXL checks here that every block lies in memory the peer registered: an offer naming
        other memory is refused before any READ."""
        key = (peer, regions)
        prepared = self.remote.get(key)
        if prepared is None:
            if any(known == peer for known, _ in self.remote):
                # an agent's registered memory does not move while it lives (a restarted peer is a new agent):
                # other regions from the same agent are refused, so its lists cannot pile up here
                raise TransferError(f"peer {peer} offered KV regions other than the ones it offered before")
            try:
                prepared = self.agent.prep_xfer_dlist(peer, regions.all_descs(), regions.mem_type)
            except Exception as exc:
                raise TransferError(f"peer {peer}'s KV regions are not memory it registered ({exc})") from None
            self.remote[key] = prepared
        return prepared

    def drop(self, peer: str) -> None:
        """Release ``peer``'s prepared lists (before its agent is removed)."""
        self.connected.discard(peer)
        for key in [key for key in self.remote if key[0] == peer]:
            with contextlib.suppress(Exception):   # already gone on the NIXL side
                self.agent.release_dlist_handle(self.remote.pop(key))


class NixlAgent:
    """The engine's NIXL agent: KV cache registered at construction, peers' metadata cached by
    address (and replaced when the agent at that address changed: a restarted peer).

    With copy threads it runs two nixl agents over the same registered KV cache: a direct one (no
    copy threads; its name and metadata are what peers see, and it READs transfers under
    ``bulk_min_bytes``) and a bulk one whose UCX backend splits each READ over the copy threads."""

    def __init__(self, role: str, kv_caches: Sequence[torch.Tensor], threads: int | None = None) -> None:
        """``threads``: the UCX backend's copy threads for large READs (0: the thread that calls
        `read` always copies; None: `default_threads`)."""
        nixl = import_nixl()
        self.name = f"inferstack-{role}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        threads = default_threads() if threads is None else threads
        self.regions = KVRegions.of(kv_caches)
        self._direct = _Endpoint(nixl, self.name, 0, kv_caches, self.regions)
        self._agent = self._direct.agent
        self._bulk = _Endpoint(nixl, f"{self.name}-bulk", threads, kv_caches, self.regions) if threads > 0 else None
        self._peers: dict[str, str] = {}      # "host:port" -> the remote agent name loaded for it
        self.min_read_bytes = MIN_READ_BYTES
        self.first_read_bytes = FIRST_READ_BYTES
        self.bulk_min_bytes = BULK_MIN_BYTES
        self._lock = threading.Lock()

    def _endpoints(self) -> list[_Endpoint]:
        return [self._direct] if self._bulk is None else [self._direct, self._bulk]

    def progress(self) -> None:
        """Move UCX along (no progress thread runs): a peer's READ of our blocks needs it on our side."""
        self._agent.get_new_notifs()

    def metadata(self) -> bytes:
        return self._agent.get_agent_metadata()

    def known_peer(self, address: str) -> str:
        with self._lock:
            return self._peers.get(address, "")

    def load_peer(self, address: str, name: str, metadata: bytes | None) -> None:
        """Make ``name`` readable; a different agent at ``address`` (the peer restarted) replaces
        the old one. Raises `TransferError` when its metadata is needed but missing or bad."""
        with self._lock:
            old = self._peers.get(address)
            if old == name:
                return
            if metadata is None:
                raise TransferError(f"peer {address} sent no NIXL metadata for its agent {name}")
            for endpoint in self._endpoints():
                try:
                    loaded = endpoint.agent.add_remote_agent(metadata)
                    loaded = loaded.decode() if isinstance(loaded, bytes) else loaded   # bytes in nixl 1.5
                except Exception as exc:
                    raise TransferError(f"peer {address}: NIXL metadata rejected ({exc})") from None
                if loaded != name:
                    raise TransferError(f"peer {address} named agent {name} but its metadata is {loaded}")
            if old is not None and old != name:
                self._forget(old)
            self._peers[address] = name

    def forget(self, address: str) -> None:
        with self._lock:
            name = self._peers.pop(address, None)
            if name is not None:
                self._forget(name)

    def _forget(self, name: str) -> None:
        for endpoint in self._endpoints():
            endpoint.drop(name)
            with contextlib.suppress(Exception):   # already gone on the NIXL side: nothing left to drop
                endpoint.agent.remove_remote_agent(name)

    def read(self, peer: str, remote: KVRegions, local_ids: Sequence[int], remote_ids: Sequence[int],
             timeout_s: float, on_layer: Callable[[int], None] | None = None) -> int:
        """READ ``remote_ids`` of ``peer`` into our blocks ``local_ids``; the bytes moved. One READ per
        group of layers (`layer_groups`), in layer order, each layer announced to ``on_layer`` once its
        bytes are in: the engine's forward pass may compute layer l while later layers still arrive.
        A READ names rows of descriptor lists prepared once (ours at start-up, the peer's at its first
        READ); NIXL merges rows adjacent on both sides, so n consecutive blocks are one descriptor per
        layer and K/V (measured in docs/disaggregation.md)."""
        if len(local_ids) != len(remote_ids) or len(local_ids) == 0:
            raise ValueError(f"block lists differ in length or are empty ({len(local_ids)} vs {len(remote_ids)})")
        layers = len(self.regions.bases)
        nbytes = len(local_ids) * 2 * layers * self.regions.block_bytes
        endpoint = self._endpoint(nbytes)
        # A layer-by-layer READ's first group gates its request's forward pass: the calling thread copies it
        # (the direct agent) instead of handing it to the copy threads and waking when they are done, two
        # wake-ups that cost milliseconds on a busy host; the copy threads take the groups after it.
        first = self._direct if on_layer is not None else endpoint
        with self._lock:
            far = {id(e): e.remote_list(peer, remote) for e in (first, endpoint)}
        deadline = time.monotonic() + timeout_s
        # the rows of every layer, once: a group's rows are a slice of them (layer-major), not another
        # numpy build per READ (~25 us each, measured in docs/disaggregation.md)
        every = range(layers)
        ours_all, theirs_all = self.regions.indices(every, local_ids), remote.indices(every, remote_ids)
        per_layer = 2 * len(local_ids)
        used: list[_Endpoint] = []       # the agents that READ: each has a UCX connection to the peer after
        for i, group in enumerate(layer_groups(layers, nbytes // layers, self.min_read_bytes, self.first_read_bytes)):
            rows = slice(group.start * per_layer, group.stop * per_layer)
            ours, theirs = ours_all[rows], theirs_all[rows]
            reader = first if i == 0 else endpoint
            used.append(reader)
            try:
                handle = reader.agent.make_prepped_xfer("READ", reader.local, ours, far[id(reader)], theirs)
            except Exception as exc:
                raise TransferError(f"NIXL READ from {peer} could not start ({exc})") from None
            try:
                _wait(reader.agent, handle, peer, deadline, yield_core=reader is self._bulk)
            finally:
                with contextlib.suppress(Exception):   # a failed READ may refuse; NIXL frees it with the agent
                    reader.agent.release_xfer_handle(handle)
            for layer in group if on_layer is not None else ():
                on_layer(layer)
        with self._lock:
            for reader in used:
                reader.connected.add(peer)
        return nbytes

    def _endpoint(self, nbytes: int) -> _Endpoint:
        return self._bulk if self._bulk is not None and nbytes >= self.bulk_min_bytes else self._direct

    def connected(self, peer: str, num_blocks: int) -> bool:
        """Whether the agents that would READ ``num_blocks`` blocks have READ from ``peer`` before (their UCX
        connections are up: a READ without the peer progressing UCX, the direct READ, can complete). A large
        transfer's first layers go through the direct agent, the rest through the copy-thread one: both."""
        endpoint = self._endpoint(num_blocks * 2 * len(self.regions.bases) * self.regions.block_bytes)
        with self._lock:
            return peer in endpoint.connected and peer in self._direct.connected

    def close(self) -> None:
        with self._lock:
            for name in self._peers.values():
                self._forget(name)
            self._peers.clear()
        for endpoint in self._endpoints():
            with contextlib.suppress(Exception):   # UCX already torn down at interpreter exit
                endpoint.agent.release_dlist_handle(endpoint.local)
            with contextlib.suppress(Exception):
                endpoint.agent.deregister_memory(endpoint.registered)


def _wait(agent: object, handle: object, peer: str, deadline: float, yield_core: bool) -> None:
    """Post the READ and poll it to the end. Without copy threads this thread's polling is what
    progresses the copy, so it polls without sleeping; with them it sleeps 20 us between polls so
    that the copy threads have the core (2-core hosts)."""
    try:
        state = agent.transfer(handle)    # type: ignore[attr-defined]
        while state == "PROC":
            if time.monotonic() > deadline:
                raise TransferError(f"NIXL READ from {peer} did not finish in time")
            if yield_core:
                time.sleep(20e-6)
            state = agent.check_xfer_state(handle)    # type: ignore[attr-defined]
    except TransferError:
        raise
    except Exception as exc:     # nixlRemoteDisconnectError & co. (the bindings export no base class)
        raise TransferError(f"NIXL READ from {peer} failed: {exc}") from None
    if state != "DONE":
        raise TransferError(f"NIXL READ from {peer} failed ({state})")
