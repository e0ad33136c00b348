"""An observed run in the `inferstack bench` format: the same RequestRecord rows, summary and report, so
`inferstack bench compare` puts it beside a client-measured run (docs/observe.md)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from inferstack.bench.metrics import summarize
from inferstack.bench.records import OK, RequestRecord
from inferstack.bench.report import write_run
from inferstack.bench.runner import RunResult
from inferstack.observe.exchange import ObservedRequest

END_OF_RUN = "still running when observation ended"


def status_of(req: ObservedRequest) -> tuple[str, str]:
    """The bench client's status vocabulary (inferstack.bench.records)."""
    if req.error == END_OF_RUN:
        return "cancelled", req.error
    if req.error.startswith("connection closed"):
        return "connection", req.error
    if req.error == "error event in the stream":
        return "stream_error", req.error
    if req.error:
        return "bad_response", req.error
    if not 200 <= req.status_code < 300:
        return f"http_{req.status_code}", ""
    if req.streamed and not req.chunk_ns:
        return "bad_response", "the stream ended without any content"
    return OK, ""


def to_record(index: int, req: ObservedRequest, clock0_ns: int, target: str) -> RequestRecord:
    def t(ns: int) -> float:
        return (ns - clock0_ns) / 1e9

    status, error = status_of(req)
    sent = t(req.arrival_ns)
    return RequestRecord(index=index, unit=index, stage=0, scheduled=sent, sent=sent, end=t(req.end_ns),
                         status=status, error=error, prompt_tokens=req.prompt_tokens,
                         cached_tokens=req.cached_tokens, output_tokens=req.output_tokens,
                         chunk_times=[t(c) for c in req.chunk_ns], streamed=req.streamed, target=target)


@dataclass
class CaptureStats:
    duration_s: float
    segments: int
    bytes_moved: int
    bytes_captured: int
    lost_events: int
    desyncs: int
    connections: int
    tls_connections: int
    bpftrace_cpu_s: float
    decoder_cpu_s: float
    bpf_run_time_ns: int | None
    bpf_run_count: int | None
    other_requests: int              # non-OpenAI requests seen (health checks, /metrics, ...)
    uncertain_events: int

    def as_dict(self) -> dict[str, object]:
        d: dict[str, object] = dict(self.__dict__)
        d["bpftrace_cpu_us_per_segment"] = (self.bpftrace_cpu_s * 1e6 / self.segments) if self.segments else None
        d["decoder_cpu_us_per_segment"] = (self.decoder_cpu_s * 1e6 / self.segments) if self.segments else None
        d["kernel_ns_per_probe"] = (self.bpf_run_time_ns / self.bpf_run_count) if self.bpf_run_count else None
        return d


def build_result(reqs: list[ObservedRequest], clock0_ns: int, duration_s: float, target: str,
                 stats: CaptureStats) -> RunResult:
    openai = sorted((r for r in reqs if r.openai), key=lambda r: r.arrival_ns)
    records = [to_record(i, r, clock0_ns, target) for i, r in enumerate(openai)]
    models = Counter(r.model for r in openai if r.model)
    config: dict[str, object] = {
        "targets": [target], "model": models.most_common(1)[0][0] if models else "unknown",
        "workload": "observed traffic (eBPF)", "workload_kind": "observed", "workload_params": {},
        "load": {"label": "observed (not driven)"}, "duration_s": round(duration_s, 3), "warmup_s": 0.0,
        "cooldown_s": 0.0, "seed": None, "slo": None, "source": "ebpf", "observe": stats.as_dict(),
    }
    # rates over the busy span (first arrival to last response), comparable with a bench run's window
    start = records[0].sent if records else 0.0
    summary = summarize(records, (start, max((r.end for r in records), default=duration_s)))
    server = {"available": False, "errors": ["observed with eBPF: the server's /metrics was not scraped"]}
    return RunResult(config, records, summary, server, [], duration_s)


def capture_markdown(stats: CaptureStats) -> str:
    d = stats.as_dict()
    per_seg = d["bpftrace_cpu_us_per_segment"]
    dec_seg = d["decoder_cpu_us_per_segment"]
    per_probe = d["kernel_ns_per_probe"]
    return "\n".join([
        "", "## eBPF capture", "",
        f"- syscall segments: {stats.segments} · bytes moved {stats.bytes_moved} · captured "
        f"{stats.bytes_captured} ({stats.bytes_captured / max(1, stats.bytes_moved):.1%})",
        f"- lost perf records: {stats.lost_events} · framing resyncs: {stats.desyncs} · events classified "
        f"from a truncated prefix: {stats.uncertain_events}",
        f"- connections: {stats.connections} ({stats.tls_connections} TLS, not decoded) · other requests "
        f"(not OpenAI completions): {stats.other_requests}",
        f"- bpftrace CPU: {stats.bpftrace_cpu_s:.2f} s"
        + (f" ({per_seg:.1f} µs per segment)" if isinstance(per_seg, float) else "")
        + f" · decoder CPU: {stats.decoder_cpu_s:.2f} s"
        + (f" ({dec_seg:.1f} µs per segment)" if isinstance(dec_seg, float) else ""),
        "- kernel time in the probes: " + (f"{per_probe:.0f} ns per probe run over {stats.bpf_run_count} runs"
                                            if isinstance(per_probe, float) else
                                            "not measured (sysctl kernel.bpf_stats_enabled=0)"), ""])


def write(res: RunResult, stats: CaptureStats, out: Path, plots: bool) -> None:
    write_run(res, out, title="Observed run (eBPF)", plots=plots)
    with (out / "report.md").open("a") as f:
        f.write(capture_markdown(stats))
