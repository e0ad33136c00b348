"""Append-only, hash-chained audit log written by one background thread.

The gateway calls `await log.append(record)` once per request. The event loop never touches the disk:
records go into a bounded queue and a writer thread hashes, writes, fsyncs, rotates and prunes. When the
queue is full, `append` waits (off the loop) instead of dropping a record: an audit log that silently
loses entries is worse than a slower request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from inferstack.compliance.chain import (
    ACTIVE_NAME,
    GENESIS,
    seal,
    segment_name,
    segments,
)
from inferstack.compliance.config import AuditConfig
from inferstack.fileio import fsync_dir

_STOP = object()
log = logging.getLogger("inferstack.audit")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class AuditRecord:
    """One gateway request, as the auditor sees it (EU AI Act Art. 12: enough to trace operation)."""

    status: int
    latency_ms: float
    model: str | None = None  # None: rejected before the request named a model
    tenant: str | None = None
    key_id: str | None = None
    request_id: str | None = None
    model_digest: str | None = None
    endpoint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    prompt: str | None = None
    time: str = field(default_factory=utc_now)
    type: str = "request"

    def body(self, log_prompts: bool) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if v is not None}
        prompt = data.pop("prompt", None)
        if prompt is not None:
            # The digest lets an auditor match a disputed prompt without the log holding the text.
            data["prompt_sha256"] = hashlib.sha256(prompt.encode()).hexdigest()
            if log_prompts:
                data["prompt"] = prompt
        return data


class AuditLogClosed(RuntimeError):
    pass


def hmac_key(config: AuditConfig) -> bytes | None:
    if not config.hmac_key_env:
        return None
    value = os.environ.get(config.hmac_key_env)
    if not value:
        raise ValueError(f"audit.hmac_key_env names {config.hmac_key_env}, but that environment variable is empty")
    return value.encode()


class AuditLog:
    """Tamper-evident JSONL audit log. Use as a context manager, or call `close()` on shutdown.

    Health contract for the gateway: `healthy` is False while records cannot reach the disk (disk
    full, I/O error); `admits_requests` is what admission checks (False only while unhealthy under
    `audit.on_failure: refuse`). The writer keeps the sealed records it could not write and retries
    with backoff, so the chain resumes by itself, in order, when the disk takes writes again; bytes
    of a half-written line are cut and a `recovery` record in the chain says so.
    """

    def __init__(self, config: AuditConfig, *, clock: Any = time.time,
                 registry: CollectorRegistry | None = None) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = hmac_key(config)
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._closed = False
        self._error: BaseException | None = None
        self._metrics = _WriterMetrics(registry or CollectorRegistry())
        self._pending: list[bytes] = []  # sealed, in chain order, not yet on disk
        self._waiters: list[threading.Event] = []
        self._outage: _Outage | None = None
        self._seq, self._prev, torn = self._recover()
        self._fd = _open_append(self.directory / ACTIVE_NAME)
        self._size = os.fstat(self._fd).st_size
        self._day = self._utc_day(self._clock())
        if torn:  # queued like any record: a full disk at start makes the writer unhealthy, not the caller fail
            self._pending.append(self._seal_next({"type": "recovery", "time": utc_now(),
                                                  "reason": "torn_tail_at_start", "torn_bytes_removed": torn}))
            self._drain()
        self._prune()
        self._thread = threading.Thread(target=self._run, name="inferstack-audit-writer", daemon=True)
        self._thread.start()

    # ---- health (read from any thread) ----

    @property
    def healthy(self) -> bool:
        """True while every record handed to the writer so far could be written."""
        return self._outage is None and self._error is None

    @property
    def admits_requests(self) -> bool:
        """What the gateway's admission check asks: False means answer 503 (on_failure: refuse)."""
        return self.healthy or self.config.on_failure == "serve_and_alert"

    @property
    def failure(self) -> str | None:
        """Why the writer is unhealthy (the last OS error), or None."""
        if self._error is not None:
            return f"writer stopped: {self._error}"
        outage = self._outage
        return outage.error if outage is not None else None

    # ---- producer side (any thread / the event loop) ----

    async def append(self, record: AuditRecord | dict[str, Any]) -> None:
        """Queue one record; never blocks the event loop, waits off-loop when the queue is full."""
        item = self._prepare(record)
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            await asyncio.to_thread(self._queue.put, item)

    def append_nowait(self, record: AuditRecord | dict[str, Any]) -> None:
        """Queue one record from synchronous code; blocks only while the queue is full."""
        self._queue.put(self._prepare(record))

    def event(self, type_: str, **fields: Any) -> None:
        """Record a lifecycle event (model load, verification verdict, policy change)."""
        self.append_nowait({"type": type_, "time": utc_now(), **fields})

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until everything queued so far is on disk."""
        done = threading.Event()
        self._queue.put(done)
        if not done.wait(timeout):
            raise TimeoutError(f"audit log writer did not flush in time ({self.failure or 'slow disk'})")
        self._raise_if_failed()

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        os.close(self._fd)
        self._raise_if_failed()

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def last_seq(self) -> int:
        return self._seq - 1

    def _prepare(self, record: AuditRecord | dict[str, Any]) -> AuditRecord | dict[str, Any]:
        if self._closed:
            raise AuditLogClosed("audit log is closed")
        self._raise_if_failed()
        if isinstance(record, AuditRecord):
            return record  # turned into a line (prompt hashed, text dropped) on the writer thread
        body = dict(record)
        body.setdefault("time", utc_now())
        if not self.config.log_prompts:
            body.pop("prompt", None)
        return body

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"audit log writer failed: {self._error}") from self._error

    # ---- writer thread ----

    def _run(self) -> None:
        try:
            stop, delay, give_up = False, 0.0, math.inf
            while True:
                stop = self._absorb(self._take(None if not self._pending else delay)) or stop
                if self._drain():
                    delay = 0.0
                    for w in self._waiters:
                        w.set()
                    self._waiters.clear()
                    if stop:
                        return
                    continue
                delay = min(self.config.retry_max_s, max(0.01, delay * 2))
                if stop:  # shutting down on a broken disk: keep trying a little, then say what was lost
                    give_up = min(give_up, time.monotonic() + 5 * self.config.retry_max_s)
                    if time.monotonic() >= give_up:
                        raise OSError(f"{len(self._pending)} audit records could not be written: {self.failure}")
        except BaseException as e:  # surfaced to producers on their next call
            self._error = e
            self._metrics.healthy.set(0)

    def _take(self, timeout: float | None) -> list[Any]:
        """The next batch: blocks for the first item (at most `timeout`), then takes what is queued."""
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return []
        while len(batch) < 1024:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return batch

    def _absorb(self, batch: list[Any]) -> bool:
        """Seal records into the pending list (chain order = queue order); True when told to stop."""
        stop = False
        for item in batch:
            if item is _STOP:
                stop = True
            elif isinstance(item, threading.Event):
                self._waiters.append(item)
            else:
                body = item.body(self.config.log_prompts) if isinstance(item, AuditRecord) else item
                self._pending.append(self._seal_next(body))
        self._metrics.backlog.set(len(self._pending))
        return stop

    def _drain(self) -> bool:
        """Write every pending line; False (and an outage recorded) when the OS refuses."""
        if not self._pending:
            return self._outage is None
        data = b"".join(self._pending)
        try:
            torn = self._cut_torn_bytes()
            if self._outage is not None:
                self._outage.torn_bytes += torn
            _write_all(self._fd, data)
            if self.config.fsync:
                os.fsync(self._fd)
        except OSError as e:
            self._write_failed(e)
            return False
        self._size += len(data)
        self._pending.clear()
        self._metrics.backlog.set(0)
        if self._outage is not None:
            self._recovered()
            return self._drain()
        self._maybe_rotate()
        return True

    def _cut_torn_bytes(self) -> int:
        """Bytes past the last whole line are a torn write from a failed attempt: cut them (how many)."""
        actual = os.fstat(self._fd).st_size
        if actual <= self._size:
            return 0
        os.ftruncate(self._fd, self._size)
        return actual - self._size

    def _write_failed(self, e: OSError) -> None:
        self._metrics.errors.inc()
        self._metrics.healthy.set(0)
        now = time.monotonic()
        error = f"{e.strerror or e} (errno {e.errno})"
        outage = self._outage or _Outage(started=now, wall_start=utc_now(), error=error)
        outage.error = error
        outage.failed_writes += 1
        with contextlib.suppress(OSError):
            outage.torn_bytes += self._cut_torn_bytes()  # on a full disk the partial line is usually still there
        if self._outage is None:
            # published only now: whoever sees the writer unhealthy sees the file without the torn line
            self._outage = outage
            log.error("audit log cannot write to %s: %s; %s", self.directory, error,
                      "refusing requests" if self.config.on_failure == "refuse" else "serving without records")
        if now - outage.logged >= 30.0:
            outage.logged = now
            log.error("audit log still cannot write (%d records waiting): %s", len(self._pending), outage.error)

    def _recovered(self) -> None:
        outage, self._outage = self._outage, None
        assert outage is not None
        self._metrics.healthy.set(1)
        log.warning("audit log writes again after %.1f s (%d failed writes)", time.monotonic() - outage.started,
                    outage.failed_writes)
        self._pending.append(self._seal_next({
            "type": "recovery", "time": utc_now(), "reason": "write_failed", "error": outage.error,
            "since": outage.wall_start, "failed_writes": outage.failed_writes,
            "torn_bytes_removed": outage.torn_bytes,
        }))

    def _seal_next(self, body: dict[str, Any]) -> bytes:
        body = {**body, "seq": self._seq, "prev": self._prev}
        line = seal(body, self._key)
        self._prev = json.loads(line)["hash"]
        self._seq += 1
        return line

    def _maybe_rotate(self) -> None:
        now = self._clock()
        day = self._utc_day(now)
        too_big = self._size >= self.config.rotate_bytes
        new_day = self.config.rotate_daily and day != self._day
        if not (too_big or new_day) or self._size == 0:
            return
        active = self.directory / ACTIVE_NAME
        try:
            os.replace(active, self.directory / segment_name(_first_seq(active)))
            fsync_dir(self.directory)
        except OSError as e:  # the active file keeps growing; the next write tries again
            log.error("audit log rotation failed: %s", e)
            return
        os.close(self._fd)
        self._fd = _open_append(active)
        self._size = 0
        self._day = day
        self._prune()

    def _prune(self) -> None:
        """Delete rotated segments past retention, recording each in the chain before deleting it."""
        cutoff = self._clock() - self.config.retention_days * 86400
        rotated = [p for p in segments(self.directory) if p.name != ACTIVE_NAME]
        expired: list[Path] = []
        for seg in rotated:  # oldest first; stop at the first one still inside retention
            if seg.stat().st_mtime >= cutoff:
                break
            expired.append(seg)
        if not expired:
            return
        pruned = [{"segment": p.name, **_last_line_anchor(p)} for p in expired]
        self._pending.append(self._seal_next({"type": "retention", "time": utc_now(),
                                              "retention_days": self.config.retention_days, "pruned": pruned}))
        if not self._drain():
            return  # the record is written later; the segments are deleted at a later rotation or start
        for p in expired:
            p.unlink()

    def _recover(self) -> tuple[int, str, int]:
        """Where the chain continues (next seq, last hash), after cutting a torn final line left by a
        crash; the third value is how many bytes were cut."""
        files = segments(self.directory)
        if not files:
            return 0, GENESIS, 0
        active = self.directory / ACTIVE_NAME
        torn = _cut_torn_tail(active) if active.exists() else 0
        for path in reversed(files):
            anchor = _last_line_anchor(path)
            if anchor:
                seq, prev = anchor["last_seq"] + 1, anchor["last_hash"]
                break
        else:
            seq, prev = 0, GENESIS
        return seq, prev, torn

    @staticmethod
    def _utc_day(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


@dataclass(slots=True)
class _Outage:
    """A stretch of time during which the disk refused the writer's records."""

    started: float
    wall_start: str
    error: str
    failed_writes: int = 0
    torn_bytes: int = 0
    logged: float = field(default_factory=time.monotonic)


