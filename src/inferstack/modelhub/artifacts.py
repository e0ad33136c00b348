"""Artifacts that refer to a model manifest (OCI 1.1 `subject`): signatures, provenance, ML-BOM."""

from __future__ import annotations

from typing import Any

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.store import Store

MAX_REFERRER_BLOB = 16 * 1024 * 1024


def attach(
    store: Store,
    subject_digest: str,
    artifact_type: str,
    payload: bytes,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Store `payload` as a one-layer artifact whose subject is the model manifest; returns its descriptor."""
    subject = store.manifest(subject_digest)
    subject_size = store.blob_path(subject_digest).stat().st_size
    empty = store.put_bytes(mt.EMPTY_JSON)
    layer = store.put_bytes(payload)
    manifest: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": mt.OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {"mediaType": mt.OCI_EMPTY, "digest": empty, "size": len(mt.EMPTY_JSON)},
        "layers": [{"mediaType": artifact_type, "digest": layer, "size": len(payload)}],
        "subject": {"mediaType": subject.get("mediaType", mt.OCI_MANIFEST), "digest": subject_digest,
                    "size": subject_size},
    }
    if annotations:
        manifest["annotations"] = dict(sorted(annotations.items()))
    digest, data = store.put_manifest(manifest)
    descriptor = {"mediaType": mt.OCI_MANIFEST, "digest": digest, "size": len(data), "artifactType": artifact_type}
    if annotations:
        descriptor["annotations"] = manifest["annotations"]
    store.add_referrer(subject_digest, descriptor)
    return descriptor


def payloads(store: Store, subject_digest: str, artifact_type: str) -> dict[str, bytes]:
    """Layer bytes of every stored referrer of one type, keyed by the referrer manifest digest."""
    out: dict[str, bytes] = {}
    for desc in store.referrers(subject_digest):
        if desc.get("artifactType") != artifact_type or not store.has_blob(desc["digest"]):
            continue
        manifest = store.manifest(desc["digest"])
        layers = manifest.get("layers") or []
        if layers and store.has_blob(layers[0]["digest"]):
            out[desc["digest"]] = store.read_blob(layers[0]["digest"], limit=MAX_REFERRER_BLOB)
    return out


def sync_signatures(store: Store, subject_digest: str) -> None:
    """Place the model's signature bundles next to its materialized folder, where the load gate looks."""
    bundles = payloads(store, subject_digest, mt.SIGSTORE_BUNDLE)
    if bundles:
        store.write_signatures(subject_digest, bundles)

