"""Can this machine run `observe`? Each missing piece gets one precise sentence and its fix."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39


class PreflightError(RuntimeError):
    pass


def _effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def privileged() -> bool:
    caps = _effective_caps()
    has = lambda bit: bool(caps >> bit & 1)  # noqa: E731 - a two-use local predicate
    return os.geteuid() == 0 or has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON))


def bpftrace_path() -> str:
    path = shutil.which("bpftrace")
    if path is None:
        raise PreflightError("bpftrace is not installed: `apt-get install bpftrace` (scripts/setup.sh installs "
                             "it on Debian/Ubuntu)")
    return path


def ensure_tracefs() -> None:
    """Syscall tracepoints live in tracefs; mount it if the machine has not (needs root)."""
    if (TRACEFS / "events" / "syscalls").is_dir():
        return
    res = subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], capture_output=True, text=True)
    if res.returncode != 0 or not (TRACEFS / "events" / "syscalls").is_dir():
        raise PreflightError(f"syscall tracepoints are not available: {TRACEFS}/events/syscalls is missing and "
                             f"mounting tracefs failed ({res.stderr.strip() or 'no syscall events'}); the kernel "
                             "needs CONFIG_FTRACE_SYSCALLS")


def wire_time_available() -> bool:
    """tcp:tcp_probe and sock:sock_recv_length (Linux 6.x) date a request by its first packet."""
    events = TRACEFS / "events"
    return (events / "tcp" / "tcp_probe").is_dir() and (events / "sock" / "sock_recv_length").is_dir()


def check() -> str:
    """Raise PreflightError with the first problem; return the bpftrace path when all is well."""
    if not privileged():
        raise PreflightError("observe needs root (or CAP_BPF + CAP_PERFMON) to load eBPF programs: run it "
                             "with sudo")
    path = bpftrace_path()
    ensure_tracefs()
    return path


def unavailable_reason() -> str | None:
    """For tests: why eBPF observation cannot run here, or None."""
    try:
        check()
    except PreflightError as e:
        return str(e)
    return None
