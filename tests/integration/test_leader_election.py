"""Leader election against a Kubernetes API (kmock's emulator over real HTTP): one leader among racing
candidates, take-over after a release and after an expired lease, stepping down when the API server is
gone, and `inferstack epp serve --leader-election` replicas of which only the leader reports ready."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import yaml

from inferstack.kube.client import client_for
from inferstack.kube.lease import LeaderElector, LeaseTiming
from support.kube_emulator import KubeApi, threaded
from support.procs import start_inferstack

FAST = LeaseTiming(lease_duration_s=1.5, renew_deadline_s=1.0, retry_period_s=0.1)


def elector(kubeconfig: Path, identity: str) -> LeaderElector:
    return LeaderElector(client_for(str(kubeconfig), "test"), "pool-epp", "ns", identity, FAST)


async def until(cond, timeout: float) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.02)
    return time.monotonic() - t0


def test_one_leader_take_over_on_release_and_on_expiry(tmp_path):
    asyncio.run(_one_leader_scenario(tmp_path))


async def _one_leader_scenario(tmp_path: Path) -> None:
    async with KubeApi() as api:
        kc = api.kubeconfig(tmp_path / "kubeconfig")
        a, b, c = elector(kc, "a"), elector(kc, "b"), elector(kc, "c")
        await asyncio.gather(a.try_once(), b.try_once(), c.try_once())   # all three race to create it
        assert sum(e.is_leader for e in (a, b, c)) == 1
        assert api.leases[("ns", "pool-epp")]["spec"]["holderIdentity"] in {"a", "b", "c"}
        leader = next(e for e in (a, b, c) if e.is_leader)
        others = [e for e in (a, b, c) if e is not leader]

        stop = asyncio.Event()
        tasks = [asyncio.create_task(e.run(stop)) for e in (a, b, c)]
        await asyncio.sleep(0.5)
        assert leader.is_leader and not any(e.is_leader for e in others)   # renewals keep it

        # a leader that stops cleanly releases the lease: a follower takes over at its next retry
        tasks[(a, b, c).index(leader)].cancel()
        await leader.release()
        took = await until(lambda: any(e.is_leader for e in others), 2.0)
        # at the next retry (0.1 s), well before the 1.5 s an expired lease would take (slack for a loaded machine)
        assert took < 1.0 and sum(e.is_leader for e in others) == 1   # both saw it free; one write won
        second = next(e for e in others if e.is_leader)
        last = next(e for e in others if e is not second)

        # a leader that dies without releasing: the other waits out the whole lease duration
        tasks[(a, b, c).index(second)].cancel()
        took = await until(lambda: last.is_leader, 4.0)
        assert FAST.lease_duration_s - 0.3 <= took <= FAST.lease_duration_s + 1.0, took

        # the API server goes away: the leader keeps leading until the renew deadline, then steps down
        await api.down()
        t0 = time.monotonic()
        await until(lambda: not last.is_leader, 3.0)
        assert time.monotonic() - t0 >= FAST.renew_deadline_s - 0.3
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)


def _readiness(epp) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(epp.ready["health"]) as ch:
        try:
            return health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=2).status
        except grpc.RpcError:
            return -1


def test_only_the_leading_picker_is_ready_and_a_follower_takes_over(tmp_path):
    from grpc_health.v1 import health_pb2

    serving = health_pb2.HealthCheckResponse.SERVING
    engine = start_inferstack(["engine", "serve", "--emulate", "h100:llama-3-8b"])
    with threaded() as k8s:
        kc = k8s.api.kubeconfig(tmp_path / "kubeconfig")
        cfg = tmp_path / "inferstack.yaml"
        cfg.write_text(yaml.safe_dump({
            "pools": {"emu": {"endpoints": engine.urls}},
            "epp": {"leader_election": {"kubeconfig": str(kc), "namespace": "ns", "lease_duration_s": 1.5,
                                        "renew_deadline_s": 1.0, "retry_period_s": 0.1}}}))
        argv = ["epp", "serve", "--config", str(cfg), "--port", "0", "--health-port", "0", "--metrics-port", "0"]
        pickers = [start_inferstack(argv, timeout=60) for _ in range(2)]
        try:
            deadline = time.monotonic() + 20
            one_of_each = sorted([serving, health_pb2.HealthCheckResponse.NOT_SERVING])
            while sorted(_readiness(p) for p in pickers) != one_of_each:
                assert time.monotonic() < deadline, [p.log()[-1500:] for p in pickers]
                time.sleep(0.05)
            leader = next(p for p in pickers if _readiness(p) == serving)
            follower = next(p for p in pickers if p is not leader)
            leader.stop()   # SIGTERM: drains and releases the lease
            deadline = time.monotonic() + 5
            while _readiness(follower) != serving:
                assert time.monotonic() < deadline, follower.log()[-2000:]
                time.sleep(0.05)
        finally:
            for p in pickers:
                p.stop()
            engine.stop()
