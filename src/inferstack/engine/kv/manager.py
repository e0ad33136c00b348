"""Per-request block tables on top of the block pool: prefix-cache lookup and slot allocation."""

from __future__ import annotations

from collections.abc import Sequence

from inferstack.engine.kv.block_pool import BlockPool
from inferstack.engine.kv.hashing import DIGESTS, KVKeySpace, block_hashes, block_packer
from inferstack.engine.request import Request


class KVCacheManager:
    def __init__(self, pool: BlockPool, key_space: KVKeySpace) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.key_space = key_space
        self._digest = DIGESTS[key_space.digest]
        self._pack_block = block_packer(pool.block_size).pack
        self._req_blocks: dict[str, list[int]] = {}     # request id -> its block table (block ids)
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def block_ids(self, request_id: str) -> list[int]:
        ids = self._req_blocks.get(request_id)
        return list(ids) if ids is not None else []

    def update_block_hashes(self, request: Request) -> list[bytes]:
        """Extend the request's hash chain over its newly full blocks (prompt and output tokens)."""
        hashes, tokens, bs = request.block_hashes, request.all_token_ids, self.block_size
        have = len(hashes)
        full = len(tokens) // bs
        if full == have + 1 and have:
            # a decode's next block (most calls): `block_hashes`' one-block case (the same bytes) without its call
            hashes.append(self._digest(hashes[-1] + self._pack_block(*tokens[have * bs:full * bs])))
        elif full > have:
            # the seed only roots a new chain; an extension hangs off the chain's last hash (a decode's case)
            parent = hashes[-1] if have else None
            seed = self.key_space.seed(request.cache_salt) if parent is None else parent
            hashes.extend(block_hashes(seed, tokens, bs, start=have, parent=parent, digest=self._digest))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of full blocks, leaving at least one token to compute (its logits
        are needed to sample)."""
        if not self.pool.enable_caching:
            return [], 0
        hashes = self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[int] = []
        cached = self.pool.get_cached_block
        for block_hash in hashes[:max_blocks]:
            block = cached(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def can_fit(self, request: Request, num_new_tokens: int, new_computed: Sequence[int] = ()) -> bool:
        return self._blocks_needed(request, num_new_tokens, new_computed) <= self._available(new_computed)

    def num_cached_blocks(self, request_id: str) -> int:
        """Leading blocks of the request registered in the prefix cache so far."""
        return self._num_cached_blocks.get(request_id, 0)

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        """Blocks `allocate_slots` would take for ``num_new_tokens`` more tokens (no cache hits)."""
        return self._blocks_needed(request, num_new_tokens, ())

    def total_blocks_needed(self, requests: Sequence[Request], num_new_tokens: int) -> int:
        """Σ `blocks_needed` over ``requests`` (each with ``num_new_tokens`` more tokens), in one pass."""
        bs, tables, total = self.block_size, self._req_blocks, 0
        for r in requests:
            blocks = tables.get(r.request_id)
            need = -(-(r.num_computed_tokens + num_new_tokens) // bs) - (len(blocks) if blocks is not None else 0)
            if need > 0:
                total += need
        return total

    def allocate_decode_slots(self, slots: Sequence[tuple[Request, int]]) -> bool:
        """For each (request, computed) in order: `allocate_slots(request, 1)` as if ``request`` had
        ``computed`` tokens computed (without setting it), with the same block takes and prefix-cache entries
        in the same order; False at the first the pool cannot serve (the earlier ones stay applied). The
        decode leaps of the fleet simulator apply a run's block boundaries through this, one call a run."""
        if not self.pool.publishes_events and self._decode_slots_at_once(slots):
            return True
        bs, pool, tables, ncached = self.block_size, self.pool, self._req_blocks, self._num_cached_blocks
        caching = pool.enable_caching
        for request, computed in slots:
            rid = request.request_id
            blocks = tables.get(rid)
            if blocks is None:
                blocks = tables[rid] = []
            after = computed + 1
            needed = -(-after // bs) - len(blocks)
            if needed > 0:
                if needed > pool.num_free_blocks:
                    return False
                blocks.extend(pool.allocate(needed))
            if caching:      # `_cache_full_blocks(request, after)` inline: a leap's every block boundary comes here
                full, start = min(after, len(request.all_token_ids)) // bs, ncached.get(rid, 0)
                if full > start:
                    pool.cache_full_blocks(blocks, self.update_block_hashes(request), start, full,
                                           request.all_token_ids)
                    ncached[rid] = full
        return True

    def allocate_leap(self, requests: Sequence[Request], start: Sequence[int], steps: int) -> bool:
        """`allocate_decode_slots` over every block boundary of a decode leap of ``steps`` steps (request i at
        ``start[i]`` computed tokens, its tokens for the leap already appended), worked out per request instead of
        per boundary: request i takes a block at steps ``len(table) * bs - start[i]``, then every ``bs`` steps,
        in the (step, request) order of the boundaries, and caches its blocks up to ``(start[i] + steps) // bs``.
        Only where `_decode_slots_at_once` would apply, and then with its state: no events listen, every request
        has a table covering its computed tokens and (with caching) its cached blocks caught up
        (``start[i] // bs``), the pool has the blocks, and the new hashes are distinct and none is cached yet.
        False otherwise, having changed nothing but hash chains."""
        pool = self.pool
        if pool.publishes_events:
            return False
        bs, tables, ncached, n = self.block_size, self._req_blocks, self._num_cached_blocks, len(requests)
        caching = pool.enable_caching
        takes: list[int] = []       # step * n + request of each block taken: sorted, the boundaries' order
        held: list[list[int]] = []  # request i's block table
        plans: list[tuple[int, Request, list[int], int, int]] = []
        for i, (request, nc) in enumerate(zip(requests, start, strict=True)):
            blocks = tables.get(request.request_id)
            cached = nc // bs
            if blocks is None or len(blocks) * bs < nc or (caching and ncached.get(request.request_id, 0) != cached):
                return False
            held.append(blocks)
            takes += range((len(blocks) * bs - nc) * n + i, steps * n, bs * n)
            full = (nc + steps) // bs
            if full > cached:    # first boundary of the leap (opening or filling a block) orders the caching
                plans.append((min(-nc % bs, (-nc - 1) % bs) * n + i, request, blocks, cached, full))
        if len(takes) > pool.num_free_blocks:
            return False
        new: list[bytes] = []
        if caching and plans:
            plans.sort(key=_first)
            for _, request, _, cached, full in plans:
                new += self.update_block_hashes(request)[cached:full]
            if len(set(new)) != len(new) or pool.any_cached(new):
                return False
        if takes:
            takes.sort()
            for key, block in zip(takes, pool.allocate(len(takes)), strict=True):
                held[key % n].append(block)
        if new:
            filled: list[int] = []
            for _, request, blocks, cached, full in plans:
                filled += blocks[cached:full]
                ncached[request.request_id] = full
            pool.cache_blocks(filled, new)
        return True

    def _decode_slots_at_once(self, slots: Sequence[tuple[Request, int]]) -> bool:
        """`allocate_decode_slots` with every block taken in one pool call (in the points' order, so the same ids)
        and each request's new full blocks cached in one, where that cannot differ from point by point: the pool
        has the blocks, and the new hashes are distinct and none is cached yet (so no point's twin check or
        eviction can meet another's). False otherwise, having changed nothing but extended hash chains (which
        the point-by-point path extends the same way)."""
        bs, tables, ncached = self.block_size, self._req_blocks, self._num_cached_blocks
        held: dict[str, int] = {}
        last: dict[str, tuple[Request, int]] = {}        # per request, in order of first point: its last point
        takes: list[tuple[str, int]] = []
        total = 0
        for request, computed in slots:
            rid = request.request_id
            have = held.get(rid)
            if have is None:
                blocks = tables.get(rid)
                have = len(blocks) if blocks is not None else 0
            needed = -(-(computed + 1) // bs) - have
            if needed > 0:
                takes.append((rid, needed))
                total += needed
                have += needed
            held[rid] = have
            last[rid] = (request, computed + 1)
        pool = self.pool
        if total > pool.num_free_blocks:
            return False
        plans: list[tuple[Request, list[bytes], int, int]] = []
        if pool.enable_caching:
            new: list[bytes] = []
            for rid, (request, after) in last.items():
                full, start = min(after, len(request.all_token_ids)) // bs, ncached.get(rid, 0)
                if full > start:
                    hashes = self.update_block_hashes(request)
                    plans.append((request, hashes, start, full))
                    new += hashes[start:full]
            if len(set(new)) != len(new) or pool.any_cached(new):
                return False
        for rid in last:
            if rid not in tables:
                tables[rid] = []
        ids, pos = pool.allocate(total) if total else [], 0
        for rid, count in takes:
            tables[rid].extend(ids[pos:pos + count])
            pos += count
        for request, hashes, start, full in plans:
            pool.cache_full_blocks(tables[request.request_id], hashes, start, full, request.all_token_ids)
            ncached[request.request_id] = full
        return True

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       new_computed: Sequence[int] = (), cache: bool = True) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after taking ``new_computed``
        cache hits); False, changing nothing, when the pool cannot. ``cache=False``: the new blocks
        are filled by an asynchronous load, not by a step; `cache_computed` caches them once it ended."""
        if not new_computed:
            return self._allocate_new(request, num_new_tokens, cache)
        needed = self._blocks_needed(request, num_new_tokens, new_computed)
        if needed > self._available(new_computed):
            return False
        blocks = self._req_blocks.setdefault(request.request_id, [])
        self.pool.touch(new_computed)
        blocks.extend(new_computed)
        self._num_cached_blocks[request.request_id] = len(blocks)
        if needed > 0:
            blocks.extend(self.pool.allocate(needed))
        # Blocks become cacheable as soon as their tokens are scheduled: the step that computes
        # them writes every new K/V before any attention reads, so a later request may share them.
        num_tokens_after = request.num_computed_tokens + len(new_computed) * self.block_size + num_new_tokens
        if cache:
            self._cache_full_blocks(request, num_tokens_after)
        return True

    def cache_computed(self, request: Request) -> None:
        """Enter the request's full blocks up to ``num_computed_tokens`` in the prefix cache (their KV
        arrived by an asynchronous load)."""
        self._cache_full_blocks(request, request.num_computed_tokens)

    def _allocate_new(self, request: Request, num_new_tokens: int, cache: bool) -> bool:
        """`allocate_slots` without cache hits, the call of every running request at every step: the same
        arithmetic, state changes and order, without the general path's per-call generator and lookups."""
        rid = request.request_id
        blocks = self._req_blocks.get(rid)
        num_tokens_after = request.num_computed_tokens + num_new_tokens
        needed = -(-num_tokens_after // self.block_size) - (len(blocks) if blocks is not None else 0)
        pool = self.pool
        if needed > 0 and needed > pool.num_free_blocks:
            return False
        if blocks is None:
            blocks = self._req_blocks[rid] = []
        if needed > 0:
            blocks.extend(pool.allocate(needed))
        if cache and pool.enable_caching and min(num_tokens_after, len(request.all_token_ids)) // self.block_size > \
                self._num_cached_blocks.get(rid, 0):
            self._cache_full_blocks(request, num_tokens_after)
        return True

    def forget_from(self, request: Request, first_block: int) -> set[int]:
        """Uncache the request's blocks from ``first_block`` on (not what their hashes say); their ids."""
        blocks = self._req_blocks.get(request.request_id, [])[first_block:]
        self.pool.uncache(blocks)
        return set(blocks)

    def free(self, request: Request) -> None:
        blocks = self._req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def _blocks_needed(self, request: Request, num_new_tokens: int, new_computed: Sequence[int]) -> int:
        have = len(self._req_blocks.get(request.request_id, ())) + len(new_computed)
        total = request.num_computed_tokens + len(new_computed) * self.block_size + num_new_tokens
        return max(0, -(-total // self.block_size) - have)

    def _available(self, new_computed: Sequence[int]) -> int:
        # Hits that sit in the free queue stop being allocatable once we take them.
        ref = self.pool.ref_cnt
        return self.pool.num_free_blocks - sum(1 for b in new_computed if ref[b] == 0)

    def _cache_full_blocks(self, request: Request, num_tokens: int) -> None:
        if not self.pool.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self.update_block_hashes(request)
        self.pool.cache_full_blocks(self._req_blocks[request.request_id], hashes, start, num_full,
                                    request.all_token_ids)
        self._num_cached_blocks[request.request_id] = num_full


def _first(plan: tuple[int, Request, list[int], int, int]) -> int:
    return plan[0]
