"""`inferstack observe`: TTFT, ITL and token counts of any OpenAI-compatible server, from eBPF."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def observe(
    pid: Annotated[int | None, typer.Option(help="Process to watch (every TCP port it listens on)")] = None,
    port: Annotated[int | None, typer.Option(help="Listening port to watch (every process holding it)")] = None,
    out: Annotated[Path | None, typer.Option(help="Directory for results.json, requests.csv and report.md "
                                             "(the `inferstack bench` format)")] = None,
    duration: Annotated[float | None, typer.Option(help="Seconds to observe (default: until Ctrl-C)")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Serve Prometheus metrics (the gateway's names with "
                                                     "source=\"ebpf\") at /metrics and a live dashboard at "
                                                     "/dashboard/ on 127.0.0.1:PORT; 0 picks one")] = None,
    capture_bytes: Annotated[int, typer.Option(help="Bytes captured per syscall, a multiple of 160: enough "
                                               "for HTTP heads, SSE framing and usage chunks")] = 960,
    capture_bodies: Annotated[bool, typer.Option(help="Keep request bodies (prompts) in OUT/bodies.jsonl; "
                                                 "noted in the audit log")] = False,
    audit_dir: Annotated[Path, typer.Option(help="Audit log directory (written with --capture-bodies)")] =
    Path("audit"),
    buffer_pages: Annotated[int, typer.Option(help="Perf buffer per CPU in 4 KiB pages; raise it if the "
                                              "report shows lost records")] = 256,
    nice: Annotated[int, typer.Option(help="Scheduling niceness of bpftrace and the decoder (0-19): higher "
                                      "yields the CPU to the observed server, but on a saturated host "
                                      "records can drop (see the report's lost count)")] = 0,
    plots: Annotated[bool, typer.Option(help="Write PNG plots")] = True,
) -> None:
    """Watch a running server's TCP traffic with eBPF and report per-request TTFT, ITL, E2E and tokens,
    without changing the server. Plain HTTP/1.1 only; needs root and bpftrace. See docs/observe.md.

    Example: sudo inferstack observe --port 8000 --duration 60 --metrics-port 9464 --out runs/observed
    """
    from inferstack.observe.preflight import PreflightError
    from inferstack.observe.program import PIECE
    from inferstack.observe.runner import CaptureOptions, ObserveError
    from inferstack.observe.session import Session, audit_capture_bodies, save
    from inferstack.observe.targets import TargetError

    if (pid is None) == (port is None):
        _fail("give exactly one of --pid PID or --port PORT")
    if capture_bytes < PIECE or capture_bytes % PIECE:
        _fail(f"--capture-bytes must be a positive multiple of {PIECE} (the bytes one bpftrace buf() holds here)")
    if not 0 <= nice <= 19:
        _fail("--nice must be between 0 and 19")
    opts = CaptureOptions(capture_bytes=capture_bytes, buffer_pages=buffer_pages, capture_bodies=capture_bodies,
                          nice=nice)
    try:
        session = Session(pid, port, opts, metrics_port, log=lambda m: typer.echo(m, err=True))
        if capture_bodies:
            audit_capture_bodies(audit_dir, session.target)
        typer.echo(f"attaching to {session.target.label} ...", err=True)
        session.start()
    except (PreflightError, TargetError, ObserveError) as e:
        _fail(str(e))
    if session.metrics_port is not None:
        base = f"http://127.0.0.1:{session.metrics_port}"
        typer.echo(f"metrics: {base}/metrics · live dashboard: {base}/dashboard/", err=True)
    typer.echo("observing" + (f" for {duration:g} s" if duration else " until Ctrl-C"), err=True)
    signal.signal(signal.SIGINT, lambda *_: session.stop())
    signal.signal(signal.SIGTERM, lambda *_: session.stop())
    session.wait(duration)
    res = session.finish()
    req = res.result.summary["requests"]
    ttft = res.result.summary["latency_s"]["ttft"]  # type: ignore[index]
    typer.echo(f"{req['completed']} completed, {req['failed']} failed OpenAI requests"  # type: ignore[index]
               + (f"; TTFT p50 {ttft['p50'] * 1e3:.1f} ms, p99 {ttft['p99'] * 1e3:.1f} ms" if ttft else ""))
    if res.stats.lost_events:
        typer.echo(f"warning: {res.stats.lost_events} perf records lost: raise --buffer-pages", err=True)
    if out is not None:
        save(res, out, plots, capture_bodies)
        typer.echo(f"wrote {out}/results.json and report.md")


def register(app: typer.Typer) -> None:
    app.command("observe")(observe)
