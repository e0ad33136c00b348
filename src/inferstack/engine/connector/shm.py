"""Shared-memory segments for same-host KV transfers.

Fresh /dev/shm pages cost more than the copy itself (the kernel zeroes and maps each one: ~150 ms
for 92 MB on the development machine, against ~20 ms to gather the KV), so segments are pooled:
the server keeps up to ``max_free`` segments for reuse and the client keeps its mappings open.
Names are ``inferstack-kvt-<server pid>-<instance>-<n>``: unique per segment, so a cached mapping
is never stale; a server removes the segments of dead servers when it starts (a SIGKILLed one
cannot clean up after itself) and its own when it closes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

SHM_DIR = Path("/dev/shm")
PREFIX = "inferstack-kvt-"
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_ALIGN = 16 << 20


@dataclass(eq=False)
class Segment:
    path: Path
    size: int
    region: mmap.mmap


def remove_stale_segments() -> None:
    for path in SHM_DIR.glob(PREFIX + "*"):
        try:
            pid = int(path.name[len(PREFIX):].split("-", 1)[0])
        except ValueError:
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
        except PermissionError:
            pass   # alive, owned by someone else


class SegmentPool:
    def __init__(self, max_free: int = 2) -> None:
        self._instance = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._seq = 0
        self._free: list[Segment] = []
        self._all: set[Segment] = set()
        self._max_free = max_free
        self._lock = threading.Lock()
        remove_stale_segments()

    def checkout(self, nbytes: int) -> Segment:
        with self._lock:
            fits = [s for s in self._free if s.size >= nbytes]
            if fits:
                seg = min(fits, key=lambda s: s.size)
                self._free.remove(seg)
                return seg
            self._seq += 1
            path = SHM_DIR / f"{PREFIX}{self._instance}-{self._seq}"
        size = -(-max(nbytes, 1) // _ALIGN) * _ALIGN
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            region = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE)
        finally:
            os.close(fd)
        seg = Segment(path, size, region)
        with self._lock:
            self._all.add(seg)
        return seg

    def checkin(self, seg: Segment) -> None:
        """Keep the largest segments: a big one serves small transfers too, while keeping the first
        ones returned made every larger transfer map (and the kernel zero) a fresh segment."""
        with self._lock:
            if len(self._free) < self._max_free:
                self._free.append(seg)
                return
            smallest = min(self._free, key=lambda s: s.size)
            if smallest.size < seg.size:
                self._free.remove(smallest)
                self._free.append(seg)
                seg = smallest
            self._all.discard(seg)
        _destroy(seg)

    def discard(self, seg: Segment) -> None:
        """A transfer failed while a client may still read the segment: never reuse it."""
        with self._lock:
            self._all.discard(seg)
        _destroy(seg)

    def close(self) -> None:
        with self._lock:
            segs, self._all, self._free = list(self._all), set(), []
        for seg in segs:
            _destroy(seg)


def _destroy(seg: Segment) -> None:
    seg.path.unlink(missing_ok=True)
    with contextlib.suppress(BufferError):   # a live view keeps the mapping until it is dropped
        seg.region.close()


class SegmentMaps:
    """Client side: read-only mappings of server segments, kept open for reuse (LRU-bounded)."""

    def __init__(self, max_maps: int = 4) -> None:
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._max = max_maps
        self._lock = threading.Lock()

    def get(self, name: str) -> mmap.mmap:
        path = Path(name)
        if path.parent != SHM_DIR or not path.name.startswith(PREFIX):
            raise ValueError(f"refusing shared-memory path {path}")
        with self._lock:
            region = self._maps.get(name)
            if region is not None:
                self._maps.move_to_end(name)
                return region
        with path.open("rb") as f:
            region = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
        with self._lock:
            self._maps[name] = region
            while len(self._maps) > self._max:
                _, old = self._maps.popitem(last=False)
                with contextlib.suppress(BufferError):
                    old.close()
        return region

    def close(self) -> None:
        with self._lock:
            maps, self._maps = list(self._maps.values()), OrderedDict()
        for region in maps:
            with contextlib.suppress(BufferError):
                region.close()
