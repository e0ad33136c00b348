"""Registry client behaviour a Debian docker-registry cannot show: the OCI 1.1 referrers API and OCI-Subject."""

from __future__ import annotations

import json

import httpx

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.registry import RegistryClient, fallback_tag

SUBJECT = "sha256:" + "1" * 64
SIG = {"mediaType": mt.OCI_MANIFEST, "digest": "sha256:" + "2" * 64, "size": 10, "artifactType": mt.SIGSTORE_BUNDLE}


def _client(handler) -> tuple[RegistryClient, list[httpx.Request]]:
    seen: list[httpx.Request] = []

    def record(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return handler(request)

    c = RegistryClient("registry.test", plain_http=True)
    c.client = httpx.Client(transport=httpx.MockTransport(record))
    return c, seen


def test_referrers_api_is_preferred_over_the_fallback_tag() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == f"/v2/m/referrers/{SUBJECT}":
            return httpx.Response(200, json={"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [SIG]})
        return httpx.Response(404)

    c, seen = _client(handler)
    assert c.referrers("m", SUBJECT) == [SIG]
    assert [r.url.path for r in seen] == [f"/v2/m/referrers/{SUBJECT}"]


def test_fallback_tag_is_skipped_when_the_registry_indexed_the_subject() -> None:
    c, seen = _client(lambda r: httpx.Response(404))
    c.add_referrer("m", SUBJECT, SIG, httpx.Response(201, headers={"OCI-Subject": SUBJECT}))
    assert seen == []


def test_fallback_tag_index_is_extended() -> None:
    other = {**SIG, "digest": "sha256:" + "3" * 64}
    stored: dict[str, bytes] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        tag_path = f"/v2/m/manifests/{fallback_tag(SUBJECT)}"
        if request.method == "GET" and request.url.path == tag_path:
            body = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": [other]}).encode()
            return httpx.Response(200, content=body, headers={"Content-Type": mt.OCI_INDEX})
        if request.method == "PUT" and request.url.path == tag_path:
            stored["index"] = request.content
            return httpx.Response(201)
        return httpx.Response(404)

    c, _ = _client(handler)
    c.add_referrer("m", SUBJECT, SIG, httpx.Response(201))
    assert [d["digest"] for d in json.loads(stored["index"])["manifests"]] == [other["digest"], SIG["digest"]]
    assert fallback_tag(SUBJECT) == "sha256-" + "1" * 64
