"""Every lab of the curriculum, in week order (`inferstack lab list`)."""

from __future__ import annotations

from inferstack.lab.base import Lab
from inferstack.lab.labs import (
    agents,
    autoscaling,
    caching,
    capacity,
    compliance,
    dashboards,
    ebpf,
    network,
    oci,
    pd,
    predictive,
    production,
    quantization,
    routing,
    signing,
    tuning,
    workflow,
)

LABS: dict[str, Lab] = {lab.name: lab for lab in [
    routing.LAB,
    autoscaling.LAB,
    predictive.LAB,
    workflow.LAB,
    agents.LAB,
    pd.LAB,
    caching.LAB,
    quantization.LAB,
    network.LAB,
    capacity.LAB,
    dashboards.LAB,
    ebpf.LAB,
    signing.LAB,
    compliance.LAB,
    oci.LAB,
    tuning.LAB,
    production.LAB,
]}
