"""HTTP/1.1 message framing for one direction of a connection, from syscall segments whose tails may be
missing: each segment is a known prefix plus `total - len(prefix)` unseen bytes (a gap).

Framing survives gaps inside bodies (Content-Length and chunk sizes say how much to skip); a gap where
framing bytes were (a head or a chunk-size line) loses sync, and the stream resynchronises at the next
segment that starts like a message or a chunk-size line. Pipelined and keep-alive messages follow one
another in the same stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Protocol

_REQUEST_START = re.compile(rb"(GET|POST|PUT|DELETE|HEAD|OPTIONS|PATCH) \S+ HTTP/1\.[01]\r\n")
_RESPONSE_START = re.compile(rb"HTTP/1\.[01] \d{3}")
_CHUNK_LINE = re.compile(rb"[0-9a-fA-F]{1,8}(;[^\r\n]*)?\r\n")
MAX_HEAD = 32 * 1024


@dataclass(frozen=True)
class Head:
    start_line: str
    headers: dict[str, str]          # lower-case names
    ts_ns: int                       # when the message's first byte arrived (wire time when known)
    read_ns: int = 0                 # when the syscall that moved it returned

    @property
    def status(self) -> int:
        """Status code of a response head."""
        return int(self.start_line.split(" ", 2)[1])


class Sink(Protocol):
    def head(self, head: Head) -> None: ...
    def body(self, ts_ns: int, data: bytes | None, size: int) -> None: ...   # data None: `size` unseen bytes
    def end(self, ts_ns: int) -> None: ...
    def lost(self, ts_ns: int, reason: str) -> None: ...
    def tls(self) -> None: ...


class _S(Enum):
    IDLE = auto()
    HEAD = auto()
    LENGTH = auto()
    CHUNK_SIZE = auto()
    CHUNK_DATA = auto()
    CHUNK_CRLF = auto()
    TRAILER = auto()
    UNTIL_CLOSE = auto()
    DESYNC = auto()          # lost between messages: wait for a segment starting a message
    DESYNC_CHUNKED = auto()  # lost inside a chunked body: also resume at a chunk-size line
    TLS = auto()


def parse_head(raw: bytes, ts_ns: int, read_ns: int = 0) -> Head:
    lines = raw.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return Head(lines[0], headers, ts_ns, read_ns or ts_ns)


class MessageStream:
    """Feed segments of one direction; the sink hears heads, body bytes (or gaps), ends and losses."""

    def __init__(self, sink: Sink, requests: bool, synced: bool = True) -> None:
        self.sink, self.requests = sink, requests
        self.state = _S.IDLE if synced else _S.DESYNC
        self._buf = b""
        self._left = 0
        self._start_ns = 0
        self._read_ns = 0
        self._wire_ns = 0
        self.desyncs = 0

    def feed(self, ts_ns: int, data: bytes, total: int, wire_ns: int = 0) -> None:
        """`wire_ns`: when this segment's first byte reached the socket, if known (inbound only)."""
        if self.state is _S.TLS:
            return
        self._wire_ns = wire_ns if 0 < wire_ns <= ts_ns else 0
        if data and self.state in (_S.DESYNC, _S.DESYNC_CHUNKED, _S.IDLE):
            self._maybe_resync(ts_ns, data)
        pos = 0
        while pos < len(data) and self.state not in (_S.DESYNC, _S.DESYNC_CHUNKED, _S.TLS):
            pos = self._step(ts_ns, data, pos)
        if total > len(data):
            self._gap(ts_ns, total - len(data))

    def close(self, ts_ns: int) -> None:
        if self.state is _S.UNTIL_CLOSE:
            self.sink.end(ts_ns)
        elif self.state not in (_S.IDLE, _S.DESYNC, _S.TLS):
            self.sink.lost(ts_ns, "connection closed mid-message")
        self.state = _S.IDLE

    # --- internals -------------------------------------------------------------------------------

    def _maybe_resync(self, ts_ns: int, data: bytes) -> None:
        if self.state is _S.IDLE:
            if self.requests and data[:1] == b"\x16" and data[1:2] == b"\x03":
                self.state = _S.TLS           # a TLS handshake record: encrypted from here on
                self.sink.tls()
            return
        start = _REQUEST_START if self.requests else _RESPONSE_START
        if start.match(data):
            if self.state is _S.DESYNC_CHUNKED:
                self.sink.lost(ts_ns, "framing lost in a chunked body")
            self.state = _S.IDLE
        elif self.state is _S.DESYNC_CHUNKED and _CHUNK_LINE.match(data):
            self.state = _S.CHUNK_SIZE

    def _desync(self, ts_ns: int, in_chunked: bool, reason: str) -> None:
        self.desyncs += 1
        self._buf = b""
        if in_chunked:
            self.state = _S.DESYNC_CHUNKED
        else:
            if self.state not in (_S.IDLE, _S.DESYNC):
                self.sink.lost(ts_ns, reason)
            self.state = _S.DESYNC

    def _gap(self, ts_ns: int, n: int) -> None:
        while n > 0:
            s = self.state
            if s in (_S.LENGTH, _S.CHUNK_DATA, _S.CHUNK_CRLF):
                take = min(n, self._left)
                if s is not _S.CHUNK_CRLF:
                    self.sink.body(ts_ns, None, take)
                self._left -= take
                n -= take
                if self._left == 0:
                    self._after_part(ts_ns)
            elif s is _S.UNTIL_CLOSE:
                self.sink.body(ts_ns, None, n)
                return
            elif s in (_S.DESYNC, _S.DESYNC_CHUNKED, _S.TLS):
                return
            else:       # framing bytes (a head, a chunk-size line, a trailer) are in the unseen part
                self._desync(ts_ns, s in (_S.CHUNK_SIZE, _S.TRAILER), "framing bytes beyond the capture")
                return

    def _after_part(self, ts_ns: int) -> None:
        """A length-delimited part is complete."""
        if self.state is _S.LENGTH:
            self.state = _S.IDLE
            self.sink.end(ts_ns)
        elif self.state is _S.CHUNK_DATA:
            self.state, self._left = _S.CHUNK_CRLF, 2
        else:
            self.state = _S.CHUNK_SIZE

    def _step(self, ts_ns: int, data: bytes, pos: int) -> int:
        s = self.state
        if s is _S.IDLE:
            # a message at the start of a read arrived with its first packet; one behind another in
            # the same read (pipelining) is dated by the read
            self.state, self._buf, self._read_ns = _S.HEAD, b"", ts_ns
            self._start_ns = self._wire_ns if pos == 0 and self._wire_ns else ts_ns
            return pos
        if s is _S.HEAD:
            return self._head(ts_ns, data, pos)
        if s in (_S.LENGTH, _S.CHUNK_DATA, _S.CHUNK_CRLF):
            take = min(len(data) - pos, self._left)
            if s is not _S.CHUNK_CRLF:
                self.sink.body(ts_ns, data[pos:pos + take], take)
            self._left -= take
            if self._left == 0:
                self._after_part(ts_ns)
            return pos + take
        if s is _S.UNTIL_CLOSE:
            self.sink.body(ts_ns, data[pos:], len(data) - pos)
            return len(data)
        if s is _S.CHUNK_SIZE:
            return self._chunk_size(ts_ns, data, pos)
        return self._trailer(ts_ns, data, pos)

    def _head(self, ts_ns: int, data: bytes, pos: int) -> int:
        before = len(self._buf)
        self._buf += data[pos:]
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > MAX_HEAD:
                self._desync(ts_ns, False, "header block too large")
            return len(data)
        if not self.requests and not _RESPONSE_START.match(self._buf):
            # bytes met in IDLE that are not a status line (the rest of a message whose start was
            # lost with dropped perf records): not a response head
            self._desync(ts_ns, False, "not a status line")
            return len(data)
        head = parse_head(self._buf[:end], self._start_ns, self._read_ns)
        self._buf = b""
        self._begin_body(ts_ns, head)
        return pos + (end + 4 - before)

    def _begin_body(self, ts_ns: int, head: Head) -> None:
        h = head.headers
        self.sink.head(head)
        no_body = not self.requests and (head.status < 200 or head.status in (204, 304))
        if no_body:
            self.state = _S.IDLE
            if head.status >= 200:
                self.sink.end(ts_ns)
        elif "chunked" in h.get("transfer-encoding", "").lower():
            self.state = _S.CHUNK_SIZE
        elif h.get("content-length", "").isdigit() and int(h["content-length"]) > 0:
            self.state, self._left = _S.LENGTH, int(h["content-length"])
        elif self.requests or "content-length" in h:
            self.state = _S.IDLE
            self.sink.end(ts_ns)
        else:
            self.state = _S.UNTIL_CLOSE

    def _chunk_size(self, ts_ns: int, data: bytes, pos: int) -> int:
        before = len(self._buf)
        self._buf += data[pos:]
        end = self._buf.find(b"\r\n")
        if end < 0:
            if len(self._buf) > 1024:
                self._desync(ts_ns, True, "bad chunk-size line")
            return len(data)
        line = self._buf[:end].split(b";", 1)[0].strip()
        self._buf = b""
        try:
            size = int(line, 16)
        except ValueError:
            self._desync(ts_ns, True, "bad chunk-size line")
            return len(data)
        if size == 0:
            self.state = _S.TRAILER
        else:
            self.state, self._left = _S.CHUNK_DATA, size
        return pos + (end + 2 - before)

    def _trailer(self, ts_ns: int, data: bytes, pos: int) -> int:
        before = len(self._buf)
        self._buf += data[pos:]
        end = 0 if self._buf.startswith(b"\r\n") else self._buf.find(b"\r\n\r\n")
        if end < 0:
            return len(data)
        consumed = end + (2 if end == 0 else 4)
        self._buf = b""
        self.state = _S.IDLE
        self.sink.end(ts_ns)
        return pos + (consumed - before)
