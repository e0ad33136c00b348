"""The bpftrace program: syscall tracepoints only (no kprobes), filtered in the kernel to the target's
accepted TCP connections, printing a bounded prefix of every byte-moving syscall.

Output lines (one bpftrace printf each, so one perf-buffer record each):

    A ts pid tid fd                          a connection accepted on a watched listening socket
    C ts pid tid fd                          the target closed a watched connection
    D ts pid tid fd dir seg total <bytes>    a syscall moved `total` bytes of iovec `seg` (dir 0 in, 1 out);
                                             <bytes> is the first piece of the captured prefix
    P ts tid seg k <bytes>                   piece k (k >= 1) of that prefix
    G ts pid tid fd dir seg total            `total` bytes moved by iovecs after the first MAX_IOV, unseen

bpftrace 0.17 keeps strings on the 512-byte BPF stack, so one `buf()` holds at most PIECE bytes; a
longer prefix goes out as several printf records that carry (ts, tid, seg) to be put back together.
"""

from __future__ import annotations

from dataclasses import dataclass

PIECE = 200                  # BPFTRACE_STRLEN maximum in bpftrace 0.17
MAX_IOV = 6                  # iovecs captured per readv/writev/recvmsg/sendmsg (two HTTP chunks of 3);
                             # the bytes of later iovecs are reported as unseen (a G record)


@dataclass(frozen=True)
class ProgramSpec:
    pids: tuple[int, ...]
    listen: tuple[tuple[int, int], ...]      # (pid, fd) of watched listening sockets
    seeds: tuple[tuple[int, int], ...]       # (pid, fd) of connections already open at start
    capture_bytes: int = 3 * PIECE           # prefix captured per syscall (and per iovec)

    def __post_init__(self) -> None:
        if not self.pids:
            raise ValueError("no process to observe")
        if self.capture_bytes < PIECE or self.capture_bytes % PIECE:
            raise ValueError(f"capture_bytes must be a positive multiple of {PIECE}, got {self.capture_bytes}")


def _pid_pred(spec: ProgramSpec) -> str:
    return "(" + " || ".join(f"pid == {p}" for p in spec.pids) + ")"


def _piece(ptr: str, k: int, direction: int, seg: str) -> str:
    """Print piece k of the captured prefix of the `$n` bytes at user pointer `ptr`."""
    off = k * PIECE
    size = f"$k = $n - {off}; if ($k > {PIECE}) {{ $k = {PIECE}; }}"
    if k == 0:
        return (f'{size} printf("D %llu %d %d %d {direction} %d %lld %r\\n", $t, pid, tid, $fd, {seg}, $n, '
                f"buf({ptr}, $k));")
    return (f"if ($n > {off}) {{ {size} "
            f'printf("P %llu %d %d {k} %r\\n", $t, tid, {seg}, buf((uint64){ptr} + {off}, $k)); }}')


