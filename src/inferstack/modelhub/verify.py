"""Offline verification of a model folder/file against OMS signature bundles.

Step 1: the bundle's signature must verify against one trusted public key or certificate chain
(model_signing's verifiers). Step 2: the files on disk must be exactly the signed ones: every signed
file present with the signed digest, nothing extra (unless allowed), nothing missing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from inferstack.modelhub.dsse import (
    BundleRejected,
    SignedManifest,
    from_model_signing,
    is_key_bundle,
    key_hint,
    verify_key_bundle,
)
from inferstack.modelhub.errors import ModelVerificationError
from inferstack.modelhub.signing import SUPPORTED_HASHES, hash_files, model_files, unsigned_extras


@dataclass(frozen=True)
class TrustAnchor:
    """A trusted public key or CA chain, as named in the trust policy."""

    kind: str  # "key" | "certificate"
    path: Path

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.path}"

    def check(self, bundle_path: Path, bundle: dict[str, Any]) -> SignedManifest:
        """The signed manifest if this anchor accepts the bundle; raises otherwise."""
        if not self.path.is_file():
            raise ModelVerificationError(f"trusted {self.kind} {self.path} not found (check the trust policy)")
        if self.kind == "key":
            if not is_key_bundle(bundle):
                raise BundleRejected("bundle is certificate-signed, not signed by a bare key")
            return verify_key_bundle(bundle, self._public_key())
        from model_signing._signing import sign_certificate, sign_sigstore_pb

        try:
            verifier = sign_certificate.Verifier([self.path])
        except ValueError as e:
            raise ModelVerificationError(f"trusted certificate chain {self.path} is not usable: {e}") from e
        return from_model_signing(verifier.verify(sign_sigstore_pb.Signature.read(bundle_path)))

    def _public_key(self) -> ec.EllipticCurvePublicKey:
        try:
            key = serialization.load_pem_public_key(self.path.read_bytes())
        except ValueError as e:
            raise ModelVerificationError(f"trusted key {self.path} is not a PEM public key: {e}") from e
        if not isinstance(key, ec.EllipticCurvePublicKey):
            raise ModelVerificationError(f"trusted key {self.path} is not an EC key (P-256/384/521 required)")
        return key

    def fingerprint(self) -> str | None:
        return key_hint(self._public_key()) if self.kind == "key" else None


@dataclass
class VerificationReport:
    """A successful (or policy-permitted unsigned) verification."""

    path: str
    status: str  # "verified" | "unsigned-allowed"
    signer: str | None = None
    key_fingerprint: str | None = None
    signature: str | None = None
    algorithm: str | None = None
    root_digest: str | None = None
    files: int = 0
    bytes: int = 0
    seconds: float = 0.0
    manifest_digest: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class _Accepted:
    anchor: TrustAnchor
    manifest: SignedManifest


def _read_bundle(bundle: Path) -> dict[str, Any]:
    try:
        data = json.loads(bundle.read_bytes())
    except (OSError, ValueError) as e:
        raise ModelVerificationError(f"signature {bundle} is not a valid Sigstore bundle: {e}") from e
    if not isinstance(data, dict) or "dsseEnvelope" not in data or "verificationMaterial" not in data:
        raise ModelVerificationError(f"signature {bundle} is not a valid Sigstore bundle (no DSSE envelope)")
    return data


def check_bundle(bundle: Path, anchors: list[TrustAnchor]) -> tuple[_Accepted | None, list[str]]:
    """Try each trusted anchor on one bundle; (accepted, reasons for rejections)."""
    data = _read_bundle(bundle)
    reasons = []
    for anchor in anchors:
        try:
            manifest = anchor.check(bundle, data)
        except ModelVerificationError:
            raise
        except Exception as e:  # invalid signature / key mismatch / untrusted chain, all reported below
            reasons.append(f"{anchor.label}: {str(e).strip() or e.__class__.__name__}")
            continue
        return _Accepted(anchor, manifest), reasons
    return None, reasons


def compare_files(path: Path, manifest: SignedManifest, allow_unsigned_files: bool = False) -> tuple[int, int, str]:
    """Hash the files at `path` the way the signature did and compare; raise naming every bad file."""
    serialization = manifest.serialization
    method = serialization.get("method")
    algorithm = serialization.get("hash_type", "sha256")
    ignore = serialization.get("ignore_paths") or []
    expected = manifest.digests
    root, rels = model_files(path, ignore)
    if method == "files" and algorithm in SUPPORTED_HASHES:
        if allow_unsigned_files:
            rels = [r for r in rels if r in expected]
        actual = hash_files(root, [r for r in rels if r in expected], algorithm)
        extra = sorted(set(rels) - set(expected))
    else:
        actual, extra = _hash_with_model_signing(root, serialization, expected, allow_unsigned_files)
    missing = sorted(set(expected) - set(rels) - set(actual))
    changed = sorted(r for r in actual if r in expected and actual[r] != expected[r])
    problems = [f"{r}: content does not match the signature (hash mismatch)" for r in changed]
    problems += [f"{r}: signed file is missing" for r in missing]
    problems += [f"{r}: file is not covered by the signature (added)" for r in extra]
    if problems:
        raise ModelVerificationError(
            f"model at {path} does not match its signature: " + "; ".join(problems),
            files=changed + missing + extra,
        )
    paths = {r if method == "files" else r.rsplit(":", 2)[0] for r in actual}
    size = sum((root if r == "." else root / r).stat().st_size for r in paths)
    return len(expected), size, algorithm


def _hash_with_model_signing(root: Path, serialization: dict[str, Any], expected: dict[str, str],
                             allow_unsigned: bool) -> tuple[dict[str, str], list[str]]:
    """Shard-serialised or blake2 signatures: let model_signing hash exactly as it signed."""
    from model_signing import hashing

    cfg = hashing.Config()
    if serialization["method"] == "shards":
        cfg.use_shard_serialization(hashing_algorithm=serialization["hash_type"],
                                    shard_size=serialization["shard_size"],
                                    allow_symlinks=False, ignore_paths=serialization.get("ignore_paths", []))
    else:
        cfg.use_file_serialization(hashing_algorithm=serialization["hash_type"], allow_symlinks=False,
                                   ignore_paths=serialization.get("ignore_paths", []))
    actual = {rd.identifier: rd.digest.digest_hex for rd in cfg.hash(root).resource_descriptors()}
    if allow_unsigned:
        actual = {k: v for k, v in actual.items() if k in expected}
    extra = sorted(k for k in actual if k not in expected)
    return {k: v for k, v in actual.items() if k in expected}, extra


def _refuse_or_remove_extras(path: Path, manifest: SignedManifest, allow_unsigned_files: bool) -> None:
    """Nothing unsigned may sit inside a verified model folder. VCS metadata (skipped by the OMS
    hashing defaults) is refused; `<file>.sha256` digest caches are derived data the engine reads
    (they name the model's digest), so they are removed and recomputed from the verified files."""
    shards = manifest.serialization.get("method") != "files"  # shard ids are "file:start:end"
    vcs, caches = unsigned_extras(path, {r.rsplit(":", 2)[0] if shards else r for r in manifest.digests})
    if vcs and not allow_unsigned_files:
        raise ModelVerificationError(
            f"model at {path} holds files no signature covers: {', '.join(vcs[:5])}"
            f"{f' and {len(vcs) - 5} more' if len(vcs) > 5 else ''} (VCS metadata is never model content: delete "
            "it, or set allow_unsigned_files to accept it)", files=vcs)
    for rel in caches:
        try:
            (path / rel).unlink()
        except OSError as e:
            raise ModelVerificationError(f"model at {path} holds {rel}, which no signature covers, and it cannot "
                                         f"be removed ({e.strerror}): delete it", files=[rel]) from None


def verify_model(
    path: Path, bundles: list[Path], anchors: list[TrustAnchor], *, allow_unsigned_files: bool = False
) -> VerificationReport:
    """Verify `path` against the first bundle that a trusted anchor accepts."""
    if not anchors:
        raise ModelVerificationError(
            "no trusted public key or certificate chain given: pass --public-key / --cert-chain, "
            "or set trust.trusted_keys / trust.trusted_cert_chains"
        )
    if not bundles:
        raise ModelVerificationError(f"model at {path} is unsigned (no signature bundle found)")
    start = time.perf_counter()
    rejections: list[str] = []
    for bundle in bundles:
        accepted, reasons = check_bundle(bundle, anchors)
        rejections += [f"{bundle.name}: {r}" for r in reasons]
        if accepted is None:
            continue
        files, size, algorithm = compare_files(path, accepted.manifest, allow_unsigned_files)
        _refuse_or_remove_extras(path, accepted.manifest, allow_unsigned_files)
        return VerificationReport(
            path=str(path), status="verified", signer=accepted.anchor.label,
            key_fingerprint=accepted.anchor.fingerprint(), signature=str(bundle), algorithm=algorithm,
            root_digest=accepted.manifest.root_digest, files=files, bytes=size, seconds=time.perf_counter() - start,
        )
    raise ModelVerificationError(
        f"no signature on {path} was made by a trusted key or certificate: " + "; ".join(rejections)
    )
