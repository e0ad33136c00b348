"""Every lab of the curriculum, in week order; those whose feature is not built yet are listed too,
with what brings them, so `inferstack lab list` shows the whole plan."""

from __future__ import annotations

from inferstack.lab.base import Lab
from inferstack.lab.labs import capacity, compliance, ebpf, oci, pd, quantization, routing, signing, tuning


def _planned(name: str, week: int, title: str, teaches: str, by: str) -> Lab:
    return Lab(name=name, week=week, title=title, question="", teaches=teaches, needs=(), minutes=0.0,
               planned_by=by)


LABS: dict[str, Lab] = {lab.name: lab for lab in [
    routing.LAB,
    _planned("autoscaling", 1, "Autoscaling on custom AI metrics", "HPA/KPA/SLO policies on TTFT, queue and KV",
             "the autoscaling actuators (policies exist: inferstack.autoscale)"),
    _planned("predictive-scaling", 1, "Predictive scaling", "forecast-driven planner vs reactive policies",
             "the autoscaling evaluation in the simulator"),
    _planned("workflow", 1, "Multi-agent workflows (Dify)", "what agent traffic does to serving", "workflows"),
    _planned("agents", 1, "Kubernetes-native agents", "tool-calling agents over the gateway", "workflows"),
    pd.LAB,
    _planned("caching", 2, "Multi-tier caching", "hit rates and TTFT across tiers and workloads",
             "a caching lab module (KV tiers exist: inferstack up --kv-tiers)"),
    quantization.LAB,
    _planned("network", 2, "Network for KV transfer", "TCP vs shared memory vs modelled RDMA",
             "a network lab module (benchmarks/kv_transfer.py measures it today)"),
    capacity.LAB,
    _planned("dashboards", 3, "AI dashboards", "Prometheus, Grafana and the live dashboard under load",
             "a dashboards lab module (inferstack up --with-prometheus exists)"),
    ebpf.LAB,
    signing.LAB,
    compliance.LAB,
    oci.LAB,
    tuning.LAB,
    _planned("production", 4, "A production deployment", "Envoy + endpoint picker + engines from the chart",
             "the Kubernetes endpoint picker and chart"),
]}
