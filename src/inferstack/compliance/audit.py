"""Append-only, hash-chained audit log written by one background thread.

The gateway calls `await log.append(record)` once per request. The event loop never touches the disk:
records go into a bounded queue and a writer thread hashes, writes, fsyncs, rotates and prunes. When the
queue is full, `append` waits (off the loop) instead of dropping a record: an audit log that silently
loses entries is worse than a slower request.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from inferstack.compliance.chain import (
    ACTIVE_NAME,
    GENESIS,
    seal,
    segment_name,
    segments,
)
from inferstack.compliance.config import AuditConfig

_STOP = object()


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
    """Tamper-evident JSONL audit log. Use as a context manager, or call `close()` on shutdown."""

    def __init__(self, config: AuditConfig, *, clock: Any = time.time) -> None:
        self.config = config
        self.directory = Path(config.directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._key = hmac_key(config)
        self._clock = clock
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=config.queue_size)
        self._closed = False
        self._error: BaseException | None = None
        self._seq, self._prev = self._recover()
        self._file = (self.directory / ACTIVE_NAME).open("ab")
        self._day = self._utc_day(self._clock())
        self._prune()
        self._thread = threading.Thread(target=self._run, name="inferstack-audit-writer", daemon=True)
        self._thread.start()

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
            raise TimeoutError("audit log writer did not flush in time")
        self._raise_if_failed()

    def close(self, timeout: float = 30.0) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(_STOP)
        self._thread.join(timeout)
        self._file.close()
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
            while True:
                item = self._queue.get()
                batch = [item]
                while len(batch) < 1024:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                stop = self._write_batch(batch)
                if stop:
                    return
        except BaseException as e:  # surfaced to producers on their next call
            self._error = e

    def _write_batch(self, batch: list[Any]) -> bool:
        lines: list[bytes] = []
        waiters: list[threading.Event] = []
        stop = False
        for item in batch:
            if item is _STOP:
                stop = True
            elif isinstance(item, threading.Event):
                waiters.append(item)
            else:
                body = item.body(self.config.log_prompts) if isinstance(item, AuditRecord) else item
                lines.append(self._seal_next(body))
        if lines:
            self._file.write(b"".join(lines))
            self._file.flush()
            if self.config.fsync:
                os.fsync(self._file.fileno())
            self._maybe_rotate()
        for w in waiters:
            w.set()
        return stop

    def _seal_next(self, body: dict[str, Any]) -> bytes:
        body = {**body, "seq": self._seq, "prev": self._prev}
        line = seal(body, self._key)
        self._prev = json.loads(line)["hash"]
        self._seq += 1
        return line

    def _maybe_rotate(self) -> None:
        now = self._clock()
        day = self._utc_day(now)
        too_big = self._file.tell() >= self.config.rotate_bytes
        new_day = self.config.rotate_daily and day != self._day
        if not (too_big or new_day) or self._file.tell() == 0:
            return
        self._file.close()
        active = self.directory / ACTIVE_NAME
        first_seq = _first_seq(active)
        os.replace(active, self.directory / segment_name(first_seq))
        _fsync_dir(self.directory)
        self._file = active.open("ab")
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
        line = self._seal_next({"type": "retention", "time": utc_now(), "retention_days": self.config.retention_days,
                                "pruned": pruned})
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        for p in expired:
            p.unlink()

    def _recover(self) -> tuple[int, str]:
        """Continue the chain from the last complete line; cut a torn final line left by a crash."""
        files = segments(self.directory)
        if not files:
            return 0, GENESIS
        active = self.directory / ACTIVE_NAME
        torn = _cut_torn_tail(active) if active.exists() else 0
        for path in reversed(files):
            anchor = _last_line_anchor(path)
            if anchor:
                seq, prev = anchor["last_seq"] + 1, anchor["last_hash"]
                break
        else:
            seq, prev = 0, GENESIS
        if torn:
            line = seal({"type": "recovery", "time": utc_now(), "torn_bytes_removed": torn, "seq": seq,
                         "prev": prev}, self._key)
            with active.open("ab") as f:
                f.write(line)
                f.flush()
                os.fsync(f.fileno())
            seq, prev = seq + 1, json.loads(line)["hash"]
        return seq, prev

    @staticmethod
    def _utc_day(ts: float) -> str:
        return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d")


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["AuditConfig", "AuditLog", "AuditLogClosed", "AuditRecord"]
