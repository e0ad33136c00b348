"""KV transfer engine for prefill/decode disaggregation: TCP, plus a shared-memory fast path.

The prefill engine runs a ``KVTransferServer`` over a ``KVSource`` (the KV blocks it keeps for
finished prefills); the decode engine pulls a request's blocks with ``KVTransferClient.pull`` and
copies each chunk into its own blocks as it arrives. Both sides are pipelined: the server gathers
chunk i+1 from its paged cache while chunk i is on the wire, and the client receives chunk i+1
while its caller copies chunk i. On one host (same boot id and hostname) the payload goes through
a pooled file in /dev/shm instead of the socket (``shm.py``): the server gathers straight into it
and the client copies straight out of it, two copies instead of four. See ``wire.py`` for the
format.
"""

from __future__ import annotations

import contextlib
import hmac
import queue
import secrets
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from inferstack.engine.connector.blocks import gather_blocks
from inferstack.engine.connector.shm import SHM_DIR, Segment, SegmentMaps, SegmentPool
from inferstack.engine.connector.wire import (
    FLAG_SHM,
    FLAG_SHM_OK,
    NO_NIXL,
    ZERO_HASH,
    Frame,
    FrameType,
    TransferError,
    checksum,
    host_identity,
    read_frame_header,
    read_payload,
    recv_exact,
)
from inferstack.kvstore.codec import CODE_DTYPES, DTYPE_CODES

DEFAULT_CHUNK_BLOCKS = 16


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    def chunk_shape(self, num_blocks: int) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, num_blocks * self.block_size, self.num_kv_heads, self.head_dim)

    def chunk_bytes(self, num_blocks: int) -> int:
        n = 1
        for d in self.chunk_shape(num_blocks):
            n *= d
        return n * self.dtype.itemsize


@dataclass(frozen=True)
class LinkModel:
    """The network an emulated engine's transfers stand for. Its KV cache is a one-float-per-token
    shadow, so a pull of n tokens is made to last ``seconds(n)`` (the decode side waits before its
    DONE, which the prefill side waits for) and both sides count ``n * bytes_per_token`` bytes."""

    seconds: Callable[[int], float]
    bytes_per_token: float


@dataclass
class TransferSpec:
    """What the source offers for one request: its full blocks and how to gather them."""

    layout: KVLayout
    num_blocks: int
    block_hashes: Sequence[bytes] | None
    read: Callable[[int, int, torch.Tensor], None]   # (first block, n blocks, out [L,2,n*bs,H,D])
    block_ids: Sequence[int] | None = None           # paged sources: where the blocks are (NIXL reads them)
    still_held: Callable[[], bool] = lambda: True    # False once released (expired): the blocks may be reused


class KVSource:
    """Where a transfer server finds KV: ``open`` a request, then ``release`` it when done."""

    def open(self, request_id: str) -> TransferSpec | None:
        raise NotImplementedError

    def release(self, request_id: str) -> None:
        raise NotImplementedError

    def expire(self, now: float) -> None:
        """Drop holds nobody pulled in time (called about once a second)."""

    def claim(self, request_id: str, token: str, first: int, block_ids: Sequence[int], last_hash: bytes) -> bool:
        """Release a hold a peer READ without a pull (NIXL direct READ); False when that was not this hold."""
        return False


@dataclass
class _Hold:
    block_ids: list[int]
    block_hashes: list[bytes] | None
    deadline: float
    on_release: Callable[[str], None] | None
    leased: bool = False      # a pull is serving it (`PagedKVSource.open`)
    # Names this hold and no later one of the same request id: a direct READ's claim must name it.
    token: str = field(default_factory=lambda: secrets.token_hex(8))


