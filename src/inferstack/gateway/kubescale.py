"""The Kubernetes actuator: pools with `kubernetes.autoscale` have their engine Deployments scaled
from the gateway (or the EPP) that routes to them, on the signals it already has.

Every `interval_s`: read each role's Deployment scale (spec.replicas = the current count), take the
pool's `LoadSnapshot` (the one the admin API serves) and difference it with `autoscale.load.LoadSampler`
(the local supervisor's and the simulator's too), let the policy decide over the role's window, bound the
answer (`autoscale.decision.Bounds`), and write the scale subresource when it changed
(`kube/scale.py`: conflicts re-read and retried). A transient API failure is retried with backoff;
a permanent one (RBAC, missing Deployment) is logged with its fix and retried every interval, since
someone may fix it without restarting us. Decisions are logged and kept for the status API.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable

from inferstack.autoscale.decision import Bounds, Decision, objectives_of
from inferstack.autoscale.load import BOTH, LoadSampler, LoadSnapshot, by_role
from inferstack.autoscale.metrics import AutoscalerStatus
from inferstack.autoscale.signals import Objectives, PoolSample
from inferstack.autoscale.spec import parse_policy
from inferstack.kube.client import stop_all
from inferstack.kube.config import KubeAutoscaleConfig
from inferstack.kube.scale import DeploymentScaler, ScaleError

log = logging.getLogger("inferstack.autoscaler")
# the pool's snapshot since a time on its clock, with the misses of the objectives given (Pipeline.pool_load)
Snapshot = Callable[[float, Objectives | None], LoadSnapshot]


class KubeAutoscaler:
    """Scales one pool's Deployments (one per PD role)."""

    def __init__(self, pool: str, snapshot: Snapshot, cfg: KubeAutoscaleConfig,
                 scaler: DeploymentScaler, namespace: str, backoff_cap_s: float | None = None,
                 leading: Callable[[], bool] = lambda: True,
                 report: Callable[[AutoscalerStatus], None] = lambda status: None):
        self.pool = pool
        self.snapshot = snapshot
        self.sampler = LoadSampler()
        self.report = report    # to the pipeline's `inferstack_autoscaler_*` series (autoscale/metrics.py)
        self.leading = leading  # with several picker replicas only the Lease holder scales (kube/lease.py)
        self.cfg = cfg
        self.scaler = scaler
        self.namespace = namespace
        self.policy = parse_policy(cfg.policy)
        self.bounds = Bounds(cfg.min_replicas, cfg.max_replicas, cfg.idle_s)
        self.backoff_cap_s = backoff_cap_s if backoff_cap_s is not None else cfg.interval_s
        self.windows: dict[str, deque[PoolSample]] = {r: deque(maxlen=cfg.window_samples) for r in cfg.deployments}
        self.decisions: deque[tuple[float, str, Decision]] = deque(maxlen=256)
        self.status = {r: AutoscalerStatus(pool, r, self.policy.name) for r in cfg.deployments}
        self.last_error: str | None = None
        self.steps = 0

    async def step(self) -> dict[str, Decision]:
        """One decision per role, written to the Deployments. Raises ScaleError."""
        scales = {role: await self.scaler.read(self.namespace, dep) for role, dep in self.cfg.deployments.items()}
        current = {role: scale.spec for role, scale in scales.items()}
        snap = self.snapshot(self.sampler.since, objectives_of(self.policy))
        serving = {r: sum(e.healthy for e in eps) for r, eps in by_role(snap.endpoints).items()}
        # the Deployment's spec.replicas that do not serve yet are starting
        starting = {r: max(0, n - serving.get(r, serving.get(BOTH, 0))) for r, n in current.items()}
        samples = self.sampler.sample(snap, starting)
        out: dict[str, Decision] = {}
        for role, dep in self.cfg.deployments.items():
            window = self.windows[role]
            window.append(samples.get(role) or samples[BOTH])
            d = self.bounds.apply(self.policy.decide(list(window), current[role]), list(window))
            out[role] = d
            self.decisions.append((window[-1].t, role, d))
            status = self.status[role]
            status.decided(d)
            # the Scale's status.replicas: pods the Deployment runs (not all of them ready yet)
            status.ready, status.starting = scales[role].status, max(0, d.desired - scales[role].status)
            self.report(status)
            if d.desired != current[role]:
                res = await self.scaler.scale(self.namespace, dep, d.desired)
                log.info("pool %s: scaled %s/%s %d -> %d (%s: %s)%s", self.pool, self.namespace, dep,
                         res.before, res.after, d.policy, d.reason,
                         f" after {res.conflicts} conflict(s)" if res.conflicts else "")
        self.steps += 1
        return out

    async def run(self) -> None:
        backoff = 0.0
        while True:
            if not self.leading():
                await asyncio.sleep(self.cfg.interval_s)
                continue
            try:
                await self.step()
                self.last_error, backoff = None, 0.0
            except ScaleError as exc:
                self.last_error = str(exc)
                if exc.transient:
                    backoff = min(self.backoff_cap_s, max(0.25, 2 * backoff))
                    log.warning("pool %s: autoscaler: %s; retrying in %.1fs", self.pool, exc, backoff)
                    await asyncio.sleep(backoff)
                    continue
                log.error("pool %s: autoscaler: %s", self.pool, exc)
            await asyncio.sleep(self.cfg.interval_s)


class KubeAutoscalers:
    """The actuators of every pool with `kubernetes.autoscale`, as background tasks."""

    def __init__(self) -> None:
        self.pools: dict[str, KubeAutoscaler] = {}
        self._tasks: list[asyncio.Task] = []
        self._clients: list = []

    def start(self, pool: str, snapshot: Snapshot, cfg: KubeAutoscaleConfig, client,
              pool_namespace: str | None,
              leading: Callable[[], bool] = lambda: True,
              report: Callable[[AutoscalerStatus], None] = lambda status: None) -> None:
        namespace = cfg.namespace or pool_namespace or client.namespace or "default"
        auto = KubeAutoscaler(pool, snapshot, cfg, DeploymentScaler(client), namespace, leading=leading,
                              report=report)
        self.pools[pool] = auto
        self._clients.append(client)
        self._tasks.append(asyncio.create_task(auto.run(), name=f"kube-autoscale-{pool}"))

    async def stop(self) -> None:
        await stop_all(self._tasks, self._clients)
