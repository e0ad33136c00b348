"""The bpftrace program: syscall tracepoints only (no kprobes), filtered in the kernel to the target's
accepted TCP connections, printing a bounded prefix of every byte-moving syscall.

Output lines (one bpftrace printf each, so one perf-buffer record each):

    A ts pid tid fd                          a connection accepted on a watched listening socket
    C ts pid tid fd                          the target closed a watched connection
    D ts pid tid fd dir seg total k <bytes>  a syscall moved `total` bytes of iovec `seg` (dir 0 in, 1 out);
                                             <bytes> is piece k of their captured prefix
    G ts pid tid fd dir seg total            `total` bytes moved by iovecs after the first MAX_IOV, unseen
    R / E                                    attached (BEGIN) / every record before this one was read (END)
    W tid wire                               the next inbound D of `tid` read bytes whose first packet reached
                                             the socket at `wire` (tcp:tcp_probe), before the server read them

Wire time: tcp:tcp_probe (every received segment, filtered to the watched local ports) stamps the first
unread arrival per socket; sock:sock_recv_length, inside the read syscall, says which socket the read
drains, and the read's exit probe hands the stamp over. A busy server reads late; the difference is the
time a request waited in the socket.

bpftrace 0.17 keeps strings on the 512-byte BPF stack, so one `buf()` holds at most PIECE bytes; a
longer prefix goes out as several printf records that carry (ts, tid, seg, k) to be put back together.
One exit probe per syscall, with loops, keeps the probe count (and bpftrace's start and detach time,
one RCU grace period per probe) small.
"""

from __future__ import annotations

from dataclasses import dataclass

PIECE = 160                  # bytes per buf(): with the loop's printf this is what fits the BPF stack
MAX_IOV = 32                 # iovecs captured per readv/writev/recvmsg/sendmsg (hyper writes 3 per chunk);
                             # the bytes of later iovecs are reported as unseen (a G record)


@dataclass(frozen=True)
class ProgramSpec:
    pids: tuple[int, ...]
    listen: tuple[tuple[int, int], ...]      # (pid, fd) of watched listening sockets
    ports: tuple[int, ...]                   # their local ports (for the wire-time probe)
    seeds: tuple[tuple[int, int], ...]       # (pid, fd) of connections already open at start
    capture_bytes: int = 6 * PIECE           # prefix captured per syscall (and per iovec)
    wire_time: bool = True                   # the kernel has tcp:tcp_probe and sock:sock_recv_length

    def __post_init__(self) -> None:
        if not self.pids or not self.ports:
            raise ValueError("no process or port to observe")
        if self.capture_bytes < PIECE or self.capture_bytes % PIECE:
            raise ValueError(f"capture_bytes must be a positive multiple of {PIECE}, got {self.capture_bytes}")


def _pid_pred(spec: ProgramSpec) -> str:
    return "(" + " || ".join(f"pid == {p}" for p in spec.pids) + ")"


def _capture(spec: ProgramSpec, ptr: str, n: str, direction: int, seg: str) -> str:
    """Print the first min(n, capture_bytes) bytes at user address `ptr` as PIECE-sized D records.
    A loop keeps a single printf site, whose buffer is the one thing the 512-byte BPF stack holds."""
    return f"""$n = (uint64){n}; $p = (uint64){ptr}; $off = (uint64)0;
    while ($off < $n && $off < {spec.capture_bytes}) {{
      $k = $n - $off; if ($k > {PIECE}) {{ $k = {PIECE}; }}
      printf("D %llu %d %d %d {direction} %d %lld %d %r\\n", $t, pid, tid, $fd, {seg}, $n, $off / {PIECE},
             buf($p + $off, $k));
      $off = $off + {PIECE};
    }}"""


# the read's W record goes out before its D records (same probe, same CPU)
_WIRE = ("$s = @rsk[tid]; if ($s != 0) { $w = @wire[$s]; if ($w != 0) { printf(\"W %d %llu\\n\", tid, $w); "
         "delete(@wire[$s]); } delete(@rsk[tid]); }")


def _vector_exit(spec: ProgramSpec, call: str, direction: int) -> str:
    """Walk the first MAX_IOV iovecs, attributing the syscall's return value to them in order; bytes of
    later iovecs are reported as unseen (G). The enter probe always writes @vv[tid] (0: unwatched fd)."""
    return f"""
tracepoint:syscalls:sys_exit_{call} /{_pid_pred(spec)} && @vv[tid] != 0/ {{
  {_WIRE if direction == 0 and spec.wire_time else ""}
  $t = nsecs; $fd = @vf[tid]; $left = (uint64)0; if (args->ret > 0) {{ $left = (uint64)args->ret; }}
  $cnt = (uint64)@vn[tid]; $i = (uint64)0;
  while ($i < {MAX_IOV} && $i < $cnt && $left > 0) {{
    $iov = uptr((struct iovec *)(@vv[tid] + $i * 16));
    $len = (uint64)$iov->iov_len; if ($len > $left) {{ $len = $left; }}
    {_capture(spec, "$iov->iov_base", "$len", direction, "$i")}
    $left = $left - $len; $i = $i + 1;
  }}
  if ($left > 0) {{ printf("G %llu %d %d %d {direction} {MAX_IOV} %lld\\n", $t, pid, tid, $fd, $left); }}
  @vv[tid] = 0;
}}"""


def _wire_probes(spec: ProgramSpec) -> str:
    ports = " || ".join(f"args->sport == {p}" for p in spec.ports)
    return f"""tracepoint:tcp:tcp_probe /({ports}) && args->data_len > 0/ {{
  if (@wire[(uint64)args->skaddr] == 0) {{ @wire[(uint64)args->skaddr] = nsecs; }} }}
tracepoint:sock:sock_recv_length /{_pid_pred(spec)} && args->ret > 0/ {{ @rsk[tid] = (uint64)args->sk; }}"""


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
  {_WIRE if direction == 0 and spec.wire_time else ""}
  if (args->ret > 0) {{ $t = nsecs; $fd = @fd[tid];
    {_capture(spec, "@fb[tid]", "args->ret", direction, "0")}
  }}
  delete(@fb[tid]); delete(@fd[tid]);
}}""")
    for call, direction in (("readv", 0), ("writev", 1)):
        flat.append(f"""
tracepoint:syscalls:sys_enter_{call} /{pp}/ {{
  @vv[tid] = @c[{key}] ? (uint64)args->vec : 0; @vn[tid] = args->vlen; @vf[tid] = args->fd; }}""")
        flat.append(_vector_exit(spec, call, direction))
    for call, direction in (("recvmsg", 0), ("sendmsg", 1)):
        flat.append(f"""
tracepoint:syscalls:sys_enter_{call} /{pp}/ {{
  @vv[tid] = @c[{key}] ? (uint64)args->msg->msg_iov : 0; @vn[tid] = args->msg->msg_iovlen; @vf[tid] = args->fd; }}""")
        flat.append(_vector_exit(spec, call, direction))
    end_clears = ("clear(@c); clear(@l); clear(@fb); clear(@fd); clear(@vv); clear(@vn); clear(@vf); clear(@af);"
                  + (" clear(@wire); clear(@rsk);" if spec.wire_time else ""))
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
{_wire_probes(spec) if spec.wire_time else ""}
tracepoint:syscalls:sys_enter_close /{pp} && @c[{key}]/ {{
  printf("C %llu %d %d %d\\n", nsecs, pid, tid, args->fd); delete(@c[{key}]); }}
{"".join(flat)}
END {{ printf("E\\n"); {end_clears} }}
"""
