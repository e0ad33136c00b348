"""`inferstack up --autoscale` on emulated engines: real processes started, drained and stopped by the
local autoscaler, and requests held at the gateway while the pool has no replica (scale from zero).

One stack for the module (kpa with target 1, 0..2 replicas, idle 1.5 s; it starts with no replica); the
tests run in file order
and each first waits for the state it needs (zero replicas, one, two) by polling the gateway's
`inferstack_autoscaler_*` series.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from tests.support.procs import Server, inferstack_env, metric_sum, pid_gone, start_inferstack, stop_up

CONFIG = """\
up:
  autoscale:
    policy: "kpa:target=1,stable_window=2s,panic_window=1s"
    min_replicas: 0
    max_replicas: 2
    idle_s: 1.5
    interval_s: 0.25
    window_samples: 8
    hold_timeout_s: 60
    drain_timeout_s: 20
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("autoscale")
    (tmp / "inferstack.yaml").write_text(CONFIG)
    server = start_inferstack(["up", "--config", str(tmp / "inferstack.yaml"), "--emulate", "h100:llama-3-8b",
                               "--log-dir", str(tmp / "run")], timeout=120)
    try:
        yield server
    finally:
        stop_up(server)


def metrics(stack: Server) -> str:
    return httpx.get(stack.url + "/metrics", timeout=10).text


def replicas(stack: Server, state: str = "ready") -> float:
    return metric_sum(metrics(stack), "inferstack_autoscaler_replicas", f'state="{state}"')


def engine_pids(stack: Server) -> list[int]:
    state = json.loads(Path(stack.ready["state_file"]).read_text())
    return [c["pid"] for c in state["children"] if c["kind"] == "engine"]


def wait_until(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:g}s: {what}")
        time.sleep(0.1)


def at_zero(stack: Server) -> bool:
    text = metrics(stack)
    reported = "inferstack_autoscaler_replicas{" in text  # absent until the autoscaler's first report
    return reported and all(metric_sum(text, "inferstack_autoscaler_replicas", f'state="{s}"') == 0
                            for s in ("ready", "starting", "draining"))


def wait_for_zero(stack: Server) -> None:
    wait_until("scaled to zero", lambda: at_zero(stack))


def chat(stack: Server, max_tokens: int = 8, **headers: str) -> httpx.Response:
    model = "meta-llama/Meta-Llama-3-8B-Instruct"
    return httpx.post(stack.url + "/v1/chat/completions", timeout=90, headers=headers, json={
        "model": model, "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hello"}]})


def test_bad_autoscale_spec_is_a_clear_error() -> None:
    r = subprocess.run([sys.executable, "-m", "inferstack", "up", "--emulate", "h100:llama-3-8b",
                        "--autoscale", "kpa:targt=8", "--port", "0"],
                       capture_output=True, text=True, timeout=60, env=inferstack_env(COLUMNS="200"))
    assert r.returncode == 2
    assert "autoscale.policy: kpa: unknown key 'targt'; known: target," in r.stderr + r.stdout


def test_starts_with_zero_replicas(stack: Server) -> None:
    """`--min-replicas 0` with an emulated model (its name known up front): no engine process at start."""
    assert engine_pids(stack) == [] and "starting 0 engine(s) autoscaled" in stack.log()
    r = httpx.get(stack.url + "/v1/models", timeout=10)
    assert [m["id"] for m in r.json()["data"]] == ["meta-llama/Meta-Llama-3-8B-Instruct"]


def test_client_gone_while_held_is_dropped(stack: Server) -> None:
    wait_for_zero(stack)
    text = metrics(stack)
    gone_before = metric_sum(text, "inferstack_gateway_hold_outcomes_total", 'outcome="client_gone"')
    body = json.dumps({"model": "meta-llama/Meta-Llama-3-8B-Instruct", "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hello"}]}).encode()
    host, port = urlsplit(stack.url).hostname, urlsplit(stack.url).port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                     b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until("the request is held", lambda: metric_sum(metrics(stack), "inferstack_gateway_held_requests") == 1)
    # the client hung up while held: dropped at once, not served to nobody when the replica is ready
    wait_until("the held request counted as client_gone", lambda: metric_sum(
        metrics(stack), "inferstack_gateway_hold_outcomes_total", 'outcome="client_gone"') == gone_before + 1,
        timeout=5)
    assert metric_sum(metrics(stack), "inferstack_gateway_held_requests") == 0


