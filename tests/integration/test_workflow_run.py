"""`inferstack workflow run` as a real process against a fake OpenAI-compatible engine: the shipped
example, the step cache (an unchanged re-run makes zero LLM calls), crash-resume of a killed runner,
retries/timeouts and the HTTP allow-list."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from inferstack.workflow.dsl import load_app
from inferstack.workflow.mcp_pool import McpConnections
from inferstack.workflow.nodes import Services
from inferstack.workflow.runner import Runner, WorkflowError
from inferstack.workflow.store import RunStore
from support.gateway_procs import start_fake_engine, start_gateway
from support.procs import Server, inferstack_env, start_inferstack

EXAMPLE = Path(__file__).resolve().parents[2] / "src/inferstack/assets/workflows/research_brief.yml"


@pytest.fixture(scope="module")
def engine() -> Server:
    srv = start_fake_engine("--model", "fake-model", "--ttft-ms", "150", "--itl-ms", "0", "--tokens", "3")
    yield srv
    srv.stop()


def served(engine: Server) -> int:
    return httpx.get(engine.url + "/debug/requests").json()["served"]


def cli_args(engine: Server, app: Path, db: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "inferstack", "workflow", "run", str(app), "--gateway", engine.url + "/v1",
            "--model", "fake-model", "--db", str(db), *extra]


def cli(engine: Server, app: Path, db: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(engine, app, db, *extra), capture_output=True, text=True, timeout=90,
                          env=inferstack_env(), check=False)


def outputs(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_dsl(path: Path, nodes: list[dict], edges: list[tuple[str, str]]) -> Path:
    doc = {"version": "0.5.0", "kind": "app", "app": {"name": path.stem, "mode": "workflow"},
           "workflow": {"graph": {"nodes": [{"id": n.pop("id"), "data": n} for n in nodes],
                                  "edges": [{"source": s, "target": t} for s, t in edges]}}}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def llm(node_id: str, text: str, **extra: object) -> dict:
    return {"id": node_id, "type": "llm", "title": node_id, "prompt_template": [{"role": "user", "text": text}],
            "model": {"provider": "x", "name": "m", "completion_params": {"temperature": 0}}, **extra}


@pytest.fixture(scope="module")
def gateway(engine: Server) -> Server:
    """The gateway maps model `default` (what the shipped example's LLM nodes name) to the fake engine."""
    gw = start_gateway({"pools": {"fakes": {"endpoints": [engine.url]}},
                        "models": {"default": {"targets": [{"pool": "fakes", "model": "fake-model"}]}}})
    yield gw
    gw.stop()


def test_example_through_gateway_then_reruns_from_cache(engine: Server, gateway: Server, tmp_path: Path) -> None:
    def run_example(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "inferstack", "workflow", "run", str(EXAMPLE), "--gateway", gateway.url + "/v1",
             "--db", str(tmp_path / "runs.sqlite"), "--input", "topic=KV caching", *extra],
            capture_output=True, text=True, timeout=90, env=inferstack_env(), check=False)

    three = ("--input", "parts=prefill, decode,eviction")
    before = served(engine)
    first = outputs(run_example(*three))
    assert first == {"report": "# KV caching\n- xxx\n- xxx\n- xxx\n", "note": "long brief (3 parts)", "count": 3}
    assert served(engine) - before == 4  # the outline + one call per part
    debug = httpx.get(engine.url + "/debug/requests").json()
    assert debug["peak_running"] >= 3  # the parallel iteration
    assert all(b["model"] == "fake-model" for b in debug["bodies"][-4:])

    again = run_example(*three)
    assert outputs(again) == first and served(engine) - before == 4  # zero new LLM calls
    assert again.stderr.count("cache hit") == 5  # 4 LLM calls and the code node

    two = run_example("--input", "parts=prefill,decode")
    assert outputs(two)["note"] == "short brief"  # the if-else false branch
    assert served(engine) - before == 4  # same outline and per-part prompts: still cached


