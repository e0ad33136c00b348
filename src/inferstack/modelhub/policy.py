"""Trust policy: the `trust:` section of inferstack.yaml (the lead mounts it in the config schema)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, field_validator

from inferstack.modelhub.reference import DIGEST_RE

if TYPE_CHECKING:
    from inferstack.modelhub.verify import TrustAnchor


class TrustPolicy(BaseModel):
    """Which models the engine may load. Fail closed: anything not allowed here is refused."""

    model_config = ConfigDict(extra="forbid")

    version: str = Field("1", description="Your own label for this policy; reported in audits and compliance.")
    require_signature: bool = Field(True, description="Refuse models without a signature by a trusted key/cert.")
    trusted_keys: list[Path] = Field(default_factory=list, description="PEM public keys (EC P-256/384/521).")
    trusted_cert_chains: list[Path] = Field(
        default_factory=list, description="PEM files with the CA certificate(s) a signing certificate must chain to."
    )
    allowed_registries: list[str] = Field(
        default_factory=list, description="Registry hosts (host[:port]) models may come from; empty allows any."
    )
    pinned_digests: dict[str, str] = Field(
        default_factory=dict,
        description="registry/repo[:tag] -> sha256 manifest digest; a pinned ref resolves to exactly that digest.",
    )
    require_digest: bool = Field(False, description="oci:// references must be pinned (by @sha256: or pinned_digests).")
    allow_unsigned_files: bool = Field(
        False, description="Tolerate files the signature does not cover (they are still never trusted)."
    )

    @field_validator("pinned_digests")
    @classmethod
    def _digests(cls, v: dict[str, str]) -> dict[str, str]:
        for ref, digest in v.items():
            if not DIGEST_RE.match(digest):
                raise ValueError(f"pinned_digests[{ref!r}] = {digest!r} is not sha256:<64 hex digits>")
        return v

    def anchors(self) -> list[TrustAnchor]:
        from inferstack.modelhub.verify import TrustAnchor  # cryptography only once something is verified

        return [TrustAnchor("key", p) for p in self.trusted_keys] + [
            TrustAnchor("certificate", p) for p in self.trusted_cert_chains
        ]


def load_trust_policy(path: Path) -> TrustPolicy:
    """A standalone trust-policy YAML (the same fields as the `trust:` section); errors name the file."""
    import yaml
    from pydantic import ValidationError

    from inferstack.modelhub.errors import ModelHubError

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ModelHubError(f"{path}: cannot read trust policy: {e}") from e
    if not isinstance(data, dict):
        raise ModelHubError(f"{path}: a trust policy is a mapping of settings")
    data = data.get("trust", data)
    try:
        policy = TrustPolicy(**data)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ModelHubError(f"{path}: trust.{where}: {first['msg']}") from e
    base = path.parent  # relative key paths are relative to the policy file
    return policy.model_copy(update={
        "trusted_keys": [p if p.is_absolute() else base / p for p in policy.trusted_keys],
        "trusted_cert_chains": [p if p.is_absolute() else base / p for p in policy.trusted_cert_chains],
    })
