"""`inferstack up` end to end: one stack (2 real CPU engines of the bundled model, the gateway, a real
Prometheus) started as a subprocess, then: chat through the gateway with the `openai` client (stream
and not), the dashboard in headless Chromium, every Prometheus/Grafana expression returns data, a
SIGKILLed engine comes back and serves again (no client error meanwhile), a hung (SIGSTOPped) engine is
killed and replaced, and SIGTERM leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from tests.support.chromium import CANVAS_PIXELS_JS, Browser
from tests.support.procs import inferstack_env, pid_gone

from inferstack.stack import prometheus as prom
from inferstack.telemetry import grafana

pytestmark = pytest.mark.slow
MODEL = "smollm2-135m"


@dataclass
class Stack:
    proc: subprocess.Popen[bytes]
    ready: dict[str, Any]
    log: Path

    @property
    def gateway(self) -> str:
        return self.ready["urls"][0]

    def state(self) -> dict[str, Any]:
        return json.loads(Path(self.ready["state_file"]).read_text())

    def child(self, name: str) -> dict[str, Any]:
        return next(c for c in self.state()["children"] if c["name"] == name)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _missing_commands() -> list[str]:
    from inferstack.cli.main import SUBCOMMANDS

    return [c for c in ("engine", "gateway") if c not in {name for _, name in SUBCOMMANDS}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    assert not (missing := _missing_commands()), f"`inferstack up` needs the {', '.join(missing)} command(s)"
    tmp = tmp_path_factory.mktemp("up")
    config = tmp / "inferstack.yaml"
    # a SIGSTOPped engine is noticed after 3 checks of 2 s, 0.5 s apart (the defaults, 10 checks of 5 s 1 s
    # apart, would make the hung-engine test minutes long), and restarted 0.1 s later
    config.write_text("up:\n  scrape_interval_s: 1\n  restart:\n    initial_backoff_s: 0.1\n"
                      "    health_failures: 3\n    health_timeout_s: 2\n    health_interval_s: 0.5\n")
    ready_file, log = tmp / "ready.json", tmp / "up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "inferstack", "up", "--config", str(config), "--port", "0", "--replicas", "2",
             "--with-prometheus", "--log-dir", str(tmp / "run"), "--ready-file", str(ready_file)],
            stdout=out, stderr=subprocess.STDOUT, env=inferstack_env(COLUMNS="200"))
    deadline = time.monotonic() + 400
    while not ready_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"inferstack up did not come up:\n{log.read_text()[-5000:]}")
        time.sleep(0.2)
    s = Stack(proc, json.loads(ready_file.read_text()), log)
    yield s
    if proc.poll() is None:
        pids = [c["pid"] for c in s.state()["children"]]
        proc.send_signal(signal.SIGKILL)   # children must still go (PDEATHSIG); reap them if not
        proc.wait(10)
        for pid in pids:
            _wait_gone(pid, 20)


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pid_gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return pid_gone(pid)


def test_banner_shows_urls_and_a_curl_to_paste(stack: Stack) -> None:
    out = stack.output()
    assert "inferstack is up" in out
    assert f"OpenAI API   {stack.gateway}/v1" in out
    assert f"curl {stack.gateway}/v1/chat/completions" in out and MODEL in out
    assert stack.ready["dashboard"] and stack.ready["prometheus"]


def test_openai_client_chats_through_the_gateway(stack: Stack) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=stack.gateway + "/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=12)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count to five."}], max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text and chunks[-1].usage.completion_tokens > 1


def _traffic(stack: Stack, n: int) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=stack.gateway + "/v1", api_key="unused", max_retries=2, timeout=120)
    for i in range(n):
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Say a word about the number {i}."}],
            max_tokens=8, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def test_dashboard_renders_live_data_in_chromium(stack: Stack, tmp_path: Path) -> None:
    browser = Browser()
    try:
        browser.open(stack.ready["dashboard"])
        browser.pump(1.0)
        _traffic(stack, 4)
        browser.pump(3.0)
        pixels = browser.evaluate(CANVAS_PIXELS_JS)
        drawn = {k for k, v in pixels.items() if v["lines"] > 50}
        # latency, throughput and request charts must show the traffic just sent
        assert {"chart-ttft", "chart-itl", "chart-throughput", "chart-requests"} <= drawn, pixels
        rows = browser.evaluate("[...document.querySelectorAll('#endpoints tbody tr')].map(r => r.innerText)")
        assert len(rows) == 2 and all("ready" in r for r in rows), rows
        shots = Path(os.environ.get("INFERSTACK_ARTIFACTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        browser.screenshot(shots / "dashboard-up.png")
        assert browser.console_errors == []
    finally:
        browser.close()


def _query(prom_url: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


def _alert_signals(expr: str) -> list[str]:
    """`signal > threshold [and signal > threshold]` → the signals."""
    parts = re.split(r"\s+and\s+", expr)
    return [re.sub(r"\s*(>|<|>=|<=|==|!=)\s*[\d.]+\s*$", "", p) for p in parts]


def _rules() -> tuple[list[str], list[str]]:
    records, alerts = [], []
    for name in ("recording-rules.yml", "alert-rules.yml"):
        for group in yaml.safe_load((prom.DEPLOY / "prometheus" / name).read_text())["groups"]:
            for rule in group["rules"]:
                (records if "record" in rule else alerts).append(rule.get("record") or rule["expr"])
    return records, alerts


def grafana_test_expr(expr: str) -> str:
    """Grafana's variables as a live query expands them with 'All' selected."""
    return expr.replace("$__rate_interval", "1m").replace("$model", ".*").replace("$replica", ".*")


