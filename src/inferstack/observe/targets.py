"""What to watch: listening TCP sockets from /proc/net/tcp{,6}, the processes holding them (their
/proc/PID/fd links), and the connections they already have open."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LISTEN, ESTABLISHED = "0A", "01"


class TargetError(RuntimeError):
    pass


@dataclass(frozen=True)
class TcpSocket:
    inode: int
    local_port: int
    state: str


@dataclass(frozen=True)
class Target:
    pids: tuple[int, ...]
    ports: tuple[int, ...]                     # listening ports being watched
    listen: tuple[tuple[int, int], ...]        # (pid, fd)
    seeds: tuple[tuple[int, int], ...]         # (pid, fd) of connections open at start

    @property
    def label(self) -> str:
        return f"pid {','.join(map(str, self.pids))} port {','.join(map(str, self.ports))}"


def tcp_sockets(proc: Path = Path("/proc")) -> dict[int, TcpSocket]:
    """inode → socket, from /proc/net/tcp and tcp6 (`local_address` is HEXIP:HEXPORT, `st` the state)."""
    out: dict[int, TcpSocket] = {}
    for name in ("tcp", "tcp6"):
        path = proc / "net" / name
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            f = line.split()
            if len(f) < 10:
                continue
            inode = int(f[9])
            if inode:
                out[inode] = TcpSocket(inode, int(f[1].rsplit(":", 1)[1], 16), f[3])
    return out


def socket_fds(pid: int, proc: Path = Path("/proc")) -> dict[int, int]:
    """fd → socket inode for one process (fds that are not sockets are skipped)."""
    out: dict[int, int] = {}
    fd_dir = proc / str(pid) / "fd"
    try:
        entries = list(fd_dir.iterdir())
    except (FileNotFoundError, PermissionError, ProcessLookupError):
        return out
    for entry in entries:
        try:
            link = os.readlink(entry)
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(entry.name)] = int(link[8:-1])
    return out


def _pids(proc: Path) -> list[int]:
    return [int(p.name) for p in proc.iterdir() if p.name.isdigit()]


def resolve(pid: int | None, port: int | None, proc: Path = Path("/proc")) -> Target:
    """--pid: every TCP port that process listens on. --port: every process holding that listening
    socket (pre-forked workers share it)."""
    socks = tcp_sockets(proc)
    if pid is not None:
        if not (proc / str(pid)).exists():
            raise TargetError(f"no process with pid {pid}")
        candidates = [pid]
    else:
        candidates = _pids(proc)
    listen: list[tuple[int, int]] = []
    seeds: list[tuple[int, int]] = []
    ports: set[int] = set()
    holders: set[int] = set()
    by_pid = {p: socket_fds(p, proc) for p in candidates}
    for p, fds in by_pid.items():
        for fd, inode in fds.items():
            s = socks.get(inode)
            if s is None or s.state != LISTEN or (port is not None and s.local_port != port):
                continue
            listen.append((p, fd))
            ports.add(s.local_port)
            holders.add(p)
    if not listen:
        where = f"process {pid}" if pid is not None else "any process"
        raise TargetError(f"{where} has no listening TCP socket{f' on port {port}' if port else ''} "
                          "(observe watches servers: connections they accept)")
    for p in holders:
        for fd, inode in by_pid[p].items():
            s = socks.get(inode)
            if s is not None and s.state == ESTABLISHED and s.local_port in ports:
                seeds.append((p, fd))
    return Target(tuple(sorted(holders)), tuple(sorted(ports)), tuple(sorted(listen)), tuple(sorted(seeds)))
