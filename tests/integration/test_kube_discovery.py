"""Kubernetes pod discovery (src/inferstack/kube/watch.py) against kmock's API emulator over HTTP:
pods appearing, turning unready, disappearing, role labels, the watch expiring (410), the API server
going down and coming back, RBAC denial, and an InferencePool whose selector changes."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from inferstack.kube.client import make_client
from inferstack.kube.config import KubernetesPoolConfig
from inferstack.kube.pods import DiscoveredEndpoint
from inferstack.kube.watch import PoolDiscovery
from support.kube_emulator import POOL_RESOURCE, KubeApi, inference_pool, pod

REFLECT_S = 1.0  # the bar: a pod change shows in the endpoint set within 1 s


class Recorder:
    """The publish callback: every endpoint set discovery hands over, with its time."""

    def __init__(self) -> None:
        self.sets: list[tuple[float, tuple[DiscoveredEndpoint, ...]]] = []

    async def __call__(self, eps: tuple[DiscoveredEndpoint, ...]) -> None:
        self.sets.append((time.monotonic(), eps))

    @property
    def urls(self) -> set[str]:
        return {e.url for e in self.sets[-1][1]} if self.sets else set()


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll ``cond`` until true; seconds it took. Fails with ``what`` after ``timeout``."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


Body = Callable[[KubeApi, PoolDiscovery, Recorder], Awaitable[None]]


def _scenario(tmp: Path, cfg: dict, objects: list[dict], body: Body, forbidden: bool = False,
              resync_s: float = 300.0) -> None:
    """Start the emulator with ``objects``, run discovery for ``cfg`` against it, then ``body``."""
    async def main() -> None:
        async with KubeApi() as api:
            for obj in objects:
                await api.create(obj)
            api.forbidden = forbidden
            config = KubernetesPoolConfig(kubeconfig=str(api.kubeconfig(tmp / "kubeconfig")), **cfg)
            client = make_client("p", config)
            rec = Recorder()
            disc = PoolDiscovery("p", config, client, rec, backoff_cap_s=0.4, resync_s=resync_s)
            task = asyncio.create_task(disc.run())
            try:
                await body(api, disc, rec)
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await client.close()

    asyncio.run(main())


SELECT = {"selector": {"app": "m"}, "target_port": 8000}


def test_pod_churn_is_reflected_within_a_second(tmp_path):
    lat: list[float] = []

    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        # the unready pod and the other app's pod are out
        await _until(lambda: rec.urls == {"http://10.1.0.1:8000"}, 5, "first list")
        await api.watched()
        await api.create(pod("b", "10.1.0.2", labels={"app": "m", "llm-d.ai/role": "prefill"}))
        lat.append(await _until(lambda: rec.urls == {"http://10.1.0.1:8000", "http://10.1.0.2:8000"},
                                REFLECT_S, "pod b added"))
        assert {e.pod: e.role for e in rec.sets[-1][1]} == {"a": "both", "b": "prefill"}
        await api.patch("Pod", "a", {"status": {"conditions": [{"type": "Ready", "status": "False"}]}})
        lat.append(await _until(lambda: rec.urls == {"http://10.1.0.2:8000"}, REFLECT_S, "pod a unready"))
        await api.patch("Pod", "c", {"status": {"conditions": [{"type": "Ready", "status": "True"}]}})
        lat.append(await _until(lambda: "http://10.1.0.3:8000" in rec.urls, REFLECT_S, "pod c ready"))
        await api.patch("Pod", "c", {"metadata": {"deletionTimestamp": "2026-12-06T00:00:00Z"}})
        lat.append(await _until(lambda: rec.urls == {"http://10.1.0.2:8000"}, REFLECT_S, "pod c terminating"))
        await api.delete("Pod", "b")
        lat.append(await _until(lambda: rec.urls == set(), REFLECT_S, "pod b deleted"))
        assert disc.state.error is None and disc.state.relists == 0

    _scenario(tmp_path, SELECT, [pod("a", "10.1.0.1"),
               pod("c", "10.1.0.3", ready=False, labels={"app": "m", "llm-d.ai/role": "decode"}),
               pod("x", "10.1.0.9", labels={"app": "other"})], body)
    print(f"pod churn reflected in max {max(lat) * 1000:.1f} ms (all: {[round(x * 1000, 1) for x in lat]})")
    assert max(lat) < REFLECT_S


def test_watch_expiry_relists_and_keeps_watching(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: rec.urls == {"http://10.2.0.1:8000"}, 5, "first list")
        await _until(lambda: api.expire_watches() > 0, 2, "a watch to expire")
        await _until(lambda: disc.state.relists == 1, 2, "relist after 410")
        await api.watched()
        await api.create(pod("b", "10.2.0.2"))  # seen by the new watch
        await _until(lambda: rec.urls == {"http://10.2.0.1:8000", "http://10.2.0.2:8000"}, REFLECT_S, "after relist")
        assert disc.state.error is None  # an expired watch is routine, not an error

    _scenario(tmp_path, SELECT, [pod("a", "10.2.0.1")], body)


def test_rewatch_answered_410_relists(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: rec.urls == {"http://10.7.0.1:8000"}, 5, "first list")
        await api.watched()
        api.gone_once = True  # the client re-watches from its version after the server ends the watch
        assert api.end_watches() == 1
        await _until(lambda: disc.state.relists == 1, 2, "relist after an HTTP 410")
        await api.watched()
        await api.create(pod("b", "10.7.0.2"))
        await _until(lambda: rec.urls == {"http://10.7.0.1:8000", "http://10.7.0.2:8000"}, REFLECT_S, "after relist")
        assert disc.state.error is None and not api.gone_once

    _scenario(tmp_path, SELECT, [pod("a", "10.7.0.1")], body)


def test_periodic_relist_catches_an_event_the_watch_never_delivered(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: rec.urls == {"http://10.8.0.1:8000"}, 5, "first list")
        # stored without a watch event: what a watch on a silently dropped connection would miss
        api.emulator.objects["v1/pods", "ns", "b"] = pod("b", "10.8.0.2")
        await _until(lambda: rec.urls == {"http://10.8.0.1:8000", "http://10.8.0.2:8000"}, 3, "resync")
        assert disc.state.error is None

    _scenario(tmp_path, SELECT, [pod("a", "10.8.0.1")], body, resync_s=0.5)


def test_api_outage_keeps_the_last_set_then_resyncs(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: rec.urls == {"http://10.3.0.1:8000", "http://10.3.0.2:8000"}, 5, "first list")
        published = len(rec.sets)
        await api.down()
        await _until(lambda: disc.state.error is not None, 3, "outage noticed")
        assert "unreachable" in disc.state.error
        await api.delete("Pod", "b")  # a change the watcher cannot see while the API is down
        failed = disc.state.failures
        await _until(lambda: disc.state.failures >= failed + 2, 5, "retries during the outage")
        # several retries failed meanwhile; nothing may be withdrawn
        assert len(rec.sets) == published and rec.urls == {"http://10.3.0.1:8000", "http://10.3.0.2:8000"}
        await api.up()
        await _until(lambda: rec.urls == {"http://10.3.0.1:8000"}, 2.0, "resync after the outage")
        assert disc.state.error is None

    _scenario(tmp_path, SELECT, [pod("a", "10.3.0.1"),
               pod("b", "10.3.0.2")], body)


def test_rbac_denial_is_a_precise_error_and_recovers(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: disc.state.error is not None, 3, "the 403")
        err = disc.state.error
        assert err.startswith("forbidden (RBAC): the gateway's service account may not list/watch pods in "
                              "namespace 'ns'"), err
        assert 'cannot list resource "pods"' in err and not disc.state.synced and rec.sets == []
        api.forbidden = False  # the Role is fixed live: discovery recovers on its next retry
        await _until(lambda: rec.urls == {"http://10.4.0.1:8000"}, 2.0, "recovery after RBAC fix")
        assert disc.state.error is None

    _scenario(tmp_path, SELECT, [pod("a", "10.4.0.1")], body, forbidden=True)


def test_inference_pool_selector_and_ports_are_followed(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: rec.urls == {"http://10.5.0.1:8000", "http://10.5.0.1:8001"}, 5, "pool ports")
        await api.watched(POOL_RESOURCE)
        await api.patch("InferencePool", "pool", {"spec": {"selector": {"matchLabels": {"app": "v2"}},
                                                           "targetPorts": [{"number": 9000}]}})
        await _until(lambda: rec.urls == {"http://10.5.0.2:9000"}, REFLECT_S, "new selector followed")
        await api.patch("InferencePool", "pool", {"spec": {"targetPorts": []}})
        await _until(lambda: disc.state.error is not None, 2, "unusable pool reported")
        assert "spec.targetPorts is empty" in disc.state.error
        assert rec.urls == {"http://10.5.0.2:9000"}  # the last good selection keeps serving

    _scenario(tmp_path, {"inference_pool": "pool"}, [pod("a", "10.5.0.1", labels={"app": "v1"}),
               pod("b", "10.5.0.2", labels={"app": "v2"}),
               inference_pool("pool", {"app": "v1"}, [8000, 8001])], body)


def test_missing_inference_pool_names_the_crd(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: disc.state.error is not None, 3, "the 404")
        assert disc.state.error.startswith("InferencePool 'nope' not found in namespace 'ns'"), disc.state.error

    _scenario(tmp_path, {"inference_pool": "nope"}, [], body)


@pytest.mark.skipif(not os.environ.get("KUBECONFIG"), reason="live cluster: set KUBECONFIG (and optionally "
                    "INFERSTACK_K8S_NAMESPACE / INFERSTACK_K8S_SELECTOR=app=vllm / INFERSTACK_K8S_PORT)")
def test_live_cluster_lists_and_watches():
    key, _, value = os.environ.get("INFERSTACK_K8S_SELECTOR", "app=inferstack").partition("=")
    config = KubernetesPoolConfig(namespace=os.environ.get("INFERSTACK_K8S_NAMESPACE"), selector={key: value},
                                  target_port=int(os.environ.get("INFERSTACK_K8S_PORT", "8000")))

    async def main() -> None:
        client = make_client("live", config)
        rec = Recorder()
        disc = PoolDiscovery("live", config, client, rec)
        task = asyncio.create_task(disc.run())
        try:
            await _until(lambda: disc.state.synced or disc.state.error is not None, 15, "first list")
            assert disc.state.synced and disc.state.error is None, disc.state.error
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await client.close()

    asyncio.run(main())


def test_an_undecodable_pod_is_reported_and_discovery_recovers(tmp_path):
    async def body(api: KubeApi, disc: PoolDiscovery, rec: Recorder) -> None:
        await _until(lambda: rec.urls == {"http://10.6.0.1:8000"}, 5, "first list")
        await api.watched()
        bad = pod("bad", "10.6.0.2")
        bad["status"]["conditions"] = "not a list"
        await api.create(bad)
        await _until(lambda: disc.state.error is not None, 2, "decode error reported")
        assert disc.state.error.startswith("unexpected error watching pods: ValidationError"), disc.state.error
        assert rec.urls == {"http://10.6.0.1:8000"}  # the last good set stays
        await api.delete("Pod", "bad")
        await api.create(pod("c", "10.6.0.3"))
        await _until(lambda: rec.urls == {"http://10.6.0.1:8000", "http://10.6.0.3:8000"}, 3, "recovery")
        assert disc.state.error is None

    _scenario(tmp_path, SELECT, [pod("a", "10.6.0.1")], body)
