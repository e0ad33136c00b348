"""One `inferstack observe` session: preflight, attach, serve metrics, stop on time or signal, write the
report. Kept apart from the CLI so the benchmark and the tests drive the same code."""

from __future__ import annotations

import getpass
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from inferstack.bench.runner import RunResult
from inferstack.observe import preflight
from inferstack.observe.exchange import ObservedRequest
from inferstack.observe.metrics import ObserveMetrics
from inferstack.observe.report import CaptureStats, build_result, write
from inferstack.observe.runner import CaptureOptions, Observer
from inferstack.observe.serve import MetricsServer
from inferstack.observe.targets import Target, resolve


@dataclass
class SessionResult:
    result: RunResult
    stats: CaptureStats
    requests: list[ObservedRequest]
    tls_warnings: list[str] = field(default_factory=list)


class Session:
    def __init__(self, pid: int | None, port: int | None, opts: CaptureOptions,
                 metrics_port: int | None = None, log=print) -> None:   # type: ignore[no-untyped-def]
        self.bpftrace = preflight.check()
        self.target: Target = resolve(pid, port)
        self.opts, self.log = opts, log
        self.requests: list[ObservedRequest] = []
        self.tls_warnings: list[str] = []
        self.observer = Observer(self.bpftrace, self.target, opts, self._done, on_tls=self._tls)
        self.metrics = ObserveMetrics(f"pid={','.join(map(str, self.target.pids))}", self.observer.counters)
        self.metrics_port = metrics_port
        self.metrics_server: MetricsServer | None = None
        self._stopped = threading.Event()

    def _done(self, req: ObservedRequest) -> None:
        self.requests.append(req)
        if req.openai:
            self.metrics.observe(req)

    def _tls(self, pid: int, fd: int) -> None:
        msg = (f"pid {pid} fd {fd}: the client started a TLS handshake; observe decodes plain HTTP only "
               "(TLS through uprobes on the TLS library is future work, docs/observe.md)")
        self.tls_warnings.append(msg)
        if len(self.tls_warnings) == 1:
            self.log(f"warning: {msg}")

    def start(self) -> None:
        if self.metrics_port is not None:
            self.metrics_server = MetricsServer(self.metrics.registry, self.metrics_port,
                                                f"inferstack observe (eBPF) · {self.target.label}")
            self.metrics_server.start()
            self.metrics_port = self.metrics_server.port
        self.observer.start()

    def wait(self, duration_s: float | None) -> None:
        """Until `duration_s` passes, stop() is called, or bpftrace exits."""
        deadline = None if duration_s is None else time.monotonic() + duration_s
        proc = self.observer.proc
        while not self._stopped.is_set() and (deadline is None or time.monotonic() < deadline):
            if proc is not None and proc.poll() is not None:
                self.log(f"warning: bpftrace exited: {self.observer.stderr_tail()}")
                return
            self._stopped.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))

    def stop(self) -> None:
        self._stopped.set()

    def finish(self) -> SessionResult:
        self.observer.stop()
        if self.metrics_server is not None:
            self.metrics_server.stop()
        obs = self.observer
        c, desyncs = obs.counters()
        duration = (time.monotonic_ns() - obs.started_ns) / 1e9
        run_ns, run_cnt = obs.bpf_prog_stats or (None, None)
        stats = CaptureStats(duration, c.segments, c.bytes_moved, c.bytes_captured, c.lost_events, desyncs,
                             c.connections, c.tls_connections, obs.cpu_s, obs.decoder_cpu_s, run_ns, run_cnt,
                             other_requests=sum(not r.openai for r in self.requests),
                             uncertain_events=sum(r.uncertain_events for r in self.requests))
        res = build_result(self.requests, obs.started_ns, duration, self.target.label, stats)
        return SessionResult(res, stats, self.requests, self.tls_warnings)


def audit_capture_bodies(directory: Path, target: Target) -> None:
    """--capture-bodies keeps prompts: say so in the tamper-evident audit log (docs/compliance.md)."""
    from inferstack.compliance.audit import AuditLog
    from inferstack.compliance.config import AuditConfig

    with AuditLog(AuditConfig(directory=directory)) as log:
        log.event("observe_capture_bodies", target=target.label, operator=getpass.getuser())


def save(res: SessionResult, out: Path, plots: bool, capture_bodies: bool) -> None:
    write(res.result, res.stats, out, plots)
    if capture_bodies:
        import orjson
        with (out / "bodies.jsonl").open("wb") as f:
            for r in res.requests:
                if r.openai and r.request_body is not None:
                    f.write(orjson.dumps({"arrival_ns": r.arrival_ns, "path": r.path,
                                          "request_body": r.request_body.decode("utf-8", "replace")}) + b"\n")
