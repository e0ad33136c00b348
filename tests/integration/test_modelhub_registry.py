"""Push/pull against Debian's real docker-registry: auth, referrers, resumable transfers, bad registries."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.artifacts import attach
from inferstack.modelhub.errors import RegistryError
from inferstack.modelhub.pack import pack
from inferstack.modelhub.reference import parse_reference
from inferstack.modelhub.registry import Credentials, RegistryClient
from inferstack.modelhub.store import Store
from inferstack.modelhub.transfer import pull_model, push_model
from support.modelhub_fixtures import (
    DOCKER_REGISTRY,
    FaultProxy,
    Registry,
    TokenServer,
    start_registry,
    tiny_hf_model,
)

pytestmark = pytest.mark.skipif(not Path(DOCKER_REGISTRY).exists(), reason="docker-registry not installed")


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    reg = start_registry()
    yield reg
    reg.stop()


def _packed(tmp_path: Path, host: str, repo: str = "models/tiny:v1", big: int = 0) -> tuple[Store, object, str]:
    model = tiny_hf_model(tmp_path / "model")
    if big:
        (model / "extra.bin").write_bytes(hashlib.sha256(b"x").digest() * (big // 32))
    store = Store(tmp_path / "src-store")
    ref = parse_reference(f"{host}/{repo}")
    res = pack(model, ref, store)
    return store, ref, res.manifest_digest


def _store_is_clean(store: Store, digest: str) -> None:
    """Nothing visible half-written: no ref, no model folder, every blob matches its name."""
    assert store.refs() == {}
    assert not store.model_dir(digest).exists()
    for blob in (store.root / "blobs" / "sha256").iterdir():
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name


def test_round_trip_with_referrers_by_tag_and_digest(tmp_path: Path, registry: Registry) -> None:
    store, ref, digest = _packed(tmp_path, registry.host)
    attach(store, digest, mt.SIGSTORE_BUNDLE, b'{"bundle": 1}')
    with RegistryClient(registry.host, plain_http=True, chunk_size=4096) as c:
        res = push_model(store, ref, c)
        assert res.referrers == [mt.SIGSTORE_BUNDLE]
        # distribution 2.8 has no referrers API: the fallback tag sha256-<hex> carries the index
        assert f"sha256-{digest[7:]}" in c.tags("models/tiny")
        again = push_model(store, ref, c)
        assert again.blobs_sent == 0
    for i, name in enumerate([str(ref), f"{ref.name}@{digest}"]):
        dest = Store(tmp_path / f"dest{i}")
        with RegistryClient(registry.host, plain_http=True) as c:
            pulled = pull_model(dest, parse_reference(name), c)
        assert pulled.digest == digest and pulled.referrers == [mt.SIGSTORE_BUNDLE]
        files = sorted(p.relative_to(pulled.path).as_posix() for p in pulled.path.rglob("*") if p.is_file())
        assert files == ["README.md", "config.json", "model.safetensors", "tokenizer.json"]
        assert (pulled.path / "model.safetensors").read_bytes() == (tmp_path / "model/model.safetensors").read_bytes()
        assert list(dest.signatures_dir(digest).glob("*.json"))


def test_basic_auth(tmp_path: Path) -> None:
    reg = start_registry(htpasswd=("alice", "s3cret"))
    try:
        store, ref, _ = _packed(tmp_path, reg.host)
        with RegistryClient(reg.host, plain_http=True) as c, pytest.raises(RegistryError, match="401") as e:
            push_model(store, ref, c)
        assert e.value.status == 401
        bad = Credentials(username="alice", password="wrong")
        with RegistryClient(reg.host, plain_http=True, credentials=bad) as c, pytest.raises(RegistryError, match="401"):
            push_model(store, ref, c)
        good = Credentials(username="alice", password="s3cret")
        with RegistryClient(reg.host, plain_http=True, credentials=good) as c:
            push_model(store, ref, c)
            pull_model(Store(tmp_path / "dest"), ref, c)
    finally:
        reg.stop()


def test_bearer_token_auth(tmp_path: Path) -> None:
    tokens = TokenServer(tmp_path / "tokens", "bob", "hunter2")
    reg = start_registry(extra_config=tokens.registry_config())
    try:
        store, ref, _ = _packed(tmp_path, reg.host)
        with RegistryClient(reg.host, plain_http=True) as c, pytest.raises(RegistryError):
            push_model(store, ref, c)
        creds = Credentials(username="bob", password="hunter2")
        with RegistryClient(reg.host, plain_http=True, credentials=creds) as c:
            push_model(store, ref, c)
            pulled = pull_model(Store(tmp_path / "dest"), ref, c)
        assert pulled.path and (pulled.path / "config.json").exists()
        assert tokens.issued >= 1
    finally:
        reg.stop()
        tokens.stop()


def test_not_found_and_server_errors(tmp_path: Path, registry: Registry) -> None:
    dest = Store(tmp_path / "dest")
    with RegistryClient(registry.host, plain_http=True) as c, pytest.raises(RegistryError, match="404") as e:
        pull_model(dest, parse_reference(f"{registry.host}/models/absent:v1"), c)
    assert e.value.status == 404
    always = FaultProxy(registry.host, fail_first=100)
    try:
        with RegistryClient(always.host, plain_http=True) as c, pytest.raises(RegistryError, match="503"):
            pull_model(dest, parse_reference(f"{always.host}/models/absent:v1"), c)
    finally:
        always.stop()
    store, ref, digest = _packed(tmp_path, registry.host)
    with RegistryClient(registry.host, plain_http=True) as c:
        push_model(store, ref, c)
    flaky = FaultProxy(registry.host, fail_first=2)  # transient 5xx are retried with backoff
    try:
        with RegistryClient(flaky.host, plain_http=True) as c:
            pulled = pull_model(dest, parse_reference(f"{flaky.host}/models/tiny:v1"), c)
        assert pulled.digest == digest
    finally:
        flaky.stop()
    with pytest.raises(RegistryError, match="cannot reach"), RegistryClient("127.0.0.1:9", plain_http=True) as c:
        c.ping()


def test_interrupted_pull_leaves_nothing_half_written_and_resumes(tmp_path: Path, registry: Registry) -> None:
    store, ref, digest = _packed(tmp_path, registry.host, repo="models/big:v1", big=3 * 1024 * 1024)
    with RegistryClient(registry.host, plain_http=True) as c:
        push_model(store, ref, c)
    proxy = FaultProxy(registry.host, cut_after=1024 * 1024)
    dest = Store(tmp_path / "dest")
    remote = parse_reference(f"{proxy.host}/models/big:v1")
    try:
        with RegistryClient(proxy.host, plain_http=True) as c:
            pulled = pull_model(dest, remote, c)  # the cut connection is resumed with a Range request
        assert proxy.cuts == 1 and pulled.digest == digest
        big = pulled.path / "extra.bin"
        assert big.stat().st_size == 3 * 1024 * 1024
    finally:
        proxy.stop()
    # A pull that cannot finish leaves only a partial file in ingest/, never a blob, ref or model folder.
    dest2 = Store(tmp_path / "dest2")
    dead = FaultProxy(registry.host, cut_after=1024 * 1024, fail_after_cut=True)
    big_layer = max(store.manifest(digest)["layers"], key=lambda layer: layer["size"])
    try:
        with RegistryClient(dead.host, plain_http=True) as c, pytest.raises(RegistryError):
            pull_model(dest2, parse_reference(f"{dead.host}/models/big:v1"), c)
    finally:
        dead.stop()
    _store_is_clean(dest2, digest)
    assert not dest2.has_blob(big_layer["digest"])
    partial = list((dest2.root / "ingest").glob("*.part"))
    assert partial and all(p.stat().st_size < big_layer["size"] for p in partial)
    with RegistryClient(registry.host, plain_http=True) as c:  # the next pull resumes from the partial file
        assert pull_model(dest2, parse_reference(f"{registry.host}/models/big:v1"), c).digest == digest
    assert not list((dest2.root / "ingest").glob("*.part"))


def test_upload_survives_a_dropped_connection(tmp_path: Path, registry: Registry) -> None:
    store, _, digest = _packed(tmp_path, registry.host, big=3 * 1024 * 1024)
    proxy = FaultProxy(registry.host, cut_upload_after=1536 * 1024)
    ref = parse_reference(f"{proxy.host}/models/upload:v1")
    store.tag(str(ref), digest)
    try:
        with RegistryClient(proxy.host, plain_http=True, chunk_size=512 * 1024) as c:
            push_model(store, ref, c)
        assert proxy.cuts == 1
    finally:
        proxy.stop()
    with RegistryClient(registry.host, plain_http=True) as c:
        pulled = pull_model(Store(tmp_path / "d"), parse_reference(f"{registry.host}/models/upload:v1"), c)
    assert pulled.digest == digest


def test_interrupted_push_resumes_where_it_stopped(tmp_path: Path, registry: Registry) -> None:
    store, _, digest = _packed(tmp_path, registry.host, big=3 * 1024 * 1024)
    ref = parse_reference(f"{registry.host}/models/resume:v1")
    store.tag(str(ref), digest)
    big = max(store.manifest(digest)["layers"], key=lambda layer: layer["size"])

    class Stop(Exception):
        pass

    def stop_midway(d: str, done: int, total: int) -> None:
        if d == big["digest"] and done >= 1024 * 1024:
            raise Stop  # the process "dies" after 1 MiB of the big blob went through

    with RegistryClient(registry.host, plain_http=True, chunk_size=512 * 1024) as c, pytest.raises(Stop):
        push_model(store, ref, c, stop_midway)
    offsets: list[int] = []

    def record(d: str, done: int, total: int) -> None:
        if d == big["digest"]:
            offsets.append(done)

    with RegistryClient(registry.host, plain_http=True, chunk_size=512 * 1024) as c:
        push_model(store, ref, c, record)
    assert offsets[0] == 1024 * 1024 + 512 * 1024  # continued after the chunks the registry already had
    assert not list((store.root / "uploads").glob("*.json"))
    with RegistryClient(registry.host, plain_http=True) as c:
        assert pull_model(Store(tmp_path / "d"), ref, c).digest == digest


def test_path_traversal_and_foreign_artifacts_are_refused(tmp_path: Path, registry: Registry) -> None:
    store, ref, digest = _packed(tmp_path, registry.host)
    manifest = store.manifest(digest)
    with RegistryClient(registry.host, plain_http=True) as c:
        push_model(store, ref, c)
        for name, evil in [("dotdot", "../../etc/passwd"), ("abs", "/etc/passwd"), ("nested", "a/../../x")]:
            m = json.loads(json.dumps(manifest))
            for key in (mt.ANN_FILEPATH, mt.ANN_TITLE):
                m["layers"][0]["annotations"][key] = evil
            c.put_manifest("models/tiny", name, json.dumps(m).encode(), mt.OCI_MANIFEST)
        clash = json.loads(json.dumps(manifest))  # issue 19: `a` and `a/b` gave a raw "File exists"
        for layer, path in zip(clash["layers"][:2], ("a", "a/b"), strict=True):
            for key in (mt.ANN_FILEPATH, mt.ANN_TITLE):
                layer["annotations"][key] = path
        c.put_manifest("models/tiny", "clash", json.dumps(clash).encode(), mt.OCI_MANIFEST)
        image = json.loads(json.dumps(manifest))
        image.pop("artifactType")
        image["config"]["mediaType"] = "application/vnd.oci.image.config.v1+json"
        c.put_manifest("models/tiny", "image", json.dumps(image).encode(), mt.OCI_MANIFEST)
    dest = Store(tmp_path / "dest")
    for name in ("dotdot", "abs", "nested"):
        with RegistryClient(registry.host, plain_http=True) as c, pytest.raises(RegistryError, match="traversal"):
            pull_model(dest, parse_reference(f"{registry.host}/models/tiny:{name}"), c)
    with RegistryClient(registry.host, plain_http=True) as c, pytest.raises(RegistryError, match="not a ModelPack"):
        pull_model(dest, parse_reference(f"{registry.host}/models/tiny:image"), c)
    with RegistryClient(registry.host, plain_http=True) as c, pytest.raises(
            RegistryError, match="layer paths a and a/b clash: a would be both a file and a folder"):
        pull_model(dest, parse_reference(f"{registry.host}/models/tiny:clash"), c)
    assert dest.refs() == {} and not list((dest.root / "blobs" / "sha256").iterdir())


def test_oversized_manifest_is_refused(tmp_path: Path) -> None:
    """A registry (here a stub at the network edge) serving a 5 MiB manifest is cut off at 4 MiB."""
    huge = b'{"layers": [' + b" " * (5 * 1024 * 1024) + b"]}"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=huge, headers={"Content-Type": mt.OCI_MANIFEST})

    c = RegistryClient("registry.invalid", plain_http=True)
    c.client = httpx.Client(transport=httpx.MockTransport(handler))
    with pytest.raises(RegistryError, match=r"limit|exceeds"):
        pull_model(Store(tmp_path / "s"), parse_reference("registry.invalid/models/x:v1"), c)


def test_sign_a_model_that_is_only_in_the_registry(tmp_path: Path, registry: Registry) -> None:
    """`model sign REF` fetches only the manifest, signs its layer digests and pushes the bundle."""
    from typer.testing import CliRunner

    from inferstack.cli.main import app
    from inferstack.modelhub.gate import verify_before_load
    from inferstack.modelhub.policy import TrustPolicy
    from support.modelhub_fixtures import write_ec_keypair

    store, ref, digest = _packed(tmp_path, registry.host, repo="models/remote-sign:v1")
    with RegistryClient(registry.host, plain_http=True) as c:
        push_model(store, ref, c)
    priv, pub = write_ec_keypair(tmp_path / "keys")
    signer_store = tmp_path / "signer"
    res = CliRunner().invoke(app, ["model", "sign", str(ref), "--key", str(priv), "--store", str(signer_store),
                                   "--plain-http"])
    assert res.exit_code == 0, res.output
    assert "registry" in res.output
    assert not Store(signer_store).has_blob(store.manifest(digest)["layers"][0]["digest"])  # no layer was read
    dest = Store(tmp_path / "dest")
    with RegistryClient(registry.host, plain_http=True) as c:
        pulled = pull_model(dest, ref, c)
    report = verify_before_load(pulled.path, TrustPolicy(trusted_keys=[pub]))
    assert report.status == "verified" and report.files == 4
