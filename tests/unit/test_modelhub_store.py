"""Local store: atomic blobs, digest checks, safe paths, refs, materialization, rm + gc."""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from inferstack.cli.main import app
from inferstack.modelhub.errors import BadReference, StoreError
from inferstack.modelhub.pack import pack
from inferstack.modelhub.reference import parse_reference
from inferstack.modelhub.store import Store, safe_relpath
from support.modelhub_fixtures import tiny_hf_model


def test_blob_with_wrong_digest_is_never_published(tmp_path: Path) -> None:
    store = Store(tmp_path)
    claimed = "sha256:" + hashlib.sha256(b"good").hexdigest()
    w = store.writer(claimed, 4)
    w.write(b"evil")
    with pytest.raises(StoreError, match="digest mismatch"):
        w.commit()
    assert not store.has_blob(claimed) and not list((tmp_path / "ingest").iterdir())
    w = store.writer(claimed, 4)
    with pytest.raises(StoreError, match="larger"):
        w.write(b"good!")
    w.abort(keep=False)
    assert store.put_bytes(b"good") == claimed and store.read_blob(claimed) == b"good"
    assert (store.blob_path(claimed).stat().st_mode & 0o222) == 0  # read-only


def test_partial_download_is_resumed(tmp_path: Path) -> None:
    store = Store(tmp_path)
    data = b"x" * 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    w = store.writer(digest, len(data))
    w.write(data[:400])
    w.abort(keep=True)
    w = store.writer(digest, len(data))
    assert w.written == 400
    w.write(data[400:])
    assert w.commit() == digest


@given(st.text(alphabet="ab./\\\x00", max_size=12))
def test_safe_relpath_never_escapes(name: str) -> None:
    try:
        p = safe_relpath(name)
    except StoreError:
        return
    normalized = posixpath.normpath(str(p))
    # "..." is an ordinary file name; only a ".." component climbs out of the store
    assert not normalized.startswith("/") and ".." not in normalized.split("/") and normalized == str(p)


def test_materialize_and_rm_with_gc(tmp_path: Path) -> None:
    store = Store(tmp_path / "s")
    a = pack(tiny_hf_model(tmp_path / "a"), parse_reference("h.io/m/a:v1"), store)
    b = pack(tiny_hf_model(tmp_path / "b", seed=1), parse_reference("h.io/m/b:v1"), store)
    model_dir = store.materialize(a.manifest_digest)
    assert (model_dir / "config.json").read_bytes() == (tmp_path / "a" / "config.json").read_bytes()
    assert store.materialize(a.manifest_digest) == model_dir
    runner = CliRunner()
    res = runner.invoke(app, ["model", "rm", "h.io/m/a:v1", "--store", str(store.root)])
    assert res.exit_code == 0, res.output
    assert not model_dir.exists() and store.refs() == {"h.io/m/b:v1": b.manifest_digest}
    # README.md and tokenizer.json are shared with b (same bytes), so they survive gc
    assert all(store.has_blob(layer["digest"]) for layer in b.manifest["layers"])
    assert not store.has_blob(a.manifest_digest)
    res = runner.invoke(app, ["model", "rm", "h.io/m/a:v1", "--store", str(store.root)])
    assert res.exit_code == 1 and "not in the local store" in res.output


def test_references() -> None:
    r = parse_reference("oci://127.0.0.1:5000/models/smollm2:q4_1")
    assert (r.registry, r.repository, r.tag, r.digest) == ("127.0.0.1:5000", "models/smollm2", "q4_1", None)
    d = "sha256:" + "a" * 64
    r = parse_reference(f"localhost/m@{d}")
    assert r.identifier == d and r.tag is None
    assert parse_reference("h.io/m").tag == "latest"
    with pytest.raises(BadReference, match="registry host"):
        parse_reference("models/m:v1")
