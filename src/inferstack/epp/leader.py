"""The picker's leader elector from `epp.leader_election` (docs/kubernetes.md, "High availability")."""

from __future__ import annotations

import os
import socket
import uuid

from inferstack.config.schema import InferstackConfig
from inferstack.kube.client import client_for
from inferstack.kube.lease import LeaderElector, LeaseTiming


def leader_elector(cfg: InferstackConfig, pool: str) -> LeaderElector | None:
    """None when leader election is off; else an elector on `<pool>-epp` (or the configured Lease) in the
    pool's namespace, identified by the pod's name plus a random suffix."""
    le = cfg.epp.leader_election
    if le is None:
        return None
    kube = cfg.pools[pool].kubernetes
    namespace = le.namespace or (kube.namespace if kube else None) or os.environ.get("POD_NAMESPACE") or "default"
    identity = le.identity or f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    client = client_for(le.kubeconfig or (kube.kubeconfig if kube else None), "epp.leader_election")
    timing = LeaseTiming(le.lease_duration_s, le.renew_deadline_s, le.retry_period_s)
    return LeaderElector(client, le.lease_name or f"{pool}-epp", namespace, identity, timing)
