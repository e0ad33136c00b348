"""SLSA provenance and CycloneDX 1.6 ML-BOM from `pack`, validated against the official schema."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from inferstack.modelhub import mediatypes as mt
from inferstack.modelhub.attest import attach_pack_attestations, referrer_payload
from inferstack.modelhub.pack import pack
from inferstack.modelhub.reference import parse_reference
from inferstack.modelhub.store import Store
from support.modelhub_fixtures import tiny_hf_model

validation = pytest.importorskip("cyclonedx.validation.json")
from cyclonedx.schema import SchemaVersion  # noqa: E402


def _attested(tmp_path: Path, **kw):
    model = tiny_hf_model(tmp_path / "m")
    store = Store(tmp_path / "s")
    ref = parse_reference("127.0.0.1:5000/models/tiny:v1")
    res = pack(model, ref, store)
    t = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    prov, bom = attach_pack_attestations(store, res, ref, model, t, t, **kw)
    return store, res, prov, bom


def _validate(bom: dict) -> None:
    error = validation.JsonStrictValidator(SchemaVersion.V1_6).validate_str(json.dumps(bom))
    assert error is None, error


def test_ml_bom_is_valid_cyclonedx_1_6(tmp_path: Path) -> None:
    store, res, _, bom = _attested(tmp_path, datasets=["https://example.org/data/tiny-stories"],
                                   limitations=["toy model"])
    _validate(bom)
    model = bom["components"][0]
    assert model["type"] == "machine-learning-model"
    assert model["hashes"][0]["content"] == res.manifest_digest.split(":")[1]
    card = model["modelCard"]
    assert card["modelParameters"]["modelArchitecture"] == "llama"
    assert card["modelParameters"]["datasets"] == [{"ref": "dataset-0"}]
    assert card["considerations"]["technicalLimitations"] == ["toy model"]
    props = {p["name"]: p["value"] for p in card["properties"]}
    assert props["org.cncf.model.paramSize"] == "2.3K" and props["org.cncf.model.quantization"] == "none"
    files = {c["name"]: c["hashes"][0]["content"] for c in model["components"]}
    assert files == {f.relpath: f.digest.split(":")[1] for f in res.files}
    assert bom["components"][1]["type"] == "data"
    assert referrer_payload(store, res.manifest_digest, mt.CYCLONEDX_JSON) == bom


def test_schema_catches_a_broken_bom(tmp_path: Path) -> None:
    _, _, _, bom = _attested(tmp_path)
    _validate(bom)
    bom["components"][0]["type"] = "neural-network"
    with pytest.raises(AssertionError):
        _validate(bom)


def test_slsa_provenance(tmp_path: Path) -> None:
    store, res, prov, _ = _attested(tmp_path, base_model="127.0.0.1:5000/models/base@sha256:" + "ab" * 32)
    assert prov["_type"] == "https://in-toto.io/Statement/v1"
    assert prov["predicateType"] == "https://slsa.dev/provenance/v1"
    assert prov["subject"][0]["digest"]["sha256"] == res.manifest_digest.split(":")[1]
    pred = prov["predicate"]
    deps = {d["name"]: d for d in pred["buildDefinition"]["resolvedDependencies"]}
    assert deps["model.safetensors"]["digest"]["sha256"] == res.files[2].digest.split(":")[1]
    assert deps["base-model"]["digest"]["sha256"] == "ab" * 32
    assert pred["runDetails"]["metadata"]["startedOn"] == "2026-11-27T12:00:00Z"
    assert set(pred["runDetails"]["builder"]) == {"id", "version"}
    stored = referrer_payload(store, res.manifest_digest, mt.IN_TOTO)
    assert stored == prov
    # attestations are referrers: the model manifest (and its digest) did not change
    assert store.resolve("127.0.0.1:5000/models/tiny:v1") == res.manifest_digest
