"""Workflow runner overhead per node, beyond model time.

Two measurements in one run, each against its own peer:
1. A chain of N LLM nodes against the fake OpenAI engine (fixed latency), versus the same N requests
   sent in a plain httpx loop with the same client: (runner − loop) / N is the runner's cost per node
   (graph bookkeeping, variable resolution, cache-key hashing, one SQLite commit per node, events).
2. A chain of N template-transform nodes (no model at all): wall / N.
Step cache off (it would skip the model). The fake engine is tests/support/gateway_fake_engine.py.

Run: .venv/bin/python benchmarks/workflow_overhead.py [--nodes 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from inferstack.workflow.dsl import parse_app  # noqa: E402
from inferstack.workflow.nodes import Services  # noqa: E402
from inferstack.workflow.runner import Runner  # noqa: E402
from inferstack.workflow.store import RunStore  # noqa: E402


def chain_dsl(kind: str, n: int) -> str:
    nodes = [{"id": "start", "data": {"type": "start", "title": "s", "variables": []}}]
    for i in range(n):
        prev = "start" if i == 0 else f"n{i - 1}"
        if kind == "llm":
            data = {"type": "llm", "title": f"n{i}", "model": {"name": "m", "completion_params": {"temperature": 0}},
                    "prompt_template": [{"role": "user", "text": f"step {i} after {{{{#{prev}.text#}}}}"}]}
        else:
            data = {"type": "template-transform", "title": f"n{i}", "template": "{{ x }}+",
                    "variables": [{"variable": "x", "value_selector": [prev, "output"]}]}
        nodes.append({"id": f"n{i}", "data": data})
    nodes.append({"id": "end", "data": {"type": "end", "title": "e", "outputs": []}})
    ids = [n["id"] for n in nodes]
    edges = [{"source": a, "target": b} for a, b in itertools.pairwise(ids)]
    return yaml.safe_dump({"version": "0.5.0", "kind": "app", "app": {"name": kind, "mode": "workflow"},
                           "workflow": {"graph": {"nodes": nodes, "edges": edges}}})


async def run_chain(text: str, gateway: str, client: httpx.AsyncClient, db: Path) -> float:
    svc = Services(client=client, gateway=gateway, api_key=None, session_id="")
    runner = Runner(parse_app(text), RunStore(db), svc, use_cache=False, model="fake-model")
    t0 = time.perf_counter()
    await runner.run({})
    return time.perf_counter() - t0


async def plain_loop(n: int, gateway: str, client: httpx.AsyncClient) -> float:
    t0 = time.perf_counter()
    for i in range(n):
        resp = await client.post(gateway + "/chat/completions", json={
            "model": "fake-model", "temperature": 0, "messages": [{"role": "user", "content": f"step {i} after x"}]})
        resp.raise_for_status()
    return time.perf_counter() - t0


async def measure(n: int, repeats: int, gateway: str, tmp: Path) -> dict:
    llm_text, tpl_text = chain_dsl("llm", n), chain_dsl("template", n)
    runner_s, loop_s, tpl_s = [], [], []
    async with httpx.AsyncClient(timeout=30) as client:
        await plain_loop(3, gateway, client)  # warm the connection
        for r in range(repeats):
            loop_s.append(await plain_loop(n, gateway, client))
            runner_s.append(await run_chain(llm_text, gateway, client, tmp / f"llm{r}.sqlite"))
            tpl_s.append(await run_chain(tpl_text, gateway, client, tmp / f"tpl{r}.sqlite"))
    runner, loop = statistics.median(runner_s), statistics.median(loop_s)
    return {"nodes": n, "repeats": repeats, "llm_chain_s": round(runner, 4), "plain_loop_s": round(loop, 4),
            "overhead_ms_per_llm_node": round((runner - loop) / n * 1000, 3),
            "template_chain_ms_per_node": round(statistics.median(tpl_s) / (n + 2) * 1000, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=40)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ready = tmp / "ready.json"
        engine = subprocess.Popen([sys.executable, str(ROOT / "tests/support/gateway_fake_engine.py"),
                                   "--model", "fake-model", "--ttft-ms", "5", "--itl-ms", "0", "--tokens", "2",
                                   "--ready-file", str(ready)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 30
            while not (ready.exists() and ready.stat().st_size):
                if time.monotonic() > deadline or engine.poll() is not None:
                    raise SystemExit("fake engine did not start")
                time.sleep(0.05)
            url = json.loads(ready.read_text().splitlines()[0])["urls"][0] + "/v1"
            print(json.dumps(asyncio.run(measure(args.nodes, args.repeats, url, tmp))))
        finally:
            engine.terminate()
            engine.wait(10)


if __name__ == "__main__":
    main()
