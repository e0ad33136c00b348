"""Which pods are endpoints: pure functions over Pod objects and the InferencePool spec.

An endpoint is a Ready, running, not-terminating pod with an IP, matched by every selector label,
once per target port (GIE: "each podIP:port is a distinct endpoint"). The `llm-d.ai/role` label
(llm-d's prefill/decode convention) becomes the endpoint's PD role.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from inferstack.config.pd import EndpointRole

ROLE_LABEL = "llm-d.ai/role"
_ROLES: dict[str, EndpointRole] = {"prefill": "prefill", "decode": "decode", "both": "both",
                                   "prefill-decode": "both"}


@dataclass(frozen=True, slots=True)
class PoolTarget:
    """What to watch: pods with all of ``selector``'s labels, reached on each of ``ports``."""

    selector: Mapping[str, str]
    ports: tuple[int, ...]


@dataclass(frozen=True, slots=True, order=True)
class DiscoveredEndpoint:
    url: str
    pod: str
    role: EndpointRole


def selected(labels: Mapping[str, str] | None, selector: Mapping[str, str]) -> bool:
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def pod_ready(pod: Any) -> bool:
    """Ready condition True, phase Running, an IP, and not being deleted (a terminating pod drains)."""
    status = pod.status
    if status is None or not status.podIP or status.phase != "Running":
        return False
    if pod.metadata.deletionTimestamp is not None:
        return False
    return any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])


def pod_role(labels: Mapping[str, str] | None) -> EndpointRole:
    return _ROLES.get((labels or {}).get(ROLE_LABEL, "both"), "both")


def endpoints_of(pods: Iterable[Any], target: PoolTarget, scheme: str = "http") -> tuple[DiscoveredEndpoint, ...]:
    """The endpoint set of ``pods`` for ``target``, sorted (so equal sets compare equal)."""
    out: list[DiscoveredEndpoint] = []
    for pod in pods:
        labels = pod.metadata.labels
        if not selected(labels, target.selector) or not pod_ready(pod):
            continue
        ip = pod.status.podIP
        host = f"[{ip}]" if ":" in ip else ip
        role = pod_role(labels)
        out.extend(DiscoveredEndpoint(f"{scheme}://{host}:{port}", pod.metadata.name, role)
                   for port in target.ports)
    return tuple(sorted(out))


def inference_pool_target(obj: Mapping[str, Any], port: int | None) -> PoolTarget:
    """Selector and ports of an InferencePool (inference.networking.k8s.io/v1) as a dict; ``port``
    (the pool config's `target_port`) narrows targetPorts to one. Raises ValueError when unusable."""
    spec = obj.get("spec") or {}
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    ports = tuple(int(p["number"]) for p in spec.get("targetPorts") or [] if isinstance(p, dict) and "number" in p)
    if not labels or not isinstance(labels, dict):
        raise ValueError("spec.selector.matchLabels is empty")
    if not ports:
        raise ValueError("spec.targetPorts is empty")
    if port is not None:
        if port not in ports:
            raise ValueError(f"target_port {port} is not one of its targetPorts {list(ports)}")
        ports = (port,)
    return PoolTarget({str(k): str(v) for k, v in labels.items()}, ports)
