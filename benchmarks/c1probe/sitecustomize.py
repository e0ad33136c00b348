"""Timestamps at the points of a lone request's path through the gateway, for `gateway_c1_timeline.py --probe`.

Loaded only where that script puts this folder on the gateway's PYTHONPATH and sets ``INFERSTACK_C1_PROBE``
(a file prefix): it wraps the front's read, the request task's start, `Pipeline.start`, `Picker.pick`, the
upstream write and read and the client write, and appends ``point ns`` lines to ``PREFIX.<pid>``. The clock is
CLOCK_MONOTONIC (comparable with the client's `time.perf_counter_ns`) or, with ``INFERSTACK_C1_PROBE_CLOCK=cpu``,
the gateway thread's CPU time (robust to a busy machine; a reading costs ~1 µs of it)."""

from __future__ import annotations

import atexit
import importlib
import importlib.abc
import os
import sys
import time

_PREFIX = os.environ.get("INFERSTACK_C1_PROBE")
_FLUSH_EVERY = 3000  # the gateway is stopped with a signal: write as it goes, not only at exit


def _install(mark) -> None:
    from inferstack.gateway.pipeline import core, pick
    from inferstack.gateway.upstream import _Conn
    from inferstack.protocol.http_cycle import Cycle
    from inferstack.protocol.http_front import FrontProtocol

    def wrap_sync(cls, name, before, after=None):
        orig = getattr(cls, name)

        def wrapper(*a, **k):
            mark(before)
            r = orig(*a, **k)
            if after:
                mark(after)
            return r
        setattr(cls, name, wrapper)

    def wrap_async(cls, name, before, after):
        orig = getattr(cls, name)

        async def wrapper(*a, **k):
            if before:
                mark(before)
            r = await orig(*a, **k)
            if after:
                mark(after)
            return r
        setattr(cls, name, wrapper)

    wrap_sync(FrontProtocol, "data_received", "in")
    wrap_async(Cycle, "run", "task", None)
    wrap_async(core.Pipeline, "start", "start0", "start1")
    wrap_sync(pick.Picker, "pick", "pick0", "pick1")
    wrap_sync(_Conn, "send", "up_write")
    wrap_sync(_Conn, "data_received", "up_read")
    wrap_async(_Conn, "headers", None, "resumed")
    wrap_sync(Cycle, "_write_body", "out")


class _Hook(importlib.abc.MetaPathFinder):
    """Installs the wrappers when the gateway's server module is first imported (not in other processes)."""

    def __init__(self, mark) -> None:
        self.mark = mark

    def find_spec(self, name, path, target=None):
        if name == "inferstack.gateway.server":
            sys.meta_path.remove(self)
            _install(self.mark)
        return None


if _PREFIX:
    _events: list[tuple[str, int]] = []
    _clock = time.thread_time_ns if os.environ.get("INFERSTACK_C1_PROBE_CLOCK") == "cpu" else time.perf_counter_ns

    def _flush() -> None:
        if _events:
            with open(f"{_PREFIX}.{os.getpid()}", "a") as f:
                f.writelines(f"{k} {t}\n" for k, t in _events)
            _events.clear()

    def _mark(point: str) -> None:
        _events.append((point, _clock()))
        if point == "out" and len(_events) >= _FLUSH_EVERY:
            _flush()

    sys.meta_path.insert(0, _Hook(_mark))
    atexit.register(_flush)
