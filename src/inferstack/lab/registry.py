"""Every lab of the curriculum, in week order; those whose feature is not built yet are listed too,
with what brings them, so `inferstack lab list` shows the whole plan."""

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
    routing,
    signing,
    tuning,
    workflow,
)


def _planned(name: str, week: int, title: str, teaches: str, by: str) -> Lab:
    return Lab(name=name, week=week, title=title, question="", teaches=teaches, needs=(), minutes=0.0,
               planned_by=by)


LABS: dict[str, Lab] = {lab.name: lab for lab in [
    routing.LAB,
    autoscaling.LAB,
    predictive.LAB,
    workflow.LAB,
    agents.LAB,
    pd.LAB,
    caching.LAB,
    _planned("quantization", 2, "Performance vs accuracy", "tok/s against accuracy per precision",
             "quantized kernels and `inferstack model eval`"),
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