def test_deadline_while_held_is_504(stack: Server) -> None:
    wait_for_zero(stack)
    t0 = time.monotonic()
    r = chat(stack, **{"x-inferstack-hold-timeout": "0.5"})
    assert r.status_code == 504, r.text
    err = r.json()["error"]
    assert err["code"] == "cold_start_timeout" and "scaling from zero" in err["message"]
    assert 0.5 <= time.monotonic() - t0 < 10  # the 0.5 s deadline, not the cold start


def test_scale_from_zero_holds_then_serves(stack: Server) -> None:
    wait_for_zero(stack)
    t0 = time.monotonic()
    with httpx.stream("POST", stack.url + "/v1/chat/completions", timeout=90, json={
            "model": "meta-llama/Meta-Llama-3-8B-Instruct", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": "hello"}]}) as r:
        assert r.status_code == 200
        cold, lines = None, []
        for line in filter(None, r.iter_lines()):
            if cold is None and line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"):
                cold = time.monotonic() - t0           # the first token: the hold, the cold start, the prefill
            lines.append(line)
    assert lines[-1] == "data: [DONE]" and cold is not None
    text = metrics(stack)
    assert replicas(stack) == 1
    assert metric_sum(text, "inferstack_gateway_hold_outcomes_total", 'outcome="released"') >= 1
    assert metric_sum(text, "inferstack_autoscaler_decisions_total",
                      'reason="requests are waiting for a replica: scale from zero"') >= 1
    print(f"cold-start TTFT (emulated engine, streamed): {cold:.2f}s")


def _load(stack: Server, concurrency: Callable[[], int], stop: threading.Event, statuses: list[int]) -> None:
    """Keep ``concurrency()`` requests of ~1 s each in flight until ``stop``."""
    def worker(i: int) -> None:
        while not stop.is_set():
            if i >= concurrency():
                time.sleep(0.05)
                continue
            statuses.append(chat(stack, max_tokens=120).status_code)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join(60)


def test_scale_up_under_load_then_drain_down_to_zero(stack: Server) -> None:
    wait_until("one replica", lambda: replicas(stack) >= 1 or replicas(stack, "starting") >= 1)
    level = {"n": 4}
    stop = threading.Event()
    statuses: list[int] = []
    loader = threading.Thread(target=_load, args=(stack, lambda: level["n"], stop, statuses))
    loader.start()
    try:
        # the series and state.json are written at different moments (a drain may start in between): poll both
        wait_until("two replicas under load", lambda: replicas(stack) == 2 and len(engine_pids(stack)) == 2)
        pids = engine_pids(stack)
        level["n"] = 1  # demand falls to the target of one replica: one is drained while requests run
        wait_until("drained to one replica", lambda: replicas(stack) == 1 and replicas(stack, "draining") == 0)
        stop.set()
        loader.join(90)
        wait_for_zero(stack)
    finally:
        stop.set()
        loader.join(90)
    assert statuses and set(statuses) == {200}, f"lost requests: {[s for s in statuses if s != 200]}"
    assert all(pid_gone(p) for p in pids), "drained replicas are stopped by PID"
    text = metrics(stack)
    assert metric_sum(text, "inferstack_autoscaler_decisions_total", 'direction="up"') >= 2
    assert metric_sum(text, "inferstack_autoscaler_decisions_total", 'direction="down"') >= 2
    assert metric_sum(text, "inferstack_autoscaler_desired_replicas", 'policy="kpa"') == 0


def test_bundled_model_starts_at_zero_and_serves_under_the_name_listed(tmp_path: Path) -> None:
    """A model given as an alias: the stack names it the way the engine will (no engine process to ask), lists it,
    holds the first request, and the replica it starts answers under that same name."""
    stack = start_inferstack(["up", "--autoscale", "kpa:target=4", "--min-replicas", "0", "--max-replicas", "1",
                              "--log-dir", str(tmp_path / "run")], timeout=120)
    try:
        assert engine_pids(stack) == []
        r = httpx.get(stack.url + "/v1/models", timeout=10)
        assert [m["id"] for m in r.json()["data"]] == ["smollm2-135m"]
        r = httpx.post(stack.url + "/v1/chat/completions", timeout=120, json={
            "model": "smollm2-135m", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "smollm2-135m" and len(engine_pids(stack)) == 1
    finally:
        stop_up(stack)
