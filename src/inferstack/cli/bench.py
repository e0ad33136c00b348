"""`inferstack bench`: load-test any OpenAI-compatible server and report TTFT, TPOT, ITL, E2E, goodput."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from inferstack.bench.runner import RunConfig

app = typer.Typer(help="Benchmark an OpenAI-compatible server (engine, gateway, vLLM, SGLang, ...).",
                  no_args_is_help=True)

_WORKLOAD_HELP = (
    "What to send, as KIND[:key=value,...]. Kinds: "
    "synthetic (input, output: an integer or uniform(a,b) | normal(mean,sd) | lognormal(median,sigma) | "
    "exponential(mean)); long-context (input, output); shared-prefix (groups, users, system, question, output, "
    "popularity: uniform or zipf(S)); "
    "multi-turn (turns, system, input, output, think seconds); agentic (fanout, context, input, output, aggregate "
    "0|1); trace (path, format auto|jsonl|csv|azure|mooncake, time_scale, limit) or just a .jsonl/.csv path. "
    "Example: synthetic:input=512,output=128"
)


# Options shared with `inferstack sim run` (same names, meanings and defaults; the simulator's seconds
# are virtual).
WorkloadOpt = Annotated[str, typer.Option(help=_WORKLOAD_HELP)]
OutOpt = Annotated[Path, typer.Option(help="Directory for results.json, requests.csv, report.md and plots")]
DurationOpt = Annotated[float, typer.Option(help="Seconds of sending per run (a trace defaults to its span)")]
RateOpt = Annotated[float | None, typer.Option(help="Open loop: units (requests, sessions or agent tasks) per "
                                                "second")]
ArrivalOpt = Annotated[str, typer.Option(help="Open-loop arrivals: poisson, constant or gamma")]
BurstinessOpt = Annotated[float, typer.Option(help="Gamma shape: 1 = Poisson, <1 burstier, >1 smoother")]
SloOpt = Annotated[str | None, typer.Option(help="Report attainment and goodput against these SLOs, e.g. "
                                             "ttft=200ms,tpot=50ms[,itl=..,e2e=..][,attainment=0.95]")]
WarmupOpt = Annotated[float, typer.Option(help="Seconds at the start excluded from statistics")]
CooldownOpt = Annotated[float, typer.Option(help="Seconds at the end excluded from statistics")]
SeedOpt = Annotated[int, typer.Option(help="Seed of prompts, lengths and arrivals")]
ProgressOpt = Annotated[bool, typer.Option(help="Show a progress bar")]
PlotsOpt = Annotated[bool, typer.Option(help="Write PNG plots")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


def _check_modes(rate: float | None, concurrency: int | None, sweep: bool, goodput: str | None, endpoint: str,
                 stream: bool, slo: str | None) -> None:
    """Exit 2 on flags that contradict each other: two load modes, an unknown endpoint, latency SLOs unstreamed."""
    modes = [m for m, on in (("--rate", rate is not None and goodput is None), ("--concurrency", concurrency),
                             ("--sweep", sweep), ("--goodput", goodput)) if on]
    if len(modes) > 1:
        _fail(f"choose one of --rate, --concurrency, --sweep, --goodput (got {' and '.join(modes)}); "
              "--rate with --goodput sets the search's starting rate")
    if endpoint not in ("chat", "completions"):
        _fail(f"--endpoint must be chat or completions, got {endpoint!r}")
    if not stream and (goodput or slo) and any(k in (goodput or slo or "") for k in ("ttft", "tpot", "itl")):
        _fail("TTFT/TPOT/ITL SLOs need streamed responses; drop --no-stream")


def _log(msg: str) -> None:
    typer.echo(msg, err=True)


def _single_run(cfg: RunConfig, out: Path, plots: bool) -> None:
    """One run at the configured load: reports to `out`, the Markdown one printed; exit 1 if nothing succeeded."""
    from inferstack.bench.report import write_run
    from inferstack.bench.runner import run_sync

    res = run_sync(cfg)
    write_run(res, out, plots=plots)
    typer.echo((out / "report.md").read_text())
    failed = res.summary["requests"]["failed"]  # type: ignore[index]
    if failed and failed == res.summary["requests"]["sent"]:  # type: ignore[index]
        typer.secho(f"every request failed ({res.summary['requests']['by_status']}); "  # type: ignore[index]
                    f"see {out}/report.md", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@app.command("run")
def run(
    target: Annotated[list[str], typer.Option(help="Server base URL, e.g. http://127.0.0.1:8000 "
                                              "(repeat to spread units round-robin over several; "
                                              "a session stays on one)")],
    workload: WorkloadOpt,
    out: OutOpt,
    duration: DurationOpt = 0.0,
    rate: RateOpt = None,
    arrival: ArrivalOpt = "poisson",
    burstiness: BurstinessOpt = 1.0,
    concurrency: Annotated[int | None, typer.Option(help="Closed loop: keep this many units in flight")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="Open loop: cap on requests in flight")] = None,
    sweep: Annotated[bool, typer.Option("--sweep", help="Find saturation throughput, then run rates up to it")] = False,
    sweep_points: Annotated[int, typer.Option(help="Rates in a sweep")] = 5,
    sweep_concurrency: Annotated[int, typer.Option(help="Concurrency of the saturation run of a sweep")] = 64,
    goodput: Annotated[str | None, typer.Option(help="Search the highest rate meeting these SLOs, e.g. "
                                                "ttft=200ms,tpot=50ms[,itl=..,e2e=..][,attainment=0.95]")] = None,
    goodput_max_runs: Annotated[int, typer.Option(help="Most runs a goodput search makes")] = 12,
    slo: SloOpt = None,
    warmup: WarmupOpt = 0.0,
    cooldown: CooldownOpt = 0.0,
    seed: SeedOpt = 0,
    model: Annotated[str | None, typer.Option(help="Model name to request (default: the first of /v1/models)")] = None,
    endpoint: Annotated[str, typer.Option(help="chat (/v1/chat/completions) "
                                               "or completions (/v1/completions)")] = "chat",
    stream: Annotated[bool, typer.Option(help="Stream responses (needed for TTFT and ITL)")] = True,
    ignore_eos: Annotated[bool, typer.Option(help="Ask for exactly max_tokens output (vLLM's ignore_eos)")] = True,
    request_timeout: Annotated[float, typer.Option(help="Seconds before a request counts as timed out")] = 600.0,
    stall_timeout: Annotated[float, typer.Option(help="Seconds without a byte before a request counts as "
                                                 "stalled")] = 120.0,
    drain_timeout: Annotated[float, typer.Option(help="Seconds to wait for in-flight requests after sending "
                                                 "stops; the rest are reported as cancelled")] = 60.0,
    scrape_interval: Annotated[float, typer.Option(help="Seconds between /metrics scrapes of each target")] = 1.0,
    api_key: Annotated[str | None, typer.Option(envvar="INFERSTACK_API_KEY", help="Bearer token")] = None,
    progress: ProgressOpt = True,
    plots: PlotsOpt = True,
) -> None:
    """Run a benchmark and write reports to --out (JSON, CSV, Markdown, PNG).

    Example: inferstack bench run --target http://127.0.0.1:8000 --workload synthetic:input=512,output=128
    --rate 4 --duration 60 --slo ttft=500ms,tpot=50ms --out runs/rate-4

    TTFT, TPOT, ITL, E2E and their names in other tools: docs/benchmarking.md.
    """
    from inferstack.bench.client import BenchError, ClientOptions, probe_target
    from inferstack.bench.modes import goodput_search
    from inferstack.bench.modes import sweep as run_sweep
    from inferstack.bench.runner import LoadSpec, RunConfig
    from inferstack.bench.slo import SLOError, parse_slo
    from inferstack.bench.traces import TraceError
    from inferstack.bench.workloads import WorkloadError, parse_workload

    _check_modes(rate, concurrency, sweep, goodput, endpoint, stream, slo)
    try:
        wl = parse_workload(workload)
        slo_spec = parse_slo(goodput or slo) if (goodput or slo) else None
        if duration <= 0:
            if not wl.finite or rate is not None or concurrency or sweep or goodput:
                _fail("--duration must be > 0 seconds")
            duration = float(wl.extra.get("trace_span_s", 0.0)) + 1e-3  # type: ignore[arg-type]
        if warmup + cooldown >= duration:
            _fail(f"warm-up ({warmup} s) + cool-down ({cooldown} s) leave nothing of the {duration} s run")
        models = [asyncio.run(probe_target(t, api_key)) for t in target]
        model_name = model or (models[0][0] if models[0] else None)
        if not model_name:
            _fail(f"{target[0]} lists no model; pass --model")
        load = LoadSpec(rate=rate, arrival=arrival, burstiness=burstiness, concurrency=concurrency,
                        max_concurrency=max_concurrency)
        if rate is not None:
            from inferstack.bench.arrivals import ARRIVALS
            if arrival not in ARRIVALS:
                _fail(f"--arrival must be one of {', '.join(ARRIVALS)}")
            if rate <= 0:
                _fail("--rate must be > 0")
        cfg = RunConfig(targets=list(target), model=str(model_name), workload=wl, load=load, duration_s=duration,
                        warmup_s=warmup, cooldown_s=cooldown, seed=seed, slo=slo_spec,
                        client=ClientOptions(endpoint=endpoint, stream=stream, ignore_eos=ignore_eos,
                                             request_timeout_s=request_timeout, stall_timeout_s=stall_timeout,
                                             api_key=api_key),
                        scrape_interval_s=scrape_interval, drain_timeout_s=drain_timeout, progress=progress)
        if sweep:
            run_sweep(cfg, out, sweep_points, sweep_concurrency, _log, plots)
            typer.echo((out / "sweep.md").read_text())
        elif goodput:
            best, _ = goodput_search(cfg, out, rate or 1.0, _log, max_runs=goodput_max_runs, plots=plots)
            typer.echo((out / "goodput.md").read_text())
            if best is None:
                typer.secho(f"no rate met the SLO ({slo_spec}); see {out}/goodput.md", err=True,
                            fg=typer.colors.YELLOW)
                raise typer.Exit(1)
        else:
            _single_run(cfg, out, plots)
    except (BenchError, WorkloadError, TraceError, SLOError) as e:
        _fail(str(e))


@app.command("compare")
def compare_cmd(
    dirs: Annotated[list[Path], typer.Argument(help="Run directories written by `inferstack bench run`")],
    out: Annotated[Path | None, typer.Option(help="Also write the table to this Markdown file")] = None,
) -> None:
    """Put runs side by side (throughput, latency percentiles, SLO attainment, hit rate)."""
    from inferstack.bench.compare import CompareError, compare

    try:
        table = compare(dirs)
    except CompareError as e:
        _fail(str(e))
        return
    typer.echo(table)
    if out:
        out.write_text(table)