class _WriterMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.healthy = Gauge("inferstack_audit_writer_healthy",
                             "1 while the audit writer can write its records, 0 while the disk refuses them.",
                             registry=registry)
        self.errors = Counter("inferstack_audit_write_errors", "Failed audit write attempts (each is retried).",
                              registry=registry)
        self.backlog = Gauge("inferstack_audit_backlog_records",
                             "Sealed audit records waiting for the disk.", registry=registry)
        self.healthy.set(1)


def _open_append(path: Path) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _first_seq(path: Path) -> int:
    with path.open("rb") as f:
        return int(json.loads(f.readline())["seq"])


def _last_line_anchor(path: Path) -> dict[str, Any]:
    last = b""
    with path.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        pos = max(0, size - 65536)
        while True:
            f.seek(pos)
            tail = f.read()
            lines = [ln for ln in tail.split(b"\n") if ln.strip()]
            if len(lines) >= 2 or pos == 0:
                last = lines[-1] if lines else b""
                break
            pos = max(0, pos - 65536)
    if not last:
        return {}
    rec = json.loads(last)
    return {"last_seq": int(rec["seq"]), "last_hash": str(rec["hash"])}


def _cut_torn_tail(path: Path) -> int:
    data_len = path.stat().st_size
    if data_len == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return 0
        # find the last newline; everything after it is a torn record
        pos = data_len
        chunk = 65536
        while pos > 0:
            start = max(0, pos - chunk)
            f.seek(start)
            buf = f.read(pos - start)
            idx = buf.rfind(b"\n")
            if idx >= 0:
                keep = start + idx + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        return data_len - keep


__all__ = ["AuditConfig", "AuditLog", "AuditLogClosed", "AuditRecord"]
