"""Local disk tier: one file per chunk under a sharded directory, crash-safe writes, LRU budget.

Layout: ``<root>/<hex[0:2]>/<hex[2:4]>/<hex>.kv`` where ``hex`` is the chunk key. A write goes to
``<root>/tmp/`` first, is fsynced, then renamed into place (and the directory fsynced), so a crash
leaves either the old state or the whole new file, never a torn chunk under a real name. Leftover
temp files are removed on start. The in-memory index (size, last access) is rebuilt from the
directory on start; last access is the file's mtime, refreshed on every hit so LRU order survives
restarts. Several processes on one host may share a directory: a key missing from this process's
index is looked up on disk before it counts as a miss (each process enforces the budget over the
files it knows).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

from inferstack.fileio import atomic_write
from inferstack.kvstore.tiers.base import Tier, Value

SUFFIX = ".kv"


class DiskTier(Tier):
    name = "disk"
    medium = "disk"

    def __init__(self, root: str | Path, capacity_bytes: int, fsync: bool = True) -> None:
        super().__init__()
        if capacity_bytes <= 0:
            raise ValueError(f"disk tier capacity must be positive, got {capacity_bytes}")
        self.root = Path(root)
        self._capacity = capacity_bytes
        self._fsync = fsync
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._index: OrderedDict[bytes, int] = OrderedDict()   # key -> size, least recently used first
        self._used = 0
        self._rebuild_index()

    def _path(self, key: bytes) -> Path:
        h = key.hex()
        return self.root / h[:2] / h[2:4] / (h + SUFFIX)

    def _rebuild_index(self) -> None:
        for leftover in self._tmp.iterdir():
            leftover.unlink(missing_ok=True)
        found: list[tuple[int, bytes, int]] = []
        for path in self.root.glob(f"*/*/*{SUFFIX}"):
            try:
                key = bytes.fromhex(path.name[: -len(SUFFIX)])
                st = path.stat()
            except (ValueError, OSError):
                continue
            if len(key) == 32:
                found.append((st.st_mtime_ns, key, st.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size
        self._evict_to(self._capacity)

    def contains(self, keys: Sequence[bytes]) -> list[bool]:
        with self._lock:
            known = [k in self._index for k in keys]
        for i, key in enumerate(keys):
            if not known[i] and self._adopt(key):
                known[i] = True
        return known

    def _adopt(self, key: bytes) -> bool:
        """Index a file another process wrote into a shared directory."""
        try:
            size = self._path(key).stat().st_size
        except OSError:
            return False
        with self._lock:
            if key not in self._index:
                self._index[key] = size
                self._used += size
        return True

    def get(self, key: bytes) -> Value | None:
        path = self._path(key)
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                buf = bytearray(size)
                n = f.readinto(buf)
        except FileNotFoundError:
            self._forget(key)
            return None
        if n != size:
            del buf[n:]
        with contextlib.suppress(OSError):
            os.utime(path)   # last access for LRU, also across restarts
        with self._lock:
            if key in self._index:
                self._index.move_to_end(key)
            else:
                self._index[key] = size
                self._used += size
        return buf

    def put(self, key: bytes, value: Value) -> bool:
        size = len(value)
        if size > self._capacity:
            return False
        with self._lock:
            old = self._index.pop(key, None)
            if old is not None:
                self._used -= old
            self._evict_to(self._capacity - size)
            self._index[key] = size      # reserve before the slow write so budget holds under concurrency
            self._used += size
        path = self._path(key)
        try:
            # temp files in tmp/ (swept at start), on the same file system as the chunk's folder
            atomic_write(path, value, durable=self._fsync, tmp_dir=self._tmp)
        except BaseException:
            self._forget(key)
            raise
        return True

    def delete(self, key: bytes) -> None:
        self._path(key).unlink(missing_ok=True)
        self._forget(key)

    def _forget(self, key: bytes) -> None:
        with self._lock:
            size = self._index.pop(key, None)
            if size is not None:
                self._used -= size

    def _evict_to(self, budget: int) -> None:
        """Drop least recently used files until ``used <= budget``; caller holds the lock."""
        evicted: list[bytes] = []
        while self._used > budget and self._index:
            key, size = self._index.popitem(last=False)
            self._used -= size
            self._path(key).unlink(missing_ok=True)
            evicted.append(key)
        if evicted:
            self._evicted(evicted)

    def used_bytes(self) -> int:
        return self._used

    def capacity_bytes(self) -> int:
        return self._capacity
