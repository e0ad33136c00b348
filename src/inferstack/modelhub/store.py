"""Local content-addressed model store.

Layout under the root (default `$INFERSTACK_MODEL_STORE`, else `~/.cache/inferstack/models`):

    blobs/sha256/<hex>     immutable blobs (read-only files), written only after their digest checked out
    ingest/<hex>.part      partial downloads, kept so an interrupted pull resumes; never read as blobs
    refs.json              "registry/repo:tag" -> manifest digest
    referrers/<hex>.json   descriptors of artifacts (signatures, provenance, ML-BOM) whose subject is <hex>
    models/<hex>/          a manifest materialized as files at their org.cncf.model.filepath
    models/<hex>.sigs/     signature bundles of that manifest, next to (not inside) the model folder

Every write is atomic (temp file or temp folder + rename), so an interrupted pack or pull leaves either
the old state or the new one, never a half-written blob, ref or model folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from inferstack.fileio import atomic_write
from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.errors import StoreError
from inferstack.modelhub.reference import DIGEST_RE
from inferstack.paths import cache_root

MAX_MANIFEST_BYTES = 4 * 1024 * 1024  # same cap as containerd; a bigger "manifest" is an attack or a bug
_CHUNK = 1 << 20


def default_store_root() -> Path:
    env = os.environ.get("INFERSTACK_MODEL_STORE")
    if env:
        return Path(env)
    return cache_root() / "models"


def hex_of(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise StoreError(f"unsupported digest {digest!r}: only sha256:<64 hex> is accepted")
    return digest.split(":", 1)[1]


def safe_relpath(name: str) -> PurePosixPath:
    """A layer's file path, refusing anything that could escape the model folder."""
    if not name or "\x00" in name or "\\" in name:
        raise StoreError(f"layer file path {name!r} is empty or contains NUL/backslash")
    p = PurePosixPath(name)
    if p.is_absolute() or any(part in ("", ".", "..") for part in p.parts) or name.endswith("/"):
        raise StoreError(f"layer file path {name!r} is absolute or contains '..': refusing path traversal")
    return p


