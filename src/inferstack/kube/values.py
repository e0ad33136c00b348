"""Helm values for the packaged chart (assets/deploy/helm/inferstack) from the inferstack.yaml people
run locally, so one file drives `inferstack up` and the cluster (docs/kubernetes-chart.md).

Mapping: the `up` section gives the model, engine count and PD split; one pool's routing/flow-control
settings and the gateway-wide sections (objectives, keys, tenants, routing profiles, audit, gateway
limits) go to the endpoint picker's inferstack.yaml; `trust` becomes the init container's trust policy
(PEM files inlined, since the cluster cannot read local paths).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from inferstack.config.schema import InferstackConfig, PoolConfig

CHART_DIR = Path(__file__).resolve().parents[1] / "assets" / "deploy" / "helm" / "inferstack"
ENGINES = ("inferstack", "vllm", "sglang")
_DNS = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# gateway settings the picker gets from its flags or that only make sense for the local HTTP gateway
# up.kv_reuse: the Secret (key `secret`) engines and picker share; created by the operator (docs/disaggregation.md)
KV_SECRET_NAME = "inferstack-kv-transfer"
_LOCAL_GATEWAY_KEYS = {"host", "port", "admin_api"}


class ValuesError(ValueError):
    """The config cannot be turned into chart values; the message says what to change."""


def chart_values(cfg: InferstackConfig, config_dir: Path, *, pool: str | None = None, engine: str = "inferstack",
                 model_uri: str | None = None, gateway: str | None = None) -> dict[str, Any]:
    """Chart values for ``pool`` (default: the config's only pool, or `default` when it has none)."""
    if engine not in ENGINES:
        raise ValuesError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    pool_name, pool_cfg = _pick_pool(cfg, pool)
    up = cfg.up
    uri = model_uri or up.model
    if engine != "inferstack" and not re.match(r"^(oci|pvc|hf)://", uri):
        raise ValuesError(f"--engine {engine} needs an oci://, pvc:// or hf:// model (--model-uri); "
                          f"{uri!r} is an inferstack alias or local path")
    values: dict[str, Any] = {
        "modelArtifacts": {"name": _served_name(cfg, pool_name, pool_cfg,
                                                up.emulate.split(":", 1)[1] if up.emulate else uri),
                           "uri": uri},
        "engine": {"type": engine},
        "decode": {"replicas": up.pd.decode if up.pd else up.replicas},
        "prefill": {"replicas": up.pd.prefill if up.pd else 0},
        "inferencePool": {"name": pool_name},
        "inferenceExtension": {"poolConfig": _pool_config(pool_cfg, cfg), "config": _picker_sections(cfg, pool_name)},
    }
    if engine == "inferstack" and up.engine_args:
        values["engine"]["extraArgs"] = list(up.engine_args)
    if up.emulate and engine == "inferstack":
        values["engines"] = {"inferstack": {"emulate": up.emulate}}
        values["accelerator"] = {"type": "cpu"}
    if engine == "inferstack" and up.kv_transport != "auto":
        values.setdefault("engines", {}).setdefault("inferstack", {})["kvTransport"] = up.kv_transport
    if engine == "inferstack" and up.kv_reuse:
        if pool_cfg is None or pool_cfg.precise_prefix is None:
            raise ValuesError(f"up.kv_reuse on Kubernetes needs pools.{pool_name}.precise_prefix (model_digest, "
                              "dtype: the engines' KV key space) so the picker indexes the pods' KV events")
        values.setdefault("engines", {}).setdefault("inferstack", {}).update(
            kvReuse=True, kvTransferSecret=KV_SECRET_NAME)
    if cfg.trust is not None:
        values["modelArtifacts"]["trust"] = _trust(cfg, config_dir)
    if gateway:
        values["httpRoute"] = {"gatewayName": gateway}
    return values


def _pick_pool(cfg: InferstackConfig, pool: str | None) -> tuple[str, PoolConfig | None]:
    if pool is None:
        if len(cfg.pools) > 1:
            raise ValuesError(f"the config has {len(cfg.pools)} pools ({', '.join(cfg.pools)}); "
                              "choose one with --pool (the chart deploys one InferencePool)")
        pool = next(iter(cfg.pools), "default")
    elif pool not in cfg.pools:
        raise ValuesError(f"unknown pool {pool!r}; the config has: {', '.join(cfg.pools) or 'none'}")
    if not _DNS.match(pool):
        raise ValuesError(f"pool name {pool!r} is not a valid Kubernetes name (lowercase letters, digits, '-'); "
                          "rename it in the config: it becomes the InferencePool's name")
    return pool, cfg.pools.get(pool)


def _served_name(cfg: InferstackConfig, pool: str, pool_cfg: PoolConfig | None, uri: str) -> str:
    """The model name engines serve: the upstream name of a `models:` target on this pool, else the
    pool's first model, else the last path segment of the model reference."""
    for public, model in cfg.models.items():
        for t in model.targets:
            if t.pool == pool:
                return t.model or public
    if pool_cfg is not None and pool_cfg.models:
        return pool_cfg.models[0]
    last = uri.split("://", 1)[-1].split("@", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return last.split(":", 1)[0] or uri


def _pool_config(pool_cfg: PoolConfig | None, cfg: InferstackConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"routing": "default"}
    if pool_cfg is not None:
        out.update(pool_cfg.model_dump(mode="json", exclude_defaults=True,
                                       exclude={"endpoints", "kubernetes", "models"}))
    if cfg.up.pd is not None and "pd" not in out:
        pd = {"enabled": True, "threshold_tokens": cfg.up.pd.threshold_tokens}
        if cfg.up.pd.max_prefill_queue is not None:
            pd["max_prefill_queue"] = cfg.up.pd.max_prefill_queue
        out["pd"] = pd
    return out


def _picker_sections(cfg: InferstackConfig, pool: str) -> dict[str, Any]:
    """Gateway-wide sections the picker enforces as the HTTP gateway does (only what differs from the
    defaults, so the chart's ConfigMap stays readable)."""
    dumped = cfg.model_dump(mode="json", exclude_defaults=True,
                            include={"gateway", "objectives", "keys", "tenants", "routing", "audit"})
    gw = {k: v for k, v in dumped.get("gateway", {}).items() if k not in _LOCAL_GATEWAY_KEYS}
    dumped.pop("gateway", None)
    if gw:
        dumped["gateway"] = gw
    models: dict[str, Any] = {}
    for name, m in cfg.models.items():  # the picker serves one pool: keep the targets on it
        targets = [t.model_dump(mode="json", exclude_defaults=True) for t in m.targets if t.pool == pool]
        if targets:
            models[name] = {**m.model_dump(mode="json", exclude_defaults=True, exclude={"targets"}),
                            "targets": targets}
    if models:
        dumped["models"] = models
    return dumped


def _trust(cfg: InferstackConfig, config_dir: Path) -> dict[str, Any]:
    t = cfg.trust
    assert t is not None

    def pem(paths: list[Path], kind: str) -> dict[str, str]:
        out: dict[str, str] = {}
        for i, p in enumerate(paths):
            path = p if p.is_absolute() else config_dir / p
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValuesError(f"trust.{kind}[{i}]: cannot read {path}: {exc.strerror}") from None
            name = re.sub(r"[^A-Za-z0-9._-]", "-", path.name)
            out[name if name not in out else f"{i}-{name}"] = text
        return out

    return {"requireSignature": t.require_signature, "publicKeys": pem(t.trusted_keys, "trusted_keys"),
            "certChains": pem(t.trusted_cert_chains, "trusted_cert_chains"),
            "allowedRegistries": list(t.allowed_registries), "pinnedDigests": dict(t.pinned_digests),
            "requireDigest": t.require_digest, "allowUnsignedFiles": t.allow_unsigned_files}