class PagedKVSource(KVSource):
    """Blocks held in an engine's paged KV cache (per layer ``[2, num_blocks, block_size, H, D]``).

    The engine ``hold``s a finished prefill's blocks (not freeing them); the server gathers them
    on its own threads — safe because held blocks are never written — and ``on_release`` tells
    the engine to free them after the pull, or after ``hold_s`` if no decode engine came.
    ``on_release`` runs on a server thread: the engine should only enqueue the free there.
    """

    def __init__(self, kv_caches: Sequence[torch.Tensor], hold_s: float = 60.0) -> None:
        if not kv_caches:
            raise ValueError("PagedKVSource needs the engine's per-layer KV caches")
        two, _, block_size, heads, dim = kv_caches[0].shape
        if two != 2:
            raise ValueError("KV cache per layer must be [2, blocks, block_size, heads, dim], "
                             f"got {tuple(kv_caches[0].shape)}")
        self.kv_caches = list(kv_caches)
        self.layout = KVLayout(len(kv_caches), heads, dim, block_size, kv_caches[0].dtype)
        self.hold_s = hold_s
        self._holds: dict[str, _Hold] = {}
        self._lock = threading.Lock()

    def hold(self, request_id: str, block_ids: Sequence[int], block_hashes: Sequence[bytes] | None = None,
             on_release: Callable[[str], None] | None = None) -> bool:
        """Hold ``block_ids`` under ``request_id`` until pulled or expired. False, holding nothing, when the
        id is held already: the earlier hold stays whole (a peer may be reading it) and the caller keeps its
        blocks. A replace used to leak the earlier blocks and let the earlier hold's release free these."""
        with self._lock:
            if request_id in self._holds:
                return False
            self._holds[request_id] = _Hold(list(block_ids), list(block_hashes) if block_hashes else None,
                                            time.monotonic() + self.hold_s, on_release)
        return True

    def open(self, request_id: str) -> TransferSpec | None:
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.leased:
                return None
            # Leased to one pull: only the connection serving it releases it (when it ends, however it
            # ends), so the blocks stay put for the whole READ and no second puller reads them after.
            hold.leased, hold.deadline = True, float("inf")

        def read(first: int, n: int, out: torch.Tensor) -> None:
            gather_blocks(self.kv_caches, hold.block_ids[first:first + n], out)

        def still_held() -> bool:
            with self._lock:
                return self._holds.get(request_id) is hold

        return TransferSpec(self.layout, len(hold.block_ids), hold.block_hashes, read, hold.block_ids, still_held)

    def release(self, request_id: str) -> None:
        with self._lock:
            hold = self._holds.pop(request_id, None)
        if hold is not None and hold.on_release is not None:
            hold.on_release(request_id)

    def token(self, request_id: str) -> str | None:
        """The token of ``request_id``'s hold (what a direct READ's claim names), None when not held."""
        with self._lock:
            hold = self._holds.get(request_id)
            return hold.token if hold is not None else None

    def claim(self, request_id: str, token: str, first: int, block_ids: Sequence[int], last_hash: bytes) -> bool:
        """Release ``request_id``'s hold if it is the one ``token`` names, no pull has it leased, and
        ``block_ids`` are its blocks from ``first`` on, the last one hashing to ``last_hash``. True proves
        to a peer whose READ of those blocks ended before it sent the claim that they were held (never
        written) throughout that READ: a hold released (pulled, expired) is never held again, and a new
        hold of the same id has another token. False leaves the hold as it was."""
        ids = list(block_ids)
        with self._lock:
            hold = self._holds.get(request_id)
            if hold is None or hold.leased or not _names(hold, token, first, ids, last_hash):
                return False
            del self._holds[request_id]
        if hold.on_release is not None:
            hold.on_release(request_id)
        return True

    def expire(self, now: float) -> None:
        with self._lock:
            stale = [rid for rid, h in self._holds.items() if h.deadline < now]
        for rid in stale:
            self.release(rid)

    def held(self) -> list[str]:
        with self._lock:
            return list(self._holds)


def _names(hold: _Hold, token: str, first: int, ids: list[int], last_hash: bytes) -> bool:
    """Whether a claim names this hold and blocks of it (``claim``)."""
    end = first + len(ids)
    if not ids or first < 0 or end > len(hold.block_ids) or hold.block_ids[first:end] != ids:
        return False
    if hold.block_hashes is not None and (end > len(hold.block_hashes) or hold.block_hashes[end - 1] != last_hash):
        return False
    return hmac.compare_digest(hold.token, token)


