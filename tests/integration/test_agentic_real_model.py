"""Agentic workflows on the real bundled model (SmolLM2-135M, temperature 0) through the real gateway:
a Dify workflow whose question-classifier and parameter-extractor answer with strict JSON schemas, and
`inferstack agent run` calling a real MCP server process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from inferstack.agents.glossary_server import GLOSSARY
from support.gateway_procs import start_gateway
from support.procs import Server, inferstack_env

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
AGENTS = Path(__file__).resolve().parents[2] / "src/inferstack/assets/agents/glossary-team.yaml"


@pytest.fixture(scope="module")
def gateway(real_engine: Server):
    gw = start_gateway({"pools": {"solo": {"endpoints": [real_engine.url]}},
                        "models": {MODEL: {"targets": [{"pool": "solo"}]}}})
    yield gw
    gw.stop()


def node(node_id: str, **data: object) -> dict:
    return {"id": node_id, "data": {"title": node_id, **data}}


MODEL_CFG = {"provider": "inferstack", "name": MODEL, "mode": "chat", "completion_params": {"temperature": 0}}
ROUTER = {"version": "0.5.0", "kind": "app", "app": {"name": "router", "mode": "workflow"}, "workflow": {"graph": {
    "nodes": [
        node("start", type="start", variables=[{"variable": "q", "type": "text-input", "required": True}]),
        node("classify", type="question-classifier", model=MODEL_CFG, query_variable_selector=["start", "q"],
             classes=[{"id": "c-weather", "name": "weather"}, {"id": "c-sports", "name": "sports"}]),
        node("extract", type="parameter-extractor", model=MODEL_CFG, query=["start", "q"], reasoning_mode="prompt",
             parameters=[{"name": "city", "type": "string", "description": "the city", "required": True}]),
        node("other", type="template-transform", template="not weather", variables=[]),
        node("end", type="end", outputs=[
            {"variable": "class", "value_selector": ["classify", "class_name"]},
            {"variable": "city", "value_selector": ["extract", "city"]},
            {"variable": "ok", "value_selector": ["extract", "__is_success"]}]),
    ],
    "edges": [{"source": "start", "target": "classify"},
              {"source": "classify", "sourceHandle": "c-weather", "target": "extract"},
              {"source": "classify", "sourceHandle": "c-sports", "target": "other"},
              {"source": "extract", "target": "end"}, {"source": "other", "target": "end"}]}}}


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "inferstack", *args], capture_output=True, text=True,
                          timeout=240, env=inferstack_env(), check=False)


def test_classifier_and_extractor_answer_with_strict_json(gateway, tmp_path: Path) -> None:
    app = tmp_path / "router.yml"
    app.write_text(yaml.safe_dump(ROUTER, sort_keys=False))
    proc = run_cli("workflow", "run", str(app), "--gateway", gateway.url + "/v1", "--db", str(tmp_path / "db.sqlite"),
                   "--input", "q=Will it rain in Paris tomorrow?")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"class": "weather", "city": "Paris", "ok": 1}
    assert "other (template-transform)" not in proc.stderr  # the sports branch was skipped


def test_agent_run_calls_a_real_mcp_server_process(gateway) -> None:
    server = f"glossary={sys.executable} -m inferstack.agents.glossary_server"
    proc = run_cli("agent", "run", str(AGENTS), "What is prefix caching?", "--agent", "researcher",
                   "--gateway", gateway.url + "/v1", "--first-tool-choice", "required", "--max-tokens", "40",
                   "--max-steps", "3", "--mcp", server)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["agent"] == "researcher" and out["model_calls"] == 2 and out["answer"]
    tool_line = next(line for line in proc.stderr.splitlines() if "] tool lookup" in line)
    # the model chose the term; whatever it chose, the server's answer (or its error) reached the trace
    assert any(text[:60] in tool_line for text in GLOSSARY.values()) or "no entry for" in tool_line