def _capture(spec: ProgramSpec, ptr: str, n: str, direction: int, seg: str) -> str:
    """Print the first min(n, capture_bytes) bytes at user pointer `ptr` as PIECE-sized records."""
    pieces = [_piece(ptr, k, direction, seg) for k in range(spec.capture_bytes // PIECE)]
    return "\n    ".join([f"$n = (int64){n};", *pieces])


def _vector_probes(spec: ProgramSpec, call: str, direction: int) -> str:
    """One exit probe per (iovec, piece): one probe's printf buffers must fit the 512-byte BPF stack.
    The enter probe always writes @vv[tid] (0 for unwatched fds), so exit probes need no clean-up. The
    kernel runs a tracepoint's programs in attach order (script order), so the first one stamps the exit
    time that all pieces carry."""
    out = [f"""
tracepoint:syscalls:sys_exit_{call} /{_pid_pred(spec)} && @vv[tid] != 0/ {{ @vt[tid] = nsecs; }}"""]
    for i in range(MAX_IOV):
        before = " ".join(f"$left = $left - (int64)$v[{j}].iov_len;" for j in range(i))
        for k in range(spec.capture_bytes // PIECE):
            out.append(f"""
tracepoint:syscalls:sys_exit_{call} /{_pid_pred(spec)} && @vv[tid] != 0 && @vn[tid] > {i}/ {{
  $v = uptr((struct iovec *)@vv[tid]); $left = (int64)args->ret; {before}
  if ($left > 0) {{ $t = @vt[tid]; $fd = @vf[tid]; $n = (int64)$v[{i}].iov_len; if ($n > $left) {{ $n = $left; }}
    {_piece(f"$v[{i}].iov_base", k, direction, str(i))}
  }}
}}""")
    sizes = " ".join(f"$left = $left - (int64)$v[{j}].iov_len;" for j in range(MAX_IOV))
    out.append(f"""
tracepoint:syscalls:sys_exit_{call} /{_pid_pred(spec)} && @vv[tid] != 0 && @vn[tid] > {MAX_IOV}/ {{
  $v = uptr((struct iovec *)@vv[tid]); $left = (int64)args->ret; {sizes}
  if ($left > 0) {{ printf("G %llu %d %d %d {direction} {MAX_IOV} %lld\\n", @vt[tid], pid, tid, @vf[tid], $left); }}
}}""")
    return "".join(out)


def render(spec: ProgramSpec) -> str:
    pp = _pid_pred(spec)
    key = "(uint64)pid, (uint64)args->fd"
    seeds = "\n  ".join([f"@c[(uint64){p}, (uint64){f}] = 1;" for p, f in spec.seeds]
                        + [f"@l[(uint64){p}, (uint64){f}] = 1;" for p, f in spec.listen])
    flat = []
    for call, field, direction in (("read", "buf", 0), ("recvfrom", "ubuf", 0),
                                   ("write", "buf", 1), ("sendto", "buff", 1)):
        flat.append(f"""
tracepoint:syscalls:sys_enter_{call} /{pp} && @c[{key}]/ {{ @fb[tid] = (uint64)args->{field}; @fd[tid] = args->fd; }}
tracepoint:syscalls:sys_exit_{call} /{pp} && @fb[tid]/ {{
  if (args->ret > 0) {{ $t = nsecs; $fd = @fd[tid];
    {_capture(spec, "@fb[tid]", "args->ret", direction, "0")}
  }}
  delete(@fb[tid]); delete(@fd[tid]);
}}""")
    for call, direction in (("readv", 0), ("writev", 1)):
        flat.append(f"""
tracepoint:syscalls:sys_enter_{call} /{pp}/ {{
  @vv[tid] = @c[{key}] ? (uint64)args->vec : 0; @vn[tid] = args->vlen; @vf[tid] = args->fd; }}""")
        flat.append(_vector_probes(spec, call, direction))
    for call, direction in (("recvmsg", 0), ("sendmsg", 1)):
        flat.append(f"""
tracepoint:syscalls:sys_enter_{call} /{pp}/ {{
  @vv[tid] = @c[{key}] ? (uint64)args->msg->msg_iov : 0; @vn[tid] = args->msg->msg_iovlen; @vf[tid] = args->fd; }}""")
        flat.append(_vector_probes(spec, call, direction))
    return f"""BEGIN {{
  {seeds}
  printf("R\\n");
}}
tracepoint:syscalls:sys_enter_accept, tracepoint:syscalls:sys_enter_accept4 /{pp} && @l[{key}]/ {{
  @af[tid] = args->fd + 1; }}
tracepoint:syscalls:sys_exit_accept, tracepoint:syscalls:sys_exit_accept4 /{pp} && @af[tid]/ {{
  if (args->ret >= 0) {{ @c[(uint64)pid, (uint64)args->ret] = 1;
    printf("A %llu %d %d %d\\n", nsecs, pid, tid, args->ret); }}
  delete(@af[tid]);
}}
tracepoint:syscalls:sys_enter_close /{pp} && @c[{key}]/ {{
  printf("C %llu %d %d %d\\n", nsecs, pid, tid, args->fd); delete(@c[{key}]); }}
{"".join(flat)}
END {{ clear(@c); clear(@l); clear(@fb); clear(@fd); clear(@vv); clear(@vn); clear(@vf); clear(@vt); clear(@af); }}
"""
