"""bpftrace's JSON lines (`-f json`) turned into typed events: accepts, closes, data segments, losses.

A data segment's prefix arrives as up to capture_bytes/PIECE D records (see program.py); records of one
syscall can interleave with other CPUs' records, so pieces are joined by (ts, tid, seg).
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
    wire_ns: int = 0          # inbound: when the first of these bytes reached the socket (0: unknown)


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
        self.ended = False
        self.records = 0
        self.lost = 0
        self.errors: list[str] = []
        self._pending: dict[tuple[int, int, int], _Pending] = {}
        self._wire: dict[int, int] = {}          # tid → wire time for its next inbound segment

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
        if tag in "RE":
            self.ready = self.ready or tag == "R"
            self.ended = tag == "E"
            return []
        if tag in "AC":
            ts, pid, _tid, fd = (int(x) for x in data[2:].split())
            return [Accept(ts, pid, fd) if tag == "A" else Close(ts, pid, fd)]
        if tag == "D":
            return self._piece(data)
        if tag == "W":
            tid, wire = (int(x) for x in data[2:].split())
            self._wire[tid] = wire
            return []
        if tag == "G":
            ts, pid, _tid, fd, direction, _seg, total = (int(x) for x in data[2:].split())
            return [Segment(ts, pid, fd, direction == 0, total, b"")]
        return []

    def _piece(self, data: str) -> list[Event | Lost]:
        fields = data[2:].split(" ", 8)
        ts, pid, tid, fd, direction, seg, total, k = (int(x) for x in fields[:8])
        body = unescape(fields[8][:-1] if fields[8].endswith("\n") else fields[8])
        key = (ts, tid, seg)
        pend = self._pending.get(key)
        if pend is None:
            wire = self._wire.pop(tid, 0) if direction == 0 and seg == 0 else 0
            want = -(-min(total, self.capture_bytes) // PIECE)
            pend = _Pending(Segment(ts, pid, fd, direction == 0, total, b"", wire), {}, want)
        pend.pieces[k] = body
        return self._complete(key, pend)

    def _complete(self, key: tuple[int, int, int], pend: _Pending) -> list[Event | Lost]:
        if len(pend.pieces) < pend.want:
            self._pending[key] = pend
            return []
        self._pending.pop(key, None)
        data = b"".join(pend.pieces[k] for k in range(pend.want))
        h = pend.head
        return [Segment(h.ts_ns, h.pid, h.fd, h.inbound, h.total, data, h.wire_ns)]

    def flush(self) -> list[Event | Lost]:
        """At the end: segments whose later pieces never came (lost) keep the prefix that did."""
        out: list[Event | Lost] = []
        for pend in self._pending.values():
            h, data = pend.head, b""
            for k in range(pend.want):
                if k not in pend.pieces:
                    break
                data += pend.pieces[k]
            out.append(Segment(h.ts_ns, h.pid, h.fd, h.inbound, h.total, data, h.wire_ns))
        self._pending.clear()
        return out
