"""Glue between packing, signing and the store: attach signature, provenance and ML-BOM as referrers."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.aibom import ml_bom
from inferstack.modelhub.artifacts import attach, sync_signatures
from inferstack.modelhub.errors import SigningError
from inferstack.modelhub.pack import PackResult
from inferstack.modelhub.provenance import slsa_provenance
from inferstack.modelhub.reference import Reference
from inferstack.modelhub.signing import SignerSpec, sign_digests
from inferstack.modelhub.store import Store, layer_filepath


def attach_pack_attestations(
    store: Store,
    result: PackResult,
    ref: Reference,
    source: Path,
    started: datetime,
    finished: datetime,
    *,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    limitations: list[str] | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Store SLSA provenance and a CycloneDX ML-BOM as referrers of the packed model."""
    files = [(f.relpath, f.digest) for f in result.files]
    provenance = slsa_provenance(
        reference=str(ref), manifest_digest=result.manifest_digest, config_digest=result.manifest["config"]["digest"],
        source=source, files=files, started=started, finished=finished, base_model=base_model, datasets=datasets,
    )
    bom = ml_bom(ref=ref, manifest_digest=result.manifest_digest, info=result.info,
                 files=[(f.relpath, f.digest, f.size) for f in result.files], datasets=datasets,
                 limitations=limitations, timestamp=finished)
    attach(store, result.manifest_digest, mt.IN_TOTO, _json(provenance), {mt.ANN_PREDICATE_TYPE: mt.SLSA_PREDICATE})
    attach(store, result.manifest_digest, mt.CYCLONEDX_JSON, _json(bom), {"org.cyclonedx.spec.version": "1.6"})
    return provenance, bom


def layer_digests(manifest: dict[str, Any]) -> dict[str, str]:
    """file path -> sha256 hex, straight from raw layer descriptors (no file is read)."""
    out = {}
    for layer in manifest.get("layers", []):
        if mt.layer_encoding(layer["mediaType"]) != "raw":
            raise SigningError(f"layer {layer['digest']} is not raw; sign the unpacked folder instead")
        out[str(layer_filepath(layer))] = layer["digest"].split(":", 1)[1]
    return out


def sign_manifest(manifest: dict[str, Any], name: str, signer: SignerSpec) -> bytes:
    return sign_digests(name, layer_digests(manifest), signer, "sha256")


def attach_signature(store: Store, manifest_digest: str, bundle: bytes) -> dict[str, Any]:
    desc = attach(store, manifest_digest, mt.SIGSTORE_BUNDLE, bundle,
                  {"dev.sigstore.bundle.content": "dsse-envelope",
                   "dev.sigstore.bundle.predicateType": "https://model_signing/signature/v1.0"})
    sync_signatures(store, manifest_digest)
    return desc


def referrer_payload(store: Store, manifest_digest: str, artifact_type: str) -> dict[str, Any] | None:
    from inferstack.modelhub.artifacts import payloads

    found = payloads(store, manifest_digest, artifact_type)
    return json.loads(next(iter(found.values()))) if found else None


def _json(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode()
