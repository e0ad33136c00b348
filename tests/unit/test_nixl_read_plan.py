"""How a NIXL READ is cut (layer groups, copy threads) and the shm segment pool's choice of what to keep."""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch

from inferstack.engine.connector.nixl_agent import (
    KVRegions,
    NixlAgent,
    layer_groups,
    nixl_missing,
    ucx_backend_params,
)
from inferstack.engine.connector.nixl_transport import PEER_BLOCKS_FACTOR, PEER_BLOCKS_FLOOR, peer_regions
from inferstack.engine.connector.shm import SegmentPool
from inferstack.engine.connector.wire import TransferError


def test_layer_groups_start_small_then_double_and_cover_every_layer_once():
    # SmolLM2 fp32, 87 blocks (64 MB): 2.1 MB per layer, 30 layers -> 5 READs, the first one layer
    groups = layer_groups(30, 2_138_112, 1 << 20)
    assert [(g.start, g.stop) for g in groups] == [(0, 1), (1, 3), (3, 7), (7, 15), (15, 30)]
    # one 16-token block weighs 24.6 KB per layer: all 30 layers in one READ
    assert [(g.start, g.stop) for g in layer_groups(30, 24_576, 1 << 20)] == [(0, 30)]
    # small layers: the first READ groups as many as reach the minimum, then doubles
    assert [(g.start, g.stop) for g in layer_groups(30, 300_000, 1 << 20)] == [(0, 4), (4, 12), (12, 28), (28, 30)]
    # the engine's sizes (4 MiB, first READ 1 MiB): a 1,000-token prompt (1.5 MB a layer) starts with one layer,
    # which gates the forward pass; 16 MB (540 KB a layer) with two; a 3.7 MB transfer is one READ
    assert [(g.start, g.stop) for g in layer_groups(30, 1_474_560, 4 << 20, 1 << 20)] == \
        [(0, 1), (1, 3), (3, 7), (7, 15), (15, 30)]
    assert [(g.start, g.stop) for g in layer_groups(30, 540_672, 4 << 20, 1 << 20)] == [(0, 2), (2, 6), (6, 14),
                                                                                      (14, 30)]
    assert [(g.start, g.stop) for g in layer_groups(30, 122_880, 4 << 20, 1 << 20)] == [(0, 30)]
    for layers, size, least in [(1, 10, 0), (7, 1, 0), (30, 5, 1 << 20), (64, 1 << 22, 1 << 20)]:
        flat = [layer for g in layer_groups(layers, size, least) for layer in g]
        assert flat == list(range(layers))


def test_indices_name_the_prepared_rows_of_each_layer_k_then_v():
    """Row (layer * 2 + kv) * num_blocks + block of `all_descs` is that block's K (kv 0) or V (kv 1)."""
    regions = KVRegions((1000, 9000), num_blocks=4, block_bytes=10, mem_type="DRAM", device_id=0)
    rows = regions.all_descs()
    assert rows.shape == (2 * 2 * 4, 3)
    # layer 1, V of block 2: base 9000 + (num_blocks + 2) * 10
    assert rows[(1 * 2 + 1) * 4 + 2].tolist() == [9060, 10, 0]
    assert regions.indices(range(0, 2), [2, 0]).tolist() == [2, 0, 6, 4, 10, 8, 14, 12]
    assert regions.indices(range(1, 2), [3]).tolist() == [11, 15]
    for bad in ([4], [-1]):
        with pytest.raises(TransferError, match="outside a cache of 4 blocks"):
            regions.indices(range(0, 1), bad)


def test_copy_threads_split_every_read():
    assert ucx_backend_params(0) == {"engine_config": "KEEPALIVE_INTERVAL=inf"}
    # NIXL only splits READs of split_batch_size descriptors or more; ours have 2 per layer
    assert ucx_backend_params(2) == {"engine_config": "KEEPALIVE_INTERVAL=inf", "num_threads": "2",
                                     "split_batch_size": "1"}


