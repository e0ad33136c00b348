"""PDConnector: prefill/decode disaggregation over the KV transfer engine (vLLM NIXL-style pull).

Prefill role: a request sent with ``kv_transfer_params = {"do_remote_decode": true}`` keeps its
full prompt blocks when it finishes (``delay_free``); the response's ``kv_transfer_params`` say
where to pull them (``remote_host``, ``remote_port``, ``remote_request_id``,
``remote_num_blocks``). The blocks are freed after the decode side's pull, or after
``hold_s`` if none comes.

Decode role: a request sent with those params plus ``do_remote_prefill: true`` pulls the blocks
on a background thread once it is first considered for scheduling (other requests keep running
meanwhile), verifies every chunk against its own block hashes (same model, dtype,
salt and prompt, or it is refused), stages them on the host and reports them as external
tokens; the engine computes the rest (under one block) and continues generation. If the pull
fails mid-way the chunks that did arrive intact are used, the rest is recomputed, and the
failure is counted. When fewer than ``min_remote_tokens`` tokens would come from the peer the
pull is skipped (the decider's engine-side half).

Cross-replica reuse (``reuse=True``, any role; ``--kv-reuse``): the gateway names, in a request's
signed ``kv_transfer_params`` (``kv_reuse: true``), another replica whose KV events say it holds the
prompt's leading blocks; this engine READs them over NIXL straight into its own blocks through the
same pull, hash checks and fallbacks, the holder pinning them meanwhile (``prefix_pins.py``). Every
reuse engine therefore runs both halves: a transfer server that exports its cached blocks, and the
NIXL puller. Without NIXL reuse is off (logged): TCP/shm pulls name held requests, not hashes.

Emulated engines (``--emulate``) run this same connector over a one-float-per-token shadow cache
and pass a ``LinkModel``: a pull then lasts as long as the modelled network would take to move the
real model's KV (``sim.perf_model.kv_transfer_time``) and the transfer metrics count the real
model's bytes, so only the bytes are emulated, not the protocol.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from inferstack.engine.connector.base import KVConnectorBase, LayerWait
from inferstack.engine.connector.blocks import LayerLoads, PendingLoad, Stager
from inferstack.engine.connector.nixl_agent import NixlAgent, NixlUnavailable
from inferstack.engine.connector.nixl_transport import NixlExporter, NixlKVTransport
from inferstack.engine.connector.peers import TransferTrust
from inferstack.engine.connector.prefix_pins import PrefixPins
from inferstack.engine.connector.stats import ConnectorStats
from inferstack.engine.connector.transfer import (
    KVLayout,
    KVTransferClient,
    KVTransferServer,
    LinkModel,
    PagedKVSource,
    TransferStats,
)
from inferstack.engine.connector.transports import DirectRead, Fetched, KVTransport, PullRequest, TcpKVTransport
from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.outputs import FinishReason
from inferstack.engine.request import Request

Role = Literal["prefill", "decode", "both"]
TransportChoice = Literal["auto", "nixl", "tcp", "shm"]
log = logging.getLogger("inferstack.engine.connector")


class PDConnector(KVConnectorBase):
    def __init__(self, role: Role, *, trust: TransferTrust, block_size: int = 16, host: str = "127.0.0.1",
                 port: int = 0, advertise_host: str | None = None, transport: TransportChoice = "shm",
                 hold_s: float = 60.0, min_remote_tokens: int = 16, timeout_s: float = 30.0,
                 link: LinkModel | None = None, reuse: bool = False) -> None:
        if role not in ("prefill", "decode", "both") or (role == "both" and not reuse):
            raise ValueError(f"PD connector role must be prefill or decode (or both, with reuse), got {role!r}")
        if reuse and (trust.secret is None or link is not None):
            raise ValueError("cross-replica KV reuse (--kv-reuse) needs the stack's transfer secret and a real "
                             "model (not --emulate)")
        if transport not in ("auto", "nixl", "tcp", "shm"):
            raise ValueError(f"KV transport must be auto, nixl, tcp or shm, got {transport!r}")
        if transport == "nixl" and link is not None:
            raise ValueError("--kv-transport nixl moves real KV: emulated engines use tcp or shm")
        self.role = role
        self.block_size = block_size
        self.stats = ConnectorStats()
        self.min_remote_tokens = min_remote_tokens
        self.trust = trust                # decode: who may be pulled from; prefill: signs what it returns
        self._link = link                 # emulated engines: the network their transfers stand for
        self._host, self._port, self._advertise = host, port, advertise_host or host
        self._choice = transport
        self._allow_shm, self._hold_s, self._timeout = transport != "tcp", hold_s, timeout_s
        self.server: KVTransferServer | None = None
        self.source: PagedKVSource | None = None
        self.transport: KVTransport | None = None
        self.agent: NixlAgent | None = None
        self.reuse = reuse
        self.pins: PrefixPins | None = None
        self._stager = Stager()
        self._released: list[str] = []
        self._released_lock = threading.Lock()
        self._kv_caches: list[torch.Tensor] = []

    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        self._kv_caches = list(kv_caches)
        self.agent = self._start_nixl()
        if self.reuse and self.agent is None:
            log.warning("cross-replica KV reuse (--kv-reuse) needs the NIXL transport: off on this engine")
            self.reuse = False
        if self.role == "prefill" or self.reuse:
            self._serve_blocks()
        if self.role == "decode" or self.reuse:
            _, _, bs, heads, dim = kv_caches[0].shape
            layout = KVLayout(len(kv_caches), heads, dim, bs, kv_caches[0].dtype)
            tcp = TcpKVTransport(KVTransferClient(layout, allow_shm=self._allow_shm, timeout_s=self._timeout,
                                                  link=self._link))
            self.transport = (NixlKVTransport(self.agent, layout, self.trust, tcp, self._timeout)
                              if self.agent is not None else tcp)
        log.info("PD %s engine: KV transport %s%s", self.role, self.transport_name,
                 ", cross-replica reads on" if self.reuse else "")

    def _serve_blocks(self) -> None:
        """The transfer server: held prefills (PD) and, with reuse, pinned prefix blocks."""
        self.source = PagedKVSource(self._kv_caches, hold_s=self._hold_s)
        exporter = None
        if self.agent is not None:
            self.pins = PrefixPins(self.source) if self.reuse else None
            exporter = NixlExporter(self.agent, self.trust, self.pins)
        self.server = KVTransferServer(self.source, self._host, self._port, allow_shm=self._allow_shm,
                                       link=self._link, nixl=exporter)

    def _start_nixl(self) -> NixlAgent | None:
        """The NIXL agent for ``nixl`` (failing the start-up when UCX cannot start) and ``auto``
        (falling back to the shm transport, with the reason in the log); None for tcp/shm."""
        if self._choice == "nixl" or (self._choice == "auto" and self._link is None):
            try:
                return NixlAgent(self.role, self._kv_caches)
            except NixlUnavailable as exc:
                if self._choice == "nixl":
                    raise
                log.warning("%s; --kv-transport auto falls back to the shm transport", exc)
        return None

    @property
    def transport_name(self) -> str:
        """What this engine moves KV with: nixl, shm (TCP to other hosts) or tcp."""
        if self.agent is not None:
            return "nixl"
        return "shm" if self._allow_shm else "tcp"

    def transfer_stats(self) -> list[TransferStats]:
        out = [self.server.stats] if self.server is not None else []
        if self.server is not None and isinstance(self.server.nixl, NixlExporter) and self.reuse:
            out.append(self.server.nixl.reuse_stats)
        if isinstance(self.transport, NixlKVTransport):
            out.append(self.transport.fallback.stats)
            if self.reuse:
                out.append(self.transport.reuse_stats)
        if self.transport is not None:
            out.append(self.transport.stats)
        return out

    @property
    def transfer_address(self) -> tuple[str, int] | None:
        return (self._advertise, self.server.address[1]) if self.server else None

    def reuse_address(self) -> str | None:
        address = self.transfer_address
        return f"{address[0]}:{address[1]}" if self.reuse and address is not None else None

    # -- decode side ----------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        bs = self.block_size
        first_block = num_computed_tokens // bs
        staged = self._stager.check(request.request_id, first_block, bs)
        if staged == Stager.PENDING:
            return None, True              # pulling on a background thread; other requests run meanwhile
        if staged is not None:
            return staged, staged > 0 and self._stager.is_async(request.request_id)
        params = request.kv_transfer_params or {}
        if self.transport is None or not params.get("do_remote_prefill"):
            return 0, False
        if params.get("kv_reuse") and not self.reuse:
            return 0, False
        # One pull per request: after a preemption the peer has released the blocks anyway.
        request.kv_transfer_params = {k: v for k, v in params.items() if k != "do_remote_prefill"}
        refusal = self.trust.refusal(params)
        if refusal is not None:           # never connect where an unvetted request points (SSRF)
            log.warning("request %s: remote prefill refused: %s", request.request_id, refusal)
            self.stats.add(load_failures=1, peers_refused=1)
            return 0, False
        max_blocks = (request.num_tokens - 1) // bs
        offered = min(int(params.get("remote_num_blocks", max_blocks)), max_blocks)
        if (offered - first_block) * bs < self.min_remote_tokens:
            return 0, False
        t0 = time.perf_counter()
        pull = self._pull_request(params, request.request_id, list(request.block_hashes), first_block, max_blocks)
        if pull is None:
            self.stats.add(load_failures=1)
            return 0, False
        now = self.transport.fetch_now(pull)
        if now is not None:   # a direct READ: its blocks are allocated in this step, no hop through the fetch thread
            self._stager.put(request.request_id, self._fetched(now, t0))
            staged = self._stager.check(request.request_id, first_block, bs) or 0
            return staged, staged > 0 and self._stager.is_async(request.request_id)
        self._stager.start(request.request_id, lambda: self._pull(pull))
        return None, True

    def _pull_request(self, params: dict[str, Any], request_id: str, hashes: list[bytes], first_block: int,
                      max_blocks: int) -> PullRequest | None:
        """What to pull for ``params``; None when they name no peer or request (malformed)."""
        try:
            if params.get("kv_reuse"):     # the holder pins our prompt's leading blocks under this key
                assert self.agent is not None
                return PullRequest(str(params["remote_host"]), int(params["remote_port"]),
                                   f"reuse/{self.agent.name}/{request_id}", hashes, first_block, max_blocks,
                                   prefix=hashes[:max_blocks])
            return PullRequest(str(params["remote_host"]), int(params["remote_port"]),
                               str(params["remote_request_id"]), hashes, first_block, max_blocks,
                               direct=DirectRead.from_params(params))
        except (KeyError, ValueError):
            return None

    def _pull(self, pull: PullRequest) -> PendingLoad | None:
        assert self.transport is not None
        t0 = time.perf_counter()
        return self._fetched(self.transport.fetch(pull), t0)

    def _fetched(self, fetched: Fetched, t0: float) -> PendingLoad | None:
        if fetched.failed:
            self.stats.add(load_failures=1)
        self.stats.observe("fetch_seconds", time.perf_counter() - t0)
        return fetched.load

    def update_state_after_alloc(self, request: Request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        loaded = self._stager.accept(request.request_id, block_ids, num_external_tokens, self.block_size,
                                     self._kv_caches)
        if loaded:
            self.stats.add(loaded_tokens=loaded)

    def take_finished_recving(self) -> list[tuple[str, bool]]:
        finished = self._stager.take_finished_reads()
        for _, seconds in finished:
            if seconds is not None:       # the request ran after the whole READ
                self.stats.observe("wait_seconds", seconds)
        return self._count_loads(finished)

    def _count_loads(self, finished: list[tuple[str, float | None]]) -> list[tuple[str, bool]]:
        for _, seconds in finished:
            if seconds is None:
                self.stats.add(load_failures=1)
            else:
                self.stats.observe("load_seconds", seconds)
        return [(request_id, seconds is not None) for request_id, seconds in finished]

    def take_started_recving(self) -> list[str]:
        return self._stager.take_started_reads()

    def layer_loads(self, request_ids: Sequence[str]) -> LayerWait | None:
        loads = self._stager.layer_loads(request_ids)
        return _CountedLayerLoads(loads, self) if loads is not None else None

    def start_load_kv(self) -> None:
        seconds = self._stager.load_into(self._kv_caches, self.block_size)
        if seconds is not None:        # on the engine thread, before the forward pass: all of it is waited for
            self.stats.observe("load_seconds", seconds)
            self.stats.observe("wait_seconds", seconds)

    def take_failed_loads(self) -> list[str]:
        failed = self._stager.take_failed()
        if failed:
            self.stats.add(load_failures=len(failed))
        return failed

    # -- prefill side ---------------------------------------------------------------------------
    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        self._stager.drop(request.request_id)
        params = request.kv_transfer_params or {}
        if (self.source is None or not params.get("do_remote_decode")
                or request.finish_reason in (FinishReason.ABORT, FinishReason.ERROR)):
            return False, None
        n_full = min(request.num_prompt_tokens // self.block_size, len(block_ids), len(request.block_hashes))
        if n_full == 0:
            return False, None
        if not self.source.hold(request.request_id, block_ids[:n_full], request.block_hashes[:n_full],
                                on_release=self._on_release):
            return False, None  # the id's earlier prefill is still held for a pull: the decode side recomputes
        host, port = self.transfer_address or ("", 0)
        params = {"do_remote_prefill": True, "remote_host": host, "remote_port": port,
                  "remote_request_id": request.request_id, "remote_num_blocks": n_full}
        token = self.source.token(request.request_id)
        if self.agent is not None and token is not None:   # a decode engine that knows our agent READs at once
            params |= DirectRead(self.agent.name, token, tuple(block_ids[:n_full]),
                                 request.block_hashes[n_full - 1]).params()
        return True, self.trust.sign(params)

    def _on_release(self, request_id: str) -> None:
        # Runs on a transfer-server thread: only enqueue; the scheduler frees on its own thread.
        with self._released_lock:
            self._released.append(request_id)

    def take_finished_sending(self) -> list[str]:
        with self._released_lock:
            out, self._released = self._released, []
        return out

    def serve_holds(self, pool: BlockPool) -> None:
        if self.pins is not None:
            self.pins.serve(pool)

    def set_waker(self, wake: Callable[[], None]) -> None:
        self._stager.set_waker(wake)
        if self.pins is not None:
            self.pins.set_waker(wake)

    def shutdown(self) -> None:
        self._stager.shutdown()
        if self.server is not None:
            self.server.close()
        if self.transport is not None:
            self.transport.close()
        elif self.agent is not None:
            self.agent.close()


@dataclass
class _CountedLayerLoads:
    """A step's layer-by-layer READs, counted in the connector's metrics when the step ends."""

    loads: LayerLoads
    connector: PDConnector

    def wait_for_layer(self, layer: int) -> None:
        self.loads.wait_for_layer(layer)

    def finish(self) -> list[tuple[str, bool]]:
        finished = self.loads.finish()
        self.connector.stats.observe("wait_seconds", self.loads.waited_s)
        return self.connector._count_loads(finished)


class MultiConnector(KVConnectorBase):
    """Several connectors in order (PD first, then KV tiers); the first that offers tokens loads."""

    def __init__(self, connectors: Sequence[KVConnectorBase]) -> None:
        self.connectors = list(connectors)
        self._owner: dict[str, KVConnectorBase] = {}

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        self._owner.pop(request.request_id, None)
        for c in self.connectors:
            n, is_async = c.get_num_new_matched_tokens(request, num_computed_tokens)
            if n is None:
                return None, True      # that connector is still fetching: ask again next step
            if n > 0:
                self._owner[request.request_id] = c
                return n, is_async
        return 0, False

    def update_state_after_alloc(self, request: Request, block_ids: Sequence[int], num_external_tokens: int) -> None:
        owner = self._owner.pop(request.request_id, None)
        for c in self.connectors:
            if c is owner:
                c.update_state_after_alloc(request, block_ids, num_external_tokens)
            else:
                c.update_state_after_alloc(request, [], 0)

    def request_finished(self, request: Request, block_ids: Sequence[int]) -> tuple[bool, dict[str, Any] | None]:
        delay, params = False, None
        for c in self.connectors:
            d, p = c.request_finished(request, block_ids)
            delay = delay or d
            params = params or p
        return delay, params

    def take_finished_sending(self) -> list[str]:
        return [rid for c in self.connectors for rid in c.take_finished_sending()]

    def take_failed_loads(self) -> list[str]:
        return [rid for c in self.connectors for rid in c.take_failed_loads()]

    def take_finished_recving(self) -> list[tuple[str, bool]]:
        return [done for c in self.connectors for done in c.take_finished_recving()]

    def take_started_recving(self) -> list[str]:
        return [rid for c in self.connectors for rid in c.take_started_recving()]

    def layer_loads(self, request_ids: Sequence[str]) -> LayerWait | None:
        # only the PD connector's NIXL READs land layer by layer (the tiers load before the step)
        return next((w for c in self.connectors if (w := c.layer_loads(request_ids)) is not None), None)

    def serve_holds(self, pool: BlockPool) -> None:
        for c in self.connectors:
            c.serve_holds(pool)

    def set_waker(self, wake: Callable[[], None]) -> None:
        for c in self.connectors:
            c.set_waker(wake)

    def reuse_address(self) -> str | None:
        return next((a for c in self.connectors if (a := c.reuse_address()) is not None), None)

    def take_events(self) -> list[Any]:
        return [e for c in self.connectors for e in c.take_events()]

    def register_kv_caches(self, kv_caches: Sequence[torch.Tensor]) -> None:
        for c in self.connectors:
            c.register_kv_caches(kv_caches)

    def start_load_kv(self) -> None:
        for c in self.connectors:
            c.start_load_kv()

    def save_kv(self, seqs: Sequence[Any]) -> None:
        for c in self.connectors:
            c.save_kv(seqs)

    def shutdown(self) -> None:
        for c in self.connectors:
            c.shutdown()
