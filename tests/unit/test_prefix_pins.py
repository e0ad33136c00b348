"""Cross-replica reuse, holder side: a transfer-server thread asks for a prompt's cached blocks, the
engine thread pins the leading run still cached (they cannot be evicted while a peer reads them) and
unpins them once the pull is released; an ask nobody serves in time pins nothing."""

from __future__ import annotations

import threading

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
    assert [b.ref_cnt for b in pool.blocks[:4]] == [1, 1, 1, 0] and pool.num_free_blocks == 5
    pool.allocate(5)                  # eviction cannot reach pinned blocks
    assert all(pool.get_cached_block(h) is pool.blocks[i] for i, h in enumerate(hashes[:3]))

    source.release("reuse/x/1")        # the pull ended (DONE, disconnect or hold timeout)
    pins.serve(pool)
    assert [b.ref_cnt for b in pool.blocks[:3]] == [0, 0, 0] and pins.num_pinned() == 0 and pool.num_free_blocks == 3


def test_ask_not_served_in_time_pins_nothing():
    pool, hashes = cached_pool()
    pins = PrefixPins(PagedKVSource([torch.zeros(2, 8, 4, 1, 2)]))
    assert pins.pin("reuse/x/2", hashes, 0.05) == 0
    pins.serve(pool)                   # the engine thread comes too late: the ask was withdrawn
    assert pins.num_pinned() == 0 and all(b.ref_cnt == 0 for b in pool.blocks)
