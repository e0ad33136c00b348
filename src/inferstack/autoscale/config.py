"""The autoscaling sections of `inferstack.yaml` (the one schema in `inferstack.config` includes them):

- `up.autoscale` — the local actuator of `inferstack up` (policy, replica bounds, control loop);
- `pools.<name>.scale_from_zero` — how the gateway holds requests while a pool has no ready replica.

`inferstack up --autoscale` fills both: the supervisor writes the pool's `scale_from_zero` from
`up.autoscale.hold_*` into the gateway's config (docs/autoscaling.md, "Local actuator").
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferstack.autoscale.decision import Bounds
from inferstack.autoscale.spec import checked_spec, parse_policy


class HoldConfig(BaseModel):
    """`pools.<name>.scale_from_zero`: requests wait at the gateway while the pool has no ready endpoint."""

    model_config = ConfigDict(extra="forbid")

    timeout_s: float = Field(
        60.0, gt=0, description="Longest a request waits for a replica; then 504 `cold_start_timeout`. A client "
        "may ask for less with the `x-inferstack-hold-timeout` header (seconds).")
    max_held: int = Field(1000, ge=1, description="Requests held at once; more get 503 `cold_start_queue_full`.")


class AutoscaleSettings(BaseModel):
    """`up.autoscale`: scale the engine replicas of `inferstack up` with a policy (docs/autoscaling.md)."""

    model_config = ConfigDict(extra="forbid")

    policy: str = Field(
        description="POLICY[:key=value,...], e.g. `kpa:target=8` or `slo:ttft_p95=1s,tpot_p95=100ms`; policies "
        "hpa, kpa, apa, slo, planner (keys in docs/autoscaling.md).")
    min_replicas: int = Field(1, ge=0, le=64, description="Fewest replicas; 0 scales to zero after `idle_s`.")
    max_replicas: int = Field(4, ge=1, le=64, description="Most replicas.")
    idle_s: float = Field(300.0, gt=0, description="With min_replicas 0: no request for this long scales to zero.")
    interval_s: float = Field(2.0, gt=0, description="How often the control loop samples the gateway and decides.")
    window_samples: int = Field(60, ge=2, description="Samples a policy sees (its window: interval_s x this).")
    hold_timeout_s: float = Field(
        60.0, gt=0, description="At zero replicas, how long the gateway holds a request for a cold start (504 after).")
    max_held: int = Field(1000, ge=1, description="At zero replicas, requests held at once (503 beyond).")
    drain_timeout_s: float = Field(
        60.0, gt=0, description="Scale-down: longest wait for a removed replica's in-flight requests before it stops.")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        return checked_spec(v)

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self

    def make_policy(self) -> Any:
        return parse_policy(self.policy)

    def bounds(self) -> Bounds:
        return Bounds(self.min_replicas, self.max_replicas, self.idle_s)

    def hold(self) -> HoldConfig:
        return HoldConfig(timeout_s=self.hold_timeout_s, max_held=self.max_held)
