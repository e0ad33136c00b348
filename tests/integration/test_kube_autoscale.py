"""The Kubernetes actuator (gateway/kubescale.py, kube/scale.py) against kmock's API emulator over HTTP:
a policy's answer on the pool's signals written to the Deployment's scale subresource, bounds, and
the API failures an SRE meets (403 RBAC, 404, 409 conflicts, 503) with their messages and retries.

The pool is the gateway's own `Pool` with its endpoints' scraped gauges set as the scraper would;
the Kubernetes side is real HTTP through lightkube."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from inferstack.config.schema import GatewayConfig, InferstackConfig, PoolConfig
from inferstack.gateway.datalayer import Pool, ScrapedMetrics
from inferstack.gateway.kubescale import KubeAutoscaler
from inferstack.gateway.pipeline.core import Pipeline
from inferstack.gateway.poolload import PoolLoad
from inferstack.kube.client import make_client
from inferstack.kube.config import KubeAutoscaleConfig, KubernetesPoolConfig
from inferstack.kube.scale import DeploymentScaler, ScaleError
from support.kube_emulator import KubeApi


def _pool(running: list[float]) -> Pool:
    """A pool whose endpoints the scraper has just read with ``running`` requests each."""
    gw = GatewayConfig()
    cfg = PoolConfig(endpoints=[f"http://10.0.0.{i + 1}:8000" for i in range(len(running))], models=["m"])
    pool = Pool.from_config("p", cfg, gw)
    for ep, n in zip(pool.endpoints, running, strict=True):
        ep.metrics, ep.metrics_at = ScrapedMetrics(queue=0.0, running=n, kv_usage=0.3), time.monotonic()
    return pool


Body = Callable[[KubeApi, KubeAutoscaler, Pool], Awaitable[None]]


def _scenario(tmp: Path, policy: str, running: list[float], spec: int, body: Body, **auto: object) -> None:
    async def main() -> None:
        async with KubeApi() as api:
            api.deployments.add("m-decode", spec)
            client = make_client("p", KubernetesPoolConfig(kubeconfig=str(api.kubeconfig(tmp / "kc")),
                                                           selector={"app": "m"}, target_port=8000))
            pool, load = _pool(running), PoolLoad()
            cfg = KubeAutoscaleConfig(policy=policy, deployments={"both": "m-decode"}, **auto)
            try:
                # the pool's snapshot as the pipeline takes it (`Pipeline.pool_load`)
                def snapshot(since, objectives):
                    return load.snapshot(pool, since, 0, 0, objectives=objectives)

                await body(api, KubeAutoscaler("p", snapshot, cfg, DeploymentScaler(client), "ns", backoff_cap_s=0.2),
                           pool)
            finally:
                await client.close()

    asyncio.run(main())


async def _until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


def test_desired_replicas_are_patched_and_bounded(tmp_path):
    async def body(api: KubeApi, auto: KubeAutoscaler, pool: Pool) -> None:
        reports = []
        auto.report = reports.append     # what becomes the inferstack_autoscaler_* series
        d = (await auto.step())["both"]      # 2 replicas x 12 running = 24 in the system, target 4 each
        assert (d.current, d.desired, d.direction) == (2, 6, "up")
        assert api.deployments.writes == [("m-decode", 6)]
        assert (reports[-1].pool, reports[-1].role, reports[-1].policy, reports[-1].desired) == ("p", "both", "kpa", 6)
        assert sum(reports[-1].decisions.values()) == 1
        for ep in pool.endpoints:
            ep.metrics = ScrapedMetrics(running=40.0)        # 80 in the system: kpa asks 20, bounds say 8
        d = (await auto.step())["both"]
        assert (d.current, d.desired) == (6, 8) and "bounded to 1..8" in d.reason
        assert api.deployments.replicas["m-decode"] == 8
        d = (await auto.step())["both"]                        # already there: nothing written
        assert d.desired == 8 and api.deployments.writes == [("m-decode", 6), ("m-decode", 8)]

    _scenario(tmp_path, "kpa:target=4", [12.0, 12.0], 2, body, max_replicas=8)


def test_conflicts_are_reread_and_retried_then_reported(tmp_path):
    async def body(api: KubeApi, auto: KubeAutoscaler, pool: Pool) -> None:
        api.deployments.conflicts = 2          # another writer wins twice; the third write lands
        res = await auto.scaler.scale("ns", "m-decode", 5)
        assert (res.before, res.after, res.conflicts) == (2, 5, 2)
        assert api.deployments.replicas["m-decode"] == 5
        api.deployments.conflicts = 100
        with pytest.raises(ScaleError) as err:
            await auto.scaler.scale("ns", "m-decode", 3)
        assert err.value.code == 409 and err.value.transient
        assert "still conflicting after 5 re-reads" in str(err.value)
        assert "HorizontalPodAutoscaler or KEDA ScaledObject" in str(err.value)
        assert api.deployments.replicas["m-decode"] == 5    # never overwritten blindly

    _scenario(tmp_path, "kpa:target=4", [1.0], 2, body)


def test_rbac_denial_and_missing_deployment_are_precise_and_recover(tmp_path):
    async def body(api: KubeApi, auto: KubeAutoscaler, pool: Pool) -> None:
        api.deployments.forbidden = True
        with pytest.raises(ScaleError) as err:
            await auto.step()
        msg = str(err.value)
        assert msg.startswith("forbidden (RBAC): the service account may not get deployments/m-decode/scale in "
                              "namespace 'ns'; grant it get, update and patch on `deployments/scale`")
        assert 'cannot get resource "deployments/scale"' in msg and not err.value.transient
        with pytest.raises(ScaleError) as err:
            await DeploymentScaler(auto.scaler.client).read("ns", "nope")
        assert err.value.code == 403                     # RBAC is checked before existence, as in Kubernetes
        api.deployments.forbidden = False
        with pytest.raises(ScaleError) as err:
            await DeploymentScaler(auto.scaler.client).read("ns", "nope")
        assert str(err.value).startswith("Deployment ns/nope not found: check the pool's "
                                         "`kubernetes.autoscale.deployments`")
        api.deployments.forbidden = True
        task = asyncio.create_task(auto.run())           # keeps trying at its interval while denied
        try:
            await _until(lambda: auto.last_error is not None and "forbidden" in auto.last_error, 3, "denial seen")
            api.deployments.forbidden = False            # the Role is fixed live
            # the server records the write before the actuator sees the answer: wait for both
            await _until(lambda: api.deployments.writes == [("m-decode", 3)] and auto.last_error is None, 5,
                         "scaled after the fix")
        finally:
            task.cancel()

    _scenario(tmp_path, "kpa:target=4", [6.0, 6.0], 2, body, interval_s=0.1)


def test_transient_api_errors_are_retried_with_backoff(tmp_path):
    async def body(api: KubeApi, auto: KubeAutoscaler, pool: Pool) -> None:
        api.deployments.unavailable = 3
        task = asyncio.create_task(auto.run())
        try:
            await _until(lambda: api.deployments.writes == [("m-decode", 1)] and auto.last_error is None, 10,
                         "scaled down after 503s")
            assert api.deployments.unavailable == 0 and auto.steps == 1
        finally:
            task.cancel()

    # 1 request in flight over 3 replicas with target 4: one replica is enough, at once (no stabilisation)
    _scenario(tmp_path, "hpa:metric=concurrency,target=4,scale_down_stabilization=0", [1.0, 0.0, 0.0], 3, body,
              interval_s=30.0)


def test_pipeline_starts_the_actuator_for_a_kubernetes_pool(tmp_path):
    """`inferstack gateway serve` / `epp serve` with `kubernetes.autoscale`: the pipeline starts the
    actuator with the pool's client; with no pods the pool scales to its minimum."""
    async def main() -> None:
        async with KubeApi() as api:
            api.deployments.add("m-decode", 1)
            cfg = InferstackConfig.model_validate({"pools": {"p": {"models": ["m"], "kubernetes": {
                "kubeconfig": str(api.kubeconfig(tmp_path / "kc")), "selector": {"app": "m"}, "target_port": 8000,
                "autoscale": {"policy": "kpa:target=4", "deployments": {"both": "m-decode"},
                              "min_replicas": 2, "interval_s": 0.1}}}}})
            pipe = Pipeline(cfg)
            await pipe.open()
            try:
                await _until(lambda: api.deployments.replicas["m-decode"] == 2, 5, "scaled to min_replicas")
                assert pipe.kube_autoscalers is not None and pipe.kube_autoscalers.pools["p"].namespace == "ns"
            finally:
                await pipe.aclose()

    asyncio.run(main())


def test_only_the_leading_replica_scales(tmp_path):
    """With leader election, a follower picker runs no actuator steps; it scales once it leads."""
    async def body(api: KubeApi, auto: KubeAutoscaler, pool: Pool) -> None:
        leading = False
        auto.leading = lambda: leading
        task = asyncio.create_task(auto.run())
        try:
            await asyncio.sleep(0.3)                        # several intervals as a follower
            assert auto.steps == 0 and api.deployments.writes == []
            leading = True
            await _until(lambda: api.deployments.writes == [("m-decode", 6)], 5.0, "the leader scales")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    _scenario(tmp_path, "kpa:target=4", [12.0, 12.0], 2, body, interval_s=0.05)
