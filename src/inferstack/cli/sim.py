"""`inferstack sim`: simulate a fleet in virtual time with the real router, flow control and engine
scheduler, and report what `inferstack bench run` would measure, plus cost and energy."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inferstack.cli.bench import (
    ArrivalOpt,
    BurstinessOpt,
    CooldownOpt,
    DurationOpt,
    OutOpt,
    PlotsOpt,
    ProgressOpt,
    RateOpt,
    SeedOpt,
    SloOpt,
    WarmupOpt,
    WorkloadOpt,
)

app = typer.Typer(help="Simulate a fleet (gateway routing, flow control, engine schedulers) in virtual time: "
                       "capacity planning and what-if questions without GPUs.", no_args_is_help=True)

FleetOpt = Annotated[list[str], typer.Option(help="HARDWARE:MODEL=N[:prefill|decode|both][@HOST] replicas, e.g. "
                                             "h100:llama-3-8b=8 (repeat for a mixed fleet of one model); @HOST: "
                                             "they share one machine's cores with every replica naming HOST, each "
                                             "step slowed while others step (the profile's colocation_slowdown) and "
                                             "the host's speed drifting (its speed_jitter, drawn from the seed and "
                                             "HOST)")]
ConfigOpt = Annotated[Path | None, typer.Option(help="inferstack.yaml: its gateway, pool (routing, "
                                                "max_concurrency, pd, precise_prefix) and routing sections apply")]
RoutingOpt = Annotated[str | None, typer.Option(help="Routing preset or profile (overrides the pool's)")]
PoolOpt = Annotated[str | None, typer.Option(help="Which pool of the config (needed when it has several)")]
PdOpt = Annotated[str, typer.Option(help="colocated, or XpYd: split the fleet into X prefill and Y decode replicas")]
TokenizerOpt = Annotated[str, typer.Option(help="words (fast: one token per word) or bundled (the emulated "
                                           "engine's tokenizer and chat template, exact token ids)")]
SeqsOpt = Annotated[int | None, typer.Option(help="Engine max_num_seqs of every replica (default: 256, or 8 "
                                              "for a `cpu` fleet: the real CPU engine's cap per torch thread)")]
BatchedOpt = Annotated[int, typer.Option(help="Engine max_num_batched_tokens of every replica")]
CrashOpt = Annotated[list[str], typer.Option(help="Crash replica I at T virtual seconds, restarting after R: "
                                             "I@T[+R] (repeatable)")]
OverheadOpt = Annotated[float, typer.Option(help="Milliseconds from routing to the engine holding a request "
                                            "(HTTP hops, parsing, tokenization; not in the step model)")]
DrainOpt = Annotated[float, typer.Option(help="Virtual seconds to let in-flight requests finish after sending "
                                         "stops; the rest are reported as cancelled")]


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command("run")
def run(
    fleet: FleetOpt,
    workload: WorkloadOpt,
    out: OutOpt,
    config: ConfigOpt = None,
    routing: RoutingOpt = None,
    pool: PoolOpt = None,
    pd: PdOpt = "colocated",
    duration: DurationOpt = 0.0,
    rate: RateOpt = None,
    arrival: ArrivalOpt = "poisson",
    burstiness: BurstinessOpt = 1.0,
    slo: SloOpt = None,
    warmup: WarmupOpt = 0.0,
    cooldown: CooldownOpt = 0.0,
    seed: SeedOpt = 0,
    tokenizer: TokenizerOpt = "words",
    max_num_seqs: SeqsOpt = None,
    max_num_batched_tokens: BatchedOpt = 2048,
    crash: CrashOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    drain_timeout: DrainOpt = 600.0,
    request_overhead_ms: OverheadOpt = 0.0,
    progress: ProgressOpt = True,
    plots: PlotsOpt = True,
) -> None:
    """Simulate one run and write bench's reports to --out, plus cost and energy.

    Example: inferstack sim run --fleet h100:llama-3-8b=8 --routing default
    --workload synthetic:input=1000,output=200 --rate 40 --duration 300 --seed 1 --out runs/sim
    """
    from inferstack.sim.runner import SimArgs, SimError, run_simulation

    args = SimArgs(fleet=list(fleet), workload=workload, config=config, routing=routing, pool=pool, pd=pd,
                   duration=duration, rate=rate, arrival=arrival, burstiness=burstiness, slo=slo, warmup=warmup,
                   cooldown=cooldown, seed=seed, tokenizer=tokenizer, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, crash=list(crash), drain_timeout=drain_timeout,
                   request_overhead_ms=request_overhead_ms)
    try:
        run_simulation(args, out, progress=progress, plots=plots)
    except SimError as e:
        _fail(str(e))
    typer.echo((out / "report.md").read_text())


@app.command("sweep")
def sweep(
    fleet: FleetOpt,
    workload: WorkloadOpt,
    out: OutOpt,
    vary: Annotated[list[str], typer.Option(help="KEY=V1,V2,...; KEY is routing, replicas, pd or rate "
                                            "(repeat: every combination runs)")] = [],  # noqa: B006
    find_min_replicas: Annotated[bool, typer.Option(
        "--find-min-replicas", help="Binary-search the fewest replicas meeting --slo (per other combination)")] = False,
    max_replicas: Annotated[int, typer.Option(help="Upper bound of --find-min-replicas")] = 1024,
    config: ConfigOpt = None,
    routing: RoutingOpt = None,
    pool: PoolOpt = None,
    pd: PdOpt = "colocated",
    duration: DurationOpt = 0.0,
    rate: RateOpt = None,
    arrival: ArrivalOpt = "poisson",
    burstiness: BurstinessOpt = 1.0,
    slo: Annotated[str | None, typer.Option(help="With --find-min-replicas: percentile SLOs, e.g. "
                                            "ttft_p95=500ms,tpot_p95=50ms; otherwise reported as `sim run --slo` "
                                            "(ttft=200ms,tpot=50ms[,attainment=0.95])")] = None,
    warmup: WarmupOpt = 0.0,
    cooldown: CooldownOpt = 0.0,
    seed: SeedOpt = 0,
    tokenizer: TokenizerOpt = "words",
    max_num_seqs: SeqsOpt = None,
    max_num_batched_tokens: BatchedOpt = 2048,
    drain_timeout: DrainOpt = 600.0,
    request_overhead_ms: OverheadOpt = 0.0,
    plots: PlotsOpt = True,
) -> None:
    """Run every combination of --vary values and put them in one table (sweep.md/.csv/.json + plots).

    Example: inferstack sim sweep --fleet h100:llama-3-8b=8 --workload synthetic:input=1000,output=200
    --rate 40 --duration 120 --vary routing=default,cache-aware,round-robin --vary replicas=4,8,16 --out runs/what-if

    With --find-min-replicas --slo ttft_p95=500ms,tpot_p95=50ms: the fewest replicas whose p95s meet the
    SLO, for each combination of the other --vary keys.
    """
    from inferstack.sim.runner import SimArgs, SimError
    from inferstack.sim.sweep import run_sweep

    base = SimArgs(fleet=list(fleet), workload=workload, config=config, routing=routing, pool=pool, pd=pd,
                   duration=duration, rate=rate, arrival=arrival, burstiness=burstiness, slo=slo, warmup=warmup,
                   cooldown=cooldown, seed=seed, tokenizer=tokenizer, max_num_seqs=max_num_seqs,
                   max_num_batched_tokens=max_num_batched_tokens, crash=[], drain_timeout=drain_timeout,
                   request_overhead_ms=request_overhead_ms)
    try:
        run_sweep(base, list(vary), out, find_min_replicas, max_replicas, plots,
                  lambda msg: typer.echo(msg, err=True))
    except SimError as e:
        _fail(str(e))
    typer.echo((out / "sweep.md").read_text())