@pytest.mark.skipif(nixl_missing() is not None, reason="nixl-cu12 not installed")
def test_a_read_split_over_copy_threads_moves_the_right_bytes():
    """Two agents in one process, the reader with two copy threads: scattered blocks (three runs)
    land in the right places, every layer, K and V, and nothing else is written; through either
    of the reader's agents; blocks outside what the holder registered are refused."""
    torch.manual_seed(0)
    shape = (2, 12, 16, 2, 8)
    theirs = [torch.randn(*shape) for _ in range(3)]
    ours = [torch.zeros(*shape) for _ in range(3)]
    holder, reader = NixlAgent("holder", theirs, threads=0), NixlAgent("reader", ours, threads=2)
    done = threading.Event()

    def serve() -> None:     # the holder answers UCX's connection set-up only when progressed
        while not done.wait(0.0002):
            holder.progress()

    progress = threading.Thread(target=serve)
    progress.start()
    try:
        reader.load_peer("here:1", holder.name, holder.metadata())
        # an offer whose regions are not the memory the holder registered is refused before any READ
        shifted = dataclasses.replace(KVRegions.of(theirs), num_blocks=24)
        with pytest.raises(TransferError, match="not memory it registered"):
            reader.read(holder.name, shifted, [0], [0], 10.0)
        reader.min_read_bytes = 0          # a READ per layer group, as for a long prompt
        reader.bulk_min_bytes = 0          # through the copy threads, as a large transfer goes
        landed: list[int] = []
        local, remote = [0, 1, 2, 7, 9, 10], [5, 6, 7, 0, 3, 4]
        moved = reader.read(holder.name, KVRegions.of(theirs), local, remote, 10.0, landed.append)
        assert landed == [0, 1, 2]
        # the first layer gates the request's forward pass: the calling thread READ it (the direct agent), not
        # the copy threads, so both agents are connected to the holder now
        assert holder.name in reader._direct.connected and reader.connected(holder.name, len(local))
        assert moved == len(local) * 2 * 3 * KVRegions.of(ours).block_bytes
        for mine, peer in zip(ours, theirs, strict=True):
            assert torch.equal(mine[:, local], peer[:, remote])
            untouched = [b for b in range(12) if b not in local]
            assert not mine[:, untouched].any()
        # the direct agent (no copy threads) reads from its own prepared lists: another scatter
        reader.bulk_min_bytes = 1 << 40
        reader.read(holder.name, KVRegions.of(theirs), [11, 3], [1, 11], 10.0)
        for mine, peer in zip(ours, theirs, strict=True):
            assert torch.equal(mine[:, [11, 3]], peer[:, [1, 11]])
        # once read from, the holder's regions are fixed: other ones (even inside its memory) are refused, so a
        # peer cannot make this side prepare list after list
        smaller = dataclasses.replace(KVRegions.of(theirs), num_blocks=6)
        with pytest.raises(TransferError, match="other than the ones it offered before"):
            reader.read(holder.name, smaller, [0], [0], 10.0)
        with pytest.raises(TransferError, match="outside a cache"):
            reader.read(holder.name, KVRegions.of(theirs), [0], [12], 10.0)
    finally:
        done.set()
        progress.join(5)
        reader.close()
        holder.close()


def test_the_segment_pool_keeps_its_largest_free_segments():
    """Returned segments beyond ``max_free`` drop the smallest: a 64 MB transfer after two small
    ones reuses its segment the next time instead of mapping (and zeroing) a fresh one."""
    pool = SegmentPool(max_free=2)
    try:
        small, medium, large = (pool.checkout(n) for n in (1, 17 << 20, 33 << 20))
        for seg in (small, medium, large):
            pool.checkin(seg)
        assert not small.path.exists(), "the smallest was dropped"
        assert pool.checkout(40 << 20) is large
        assert pool.checkout(1) is medium
    finally:
        pool.close()


def test_a_peer_offer_is_checked_against_our_layout_before_its_list_is_prepared():
    """An offer claiming a huge cache, or blocks of another size, is refused before anything is allocated."""
    ours = KVRegions((1000, 9000), num_blocks=100_000, block_bytes=64, mem_type="DRAM", device_id=0)

    def offer(**over: object) -> dict:
        return {"bases": [1, 2], "num_blocks": 10, "block_bytes": 64, "mem_type": "DRAM", "device_id": 0} | over

    assert peer_regions(ours=ours, offer=offer()).num_blocks == 10
    assert peer_regions(ours=ours, offer=offer(num_blocks=PEER_BLOCKS_FACTOR * 100_000)).bases == (1, 2)
    for bad, why in [({"num_blocks": PEER_BLOCKS_FACTOR * 100_000 + 1}, "at most"), ({"num_blocks": 0}, "at most"),
                     ({"block_bytes": 128}, "do not match"), ({"bases": [1, 2, 3]}, "do not match")]:
        with pytest.raises(TransferError, match=why):
            peer_regions(ours=ours, offer=offer(**bad))
    small = dataclasses.replace(ours, num_blocks=100)   # a small cache still accepts a peer up to the floor
    assert peer_regions(ours=small, offer=offer(num_blocks=PEER_BLOCKS_FLOOR)).num_blocks == PEER_BLOCKS_FLOOR
    with pytest.raises(TransferError, match="at most"):
        peer_regions(ours=small, offer=offer(num_blocks=PEER_BLOCKS_FLOOR + 1))
