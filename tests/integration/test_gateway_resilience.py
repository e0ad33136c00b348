"""Retries, ejection and recovery, mid-stream failures, client disconnects — real processes."""

from __future__ import annotations

import concurrent.futures as cf
import signal
import threading
import time

import httpx
import pytest

from inferstack.telemetry.promtext import parse
from support.gateway_procs import start_fake_engine, start_fake_engine_set, start_gateway


def _post(url: str, i: int) -> int:
    r = httpx.post(url + "/v1/chat/completions", timeout=30,
                   json={"model": "fake-model", "messages": [{"role": "user", "content": f"request {i} " * 10}]})
    return r.status_code


def _wait_running(url: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        running = parse(httpx.get(url + "/metrics").text, t=0.0).select("vllm:num_requests_running")
        if sum(running.values()) >= 1:
            return
        assert time.monotonic() < deadline, f"no request ever ran on {url}"
        time.sleep(0.02)


@pytest.mark.slow
def test_killed_endpoint_loses_no_request_and_pool_recovers():
    # the victim takes 3 s to a first token: a request seen running on it is still running when it is killed,
    # however busy the machine (with 300 ms, as on the others, a loaded run could see it finish first)
    fast = ("--ttft-ms", "300", "--tokens", "4", "--itl-ms", "5")
    engines = start_fake_engine_set([fast, ("--ttft-ms", "3000", "--tokens", "4", "--itl-ms", "5"), fast])
    gw = start_gateway({"gateway": {"health_interval_s": 0.2, "eject_s": 0.5, "eject_after_failures": 1},
                        "pools": {"p": {"endpoints": [e.url for e in engines], "routing": "least-load"}}})
    victim = engines[1]
    port = victim.url.rsplit(":", 1)[1]
    try:
        stop = threading.Event()
        statuses: list[int] = []

        def worker(k: int) -> None:
            i = 0
            while not stop.is_set():
                statuses.append(_post(gw.url, k * 10000 + i))
                i += 1

        with cf.ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(worker, k) for k in range(6)]
            _wait_running(victim.url)
            victim.proc.send_signal(signal.SIGKILL)  # in-flight requests on it die mid-response
            victim.proc.wait(5)
            time.sleep(1.0)
            stop.set()
            for f in futs:
                f.result()
        assert statuses and all(s == 200 for s in statuses), [s for s in statuses if s != 200]
        retries = parse(httpx.get(gw.url + "/metrics").text, t=0.0).select("inferstack_gateway_retries_total")
        assert sum(retries.values()) >= 1, "requests cut by the kill were retried on the other endpoint"
        # the endpoint comes back on the same port: health checks readmit it
        engines[1] = start_fake_engine("--port", port, "--ttft-ms", "1")
        deadline = time.monotonic() + 10
        served = 0
        while time.monotonic() < deadline and not served:
            for i in range(6):
                assert _post(gw.url, i) == 200
            served = httpx.get(engines[1].url + "/debug/requests").json()["served"]
            time.sleep(0.2)
        assert served > 0
    finally:
        gw.stop()
        for e in engines:
            e.stop()


def test_mid_stream_failure_ends_with_sse_error_and_disconnect_cancels_upstream():
    dying = start_fake_engine("--tokens", "10", "--itl-ms", "20", "--die-after-tokens", "3")
    slow = start_fake_engine("--tokens", "400", "--itl-ms", "20")
    gw = start_gateway({"pools": {"dying": {"endpoints": [dying.url], "models": ["fake-model"]},
                                  "slow": {"endpoints": [slow.url], "models": ["slow-model"]}},
                        "gateway": {"max_retries": 2}})
    try:
        with httpx.stream("POST", gw.url + "/v1/chat/completions",
                          json={"model": "fake-model", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as r:
            assert r.status_code == 200
            body = b"".join(r.iter_raw()).decode()
        events = [e for e in body.split("\n\n") if e]
        assert sum('"content": "x"' in e for e in events) == 3  # never retried after streaming began
        assert '"error"' in events[-2] and events[-1] == "data: [DONE]"

        def running() -> float:
            line = next(ln for ln in httpx.get(slow.url + "/metrics").text.splitlines()
                        if ln.startswith("vllm:num_requests_running"))
            return float(line.rsplit(" ", 1)[1])

        with httpx.stream("POST", gw.url + "/v1/chat/completions",
                          json={"model": "slow-model", "stream": True,
                                "messages": [{"role": "user", "content": "hi"}]}) as r:
            it = r.iter_raw()
            next(it)
            assert running() == 1
        deadline = time.monotonic() + 5
        while running() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert running() == 0  # the client went away: the gateway closed the upstream request
    finally:
        gw.stop()
        dying.stop()
        slow.stop()


def test_5xx_before_first_byte_is_retried_elsewhere():
    bad = start_fake_engine("--fail-status", "503")
    good = start_fake_engine()
    gw = start_gateway({"pools": {"p": {"endpoints": [bad.url, good.url], "models": ["fake-model"],
                                        "routing": "round-robin"}},
                        "gateway": {"eject_after_failures": 100}})
    try:
        for i in range(6):
            for stream in (False, True):
                r = httpx.post(gw.url + "/v1/chat/completions",
                               json={"model": "fake-model", "stream": stream,
                                     "messages": [{"role": "user", "content": f"x{i}"}]})
                assert r.status_code == 200, r.text
                assert r.headers["x-gateway-destination-endpoint-served"] == good.url.split("//")[1]
        assert 'reason="status 503"' in httpx.get(gw.url + "/metrics").text
    finally:
        gw.stop()
        bad.stop()
        good.stop()
