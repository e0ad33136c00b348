"""Agent traffic on a fleet: run the shipped multi-agent workflow (agent_team.yml) many times over the
gateway and count, at the engines, the prompt tokens prefilled vs found in their prefix caches.

Every model call of one run starts with the same team brief (background notes + glossary entry), and
every call carries the run's id as X-Session-Id. Round-robin routing scatters a run's calls over the
replicas, so each replica prefills the brief again; session/prefix affinity keeps them on the replica
that holds it. Used by `benchmarks/workflow_affinity.py` and the `workflow` lab.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from inferstack.bench.scrape import parse_metrics
from inferstack.workflow.dsl import load_app
from inferstack.workflow.mcp_pool import McpConnections
from inferstack.workflow.nodes import Services
from inferstack.workflow.runner import Runner
from inferstack.workflow.store import RunStore

TEAM_APP = Path(__file__).resolve().parents[1] / "assets" / "workflows" / "agent_team.yml"
_WORDS = ("replica", "tenant", "latency", "budget", "queue", "batch", "prompt", "shard", "region", "cache",
          "token", "session", "model", "policy", "window", "spike", "graph", "trace", "rollout", "quota")


@dataclass(frozen=True)
class FleetCounters:
    queries: float    # prompt tokens looked up in the engines' prefix caches (every prompt token)
    hits: float       # of which found there

    def __sub__(self, other: FleetCounters) -> FleetCounters:
        return FleetCounters(self.queries - other.queries, self.hits - other.hits)

    @property
    def computed(self) -> float:
        return self.queries - self.hits

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(frozen=True)
class TeamLoad:
    runs: int = 12
    concurrency: int = 4
    context_words: int = 900      # each run's own background notes (about 1.3 tokens a word)
    seed: int = 0


async def fleet_counters(client: httpx.AsyncClient, engines: list[str]) -> FleetCounters:
    queries = hits = 0.0
    for url in engines:
        scraped = parse_metrics((await client.get(url.rstrip("/") + "/metrics")).text)
        queries += scraped.get("vllm:prefix_cache_queries", 0.0)
        hits += scraped.get("vllm:prefix_cache_hits", 0.0)
    return FleetCounters(queries, hits)


def fleet_counters_sync(engines: list[str]) -> FleetCounters:
    async def go() -> FleetCounters:
        async with httpx.AsyncClient(timeout=10) as client:
            return await fleet_counters(client, engines)

    return asyncio.run(go())


def notes(index: int, words: int, seed: int) -> str:
    rng = random.Random(seed * 100_003 + index)
    return f"Run {index}: " + " ".join(rng.choice(_WORDS) for _ in range(words))


async def run_team(gateway: str, model: str, load: TeamLoad, mcp_target: object) -> tuple[int, int]:
    """(runs that answered, model calls) for ``load.runs`` runs of the team workflow, ``concurrency`` at a time."""
    app = load_app(TEAM_APP)
    gate = asyncio.Semaphore(load.concurrency)
    with tempfile.TemporaryDirectory(prefix="inferstack-affinity-") as tmp:
        store = RunStore(Path(tmp) / "runs.sqlite")
        async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
            mcp = McpConnections({"glossary": mcp_target})

            async def one(i: int) -> tuple[bool, int]:
                async with gate:
                    svc = Services(client=client, gateway=gateway, api_key=None, session_id="", mcp=mcp)
                    runner = Runner(app, store, svc, use_cache=False, model=model)
                    out = await runner.run({"question": "What is prefix caching?",
                                            "context": notes(i, load.context_words, load.seed)})
                    return bool(out.outputs.get("answer")), runner.llm_calls

            try:
                results = await asyncio.gather(*(one(i) for i in range(load.runs)))
            finally:
                await mcp.aclose()
                store.close()
    return sum(ok for ok, _ in results), sum(calls for _, calls in results)
