"""Kept-open control connections of the NIXL transport, one pool per prefill peer address.

A NIXL pull moves its bytes over UCX; its TCP connection carries three small messages (NIXL_PULL,
NIXL_OFFER, DONE). Opening one per transfer cost a connect and a new server thread each time (a
third of a one-block transfer, measured in docs/disaggregation.md), so a connection whose pull ended
cleanly (DONE sent) goes back here and carries the next pull to the same peer. The prefill side
closes a connection idle for its I/O timeout; a connection kept here longer than ``max_idle_s`` is
closed instead of reused, and a reused one that turns out dead is replaced by a fresh one
(`NixlKVTransport.fetch`).
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass


@dataclass
class _Idle:
    conn: socket.socket
    since: float


class ControlPool:
    def __init__(self, timeout_s: float, max_idle_s: float = 10.0, per_peer: int = 8) -> None:
        self.timeout_s = timeout_s
        self.max_idle_s = max_idle_s
        self.per_peer = per_peer
        self._idle: dict[tuple[str, int], list[_Idle]] = {}
        self._lock = threading.Lock()

    def take(self, host: str, port: int) -> tuple[socket.socket, bool]:
        """A connection to ``host:port`` and whether it was kept from an earlier pull (it may be dead)."""
        now = time.monotonic()
        stale: list[socket.socket] = []
        kept: socket.socket | None = None
        with self._lock:
            idle = self._idle.get((host, port), [])
            while idle and kept is None:
                entry = idle.pop()
                if now - entry.since <= self.max_idle_s:
                    kept = entry.conn
                else:
                    stale.append(entry.conn)
        for conn in stale:
            conn.close()
        if kept is not None:
            return kept, True
        return self.connect(host, port), False

    def connect(self, host: str, port: int) -> socket.socket:
        conn = socket.create_connection((host, port), timeout=self.timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    def give_back(self, host: str, port: int, conn: socket.socket) -> None:
        with self._lock:
            idle = self._idle.setdefault((host, port), [])
            if len(idle) < self.per_peer:
                idle.append(_Idle(conn, time.monotonic()))
                return
        conn.close()

    def idle(self, host: str, port: int) -> int:
        """Connections to ``host:port`` kept for reuse now."""
        with self._lock:
            return len(self._idle.get((host, port), []))

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for entries in idle.values():
            for entry in entries:
                with contextlib.suppress(OSError):
                    entry.conn.close()
