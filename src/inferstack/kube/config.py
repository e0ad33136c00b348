"""`pools.<name>.kubernetes`: name a pool's endpoints by Kubernetes selector instead of URLs
(docs/kubernetes-chart.md, "Discovery"). Pure pydantic: importing it never loads a Kubernetes client."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferstack.autoscale.spec import checked_spec

# Kubernetes label keys (optional DNS-subdomain prefix + name) and values (validation.go).
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class KubeAutoscaleConfig(BaseModel):
    """Scale the pool's engine Deployments from the gateway/EPP (docs/autoscaling.md, "On Kubernetes"):
    every ``interval_s`` the policy decides from the pool's signals and the scale subresource of the
    role's Deployment is written when the answer changes."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(description="`POLICY[:key=value,...]`, e.g. `kpa:target=8` or `slo:ttft_p95=1s` "
                                    "(docs/autoscaling.md lists the keys).")
    deployments: dict[Literal["both", "prefill", "decode"], str] = Field(
        description="Deployment to scale per PD role: `{both: NAME}` for an aggregated pool, "
                    "`{prefill: NAME, decode: NAME}` for a disaggregated one.")
    namespace: str | None = Field(None, pattern=_DNS_LABEL, max_length=63,
                                  description="Namespace of the Deployments; default: the pool's.")
    min_replicas: int = Field(1, ge=0, description="0 allows scale to zero after `idle_s` without requests.")
    max_replicas: int = Field(10, ge=1)
    idle_s: float = Field(300.0, gt=0, description="Seconds without requests before scaling to zero.")
    interval_s: float = Field(15.0, gt=0, description="Seconds between decisions.")
    window_samples: int = Field(40, ge=1, description="Samples each decision sees (stabilisation windows "
                                                      "longer than interval_s x window_samples are cut).")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        return checked_spec(v)

    @model_validator(mode="after")
    def _shape(self) -> KubeAutoscaleConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(f"max_replicas {self.max_replicas} < min_replicas {self.min_replicas}")
        if not self.deployments:
            raise ValueError("`deployments` needs `both`, or `prefill` and `decode`")
        if "both" in self.deployments and len(self.deployments) > 1:
            raise ValueError("`deployments`: `both` (aggregated) or `prefill`/`decode` (disaggregated), not a mix")
        return self


class KubernetesPoolConfig(BaseModel):
    """Endpoints = the Ready pods matching ``selector`` (or the InferencePool's selector), as
    ``http://<podIP>:<port>``; the ``llm-d.ai/role`` label gives each one its PD role."""

    model_config = ConfigDict(extra="forbid")

    namespace: str | None = Field(
        None, pattern=_DNS_LABEL, max_length=63,
        description="Namespace of the pods (and the InferencePool). Default: the namespace the gateway runs in "
                    "(service account), else the kubeconfig context's, else `default`.")
    selector: dict[str, str] | None = Field(
        None, description="Pod labels that must all match (like a Service selector / matchLabels).")
    target_port: int | None = Field(
        None, ge=1, le=65535, description="Port the engines listen on in each pod. With `inference_pool`: "
        "default every `targetPorts` entry (each podIP:port is one endpoint), or just this one when set.")
    inference_pool: str | None = Field(
        None, pattern=_DNS_LABEL.replace("{0,61}", "{0,251}"), max_length=253,
        description="Name of an InferencePool (inference.networking.k8s.io/v1) whose selector and targetPorts "
                    "define the endpoints; changes to it are followed.")
    kubeconfig: str | None = Field(
        None, description="Kubeconfig file. Default: in-cluster service account when running in a pod, "
                          "else $KUBECONFIG or ~/.kube/config.")
    scheme: str = Field("http", pattern=r"^https?$", description="Scheme of the engine URLs.")
    kv_events_port: int | None = Field(
        None, ge=1, le=65535, description="Each pod's KV events port (`engine serve --kv-events-endpoint "
        "tcp://*:PORT`): the endpoint's `kv_events` is tcp://<podIP>:PORT (the precise prefix index).")
    kv_transfer_port: int | None = Field(
        None, ge=1, le=65535, description="Each pod's KV transfer port (`engine serve --kv-reuse "
        "--kv-transfer-port`): the endpoint's `kv_transfer` is <podIP>:PORT (cross-replica reads).")
    autoscale: KubeAutoscaleConfig | None = Field(
        None, description="Scale the engine Deployments on the pool's signals (docs/autoscaling.md).")

    @field_validator("selector")
    @classmethod
    def _labels(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("selector needs at least one label (an empty selector would pick every pod)")
        for key, value in v.items():
            if not _LABEL_KEY.match(key):
                raise ValueError(f"{key!r} is not a valid label key")
            if not isinstance(value, str) or not _LABEL_VALUE.match(value):
                raise ValueError(f"label {key!r}: {value!r} is not a valid label value (quote numbers)")
        return v

    @model_validator(mode="after")
    def _one_source(self) -> KubernetesPoolConfig:
        if self.inference_pool is None and self.selector is None:
            raise ValueError("set `selector` (with `target_port`) or `inference_pool`")
        if self.inference_pool is not None and self.selector is not None:
            raise ValueError("set either `selector` or `inference_pool`, not both "
                             "(the InferencePool's own selector is used)")
        if self.selector is not None and self.target_port is None:
            raise ValueError("`selector` needs `target_port` (the engines' port in each pod)")
        return self


class LeaderElectionConfig(BaseModel):
    """`epp.leader_election`: run several picker replicas with one active (docs/kubernetes.md, "High
    availability"). The leader holds a coordination.k8s.io/v1 Lease; followers report NOT_SERVING."""

    model_config = ConfigDict(extra="forbid")

    lease_name: str | None = Field(
        None, pattern=_DNS_LABEL.replace("{0,61}", "{0,251}"), max_length=253,
        description="Name of the Lease. Default: `<pool>-epp`.")
    namespace: str | None = Field(
        None, pattern=_DNS_LABEL, max_length=63,
        description="Namespace of the Lease. Default: the pool's `kubernetes.namespace`, else $POD_NAMESPACE, "
                    "else `default`.")
    identity: str | None = Field(
        None, description="This replica's name in the Lease. Default: $POD_NAME (or the host name) plus a "
                          "random suffix, so a restarted pod never mistakes an old lease for its own.")
    kubeconfig: str | None = Field(
        None, description="Kubeconfig file. Default: in-cluster service account, else $KUBECONFIG or "
                          "~/.kube/config.")
    lease_duration_s: float = Field(15.0, gt=0, description="How long followers wait on an unrenewed lease.")
    renew_deadline_s: float = Field(10.0, gt=0, description="A leader that cannot renew this long steps down.")
    retry_period_s: float = Field(2.0, gt=0, description="How often candidates try to acquire or renew.")

    @model_validator(mode="after")
    def _ordered(self) -> LeaderElectionConfig:
        if not self.retry_period_s < self.renew_deadline_s < self.lease_duration_s:
            raise ValueError("needs retry_period_s < renew_deadline_s < lease_duration_s")
        return self
