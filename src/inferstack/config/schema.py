"""The one top-level schema of `inferstack.yaml`.

Each capability owns a section; this file starts with the gateway's sections (`gateway`, `pools`,
`models`, `objectives`, `keys`, `tenants`, `routing`). Later capabilities add their own section
here rather than a second schema.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from inferstack.autoscale.config import HoldConfig
from inferstack.compliance.config import AuditConfig
from inferstack.config.pd import EndpointRole, PDConfig, pd_problems
from inferstack.config.workers import worker_problems
from inferstack.gateway.routing.registry import FILTERS, PICKERS, PRESETS, SCORERS
from inferstack.kube.config import KubernetesPoolConfig, LeaderElectionConfig
from inferstack.modelhub.policy import TrustPolicy
from inferstack.protocol.http_limits import BODY_TIMEOUT_S, HEADER_TIMEOUT_S, MAX_HEADER_BYTES
from inferstack.stack.settings import UpSettings

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$"
Name = Annotated[str, Field(pattern=_NAME, max_length=200)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class EndpointConfig(_Section):
    """One OpenAI-compatible engine (inferstack, vLLM, SGLang, llama.cpp server, ...)."""

    url: str = Field(description="Base URL, e.g. http://10.0.0.5:8000 (the gateway appends /v1/...).")
    name: str | None = Field(None, description="Label used in metrics; defaults to host:port.")
    kv_events: str | None = Field(
        None, description="ZMQ PUB endpoint of the engine's KV events (tcp://host:port) for the precise prefix index.")
    api_key: str | None = Field(None, description="Bearer key the gateway sends to this endpoint.")
    kv_transfer: str | None = Field(
        None, pattern=r"^[^\s:/]+:[0-9]{1,5}$",
        description="HOST:PORT of the engine's KV transfer server (`engine serve --kv-reuse --kv-transfer-port`): "
                    "where other replicas READ the prefixes it holds (precise_prefix.direct_reads).")
    role: EndpointRole = Field(
        "both", description="PD role (`engine serve --role`); prefill/decode need the pool's `pd`.")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if v.startswith("https://"):
            raise ValueError("https:// endpoints are not supported: the gateway speaks plain HTTP to engines "
                             "(run it next to them, or terminate TLS in a sidecar); use http://")
        if not re.match(r"^http://[^/\s]+", v):
            raise ValueError("must be an http:// URL such as http://127.0.0.1:8000")
        return v.rstrip("/").removesuffix("/v1")


class SpilloverConfig(_Section):
    """Send a pool's requests to another pool (e.g. a remote OpenAI-compatible provider, with its own
    `api_key` on its endpoint) while this one cannot take them (docs/autoscaling.md, "Spill-over")."""

    pool: Name = Field(description="The fallback pool (configured under `pools`).")
    model: Name | None = Field(None, description="Model name sent to the fallback; default: the same as locally.")
    when: list[Literal["no_replica", "saturated"]] = Field(
        default_factory=lambda: ["no_replica", "saturated"], min_length=1,
        description="`no_replica`: no healthy endpoint (replicas starting, scaled to zero); `saturated`: flow "
                    "control would queue the request.")


class PoolConfig(_Section):
    """Endpoints that serve the same model(s)."""

    endpoints: list[EndpointConfig] = Field(
        default_factory=list, description="The engines; or leave empty and set `kubernetes` to discover them.")
    kubernetes: KubernetesPoolConfig | None = Field(
        None, description="Discover the endpoints from Kubernetes pods (docs/kubernetes-chart.md).")
    models: list[Name] = Field(
        default_factory=list,
        description="Model names the endpoints serve. Empty: discovered from the endpoints' /v1/models.")
    lora_adapters: list[Name] = Field(
        default_factory=list, description="LoRA adapter names served by this pool (routed with LoRA affinity).")
    routing: str = Field("default", description="A preset (default, gie, cache-aware, least-load, "
                         "round-robin, power-of-two) or a profile name from `routing.profiles`.")
    max_concurrency: int | None = Field(
        None, ge=1, description="Most requests in flight per endpoint: the router skips a full endpoint while "
                                 "another has room, and flow control queues requests while all are full.")
    precise_prefix: PrecisePrefixConfig | None = Field(
        None, description="Score prefixes from the engines' KV events (needs `kv_events` on endpoints).")
    pd: PDConfig | None = Field(None, description="Prefill/decode disaggregation over the endpoints' roles.")
    spillover: SpilloverConfig | None = Field(
        None, description="A fallback pool for requests this pool cannot take now (never for `local_only` tenants).")
    model_digest: str | None = Field(
        None, pattern=r"^sha256:[0-9a-f]{64}$",
        description="Digest of the model the endpoints serve (e.g. its ModelPack manifest digest), written into "
                    "audit records; default: precise_prefix.model_digest when set.")
    scale_from_zero: HoldConfig | None = Field(
        None, description="Hold requests at the gateway while no endpoint is ready (an autoscaler is starting "
        "one) instead of answering 503; docs/autoscaling.md.")

    @field_validator("endpoints", mode="before")
    @classmethod
    def _plain_urls(cls, v: object) -> object:
        if isinstance(v, list):
            return [{"url": e} if isinstance(e, str) else e for e in v]
        return v

    @model_validator(mode="after")
    def _endpoint_source(self) -> PoolConfig:
        # a pool that scales from zero may start without a replica (`inferstack up --min-replicas 0`)
        if not self.endpoints and self.kubernetes is None and self.scale_from_zero is None:
            raise ValueError("a pool needs `endpoints` (at least one URL) or `kubernetes` (discovery)")
        if self.endpoints and self.kubernetes is not None:
            raise ValueError("set either `endpoints` or `kubernetes`, not both")
        return self


class PrecisePrefixConfig(_Section):
    """Key space of the engines' KV block hashes (docs/architecture.md, "KV hashing")."""

    model_digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    dtype: str = "float32"
    kv_layout: str = "paged"
    block_size: int = Field(16, ge=1)
    direct_reads: bool = Field(
        True, description="When another replica holds more of a prompt's leading blocks than the chosen one, "
        "name it (signed with $INFERSTACK_KV_TRANSFER_SECRET) so the chosen engine READs them over NIXL "
        "(docs/disaggregation.md, 'Cross-replica reads'); needs `kv_transfer` on the endpoints.")
    direct_min_blocks: int = Field(2, ge=1, description="Direct reads only for a lead of at least this many blocks.")


