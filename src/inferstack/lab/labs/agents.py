"""`agents`: Kubernetes-native agents (KAgent `Agent` manifests) run by `inferstack agent serve`.

The shipped manifests (`glossary-team.yaml`: an explainer agent that calls a researcher agent, which
calls the glossary MCP server's `lookup` tool) are first checked offline with KAgent's rules, and a
broken copy shows the file:line errors a user gets. Then `inferstack agent serve` (what the Helm chart's
agents Deployment runs) serves them in front of the gateway and the bundled model (SmolLM2-135M, real
tool calls: the emulated engine's text cannot follow a tool-call grammar); each task is posted to it,
and the engine's counters show what an agent task costs: model calls, prompt tokens, and how much of
each growing conversation the prefix cache already held. `--quick` runs the researcher's task only."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import httpx

from inferstack.agents.manifest import ManifestError, load_bundle
from inferstack.lab.base import Lab, LabResult, Table
from inferstack.lab.report import bar_plot
from inferstack.lab.runtime import LabError, LabRun
from inferstack.workflow.affinity import fleet_counters_sync

MANIFESTS = Path(__file__).resolve().parents[2] / "assets" / "agents" / "glossary-team.yaml"
MODEL = "smollm2-135m"
TASKS = {"researcher": "What is prefix caching?", "explainer": "Explain session affinity."}


def _validate(lab: LabRun) -> tuple[str, list[str]]:
    """The shipped manifests, then a copy with two mistakes users make: (summary, the problems)."""
    bundle = load_bundle([MANIFESTS])
    kinds = sorted({r.kind for r in bundle.resources.values()})
    summary = ", ".join(f"{sum(r.kind == k for r in bundle.resources.values())} {k}" for k in kinds)
    broken = lab.out / "broken-agents.yaml"
    text = MANIFESTS.read_text().replace("    - type: Agent\n      agent:", "    - type: McpServer\n      agent:", 1)
    broken.write_text(text.replace("modelConfig: smollm2\n", "modelConfig: smollm2\n    temprature: 0\n", 1))
    lab.step("inferstack agent validate: the shipped manifests and a broken copy")
    try:
        load_bundle([broken])
    except ManifestError as exc:
        return summary, [p.replace(str(lab.out) + "/", "") for p in exc.problems]
    raise LabError("the broken manifests were accepted")


def run(lab: LabRun) -> LabResult:
    summary, problems = _validate(lab)
    rows = []
    tasks = dict(list(TASKS.items())[:1]) if lab.quick else TASKS
    with lab.server("engine", "engine", "serve", "--model", MODEL, "--threads", "1", "--dtype", "float32",
                    "--max-model-len", "2048", "--kv-cache-bytes", "128MiB") as engines, \
            lab.server("gateway", "gateway", "serve", "--backend", engines[0]) as gateway, \
            lab.server("agents", "agent", "serve", str(MANIFESTS), "--gateway", gateway[0] + "/v1",
                       "--model", MODEL, "--first-tool-choice", "required", "--max-tokens", "40",
                       "--max-steps", "3", "--mcp",
                       f"glossary={sys.executable} -m inferstack.agents.glossary_server") as agents:
        for agent, task in tasks.items():
            lab.step(f"POST /v1/agents/{agent}/run")
            before, t0 = fleet_counters_sync(engines), time.perf_counter()
            out = httpx.post(f"{agents[0]}/v1/agents/{agent}/run", json={"task": task}, timeout=300)
            out.raise_for_status()
            result, wall = out.json(), time.perf_counter() - t0
            delta = fleet_counters_sync(engines) - before
            steps = result["steps"]
            rows.append([agent, sum(s["kind"] == "model" for s in steps),
                         sum(s["kind"] in ("tool", "agent") for s in steps), result["prompt_tokens"],
                         int(delta.hits), int(delta.computed), round(delta.hit_rate, 3), round(wall, 2)])
    return _result(lab, summary, problems, rows)


def _result(lab: LabRun, summary: str, problems: list[str], rows: list[list]) -> LabResult:
    findings = [
        f"The shipped manifests pass KAgent's rules offline ({summary}). The broken copy is refused with "
        f"{len(problems)} problem(s), each at its file:line, e.g. `{problems[0]}`.",
    ]
    for agent, calls, tools, prompt, cached, _, rate, wall in rows:
        findings.append(f"`{agent}`: {calls} model call(s) and {tools} tool/agent call(s) in {wall:.1f} s; "
                        f"{prompt} prompt tokens, of which the prefix cache held {cached} ({rate:.0%}).")
    first = rows[0]
    if first[1] > 1:
        findings.append(f"Each step re-sends the whole conversation (system message, tool list, earlier calls "
                        f"and results), so an agent's prompt grows with every step. For `{first[0]}` "
                        f"{first[4]} of {first[3]} prompt tokens came from the prefix cache: the steps of one "
                        "conversation carry one session id, and each step's prompt starts with the previous "
                        "step's, so only the new tool call and result are prefilled.")
    plot = bar_plot(lab.out / "tokens.png", "Prompt tokens per agent task", "tokens",
                    {"from prefix cache": [r[4] for r in rows], "prefilled": [r[5] for r in rows]},
                    [r[0] for r in rows])
    table = Table("One task per agent: inferstack agent serve → gateway → emulated L4 engine",
                  ["agent", "model calls", "tool calls", "prompt tokens", "cached", "prefilled", "hit rate",
                   "wall (s)"], rows)
    return LabResult(findings, [table], [plot], {"rows": rows, "validation": problems})


LAB = Lab(
    name="agents", week=1, title="Kubernetes-native agents",
    question="What does a tool-calling agent task cost the serving stack, step by step?",
    teaches="KAgent Agent manifests: offline validation, agents as tools, MCP tools, cost per task",
    needs=("the bundled model (SmolLM2-135M)", "gateway", "inferstack agent serve", "the glossary MCP server"),
    minutes=1.0, run=run)
