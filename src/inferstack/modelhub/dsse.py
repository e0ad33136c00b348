"""Verify key-signed OMS bundles with `cryptography` alone, following the DSSE v1 and OMS v1.0 specs.

Why not model_signing's verifier here: importing `model_signing` pulls in sigstore and its dependencies
(0.7 s or more on a 2-core machine), which alone would exceed the load gate's 10 % budget for a small
model. Certificate-chain bundles still go through model_signing. Interop is tested both ways.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

IN_TOTO_PAYLOAD_TYPE = "application/vnd.in-toto+json"
IN_TOTO_STATEMENT = "https://in-toto.io/Statement/v1"
OMS_PREDICATE = "https://model_signing/signature/v1.0"
_CURVE_HASH = {256: hashes.SHA256, 384: hashes.SHA384, 521: hashes.SHA512}


class BundleRejected(ValueError):
    pass


@dataclass
class SignedManifest:
    """What a verified OMS statement vouches for: file (or shard) name -> digest, and how they were hashed."""

    model_name: str
    serialization: dict[str, Any]
    digests: dict[str, str]
    root_digest: str


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding."""
    return b"DSSEv1 %d %s %d %s" % (len(payload_type), payload_type.encode(), len(payload), payload)


def key_hint(public_key: ec.EllipticCurvePublicKey) -> str:
    """model_signing's `publicKey.hint`: SHA-256 of the SubjectPublicKeyInfo PEM."""
    pem = public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(pem).hexdigest()


def is_key_bundle(bundle: dict[str, Any]) -> bool:
    return "publicKey" in (bundle.get("verificationMaterial") or {})


def verify_key_bundle(bundle: dict[str, Any], public_key: ec.EllipticCurvePublicKey) -> SignedManifest:
    vm = bundle.get("verificationMaterial") or {}
    hint = (vm.get("publicKey") or {}).get("hint")
    if hint and hint != key_hint(public_key):
        raise BundleRejected("Key mismatch: the signature names a different public key than the trusted one")
    try:
        envelope = bundle["dsseEnvelope"]
        payload = base64.b64decode(envelope["payload"])
        signature = base64.b64decode(envelope["signatures"][0]["sig"])
        payload_type = envelope["payloadType"]
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise BundleRejected(f"malformed DSSE envelope ({e})") from e
    if payload_type != IN_TOTO_PAYLOAD_TYPE:
        raise BundleRejected(f"DSSE payload type {payload_type!r}, expected {IN_TOTO_PAYLOAD_TYPE}")
    digest = _CURVE_HASH.get(public_key.curve.key_size)
    if digest is None:
        raise BundleRejected(f"unsupported curve {public_key.curve.name}")
    try:
        public_key.verify(signature, pae(payload_type, payload), ec.ECDSA(digest()))
    except InvalidSignature as e:
        raise BundleRejected("invalid signature: the statement was not signed by the trusted key") from e
    return statement_manifest(json.loads(payload))


def statement_manifest(statement: dict[str, Any]) -> SignedManifest:
    """Check the OMS statement's shape and root digest; return the signed resources."""
    if statement.get("_type") != IN_TOTO_STATEMENT or statement.get("predicateType") != OMS_PREDICATE:
        raise BundleRejected(f"not an OMS v1.0 statement (predicateType {statement.get('predicateType')!r})")
    subjects = statement.get("subject") or []
    if len(subjects) != 1:
        raise BundleRejected(f"expected one subject, got {len(subjects)}")
    predicate = statement.get("predicate") or {}
    root = hashlib.sha256()
    digests: dict[str, str] = {}
    for res in predicate.get("resources") or []:
        value = bytes.fromhex(res["digest"])
        root.update(value)
        digests[res["name"]] = res["digest"]
    if root.hexdigest() != subjects[0].get("digest", {}).get("sha256"):
        raise BundleRejected("statement is inconsistent: resources do not hash to the subject digest")
    return SignedManifest(subjects[0].get("name", ""), dict(predicate.get("serialization") or {}), digests,
                          f"sha256:{root.hexdigest()}")


def from_model_signing(manifest: Any) -> SignedManifest:
    """Adapt a model_signing Manifest (certificate path) to SignedManifest."""
    descriptors = list(manifest.resource_descriptors())
    root = hashlib.sha256(b"".join(rd.digest.digest_value for rd in descriptors)).hexdigest()
    return SignedManifest(manifest.model_name, dict(manifest.serialization_type),
                          {rd.identifier: rd.digest.digest_hex for rd in descriptors}, f"sha256:{root}")