class BlobWriter:
    """Streams one blob into ingest/, hashing as it goes; `commit()` checks digest and size, then publishes.

    With `pipelined`, writing and hashing run on a helper thread (both release the GIL), so a download
    overlaps network reads with disk writes and SHA-256 instead of doing them in turn.
    """

    def __init__(self, store: Store, expected: str | None, expected_size: int | None, part: Path, file: BinaryIO,
                 hasher: Any, written: int, pipelined: bool = False) -> None:
        self.store, self.expected, self.expected_size, self.part = store, expected, expected_size, part
        self._file, self._hash, self.written = file, hasher, written
        self._error: BaseException | None = None
        self._queue: queue.Queue[bytes | None] | None = None
        self._thread: threading.Thread | None = None
        if pipelined:
            self._queue = queue.Queue(maxsize=16)
            self._thread = threading.Thread(target=self._drain, name="blob-writer", daemon=True)
            self._thread.start()

    def _drain(self) -> None:
        assert self._queue is not None
        while (data := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._file.write(data)
                    self._hash.update(data)
                except BaseException as e:  # re-raised in the producer by _finish()
                    self._error = e

    def write(self, data: bytes) -> None:
        self.written += len(data)
        if self.expected_size is not None and self.written > self.expected_size:
            raise StoreError(f"blob {self.expected} is larger than its descriptor's size {self.expected_size}")
        if self._queue is not None:
            self._queue.put(data)
        else:
            self._file.write(data)
            self._hash.update(data)

    def _finish(self) -> None:
        if self._thread is not None and self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._error is not None:
            raise self._error

    def commit(self) -> str:
        self._finish()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        digest = "sha256:" + self._hash.hexdigest()
        if self.expected and digest != self.expected:
            self.part.unlink(missing_ok=True)
            raise StoreError(f"digest mismatch: expected {self.expected}, got {digest} (corrupt or tampered blob)")
        if self.expected_size is not None and self.written != self.expected_size:
            self.part.unlink(missing_ok=True)
            raise StoreError(f"size mismatch for {digest}: expected {self.expected_size}, got {self.written}")
        self.store.publish(self.part, digest)
        return digest

    def abort(self, keep: bool = True) -> None:
        """Stop writing; keep the partial file for a resumed download unless told otherwise."""
        with contextlib.suppress(BaseException):
            self._finish()
        if not self._file.closed:
            self._file.flush()
            self._file.close()
        if not keep:
            self.part.unlink(missing_ok=True)


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root else default_store_root()
        for sub in ("blobs/sha256", "ingest", "referrers", "models"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # ---- blobs ----

    def blob_path(self, digest: str) -> Path:
        return self.root / "blobs" / "sha256" / hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def read_blob(self, digest: str, limit: int | None = None) -> bytes:
        path = self.blob_path(digest)
        if not path.is_file():
            raise StoreError(f"blob {digest} is not in the local store {self.root}")
        if limit is not None and path.stat().st_size > limit:
            raise StoreError(f"blob {digest} is {path.stat().st_size} bytes, over the {limit}-byte limit")
        return path.read_bytes()

    def put_bytes(self, data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if not self.has_blob(digest):
            w = self.writer(digest, len(data), resume=False)
            w.write(data)
            w.commit()
        return digest

    def ingest_file(self, src: Path) -> tuple[str, int]:
        """Copy a file into the store, hashing it in the same pass."""
        w = self.writer(None, None, resume=False)
        try:
            with src.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    w.write(chunk)
            return w.commit(), w.written
        except BaseException:
            w.abort(keep=False)
            raise

    def writer(self, digest: str | None, size: int | None, resume: bool = True, pipelined: bool = False) -> BlobWriter:
        """A writer for one blob. With `resume`, bytes already in ingest/ are re-hashed and kept."""
        h = hashlib.sha256()
        if digest is not None:
            part = self.root / "ingest" / f"{hex_of(digest)}.part"
        else:
            fd, name = tempfile.mkstemp(dir=self.root / "ingest", suffix=".part")
            os.close(fd)
            part = Path(name)
        written = 0
        if resume and part.exists():
            with part.open("rb") as f:
                while chunk := f.read(_CHUNK):
                    h.update(chunk)
                    written += len(chunk)
            if size is not None and written > size:
                part.unlink()
                h, written = hashlib.sha256(), 0
        elif part.exists():
            part.unlink()
        f = part.open("ab")
        return BlobWriter(self, digest, size, part, f, h, written, pipelined)

    def publish(self, part: Path, digest: str) -> None:
        target = self.blob_path(digest)
        os.chmod(part, 0o444)
        os.replace(part, target)

    # ---- manifests and refs ----

    def put_manifest(self, manifest: dict[str, Any]) -> tuple[str, bytes]:
        data = json.dumps(manifest, separators=(",", ":"), sort_keys=True).encode()
        if len(data) > MAX_MANIFEST_BYTES:
            raise StoreError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        return self.put_bytes(data), data

    def manifest(self, digest: str) -> dict[str, Any]:
        return json.loads(self.read_blob(digest, limit=MAX_MANIFEST_BYTES))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def refs(self) -> dict[str, str]:
        path = self.root / "refs.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def tag(self, name: str, digest: str) -> None:
        with self._locked():
            refs = self.refs()
            refs[name] = digest
            atomic_write(self.root / "refs.json", json.dumps(refs, indent=1, sort_keys=True), durable=True)

    def untag(self, name: str) -> str:
        with self._locked():
            refs = self.refs()
            if name not in refs:
                raise StoreError(f"{name} is not in the local store (see `inferstack model list`)")
            digest = refs.pop(name)
            atomic_write(self.root / "refs.json", json.dumps(refs, indent=1, sort_keys=True), durable=True)
            return digest

    def resolve(self, name: str) -> str:
        """Manifest digest for `registry/repo:tag` or `...@sha256:...`."""
        if "@" in name:
            digest = name.rsplit("@", 1)[1]
            if not self.has_blob(digest):
                raise StoreError(f"{name} is not in the local store; pull it first")
            return digest
        digest = self.refs().get(name)
        if digest is None:
            raise StoreError(f"{name} is not in the local store; pack or pull it first (`inferstack model list`)")
        return digest

    # ---- referrers ----

    def referrers(self, subject: str) -> list[dict[str, Any]]:
        path = self.root / "referrers" / f"{hex_of(subject)}.json"
        return json.loads(path.read_text()) if path.exists() else []

    def add_referrer(self, subject: str, descriptor: dict[str, Any]) -> None:
        with self._locked():
            current = [d for d in self.referrers(subject) if d["digest"] != descriptor["digest"]]
            current.append(descriptor)
            atomic_write(self.root / "referrers" / f"{hex_of(subject)}.json", json.dumps(current, indent=1),
                         durable=True)

    # ---- materialized models ----

    def model_dir(self, manifest_digest: str) -> Path:
        return self.root / "models" / hex_of(manifest_digest)

    def signatures_dir(self, manifest_digest: str) -> Path:
        return self.root / "models" / f"{hex_of(manifest_digest)}.sigs"

    def materialize(self, manifest_digest: str) -> Path:
        """Lay the manifest's layers out as files (hard links to the blobs); atomic, idempotent."""
        target = self.model_dir(manifest_digest)
        if target.is_dir():
            return target
        manifest = self.manifest(manifest_digest)
        clash = file_folder_clash([layer_filepath(layer) for layer in manifest.get("layers", [])])
        if clash:
            raise StoreError(clash)
        tmp = Path(tempfile.mkdtemp(dir=self.root / "models", prefix=f".tmp-{hex_of(manifest_digest)[:12]}-"))
        try:
            for layer in manifest.get("layers", []):
                rel = layer_filepath(layer)
                if mt.layer_encoding(layer["mediaType"]) != "raw":
                    raise StoreError(f"layer {rel} uses {layer['mediaType']}; only raw ModelPack layers are supported")
                dest = tmp / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                if dest.exists():
                    raise StoreError(f"two layers claim the same file path {rel}")
                src = self.blob_path(layer["digest"])
                try:
                    os.link(src, dest)
                except OSError:
                    shutil.copyfile(src, dest)
                    os.chmod(dest, 0o444)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def write_signatures(self, manifest_digest: str, bundles: dict[str, bytes]) -> Path:
        sigs = self.signatures_dir(manifest_digest)
        sigs.mkdir(parents=True, exist_ok=True)
        for digest, data in bundles.items():
            atomic_write(sigs / f"{hex_of(digest)}.sigstore.json", data, durable=True)
        return sigs

    def remove_model(self, manifest_digest: str) -> None:
        for path in (self.model_dir(manifest_digest), self.signatures_dir(manifest_digest)):
            if path.exists():
                shutil.rmtree(path)

    def gc(self) -> int:
        """Delete blobs no tagged manifest (or its referrers) needs; returns the number removed."""
        keep: set[str] = set()
        for digest in set(self.refs().values()):
            self._mark(digest, keep)
        removed = 0
        for blob in (self.root / "blobs" / "sha256").iterdir():
            if f"sha256:{blob.name}" not in keep:
                blob.unlink()
                removed += 1
        for model in (self.root / "models").iterdir():
            if model.name.split(".")[0] not in {k.split(":")[1] for k in keep}:
                shutil.rmtree(model, ignore_errors=True)
        return removed

    def _mark(self, digest: str, keep: set[str]) -> None:
        if digest in keep or not self.has_blob(digest):
            return
        keep.add(digest)
        m = self.manifest(digest)
        keep.add(m["config"]["digest"])
        keep.update(layer["digest"] for layer in m.get("layers", []))
        for ref in self.referrers(digest):
            self._mark(ref["digest"], keep)


def file_folder_clash(paths: list[PurePosixPath]) -> str | None:
    """Why these layer paths cannot all be files (`a` and `a/b`: `a` would be a file and a folder)."""
    files = {str(p) for p in paths}
    for p in paths:
        for parent in p.parents:
            if str(parent) in files:
                return f"layer paths {parent} and {p} clash: {parent} would be both a file and a folder"
    return None


def layer_filepath(layer: dict[str, Any]) -> PurePosixPath:
    ann = layer.get("annotations") or {}
    name = ann.get(mt.ANN_FILEPATH) or ann.get(mt.ANN_FILEPATH_LEGACY) or ann.get(mt.ANN_TITLE)
    if not name:
        raise StoreError(f"layer {layer.get('digest')} has no {mt.ANN_FILEPATH} or {mt.ANN_TITLE} annotation")
    return safe_relpath(name)