def test_killed_run_resumes_without_rerunning_finished_nodes(engine: Server, tmp_path: Path) -> None:
    app = write_dsl(tmp_path / "crash.yml", [
        {"id": "start", "type": "start", "variables": [{"variable": "q", "type": "text-input", "required": True}]},
        llm("a", "first {{#start.q#}}"),
        {"id": "slow", "type": "code",
         "code": "import time\ndef main(t):\n    time.sleep(1.0)\n    return {'n': len(t)}\n",
         "variables": [{"variable": "t", "value_selector": ["a", "text"]}], "outputs": {"n": {"type": "number"}}},
        llm("b", "second {{#slow.n#}}"),
        {"id": "end", "type": "end", "outputs": [{"variable": "n", "value_selector": ["slow", "n"]},
                                                 {"variable": "b", "value_selector": ["b", "text"]}]},
    ], [("start", "a"), ("a", "slow"), ("slow", "b"), ("b", "end")])
    db = tmp_path / "runs.sqlite"
    before = served(engine)
    proc = subprocess.Popen(cli_args(engine, app, db, "--input", "q=hi", "--run-id", "r1", "--no-cache"),
                            env=inferstack_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not _node_done(db, "r1", "a"):
        assert time.monotonic() < deadline and proc.poll() is None, "node a never finished"
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    assert served(engine) - before == 1 and not _node_done(db, "r1", "b")

    resumed = cli(engine, app, db, "--resume", "r1", "--no-cache")
    assert outputs(resumed) == {"n": 3, "b": "xxx"}
    assert "✓ a (llm) resumed" in resumed.stderr
    assert served(engine) - before == 2  # only b was called; a was not re-run


def _node_done(db: Path, run_id: str, node: str) -> bool:
    if not db.exists():
        return False
    with sqlite3.connect(db) as conn:
        try:
            return conn.execute("SELECT 1 FROM node_runs WHERE run_id=? AND node_key=? AND status='succeeded'",
                                (run_id, node)).fetchone() is not None
        except sqlite3.OperationalError:  # tables not created yet
            return False


def run_in_process(engine: Server, app: Path, db: Path, allow: frozenset[str] = frozenset()) -> tuple[dict, list]:
    """The runner without the CLI process (faster); returns the outputs and the events."""
    events: list[dict] = []

    async def go() -> dict:
        async with httpx.AsyncClient() as client:
            svc = Services(client=client, gateway=engine.url + "/v1", api_key=None, session_id="", allow_hosts=allow)
            runner = Runner(load_app(app), RunStore(db), svc, on_event=events.append, model="fake-model")
            return (await runner.run({})).outputs

    return asyncio.run(go()), events


def test_timeouts_retry_then_fail_naming_the_node(engine: Server, tmp_path: Path) -> None:
    app = write_dsl(tmp_path / "slow.yml", [
        {"id": "start", "type": "start", "variables": []},
        llm("slow", "hello", timeout_s=0.05, retry_config={"enabled": True, "max_retries": 1, "retry_interval": 10}),
        {"id": "end", "type": "end", "outputs": []},
    ], [("start", "slow"), ("slow", "end")])
    with pytest.raises(WorkflowError,
                       match=r"node slow \(llm\) 'slow' failed after 2 attempt\(s\): timed out after 0.05s"):
        run_in_process(engine, app, tmp_path / "db.sqlite")


def test_http_request_allow_list(engine: Server, tmp_path: Path) -> None:
    app = write_dsl(tmp_path / "http.yml", [
        {"id": "start", "type": "start", "variables": []},
        {"id": "get", "type": "http-request", "method": "get", "url": engine.url + "/health", "headers": "",
         "params": "", "body": {"type": "none", "data": []}},
        {"id": "end", "type": "end", "outputs": [{"variable": "body", "value_selector": ["get", "body"]},
                                                 {"variable": "status", "value_selector": ["get", "status_code"]}]},
    ], [("start", "get"), ("get", "end")])
    with pytest.raises(WorkflowError, match=r"host '127\.0\.0\.1' is not in the HTTP allow-list"):
        run_in_process(engine, app, tmp_path / "db.sqlite")
    result, events = run_in_process(engine, app, tmp_path / "db.sqlite", frozenset({"127.0.0.1"}))
    assert result == {"body": "ok", "status": 200}
    assert [e["data"]["node_id"] for e in events if e["event"] == "node_finished"] == ["start", "get", "end"]


def test_advanced_chat_answer_and_parallel_join(engine: Server, tmp_path: Path) -> None:
    path = write_dsl(tmp_path / "chat.yml", [
        {"id": "start", "type": "start", "variables": []},
        llm("left", "left: {{#sys.query#}}"),
        llm("right", "right: {{#sys.query#}}"),
        {"id": "reply", "type": "answer", "answer": "{{#left.text#}}|{{#right.text#}}|{{#sys.query#}}"},
    ], [("start", "left"), ("start", "right"), ("left", "reply"), ("right", "reply")])
    path.write_text(path.read_text().replace("mode: workflow", "mode: advanced-chat"))

    async def go() -> tuple[dict, list]:
        events: list[dict] = []
        async with httpx.AsyncClient() as client:
            svc = Services(client=client, gateway=engine.url + "/v1", api_key=None, session_id="")
            runner = Runner(load_app(path), RunStore(tmp_path / "db.sqlite"), svc, use_cache=False,
                            on_event=events.append, model="fake-model")
            return (await runner.run({"query": "hello"})).outputs, events

    result, events = asyncio.run(go())
    assert result == {"answer": "xxx|xxx|hello"}
    order = [(e["event"], e["data"].get("node_id")) for e in events if e["event"].startswith("node_")]
    # both branches start before either finishes: they run concurrently
    assert order.index(("node_started", "right")) < order.index(("node_finished", "left"))
    assert order.index(("node_started", "left")) < order.index(("node_finished", "right"))
    bodies = httpx.get(engine.url + "/debug/requests").json()["bodies"]
    assert {"role": "user", "content": "left: hello"} in bodies[-2]["messages"] + bodies[-1]["messages"]



def _tool_app(path: Path) -> Path:
    return write_dsl(path, [
        {"id": "start", "type": "start", "variables": [{"variable": "x", "type": "number", "required": True}]},
        {"id": "sum", "type": "tool", "provider_type": "mcp", "provider_id": "calc", "tool_name": "add",
         "tool_parameters": {"a": {"type": "variable", "value": ["start", "x"]},
                             "b": {"type": "constant", "value": 5}}},
        {"id": "boom", "type": "tool", "provider_type": "mcp", "provider_id": "calc", "tool_name": "explode",
         "tool_parameters": {"reason": {"type": "mixed", "value": "x={{#start.x#}}"}}},
        llm("explain", "The tool said: {{#boom.text#}}"),
        {"id": "end", "type": "end", "outputs": [{"variable": "sum", "value_selector": ["sum", "json"]},
                                                 {"variable": "error", "value_selector": ["boom", "is_error"]}]},
    ], [("start", "sum"), ("start", "boom"), ("boom", "explain"), ("sum", "end"), ("explain", "end")])


def test_mcp_tool_nodes_against_a_real_server_process(engine: Server, tmp_path: Path) -> None:
    from mcp import StdioServerParameters

    server_script = Path(__file__).resolve().parents[1] / "support" / "mcp_calc_server.py"
    target = StdioServerParameters(command=sys.executable, args=[str(server_script)], env=inferstack_env())
    app = _tool_app(tmp_path / "tools.yml")

    async def go() -> dict:
        async with httpx.AsyncClient() as client:
            svc = Services(client=client, gateway=engine.url + "/v1", api_key=None, session_id="",
                           mcp=McpConnections({"calc": target}))
            runner = Runner(load_app(app), RunStore(tmp_path / "db.sqlite"), svc, use_cache=False, model="fake-model")
            try:
                return (await runner.run({"x": "37"})).outputs
            finally:
                await svc.mcp.aclose()

    assert asyncio.run(go()) == {"sum": [{"result": 42}], "error": True}
    # the tool's error went to the model as text instead of failing the run
    last = httpx.get(engine.url + "/debug/requests").json()["bodies"][-1]
    assert last["messages"] == [{"role": "user", "content": "The tool said: Error executing tool explode"}]


def test_serve_streams_dify_events_and_keeps_runs(engine: Server, gateway: Server, tmp_path: Path) -> None:
    srv = start_inferstack(["workflow", "serve", str(EXAMPLE), "--gateway", gateway.url + "/v1", "--no-cache",
                            "--db", str(tmp_path / "db.sqlite")], timeout=60)
    try:
        body = {"inputs": {"topic": "SSE", "parts": "a,b,c"}, "response_mode": "streaming"}
        with httpx.stream("POST", srv.url + "/v1/workflows/run", json=body, timeout=60) as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
        kinds = [e["event"] for e in events]
        assert kinds[0] == "workflow_started" and kinds[-1] == "workflow_finished"
        finished = [e["data"]["node_id"] for e in events if e["event"] == "node_finished"]
        assert finished[0] == "start" and finished[-1] == "end" and finished.count("expand") == 3
        assert events[-1]["data"]["outputs"]["note"] == "long brief (3 parts)"
        run_id = events[0]["workflow_run_id"]

        detail = httpx.get(f"{srv.url}/v1/workflows/run/{run_id}").json()
        assert detail["status"] == "succeeded" and len(detail["nodes"]) == len(finished)
        assert sum(n["tokens"] for n in detail["nodes"] if n["node_type"] == "llm") > 0
        assert run_id in [r["run_id"] for r in httpx.get(srv.url + "/v1/workflows/runs").json()["data"]]
        page = httpx.get(f"{srv.url}/runs/{run_id}").text  # the run view: the graph with each node's status
        assert 'class="node succeeded" data-node="outline"' in page and "3 steps, 0 cached" in page
        assert f"runs/{run_id}" in httpx.get(srv.url + "/runs").text

        blocking = httpx.post(srv.url + "/v1/workflows/run", timeout=60, json={
            "inputs": {"topic": "SSE", "parts": "a"}, "response_mode": "blocking"}).json()
        assert blocking["data"]["status"] == "succeeded" and blocking["data"]["outputs"]["count"] == 1

        bad = httpx.post(srv.url + "/v1/workflows/run", json={"inputs": {"parts": "a"}})
        assert bad.status_code == 400 and "input 'topic' is required" in bad.json()["error"]["message"]
        assert httpx.get(srv.url + "/v1/workflows/run/nope").status_code == 404
    finally:
        srv.stop()