class TargetConfig(_Section):
    pool: Name
    model: Name | None = Field(None, description="Model name sent upstream; defaults to the public name.")
    weight: float = Field(1.0, gt=0, description="Share of traffic for weighted splits (canary).")


class ModelConfig(_Section):
    """A public model name: aliases and a weighted split over pools."""

    aliases: list[Name] = Field(default_factory=list)
    targets: list[TargetConfig] = Field(min_length=1)


class ObjectiveConfig(_Section):
    """Named by the `x-gateway-inference-objective` header. Higher priority is served first; < 0 is sheddable."""

    priority: int = 0


class KeyConfig(_Section):
    """An API key, stored as its sha256 hex digest (`inferstack gateway hash-key KEY`)."""

    name: str | None = None
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    tenant: Name
    models: list[Name] | None = Field(None, description="Allowed public model names; absent = all.")
    objective: Name | None = Field(None, description="Default objective for requests with this key.")
    max_objective: Name | None = Field(
        None, description="Highest objective this key may request with x-gateway-inference-objective; a "
        "higher one is capped to it. Default: the key's own objective (priority 0 without one).")


class TenantConfig(_Section):
    rpm: int | None = Field(None, ge=1, description="Requests per minute across all gateway replicas.")
    tpm: int | None = Field(None, ge=1, description="Input + output tokens per minute (from usage).")
    cache_salt: str | None = Field(
        None, description="Prefix-cache isolation domain; tenants with the same salt share cache entries. "
        "Defaults to the tenant name.")
    weight: float = Field(1.0, gt=0, description="Fair-share weight within a priority band.")
    local_only: bool = Field(False, description="Never send this tenant's requests to a spill-over pool "
                                                "(data that must stay on local replicas).")


class ProfileConfig(_Section):
    """filters -> weighted scorers (each in [0,1]) -> picker."""

    filters: list[str] = Field(default_factory=list)
    scorers: dict[str, float] = Field(min_length=1)
    picker: str = "max-score"

    @field_validator("filters")
    @classmethod
    def _filters(cls, v: list[str]) -> list[str]:
        for f in v:
            if f not in FILTERS:
                raise ValueError(f"unknown filter {f!r}; known: {', '.join(sorted(FILTERS))}")
        return v

    @field_validator("scorers")
    @classmethod
    def _scorers(cls, v: dict[str, float]) -> dict[str, float]:
        for s, w in v.items():
            if s not in SCORERS:
                raise ValueError(f"unknown scorer {s!r}; known: {', '.join(sorted(SCORERS))}")
            if w < 0:
                raise ValueError(f"scorer {s!r} has a negative weight")
        return v

    @field_validator("picker")
    @classmethod
    def _picker(cls, v: str) -> str:
        if v not in PICKERS:
            raise ValueError(f"unknown picker {v!r}; known: {', '.join(sorted(PICKERS))}")
        return v


