"""Cross-replica reuse, holder side: a transfer-server thread asks for a prompt's cached blocks, the
engine thread pins the leading run still cached (they cannot be evicted while a peer reads them) and
unpins them once the pull is released; an ask nobody serves in time pins nothing; a reader without the
stack secret gets nothing, one with it READs the pinned blocks."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from inferstack.engine.connector.prefix_pins import PrefixPins
from inferstack.engine.connector.transfer import PagedKVSource
from inferstack.engine.kv.block_pool import BlockPool


def cached_pool() -> tuple[BlockPool, list[bytes]]:
    pool = BlockPool(8, 4)
    blocks = pool.allocate(4)
    hashes = [bytes([i]) * 32 for i in range(4)]
    pool.cache_full_blocks(blocks, hashes, 0, 4, list(range(16)))
    pool.free(reversed(blocks))         # finished request: cached, in the eviction queue
    return pool, hashes


def test_engine_thread_pins_leading_cached_blocks_until_released():
    pool, hashes = cached_pool()
    source = PagedKVSource([torch.zeros(2, 8, 4, 1, 2)])
    pins = PrefixPins(source)
    woken = threading.Event()
    pins.set_waker(woken.set)
    asked = [*hashes[:3], bytes([9]) * 32, hashes[3]]    # a gap: only the leading three count
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(pins.pin("reuse/x/1", asked, 10.0)))
    t.start()
    assert woken.wait(10)
    while t.is_alive():               # the engine thread's schedule loop
        pins.serve(pool)
        t.join(0.01)
    assert got == [3]
    spec = source.open("reuse/x/1")
    assert spec is not None and list(spec.block_ids) == [0, 1, 2] and list(spec.block_hashes) == hashes[:3]
    assert pool.ref_cnt[:4] == [1, 1, 1, 0] and pool.num_free_blocks == 5
    pool.allocate(5)                  # eviction cannot reach pinned blocks
    assert all(pool.get_cached_block(h) == i for i, h in enumerate(hashes[:3]))

    source.release("reuse/x/1")        # the pull ended (DONE, disconnect or hold timeout)
    pins.serve(pool)
    assert pool.ref_cnt[:3] == [0, 0, 0] and pins.num_pinned() == 0 and pool.num_free_blocks == 3



def _pin(pins: PrefixPins, pool: BlockPool, key: str, hashes: list[bytes]) -> int:
    got: list[int] = []
    t = threading.Thread(target=lambda: got.append(pins.pin(key, hashes, 10.0)))
    t.start()
    while t.is_alive():               # the engine thread's schedule loop
        pins.serve(pool)
        t.join(0.01)
    return got[0]


def test_a_repeated_pull_key_pins_nothing_more_and_leaks_no_block():
    pool, hashes = cached_pool()
    source = PagedKVSource([torch.zeros(2, 8, 4, 1, 2)])
    pins = PrefixPins(source)
    assert _pin(pins, pool, "reuse/x/1", hashes) == 4
    assert _pin(pins, pool, "reuse/x/1", hashes) == 0   # held already: the first pin stays, no second ref
    assert pool.ref_cnt[:4] == [1, 1, 1, 1]
    source.release("reuse/x/1")
    pins.serve(pool)
    assert pool.ref_cnt[:4] == [0, 0, 0, 0] and pins.num_pinned() == 0

def test_ask_not_served_in_time_pins_nothing():
    pool, hashes = cached_pool()
    pins = PrefixPins(PagedKVSource([torch.zeros(2, 8, 4, 1, 2)]))
    assert pins.pin("reuse/x/2", hashes, 0.05) == 0
    pins.serve(pool)                   # the engine thread comes too late: the ask was withdrawn
    assert pins.num_pinned() == 0 and all(r == 0 for r in pool.ref_cnt)


def test_prefix_reads_need_the_stack_secret_and_move_the_pinned_blocks():
    """Holder and reader agents in one process (UCX between them as between processes)."""
    from inferstack.engine.connector.nixl_agent import NixlAgent, nixl_missing
    from inferstack.engine.connector.nixl_transport import NixlExporter, NixlKVTransport, RemoteLoad
    from inferstack.engine.connector.peers import TransferTrust
    from inferstack.engine.connector.transfer import KVLayout, KVTransferClient, KVTransferServer
    from inferstack.engine.connector.transports import PullRequest, TcpKVTransport

    if nixl_missing() is not None:
        pytest.skip(nixl_missing())
    pool, hashes = cached_pool()
    held = [torch.randn(2, 8, 4, 1, 2) for _ in range(2)]
    source = PagedKVSource(held)
    pins = PrefixPins(source)
    trust = TransferTrust(secret=b"s")
    server = KVTransferServer(source, nixl=NixlExporter(NixlAgent("holder", held), trust, pins))
    stop = threading.Event()

    def engine_loop() -> None:       # the holder's engine thread: serves pins at each "schedule"
        while not stop.wait(0.005):
            pins.serve(pool)

    engine = threading.Thread(target=engine_loop)
    engine.start()
    layout = KVLayout(2, 1, 2, 4, torch.float32)
    mine = [torch.zeros(2, 8, 4, 1, 2) for _ in range(2)]
    readers = {name: NixlKVTransport(NixlAgent(name, mine), layout, TransferTrust(peers=frozenset({"127.0.0.1"}),
                                                                                      secret=secret),
                                     TcpKVTransport(KVTransferClient(layout)), timeout_s=10)
               for name, secret in (("stranger", None), ("reader", b"s"))}
    try:
        port = server.address[1]
        ask = PullRequest("127.0.0.1", port, "reuse/r/1", hashes, 0, 4, prefix=hashes)
        refused = readers["stranger"].fetch(ask)       # allow-listed, but no secret: no metadata, no pin
        assert refused.load is None and readers["stranger"].agent.known_peer(f"127.0.0.1:{port}") == ""
        load = readers["reader"].fetch(PullRequest("127.0.0.1", port, "reuse/r/2", hashes, 0, 4, prefix=hashes))
        assert isinstance(load.load, RemoteLoad) and load.load.num_blocks == 4
        load.load.accept([7, 6, 5, 4], 16, 4)
        load.load.copy_into(mine, 4)
        for a, b in zip(mine, held, strict=True):
            assert torch.equal(a[:, [7, 6, 5, 4]], b[:, :4])
        assert readers["reader"].reuse_stats.transfers[("recv", "nixl")] == 1
        deadline = time.monotonic() + 10
        while pins.num_pinned() and time.monotonic() < deadline:
            time.sleep(0.01)                           # the engine thread unpins once the pull ended
        assert pins.num_pinned() == 0 and all(r == 0 for r in pool.ref_cnt[:4])
    finally:
        stop.set()
        engine.join(5)
        server.close()
        for r in readers.values():
            r.close()
