"""A small OCI distribution client: blobs, manifests, referrers, basic and bearer-token auth.

Uploads are chunked (POST, PATCH with Content-Range, PUT ?digest=) and resumable: after a dropped
connection the client asks the registry how much it holds (GET on the upload URL, `Range` header) and
continues from there; the upload URL is remembered in the store so that a later `push` resumes too.
Downloads stream into the store's ingest area, hashing as they go, and resume with `Range` requests.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin

import httpx

from inferstack.fileio import atomic_write
from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.errors import RegistryError, StoreError
from inferstack.modelhub.reference import Reference
from inferstack.modelhub.store import MAX_MANIFEST_BYTES, Store, hex_of

Progress = Callable[[str, int, int], None]
DEFAULT_CHUNK = 16 * 1024 * 1024
_RETRIES = 4
_MANIFEST_ACCEPT = ", ".join([mt.OCI_MANIFEST, mt.OCI_INDEX, mt.DOCKER_MANIFEST])
_CHALLENGE_RE = re.compile(r'(\w+)="([^"]*)"')


@dataclass
class Credentials:
    username: str | None = None
    password: str | None = None
    token: str | None = None  # a ready bearer token (e.g. from a CI system)

    @classmethod
    def from_env(cls, username: str | None = None, password: str | None = None) -> Credentials:
        return cls(
            username=username or os.environ.get("INFERSTACK_REGISTRY_USERNAME"),
            password=password or os.environ.get("INFERSTACK_REGISTRY_PASSWORD"),
            token=os.environ.get("INFERSTACK_REGISTRY_TOKEN"),
        )


def no_progress(desc: str, done: int, total: int) -> None:
    return None


class RegistryClient:
    def __init__(
        self,
        registry: str,
        *,
        plain_http: bool = False,
        credentials: Credentials | None = None,
        chunk_size: int = DEFAULT_CHUNK,
        timeout: float = 60.0,
        verify_tls: bool | str = True,
    ) -> None:
        self.registry = registry
        self.base = f"{'http' if plain_http else 'https'}://{registry}"
        self.creds = credentials or Credentials()
        self.chunk_size = chunk_size
        self._tokens: dict[str, str] = {}
        self._basic = False
        self.client = httpx.Client(timeout=timeout, follow_redirects=True, verify=verify_tls)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- auth and requests ----

    def _auth_headers(self, scope: str) -> dict[str, str]:
        if scope in self._tokens:
            return {"Authorization": f"Bearer {self._tokens[scope]}"}
        if self.creds.token:
            return {"Authorization": f"Bearer {self.creds.token}"}
        if self._basic and self.creds.username is not None:
            raw = f"{self.creds.username}:{self.creds.password or ''}".encode()
            return {"Authorization": "Basic " + base64.b64encode(raw).decode()}
        return {}

    def _authenticate(self, response: httpx.Response, scope: str) -> bool:
        """React to a 401 challenge; True if a retry with new credentials makes sense."""
        challenge = response.headers.get("www-authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if scheme == "basic":
            if self._basic or self.creds.username is None:
                return False
            self._basic = True
            return True
        if scheme == "bearer":
            if scope in self._tokens:
                return False
            params = dict(_CHALLENGE_RE.findall(challenge))
            realm = params.get("realm")
            if not realm:
                return False
            query = {"service": params.get("service", "")}
            if scope:
                query["scope"] = scope
            auth = None
            if self.creds.username is not None:
                auth = httpx.BasicAuth(self.creds.username, self.creds.password or "")
            try:
                r = self.client.get(realm, params=query, auth=auth)
            except httpx.TransportError as e:
                raise RegistryError(f"token server {realm} unreachable: {e}") from e
            if r.status_code != 200:
                raise RegistryError(
                    f"token server {realm} refused the credentials ({r.status_code}); check the registry username "
                    "and password (--username/--password or INFERSTACK_REGISTRY_USERNAME/_PASSWORD)",
                    r.status_code,
                )
            body = r.json()
            token = body.get("token") or body.get("access_token")
            if not token:
                raise RegistryError(f"token server {realm} answered without a token")
            self._tokens[scope] = token
            return True
        return False

    def request(
        self,
        method: str,
        url: str,
        *,
        scope: str,
        ok: tuple[int, ...] = (200,),
        what: str,
        stream: bool = False,
        **kwargs: Any,
    ) -> httpx.Response:
        """One request with auth challenges handled and 5xx/transport errors retried with backoff."""
        url = urljoin(self.base + "/", url) if not url.startswith("http") else url
        delay = 0.2
        for attempt in range(_RETRIES):
            headers = {**kwargs.pop("headers", {}), **self._auth_headers(scope)}
            kwargs["headers"] = headers
            try:
                req = self.client.build_request(method, url, **kwargs)
                resp = self.client.send(req, stream=stream)
            except httpx.TransportError as e:
                if attempt == _RETRIES - 1:
                    raise RegistryError(f"{what}: cannot reach {self.registry} ({e.__class__.__name__}: {e})") from e
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code == 401 and self._authenticate(resp, scope):
                resp.close()
                continue
            if resp.status_code >= 500 and attempt < _RETRIES - 1:
                resp.close()
                time.sleep(delay)
                delay *= 2
                continue
            if resp.status_code not in ok:
                if stream:
                    resp.read()
                raise self._error(resp, what)
            return resp
        raise RegistryError(f"{what}: gave up after {_RETRIES} attempts")

    def _error(self, resp: httpx.Response, what: str) -> RegistryError:
        detail = ""
        try:
            errors = resp.json().get("errors") or []
            if errors:
                detail = "; ".join(f"{e.get('code')}: {e.get('message')}" for e in errors)
        except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
            detail = resp.text[:200]
        code = resp.status_code
        hint = {
            401: "authentication required or refused: pass --username/--password "
                 "(or INFERSTACK_REGISTRY_USERNAME/_PASSWORD/_TOKEN)",
            403: "access denied for these credentials",
            404: "not found (check the repository, tag or digest)",
            413: "the registry refused the size",
        }.get(code, "registry server error" if code >= 500 else "unexpected response")
        return RegistryError(f"{what}: {self.registry} answered {code} ({hint}){': ' + detail if detail else ''}",
                             code)

    @staticmethod
    def scope(repo: str, push: bool = False) -> str:
        return f"repository:{repo}:{'pull,push' if push else 'pull'}"

    def ping(self) -> None:
        self.request("GET", "/v2/", scope="", what="registry check")

    # ---- blobs ----

    def blob_exists(self, repo: str, digest: str) -> bool:
        try:
            self.request("HEAD", f"/v2/{repo}/blobs/{digest}", scope=self.scope(repo, True), what=f"check {digest}")
            return True
        except RegistryError as e:
            if e.status == 404:
                return False
            raise

    def push_blob(
        self, repo: str, digest: str, size: int, path: Path, store: Store | None = None,
        progress: Progress = no_progress,
    ) -> bool:
        """Upload one blob unless the registry has it. Returns True if bytes were sent."""
        if self.blob_exists(repo, digest):
            progress(digest, size, size)
            return False
        scope = self.scope(repo, True)
        session_file = store.root / "uploads" / f"{self.registry.replace(':', '_')}-{hex_of(digest)}.json" \
            if store else None
        location, offset = self._resume_session(repo, session_file)
        if location is None:
            location, offset = self._start_upload(repo, digest, session_file), 0
        failures = 0
        with path.open("rb") as f:
            while offset < size:
                f.seek(offset)
                chunk = f.read(min(self.chunk_size, size - offset))
                try:
                    r = self.request(
                        "PATCH", location, scope=scope, ok=(202,), what=f"upload {digest}",
                        headers={"Content-Type": "application/octet-stream",
                                 "Content-Range": f"{offset}-{offset + len(chunk) - 1}"},
                        content=chunk,
                    )
                except RegistryError:
                    failures += 1
                    if failures > _RETRIES:
                        raise
                    # Ask where the session stands; registries that lost it (distribution 2.x drops a session
                    # after a torn PATCH) get a fresh one and the blob restarts from byte 0.
                    status = self._upload_status(location, scope)
                    if status is None:
                        location, offset = self._start_upload(repo, digest, session_file), 0
                    else:
                        location, offset = status
                    continue
                location = r.headers.get("location", location)
                offset += len(chunk)
                if session_file:  # lets a later push continue here if this process dies (a lost hint only
                    # means restarting the blob, so no fsync per chunk)
                    atomic_write(session_file, json.dumps({"location": location, "repo": repo}))
                progress(digest, offset, size)
        sep = "&" if "?" in location else "?"
        self.request("PUT", f"{location}{sep}digest={digest}", scope=scope, ok=(201,), what=f"finish upload {digest}",
                     headers={"Content-Length": "0"})
        if session_file:
            session_file.unlink(missing_ok=True)
        return True

    def _start_upload(self, repo: str, digest: str, session_file: Path | None) -> str:
        r = self.request("POST", f"/v2/{repo}/blobs/uploads/", scope=self.scope(repo, True), ok=(202,),
                         what=f"start upload {digest}")
        location = r.headers["location"]
        if session_file:
            atomic_write(session_file, json.dumps({"location": location, "repo": repo}), durable=True)
        return location

    def _resume_session(self, repo: str, session_file: Path | None) -> tuple[str | None, int]:
        if session_file is None or not session_file.exists():
            return None, 0
        saved = json.loads(session_file.read_text())
        status = self._upload_status(saved["location"], self.scope(repo, True))
        if status is None:
            session_file.unlink(missing_ok=True)
            return None, 0
        return status

    def _upload_status(self, location: str, scope: str) -> tuple[str, int] | None:
        """Where an upload session stands: (location, next offset), or None if the session is gone."""
        try:
            r = self.request("GET", location, scope=scope, ok=(204,), what="upload status")
        except RegistryError:
            return None
        rng = r.headers.get("range", "0--1")
        end = int(rng.split("-", 1)[1]) if "-" in rng else -1
        return r.headers.get("location", location), end + 1

    def pull_blob(self, repo: str, descriptor: dict[str, Any], store: Store, progress: Progress = no_progress) -> None:
        """Stream one blob into the store, verifying digest and size; resumes a partial download."""
        digest, size = descriptor["digest"], int(descriptor["size"])
        if store.has_blob(digest):
            progress(digest, size, size)
            return
        scope = self.scope(repo)
        for attempt in range(_RETRIES):
            writer = store.writer(digest, size, resume=True, pipelined=size > (8 << 20))
            headers = {"Range": f"bytes={writer.written}-"} if writer.written else {}
            try:
                r = self.request("GET", f"/v2/{repo}/blobs/{digest}", scope=scope, ok=(200, 206),
                                 what=f"download {digest}", stream=True, headers=headers)
                try:
                    if r.status_code == 200 and writer.written:  # server ignored Range: start over
                        writer.abort(keep=False)
                        writer = store.writer(digest, size, resume=False, pipelined=size > (8 << 20))
                    for chunk in r.iter_bytes(1 << 20):
                        writer.write(chunk)
                        progress(digest, writer.written, size)
                finally:
                    r.close()
            except (httpx.TransportError, RegistryError) as e:
                writer.abort(keep=True)
                if isinstance(e, RegistryError) and e.status is not None and e.status < 500:
                    raise
                if attempt == _RETRIES - 1:
                    raise RegistryError(
                        f"download of {digest} interrupted after {writer.written} of {size} bytes ({e}); "
                        "run the pull again to resume"
                    ) from e
                time.sleep(0.2 * (attempt + 1))
                continue
            except BaseException:
                writer.abort(keep=True)
                raise
            if writer.written < size:
                writer.abort(keep=True)
                continue
            try:
                writer.commit()
            except StoreError as e:
                raise RegistryError(f"{repo}: {e}") from e
            return
        raise RegistryError(f"download of {digest} did not complete; run the pull again to resume")

    # ---- manifests ----

    def get_manifest(self, repo: str, reference: str) -> tuple[bytes, str, str]:
        """(bytes, media type, digest) of a manifest; size-capped and digest-checked."""
        r = self.request("GET", f"/v2/{repo}/manifests/{reference}", scope=self.scope(repo), stream=True,
                         what=f"get manifest {repo}:{reference}", headers={"Accept": _MANIFEST_ACCEPT})
        try:
            length = int(r.headers.get("content-length", "0") or 0)
            if length > MAX_MANIFEST_BYTES:
                raise RegistryError(f"manifest {repo}:{reference} is {length} bytes, over the "
                                    f"{MAX_MANIFEST_BYTES}-byte limit: refusing it")
            buf = bytearray()
            for chunk in r.iter_bytes():
                buf += chunk
                if len(buf) > MAX_MANIFEST_BYTES:
                    raise RegistryError(f"manifest {repo}:{reference} exceeds {MAX_MANIFEST_BYTES} bytes: refusing it")
        finally:
            r.close()
        data = bytes(buf)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if reference.startswith("sha256:") and digest != reference:
            raise RegistryError(f"manifest {repo}@{reference} has digest {digest}: the registry served other bytes")
        served = r.headers.get("docker-content-digest")
        if served and served != digest:
            raise RegistryError(f"manifest {repo}:{reference}: header digest {served} but content hashes to {digest}")
        media_type = r.headers.get("content-type", "").split(";")[0].strip()
        return data, media_type, digest

    def put_manifest(self, repo: str, reference: str, data: bytes, media_type: str) -> httpx.Response:
        if len(data) > MAX_MANIFEST_BYTES:
            raise RegistryError(f"manifest is {len(data)} bytes, over the {MAX_MANIFEST_BYTES}-byte limit")
        return self.request("PUT", f"/v2/{repo}/manifests/{reference}", scope=self.scope(repo, True), ok=(201,),
                            what=f"push manifest {repo}:{reference}", content=data,
                            headers={"Content-Type": media_type})

    def delete_manifest(self, repo: str, digest: str) -> None:
        self.request("DELETE", f"/v2/{repo}/manifests/{digest}", scope=self.scope(repo, True), ok=(202,),
                     what=f"delete {repo}@{digest}")

    def tags(self, repo: str) -> list[str]:
        r = self.request("GET", f"/v2/{repo}/tags/list", scope=self.scope(repo), what=f"list tags of {repo}")
        return sorted(r.json().get("tags") or [])

    # ---- referrers (OCI 1.1, with the tag-schema fallback) ----

    def referrers(self, repo: str, digest: str) -> list[dict[str, Any]]:
        try:
            r = self.request("GET", f"/v2/{repo}/referrers/{digest}", scope=self.scope(repo),
                             what=f"referrers of {digest}", headers={"Accept": mt.OCI_INDEX})
            return list(r.json().get("manifests") or [])
        except RegistryError as e:
            if e.status not in (404, 400, 405):
                raise
        try:
            data, _, _ = self.get_manifest(repo, fallback_tag(digest))
        except RegistryError as e:
            if e.status == 404:
                return []
            raise
        return list(json.loads(data).get("manifests") or [])

    def add_referrer(self, repo: str, subject: str, descriptor: dict[str, Any], response: httpx.Response) -> None:
        """After pushing a manifest with `subject`: update the fallback tag unless the registry indexed it."""
        if response.headers.get("oci-subject") == subject:
            return
        current = [d for d in self.referrers_from_tag(repo, subject) if d["digest"] != descriptor["digest"]]
        index = {"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [*current, descriptor]}
        self.put_manifest(repo, fallback_tag(subject), json.dumps(index, separators=(",", ":")).encode(), mt.OCI_INDEX)

    def referrers_from_tag(self, repo: str, subject: str) -> list[dict[str, Any]]:
        try:
            data, _, _ = self.get_manifest(repo, fallback_tag(subject))
        except RegistryError as e:
            if e.status == 404:
                return []
            raise
        return list(json.loads(data).get("manifests") or [])


def fallback_tag(digest: str) -> str:
    """The referrers tag schema of OCI distribution 1.1: sha256:<hex> -> sha256-<hex>."""
    return digest.replace(":", "-", 1)


def client_for(ref: Reference, *, plain_http: bool = False, credentials: Credentials | None = None,
               chunk_size: int = DEFAULT_CHUNK) -> RegistryClient:
    return RegistryClient(ref.registry, plain_http=plain_http, credentials=credentials or Credentials.from_env(),
                          chunk_size=chunk_size)
