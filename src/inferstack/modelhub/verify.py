"""Offline verification of a model folder/file against OMS signature bundles.

Step 1: the bundle's signature must verify against one trusted public key or certificate chain
(model_signing's verifiers). Step 2: the files on disk must be exactly the signed ones: every signed
file present with the signed digest, nothing extra (unless allowed), nothing missing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from inferstack.modelhub.errors import ModelVerificationError
from inferstack.modelhub.signing import SUPPORTED_HASHES, hash_files, model_files


@dataclass(frozen=True)
class TrustAnchor:
    """A trusted public key or CA chain, as named in the trust policy."""

    kind: str  # "key" | "certificate"
    path: Path

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.path}"

    def verifier(self) -> Any:
        from model_signing._signing import sign_certificate, sign_ec_key

        if not self.path.is_file():
            raise ModelVerificationError(f"trusted {self.kind} {self.path} not found (check the trust policy)")
        try:
            if self.kind == "key":
                return sign_ec_key.Verifier(self.path)
            return sign_certificate.Verifier([self.path])
        except ValueError as e:
            raise ModelVerificationError(f"trusted {self.kind} {self.path} is not usable: {e}") from e

    def fingerprint(self) -> str | None:
        if self.kind != "key":
            return None
        from cryptography.hazmat.primitives import serialization

        key = serialization.load_pem_public_key(self.path.read_bytes())
        pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return hashlib.sha256(pem).hexdigest()  # the `publicKey.hint` model_signing writes


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
    manifest: Any


def _read_bundle(bundle: Path) -> Any:
    from model_signing._signing import sign_sigstore_pb

    try:
        return sign_sigstore_pb.Signature.read(bundle)
    except Exception as e:  # malformed JSON or protobuf: the message is what matters to the operator
        raise ModelVerificationError(f"signature {bundle} is not a valid Sigstore bundle: {e}") from e


def check_bundle(bundle: Path, anchors: list[TrustAnchor]) -> tuple[_Accepted | None, list[str]]:
    """Try each trusted anchor on one bundle; (accepted, reasons for rejections)."""
    signature = _read_bundle(bundle)
    reasons = []
    for anchor in anchors:
        try:
            manifest = anchor.verifier().verify(signature)
        except ModelVerificationError:
            raise
        except Exception as e:  # invalid signature / key mismatch / untrusted chain, all reported below
            reasons.append(f"{anchor.label}: {str(e).strip() or e.__class__.__name__}")
            continue
        return _Accepted(anchor, manifest), reasons
    return None, reasons


def compare_files(path: Path, manifest: Any, allow_unsigned_files: bool = False) -> tuple[int, int, str]:
    """Hash the files at `path` the way the signature did and compare; raise naming every bad file."""
    serialization = manifest.serialization_type
    method = serialization.get("method")
    algorithm = serialization.get("hash_type", "sha256")
    ignore = serialization.get("ignore_paths") or []
    expected = {rd.identifier: rd.digest.digest_hex for rd in manifest.resource_descriptors()}
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
    size = sum((root if r == "." else root / r).stat().st_size for r in expected)
    return len(expected), size, algorithm


def _hash_with_model_signing(root: Path, serialization: dict[str, Any], expected: dict[str, str],
                             allow_unsigned: bool) -> tuple[dict[str, str], list[str]]:
    """Shard-serialised or blake2 signatures: let model_signing hash exactly as it signed."""
    from model_signing import hashing

    cfg = hashing.Config()
    if serialization["method"] == "shards":
        cfg.use_shard_serialization(hashing_algorithm=serialization["hash_type"], shard_size=serialization["shard_size"],
                                    allow_symlinks=False, ignore_paths=serialization.get("ignore_paths", []))
    else:
        cfg.use_file_serialization(hashing_algorithm=serialization["hash_type"], allow_symlinks=False,
                                   ignore_paths=serialization.get("ignore_paths", []))
    actual = {rd.identifier: rd.digest.digest_hex for rd in cfg.hash(root).resource_descriptors()}
    if allow_unsigned:
        actual = {k: v for k, v in actual.items() if k in expected}
    extra = sorted(k for k in actual if k not in expected)
    return {k: v for k, v in actual.items() if k in expected}, extra


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
        root = hashlib.sha256(b"".join(rd.digest.digest_value for rd in accepted.manifest.resource_descriptors()))
        return VerificationReport(
            path=str(path), status="verified", signer=accepted.anchor.label,
            key_fingerprint=accepted.anchor.fingerprint(), signature=str(bundle), algorithm=algorithm,
            root_digest=f"sha256:{root.hexdigest()}", files=files, bytes=size, seconds=time.perf_counter() - start,
        )
    raise ModelVerificationError(
        f"no signature on {path} was made by a trusted key or certificate: " + "; ".join(rejections)
    )