@dataclass
class TransferStats:
    """Cumulative counters per (direction, transport); direction is "send" or "recv"; ``path``:
    pd (prefill → decode) or reuse (a replica's cached prefix read by another)."""

    path: str = "pd"
    bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    seconds: dict[tuple[str, str], float] = field(default_factory=dict)
    transfers: dict[tuple[str, str], int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    changes: int = 0      # bumped by every record and failure: the engine's /metrics re-renders on a change

    def record(self, direction: str, transport: str, nbytes: int, seconds: float) -> None:
        key = (direction, transport)
        with self.lock:
            self.bytes[key] = self.bytes.get(key, 0) + nbytes
            self.seconds[key] = self.seconds.get(key, 0.0) + seconds
            self.transfers[key] = self.transfers.get(key, 0) + 1
            self.changes += 1     # after the update: a scrape that sees the new count sees the new values

    def fail(self, direction: str) -> None:
        with self.lock:
            self.failures[direction] = self.failures.get(direction, 0) + 1
            self.changes += 1


def _tensor_view(buf, dtype: torch.dtype, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    count = 1
    for d in shape:
        count *= d
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # read-only mmap on the receiving side
        return torch.frombuffer(buf, dtype=dtype, count=count, offset=offset).view(shape)


# ---------------------------------------------------------------------------------------------
# server (prefill side)


@dataclass(frozen=True)
class Served:
    """How a NIXL pull ended: ``offered``: blocks were opened or pinned for it (the server releases
    them now, DONE or not); ``reusable``: it ended cleanly, the connection may carry the next pull."""

    offered: bool
    reusable: bool


class PullHandler(Protocol):
    """Serves a transfer whose bytes do not go through this connection (NIXL_PULL)."""

    def serve(self, conn: socket.socket, pull: Frame, source: KVSource, stats: TransferStats) -> Served: ...


class KVTransferServer:
    def __init__(self, source: KVSource, host: str = "127.0.0.1", port: int = 0, allow_shm: bool = True,
                 chunk_blocks: int = DEFAULT_CHUNK_BLOCKS, io_timeout_s: float = 30.0,
                 link: LinkModel | None = None, nixl: PullHandler | None = None) -> None:
        self.source = source
        self.link = link
        self.nixl = nixl
        self.allow_shm = allow_shm and SHM_DIR.is_dir()
        self.chunk_blocks = chunk_blocks
        self.io_timeout_s = io_timeout_s
        self.stats = TransferStats()
        self._identity = host_identity()
        self._segments = SegmentPool() if self.allow_shm else None
        self._sock = socket.create_server((host, port))
        self._sock.settimeout(1.0)
        self._closed = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._conns: set[socket.socket] = set()     # open, possibly idle between NIXL pulls
        self._accept = threading.Thread(target=self._accept_loop, name="kv-transfer-accept", daemon=True)
        self._accept.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._sock.getsockname()[:2]
        return host, port

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)     # wakes the accept loop at once on Linux
        self._accept.join(5)
        self._sock.close()
        for conn in list(self._conns):              # wakes threads idle on a kept connection
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for t in list(self._threads):
            t.join(5)
        if self._segments is not None:
            self._segments.close()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            self.source.expire(time.monotonic())
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(conn,), name="kv-transfer-send", daemon=True)
            self._threads.add(t)
            self._conns.add(conn)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        request_id = ""
        segment: Segment | None = None
        try:
            conn.settimeout(self.io_timeout_s)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pull = read_frame_header(conn)
            if pull.type in (FrameType.NIXL_PULL, FrameType.NIXL_CLAIM):
                self._serve_nixl(conn, pull)
                return
            if pull.type != FrameType.PULL:
                raise TransferError(f"expected PULL, got {pull.type.name}")
            spec = self.source.open(pull.request_id)
            if spec is None:     # not held here, or leased to another pull: not ours to release
                conn.sendall(_error(pull.request_id, f"no KV held for request {pull.request_id!r} "
                                                     "(expired, never prefilled here, or already being pulled)"))
                return
            request_id = pull.request_id       # opened: released below however the pull ends
            use_shm = bool(self.allow_shm and pull.flags & FLAG_SHM_OK and self._identity
                           and pull.aux == self._identity)
            t0 = time.perf_counter()
            if use_shm:
                assert self._segments is not None
                segment = self._segments.checkout(sum(spec.layout.chunk_bytes(n) for _, n in self._plan(spec)))
                sent = self._send_shm(conn, request_id, spec, segment)
            else:
                sent = self._send_tcp(conn, request_id, spec)
            done = read_frame_header(conn)            # DONE: the client has everything it needs
            if done.type != FrameType.DONE:
                raise TransferError(f"expected DONE, got {done.type.name}")
            if segment is not None and self._segments is not None:
                self._segments.checkin(segment)      # the client is done reading it
                segment = None
            if self.link is not None:
                sent = int(spec.num_blocks * spec.layout.block_size * self.link.bytes_per_token)
            self.stats.record("send", "shm" if use_shm else "tcp", sent, time.perf_counter() - t0)
        except (OSError, TransferError):
            self.stats.fail("send")
        finally:
            if segment is not None and self._segments is not None:
                self._segments.discard(segment)      # a client may still map it: never reuse
            if request_id:
                self.source.release(request_id)
            conn.close()
            self._conns.discard(conn)
            self._threads.discard(threading.current_thread())

    def _serve_nixl(self, conn: socket.socket, pull: Frame) -> None:
        """NIXL pulls (and claims of direct READs) one after another: the decode engine keeps the
        connection for its next one to this engine (``control_pool.py``). An offer made is released as
        its pull ends; a refused pull leaves the hold to a TCP pull."""
        while True:
            if self.nixl is None:
                read_payload(conn, pull, limit=1 << 16)
                conn.sendall(_error(pull.request_id, f"{NO_NIXL}: this prefill engine runs no NIXL agent"))
                return
            served = self.nixl.serve(conn, pull, self.source, self.stats)
            if served.offered:
                self.source.release(pull.request_id)
            if not served.reusable or self._closed.is_set():
                return
            try:
                pull = read_frame_header(conn)   # idle until the next pull, the close, or the I/O timeout
            except (OSError, TransferError):
                return                           # a kept connection's normal end, not a failed transfer
            if pull.type not in (FrameType.NIXL_PULL, FrameType.NIXL_CLAIM):
                raise TransferError(f"expected NIXL_PULL or NIXL_CLAIM, got {pull.type.name}")

    def _plan(self, spec: TransferSpec) -> list[tuple[int, int]]:
        return [(first, min(self.chunk_blocks, spec.num_blocks - first))
                for first in range(0, spec.num_blocks, self.chunk_blocks)]

    def _frame(self, request_id: str, spec: TransferSpec, index: int, total: int, first: int, n: int,
               payload_len: int, csum: bytes) -> Frame:
        lay = spec.layout
        bhash = spec.block_hashes[first + n - 1] if spec.block_hashes else ZERO_HASH
        return Frame(FrameType.CHUNK, request_id, dtype=DTYPE_CODES[lay.dtype], num_layers=lay.num_layers,
                     num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim, block_size=lay.block_size,
                     chunk_index=index, num_chunks=total, first_block=first, num_blocks=n,
                     payload_len=payload_len, checksum=csum, block_hash=bhash)

    def _send_tcp(self, conn: socket.socket, request_id: str, spec: TransferSpec) -> int:
        plan = self._plan(spec)
        max_bytes = spec.layout.chunk_bytes(self.chunk_blocks)
        free: queue.Queue[bytearray] = queue.Queue()
        for _ in range(2):                       # double buffering: gather one while sending the other
            free.put(bytearray(max_bytes))
        ready: queue.Queue[tuple[int, bytearray, bytes] | BaseException] = queue.Queue()

        def gather() -> None:
            try:
                for index, (first, n) in enumerate(plan):
                    buf = free.get()
                    nbytes = spec.layout.chunk_bytes(n)
                    spec.read(first, n, _tensor_view(buf, spec.layout.dtype, spec.layout.chunk_shape(n)))
                    ready.put((index, buf, checksum(memoryview(buf)[:nbytes])))
            except BaseException as exc:   # surfaced to the sender, which fails the transfer
                ready.put(exc)

        threading.Thread(target=gather, name="kv-transfer-gather", daemon=True).start()
        sent = 0
        for _ in plan:
            item = ready.get()
            if isinstance(item, BaseException):
                raise TransferError(f"reading KV blocks failed: {item}")
            index, buf, csum = item
            first, n = plan[index]
            nbytes = spec.layout.chunk_bytes(n)
            conn.sendall(self._frame(request_id, spec, index, len(plan), first, n, nbytes, csum).pack_header())
            conn.sendall(memoryview(buf)[:nbytes])
            sent += nbytes
            free.put(buf)
        conn.sendall(Frame(FrameType.END, request_id, num_chunks=len(plan)).pack_header())
        return sent

    def _send_shm(self, conn: socket.socket, request_id: str, spec: TransferSpec, segment: Segment) -> int:
        plan = self._plan(spec)
        aux = str(segment.path).encode()
        offset = 0
        for index, (first, n) in enumerate(plan):
            nbytes = spec.layout.chunk_bytes(n)
            view = memoryview(segment.region)[offset:offset + nbytes]
            spec.read(first, n, _tensor_view(view, spec.layout.dtype, spec.layout.chunk_shape(n)))
            frame = self._frame(request_id, spec, index, len(plan), first, n, nbytes, checksum(view))
            frame.flags, frame.shm_offset, frame.aux = FLAG_SHM, offset, aux
            view.release()
            conn.sendall(frame.pack_header())   # the client copies chunk i while we gather i+1
            offset += nbytes
        conn.sendall(Frame(FrameType.END, request_id, num_chunks=len(plan)).pack_header())
        return offset


