"""`inferstack` with a PD request's phases timestamped, for `pd_timeline.py` (not for serving).

Wraps the decode engine's scheduler and connector methods (no engine code changes) and appends one JSON line per
event to ``$PD_TIMELINE_FILE``: ``[event, perf_counter seconds, thread, detail...]``. Events: ``add`` (the request
reaches the scheduler: its arrival), ``pull1`` (the connector's fetch done: params checked, on the engine thread
for a direct READ, or an offer asked for), ``accept`` (blocks allocated, READ handed to the reader), ``read0/1``
(the READ and its claim), ``landed`` (a layer in), ``sched`` (a step scheduled: the forward pass starts; with the
engine thread's CPU and run-queue seconds so far, from schedstat), ``fwd_end`` (the forward pass ended: schedstat
again), ``finish0/1`` (a streamed request's forward pass ended; its READs' ends and claims waited for: schedstat
at ``finish0``), ``fwd_end`` (before the step's tokens are sampled: schedstat), ``upd1`` (the step's tokens out:
the first token of a request).
"""

from __future__ import annotations

import functools
import json
import os
import runpy
import threading
import time

from inferstack.engine import scheduler as scheduler_module
from inferstack.engine.connector import blocks, nixl_transport, pd_connector

_out = open(os.environ["PD_TIMELINE_FILE"], "a", buffering=1)  # noqa: SIM115 (the engine's lifetime)
_lock = threading.Lock()


def event(name: str, *detail: object) -> None:
    line = json.dumps([name, time.perf_counter(), threading.current_thread().name, *detail])
    with _lock:
        _out.write(line + "\n")


def schedstat() -> list[float]:
    with open("/proc/thread-self/schedstat") as f:
        cpu_ns, queued_ns, _ = f.read().split()
    return [int(cpu_ns) / 1e9, int(queued_ns) / 1e9]


def timed(cls: type, method: str, tag: str, before: bool = True, after: bool = True, rid=None,
          stamp: bool = False) -> None:
    original = getattr(cls, method)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if before:
            event(tag + "0", rid(args) if rid else (schedstat() if stamp else None))
        try:
            return original(*args, **kwargs)
        finally:
            if after:
                event(tag + "1")

    setattr(cls, method, wrapper)


def install() -> None:
    timed(scheduler_module.Scheduler, "add_request", "add", after=False, rid=lambda a: a[1].request_id)
    timed(pd_connector.PDConnector, "_fetched", "pull", before=False)    # params checked (inline or fetched)
    timed(blocks.Stager, "accept", "accept", after=False)
    timed(nixl_transport.NixlKVTransport, "read", "read")
    timed(scheduler_module.Scheduler, "update_from_output", "upd", before=False)
    timed(blocks.LayerLoads, "finish", "finish", stamp=True)
    landed = blocks.LayerProgress.landed

    def on_landed(self, layer: int) -> None:
        event("landed", layer)
        landed(self, layer)

    blocks.LayerProgress.landed = on_landed
    schedule = scheduler_module.Scheduler.schedule

    def on_schedule(self):
        out = schedule(self)
        if not out.is_empty:
            event("sched", schedstat())
        return out

    scheduler_module.Scheduler.schedule = on_schedule
    update = scheduler_module.Scheduler.update_from_output

    def on_update(self, *args):                # after the forward pass (and a streamed READ's finish)
        event("fwd_end", schedstat())
        return update(self, *args)

    scheduler_module.Scheduler.update_from_output = on_update


if __name__ == "__main__":
    install()
    runpy.run_module("inferstack", run_name="__main__", alter_sys=True)