class RoutingConfig(_Section):
    profiles: dict[Name, ProfileConfig] = Field(default_factory=dict)


class FlowControlConfig(_Section):
    enabled: bool = True
    max_queued: int = Field(10_000, ge=0, description="Requests waiting across all priorities (bounded memory).")
    queue_timeout_s: float = Field(30.0, gt=0)
    queue_threshold: float = Field(5.0, gt=0, description="Waiting requests at which an endpoint is saturated.")
    kv_threshold: float = Field(0.8, gt=0, le=1, description="KV use at which an endpoint is saturated.")
    queue_wait_s: float = Field(
        1.0, gt=0, description="Most an engine's own queue may hold, in time: what it starts within this many "
        "seconds at its measured pace while full; the rest waits at the gateway (docs/gateway.md).")


class PrefixIndexConfig(_Section):
    block_chars: int = Field(64, ge=4, description="Characters per hashed block (16 tokens x ~4 chars).")
    max_blocks: int = Field(256, ge=1, description="Blocks hashed per request (caps work on long prompts).")
    capacity_per_endpoint: int = Field(31_250, ge=1, description="LRU blocks remembered per endpoint.")


class TracingConfig(_Section):
    exporter: Literal["none", "otlp", "console"] = "none"
    endpoint: str | None = Field(None, description="OTLP endpoint (http://host:4318/v1/traces).")


class LimitsConfig(_Section):
    """What RPM/TPM enforcement does when its store (Redis) fails (docs/security.md)."""

    on_store_failure: Literal["refuse", "allow"] = Field(
        "refuse", description="refuse: 503 with Retry-After while the store is unreachable; allow: serve "
        "without limits. Both are logged, counted and audited.")
    store_timeout_s: float = Field(0.25, gt=0, le=10, description="Connect and reply timeout for the store.")
    store_retry_s: float = Field(
        1.0, ge=0, description="After a store failure, apply the policy at once for this long before "
        "trying again.")
    default_max_tokens: int = Field(
        64, ge=1, description="Output tokens TPM reserves per completion for a request without max_tokens "
        "(settled to the real usage afterwards).")


class HttpLimitsConfig(_Section):
    """Bounds on what a client may send the gateway before it is refused (docs/security.md)."""

    max_header_bytes: int = Field(
        MAX_HEADER_BYTES, ge=1024, description="Request line + headers; more gets 431.")
    header_timeout_s: float = Field(
        HEADER_TIMEOUT_S, gt=0,
        description="From connect (or the previous response) to the last header; else 408.")
    body_timeout_s: float = Field(BODY_TIMEOUT_S, gt=0, description="Reading the whole body; else 408.")
    max_prompts: int = Field(
        128, ge=1, description="Completions: prompts x n per request (each becomes an engine request).")


class GatewayConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    max_body_bytes: int = Field(8 << 20, ge=1024)
    connect_timeout_s: float = Field(5.0, gt=0)
    request_timeout_s: float = Field(600.0, gt=0)
    max_retries: int = Field(
        2, ge=0, description="Other endpoints tried on connection errors / 5xx before the first byte.")
    scrape_interval_s: float = Field(0.05, gt=0)
    metrics_stale_s: float = Field(0.2, gt=0, description="Older scraped metrics count as saturated.")
    health_interval_s: float = Field(2.0, gt=0)
    eject_after_failures: int = Field(3, ge=1, description="Consecutive failed requests that eject an endpoint.")
    eject_s: float = Field(5.0, gt=0, description="How long a passively ejected endpoint is skipped.")
    require_keys: bool | None = Field(
        None, description="Reject requests without a key; default: when keys are configured.")
    default_tenant: Name = "default"
    redis_url: str | None = Field(None, description="Shared RPM/TPM limits across replicas (redis://host:port/0).")
    admin_api: bool | None = Field(
        None, description="Serve PUT /admin/pools/{pool}/endpoints (the local stack replaces a pool's endpoints "
        "through it). Default: on when bound to a loopback address. Needs the admin token (admin_token_env).")
    admin_token_env: str = Field(
        "INFERSTACK_ADMIN_TOKEN", description="Environment variable with the admin API's bearer token; the "
        "API is off while it is unset (`inferstack up` generates one and passes it).")
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    http: HttpLimitsConfig = Field(default_factory=HttpLimitsConfig)
    flow_control: FlowControlConfig = Field(default_factory=FlowControlConfig)
    prefix_index: PrefixIndexConfig = Field(default_factory=PrefixIndexConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    workers: int = Field(
        1, ge=1, le=64, description="Gateway processes sharing the port (SO_REUSEPORT); each runs the whole "
        "pipeline with its share of every endpoint's max_concurrency. Raise it when one gateway core is busy "
        "(docs/gateway.md, Workers).")


class EppConfig(_Section):
    """`inferstack epp serve`: the Envoy ext_proc endpoint picker (docs/kubernetes.md)."""

    host: str = "127.0.0.1"
    port: int = Field(9002, ge=0, le=65535, description="gRPC ext_proc port (GIE's extProcPort).")
    health_port: int = Field(9003, ge=0, le=65535, description="gRPC health (liveness, readiness).")
    metrics_port: int = Field(9090, ge=0, le=65535, description="Prometheus /metrics over HTTP.")
    pool: Name | None = Field(
        None, description="The pool this picker serves; needed when several are configured.")
    conformance_hooks: bool = Field(False, description="GIE conformance test headers; never in production.")
    fallback_endpoints: int = Field(
        0, ge=0, le=8, description="Endpoints listed after the pick in the destination (`ip:port,ip:port,...`, "
        "least loaded first) for gateways whose load balancer walks the list on retry, as Envoy's override_host "
        "policy does. Keep 0 with an ORIGINAL_DST cluster, which reads a single address.")
    leader_election: LeaderElectionConfig | None = Field(
        None, description="Several picker replicas, one active: the Lease holder (docs/kubernetes.md). Off: "
                          "every replica routes with its own view of the pool.")


class InferstackConfig(_Section):
    version: Literal[1] = 1
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    epp: EppConfig = Field(default_factory=EppConfig)
    pools: dict[Name, PoolConfig] = Field(default_factory=dict)
    models: dict[Name, ModelConfig] = Field(default_factory=dict)
    objectives: dict[Name, ObjectiveConfig] = Field(default_factory=dict)
    keys: list[KeyConfig] = Field(default_factory=list)
    tenants: dict[Name, TenantConfig] = Field(default_factory=dict)
    routing: RoutingConfig = Field(default_factory=RoutingConfig)
    up: UpSettings = Field(default_factory=UpSettings, description="The local stack `inferstack up` runs.")
    audit: AuditConfig | None = Field(None, description="Per-request audit log (docs/compliance.md); off when absent.")
    trust: TrustPolicy | None = Field(None, description="Which models engines may load (docs/supply-chain.md).")

    def cross_check(self) -> list[tuple[tuple[str | int, ...], str]]:
        """References between sections, as (location, message) pairs."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        profiles = set(PRESETS) | set(self.routing.profiles)
        for name, pool in self.pools.items():
            if pool.routing not in profiles:
                problems.append((("pools", name, "routing"),
                                 f"unknown routing {pool.routing!r}; known: {', '.join(sorted(profiles))}"))
        problems += pd_problems(self.pools, profiles)
        problems += worker_problems(self)
        for name, pool in self.pools.items():
            auto = pool.kubernetes.autoscale if pool.kubernetes is not None else None
            pd = pool.pd is not None and pool.pd.enabled
            if auto is not None and pd != ("both" not in auto.deployments):
                problems.append((("pools", name, "kubernetes", "autoscale", "deployments"),
                                 "a PD pool (pd.enabled) scales `prefill` and `decode` Deployments; an aggregated "
                                 "pool scales one Deployment under `both`"))
            spill = pool.spillover
            if spill is None:
                continue
            where = ("pools", name, "spillover", "pool")
            if spill.pool == name or spill.pool not in self.pools:
                problems.append((where, f"spill-over pool {spill.pool!r} must be another configured pool"))
            elif self.pools[spill.pool].spillover is not None:
                problems.append((where, f"pool {spill.pool!r} spills over itself; spill-over does not chain"))
        public: dict[str, tuple[str | int, ...]] = {}
        for name, model in self.models.items():
            for i, t in enumerate(model.targets):
                if t.pool not in self.pools:
                    problems.append((("models", name, "targets", i, "pool"), f"unknown pool {t.pool!r}"))
            for alias in [name, *model.aliases]:
                if alias in public:
                    problems.append((("models", name), f"model name {alias!r} is defined twice"))
                public[alias] = ("models", name)
        for i, key in enumerate(self.keys):
            for field, name in (("objective", key.objective), ("max_objective", key.max_objective)):
                if name is not None and name not in self.objectives:
                    problems.append((("keys", i, field), f"unknown objective {name!r}"))
        hashes = [k.sha256 for k in self.keys]
        if len(set(hashes)) != len(hashes):
            problems.append((("keys",), "the same key hash appears twice"))
        return problems


PoolConfig.model_rebuild()
