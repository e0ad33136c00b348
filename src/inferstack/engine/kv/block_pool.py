"""The pool of physical KV blocks: ref counts, the prefix-cache map and LRU eviction.

A block with ``ref_cnt == 0`` sits in the free queue but keeps its hash while it is there, so a
later request with the same prefix can take it back (a cache hit). Allocation takes the least
recently freed block and only then drops its hash (eviction).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from inferstack.engine.kv.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventSink


@dataclass(eq=False, slots=True)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: bytes | None = None


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
        self.blocks: list[KVBlock] = []
        self._free: OrderedDict[int, KVBlock] = OrderedDict()
        self._cached: dict[bytes, KVBlock] = {}
        self._events = events

    @property
    def num_free_blocks(self) -> int:
        return len(self._free) + self.num_blocks - len(self.blocks)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: bytes) -> KVBlock | None:
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the eviction queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[KVBlock]:
        if n > self.num_free_blocks:
            raise NoFreeBlocksError(f"asked for {n} KV blocks, {self.num_free_blocks} free")
        fresh = min(n, self.num_blocks - len(self.blocks))
        out = [KVBlock(i, ref_cnt=1) for i in range(len(self.blocks), len(self.blocks) + fresh)]
        self.blocks += out
        evicted: list[bytes] = []
        for _ in range(n - fresh):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                evicted.append(block.block_hash)
                del self._cached[block.block_hash]
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        if evicted and self._events is not None:
            self._events.publish([BlockRemoved(evicted)])
        return out

    def free(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block; callers pass a request's blocks tail first so
        that its tail is evicted before its (more shareable) head."""
        for block in blocks:
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block

    def cache_full_blocks(self, blocks: Sequence[KVBlock], hashes: Sequence[bytes], start: int, end: int,
                          token_ids: Sequence[int]) -> None:
        """Register blocks ``start..end-1`` of a request (now full) under their chained hashes."""
        if not self.enable_caching or start >= end:
            return
        runs: list[list[int]] = []      # contiguous runs of newly cached block indices
        for i in range(start, end):
            block, block_hash = blocks[i], hashes[i]
            if block.block_hash is not None or block_hash in self._cached:
                continue  # already cached, or a twin computed concurrently: one cached copy is enough
            block.block_hash = block_hash
            self._cached[block_hash] = block
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

    def uncache(self, blocks: Iterable[KVBlock]) -> None:
        """Forget the hashes of ``blocks`` (their content is not what the hash says: a failed load)."""
        removed: list[bytes] = []
        for block in blocks:
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) is block:
                    del self._cached[block.block_hash]
                removed.append(block.block_hash)
                block.block_hash = None
        if removed and self._events is not None:
            self._events.publish([BlockRemoved(removed)])

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; only possible while no request holds blocks."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self._cached.clear()
        if self._events is not None:
            self._events.publish([AllBlocksCleared()])
        return True
