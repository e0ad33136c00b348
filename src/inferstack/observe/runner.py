"""Run bpftrace against a target and turn its output into finished requests, on a reader thread."""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from inferstack.observe.events import Decoder, Lost
from inferstack.observe.exchange import ObservedRequest
from inferstack.observe.preflight import wire_time_available
from inferstack.observe.program import PIECE, ProgramSpec, render
from inferstack.observe.targets import Target
from inferstack.observe.tracker import Counters, Reorder, Tracker


class ObserveError(RuntimeError):
    pass


@dataclass(frozen=True)
class CaptureOptions:
    capture_bytes: int = 6 * PIECE    # prefix captured per syscall: head, SSE framing and usage, not prompts
    buffer_pages: int = 256           # perf buffer per CPU, in 4 KiB pages (bpftrace's default is 64)
    reorder_ms: float = 100.0         # hold events this long to put CPUs' buffers back in time order
    nice: int = 0                     # >0: bpftrace and the decoding thread yield the CPU to the observed
                                      # server (on a saturated host they then fall behind and records drop)
    capture_bodies: bool = False      # keep request bodies (prompts) of observed requests
    start_timeout_s: float = 60.0


class Observer:
    def __init__(self, bpftrace: str, target: Target, opts: CaptureOptions,
                 on_request: Callable[[ObservedRequest], None],
                 on_tls: Callable[[int, int], None] | None = None) -> None:
        self.bpftrace, self.target, self.opts = bpftrace, target, opts
        self.decoder = Decoder(opts.capture_bytes)
        self.tracker = Tracker(on_request, capture_bodies=opts.capture_bodies, on_tls=on_tls)
        self.reorder = Reorder(int(opts.reorder_ms * 1e6))
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._stderr: deque[str] = deque(maxlen=50)
        self._lock = threading.Lock()
        self.started_ns = 0
        self.cpu_s = 0.0                   # bpftrace's CPU time while attached (after start-up)
        self._cpu0 = 0.0
        self._last_line = 0.0
        self._reader_tid = 0
        self.decoder_cpu_s = 0.0           # CPU of the decoding thread (this process) while attached
        self.bpf_prog_stats: tuple[int, int] | None = None      # (run_time_ns, run_cnt) over all programs

    def counters(self) -> tuple[Counters, int]:
        with self._lock:
            return self.tracker.counters, self.tracker.desyncs

    def start(self) -> None:
        spec = ProgramSpec(self.target.pids, self.target.listen, self.target.ports, self.target.seeds,
                           self.opts.capture_bytes, wire_time=wire_time_available())
        script = Path(tempfile.mkstemp(prefix="inferstack-observe-", suffix=".bt")[1])
        script.write_text(render(spec))
        env = dict(os.environ, BPFTRACE_STRLEN=str(PIECE), BPFTRACE_PERF_RB_PAGES=str(self.opts.buffer_pages),
                   BPFTRACE_MAP_KEYS_MAX="65536")
        nice = self.opts.nice
        self.proc = subprocess.Popen([self.bpftrace, "-f", "json", str(script)], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env,
                                     preexec_fn=(lambda: os.nice(nice)) if nice > 0 else None)
        threading.Thread(target=self._drain_stderr, daemon=True).start()
        self._reader = threading.Thread(target=self._read, name="observe-reader", daemon=True)
        self._reader.start()
        threading.Thread(target=self._tick, name="observe-reorder", daemon=True).start()
        deadline = time.monotonic() + self.opts.start_timeout_s
        while not self.decoder.ready:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise ObserveError("bpftrace did not start: " + self.stderr_tail())
            time.sleep(0.05)
        script.unlink(missing_ok=True)
        self.started_ns = time.monotonic_ns()
        self._cpu0 = self._cpu_s()            # compiling and attaching is not per-event cost

    def stderr_tail(self) -> str:
        lines = [ln for ln in self._stderr if "RLIMIT_MEMLOCK" not in ln and "Addrspace mismatch" not in ln
                 and not ln.lstrip().startswith(("~", "tracepoint:", "if (", "$v"))]
        return " | ".join(lines[-6:]) or "no message"

    def _drain_stderr(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.decode(errors="replace").rstrip())

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        # Linux priorities are per thread: only this decoding thread is lowered
        self._reader_tid = threading.get_native_id()
        if self.opts.nice > 0:
            os.setpriority(os.PRIO_PROCESS, self._reader_tid, self.opts.nice)
        for raw in self.proc.stdout:
            self._last_line = time.monotonic()
            for ev in self.decoder.line(raw):
                with self._lock:
                    if isinstance(ev, Lost):
                        self.tracker.handle(ev)
                    else:
                        for ordered in self.reorder.push(ev):
                            self.tracker.handle(ordered)

    def _cpu_s(self, stat: str | None = None) -> float:
        """utime + stime of a process (bpftrace by default) or of a /proc stat path."""
        assert self.proc is not None
        try:
            fields = Path(stat or f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def _tick(self) -> None:
        """Release held events by the clock, so the last request of a burst is not held back; only while
        the reader is caught up (idle), else a lagging CPU buffer could still hold older records."""
        assert self.proc is not None
        half = self.opts.reorder_ms / 2e3
        while self.proc.poll() is None and not self.decoder.ended:
            time.sleep(half)
            if time.monotonic() - self._last_line < half:
                continue
            with self._lock:
                for ev in self.reorder.release(time.monotonic_ns()):
                    self.tracker.handle(ev)

    def _sample_costs(self) -> None:
        """bpftrace's CPU time, and the kernel-side cost of its programs when bpf_stats_enabled is on."""
        assert self.proc is not None
        pid = self.proc.pid
        self.cpu_s = max(0.0, self._cpu_s() - self._cpu0)
        if self._reader_tid:
            self.decoder_cpu_s = self._cpu_s(f"/proc/self/task/{self._reader_tid}/stat")
        run_ns = run_cnt = 0
        for fdinfo in Path(f"/proc/{pid}/fdinfo").glob("*"):
            try:
                text = fdinfo.read_text()
            except OSError:
                continue
            if "prog_type" not in text:
                continue
            for line in text.splitlines():
                if line.startswith("run_time_ns:"):
                    run_ns += int(line.split()[1])
                elif line.startswith("run_cnt:"):
                    run_cnt += int(line.split()[1])
        self.bpf_prog_stats = (run_ns, run_cnt) if run_cnt else None

    def stop(self) -> None:
        """Detach: on SIGINT bpftrace drains its buffers and runs END (our "E" record); it then detaches
        its probes, one RCU grace period each, which on a loaded machine takes long, so that part is
        left to a reaper thread. Then read what is left and end what is still open."""
        if self.proc is None:
            return
        proc = self.proc
        if proc.poll() is None:
            self._sample_costs()
            proc.send_signal(signal.SIGINT)
            deadline = time.monotonic() + 30
            while not self.decoder.ended and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self.decoder.ended and proc.poll() is None:
                proc.kill()
            threading.Thread(target=proc.wait, name="observe-reaper", daemon=True).start()
        if proc.poll() is not None and self._reader is not None:
            self._reader.join(15)
        with self._lock:
            for ev in self.decoder.flush():
                for ordered in self.reorder.push(ev):
                    self.tracker.handle(ordered)
            for ev in self.reorder.drain():
                self.tracker.handle(ev)
            self.tracker.finish()
