"""Push a packed model (with its signatures, provenance and ML-BOM) to a registry, and pull it back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.artifacts import MAX_REFERRER_BLOB, sync_signatures
from inferstack.modelhub.errors import RegistryError, StoreError
from inferstack.modelhub.reference import Reference
from inferstack.modelhub.registry import Progress, RegistryClient, no_progress
from inferstack.modelhub.store import Store, file_folder_clash, layer_filepath

# Referrer types we carry along; anything else attached to a model is left in the registry.
KNOWN_REFERRERS = {mt.SIGSTORE_BUNDLE, mt.CYCLONEDX_JSON, mt.IN_TOTO}


@dataclass
class TransferResult:
    reference: str
    digest: str
    blobs_sent: int = 0
    bytes_total: int = 0
    referrers: list[str] = field(default_factory=list)
    path: Path | None = None


def local_name(ref: Reference) -> str:
    return str(ref)


def _push_manifest_blobs(client: RegistryClient, repo: str, store: Store, manifest: dict[str, Any],
                         progress: Progress) -> tuple[int, int]:
    sent = total = 0
    for desc in [manifest["config"], *manifest.get("layers", [])]:
        total += int(desc["size"])
        if client.push_blob(repo, desc["digest"], int(desc["size"]), store.blob_path(desc["digest"]), store,
                            progress):
            sent += 1
    return sent, total


def push_model(
    store: Store, ref: Reference, client: RegistryClient, progress: Progress = no_progress
) -> TransferResult:
    digest = store.resolve(local_name(ref))
    manifest = store.manifest(digest)
    repo = ref.repository
    sent, total = _push_manifest_blobs(client, repo, store, manifest, progress)
    data = store.read_blob(digest)
    client.put_manifest(repo, ref.tag or digest, data, manifest.get("mediaType", mt.OCI_MANIFEST))
    result = TransferResult(str(ref), digest, sent, total)
    for desc in store.referrers(digest):
        push_referrer(store, client, repo, digest, desc, progress)
        result.referrers.append(desc["artifactType"])
    return result


def push_referrer(store: Store, client: RegistryClient, repo: str, subject: str, desc: dict[str, Any],
                  progress: Progress = no_progress) -> None:
    """Push one stored referrer artifact and make it discoverable (referrers API or fallback tag)."""
    _push_manifest_blobs(client, repo, store, store.manifest(desc["digest"]), progress)
    resp = client.put_manifest(repo, desc["digest"], store.read_blob(desc["digest"]), mt.OCI_MANIFEST)
    client.add_referrer(repo, subject, desc, resp)


def check_model_manifest(manifest: dict[str, Any], media_type: str, ref: Reference) -> None:
    """Refuse anything that is not a ModelPack manifest, before a single layer is downloaded."""
    if manifest.get("mediaType", media_type) != mt.OCI_MANIFEST:
        raise RegistryError(f"{ref} is a {manifest.get('mediaType') or media_type}, not an OCI image manifest")
    artifact = manifest.get("artifactType") or ""
    config_type = (manifest.get("config") or {}).get("mediaType", "")
    if artifact not in (mt.MODEL_MANIFEST, mt.LEGACY_MODEL_MANIFEST) and "model.config" not in config_type:
        raise RegistryError(f"{ref} is not a ModelPack model (artifactType {artifact or 'missing'!r})")
    seen: set[str] = set()
    for layer in manifest.get("layers") or []:
        try:
            rel = str(layer_filepath(layer))
        except StoreError as e:
            raise RegistryError(f"{ref}: {e}") from e
        if rel in seen:
            raise RegistryError(f"{ref}: two layers claim the file path {rel}")
        seen.add(rel)
        if mt.layer_encoding(layer.get("mediaType", "")) != "raw":
            raise RegistryError(f"{ref}: layer {rel} is {layer.get('mediaType')}; only raw layers are supported")
    if not seen:
        raise RegistryError(f"{ref}: the manifest has no layers")
    clash = file_folder_clash([PurePosixPath(rel) for rel in seen])
    if clash:
        raise RegistryError(f"{ref}: {clash}")


def pull_model(
    store: Store, ref: Reference, client: RegistryClient, progress: Progress = no_progress
) -> TransferResult:
    """Download a model and its known referrers; the local ref appears only once everything is in place."""
    repo = ref.repository
    data, media_type, digest = client.get_manifest(repo, ref.identifier)
    if ref.digest and digest != ref.digest:
        raise RegistryError(f"{ref}: registry served manifest {digest}")
    manifest = json.loads(data)
    check_model_manifest(manifest, media_type, ref)
    if int(manifest["config"]["size"]) > MAX_REFERRER_BLOB:
        raise RegistryError(f"{ref}: config blob of {manifest['config']['size']} bytes is implausibly large")
    total = 0
    for desc in [manifest["config"], *manifest["layers"]]:
        client.pull_blob(repo, desc, store, progress)
        total += int(desc["size"])
    if store.put_bytes(data) != digest:
        raise StoreError("manifest digest changed while storing it")
    result = TransferResult(str(ref), digest, bytes_total=total)
    for desc in client.referrers(repo, digest):
        if desc.get("artifactType") not in KNOWN_REFERRERS:
            continue
        rdata, _, _ = client.get_manifest(repo, desc["digest"])
        rmanifest = json.loads(rdata)
        if (rmanifest.get("subject") or {}).get("digest") != digest:
            continue  # a stale fallback-tag entry must not attach foreign artifacts
        for blob in [rmanifest["config"], *rmanifest.get("layers", [])]:
            if int(blob["size"]) > MAX_REFERRER_BLOB:
                raise RegistryError(f"{ref}: referrer blob {blob['digest']} is implausibly large")
            client.pull_blob(repo, blob, store)
        store.put_bytes(rdata)
        store.add_referrer(digest, {k: v for k, v in desc.items() if k in
                                    ("mediaType", "digest", "size", "artifactType", "annotations")})
        result.referrers.append(desc["artifactType"])
    result.path = store.materialize(digest)
    sync_signatures(store, digest)
    store.tag(local_name(ref), digest)
    return result
