"""Prefill tokens a multi-agent workflow costs a fleet, with and without session/prefix affinity.

The shipped multi-agent example (src/inferstack/assets/workflows/agent_team.yml: classifier, MCP glossary
tool, three parallel expert agents, reviewer, writer) runs `--runs` times, `--concurrency` at a time,
through our gateway in front of 4 emulated engines (`inferstack engine serve --emulate l4:llama-3-8b
--emulate-count 4`, real scheduler and paged prefix cache, emulated timing). Each run has its own
background notes (~`--context-words` words) that every agent's prompt starts with, and carries its run id
as X-Session-Id. Each routing preset gets a fresh fleet (cold caches); the engines' own counters
(vllm:prefix_cache_queries/hits) give prompt tokens looked up, found, and so computed.

Run: .venv/bin/python benchmarks/workflow_affinity.py [--runs 12] [--concurrency 4] [--context-words 900] [--split]
(`--split` adds the default router's scorers split in two: prefix-only and session-only.)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from gateway_common import start_emulated_fleet, start_inferstack_gateway  # noqa: E402

from inferstack.agents.glossary_server import server as glossary  # noqa: E402
from inferstack.workflow.affinity import TeamLoad, fleet_counters, run_team  # noqa: E402

PRESETS = ("round-robin", "default")
# the default preset's scorers split in two, to see which affinity does the work (docs/gateway.md)
LOAD_SCORERS = {"in-flight": 2, "kv-cache": 1}
PROFILES = {
    "prefix-only": {"filters": ["healthy", "not-overloaded"], "picker": "max-score",
                    "scorers": {"prefix": 3, "cold-spread": 1, **LOAD_SCORERS}},
    "session-only": {"filters": ["healthy", "not-overloaded"], "picker": "max-score",
                     "scorers": {"session-affinity": 2, **LOAD_SCORERS}},
}


async def measure(preset: str, load: TeamLoad, kv_blocks: int) -> dict:
    fleet = start_emulated_fleet("l4:llama-3-8b", 4, "--num-kv-blocks", str(kv_blocks), "--max-num-seqs", "8")
    engines = fleet.extra["urls"]
    try:
        async with httpx.AsyncClient() as client:
            model = (await client.get(engines[0] + "/v1/models")).json()["data"][0]["id"]
        config: dict = {"pools": {"bench": {"endpoints": engines, "models": [model], "routing": preset}}}
        if preset in PROFILES:
            config["routing"] = {"profiles": {preset: PROFILES[preset]}}
        gw = start_inferstack_gateway(config)
        try:
            async with httpx.AsyncClient() as client:
                before = await fleet_counters(client, engines)
                t0 = time.perf_counter()
                answered, calls = await run_team(gw.url + "/v1", model, load, glossary)
                wall = time.perf_counter() - t0
                delta = await fleet_counters(client, engines) - before
        finally:
            gw.stop()
    finally:
        fleet.stop()
    return {"routing": preset, "runs": load.runs, "answered": answered, "model_calls": calls,
            "prompt_tokens": delta.queries, "cached_tokens": delta.hits, "computed_tokens": delta.computed,
            "hit_rate": round(delta.hit_rate, 4), "wall_s": round(wall, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=12)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--context-words", type=int, default=900)
    ap.add_argument("--kv-blocks", type=int, default=2000, help="KV blocks per emulated engine")
    ap.add_argument("--out", type=Path, help="write the rows as JSON here")
    ap.add_argument("--split", action="store_true", help="also run prefix-only and session-only profiles")
    args = ap.parse_args()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # the MCP SDK turns on INFO logging when imported
    load = TeamLoad(args.runs, args.concurrency, args.context_words)
    presets = (*PRESETS, *PROFILES) if args.split else PRESETS
    rows = [asyncio.run(measure(p, load, args.kv_blocks)) for p in presets]
    base, aff = rows[:2]
    print(f"{'routing':12} {'calls':>5} {'prompt tok':>10} {'cached':>8} {'computed':>9} {'hit rate':>8} {'wall s':>7}")
    for r in rows:
        print(f"{r['routing']:12} {r['model_calls']:5d} {r['prompt_tokens']:10.0f} {r['cached_tokens']:8.0f} "
              f"{r['computed_tokens']:9.0f} {r['hit_rate']:8.1%} {r['wall_s']:7.1f}")
    cut = 1 - aff["computed_tokens"] / base["computed_tokens"] if base["computed_tokens"] else 0.0
    print(f"affinity ({aff['routing']}) computes {cut:.0%} fewer prefill tokens than round-robin")
    if args.out:
        args.out.write_text(json.dumps({"rows": rows, "prefill_cut": cut}, indent=2))


if __name__ == "__main__":
    main()
