"""The load gate: the engine calls `verify_before_load` and loads nothing unless it returns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from inferstack.modelhub.errors import ModelVerificationError
from inferstack.modelhub.policy import TrustPolicy
from inferstack.modelhub.signing import SIGNATURE_NAME
from inferstack.modelhub.verify import VerificationReport, verify_model

__all__ = ["ModelVerificationError", "VerificationReport", "find_signatures", "verify_before_load"]


def find_signatures(path: Path) -> tuple[Path, list[Path]]:
    """(the scope that was signed, candidate bundles) for a model folder or file.

    A file F is signed on its own by `F.sig`; otherwise its folder is the model. A folder D carries
    `D/model.sig`, and models from the store keep their bundles in the sibling `D.sigs/`.
    """
    if path.is_file():
        own = path.with_name(path.name + ".sig")
        if own.is_file():
            return path, [own]
        folder, bundles = find_signatures(path.parent)
        return (folder, bundles) if bundles else (path, [])
    bundles = []
    inside = path / SIGNATURE_NAME
    if inside.is_file():
        bundles.append(inside)
    sidecar = path.with_name(path.name + ".sigs")
    if sidecar.is_dir():
        bundles += sorted(sidecar.glob("*.json"))
    return path, bundles


def verify_before_load(
    path: Path, policy: TrustPolicy, *, signatures: list[Path] | None = None, audit: Any | None = None
) -> VerificationReport:
    """Raise ModelVerificationError (naming the offending files) unless `policy` allows loading `path`.

    With an `AuditLog`, the verdict (either way) is recorded as a `model.verification` event.
    """
    try:
        report = _verify(Path(path), policy, signatures)
    except ModelVerificationError as e:
        if audit is not None:
            audit.event("model.verification", path=str(path), status="refused", error=str(e), files=e.files,
                        policy_version=policy.version)
        raise
    if audit is not None:
        audit.event("model.verification", path=report.path, status=report.status, signer=report.signer,
                    root_digest=report.root_digest, policy_version=policy.version)
    return report


def _verify(path: Path, policy: TrustPolicy, signatures: list[Path] | None) -> VerificationReport:
    if not path.exists():
        raise ModelVerificationError(f"model path {path} does not exist")
    scope, found = find_signatures(path)
    bundles = list(signatures) if signatures else found
    anchors = policy.anchors()
    if not bundles:
        if policy.require_signature:
            raise ModelVerificationError(
                f"model at {scope} is unsigned, and the trust policy requires a signature "
                "(sign it with `inferstack model sign`, or set trust.require_signature: false)"
            )
        return VerificationReport(path=str(scope), status="unsigned-allowed",
                                  notes=["no signature; policy does not require one"])
    if not anchors:
        if policy.require_signature:
            raise ModelVerificationError(
                "trust policy requires signatures but lists no trusted_keys or trusted_cert_chains"
            )
        return VerificationReport(path=str(scope), status="unsigned-allowed", signature=str(bundles[0]),
                                  notes=["signature present but not checked: no trusted keys configured"])
    return verify_model(scope, bundles, anchors, allow_unsigned_files=policy.allow_unsigned_files)
