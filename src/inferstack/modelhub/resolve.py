"""`--model oci://...` and local paths -> a verified local path the engine loader can open."""

from __future__ import annotations

import os
from pathlib import Path

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.artifacts import sync_signatures
from inferstack.modelhub.errors import ModelVerificationError, RegistryError, StoreError
from inferstack.modelhub.gate import verify_before_load
from inferstack.modelhub.policy import TrustPolicy
from inferstack.modelhub.reference import Reference, is_oci, parse_reference
from inferstack.modelhub.registry import Credentials, RegistryClient
from inferstack.modelhub.store import Store, layer_filepath
from inferstack.modelhub.transfer import pull_model


def is_loopback(registry: str) -> bool:
    host = registry.rsplit(":", 1)[0] if registry.count(":") == 1 else registry
    return host in ("localhost", "127.0.0.1", "[::1]")


def apply_policy_to_ref(ref: Reference, policy: TrustPolicy | None) -> Reference:
    """Allowed registry and digest pinning, checked before any network traffic."""
    if policy is None:
        return ref
    if policy.allowed_registries and ref.registry not in policy.allowed_registries:
        raise ModelVerificationError(
            f"registry {ref.registry} is not in trust.allowed_registries ({', '.join(policy.allowed_registries)})"
        )
    pin = policy.pinned_digests.get(f"{ref.name}:{ref.tag}") or policy.pinned_digests.get(ref.name)
    if pin:
        if ref.digest and ref.digest != pin:
            raise ModelVerificationError(f"{ref} conflicts with the pinned digest {pin} in trust.pinned_digests")
        ref = ref.with_digest(pin)
    if policy.require_digest and not ref.digest:
        raise ModelVerificationError(
            f"{ref} is not pinned: trust.require_digest needs @sha256:... or an entry in trust.pinned_digests"
        )
    return ref


def engine_path(model_dir: Path, manifest: dict) -> Path:
    """What the engine loader opens: the .gguf file when it is the only weight, else the folder."""
    weights = [layer for layer in manifest.get("layers", []) if mt.layer_kind(layer["mediaType"]) == mt.WEIGHT]
    if len(weights) == 1:
        rel = layer_filepath(weights[0])
        if rel.suffix == ".gguf":
            return model_dir / rel
    return model_dir


def resolve_model_ref(
    ref: str,
    policy: TrustPolicy | None,
    *,
    store: Store | None = None,
    plain_http: bool | None = None,
    credentials: Credentials | None = None,
) -> Path:
    """oci://REF -> pulled (or cached) local path; a local path -> itself. Verified when a policy is given.

    Raises ModelVerificationError when the policy refuses the model, RegistryError/StoreError when it
    cannot be fetched. Pulls happen only for tags or digests not already in the local store.
    """
    if not is_oci(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise StoreError(f"model path {path} does not exist")
        if policy is not None:
            verify_before_load(path, policy)
        return path
    parsed = apply_policy_to_ref(parse_reference(ref), policy)
    store = store or Store()
    digest = _local_digest(store, parsed)
    if digest is None:
        if plain_http is None:
            plain_http = is_loopback(parsed.registry) or os.environ.get("INFERSTACK_REGISTRY_PLAIN_HTTP") == "1"
        with RegistryClient(parsed.registry, plain_http=plain_http,
                            credentials=credentials or Credentials.from_env()) as client:
            digest = pull_model(store, parsed, client).digest
    if parsed.digest and digest != parsed.digest:
        raise ModelVerificationError(f"{parsed} resolved to {digest}, not the pinned digest")
    model_dir = store.materialize(digest)
    sync_signatures(store, digest)
    path = engine_path(model_dir, store.manifest(digest))
    if policy is not None:
        try:
            verify_before_load(path, policy)
        except ModelVerificationError as e:
            if e.files:
                raise ModelVerificationError(
                    f"{e} (the local copy of {parsed} was altered: `inferstack model rm {parsed}` and pull again)",
                    e.files) from e
            raise
    return path


def _local_digest(store: Store, ref: Reference) -> str | None:
    """A digest-pinned ref already in the store needs no network; tags are always re-resolved."""
    if not (ref.digest and store.has_blob(ref.digest)):
        return None
    manifest = store.manifest(ref.digest)
    complete = all(store.has_blob(d["digest"]) for d in [manifest["config"], *manifest.get("layers", [])])
    return ref.digest if complete else None


__all__ = ["RegistryError", "resolve_model_ref"]
