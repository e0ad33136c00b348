"""Set a Deployment's replicas through its `scale` subresource (autoscaling/v1 Scale), the way the
HPA controller does: read the Scale, write it back with the new `spec.replicas` and the
`resourceVersion` it was read at. A write that lost a race with another writer (a `kubectl scale`,
a second actuator) gets 409 Conflict and is re-read and retried instead of overwriting blindly.

Every API failure becomes a ScaleError whose message says what to fix (RBAC, missing Deployment,
invalid value) and whether retrying later can help (`transient`).
"""

from __future__ import annotations

from dataclasses import dataclass

import httpx2
from lightkube import AsyncClient
from lightkube.core.exceptions import ApiError
from lightkube.resources.apps_v1 import Deployment

from inferstack.kube.watch import status_code, status_message

FIELD_MANAGER = "inferstack-autoscaler"


@dataclass(frozen=True, slots=True)
class ScaleState:
    """What the scale subresource says: replicas asked for and pods that exist (ready or not)."""

    spec: int
    status: int


@dataclass(frozen=True, slots=True)
class ScaleResult:
    before: int
    after: int
    conflicts: int   # 409s met (and retried) on the way


class ScaleError(Exception):
    """A scale read/write the API refused; ``transient`` when a later retry may succeed."""

    def __init__(self, message: str, code: int | None, transient: bool):
        super().__init__(message)
        self.code = code
        self.transient = transient


def scale_error(exc: BaseException, verb: str, namespace: str, name: str) -> ScaleError:
    """An actionable ScaleError for an API failure on deployments/``name``/scale."""
    code = status_code(exc)
    detail = status_message(exc)
    what = f"deployments/{name}/scale in namespace {namespace!r}"
    if code == 403:
        return ScaleError(f"forbidden (RBAC): the service account may not {verb} {what}; grant it get, update "
                          "and patch on `deployments/scale` in API group `apps` (the Helm chart's Role does "
                          f"with autoscaling.kubernetes.enabled): {detail}", code, transient=False)
    if code == 401:
        return ScaleError(f"unauthorized: the API server rejected the credentials to {verb} {what}: {detail}",
                          code, transient=False)
    if code == 404:
        return ScaleError(f"Deployment {namespace}/{name} not found: check the pool's "
                          f"`kubernetes.autoscale.deployments` names and namespace: {detail}", code, transient=False)
    if code == 422:
        return ScaleError(f"the API server refused the new replica count for {what} (invalid): {detail}",
                          code, transient=False)
    if code is not None:
        return ScaleError(f"API server answered {code} to {verb} {what}: {detail}", code,
                          transient=code == 429 or code >= 500)
    return ScaleError(f"API server unreachable to {verb} {what} ({type(exc).__name__}: {exc})", None,
                      transient=True)


_API_ERRORS = (ApiError, httpx2.HTTPError, OSError)


class DeploymentScaler:
    """Reads and writes the scale subresource of Deployments with one lightkube client."""

    def __init__(self, client: AsyncClient, conflict_retries: int = 4):
        self.client = client
        self.conflict_retries = conflict_retries

    async def read(self, namespace: str, name: str) -> ScaleState:
        try:
            scale = await self.client.get(Deployment.Scale, name, namespace=namespace)
        except _API_ERRORS as exc:
            raise scale_error(exc, "get", namespace, name) from None
        return ScaleState(int(scale.spec.replicas or 0), int(scale.status.replicas or 0))

    async def scale(self, namespace: str, name: str, desired: int) -> ScaleResult:
        """Make spec.replicas ``desired``. Raises ScaleError (after ``conflict_retries`` conflicts, a
        transient one)."""
        conflicts = 0
        while True:
            try:
                scale = await self.client.get(Deployment.Scale, name, namespace=namespace)
            except _API_ERRORS as exc:
                raise scale_error(exc, "get", namespace, name) from None
            before = int(scale.spec.replicas or 0)
            if before == desired:
                return ScaleResult(before, desired, conflicts)
            scale.spec.replicas = desired   # metadata keeps the resourceVersion it was read at
            try:
                await self.client.replace(scale, name, namespace=namespace, field_manager=FIELD_MANAGER)
                return ScaleResult(before, desired, conflicts)
            except _API_ERRORS as exc:
                if status_code(exc) != 409:
                    raise scale_error(exc, "update", namespace, name) from None
                conflicts += 1
                if conflicts > self.conflict_retries:
                    err = scale_error(exc, "update", namespace, name)
                    raise ScaleError(f"{err} (still conflicting after {conflicts} re-reads: another writer keeps "
                                     "changing the replicas; is a HorizontalPodAutoscaler or KEDA ScaledObject "
                                     "also scaling this Deployment?)", 409, transient=True) from None
