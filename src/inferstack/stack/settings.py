"""What `inferstack up` needs to know: the `up` section of inferstack.yaml, overridable from the CLI."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferstack.autoscale.config import AutoscaleSettings
from inferstack.engine.config import Dtype, KVCacheDtype, KVTransport, Quantization
from inferstack.kvstore.settings import KVTierSettings


class RestartPolicy(BaseModel):
    """How a crashed child comes back: exponential backoff, reset after a stable period."""

    model_config = ConfigDict(extra="forbid")

    initial_backoff_s: float = Field(1.0, gt=0, description="Delay before the first restart.")
    max_backoff_s: float = Field(30.0, gt=0, description="Upper bound of the doubling delay.")
    stable_after_s: float = Field(60.0, gt=0, description="Healthy this long resets the backoff.")
    health_interval_s: float = Field(1.0, gt=0, description="How often children are health-checked.")
    health_failures: int = Field(
        10, ge=1, description="Consecutive failed /health checks (`health_timeout_s` each) before a hung child is "
        "killed and restarted; a busy CPU engine can answer slowly, so keep this generous.")
    health_timeout_s: float = Field(5.0, gt=0, description="How long one /health check waits for its answer.")


class PDSettings(BaseModel):
    """`up.pd`: a prefill/decode disaggregated pool (xPyD) instead of colocated replicas."""

    model_config = ConfigDict(extra="forbid")

    prefill: int = Field(ge=1, le=64, description="Engines started with `--role prefill`.")
    decode: int = Field(ge=1, le=64, description="Engines started with `--role decode`.")
    threshold_tokens: int = Field(
        128, ge=0, description="The gateway splits a request only when at least this many prompt tokens are "
        "not cached on the chosen decode engine (0: always split); see docs/disaggregation.md.")
    max_prefill_queue: int | None = Field(
        None, ge=1, description="Conditional disaggregation: prefill on the decode engine while every prefill "
        "engine has this many requests waiting (unset: always wait for a prefill engine).")


class UpSettings(BaseModel):
    """The `up` section: the local stack `inferstack up` runs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("smollm2-135m", description="Model every engine replica serves (alias, .gguf, HF dir).")
    replicas: int = Field(2, ge=1, le=64, description="Number of engine replicas.")
    dtype: Dtype = Field(
        "auto", description="Engines' activation precision (`engine serve --dtype`).")
    quantization: Quantization = Field(
        "none", description="Engines' weight format (`engine serve --quantization`; docs/engine.md, "
        "'Weight formats').")
    kv_cache_dtype: KVCacheDtype = Field(
        "auto", description="Engines' KV cache precision (`engine serve --kv-cache-dtype`; docs/engine.md, "
        "'KV cache precision').")
    host: str = Field("127.0.0.1", description="Address the gateway binds.")
    port: int = Field(8000, ge=0, le=65535, description="Gateway port; 0 lets the OS choose.")
    threads: int | None = Field(
        None, ge=1, description="Torch threads per engine; default: the usable cores split between replicas."
    )
    emulate: str | None = Field(
        None, description="Emulate engines instead of running a model, e.g. 'h100:llama-3-8b'."
    )
    engine_args: list[str] = Field(default_factory=list, description="Extra args for `inferstack engine serve`.")
    kv: KVTierSettings | None = Field(
        None, description="KV tiers of every replica (docs/kv-cache.md); a shared disk_path or redis_url lets "
        "replicas reuse each other's prefixes.")
    gateway_args: list[str] = Field(default_factory=list, description="Extra args for `inferstack gateway serve`.")
    with_prometheus: bool = Field(False, description="Also start a Prometheus that scrapes the stack.")
    prometheus_binary: str = Field("prometheus", description="Prometheus executable (name on PATH or path).")
    scrape_interval_s: float = Field(2.0, gt=0, description="Prometheus scrape and rule interval.")
    ready_timeout_s: float = Field(600.0, gt=0, description="How long a child may take to become ready.")
    stop_timeout_s: float = Field(15.0, gt=0, description="Bounded wait after SIGTERM before SIGKILL.")
    log_dir: str | None = Field(None, description="Where child logs go; default: a fresh temp directory.")
    restart: RestartPolicy = Field(default_factory=RestartPolicy)
    pd: PDSettings | None = Field(
        None, description="Run `prefill` + `decode` engines with PD roles behind a PD pool; the engine count "
        "is their sum (`replicas`, if given, must equal it).")
    kv_transport: KVTransport = Field(
        "auto", description="How PD (and kv_reuse) engines move KV (`engine serve --kv-transport`): nixl (NIXL "
        "over UCX), "
        "shm (shared memory on one host, TCP otherwise), tcp; auto = nixl when it imports and UCX starts, "
        "else shm (docs/disaggregation.md).")
    kv_reuse: bool = Field(
        False, description="Cross-replica KV reuse: every replica runs `engine serve --kv-reuse` (a KV transfer "
        "server and KV events on free ports) and the gateway's pool `default` gets each replica's `kv_events` "
        "and `kv_transfer` plus the precise prefix index, so a replica READs a prompt prefix another replica "
        "holds over NIXL instead of computing it (docs/disaggregation.md, 'Cross-replica reads'). Colocated, "
        "real, fixed replicas only; without NIXL the engines log that reuse is off and serve as usual.")
    autoscale: AutoscaleSettings | None = Field(
        None, description="Scale the engine replicas with a policy between min and max replicas, down to zero "
        "(docs/autoscaling.md); `replicas` is then the count at start, within the bounds (at least 1).")

    @field_validator("emulate")
    @classmethod
    def _emulate_shape(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError(f"emulate must look like HARDWARE:MODEL (e.g. 'h100:llama-3-8b'), got {v!r}")
        return v

    @model_validator(mode="after")
    def _emulated_kv(self) -> UpSettings:
        if self.emulate and self.kv is not None:
            raise ValueError("kv tiers need real engines: an emulated engine holds no KV bytes to store "
                             "(drop `kv` or `emulate`)")
        return self

    @model_validator(mode="after")
    def _pd_engine_count(self) -> UpSettings:
        if self.pd is None:
            return self
        total = self.pd.prefill + self.pd.decode
        if "replicas" in self.model_fields_set and self.replicas != total:
            raise ValueError(f"replicas={self.replicas} contradicts pd (prefill {self.pd.prefill} + decode "
                             f"{self.pd.decode} = {total} engines); drop replicas or make it {total}")
        self.replicas = total
        self.__pydantic_fields_set__.discard("replicas")  # derived: a later override of pd must not clash
        return self

    @model_validator(mode="after")
    def _autoscale_colocated(self) -> UpSettings:
        if self.autoscale is not None and self.pd is not None:
            raise ValueError("autoscale scales colocated replicas; with pd, scale prefill and decode on "
                             "Kubernetes (docs/autoscaling.md) or drop one of them")
        return self

    @model_validator(mode="after")
    def _kv_reuse_scope(self) -> UpSettings:
        if not self.kv_reuse:
            return self
        clash = ("emulate (emulated engines hold no KV bytes)" if self.emulate else
                 "pd (a PD pool moves KV from prefill to decode engines already)" if self.pd else
                 "autoscale (replicas that come and go are not wired for it yet)" if self.autoscale else None)
        if clash is not None:
            raise ValueError(f"kv_reuse reads prefixes between colocated replicas: drop it or {clash}")
        return self

    def roles(self) -> list[str | None]:
        """Each engine's PD role in start order (None: colocated)."""
        if self.pd is None:
            return [None] * self.replicas
        return ["prefill"] * self.pd.prefill + ["decode"] * self.pd.decode

    def threads_per_engine(self) -> int:
        return self.threads or max(1, usable_cores() // self.replicas)


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
