"""Deterministic KV block and chunk keys (docs/architecture.md, "KV hashing").

Every process that must agree on cache identity — the engine's prefix cache, the KV store, KV
events and the gateway's precise prefix index — derives keys here. Keys depend only on the model
bytes, dtype, KV layout, block size, an optional cache salt and the token ids, never on process
state, so two machines serving the same weights compute the same keys.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash

BLOCK_SIZE = 16
BLOCKS_PER_CHUNK = 16
CHUNK_SIZE = BLOCK_SIZE * BLOCKS_PER_CHUNK
HASH_VERSION = 1


def canonical_json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def file_sha256(path: Path, bufsize: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(bufsize):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest_from_file_digests(file_digests: dict[str, str]) -> str:
    """sha256 over ``"<file name>:<sha256 hex>\\n"`` lines sorted by file name."""
    lines = "".join(f"{name}:{file_digests[name]}\n" for name in sorted(file_digests))
    return hashlib.sha256(lines.encode()).hexdigest()


def model_digest(weight_files: Iterable[Path]) -> str:
    """Digest of a model's weight files, cached beside them keyed by size and mtime."""
    digests: dict[str, str] = {}
    for path in weight_files:
        digests[path.name] = _cached_file_sha256(path)
    return model_digest_from_file_digests(digests)


def _cached_file_sha256(path: Path) -> str:
    stat = path.stat()
    stamp = f"{stat.st_size}:{stat.st_mtime_ns}"
    cache = path.with_name(path.name + ".sha256")
    try:
        cached_stamp, cached_hex = cache.read_text().split()
        if cached_stamp == stamp and len(cached_hex) == 64:
            return cached_hex
    except (OSError, ValueError):
        pass
    hex_digest = file_sha256(path)
    try:
        cache.write_text(f"{stamp} {hex_digest}\n")
    except OSError:
        pass  # read-only install: recomputing next time is only slower
    return hex_digest


@lru_cache(maxsize=64)     # pure; asked for at every hash-chain extension
def root_hash(model: str, dtype: str, kv_layout: str = "paged", block_size: int = BLOCK_SIZE) -> bytes:
    return hashlib.sha256(
        canonical_json(
            {"v": HASH_VERSION, "model": model, "dtype": dtype, "kv_layout": kv_layout, "block_size": block_size}
        )
    ).digest()


@lru_cache(maxsize=256)
def seed_hash(root: bytes, cache_salt: str | None) -> bytes:
    if cache_salt is None:
        return root
    return hashlib.sha256(root + b"salt:" + cache_salt.encode()).digest()


def block_hash(parent: bytes, token_ids: Sequence[int]) -> bytes:
    return hashlib.sha256(parent + np.asarray(token_ids, dtype="<u4").tobytes()).digest()


def sha256_digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# A block chain's digest by name. SHA-256 is the wire format (KV events, the KV store, PD transfers: every process
# that must agree on a key). `xxh3-128` serves hashes that never leave their process, where only their equalities
# count (the fleet simulator's pools): ~5x cheaper a block, with a collision chance of ~n^2 / 2^129.
DIGESTS: dict[str, Callable[[bytes], bytes]] = {"sha256": sha256_digest, "xxh3-128": xxhash.xxh3_128_digest}


def block_hashes(seed: bytes, token_ids: Sequence[int], block_size: int = BLOCK_SIZE,
                 start: int = 0, parent: bytes | None = None,
                 digest: Callable[[bytes], bytes] = sha256_digest) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids`` from block index ``start``.

    ``parent`` is the hash of block ``start - 1`` (the seed when ``start == 0``), which lets a
    caller extend a request's chain as tokens arrive without rehashing the prefix. ``digest``: one of
    `DIGESTS` (SHA-256 unless the hashes stay in the process).
    """
    n_full = len(token_ids) // block_size
    if n_full <= start:
        return []
    # only the blocks to hash: a request extends its chain one block at a time as it decodes. struct packs
    # the same little-endian uint32 bytes as numpy, ~3x faster for the few blocks of a decode step.
    count = (n_full - start) * block_size
    data = block_packer(count).pack(*token_ids[start * block_size:n_full * block_size])
    prev = seed if parent is None else parent
    if count == block_size:      # one block (most calls: a decode's next block), without the loop
        return [digest(prev + data)]
    out: list[bytes] = []
    width = 4 * block_size
    for i in range(0, len(data), width):
        prev = digest(prev + data[i:i + width])
        out.append(prev)
    return out


@lru_cache(maxsize=256)    # compiled once per length: a decode extends its chain by one block at a time
def block_packer(count: int) -> struct.Struct:
    """``count`` token ids as the little-endian uint32 bytes a block hash covers."""
    return struct.Struct(f"<{count}I")


def chunk_keys(hashes: Sequence[bytes], blocks_per_chunk: int = BLOCKS_PER_CHUNK) -> list[bytes]:
    """A chunk's key is the hash of its last block; only full chunks have keys."""
    return [hashes[i] for i in range(blocks_per_chunk - 1, len(hashes), blocks_per_chunk)]


@dataclass(frozen=True)
class KVKeySpace:
    """The identity of one model's KV cache: what a block hash is rooted in."""

    model_digest: str
    dtype: str
    kv_layout: str = "paged"
    block_size: int = BLOCK_SIZE
    digest: str = "sha256"       # a name in `DIGESTS`; not part of the identity other processes compare

    @property
    def root(self) -> bytes:
        return root_hash(self.model_digest, self.dtype, self.kv_layout, self.block_size)

    def seed(self, cache_salt: str | None = None) -> bytes:
        return seed_hash(self.root, cache_salt)

    def hashes(self, token_ids: Sequence[int], cache_salt: str | None = None) -> list[bytes]:
        return block_hashes(self.seed(cache_salt), token_ids, self.block_size, digest=DIGESTS[self.digest])
