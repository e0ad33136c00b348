"""Autoscaling on AI metrics: policies as pure functions of a window of pool samples.

`signals` defines what a policy sees, `decision` the answer and the replica bounds (scale to and
from zero), and one module per policy: `hpa` (Kubernetes HPA), `kpa` (Knative), `apa` (AIBrix),
`slo` (latency objectives) and `planner` (Dynamo's SLA planner with forecasts). `spec` parses
`POLICY:key=value,...`. The simulator, the local supervisor and the Kubernetes actuator call the
same objects (docs/autoscaling.md).
"""
