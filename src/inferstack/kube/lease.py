"""Leader election over a `coordination.k8s.io/v1` Lease, the way client-go's `leaderelection` does it.

Several endpoint-picker replicas may run for availability, but GIE's picker keeps per-replica state
(prefix indexes, in-flight counts, flow-control queues), so only one should route: the leader. The
others report NOT_SERVING on readiness and on the ExternalProcessor health service, so Envoy and the
Service send traffic to the leader only, and a follower takes over when the leader stops renewing.

NOTE (the algorithm, client-go's): every `retry_period_s` a candidate reads the Lease. It acquires it
when it does not exist (create: one of several racing creators wins, the others get 409), when it has
no holder, or when the record has not changed for `lease_duration_s` *as observed on the candidate's
own clock* (so clock skew between nodes does not matter: client-go's `observedTime`). A holder renews
by writing `renewTime`; every write carries the `resourceVersion` it read, so of two candidates
taking an expired lease at once the API server accepts one (409 for the other). A leader that cannot
renew for `renew_deadline_s` steps down before its lease can expire, so two leaders never overlap
while the API server is reachable. On shutdown the leader releases the lease (empty holder) so a
follower takes over at its next retry instead of after the lease duration.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import httpx2
from lightkube import ApiError, AsyncClient
from lightkube.models.coordination_v1 import LeaseSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.coordination_v1 import Lease
from lightkube.types import PatchType

log = logging.getLogger("inferstack.kube.lease")

Action = Literal["create", "take", "renew", "follow"]


@dataclass(frozen=True)
class LeaseTiming:
    """client-go's defaults (and GIE's picker's): 15 s lease, 10 s renew deadline, 2 s retry."""

    lease_duration_s: float = 15.0
    renew_deadline_s: float = 10.0
    retry_period_s: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("leader election needs 0 < retry_period_s < renew_deadline_s < lease_duration_s, got "
                             f"{self.retry_period_s}, {self.renew_deadline_s}, {self.lease_duration_s}")


@dataclass(frozen=True)
class LeaseRecord:
    """What a candidate compares between reads: who holds the lease, and the last renewal."""

    holder: str
    duration_s: float
    renew_time: str
    transitions: int


def decide(record: LeaseRecord | None, me: str, unchanged_for_s: float) -> Action:
    """The next write: ``unchanged_for_s`` is how long this candidate has seen the same record."""
    if record is None:
        return "create"
    if record.holder == me:
        return "renew"
    if not record.holder or unchanged_for_s >= record.duration_s:
        return "take"
    return "follow"


def _micro_time(t: datetime) -> str:
    """RFC 3339 with microseconds, as the API server writes a MicroTime."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _status(exc: ApiError | httpx2.HTTPStatusError) -> int:
    """The HTTP status of a refused call (lightkube raises ApiError only for a JSON Status body)."""
    return exc.status.code if isinstance(exc, ApiError) else exc.response.status_code


def _record(lease: Lease | None) -> LeaseRecord | None:
    if lease is None:
        return None
    spec = lease.spec or LeaseSpec()
    return LeaseRecord(spec.holderIdentity or "", float(spec.leaseDurationSeconds or 0),
                       str(spec.renewTime or ""), spec.leaseTransitions or 0)


class LeaderElector:
    """Runs the election loop; `is_leader` is read by whoever gates traffic on it."""

    def __init__(self, client: AsyncClient, name: str, namespace: str, identity: str,
                 timing: LeaseTiming = LeaseTiming(), on_change: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.client, self.name, self.namespace, self.identity = client, name, namespace, identity
        self.timing = timing
        self.on_change = on_change
        self.clock = clock
        self.is_leader = False
        self._observed: LeaseRecord | None = None
        self._observed_at = 0.0
        self._renewed_at: float | None = None

    async def run(self, stop: asyncio.Event) -> None:
        """Try to acquire or renew every retry period until ``stop``; then release if leading."""
        while not stop.is_set():
            await self.try_once()
            try:
                await asyncio.wait_for(stop.wait(), self.timing.retry_period_s)
            except TimeoutError:
                pass
        await self.release()

    async def try_once(self) -> None:
        now = self.clock()
        try:
            lease = await self._read()
            record = _record(lease)
            if record != self._observed:
                self._observed, self._observed_at = record, now
            action = decide(record, self.identity, now - self._observed_at)
            if action == "follow":
                self._set(False, f"held by {record.holder if record else '?'}")
                return
            await self._write(action, lease, record)
            self._renewed_at = now
            self._set(True, action)
        except (ApiError, httpx2.HTTPStatusError) as exc:
            if _status(exc) == 409:  # another candidate wrote first: it leads
                self._set(False, "lost the race for the lease")
                return
            self._failed(f"the API server refused: {_status(exc)} {exc}", now)
        except (httpx2.HTTPError, OSError) as exc:
            self._failed(f"the API server is unreachable: {exc}", now)

    async def release(self) -> None:
        """Give the lease up (empty holder) so a follower takes over at once."""
        if not self.is_leader:
            return
        self._set(False, "released")
        try:
            lease = await self._read()
            record = _record(lease)
            if lease is not None and record is not None and record.holder == self.identity:
                await self._patch(lease, {"holderIdentity": "", "leaseDurationSeconds": 1,
                                          "renewTime": _micro_time(datetime.now(UTC))})
        except (ApiError, httpx2.HTTPError, OSError) as exc:
            log.warning("lease %s/%s: could not release it (%s); followers wait for it to expire",
                        self.namespace, self.name, exc)

    async def _read(self) -> Lease | None:
        try:
            return await self.client.get(Lease, self.name, namespace=self.namespace)
        except (ApiError, httpx2.HTTPStatusError) as exc:
            if _status(exc) == 404:
                return None
            raise

    async def _write(self, action: Action, lease: Lease | None, record: LeaseRecord | None) -> None:
        now = datetime.now(UTC)
        spec = {"holderIdentity": self.identity, "leaseDurationSeconds": math.ceil(self.timing.lease_duration_s),
                "renewTime": _micro_time(now)}
        if action == "create":
            await self.client.create(Lease(metadata=ObjectMeta(name=self.name, namespace=self.namespace),
                                           spec=LeaseSpec(acquireTime=now, leaseTransitions=0, **spec)),
                                     namespace=self.namespace)
            return
        assert lease is not None and record is not None
        if action == "take":
            spec["acquireTime"] = spec["renewTime"]
            spec["leaseTransitions"] = record.transitions + (1 if record.holder else 0)
        await self._patch(lease, spec)

    async def _patch(self, lease: Lease, spec: dict) -> None:
        """A merge patch carrying the resourceVersion it read: the API server applies it only if the
        Lease is unchanged since (409 otherwise), so of two concurrent writers one wins."""
        meta = {"resourceVersion": lease.metadata.resourceVersion} if lease.metadata.resourceVersion else {}
        await self.client.patch(Lease, self.name, {"metadata": meta, "spec": spec}, namespace=self.namespace,
                                patch_type=PatchType.MERGE)

    def _failed(self, why: str, now: float) -> None:
        if self.is_leader and self._renewed_at is not None and now - self._renewed_at < self.timing.renew_deadline_s:
            log.warning("lease %s/%s: renewal failed (%s); still leading until the renew deadline",
                        self.namespace, self.name, why)
            return
        self._set(False, why)

    def _set(self, leader: bool, why: str) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            log.info("lease %s/%s: %s (%s)", self.namespace, self.name,
                     "leading" if leader else "following", why)
            if self.on_change is not None:
                self.on_change(leader)
