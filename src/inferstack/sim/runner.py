"""`inferstack sim run` from its options: validate them with `inferstack bench run`'s parsers, build
the simulation, run it with a progress bar in virtual time, write the reports."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from inferstack.bench.arrivals import ARRIVALS
from inferstack.bench.runner import LoadSpec, RunConfig, RunResult
from inferstack.bench.slo import SLOError, parse_slo
from inferstack.bench.traces import TraceError
from inferstack.bench.workloads import WorkloadError, parse_workload
from inferstack.config.loader import ConfigError
from inferstack.engine.config import EngineConfig
from inferstack.sim.fleet import SimSetupError, apply_pd, load_sim_config, parse_fleet, sim_pool
from inferstack.sim.profile import default_max_num_seqs
from inferstack.sim.prompts import TOKENIZERS, prompt_tokens
from inferstack.sim.simulation import Crash, SimSettings, Simulation

_CRASH = re.compile(r"^(?P<i>\d+)@(?P<t>[0-9.]+)(?:\+(?P<r>[0-9.]+))?$")


class SimError(ValueError):
    pass


@dataclass
class SimArgs:
    fleet: list[str]
    workload: str
    config: Path | None = None
    routing: str | None = None
    pool: str | None = None
    pd: str = "colocated"
    duration: float = 0.0
    rate: float | None = None
    arrival: str = "poisson"
    burstiness: float = 1.0
    slo: str | None = None
    warmup: float = 0.0
    cooldown: float = 0.0
    seed: int = 0
    tokenizer: str = "words"
    max_num_seqs: int | None = None    # None: the engine default of the fleet's hardware (`default_max_num_seqs`)
    max_num_batched_tokens: int = 2048
    crash: list[str] = field(default_factory=list)
    drain_timeout: float = 600.0
    pd_threshold: int | None = None
    request_overhead_ms: float = 0.0
    # measured per-request host overheads to draw from (seeded) instead of the constant: a calibration
    # of one machine (`benchmarks/sim_fidelity.py --overhead-ms calibrate-dist`)
    request_overhead_samples_ms: tuple[float, ...] = ()


def parse_crash(text: str) -> Crash:
    m = _CRASH.match(text.strip())
    if not m:
        raise SimError(f"--crash {text!r}: expected I@T[+R], e.g. 3@120+30 (replica 3 at 120 s, back 30 s later)")
    return Crash(int(m.group("i")), float(m.group("t")), float(m.group("r")) if m.group("r") else None)


def build_settings(a: SimArgs, out: Path | None) -> SimSettings:
    """Every option checked, with the error naming it (config errors name file:line)."""
    try:
        wl = parse_workload(a.workload)
        slo = parse_slo(a.slo) if a.slo else None
        if a.tokenizer not in TOKENIZERS:
            raise SimError(f"--tokenizer must be one of {', '.join(TOKENIZERS)}, got {a.tokenizer!r}")
        duration = a.duration
        if duration <= 0:
            if not wl.finite or a.rate is not None:
                raise SimError("--duration must be > 0 virtual seconds")
            duration = float(wl.extra.get("trace_span_s", 0.0)) + 1e-3  # type: ignore[arg-type]
        if a.rate is None and not wl.finite:
            raise SimError("choose a load: --rate R (only a trace replays at its own timestamps)")
        if a.rate is not None and (a.rate <= 0 or a.arrival not in ARRIVALS):
            raise SimError(f"--rate must be > 0 and --arrival one of {', '.join(ARRIVALS)}")
        if a.warmup + a.cooldown >= duration:
            raise SimError(f"warm-up ({a.warmup} s) + cool-down ({a.cooldown} s) leave nothing of the {duration} s run")
        fleets = apply_pd([parse_fleet(f) for f in a.fleet], a.pd)
        if not fleets:
            raise SimError("give at least one --fleet HARDWARE:MODEL=N")
        models = {f.profile.model.name for f in fleets}
        if len(models) > 1:
            raise SimError(f"every --fleet must serve the same model (got {', '.join(sorted(models))})")
        cfg = load_sim_config(a.config)
        pool = sim_pool(cfg, fleets, a.routing, a.pool, a.pd_threshold)
        seqs = a.max_num_seqs if a.max_num_seqs is not None else default_max_num_seqs([f.profile for f in fleets])
        engine = EngineConfig(model=fleets[0].profile.model.name, max_num_seqs=seqs,
                              max_num_batched_tokens=a.max_num_batched_tokens)
        run = RunConfig(targets=["simulated fleet"], model=fleets[0].profile.model.name, workload=wl,
                        load=LoadSpec(rate=a.rate, arrival=a.arrival, burstiness=a.burstiness),
                        duration_s=duration, warmup_s=a.warmup, cooldown_s=a.cooldown, seed=a.seed, slo=slo,
                        progress=False)
        crashes = [parse_crash(c) for c in a.crash]
        total = sum(f.replicas for f in fleets)
        for c in crashes:
            if c.replica >= total:
                raise SimError(f"--crash {c.replica}@...: the fleet has replicas 0..{total - 1}")
        if a.request_overhead_ms < 0 or any(x < 0 for x in a.request_overhead_samples_ms):
            raise SimError("--request-overhead-ms must be >= 0")
        stream = out / "requests.stream.csv" if out is not None else None
        return SimSettings(run=run, fleets=fleets, config=cfg, pool=pool, engine=engine,
                           tokens=prompt_tokens(a.tokenizer), crashes=crashes, drain_timeout_s=a.drain_timeout,
                           request_overhead_s=a.request_overhead_ms / 1e3,
                           request_overhead_samples_s=tuple(x / 1e3 for x in a.request_overhead_samples_ms),
                           records_path=stream)
    except (WorkloadError, TraceError, SLOError, SimSetupError, ConfigError) as e:
        raise SimError(str(e)) from None
    except ValueError as e:       # EngineConfig, model does not fit the hardware, ...
        if isinstance(e, SimError):
            raise
        raise SimError(str(e)) from None


def simulate(settings: SimSettings, progress: bool = False) -> tuple[Simulation, RunResult]:
    from inferstack.sim.report import build_result

    try:
        sim = Simulation(settings)
    except ValueError as e:       # e.g. the model's weights exceed the device memory
        raise SimError(str(e)) from None
    wall0 = time.perf_counter()
    if progress:
        with _Progress(settings.run.duration_s) as bar:
            sim.run(bar.show)
            bar.show(sim)
    else:
        sim.run()
    return sim, build_result(sim, time.perf_counter() - wall0)


def run_simulation(a: SimArgs, out: Path, progress: bool = True, plots: bool = True) -> RunResult:
    from inferstack.sim.report import write_sim_run

    out.mkdir(parents=True, exist_ok=True)
    settings = build_settings(a, out)
    settings.sample_every = max(1, int((a.rate or 1.0) * settings.run.duration_s) // 20_000)
    sim, res = simulate(settings, progress)
    write_sim_run(sim, res, out, plots)
    return res


class _Progress:
    """Virtual time against the run's duration, with the simulator's own speed."""

    def __init__(self, duration_s: float) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("[bold]virtual time"), BarColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[stats]}"), console=Console(stderr=True))
        self.task = self.progress.add_task("sim", total=duration_s, stats="")
        self.wall0 = time.perf_counter()
        self.duration_s = duration_s

    def __enter__(self) -> _Progress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def show(self, sim: Simulation) -> None:
        wall = max(1e-9, time.perf_counter() - self.wall0)
        self.progress.update(self.task, completed=min(sim.now, self.duration_s),
                             stats=f"t={sim.now:.1f}s · done {sim.completed} · in flight {len(sim.active)} · "
                                   f"{sim.completed / wall:.0f} simulated req/s")
