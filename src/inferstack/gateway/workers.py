"""`gateway.workers` > 1: several gateway processes serving one port (docs/gateway.md, "Workers").

One Python process spends most of a request in its event loop and socket system calls, so on a
machine with spare cores the gateway's throughput grows with processes, as a multi-threaded router's
grows with threads. This process (the supervisor) reserves the port, makes what the workers share
(the RPM/TPM buckets, when no Redis holds them) and forks the workers. Each worker binds the port
with SO_REUSEPORT (the kernel spreads connections over them), runs the whole pipeline on its share
of every endpoint's cap (`workershare.py`) and serves its own metrics on a Unix socket, from which
any worker answers a /metrics scrape for the whole gateway (`metricsmerge.py`).

Start-up contract: the ready file (pid = the supervisor) is written once every worker serves.
SIGTERM/SIGINT to the supervisor drains every worker; a worker that exits on its own stops the whole
gateway (status 1), so a supervisor above us (systemd, Kubernetes) restarts it with fresh shares.
Workers die with the supervisor (PR_SET_PDEATHSIG), even when it is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from inferstack.config.schema import InferstackConfig
from inferstack.fileio import atomic_write, write_ready_file
from inferstack.gateway.limits import Limiter, SharedMemoryLimiter

log = logging.getLogger("inferstack.gateway.workers")

_PR_SET_PDEATHSIG = 1
START_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 35.0  # uvicorn's graceful shutdown (30 s) plus the pipeline's close


def run_workers(cfg: InferstackConfig, ready_file: Path | None) -> int:
    """Fork ``cfg.gateway.workers`` workers, write the ready file, supervise; the exit status."""
    from inferstack.gateway.serve import bind_socket

    n, host = cfg.gateway.workers, cfg.gateway.host
    reserve = bind_socket(host, cfg.gateway.port, reuse_port=True)  # never listens: holds the port for port 0
    port = reserve.getsockname()[1]
    rundir = Path(tempfile.mkdtemp(prefix="inferstack-gateway-"))
    sockets = [rundir / f"worker-{i}.sock" for i in range(n)]
    limiter = None if cfg.gateway.redis_url else SharedMemoryLimiter(cfg.tenants)
    pids: dict[int, int] = {}
    stopping = False

    def stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        _signal_all(pids, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for i in range(n):
            pids[_fork_worker(cfg, i, port, sockets, limiter, reserve)] = i
        ready = _wait_ready(pids, rundir, n, lambda: stopping)
        failed_start = not ready and not stopping
        if not ready:
            stopping = True
            _signal_all(pids, signal.SIGTERM)
        else:
            h = f"[{host}]" if ":" in host else host
            write_ready_file(ready_file, {"urls": [f"http://{h}:{port}"], "pid": os.getpid(),
                                          "workers": [{"index": i, "pid": p, "metrics_socket": str(sockets[i])}
                                                      for p, i in sorted(pids.items(), key=lambda kv: kv[1])]})
        reserve.close()
        status = _supervise(pids, lambda: stopping)
        return 1 if failed_start else status
    finally:
        _signal_all(pids, signal.SIGKILL)  # only workers still alive here: after an error in this process
        shutil.rmtree(rundir, ignore_errors=True)


def _fork_worker(cfg: InferstackConfig, index: int, port: int, sockets: list[Path], limiter: Limiter | None,
                 reserve: socket.socket) -> int:
    parent = os.getpid()
    stops = {signal.SIGTERM, signal.SIGINT}
    # blocked across the fork: the child must not run the supervisor's handler before it resets them
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    pid = os.fork()
    if pid:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        return pid
    status = 1
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)
        reserve.close()
        _serve_worker(cfg, index, port, sockets, limiter)
        status = 0
    except BaseException:
        log.exception("gateway worker %d failed", index)
    finally:
        os._exit(status)  # never return into the supervisor's code in the child


def _serve_worker(cfg: InferstackConfig, index: int, port: int, sockets: list[Path], limiter: Limiter | None) -> None:
    from inferstack.gateway.metricsmerge import WorkerPeers
    from inferstack.gateway.serve import bind_socket, make_tracer_provider, run_server
    from inferstack.gateway.server import Gateway
    from inferstack.gateway.workershare import worker_config

    mine = worker_config(cfg, index)
    tcp = bind_socket(mine.gateway.host, port, reuse_port=True)
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind(str(sockets[index]))
    tracer = make_tracer_provider(mine)
    app = Gateway(mine, tracer_provider=tracer, limiter=limiter, peers=WorkerPeers(index, sockets))
    ready = sockets[index].with_suffix(".ready")
    # a file only: stdout's one ready line is the supervisor's, once all workers serve
    run_server(app, [tcp, unix], lambda: atomic_write(ready, f"{os.getpid()}\n"))
    if tracer is not None:
        tracer.shutdown()  # the worker leaves by os._exit, which skips the provider's own atexit flush


def _wait_ready(pids: dict[int, int], rundir: Path, n: int, stopping: Callable[[], bool]) -> bool:
    """True once every worker wrote its ready file; False when one exited first, a stop was asked
    for or time ran out."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and not stopping():
        if sum(1 for _ in rundir.glob("worker-*.ready")) == n:
            return True
        done, status = os.waitpid(-1, os.WNOHANG)
        if done:
            log.error("gateway worker %d exited during start-up (status %d)", pids.pop(done),
                      os.waitstatus_to_exitcode(status))
            return False
        time.sleep(0.05)
    if not stopping():
        log.error("gateway workers not ready after %.0f s", START_TIMEOUT_S)
    return False


def _supervise(pids: dict[int, int], stopping: Callable[[], bool]) -> int:
    """Wait for the workers; one exiting unasked stops the rest. 0 after a requested stop, else 1."""
    failed = False
    deadline: float | None = None
    while pids:
        if stopping() or failed:
            deadline = deadline or time.monotonic() + DRAIN_TIMEOUT_S
            if time.monotonic() > deadline:
                log.error("gateway workers still running after %.0f s: killing them", DRAIN_TIMEOUT_S)
                _signal_all(pids, signal.SIGKILL)
        done, status = os.waitpid(-1, os.WNOHANG)
        if not done:
            time.sleep(0.1)
            continue
        index = pids.pop(done)
        if not stopping() and not failed:
            log.error("gateway worker %d exited (status %d): stopping the gateway", index,
                      os.waitstatus_to_exitcode(status))
            failed = True
            _signal_all(pids, signal.SIGTERM)
    return 1 if failed else 0


def _signal_all(pids: dict[int, int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
