"""bpftrace's JSON lines (`-f json`) turned into typed events: accepts, closes, data segments, losses.

A data segment's prefix arrives as one D record and up to N−1 P records (see program.py); records of
one syscall can interleave with other CPUs' records, so pieces are joined by (ts, tid, seg).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import orjson

from inferstack.observe.program import PIECE

_HEX = re.compile(rb"\\x([0-9a-f]{2})")


@dataclass(frozen=True)
class Accept:
    ts_ns: int
    pid: int
    fd: int


@dataclass(frozen=True)
class Close:
    ts_ns: int
    pid: int
    fd: int


@dataclass(frozen=True)
class Segment:
    """`total` bytes moved by one syscall (one iovec of it) on connection (pid, fd); `data` is their
    captured prefix, len(data) <= total."""
    ts_ns: int
    pid: int
    fd: int
    inbound: bool
    total: int
    data: bytes


@dataclass(frozen=True)
class Lost:
    count: int


Event = Accept | Close | Segment


def unescape(text: str) -> bytes:
    """Bytes of a bpftrace `%r` field: printable ASCII as is, everything else as \\xNN.

    A literal backslash followed by x and two hex digits in the payload reads back as one byte (bpftrace
    does not escape backslashes); JSON never contains `\\x`, so OpenAI payloads are not affected."""
    return _HEX.sub(lambda m: bytes((int(m.group(1), 16),)), text.encode("latin-1"))


@dataclass
class _Pending:
    head: Segment
    pieces: dict[int, bytes]
    want: int


class Decoder:
    """Stateful: feed bpftrace JSON lines, get back complete events (and loss reports)."""

    def __init__(self, capture_bytes: int) -> None:
        self.capture_bytes = capture_bytes
        self.ready = False
        self.records = 0
        self.lost = 0
        self.errors: list[str] = []
        self._pending: dict[tuple[int, int, int], _Pending] = {}
        self._orphans: dict[tuple[int, int, int], dict[int, bytes]] = {}

    def line(self, raw: bytes) -> list[Event | Lost]:
        try:
            msg = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return []
        kind = msg.get("type")
        if kind == "lost_events":
            n = int(msg["data"]["events"])
            self.lost += n
            return [Lost(n)]
        if kind == "error":
            self.errors.append(str(msg.get("msg") or msg.get("data")))
            return []
        if kind != "printf":
            return []
        self.records += 1
        return self._record(msg["data"])

    def _record(self, data: str) -> list[Event | Lost]:
        tag = data[:1]
        if tag == "R":
            self.ready = True
            return []
        if tag in "AC":
            ts, pid, _tid, fd = (int(x) for x in data[2:].split())
            return [Accept(ts, pid, fd) if tag == "A" else Close(ts, pid, fd)]
        if tag == "D":
            return self._head(data)
        if tag == "P":
            return self._piece(data)
        if tag == "G":
            ts, pid, _tid, fd, direction, _seg, total = (int(x) for x in data[2:].split())
            return [Segment(ts, pid, fd, direction == 0, total, b"")]
        return []

    def _head(self, data: str) -> list[Event | Lost]:
        fields = data[2:].split(" ", 7)
        ts, pid, tid, fd, direction, seg, total = (int(x) for x in fields[:7])
        body = unescape(fields[7][:-1] if fields[7].endswith("\n") else fields[7])
        head = Segment(ts, pid, fd, direction == 0, total, body)
        want = -(-min(total, self.capture_bytes) // PIECE)
        key = (ts, tid, seg)
        pend = _Pending(head, {0: body}, want)
        pend.pieces.update(self._orphans.pop(key, {}))
        return self._complete(key, pend)

    def _piece(self, data: str) -> list[Event | Lost]:
        fields = data[2:].split(" ", 4)
        ts, tid, seg, k = (int(x) for x in fields[:4])
        body = unescape(fields[4][:-1] if fields[4].endswith("\n") else fields[4])
        key = (ts, tid, seg)
        pend = self._pending.get(key)
        if pend is None:                 # its D record comes from a CPU buffer read later
            self._orphans.setdefault(key, {})[k] = body
            return []
        pend.pieces[k] = body
        return self._complete(key, pend)

    def _complete(self, key: tuple[int, int, int], pend: _Pending) -> list[Event | Lost]:
        if len(pend.pieces) < pend.want:
            self._pending[key] = pend
            return []
        self._pending.pop(key, None)
        data = b"".join(pend.pieces[k] for k in range(pend.want))
        h = pend.head
        return [Segment(h.ts_ns, h.pid, h.fd, h.inbound, h.total, data)]

    def flush(self) -> list[Event | Lost]:
        """At the end: segments whose later pieces never came (lost) keep the prefix that did."""
        out: list[Event | Lost] = []
        for pend in self._pending.values():
            h, data = pend.head, b""
            for k in range(pend.want):
                if k not in pend.pieces:
                    break
                data += pend.pieces[k]
            out.append(Segment(h.ts_ns, h.pid, h.fd, h.inbound, h.total, data))
        self._pending.clear()
        self._orphans.clear()
        return out
