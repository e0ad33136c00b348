"""PD KV transfer over NIXL: the decode engine READs the prefill engine's blocks into its own blocks.

The hold/pull/release protocol and ``kv_transfer_params`` are the TCP transport's (``transfer.py``,
``wire.py``): the prefill engine holds a finished prompt's blocks, the decode engine connects to
``remote_host:remote_port`` and names ``remote_request_id``. With NIXL that connection carries only
control (NIXL_PULL → NIXL_OFFER: agent name, metadata when the decode side has none cached for that
address, layout, block ids and block hashes); the bytes go over UCX:

1. on the decode engine's background thread: offer, hash check (the blocks offered must hash like
   the decode engine's own prompt blocks, or they are refused), metadata loaded once per peer;
2. once the scheduler allocated the request's blocks, on the connector's reader thread: NIXL READs
   remote blocks → local blocks layer by layer (the request may run once the first layer is in, its
   forward pass waiting for later layers), no staging copy; then DONE, the prefill engine answers
   END (proof it still held the blocks all along) and frees them (it also frees them when the
   connection drops or times out, and then no END comes: the READ counts as failed). The offer
   leased the hold to this pull (`PagedKVSource.open`): it no longer expires, and no second pull
   gets it. After END the connection goes back to a pool for the next pull from that engine
   (``control_pool.py``: no connect and no new server thread per transfer);
3. a READ that fails leaves garbage in the local blocks: the connector reports the request and the
   scheduler recomputes it from scratch (``Scheduler.recompute``), so no token comes from bad KV.

Direct READ (every pull after a peer's first, as vLLM's NixlConnector does): the signed params also
name the prefill agent, the hold (a token), its block ids and the last block's hash (`DirectRead`). A
decode engine with that agent loaded for the address, whose own hash of that block is equal, skips
step 1's round trip: it READs at once, then sends NIXL_CLAIM; the prefill engine answers END, and frees
the hold, only if that very hold is still in place and unleased and holds those blocks
(`PagedKVSource.claim`): a hold released is never held again, so END proves the blocks were held
throughout the READ. Anything else is a failed READ (step 3). docs/disaggregation.md has the argument.

Only decode engines holding the stack's transfer secret get the prefill engine's agent metadata
(it lets its holder READ the whole registered KV cache): the NIXL_PULL carries an HMAC of the
request id and the decode agent's name.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import select
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import torch

from inferstack.engine.connector.blocks import LayerProgress
from inferstack.engine.connector.control_pool import ControlPool
from inferstack.engine.connector.nixl_agent import KVRegions, NixlAgent
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.prefix_pins import PrefixPins
from inferstack.engine.connector.transfer import KVLayout, KVSource, Served, TransferSpec, TransferStats
from inferstack.engine.connector.transports import Fetched, KVTransport, PullRequest
from inferstack.engine.connector.wire import (
    NO_NIXL,
    Frame,
    FrameType,
    TransferError,
    read_frame_header,
    read_payload,
    send_payload,
)
from inferstack.kvstore.codec import DTYPE_CODES

NAME = "nixl"
REUSE = "reuse"      # the `path` label of transfers that read another replica's cached prefix
# A peer's cache may be larger than ours (another device, more memory), but the list of its blocks prepared at its
# first READ costs ~70 bytes per block and layer: accept up to this many times our block count (or the floor).
PEER_BLOCKS_FACTOR = 8
PEER_BLOCKS_FLOOR = 1 << 16
log = logging.getLogger("inferstack.engine.connector")


def pull_proof(secret: bytes | None, request_id: str, agent: str) -> str:
    if secret is None:
        return ""
    return hmac.new(secret, f"nixl-pull\n{request_id}\n{agent}".encode(), hashlib.sha256).hexdigest()


def _layout_fields(layout: KVLayout) -> list[int]:
    return [layout.num_layers, layout.num_kv_heads, layout.head_dim, layout.block_size,
            DTYPE_CODES[layout.dtype]]


# ---------------------------------------------------------------------------------------------
# prefill side


class NixlExporter:
    """Answers NIXL_PULL on the transfer server (``KVTransferServer``): for a request's held blocks
    (PD), or, with ``pins``, for cached prefix blocks named by hash (cross-replica reuse)."""

    def __init__(self, agent: NixlAgent, trust: TransferTrust, pins: PrefixPins | None = None,
                 pin_timeout_s: float = 5.0) -> None:
        self.agent = agent
        self.trust = trust
        self.pins = pins
        self.pin_timeout_s = pin_timeout_s
        self.reuse_stats = TransferStats(path=REUSE)

    def serve(self, conn: socket.socket, pull: Frame, source: KVSource, stats: TransferStats) -> Served:
        """Offer the held blocks, wait for the decode side's DONE (or its disconnect); or answer the
        claim of a direct READ."""
        if pull.type == FrameType.NIXL_CLAIM:
            return self._claim(conn, pull, source, stats)
        ask = msgpack.unpackb(read_payload(conn, pull, limit=1 << 20))
        agent = str(ask.get("agent", ""))
        prefix = ask.get("prefix")
        refusal = self._refusal(pull.request_id, agent, str(ask.get("proof", "")), prefix is not None)
        if prefix is not None and not (isinstance(prefix, list) and all(isinstance(h, bytes) for h in prefix)):
            refusal = "NIXL_PULL prefix is not a list of block hashes"
        if refusal is not None:    # the puller may still pull over TCP, as without NIXL
            send_payload(conn, Frame(FrameType.ERROR, pull.request_id), f"{NO_NIXL}: {refusal}".encode())
            return Served(offered=False, reusable=True)
        pinned = False
        if prefix is not None:
            assert self.pins is not None
            stats = self.reuse_stats
            pinned = self.pins.pin(pull.request_id, prefix, self.pin_timeout_s) > 0
        spec = source.open(pull.request_id)
        if spec is None or spec.block_ids is None:
            message = ("no cached block of this prefix here (evicted, or the engine is busy)" if prefix is not None
                       else f"no KV held for request {pull.request_id!r} (expired, never prefilled here, or "
                            "already being pulled)")
            send_payload(conn, Frame(FrameType.ERROR, pull.request_id), message.encode())
            return Served(offered=pinned, reusable=True)
        try:
            return self._offer(conn, pull, ask, spec, stats)
        except Exception:      # the opened hold is leased to this pull: whatever broke, it must be released
            stats.fail("send")
            log.exception("NIXL offer of %s failed", pull.request_id)
            return Served(offered=True, reusable=False)

    def _offer(self, conn: socket.socket, pull: Frame, ask: dict[str, Any], spec: TransferSpec,
               stats: TransferStats) -> Served:
        assert spec.block_ids is not None
        regions = self.agent.regions
        offer = {"agent": self.agent.name,
                 "metadata": None if ask.get("known") == self.agent.name else self.agent.metadata(),
                 "layout": _layout_fields(spec.layout), "bases": list(regions.bases),
                 "num_blocks": regions.num_blocks, "block_bytes": regions.block_bytes,
                 "mem_type": regions.mem_type, "device_id": regions.device_id,
                 "block_ids": list(spec.block_ids), "hashes": list(spec.block_hashes or [])}
        t0 = time.perf_counter()
        try:
            send_payload(conn, Frame(FrameType.NIXL_OFFER, pull.request_id), msgpack.packb(offer))
            self._progress_until_readable(conn)  # the decode side READs in between
            done = read_frame_header(conn)
            if done.type != FrameType.DONE:
                raise TransferError(f"expected DONE, got {done.type.name}")
            if not spec.still_held():
                raise TransferError(f"the hold on {pull.request_id!r} was let go before the READ finished")
            # Still held: what the decode side read was these blocks (it waits for this END).
            conn.sendall(Frame(FrameType.END, pull.request_id).pack_header())
        except (OSError, TransferError):
            stats.fail("send")
            return Served(offered=True, reusable=False)
        stats.record("send", NAME, spec.layout.chunk_bytes(done.num_blocks), time.perf_counter() - t0)
        return Served(offered=True, reusable=True)

    def _claim(self, conn: socket.socket, claim: Frame, source: KVSource, stats: TransferStats) -> Served:
        """A decode engine READ held blocks straight from signed ``kv_transfer_params`` (no offer): END
        when the hold it names was in place all along (`KVSource.claim`, which frees it), else ERROR."""
        try:
            ask = msgpack.unpackb(read_payload(conn, claim, limit=1 << 20))
            agent, ids = str(ask["agent"]), [int(b) for b in ask["ids"]]
            refusal = self._refusal(claim.request_id, agent, str(ask["proof"]), False)
            held = refusal is None and source.claim(claim.request_id, str(ask["hold"]), int(ask["first"]), ids,
                                                    bytes(ask["hash"]))
            seconds = float(ask["seconds"])
        except (KeyError, TypeError, ValueError, msgpack.UnpackException) as exc:
            refusal, held, ids, seconds = f"bad NIXL_CLAIM ({exc})", False, [], 0.0
        if not held:
            stats.fail("send")
            message = refusal or (f"the hold on {claim.request_id!r} the READ named is not in place (expired, "
                                  "pulled, or another hold)")
            send_payload(conn, Frame(FrameType.ERROR, claim.request_id), message.encode())
            return Served(offered=False, reusable=True)
        conn.sendall(Frame(FrameType.END, claim.request_id).pack_header())
        regions = self.agent.regions
        stats.record("send", NAME, len(ids) * 2 * len(regions.bases) * regions.block_bytes, seconds)
        return Served(offered=False, reusable=True)

    def _progress_until_readable(self, conn: socket.socket) -> None:
        """Progress UCX while the reader READs (its DONE then arrives on ``conn``)."""
        deadline = time.monotonic() + (conn.gettimeout() or 30.0)
        while not select.select([conn], [], [], 0.0002)[0]:
            self.agent.progress()
            if time.monotonic() > deadline:
                raise TransferError("no DONE from the reader in time")

    def _refusal(self, request_id: str, agent: str, proof: str, prefix: bool) -> str | None:
        if not agent:
            return "NIXL_PULL without an agent name"
        if prefix and (self.pins is None or self.trust.secret is None):
            # reading cached blocks by hash needs the stack secret: no allow-list can vouch for it
            return "this engine serves no cross-replica reads (--kv-reuse, with the stack's transfer secret)"
        if self.trust.secret is not None and not hmac.compare_digest(
                proof, pull_proof(self.trust.secret, request_id, agent)):
            return "NIXL_PULL is not signed with this stack's transfer secret"
        return None


# ---------------------------------------------------------------------------------------------
# decode side


@dataclass(frozen=True)
class Claim:
    """What a direct READ (no offer) claims once it is done: the hold its params named."""

    request_id: str
    hold: str
    hashes: Sequence[bytes]        # the request's block hashes (equal to the peer's: checked before)


@dataclass
class RemoteLoad:
    """Blocks a prefill engine holds for one request, READ into ours once they are allocated."""

    transport: NixlKVTransport
    conn: socket.socket | None     # the offer's connection; None for a direct READ (``claim``)
    address: tuple[str, int]       # the peer's transfer server: the connection goes back to its pool
    peer: str
    regions: KVRegions
    remote_ids: list[int]          # the peer's blocks for request blocks first_block ..
    first_block: int
    num_blocks: int
    stats: TransferStats               # the transport's PD or reuse counters
    block_ids: list[int] = field(default_factory=list)
    asynchronous: bool = True          # the READ runs on the connector's reader thread
    layers: LayerProgress | None = field(default_factory=LayerProgress)   # READ layer by layer
    kept: bool = False                 # the READ ended cleanly: ``conn`` went back to the pool
    claim: Claim | None = None         # a direct READ: claimed on a pooled connection once done

    def rebase(self, first_block: int) -> RemoteLoad | None:
        end = self.first_block + self.num_blocks
        if first_block == self.first_block:
            return self
        if not self.first_block < first_block < end:
            return None
        skip = first_block - self.first_block
        return RemoteLoad(self.transport, self.conn, self.address, self.peer, self.regions,
                          self.remote_ids[skip:], first_block, end - first_block, self.stats, claim=self.claim)

    def accept(self, block_ids: Sequence[int], num_external_tokens: int, block_size: int) -> None:
        self.num_blocks = min(self.num_blocks, num_external_tokens // block_size)
        self.block_ids = list(block_ids[self.first_block:self.first_block + self.num_blocks])

    def copy_into(self, kv_caches: Sequence[torch.Tensor], block_size: int) -> None:
        try:
            self.transport.read(self)
        finally:
            self.discard()

    def discard(self) -> None:
        if self.kept or self.conn is None:
            return
        with contextlib.suppress(OSError):
            self.conn.close()


class NixlKVTransport:
    """Decode engine's side; ``fallback`` pulls from prefill engines that run no NIXL agent."""

    name = NAME

    def __init__(self, agent: NixlAgent, layout: KVLayout, trust: TransferTrust, fallback: KVTransport,
                 timeout_s: float = 30.0) -> None:
        self.agent = agent
        self.layout = layout
        self.trust = trust
        self.fallback = fallback
        self.timeout_s = timeout_s
        self.stats = TransferStats()
        self.reuse_stats = TransferStats(path=REUSE)
        self.control = ControlPool(timeout_s)
        # "host:port" -> (the peer agent's name, its KV regions) as its last offer gave them: a direct READ
        # (no offer) goes only to the agent loaded for that address, where it was read before
        self._regions: dict[str, tuple[str, KVRegions]] = {}
        self._regions_lock = threading.Lock()

    def fetch(self, pull: PullRequest) -> Fetched:
        address = f"{pull.host}:{pull.port}"
        stats = self.reuse_stats if pull.prefix is not None else self.stats
        peer = "holder" if pull.prefix is not None else "prefill peer"
        direct = self.fetch_now(pull)
        if direct is not None:
            return direct
        try:
            conn, reply = self._ask(pull)
        except OSError as exc:
            stats.fail("recv")
            log.warning("request %s: cannot reach %s %s: %s", pull.request_id, peer, address, exc)
            return Fetched(None, failed=True)
        try:
            offer = self._offer(conn, reply)
            if offer is None:
                conn.close()
                # a holder without NIXL has nothing to offer over TCP: the KV tiers come next
                return Fetched(None) if pull.prefix is not None else self.fallback.fetch(pull)
            return self._load(conn, address, offer, pull, stats)
        except (OSError, TransferError, KeyError, ValueError, TypeError, msgpack.UnpackException) as exc:
            conn.close()
            stats.fail("recv")
            log.warning("request %s: NIXL pull from %s %s failed: %s", pull.request_id, peer, address, exc)
            return Fetched(None, failed=True)

    def fetch_now(self, pull: PullRequest) -> Fetched | None:
        """A direct READ's load, built without I/O (the PD connector asks on the engine thread, so the
        request's blocks are allocated in the same step: no hop through the fetch thread); None when the
        pull needs an offer (`fetch`)."""
        if pull.direct is None or pull.prefix is not None:
            return None
        return self._direct(pull, self.stats)

    def _direct(self, pull: PullRequest, stats: TransferStats) -> Fetched | None:
        """A READ of the blocks the params name, with no round trip before it; None when the offer is
        needed: the peer's agent is not the one loaded for its address (first pull from it, or it
        restarted: the offer brings its metadata), our agent for that size has not READ from it yet (UCX
        sets up its connection only while the peer progresses: during an offer), or its last block's hash
        is not this prompt's (the offer's per-block check then decides which leading blocks are usable).
        Nothing vouches yet that the blocks are still held: the READ's `Claim` does, after it (``read``)."""
        direct = pull.direct
        assert direct is not None
        address = f"{pull.host}:{pull.port}"
        with self._regions_lock:
            known = self._regions.get(address)
        if known is None or known[0] != direct.agent or self.agent.known_peer(address) != direct.agent:
            return None
        n = len(direct.block_ids)
        if n == 0 or n > len(pull.expected_hashes) or pull.expected_hashes[n - 1] != direct.last_hash:
            return None
        end = min(n, pull.max_blocks)
        if end <= pull.first_block:
            return Fetched(None)
        if not self.agent.connected(direct.agent, end - pull.first_block):
            return None      # the agent that would READ this many blocks has no UCX connection to the peer yet
        claim = Claim(pull.request_id, direct.hold, pull.expected_hashes)
        return Fetched(RemoteLoad(self, None, (pull.host, pull.port), direct.agent, known[1],
                                  list(direct.block_ids[pull.first_block:end]), pull.first_block,
                                  end - pull.first_block, stats, claim=claim))

    def _ask(self, pull: PullRequest) -> tuple[socket.socket, Frame]:
        """Send NIXL_PULL; the connection and the reply's header. Raises `OSError` when the peer
        cannot be reached."""
        ask = {"agent": self.agent.name, "known": self.agent.known_peer(f"{pull.host}:{pull.port}"),
               "proof": pull_proof(self.trust.secret, pull.request_id, self.agent.name)}
        if pull.prefix is not None:
            ask["prefix"] = list(pull.prefix)
        return self._exchange(pull.host, pull.port, Frame(FrameType.NIXL_PULL, pull.request_id), ask)

    def _exchange(self, host: str, port: int, message: Frame, payload: dict[str, Any]) -> tuple[socket.socket, Frame]:
        """Send ``message`` on a kept connection to the peer, or a new one when the kept one is dead
        (the peer closed it idle, or restarted); the connection and the reply's header. Raises
        `OSError` when the peer cannot be reached."""
        body = msgpack.packb(payload)
        conn, kept = self.control.take(host, port)
        try:
            send_payload(conn, message, body)
            return conn, read_frame_header(conn)
        except (OSError, TransferError) as exc:
            conn.close()
            if not kept:
                raise OSError(str(exc)) from None
        conn = self.control.connect(host, port)
        try:
            send_payload(conn, message, body)
            return conn, read_frame_header(conn)
        except (OSError, TransferError) as exc:
            conn.close()
            raise OSError(str(exc)) from None

    def _offer(self, conn: socket.socket, reply: Frame) -> dict[str, Any] | None:
        """The peer's offer; None when the peer runs no NIXL agent (use the fallback transport)."""
        if reply.type == FrameType.ERROR:
            message = read_payload(conn, reply, limit=1 << 16).decode(errors="replace")
            if message.startswith(NO_NIXL):
                return None
            raise TransferError(f"prefill peer: {message}")
        if reply.type != FrameType.NIXL_OFFER:
            raise TransferError(f"expected NIXL_OFFER, got {reply.type.name}")
        return msgpack.unpackb(read_payload(conn, reply))

    def _load(self, conn: socket.socket, address: str, offer: dict[str, Any], pull: PullRequest,
              stats: TransferStats) -> Fetched:
        if offer["layout"] != _layout_fields(self.layout):
            raise TransferError(f"peer KV layout {offer['layout']} does not match this engine's "
                                f"{_layout_fields(self.layout)}")
        remote_ids = [int(b) for b in offer["block_ids"]]
        hashes = [bytes(h) for h in offer["hashes"]]
        usable = 0          # leading blocks whose hash is this prompt's: same prefix, model, salt
        for theirs, ours in zip(hashes, pull.expected_hashes, strict=False):
            if theirs != ours:
                break
            usable += 1
        end = min(usable, len(remote_ids), pull.max_blocks)
        refused = usable < min(len(hashes), pull.max_blocks)   # another prompt, model, dtype or salt
        if refused:
            stats.fail("recv")
        if end <= pull.first_block:
            conn.close()
            return Fetched(None, refused)
        self.agent.load_peer(address, str(offer["agent"]), offer.get("metadata"))
        regions = peer_regions(offer, self.agent.regions)
        with self._regions_lock:
            self._regions[address] = (str(offer["agent"]), regions)
        conn.settimeout(self.timeout_s)
        return Fetched(RemoteLoad(self, conn, (pull.host, pull.port), str(offer["agent"]), regions,
                                  remote_ids[pull.first_block:end], pull.first_block, end - pull.first_block,
                                  stats), refused)

    def read(self, load: RemoteLoad) -> None:
        """READ ``load``'s blocks into ours; DONE tells the peer it may free them."""
        if load.num_blocks <= 0:
            return
        t0 = time.perf_counter()
        try:
            nbytes = self.agent.read(load.peer, load.regions, load.block_ids, load.remote_ids[:load.num_blocks],
                                     self.timeout_s, load.layers.landed if load.layers is not None else None)
            if load.claim is not None:
                load.conn = self._claim(load, time.perf_counter() - t0)
            else:
                assert load.conn is not None
                load.conn.sendall(Frame(FrameType.DONE, "", num_blocks=load.num_blocks).pack_header())
                # Without END the peer may have let the blocks go before or during the READ (its I/O
                # timeout ran out waiting for DONE, or the connection broke): the READ may hold garbage.
                if read_frame_header(load.conn).type != FrameType.END:
                    raise TransferError("the peer did not confirm it held the blocks during the READ")
        except (TransferError, OSError) as exc:
            load.stats.fail("recv")
            raise TransferError(str(exc)) from None
        load.stats.record("recv", NAME, nbytes, time.perf_counter() - t0)
        self.control.give_back(*load.address, load.conn)
        load.kept = True

    def _claim(self, load: RemoteLoad, seconds: float) -> socket.socket:
        """After a direct READ: the peer answers END only if the hold the params named was in place
        throughout it (`KVSource.claim`), and frees it; else the READ may hold garbage (`TransferError`).
        The connection, for the pool."""
        claim = load.claim
        assert claim is not None
        ids = load.remote_ids[:load.num_blocks]
        ask = {"agent": self.agent.name, "proof": pull_proof(self.trust.secret, claim.request_id, self.agent.name),
               "hold": claim.hold, "first": load.first_block, "ids": ids,
               "hash": claim.hashes[load.first_block + load.num_blocks - 1], "seconds": seconds}
        conn, reply = self._exchange(*load.address, Frame(FrameType.NIXL_CLAIM, claim.request_id), ask)
        if reply.type == FrameType.END:
            return conn
        message = ""
        with contextlib.suppress(OSError, TransferError):
            message = read_payload(conn, reply, limit=1 << 16).decode(errors="replace")
        conn.close()
        raise TransferError(f"prefill peer refused the claim of a direct READ: {message}"
                            if reply.type == FrameType.ERROR else f"expected END, got {reply.type.name}")

    def close(self) -> None:
        self.control.close()
        self.fallback.close()
        self.agent.close()


def peer_regions(offer: dict[str, Any], ours: KVRegions) -> KVRegions:
    """The peer's KV regions from its offer, checked against ours before anything is allocated for them: the
    list of its blocks is prepared at its first READ (`NixlAgent.read`), so an offer claiming a huge cache would
    make this engine build a huge list before NIXL refused it. Raises `TransferError`."""
    regions = KVRegions(tuple(int(b) for b in offer["bases"]), int(offer["num_blocks"]),
                        int(offer["block_bytes"]), str(offer["mem_type"]), int(offer["device_id"]))
    if len(regions.bases) != len(ours.bases) or regions.block_bytes != ours.block_bytes:
        raise TransferError(f"peer KV regions ({len(regions.bases)} layers of {regions.block_bytes}-byte blocks) "
                            f"do not match this engine's ({len(ours.bases)} of {ours.block_bytes})")
    most = max(PEER_BLOCKS_FACTOR * ours.num_blocks, PEER_BLOCKS_FLOOR)
    if not 0 < regions.num_blocks <= most:
        raise TransferError(f"peer claims a KV cache of {regions.num_blocks} blocks (at most {most} accepted: "
                            f"{PEER_BLOCKS_FACTOR}x this engine's)")
    return regions
