"""The decode side of a PD transfer, one interface per way of moving the bytes.

A decode engine asks its `KVTransport` for the blocks a prefill engine holds for a request. The
answer is a `PendingLoad`: for the TCP/shared-memory transport (``transfer.py``) the chunks are
already on the host and are copied into the request's blocks once allocated; for NIXL
(``nixl_transport.py``) the peer keeps the blocks until the decode engine READs them straight into
its own blocks. Either way the block hashes were checked against the request's own before any
tokens are offered, and blocks a transfer did not deliver are recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import torch

from inferstack.engine.connector.blocks import PendingLoad, StagedLoad
from inferstack.engine.connector.transfer import KVTransferClient, TransferStats
from inferstack.engine.connector.wire import TransferError
from inferstack.engine.kv.hashing import BLOCKS_PER_CHUNK


@dataclass(frozen=True)
class DirectRead:
    """What a NIXL prefill engine's signed ``kv_transfer_params`` add so that a decode engine that
    already has its agent loaded READs the held blocks without asking for an offer first
    (``nixl_transport.py``, direct READ): its agent, the hold's token, the held block ids and the
    last one's hash (the hashes are chained: equal last hashes mean every block is this prompt's)."""

    agent: str
    hold: str
    block_ids: tuple[int, ...]
    last_hash: bytes

    FIELDS: ClassVar[tuple[str, ...]] = ("remote_agent", "remote_hold", "remote_block_ids", "remote_block_hash")

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> DirectRead | None:
        """None when the params carry no (well-formed) direct READ: the decode engine asks for an offer."""
        try:
            ids = tuple(int(b) for b in params["remote_block_ids"])
            return cls(str(params["remote_agent"]), str(params["remote_hold"]), ids,
                       bytes.fromhex(str(params["remote_block_hash"])))
        except (KeyError, TypeError, ValueError):
            return None

    def params(self) -> dict[str, Any]:
        return dict(zip(self.FIELDS, (self.agent, self.hold, list(self.block_ids), self.last_hash.hex()),
                        strict=True))


@dataclass(frozen=True)
class PullRequest:
    """What a decode engine pulls: a request's blocks held at a vetted peer (`TransferTrust`)."""

    host: str
    port: int
    request_id: str
    expected_hashes: Sequence[bytes]   # the decode engine's own hashes of the prompt's blocks
    first_block: int                   # blocks before it are device prefix-cache hits here
    max_blocks: int                    # at least one prompt token is left to compute
    # Cross-replica reuse: the holder pins its cached blocks with these hashes (``prefix_pins.py``)
    # under ``request_id`` instead of naming blocks a finished prefill holds.
    prefix: Sequence[bytes] | None = None
    direct: DirectRead | None = None   # NIXL: READ these blocks without an offer when the peer's agent is loaded


@dataclass
class Fetched:
    load: PendingLoad | None    # None: nothing usable arrived
    failed: bool = False        # the transfer broke off (what arrived intact is still used)


class KVTransport(Protocol):
    name: str                   # the `transport` label of inferstack_kv_transfer_* metrics
    stats: TransferStats

    def fetch(self, pull: PullRequest) -> Fetched:
        """Runs on a background thread; never raises for a transfer failure."""

    def fetch_now(self, pull: PullRequest) -> Fetched | None:
        """What can be had without any I/O, on the caller's (the engine's) thread: a NIXL direct READ's
        load; None when the pull needs a round trip to the peer (`fetch`, on a background thread)."""

    def close(self) -> None: ...


class TcpKVTransport:
    """Pulls over the KV transfer engine (TCP, or shared memory when the peer is on this host)."""

    def __init__(self, client: KVTransferClient) -> None:
        self.client = client
        self.name = "shm" if client.allow_shm else "tcp"
        self.stats = client.stats

    def fetch(self, pull: PullRequest) -> Fetched:
        chunks: list[torch.Tensor] = []
        got, failed = 0, False
        first_chunk = pull.first_block // BLOCKS_PER_CHUNK
        try:
            received = self.client.pull(pull.host, pull.port, pull.request_id,
                                        expected_hashes=list(pull.expected_hashes))
            for chunk in received:
                if chunk.first_block != got or (
                    chunk.num_blocks != BLOCKS_PER_CHUNK and chunk.index + 1 < chunk.num_chunks
                ):
                    raise TransferError(f"peer sends {chunk.num_blocks}-block chunks; decode engines need "
                                        f"{BLOCKS_PER_CHUNK}-block chunks")
                if chunk.first_block + chunk.num_blocks > first_chunk * BLOCKS_PER_CHUNK:
                    chunks.append(chunk.tensor.clone())     # the receive buffer is reused
                got = chunk.first_block + chunk.num_blocks
        except TransferError:
            failed = True
        end_block = min(got, pull.max_blocks)
        if end_block <= pull.first_block:
            return Fetched(None, failed)
        return Fetched(StagedLoad(pull.first_block, end_block - pull.first_block, chunks), failed)

    def fetch_now(self, pull: PullRequest) -> Fetched | None:
        return None      # every pull streams chunks from the peer

    def close(self) -> None:
        self.client.close()
