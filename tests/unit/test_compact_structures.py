"""The compact KV block pool and approximate prefix index keep exactly the behaviour of the per-object versions
they replaced (an object per block with an ordered-dict free queue; an ordered dict per endpoint), checked
against those versions as reference models under random operation sequences."""

from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.events import EventBuffer
from inferstack.gateway.routing.prefix import ApproxPrefixIndex


class RefPool:
    """The block pool as it was: per-block ref count and hash, an ordered dict as the LRU free queue."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks, self.ref, self.hash = num_blocks, [], []
        self.free_q: OrderedDict[int, None] = OrderedDict()
        self.cached: dict[bytes, int] = {}
        self.removed: list[bytes] = []

    def num_free(self) -> int:
        return len(self.free_q) + self.num_blocks - len(self.ref)

    def allocate(self, n: int) -> list[int]:
        fresh = min(n, self.num_blocks - len(self.ref))
        out = list(range(len(self.ref), len(self.ref) + fresh))
        self.ref += [1] * fresh
        self.hash += [None] * fresh
        for _ in range(n - fresh):
            b, _ = self.free_q.popitem(last=False)
            if self.hash[b] is not None:
                self.removed.append(self.hash[b])
                del self.cached[self.hash[b]]
                self.hash[b] = None
            self.ref[b] = 1
            out.append(b)
        return out

    def touch(self, blocks: list[int]) -> None:
        for b in blocks:
            if self.ref[b] == 0:
                del self.free_q[b]
            self.ref[b] += 1

    def free(self, blocks: list[int]) -> None:
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_q[b] = None

    def cache(self, blocks: list[int], hashes: list[bytes]) -> None:
        for b, h in zip(blocks, hashes, strict=True):
            if self.hash[b] is None and h not in self.cached:
                self.hash[b], self.cached[h] = h, b


@settings(max_examples=80, deadline=None)
@given(num_blocks=st.integers(1, 8),
       ops=st.lists(st.tuples(st.sampled_from("aacfft"), st.integers(0, 40)), min_size=20, max_size=80))
def test_block_pool_matches_the_object_per_block_pool(num_blocks, ops):
    events = EventBuffer()
    pool, ref = BlockPool(num_blocks, 4, events=events), RefPool(num_blocks)
    held: list[list[int]] = []            # "requests": each holds a list of blocks
    for op, x in ops:
        if op == "a":                     # a request takes blocks (fresh first, then the LRU's head)
            n = x % (pool.num_free_blocks + 1)
            got = pool.allocate(n)
            assert got == ref.allocate(n)
            held.append(got)
        elif op == "c" and held:          # its blocks fill: cache them under hashes (some shared with others)
            blocks = held[x % len(held)]
            hashes = [bytes([(x + i) % 7]) * 32 for i in range(len(blocks))]
            pool.cache_full_blocks(blocks, hashes, 0, len(blocks), [0] * 4 * len(blocks))
            ref.cache(blocks, hashes)
        elif op == "f" and held:          # it finishes: tail first, as KVCacheManager.free
            blocks = held.pop(x % len(held))
            pool.free(reversed(blocks))
            ref.free(list(reversed(blocks)))
        elif op == "t":                   # a cache hit takes a reference on a cached block, free or held
            hits = [b for h, b in sorted(ref.cached.items())][: x % 3]
            pool.touch(hits)
            ref.touch(hits)
            held.append(hits)
        assert pool.free_order() == list(ref.free_q) and pool.cached_blocks() == ref.cached
        assert pool.ref_cnt == ref.ref and pool.num_free_blocks == ref.num_free()
    assert [h for e in events.drain() for h in getattr(e, "block_hashes", [])
            if type(e).__name__ == "BlockRemoved"] == ref.removed


class RefIndex:
    """The approximate prefix index's per-endpoint LRU as it was: an ordered dict, moved to the end on re-insert."""

    def __init__(self, cap: int) -> None:
        self.cap, self.lru = cap, {}

    def insert(self, ep: str, hashes: list[int]) -> None:
        lru = self.lru.setdefault(ep, OrderedDict())
        for h in hashes:
            if h in lru:
                lru.move_to_end(h)
            else:
                lru[h] = None
        while len(lru) > self.cap:
            lru.popitem(last=False)


@settings(max_examples=80, deadline=None)
@given(cap=st.integers(1, 40),
       ops=st.lists(st.tuples(st.sampled_from("abcx"), st.lists(st.integers(0, 30), max_size=25)), max_size=120))
def test_approx_index_keeps_the_ordered_dict_lru_order(cap, ops):
    idx, ref = ApproxPrefixIndex(capacity_per_endpoint=cap), RefIndex(cap)
    for ep, hashes in ops:
        if ep == "x":                     # an endpoint leaves
            idx.remove_endpoint("a")
            ref.lru.pop("a", None)
            continue
        idx.insert(ep, hashes)
        ref.insert(ep, hashes)
        for e in "abc":
            assert idx.held_by(e) == list(ref.lru.get(e, ()))
    for h in range(31):
        assert idx.holders(h) == {e for e, lru in ref.lru.items() if h in lru}
    assert len(idx) == sum(len(lru) for lru in ref.lru.values())
    assert idx.match(list(range(31))) == _ref_match(ref, list(range(31)))


def _ref_match(ref: RefIndex, hashes: list[int]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for i, h in enumerate(hashes):
        progressed = False
        for e, lru in ref.lru.items():
            if h in lru and counts.get(e, 0) == i:
                counts[e] = i + 1
                progressed = True
        if not progressed:
            break
    return counts


def test_approx_index_re_inserting_a_hot_prefix_stays_bounded_and_ordered():
    idx, ref = ApproxPrefixIndex(capacity_per_endpoint=10), RefIndex(10)
    for i in range(3000):                 # a hot prefix sent again and again, with a new tail each time
        hashes = [1, 2, 3, 100 + i % 20]
        idx.insert("a", hashes)
        ref.insert("a", hashes)
    assert idx.held_by("a") == list(ref.lru["a"])
    assert len(idx._lru["a"].order) <= 2 * 10 + 1025     # stale copies compacted away, not accumulated


@settings(max_examples=80, deadline=None)
@given(taken=st.integers(1, 12), pairs=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 5)), max_size=24),
       before=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 5)), max_size=6))
def test_cache_blocks_registers_pairs_in_order_as_the_reference_pool(taken, pairs, before):
    """`BlockPool.cache_blocks` (a decode leap's new full blocks, one call a leap; `cache_full_blocks` without events)
    leaves the prefix-cache map, its order and the blocks' hashes as the per-object pool caching pair by pair,
    twins and already cached blocks included."""
    pool, ref = BlockPool(12, 4), RefPool(12)
    assert pool.allocate(taken) == ref.allocate(taken)
    for b, h in before:       # some blocks (and hashes) already cached, through the per-request call
        if b < taken:
            pool.cache_full_blocks([b], [bytes([h])], 0, 1, [0] * 4)
            ref.cache([b], [bytes([h])])
    blocks = [b % taken for b, _ in pairs]
    hashes = [bytes([h]) for _, h in pairs]
    pool.cache_blocks(blocks, hashes)
    ref.cache(blocks, hashes)
    assert list(pool.cached_blocks().items()) == list(ref.cached.items())
    assert pool.hashes == ref.hash