AUTOSCALED_ONLY = ("inferstack_autoscaler_", "inferstack_gateway_held_requests", "inferstack_gateway_hold_")


def test_every_rule_and_dashboard_expression_returns_data(stack: Stack) -> None:
    p = stack.ready["prometheus"]
    targets = httpx.get(f"{p}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    assert {t["labels"].get("replica") for t in targets} >= {"gateway", "engine-0", "engine-1"}
    _traffic(stack, 3)
    records, alerts = _rules()
    dash = json.loads((prom.DEPLOY / "grafana" / "inferstack.json").read_text())
    checks = [(f"record {r}", r) for r in records]
    checks += [(f"alert signal {sig}", sig) for a in alerts for sig in _alert_signals(a)]
    # the Autoscaling row reads series only an autoscaled stack exports (inferstack up --autoscale;
    # tests/integration/test_stack_autoscale.py checks their values there)
    checks += [(f"grafana {title}", grafana_test_expr(e)) for title, e in grafana.expressions(dash)
               if not any(m in e for m in AUTOSCALED_ONLY)]
    deadline = time.monotonic() + 60
    while True:
        empty = [f"{label}: {expr}" for label, expr in checks if not _query(p, expr)]
        if not empty or time.monotonic() > deadline:
            break
        time.sleep(2)   # rules evaluate every scrape interval; rates need two samples
    assert not empty, "expressions without data:\n" + "\n".join(empty)


def test_killed_engine_is_restarted_and_serves_again(stack: Stack) -> None:
    before = stack.child("engine-0")
    os.kill(before["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while stack.child("engine-0")["state"] != "restarting":    # noticed within a health interval
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # While it is down the pool routes around it: no client sees an error.
    for i in range(3):
        r = httpx.post(stack.gateway + "/v1/chat/completions", timeout=120, json={
            "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": f"ping {i}"}]})
        assert r.status_code == 200, r.text
    deadline = time.monotonic() + 300
    while True:
        now = stack.child("engine-0")
        if now["pid"] != before["pid"] and now["state"] == "ready":
            break
        assert time.monotonic() < deadline, stack.output()[-3000:]
        time.sleep(0.1)
    assert now["restarts"] == before["restarts"] + 1 and now["urls"] == before["urls"]
    assert "engine-0 is back" in stack.output()
    # Back in the pool: requests through the gateway reach the new process.
    url = now["urls"][0]

    def served() -> float:
        text = httpx.get(url + "/metrics", timeout=10).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:request_success_total"))

    deadline = time.monotonic() + 120
    while served() == 0:
        assert time.monotonic() < deadline, "the restarted engine never got a request from the gateway"
        _traffic(stack, 2)


def test_hung_engine_is_killed_and_restarted(stack: Stack) -> None:
    before = stack.child("engine-1")
    os.kill(before["pid"], signal.SIGSTOP)     # alive but answering nothing, like a wedged process
    deadline = time.monotonic() + 300
    while True:
        now = stack.child("engine-1")
        if now["pid"] != before["pid"] and now["state"] == "ready":
            break
        assert time.monotonic() < deadline, stack.output()[-3000:]
        time.sleep(0.1)
    assert "failed 3 health checks" in stack.output()
    assert _wait_gone(before["pid"], 5)


def test_sigterm_stops_every_child_and_frees_the_ports(stack: Stack) -> None:
    children = stack.state()["children"]
    assert {c["name"] for c in children} == {"gateway", "engine-0", "engine-1", "prometheus"}
    stack.proc.send_signal(signal.SIGTERM)
    assert stack.proc.wait(60) == 0
    for c in children:
        assert _wait_gone(c["pid"], 5), f"{c['name']} (pid {c['pid']}) outlived inferstack up"
    for c in children:
        with pytest.raises(httpx.ConnectError):
            httpx.get(c["urls"][0] + "/", timeout=2)
    assert "stopped all children" in stack.output()
