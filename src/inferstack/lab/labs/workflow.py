"""`workflow`: what a multi-agent Dify workflow does to a serving fleet, with and without affinity.

The shipped multi-agent example (`agent_team.yml`: a question-classifier, an MCP glossary tool, three
parallel expert agents, a reviewer and a writer) runs several times over the gateway in front of
emulated engines (real scheduler and prefix cache, emulated timing), with round-robin routing
and with the default router (prefix + session affinity), at the same time, each routing on 4 engines of
its own (cold caches) from one emulated fleet process. The engines' own
counters say how many prompt tokens were prefilled and how many came from their prefix caches."""

from __future__ import annotations

import asyncio
import sys

import httpx
import yaml

from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabRun
from inferstack.workflow.affinity import TeamLoad, fleet_counters, run_team
from inferstack.workflow.mcp_pool import stdio_server

PRESETS = ("round-robin", "default")
EMULATE = "l4:llama-3-8b"


def _gateway_config(lab: LabRun, preset: str, engines: list[str], model: str) -> str:
    config = lab.out / "logs" / f"gateway-{preset}.yaml"
    config.write_text(yaml.safe_dump({"pools": {"fleet": {"endpoints": engines, "models": [model],
                                                          "routing": preset}}}))
    return str(config)


async def _team(gateway: str, engines: list[str], model: str, load: TeamLoad, mcp: object) -> list:
    async with httpx.AsyncClient(timeout=30) as client:
        before = await fleet_counters(client, engines)
        answered, calls = await run_team(gateway + "/v1", model, load, mcp)
        delta = await fleet_counters(client, engines) - before
    return [answered, calls, int(delta.queries), int(delta.hits), int(delta.computed), round(delta.hit_rate, 3)]


def _measure(lab: LabRun, load: TeamLoad) -> list[list]:
    """Both presets at once, each on its own 4 engines of one emulated fleet (cold caches for both)."""
    glossary = stdio_server(sys.executable, ["-m", "inferstack.agents.glossary_server"])
    with lab.server("engines", "engine", "serve", "--emulate", EMULATE, "--emulate-count", "8",
                    "--num-kv-blocks", "2000", "--max-num-seqs", "8") as engines:
        model = httpx.get(engines[0] + "/v1/models", timeout=10).json()["data"][0]["id"]
        fleets = {preset: engines[4 * i:4 * i + 4] for i, preset in enumerate(PRESETS)}
        rr, aff = PRESETS
        with lab.server(f"gateway-{rr}", "gateway", "serve", "--config",
                        _gateway_config(lab, rr, fleets[rr], model)) as gw_rr, \
                lab.server(f"gateway-{aff}", "gateway", "serve", "--config",
                           _gateway_config(lab, aff, fleets[aff], model)) as gw_aff:
            lab.step(f"{load.runs} runs of agent_team.yml per routing, {load.concurrency} at a time")

            async def both() -> list[list]:
                return list(await asyncio.gather(_team(gw_rr[0], fleets[rr], model, load, glossary),
                                                 _team(gw_aff[0], fleets[aff], model, load, glossary)))

            results = asyncio.run(both())
    return [[preset, *row] for preset, row in zip(PRESETS, results, strict=True)]


def run(lab: LabRun) -> LabResult:
    load = TeamLoad(runs=3, concurrency=3, context_words=500) if lab.quick else TeamLoad()
    rows = _measure(lab, load)
    rr, aff = rows
    cut = 1 - aff[5] / rr[5] if rr[5] else 0.0
    findings = [
        f"Each run made {rr[2] // max(1, rr[1])} model calls whose prompts start with the same team brief "
        f"(~{load.context_words} words of the run's own notes). Round-robin prefilled {rr[5]} prompt tokens "
        f"(prefix hit rate {rr[6]:.0%}); the default router prefilled {aff[5]} ({aff[6]:.0%} hit rate): "
        f"{cut:.0%} {'fewer' if cut >= 0 else 'more'} tokens computed with affinity.",
        "Round-robin scatters one run's agents over the replicas, so each replica computes the shared brief "
        "again; the session id (the run id) and the prefix scorer keep a run's agents on the replica that "
        "already holds it. The saving grows with the shared part of the prompts and the number of agents per "
        "run, and shrinks when replicas are overloaded (the router then trades affinity for load).",
    ]
    plot = bar_plot(lab.out / "prefill.png", "Prompt tokens per routing", "tokens",
                    {"prefilled": [r[5] for r in rows], "from prefix cache": [r[4] for r in rows]},
                    list(PRESETS))
    table = Table(f"{load.runs} runs of agent_team.yml ({load.concurrency} at a time), 4 emulated L4 engines",
                  ["routing", "runs answered", "model calls", "prompt tokens", "cached", "prefilled", "hit rate"],
                  rows)
    return LabResult(findings, [table], [plot], {"rows": rows, "prefill_cut": cut})


LAB = Lab(
    name="workflow", week=1, title="Multi-agent workflows (Dify)",
    question="How many prefill tokens does a multi-agent workflow cost a fleet, with and without affinity?",
    teaches="a Dify multi-agent workflow's traffic: shared prefixes, fan-out, round-robin vs affinity",
    needs=("8 emulated L4 engines (4 per routing)", "2 gateways", "the glossary MCP server"), minutes=2.0, run=run)