def _error(request_id: str, message: str) -> bytes:
    payload = message.encode()
    return Frame(FrameType.ERROR, request_id, payload_len=len(payload)).pack_header() + payload


# ---------------------------------------------------------------------------------------------
# client (decode side)


@dataclass
class ReceivedChunk:
    index: int
    num_chunks: int
    first_block: int
    num_blocks: int
    block_hash: bytes
    tensor: torch.Tensor      # [L, 2, num_blocks * block_size, H, D]; valid until the next chunk is asked for
    buffer: bytearray | None = field(default=None, repr=False)   # back to the receive pool once consumed


@dataclass
class PullResult:
    transport: str = "tcp"
    bytes: int = 0
    chunks: int = 0
    blocks: int = 0
    seconds: float = 0.0
    complete: bool = False

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


class KVPull:
    """Iterate to receive chunks in order; ``result`` says what arrived. Raises ``TransferError``."""

    def __init__(self, sock: socket.socket, request_id: str, layout: KVLayout,
                 expected_hashes: Sequence[bytes] | None, stats: TransferStats, timeout_s: float,
                 maps: SegmentMaps, link: LinkModel | None = None) -> None:
        self.result = PullResult()
        self._link = link
        self._sock = sock
        self._request_id = request_id
        self._layout = layout
        self._expected = expected_hashes
        self._stats = stats
        self._timeout = timeout_s
        self._ready: queue.Queue[ReceivedChunk | BaseException | None] = queue.Queue(maxsize=1)
        self._free: queue.Queue[bytearray] = queue.Queue()
        self._stop = threading.Event()
        self._maps = maps
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._receive, name="kv-transfer-recv", daemon=True)
        self._thread.start()

    def __iter__(self) -> Iterator[ReceivedChunk]:
        held: bytearray | None = None
        try:
            while True:
                try:
                    item = self._ready.get(timeout=self._timeout)
                except queue.Empty:
                    raise TransferError(f"no KV from the prefill peer in {self._timeout}s") from None
                if held is not None:
                    self._free.put(held)
                    held = None
                if item is None:
                    self.result.complete = True
                    if self._link is not None:
                        tokens = self.result.blocks * self._layout.block_size
                        time.sleep(max(0.0, self._link.seconds(tokens) - (time.perf_counter() - self._t0)))
                        self.result.bytes = int(tokens * self._link.bytes_per_token)
                    self.result.seconds = time.perf_counter() - self._t0
                    self._stats.record("recv", self.result.transport, self.result.bytes, self.result.seconds)
                    with contextlib.suppress(OSError):
                        self._sock.sendall(Frame(FrameType.DONE, self._request_id).pack_header())
                    return
                if isinstance(item, BaseException):
                    raise item if isinstance(item, TransferError) else TransferError(str(item))
                held = item.buffer
                yield item
        except BaseException:
            if not self.result.complete:
                self._stats.fail("recv")
            raise
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()
        self._thread.join(5)

    def _put(self, item: ReceivedChunk | BaseException | None) -> None:
        while not self._stop.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def _receive(self) -> None:
        try:
            while not self._stop.is_set():
                frame = read_frame_header(self._sock)
                if frame.type == FrameType.END:
                    if frame.num_chunks != self.result.chunks:
                        raise TransferError(f"peer ended after {self.result.chunks} of {frame.num_chunks} chunks")
                    self._put(None)
                    return
                if frame.type == FrameType.ERROR:
                    msg = bytearray(frame.payload_len)
                    recv_exact(self._sock, memoryview(msg))
                    raise TransferError(f"prefill peer: {msg.decode(errors='replace')}")
                if frame.type != FrameType.CHUNK:
                    raise TransferError(f"unexpected {frame.type.name} frame")
                self._put(self._chunk(frame))
        except BaseException as exc:
            self._put(exc if isinstance(exc, TransferError) else TransferError(f"KV transfer failed: {exc}"))

    def _chunk(self, frame: Frame) -> ReceivedChunk:
        lay = self._layout
        got = KVLayout(frame.num_layers, frame.num_kv_heads, frame.head_dim, frame.block_size,
                       CODE_DTYPES.get(frame.dtype, torch.uint8))
        if got != lay:
            raise TransferError(f"peer KV layout {got} does not match this engine's {lay}")
        if frame.chunk_index != self.result.chunks:
            raise TransferError(f"chunk {frame.chunk_index} arrived, expected {self.result.chunks}")
        nbytes = lay.chunk_bytes(frame.num_blocks)
        if frame.payload_len != nbytes:
            raise TransferError(f"chunk payload is {frame.payload_len} bytes, layout says {nbytes}")
        if self._expected is not None:
            last = frame.first_block + frame.num_blocks - 1
            if last >= len(self._expected) or self._expected[last] != frame.block_hash:
                raise TransferError(f"block {last} hash differs from this prompt's: not the same prefix/model/salt")
        buffer: bytearray | None = None
        if frame.flags & FLAG_SHM:
            try:
                region = self._maps.get(frame.aux.decode())
            except (OSError, ValueError) as exc:
                raise TransferError(f"cannot map the peer's shared memory: {exc}") from exc
            self.result.transport = "shm"
            if frame.shm_offset + nbytes > len(region):
                raise TransferError("shared-memory chunk lies outside the segment")
            view = memoryview(region)[frame.shm_offset:frame.shm_offset + nbytes]
        else:
            try:
                buffer = self._free.get_nowait()
                if len(buffer) < nbytes:
                    buffer = bytearray(nbytes)
            except queue.Empty:
                buffer = bytearray(nbytes)
            view = memoryview(buffer)[:nbytes]
            recv_exact(self._sock, view)
        if checksum(view) != frame.checksum:
            raise TransferError(f"checksum mismatch in chunk {frame.chunk_index}")
        chunk = ReceivedChunk(frame.chunk_index, frame.num_chunks, frame.first_block, frame.num_blocks,
                              frame.block_hash, _tensor_view(view, lay.dtype, lay.chunk_shape(frame.num_blocks)),
                              buffer)
        self.result.bytes += nbytes
        self.result.chunks += 1
        self.result.blocks += frame.num_blocks
        return chunk


class KVTransferClient:
    def __init__(self, layout: KVLayout, allow_shm: bool = True, timeout_s: float = 30.0,
                 link: LinkModel | None = None) -> None:
        self.layout = layout
        self.link = link
        self.allow_shm = allow_shm and SHM_DIR.is_dir()
        self.timeout_s = timeout_s
        self.stats = TransferStats()
        self._identity = host_identity()
        self._maps = SegmentMaps()

    def close(self) -> None:
        self._maps.close()

    def pull(self, host: str, port: int, request_id: str,
             expected_hashes: Sequence[bytes] | None = None) -> KVPull:
        try:
            sock = socket.create_connection((host, port), timeout=self.timeout_s)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flags = FLAG_SHM_OK if self.allow_shm and self._identity else 0
            sock.sendall(Frame(FrameType.PULL, request_id, flags=flags, aux=self._identity).pack_header())
        except OSError as exc:
            self.stats.fail("recv")
            raise TransferError(f"cannot reach prefill peer {host}:{port}: {exc}") from exc
        return KVPull(sock, request_id, self.layout, expected_hashes, self.stats, self.timeout_s, self._maps,
                      self.link)
