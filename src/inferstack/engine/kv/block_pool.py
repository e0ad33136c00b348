"""The pool of physical KV blocks: ref counts, the prefix-cache map and LRU eviction.

A block with ``ref_cnt == 0`` sits in the free queue but keeps its hash while it is there, so a
later request with the same prefix can take it back (a cache hit). Allocation takes the least
recently freed block and only then drops its hash (eviction).

Blocks are plain ids (ints), their state kept in columns (struct of arrays): the fleet simulator runs
a thousand pools of ~27k blocks each, where a Python object per block plus an ordered-dict entry for
the free queue cost ~300 bytes a block (13 GB for the fleet) and an object allocation per new block.
The free queue is a doubly linked list through two int arrays (8 bytes a block), in LRU order.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Sequence

from inferstack.engine.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSink

_NIL = -1


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 events: KVEventSink | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        # Blocks are created on first use: a never-used block sorts before every freed one in the LRU
        # order, so taking them from a counter first is the same order as a queue that starts full,
        # and an idle pool of 30k blocks costs nothing (the simulator runs a thousand of them).
        self.ref_cnt: list[int] = []                 # per created block
        self.hashes: list[bytes | None] = []         # per created block: its prefix-cache key, if cached
        self._prev = array("i")                      # free-queue links (valid while ref_cnt == 0)
        self._next = array("i")
        self._head = self._tail = _NIL               # least / most recently freed
        self._num_free = 0                           # created blocks in the free queue
        self._cached: dict[bytes, int] = {}
        self._events = events

    @property
    def num_created(self) -> int:
        """Blocks handed out at least once (the others have never held anything)."""
        return len(self.ref_cnt)

    @property
    def num_free_blocks(self) -> int:
        return self._num_free + self.num_blocks - len(self.ref_cnt)

    @property
    def publishes_events(self) -> bool:
        """KV events are published (their order is observable)."""
        return self._events is not None

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def free_order(self) -> list[int]:
        """The free queue, least recently freed first (the eviction order)."""
        out, b, nxt = [], self._head, self._next
        while b != _NIL:
            out.append(b)
            b = nxt[b]
        return out

    def cached_blocks(self) -> dict[bytes, int]:
        """The prefix-cache map, hash -> block id (a copy)."""
        return dict(self._cached)

    def get_cached_block(self, block_hash: bytes) -> int | None:
        return self._cached.get(block_hash)

    def any_cached(self, block_hashes: Iterable[bytes]) -> bool:
        """Whether any of ``block_hashes`` is cached (one set operation at C speed)."""
        return not self._cached.keys().isdisjoint(block_hashes)

    def touch(self, blocks: Iterable[int]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the eviction queue."""
        ref = self.ref_cnt
        for b in blocks:
            if ref[b] == 0:
                self._unlink(b)
            ref[b] += 1

    def allocate(self, n: int) -> list[int]:
        ref = self.ref_cnt
        first = len(ref)
        unused = self.num_blocks - first
        if n > self._num_free + unused:
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        if n == 1 and unused:      # a decode's next block (most calls), never used before: no lists to build
            ref.append(1)
            self.hashes.append(None)
            self._prev.append(_NIL)
            self._next.append(_NIL)
            return [first]
        fresh = min(n, unused)
        out = list(range(first, first + fresh))
        if fresh:
            ref += [1] * fresh
            self.hashes += [None] * fresh
            links = array("i", [_NIL]) * fresh
            self._prev += links
            self._next += links
        if n > fresh:
            self._take_free(n - fresh, out)
        return out

    def _take_free(self, n: int, out: list[int]) -> None:
        """Pop ``n`` blocks off the head of the free queue into ``out``, evicting their hashes."""
        ref, hashes, cached, nxt = self.ref_cnt, self.hashes, self._cached, self._next
        evicted: list[bytes] = []
        b = self._head
        for _ in range(n):
            out.append(b)
            ref[b] = 1
            h = hashes[b]
            if h is not None:
                evicted.append(h)
                del cached[h]
                hashes[b] = None
            b = nxt[b]
        self._head = b
        if b == _NIL:
            self._tail = _NIL
        else:
            self._prev[b] = _NIL
        self._num_free -= n
        if evicted and self._events is not None:
            self._events.publish([BlockRemoved(evicted)])

    def free(self, blocks: Iterable[int]) -> None:
        """Drop one reference from each block; callers pass a request's blocks tail first so
        that its tail is evicted before its (more shareable) head."""
        ref, prev, nxt = self.ref_cnt, self._prev, self._next
        tail, freed = self._tail, 0
        for b in blocks:
            r = ref[b] - 1
            ref[b] = r
            if r == 0:           # append at the tail of the free queue
                prev[b] = tail
                nxt[b] = _NIL
                if tail == _NIL:
                    self._head = b
                else:
                    nxt[tail] = b
                tail = b
                freed += 1
        self._tail = tail
        self._num_free += freed

    def _unlink(self, b: int) -> None:
        prev, nxt = self._prev, self._next
        p, n = prev[b], nxt[b]
        if p == _NIL:
            self._head = n
        else:
            nxt[p] = n
        if n == _NIL:
            self._tail = p
        else:
            prev[n] = p
        self._num_free -= 1

    def cache_full_blocks(self, blocks: Sequence[int], hashes: Sequence[bytes], start: int, end: int,
                          token_ids: Sequence[int]) -> None:
        """Register blocks ``start..end-1`` of a request (now full) under their chained hashes."""
        if not self.enable_caching or start >= end:
            return
        if self._events is None:      # nothing to publish: no runs to collect (every prompt's blocks come here)
            self.cache_blocks(blocks[start:end], hashes[start:end])
            return
        own, cached = self.hashes, self._cached
        runs: list[list[int]] = []      # contiguous runs of newly cached block indices
        for i in range(start, end):
            b, block_hash = blocks[i], hashes[i]
            if own[b] is not None or block_hash in cached:
                continue  # already cached, or a twin computed concurrently: one cached copy is enough
            own[b] = block_hash
            cached[block_hash] = b
            if runs and runs[-1][-1] == i - 1:
                runs[-1].append(i)
            else:
                runs.append([i])
        if runs and self._events is not None:
            bs = self.block_size
            self._events.publish([
                BlockStored([hashes[i] for i in run], hashes[run[0] - 1] if run[0] > 0 else None,
                            list(token_ids[run[0] * bs:(run[-1] + 1) * bs]), bs)
                for run in runs
            ])

    def cache_blocks(self, blocks: Sequence[int], hashes: Sequence[bytes]) -> None:
        """`cache_full_blocks` over (block, hash) pairs of several requests at once, in order, where no events
        listen (a decode leap's newly full blocks: one call a leap instead of one a request)."""
        if not self.enable_caching:
            return
        assert self._events is None, "cache_full_blocks publishes the stored blocks"
        own, cached = self.hashes, self._cached
        for b, block_hash in zip(blocks, hashes, strict=True):
            if own[b] is None and block_hash not in cached:
                own[b] = block_hash
                cached[block_hash] = b

    def uncache(self, blocks: Iterable[int]) -> None:
        """Forget the hashes of ``blocks`` (their content is not what the hash says: a failed load)."""
        own, cached = self.hashes, self._cached
        removed: list[bytes] = []
        for b in blocks:
            h = own[b]
            if h is not None:
                if cached.get(h) == b:
                    del cached[h]
                removed.append(h)
                own[b] = None
        if removed and self._events is not None:
            self._events.publish([BlockRemoved(removed)])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible while no request holds blocks."""
        if self.num_free_blocks != self.num_blocks:
            return False
        self.hashes = [None] * len(self.hashes)
        self._cached.clear()
        if self._events is not None:
            self._events.publish([AllBlocksCleared()])
        return True
