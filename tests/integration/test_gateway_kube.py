"""`inferstack gateway serve` with a pool discovered from Kubernetes (kmock's emulator on a thread):
pods become endpoints the gateway routes to, and stop receiving traffic when they turn unready or
go away, each within 1 s; `llm-d.ai/role` labels set the PD roles of a disaggregated pool."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import httpx

from inferstack.config import parse_config
from inferstack.gateway.datalayer import DataLayer, Pool
from inferstack.gateway.discovery import KubeDiscovery
from inferstack.kube.pods import DiscoveredEndpoint
from support.gateway_procs import start_fake_engine, start_gateway
from support.kube_emulator import pod, threaded

ADMIN = "admin-token-for-tests"  # the admin API is off without a token (docs/security.md)

REFLECT_S = 1.0


def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        time.sleep(0.01)
    return time.monotonic() - t0


def test_gateway_routes_to_discovered_pods_and_follows_churn(tmp_path):
    a = start_fake_engine("--host", "127.0.0.2")
    port = a.url.rsplit(":", 1)[1]
    b = start_fake_engine("--host", "127.0.0.3", "--port", port)  # same targetPort on another "pod IP"
    lat: dict[str, float] = {}
    with threaded() as k8s:
        k8s.call(k8s.api.create, pod("engine-a", "127.0.0.2", labels={"app": "fake"}))
        kubeconfig = k8s.api.kubeconfig(tmp_path / "kubeconfig")
        gw = start_gateway({"pools": {"default": {
            "kubernetes": {"selector": {"app": "fake"}, "target_port": int(port), "kubeconfig": str(kubeconfig)},
            "models": ["fake-model"], "routing": "round-robin"}}}, env={"INFERSTACK_ADMIN_TOKEN": ADMIN})
        client = httpx.Client(base_url=gw.url, timeout=10)
        served: set[str] = set()

        def route_once() -> int:
            r = client.post("/v1/completions", json={"model": "fake-model", "prompt": "hi", "max_tokens": 2})
            if r.status_code == 200:
                served.add(r.headers["x-gateway-destination-endpoint-served"])
            return r.status_code

        def serves(expected: set[str], n: int = 4) -> Callable[[], bool]:
            """True when ``n`` requests in a row are served by exactly ``expected`` (round-robin)."""
            def check() -> bool:
                served.clear()
                codes = {route_once() for _ in range(n)}
                return codes == {200} and served == expected
            return check

        try:
            assert serves({f"127.0.0.2:{port}"})()  # discovered before the gateway reported ready
            k8s.call(k8s.api.watched)
            k8s.call(k8s.api.create, pod("engine-b", "127.0.0.3", labels={"app": "fake"}))
            lat["added"] = _until(serves({f"127.0.0.2:{port}", f"127.0.0.3:{port}"}), REFLECT_S, "pod b used")
            k8s.call(k8s.api.patch, "Pod", "engine-a",
                     {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
            lat["unready"] = _until(serves({f"127.0.0.3:{port}"}), REFLECT_S, "unready pod a dropped")
            k8s.call(k8s.api.delete, "Pod", "engine-b")
            # no endpoint left: the gateway reports not ready (requests would queue in flow control)
            lat["deleted"] = _until(lambda: httpx.get(gw.url + "/ready").status_code == 503, REFLECT_S,
                                    "deleted pod b dropped")
            admin = {"authorization": f"Bearer {ADMIN}"}
            assert httpx.get(gw.url + "/admin/pools", headers=admin).json()["pools"] == {"default": []}
        finally:
            client.close()
            gw.stop()
            a.stop()
            b.stop()
    print("gateway pod churn (mutation -> first request routed accordingly), ms:",
          {k: round(v * 1000, 1) for k, v in lat.items()})


def test_role_labels_set_pd_roles(tmp_path):
    cfg = parse_config(f"""
pools:
  pd:
    kubernetes: {{selector: {{app: m}}, target_port: 8000, kubeconfig: {tmp_path / "none"}}}
    models: [m]
    pd: {{enabled: true}}
""")
    pool = Pool.from_config("pd", cfg.pools["pd"], cfg.gateway)
    layer = DataLayer([pool], cfg.gateway)
    disc = KubeDiscovery(layer)
    # ports nobody listens on: the health check fails fast, the set is applied all the same
    eps = (DiscoveredEndpoint("http://127.0.0.2:9", "p0", "prefill"),
           DiscoveredEndpoint("http://127.0.0.3:9", "d0", "decode"))

    async def main() -> None:
        assert disc.synced()  # no pool started yet: vacuously synced
        await disc.apply(pool, eps)
        assert [e.id for e in pool.endpoints] == ["127.0.0.2:9", "127.0.0.3:9"]
        assert pool.router.roles == {"127.0.0.2:9": "prefill", "127.0.0.3:9": "decode"}
        await disc.apply(pool, eps[1:])
        assert pool.router.roles == {"127.0.0.3:9": "decode"}
        await layer.stop()

    asyncio.run(main())


def test_discovered_pods_get_their_kv_events_and_kv_transfer_addresses(tmp_path):
    cfg = parse_config(f"""
pools:
  fleet:
    kubernetes: {{selector: {{app: m}}, target_port: 8000, kubeconfig: {tmp_path / "none"},
                 kv_events_port: 5557, kv_transfer_port: 8100}}
    models: [m]
    precise_prefix: {{model_digest: "{"ab" * 32}"}}
""")
    pool = Pool.from_config("fleet", cfg.pools["fleet"], cfg.gateway)
    layer = DataLayer([pool], cfg.gateway)

    async def main() -> None:
        await KubeDiscovery(layer).apply(pool, (DiscoveredEndpoint("http://127.0.0.2:9", "a0", "both"),))
        (ep,) = pool.endpoints
        assert (ep.kv_events, ep.kv_transfer) == ("tcp://127.0.0.2:5557", "127.0.0.2:8100")
        await layer.stop()

    asyncio.run(main())
