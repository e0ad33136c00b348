"""OpenSSF model signing (OMS v1.0) on top of the `model_signing` package.

Bundles are exactly what `model_signing sign key|certificate` writes (Sigstore bundle v0.3, DSSE,
in-toto statement with predicate `https://model_signing/signature/v1.0`), so the `model_signing` CLI
verifies ours and we verify its. Two things are our own:

- signing a packed model reuses its raw layer digests (a layer digest *is* the file's sha256), so
  nothing is re-read (model-transparency #568);
- file hashing runs files in parallel threads (hashlib and blake3 release the GIL), which is what
  keeps verify-before-load cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from inferstack.modelhub.errors import SigningError

SUPPORTED_HASHES = ("sha256", "blake3")
# model_signing's defaults: VCS metadata is never part of a model.
DEFAULT_IGNORE = (".git", ".github", ".gitignore", ".gitattributes")
# Files in a model folder that are not model content: our detached signature and the engine's digest caches.
SIGNATURE_NAME = "model.sig"
_BUF = 4 * 1024 * 1024


@dataclass(frozen=True)
class SignerSpec:
    """An EC private key (P-256/384/521), optionally with its certificate and the chain up to a CA."""

    private_key: Path
    certificate: Path | None = None
    chain: tuple[Path, ...] = ()
    password: str | None = None

    def build(self) -> Any:
        from model_signing._signing import sign_certificate, sign_ec_key

        if not self.private_key.is_file():
            raise SigningError(f"private key {self.private_key} not found")
        try:
            if self.certificate is not None:
                return sign_certificate.Signer(self.private_key, self.certificate, list(self.chain))
            return sign_ec_key.Signer(self.private_key, self.password)
        except (ValueError, TypeError) as e:
            raise SigningError(f"cannot use {self.private_key} for signing: {e}") from e


def hash_file(path: Path, algorithm: str) -> str:
    if algorithm == "sha256":
        h: Any = hashlib.sha256()
    elif algorithm == "blake3":
        import blake3

        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    else:
        raise SigningError(f"unsupported hash {algorithm!r}; use one of {', '.join(SUPPORTED_HASHES)}")
    with path.open("rb", buffering=0) as f:
        buf = bytearray(_BUF)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def hash_files(root: Path, relpaths: Iterable[str], algorithm: str, workers: int | None = None) -> dict[str, str]:
    """Digests of files under `root` (a single file is named "." as model_signing does)."""
    rels = list(relpaths)
    workers = workers or min(len(rels), os.cpu_count() or 1) or 1
    if workers == 1 or algorithm == "blake3":  # blake3 parallelises inside one file already
        return {rel: hash_file(root if rel == "." else root / rel, algorithm) for rel in rels}
    with ThreadPoolExecutor(workers) as pool:
        digests = pool.map(lambda rel: hash_file(root if rel == "." else root / rel, algorithm), rels)
        return dict(zip(rels, digests, strict=True))


def is_support_file(rel: str, present: set[str]) -> bool:
    """Not model content: our detached signature, and `<file>.sha256` digest caches the engine writes."""
    return rel == SIGNATURE_NAME or (rel.endswith(".sha256") and rel[: -len(".sha256")] in present)


def model_files(path: Path, ignore: Iterable[str] = ()) -> tuple[Path, list[str]]:
    """(root, relative file paths) that make up a model at `path`, as model_signing scopes it."""
    if path.is_file():
        return path, ["."]
    if not path.is_dir():
        raise SigningError(f"{path} does not exist")
    ignored = set(DEFAULT_IGNORE) | {str(p) for p in ignore}
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(path):
        rel_dir = Path(dirpath).relative_to(path)
        dirnames[:] = sorted(d for d in dirnames if (rel_dir / d).as_posix() not in ignored)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel in ignored:
                continue
            if (Path(dirpath) / name).is_symlink():
                raise SigningError(f"{rel} is a symbolic link; model signing does not follow links")
            found.append(rel)
    present = set(found)
    return path, sorted(rel for rel in found if not is_support_file(rel, present))


def unsigned_extras(path: Path, covered: Iterable[str]) -> tuple[list[str], list[str]]:
    """Files in a model folder that verification skips and no signature covers: (VCS metadata under
    DEFAULT_IGNORE, `<file>.sha256` digest caches). Paths in `covered` (signed anyway) are left out."""
    if not path.is_dir():
        return [], []
    signed = set(covered)
    vcs: list[str] = []
    caches: list[str] = []
    for dirpath, _, filenames in os.walk(path):
        rel_dir = Path(dirpath).relative_to(path)
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if rel in signed:
                continue
            if rel.split("/", 1)[0] in DEFAULT_IGNORE:
                vcs.append(rel)
            elif rel.endswith(".sha256"):
                caches.append(rel)
    return sorted(vcs), sorted(caches)


def oms_manifest(name: str, digests: dict[str, str], algorithm: str, ignore: Iterable[str] = DEFAULT_IGNORE) -> Any:
    """A model_signing Manifest (files serialization) from precomputed per-file digests."""
    from model_signing import manifest
    from model_signing._hashing import hashing

    serialization = manifest._FileSerialization(algorithm, allow_symlinks=False, ignore_paths=[Path(p) for p in ignore])
    items = [
        manifest.FileManifestItem(path=Path(rel), digest=hashing.Digest(algorithm, bytes.fromhex(hexd)))
        for rel, hexd in sorted(digests.items())
    ]
    return manifest.Manifest(name, items, serialization)


def sign_digests(name: str, digests: dict[str, str], signer: SignerSpec, algorithm: str = "sha256") -> bytes:
    """Sign per-file digests; returns the Sigstore bundle JSON."""
    from model_signing._signing import signing

    if not digests:
        raise SigningError("refusing to sign an empty model (no files)")
    payload = signing.Payload(oms_manifest(name, digests, algorithm))
    try:
        signature = signer.build().sign(payload)
    except (ValueError, TypeError) as e:
        raise SigningError(f"signing failed: {e}") from e
    return signature.bundle.to_json().encode()


def sign_path(path: Path, signer: SignerSpec, algorithm: str = "sha256") -> bytes:
    root, rels = model_files(path)
    if not rels:
        raise SigningError(f"{path} holds no files; refusing to sign an empty model")
    return sign_digests(path.name, hash_files(root, rels, algorithm), signer, algorithm)


def statement_of(bundle_json: bytes) -> dict[str, Any]:
    """The in-toto statement inside a bundle, without checking the signature (for display only)."""
    import base64

    bundle = json.loads(bundle_json)
    return json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
