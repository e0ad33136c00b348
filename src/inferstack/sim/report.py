"""Outputs of `inferstack sim run`: `inferstack bench run`'s results.json, requests.csv, report.md and
plots (written by `bench.report.write_run`), plus the fleet's cost and energy and the simulator's own
performance.

Cost = Σ replicas (devices × hours up × the hardware's price per device-hour). Energy is a model, not
a measurement: each device draws ``power_idle_w`` while up plus ``power_max_w − power_idle_w`` while
busy (a step running), i.e. power linear in utilisation; per 1M tokens it counts the input and
output tokens of the completed requests.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from inferstack.bench.report import write_run
from inferstack.bench.runner import RunResult
from inferstack.sim.simulation import Simulation


@dataclass(frozen=True)
class FleetCost:
    replica_hours: float
    device_hours: float
    cost: float
    energy_kwh: float
    energy_kwh_per_1m_tokens: float | None
    cost_per_1m_tokens: float | None
    utilisation: float           # busy device time / up device time

    def to_dict(self) -> dict[str, float | None]:
        return dict(self.__dict__)


def fleet_cost(sim: Simulation, tokens: int) -> FleetCost:
    rep_h = dev_h = cost = joules = busy = up = 0.0
    for rep in sim.replicas:
        hw, tp = rep.profile.hardware, rep.profile.tp
        up_s = sum(b - a for a, b in rep.stats.lifetimes)
        rep_h += up_s / 3600
        dev_h += tp * up_s / 3600
        cost += tp * up_s / 3600 * hw.price_per_hour
        joules += tp * (hw.power_idle_w * up_s + (hw.power_max_w - hw.power_idle_w) * rep.stats.busy_s)
        busy += rep.stats.busy_s
        up += up_s
    kwh = joules / 3.6e6
    per_m = tokens / 1e6
    return FleetCost(rep_h, dev_h, cost, kwh, kwh / per_m if per_m else None, cost / per_m if per_m else None,
                     busy / up if up else 0.0)


def engine_counters(sim: Simulation) -> dict[str, float]:
    """The engines' own /metrics counters, summed over the fleet (the prefix-hit "canary")."""
    total = {"prefix_cache_queries": 0, "prefix_cache_hits": 0, "num_preemptions": 0, "steps": 0}
    for rep in sim.replicas:
        for k, v in rep.counters().items():
            total[k] = total.get(k, 0) + v
    return total


def build_result(sim: Simulation, wall_s: float) -> RunResult:
    run = sim.s.run
    planned = sim.planned / run.duration_s if run.load.rate is not None and sim.planned else None
    summary = sim.sink.summary(sim.window, run.slo, run.load.rate, planned)
    tokens = summary["tokens"]  # type: ignore[index]
    cost = fleet_cost(sim, int(tokens["input_total"]) + int(tokens["output_total"]))  # type: ignore[index]
    counters = engine_counters(sim)
    hit = counters["prefix_cache_hits"] / counters["prefix_cache_queries"] if counters["prefix_cache_queries"] else None
    config = run.describe()
    config["sim"] = {
        "fleets": [{"profile": str(f.profile), "replicas": f.replicas, "role": f.role} for f in sim.s.fleets],
        "routing": sim.s.pool.routing, "pd": sim.s.pool.pd.model_dump() if sim.s.pool.pd else None,
        "tokenizer": sim.s.tokens.name, "max_num_seqs": sim.s.engine.seq_limit,
        "max_num_batched_tokens": sim.s.engine.max_num_batched_tokens,
        "crashes": [c.__dict__ for c in sim.s.crashes],
    }
    server = {"available": True, "source": "simulated engines", "prefix_cache_hit_rate": hit, **counters,
              "cost": cost.to_dict(), "routing_decisions": dict(sorted(sim.gateway.decisions.items())),
              "simulator": {"events": sim.events, "wall_s": wall_s, "virtual_s": sim.now,
                            "requests": sim.completed,
                            "simulated_requests_per_wall_s": sim.completed / wall_s if wall_s else None,
                            "records_sampled_every": sim.sink.sample_every}}
    return RunResult(config, sim.sink.samples, summary, server, [], wall_s)


def markdown_extra(res: RunResult) -> str:
    srv = res.server
    c, perf = srv["cost"], srv["simulator"]  # type: ignore[index]
    fleets = ", ".join(f"{f['replicas']}× {f['profile']} ({f['role']})" for f in res.config["sim"]["fleets"])  # type: ignore[index]

    def opt(v: object, fmt: str) -> str:
        return "–" if v is None else format(v, fmt)

    lines = ["", "## Fleet (simulated)", "",
             f"- fleet: {fleets}; routing `{res.config['sim']['routing']}`",  # type: ignore[index]
             f"- replica-hours {c['replica_hours']:.3f} (device-hours {c['device_hours']:.3f}), "
             f"cost ${c['cost']:.2f} (${opt(c['cost_per_1m_tokens'], '.3f')} per 1M tokens)",
             f"- energy {c['energy_kwh']:.3f} kWh ({opt(c['energy_kwh_per_1m_tokens'], '.4f')} kWh per 1M tokens; "
             f"modelled: idle power while up + (max − idle) while busy), device utilisation {c['utilisation']:.1%}",
             f"- engine counters: prefix cache {srv['prefix_cache_hits']:.0f} hits / {srv['prefix_cache_queries']:.0f} "
             f"queried tokens, {srv['num_preemptions']:.0f} preemptions, {srv['steps']:.0f} steps",
             f"- routing decisions (profile/reason): {srv['routing_decisions']}",
             f"- simulator: {perf['requests']} requests, {perf['events']} events, {perf['virtual_s']:.1f} virtual s in "
             f"{perf['wall_s']:.1f} wall s ({opt(perf['simulated_requests_per_wall_s'], '.0f')} simulated req/s)"]
    return "\n".join(lines) + "\n"


def write_sim_run(sim: Simulation, res: RunResult, out: Path, plots: bool = True) -> None:
    """bench's report files, then the streamed full requests.csv and the fleet section."""
    write_run(res, out, title="Simulation run", plots=plots)
    stream = out / "requests.stream.csv"
    if stream.exists():
        os.replace(stream, out / "requests.csv")
    with (out / "report.md").open("a") as f:
        f.write(markdown_extra(res))
    (out / "fleet.json").write_text(json.dumps(res.server, indent=1, default=float) + "\n")
