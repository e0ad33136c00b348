"""Prefix indexes: which endpoint probably holds a request's prefix in its KV cache.

* `ApproxPrefixIndex` learns from the gateway's own routing decisions: a hash chain over the
  request text in fixed-size character blocks (GIE uses 16 tokens x 4 chars), remembered per
  endpoint in an LRU with a hard capacity, so memory stays bounded (production-stack's unbounded
  HashTrie ran routers out of memory).
* `PreciseIndex` is fed by the engines' KV events (BlockStored / BlockRemoved / AllBlocksCleared
  carrying the 32-byte block hashes of docs/architecture.md), so it knows what the engines really hold.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from itertools import islice

import xxhash

from inferstack.gateway.routing.native import native

# Tier credit for a block held outside device memory (llm-d: gpu 1.0, cpu 0.8).
MEDIUM_WEIGHT = {"device": 1.0, "host": 0.8, "disk": 0.6, "remote": 0.5}


def text_prefix_hashes(parts: Iterable[str], seed_text: str, block_chars: int, max_blocks: int) -> list[int]:
    """Hash chain over the concatenated text: h0 = xxh3(seed), h_i = xxh3(block_i, seed=h_{i-1}).

    The trailing partial block is hashed too (GIE does the same); work is capped at
    ``max_blocks`` blocks so long prompts cost a bounded amount.
    """
    data = _head_bytes(parts, block_chars * max_blocks)
    h = xxhash.xxh3_64_intdigest(seed_text.encode("utf-8", "surrogatepass"))
    step = block_chars
    n = _blocks(len(data), step, max_blocks)
    out = [0] * n
    digest = xxhash.xxh3_64_intdigest
    for i in range(n):    # `_chain` from nothing, inline: every request of one part comes here
        h = digest(data[i * step:(i + 1) * step], h)
        out[i] = h
    return out


def _seed_hash(seed_text: str) -> int:
    return xxhash.xxh3_64_intdigest(seed_text.encode("utf-8", "surrogatepass"))


def _head_bytes(parts: Iterable[str], limit: int) -> bytes:
    """The first ``limit`` characters of the concatenated parts, UTF-8 (joined only as far as needed)."""
    buf: list[str] = []
    size = 0
    for p in parts:
        if size >= limit:
            break
        buf.append(p)
        size += len(p)
    return "".join(buf)[:limit].encode("utf-8", "surrogatepass")


def _blocks(size: int, step: int, max_blocks: int) -> int:
    # byte blocks: the encoded size may exceed the char count for non-ASCII text; cap again
    return min(max_blocks, (size + step - 1) // step)


def _chain(data: bytes, h: int, out: list[int], n: int, step: int) -> list[int]:
    """``out`` (the chain's first blocks of ``data``, ``h`` the last of them or the seed's hash) extended to
    ``n`` blocks."""
    digest = xxhash.xxh3_64_intdigest
    for i in range(len(out), n):
        h = digest(data[i * step:(i + 1) * step], h)
        out.append(h)
    return out


class PrefixHasher:
    """`text_prefix_hashes` that remembers the chain over a request's lead: its parts up to the first one of a
    block or more (a chat's first message: role, separator, content), when more than a closing separator follows
    (a system prompt, or a conversation's first turn). The lead's full blocks are the first blocks of every
    request that starts with it, so a tenant's system prompt is hashed once, not per request.

    At most `capacity` leads (least recently used dropped), each cut to ``block_chars x max_blocks`` characters:
    at the defaults (64 x 256) up to 4 MB of ASCII text and ~2.5 MB of hashes. A lone message or prompt is not
    remembered (its text is rarely sent again)."""

    def __init__(self, block_chars: int, max_blocks: int, capacity: int = 256):
        self.block_chars, self.max_blocks, self.capacity = block_chars, max_blocks, capacity
        self._memo: OrderedDict[tuple[str, str], tuple[int, list[int]]] = OrderedDict()

    def __len__(self) -> int:
        """Leads remembered."""
        return len(self._memo)

    def hashes(self, parts: Sequence[str], seed_text: str) -> list[int]:
        step, most = self.block_chars, self.max_blocks
        j = 0
        while j < 4 and j < len(parts) and len(parts[j]) < step:
            j += 1
        if j == 4 or len(parts) <= j + 2:
            return text_prefix_hashes(parts, seed_text, step, most)
        limit = step * most
        data = _head_bytes(parts, limit)
        lead = "".join(parts[:j + 1]) if j else parts[0]
        key = (seed_text, lead if len(lead) <= limit else lead[:limit])
        memo = self._memo
        known = memo.get(key)
        if known is None:
            # the lead's bytes begin ``data`` (a UTF-8 encoding of a concatenation is the concatenation of the
            # encodings), so each of its full blocks is a block of ``data`` with the same chain value
            head = key[1].encode("utf-8", "surrogatepass")
            seed = _seed_hash(seed_text)
            known = memo[key] = (seed, _chain(head, seed, [], min(most, len(head) // step), step))
            if len(memo) > self.capacity:
                memo.popitem(last=False)
        else:
            memo.move_to_end(key)
        seed, blocks = known
        return _chain(data, blocks[-1] if blocks else seed, blocks[:], _blocks(len(data), step, most), step)


class _Lru:
    """One endpoint's hashes, least recently inserted first: a deque where inserting a held hash again appends
    a copy and the older copies are skipped as stale when they reach the front (8 bytes a hash; an ordered dict
    cost ~120). Compacted when stale copies outnumber live ones, so a hot prefix cannot grow it."""

    __slots__ = ("live", "order", "stale")

    def __init__(self) -> None:
        self.order: deque[int] = deque()
        self.stale: dict[int, int] = {}       # hash -> its copies in `order` older than the live one
        self.live = 0

    def compact(self) -> None:
        """Keep only the live (newest) copy of each hash."""
        self.order = deque(reversed(dict.fromkeys(reversed(self.order))))
        self.stale.clear()

    def pop_oldest(self) -> int:
        order, stale = self.order, self.stale
        while True:
            h = order.popleft()
            n = stale.get(h)
            if not n:
                self.live -= 1
                return h
            if n == 1:
                del stale[h]
            else:
                stale[h] = n - 1

    def hashes(self) -> list[int]:
        """The live hashes, least recently inserted first."""
        skip, out = dict(self.stale), []
        for h in self.order:
            if skip.get(h):
                skip[h] -= 1
            else:
                out.append(h)
        return out


class ApproxPrefixIndex:
    """Per-endpoint LRU of block hashes plus a reverse map hash -> endpoints.

    A hash held by one endpoint (most of them: distinct prompts) maps to that endpoint's id itself, and
    only a shared one to a set: a set costs ~200 bytes, and a gateway in front of 1,000 endpoints holds
    up to 31M hashes (the simulator's memory at that scale went mostly here). Whether an endpoint holds a
    hash is read from the reverse map, so the LRU itself only keeps the order (`_Lru`)."""

    def __init__(self, capacity_per_endpoint: int = 31_250):
        self.capacity = capacity_per_endpoint
        self._lru: dict[str, _Lru] = {}
        self._holders: dict[int, str | set[str]] = {}
        lib = native()    # the insert loop and the match compiled (`routing.native`), or None: the Python steps
        self._compiled_loop: Callable[..., tuple[int, bool]] | None = lib.insert_loop if lib is not None else None
        self._compiled_match: Callable[..., dict[str, int]] | None = lib.match if lib is not None else None

    def __len__(self) -> int:
        return sum(lru.live for lru in self._lru.values())

    def held_by(self, endpoint: str) -> list[int]:
        """The hashes ``endpoint`` holds, least recently inserted first (the eviction order)."""
        lru = self._lru.get(endpoint)
        return lru.hashes() if lru is not None else []

    def holders(self, block_hash: int) -> frozenset[str]:
        s = self._holders.get(block_hash)
        return frozenset() if s is None else frozenset((s,)) if type(s) is str else frozenset(s)

    def insert(self, endpoint: str, hashes: Sequence[int]) -> None:
        lru = self._lru.get(endpoint)
        if lru is None:
            lru = self._lru[endpoint] = _Lru()
        if self._compiled_loop is not None:     # the loop below in one compiled call (`routing.native`)
            added, again = self._compiled_loop(self._holders, lru.stale, lru.order.append, endpoint, hashes)
            lru.live += added
        else:
            again = self._insert_loop(lru, endpoint, hashes)
        if again and len(lru.order) > 2 * lru.live + 1024:
            lru.compact()
        if lru.live > self.capacity:
            self._evict(lru, endpoint, lru.live - self.capacity)

    def _insert_loop(self, lru: _Lru, endpoint: str, hashes: Sequence[int]) -> bool:
        """Each hash becomes ``endpoint``'s newest: appended to its LRU order (a held one as a newer copy, the
        older one counted stale), ``endpoint`` added to its holders. True when some were held already."""
        holders = self._holders
        fresh = dict.fromkeys(hashes, endpoint)
        if len(fresh) == len(hashes) and holders.keys().isdisjoint(fresh):
            # the usual case (a prompt nobody sent before): the loop below would append each hash to the
            # LRU and give it this endpoint as sole holder, in order; done at C speed, with one small dict
            lru.order.extend(fresh)
            lru.live += len(fresh)
            holders.update(fresh)
            return False
        # `_Lru.again` inline, its compaction checked once by the caller: a tenant's system prompt sent to its
        # holder again is dozens of held blocks per request (a method call each cost ~10 µs at 2,000 characters)
        stale, append, again = lru.stale, lru.order.append, False
        for h in hashes:
            s = holders.get(h)
            if s is None:
                holders[h] = endpoint
            elif type(s) is str:
                if s == endpoint:         # held: now the most recent
                    stale[h] = stale.get(h, 0) + 1
                    append(h)
                    again = True
                    continue
                holders[h] = {s, endpoint}
            elif endpoint in s:
                stale[h] = stale.get(h, 0) + 1
                append(h)
                again = True
                continue
            else:
                s.add(endpoint)
            append(h)
            lru.live += 1
        return again

    def _evict(self, lru: _Lru, endpoint: str, n: int) -> None:
        """Drop ``endpoint``'s ``n`` least recently inserted hashes (`pop_oldest` then `_drop`, each). Without
        stale copies (distinct prompts: every insert of a full endpoint evicts a prompt's worth) those are the
        order's first ``n`` entries, popped in one pass, and a hash only ``endpoint`` holds leaves the reverse map
        without a call: at capacity this ran two method calls per block of every request."""
        if lru.stale:
            for _ in range(n):
                self._drop(lru.pop_oldest(), endpoint)
            return
        popleft, holders = lru.order.popleft, self._holders
        oldest = [popleft() for _ in range(n)]
        lru.live -= n
        for h in oldest:
            s = holders.get(h)
            if s == endpoint:          # held by it alone (a set never equals a str)
                del holders[h]
            elif s is not None and type(s) is not str:
                self._drop(h, endpoint)

    def _drop(self, block_hash: int, endpoint: str) -> None:
        s = self._holders.get(block_hash)
        if s is None:
            return
        if type(s) is str:
            if s == endpoint:
                del self._holders[block_hash]
            return
        s.discard(endpoint)
        if len(s) == 1:
            self._holders[block_hash] = next(iter(s))
        elif not s:
            del self._holders[block_hash]

    def remove_endpoint(self, endpoint: str) -> None:
        lru = self._lru.pop(endpoint, None)
        for h in lru.hashes() if lru is not None else ():
            self._drop(h, endpoint)

    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """Consecutive blocks from the start that each endpoint holds (greedy, stops at the
        first block nobody holds): each holder of the first block with the length of its own run."""
        if self._compiled_match is not None:
            return self._compiled_match(self._holders, hashes)
        return self._match(hashes)

    def _match(self, hashes: Sequence[int]) -> dict[str, int]:
        get = self._holders.get
        s = get(hashes[0]) if hashes else None
        if not s:
            return {}
        if type(s) is str:
            return {s: _run(get, hashes, s, 1)}
        # the endpoints still on their run, one set operation per block (a hash shared by several endpoints:
        # a tenant's system prompt on every replica is dozens of such blocks per request); one that drops out
        # keeps the blocks it held so far
        alive, counts, n = s, {}, len(hashes)
        for i in range(1, n):
            s = get(hashes[i])
            if not s:
                n = i
                break
            if type(s) is str:
                if s not in alive:
                    n = i
                    break
                for e in alive:
                    counts[e] = i
                counts[s] = _run(get, hashes, s, i + 1)
                return counts
            if not alive <= s:
                kept = alive & s
                if not kept:
                    n = i
                    break
                for e in alive - kept:
                    counts[e] = i
                alive = kept
        for e in alive:
            counts[e] = n
        return counts


def _run(get: Callable[[int], str | set[str] | None], hashes: Sequence[int], endpoint: str, start: int) -> int:
    """``start`` plus the consecutive blocks from ``hashes[start]`` that ``endpoint`` holds (alone or shared)."""
    n = start
    for h in islice(hashes, start, None):
        s = get(h)
        if s != endpoint and (type(s) is not set or endpoint not in s):
            break
        n += 1
    return n


class PreciseIndex:
    """Block hashes each endpoint reported through KV events, with the medium holding them."""

    def __init__(self, capacity_per_endpoint: int = 1_000_000):
        self.capacity = capacity_per_endpoint
        self._blocks: dict[str, OrderedDict[bytes, str]] = {}

    def stored(self, endpoint: str, hashes: Iterable[bytes], medium: str = "device") -> None:
        od = self._blocks.get(endpoint)
        if od is None:
            od = self._blocks[endpoint] = OrderedDict()
        for h in hashes:
            od[h] = medium
            od.move_to_end(h)
        while len(od) > self.capacity:
            od.popitem(last=False)

    def removed(self, endpoint: str, hashes: Iterable[bytes], medium: str | None = None) -> None:
        od = self._blocks.get(endpoint)
        if od is None:
            return
        for h in hashes:
            if medium is None or od.get(h) == medium:
                od.pop(h, None)

    def cleared(self, endpoint: str) -> None:
        self._blocks.pop(endpoint, None)

    def blocks(self, endpoint: str) -> int:
        return len(self._blocks.get(endpoint, ()))

    def leading(self, endpoint: str, hashes: Sequence[bytes], medium: str = "device") -> int:
        """Consecutive leading blocks this endpoint holds in ``medium`` (its paged KV cache for device)."""
        od = self._blocks.get(endpoint)
        n = 0
        if od:
            for h in hashes:
                if od.get(h) != medium:
                    break
                n += 1
        return n

    def match(self, endpoint: str, hashes: Sequence[bytes]) -> float:
        """Tier-weighted count of the longest consecutive prefix this endpoint holds."""
        od = self._blocks.get(endpoint)
        if not od:
            return 0.0
        total = 0.0
        for h in hashes:
            medium = od.get(h)
            if medium is None:
                break
            total += MEDIUM_WEIGHT.get(medium, 0.5)
        return total
