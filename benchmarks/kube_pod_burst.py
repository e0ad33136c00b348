"""Kubernetes discovery under a burst: N pods created back to back in kmock's API emulator, then
deleted; how long after the last write discovery publishes the full (then empty) set.

Run: PYTHONPATH=src python benchmarks/kube_pod_burst.py 100
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from inferstack.kube.client import make_client
from inferstack.kube.config import KubernetesPoolConfig
from inferstack.kube.watch import PoolDiscovery
from support.kube_emulator import KubeApi, pod


async def main(n: int) -> None:
    async with KubeApi() as api:
        kubeconfig = api.kubeconfig(Path(tempfile.mkdtemp()) / "kubeconfig")
        cfg = KubernetesPoolConfig(kubeconfig=str(kubeconfig), selector={"app": "m"}, target_port=8000)
        client = make_client("b", cfg)
        sets: list[tuple[float, int]] = []

        async def pub(eps: tuple) -> None:
            sets.append((time.monotonic(), len(eps)))

        d = PoolDiscovery("b", cfg, client, pub)
        task = asyncio.create_task(d.run())
        while not d.state.synced:
            await asyncio.sleep(0.01)
        await api.watched()
        t0 = time.monotonic()
        for i in range(n):
            await api.create(pod(f"p{i}", f"10.9.{i // 250}.{i % 250 + 1}"))
        t1 = time.monotonic()
        while not sets or sets[-1][1] < n:
            await asyncio.sleep(0.005)
        t2 = time.monotonic()
        for i in range(n):
            await api.delete("Pod", f"p{i}")
        t3 = time.monotonic()
        while sets[-1][1] > 0:
            await asyncio.sleep(0.005)
        t4 = time.monotonic()
        print(f"{n} pods: writes {t1-t0:.2f}s, all published {(t2-t1)*1000:.0f} ms after the last write; "
              f"deletes {t3-t2:.2f}s, empty {(t4-t3)*1000:.0f} ms after the last delete; {len(sets)} sets published")
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 100))
